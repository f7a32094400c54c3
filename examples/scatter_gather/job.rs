//! The scatter-gather job: a file of records in S3 is fanned out through SQS to workers that
//! write each record to DynamoDB and emit an event to Kinesis; the last task's worker detects
//! completion and gathers a summary file into S3.
//!
//! Shared by the example (`main.rs`) and its integration test (`tests/scatter_gather.rs`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, KeySchemaElement, KeyType, Put, PutRequest, ReturnValue,
    ScalarAttributeType, TransactWriteItem, Update, WriteRequest,
};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use kinesis_producer::batch::{dynamodb, sqs, BatchCall, BatchOptions, Failure};
use kinesis_producer::Producer;
use kinesis_producer::RetryPolicy;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The AWS clients of the job, all pointed at local servers.
#[derive(Clone)]
pub struct Clients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub kinesis: aws_sdk_kinesis::Client,
}

impl Clients {
    /// S3 (path-style), SQS and DynamoDB from `sdk` (moto), Kinesis as given.
    ///
    /// The job's own calls (receive, reads, the claim) get up to ten attempts of 10 seconds
    /// each from the SDK's retryer, so that a request moto answers with a 500 or never answers
    /// is retried rather than failing or hanging the job. The batch helpers and the counting
    /// transaction retry by themselves.
    pub fn new(sdk: &aws_config::SdkConfig, kinesis: aws_sdk_kinesis::Client) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(Duration::from_secs(10))
            .build();
        let sdk = &sdk
            .to_builder()
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(10))
            .timeout_config(timeouts)
            .build();
        let s3 = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(true)
            .build();
        Clients {
            s3: aws_sdk_s3::Client::from_conf(s3),
            sqs: aws_sdk_sqs::Client::new(sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
            kinesis,
        }
    }
}

/// The queue's visibility timeout: long enough that a message is not delivered again while a
/// worker still works on it (on a loaded machine a batch of ten tasks can take seconds, and
/// with a short timeout every slow batch came back to another worker, whose batch came back
/// in turn, without end).
pub const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(60);

/// How soon the message of a "crashed" worker (`redeliver_every`) comes back: the worker makes
/// it visible again after this many seconds, standing in for its visibility timeout running
/// out, so that redeliveries come soon without a short timeout for every message.
const CRASH_VISIBILITY_SECONDS: i32 = 1;

/// One run of the job.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub records: usize,
    /// Records per SQS message: 1 is the seed's per-record variant.
    pub chunk: usize,
    pub workers: usize,
    /// Fault injection: a worker "crashes" after processing every `k`-th task the first time
    /// it receives it (it does not delete the message), so SQS delivers it again.
    pub redeliver_every: Option<usize>,
}

/// What the gather writes to S3, and what the generator expects it to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub count: u64,
    /// Prices in cents, so that sums are exact.
    pub sum_cents: u64,
    pub min_cents: u64,
    pub max_cents: u64,
}

impl Totals {
    fn add(&mut self, cents: u64) {
        if self.count == 0 {
            self.min_cents = cents;
            self.max_cents = cents;
        }
        self.count += 1;
        self.sum_cents += cents;
        self.min_cents = self.min_cents.min(cents);
        self.max_cents = self.max_cents.max(cents);
    }
}

/// The timings and results of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub scatter: Duration,
    pub process: Duration,
    pub gather: Duration,
    pub messages: usize,
    pub expected: Totals,
    pub gathered: Totals,
    /// Deliveries that found their task already counted (SQS redeliveries).
    pub redelivered: usize,
    /// Claims of the gather that succeeded in this process: 1 in a correct run.
    pub gathers: usize,
    /// The summary file as written to S3.
    pub summary_json: String,
}

pub const BUCKET: &str = "scatter-gather";
pub const INPUT_KEY: &str = "input/records.jsonl";
pub const SUMMARY_KEY: &str = "output/summary.json";
pub const QUEUE: &str = "tasks";
pub const ITEMS_TABLE: &str = "items";
pub const PROGRESS_TABLE: &str = "progress";
pub const STREAM: &str = "item-events";
/// The counter item's attribute of records counted.
const COUNTED: &str = "records_counted";

/// The price of record `i`, in cents: spread over 0.01 to 1,000.00 without randomness, so a run
/// can be checked.
pub fn price_cents(i: usize) -> u64 {
    (i as u64 * 7919 % 100_000) + 1
}

/// The input file: one JSON object per line.
pub fn input_file(records: usize) -> (String, Totals) {
    let mut text = String::with_capacity(records * 40);
    let mut totals = Totals::default();
    for i in 0..records {
        let cents = price_cents(i);
        totals.add(cents);
        text.push_str(&format!(
            "{{\"itemNo\": \"item#{i}\", \"price\": {}.{:02}}}\n",
            cents / 100,
            cents % 100
        ));
    }
    (text, totals)
}

/// Creates the bucket, queue, tables and stream a run needs; returns the queue URL.
pub async fn create_resources(clients: &Clients) -> Result<String, Error> {
    clients.s3.create_bucket().bucket(BUCKET).send().await?;
    let queue = clients
        .sqs
        .create_queue()
        .queue_name(QUEUE)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            VISIBILITY_TIMEOUT.as_secs().to_string(),
        )
        .send()
        .await?;
    for table in [ITEMS_TABLE, PROGRESS_TABLE] {
        clients
            .dynamodb
            .create_table()
            .table_name(table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()?,
            )
            .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
            .send()
            .await?;
    }
    clients
        .kinesis
        .create_stream()
        .stream_name(STREAM)
        .shard_count(4)
        .send()
        .await?;
    loop {
        let summary = clients
            .kinesis
            .describe_stream_summary()
            .stream_name(STREAM)
            .send()
            .await?;
        let active = summary
            .stream_description_summary
            .is_some_and(|s| s.stream_status == aws_sdk_kinesis::types::StreamStatus::Active);
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(queue.queue_url.unwrap_or_default())
}

/// Runs the job on resources made by [`create_resources`].
pub async fn run(clients: &Clients, queue_url: &str, config: &JobConfig) -> Result<Report, Error> {
    let (input, expected) = input_file(config.records);
    clients
        .s3
        .put_object()
        .bucket(BUCKET)
        .key(INPUT_KEY)
        .body(input.into_bytes().into())
        .send()
        .await?;

    let started = Instant::now();
    let messages = scatter(clients, queue_url, config.chunk).await?;
    let scatter_time = started.elapsed();

    let producer = Producer::builder()
        .stream_name(STREAM)
        .client(clients.kinesis.clone())
        .build()
        .await?;
    // An event Kinesis could not take fails the run: counted here, checked after stop.
    let mut failures = producer.notify_failures();
    let failed_events = tokio::spawn(async move {
        let mut count = 0usize;
        while let Some(failed) = failures.recv().await {
            if count == 0 {
                eprintln!("an event was not delivered: {}", failed.error);
            }
            count += 1;
        }
        count
    });
    let shared = Arc::new(Shared {
        clients: clients.clone(),
        queue_url: queue_url.to_owned(),
        config: config.clone(),
        total: config.records as u64,
        producer,
        finished: AtomicBool::new(false),
        redelivered: AtomicUsize::new(0),
        gathers: AtomicUsize::new(0),
        process_started: Instant::now(),
        scatter_time,
        gathered: tokio::sync::Mutex::new(None),
        progress_writes: tokio::sync::Mutex::new(()),
    });
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.workers {
        workers.spawn(work(Arc::clone(&shared)));
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let shared = Arc::into_inner(shared).ok_or("a worker still holds the job")?;
    shared.producer.stop().await;
    let failed_events = failed_events.await?;
    if failed_events > 0 {
        return Err(format!("{failed_events} events were not delivered to Kinesis").into());
    }
    let (process, gather, gathered, summary_json) = shared
        .gathered
        .into_inner()
        .ok_or("the job ended without a gather")?;
    Ok(Report {
        scatter: scatter_time,
        process,
        gather,
        messages,
        expected,
        gathered,
        redelivered: shared.redelivered.into_inner(),
        gathers: shared.gathers.into_inner(),
        summary_json,
    })
}

/// Reads the input from S3 and sends one SQS message per `chunk` records, through the batch
/// helper. Returns the number of messages.
async fn scatter(clients: &Clients, queue_url: &str, chunk: usize) -> Result<usize, Error> {
    let object = clients
        .s3
        .get_object()
        .bucket(BUCKET)
        .key(INPUT_KEY)
        .send()
        .await?;
    let bytes = object.body.collect().await?.into_bytes();
    let text = std::str::from_utf8(&bytes)?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let messages = lines
        .chunks(chunk.max(1))
        .enumerate()
        .map(|(task, records)| {
            // A task is its number and its records' lines, as a JSON array of strings' objects.
            let body = format!("{{\"task\": {task}, \"records\": [{}]}}", records.join(","));
            SendMessageBatchRequestEntry::builder()
                .id(task.to_string())
                .message_body(body)
                .build()
                .expect("id and body are set")
        });
    let messages: Vec<_> = messages.collect();
    let count = messages.len();
    let options = BatchOptions {
        concurrency: 8,
        time_budget: Duration::from_secs(600),
        ..BatchOptions::default()
    };
    let sent = sqs::SendMessageBatch::new(clients.sqs.clone(), queue_url)
        .send_all(messages, &options)
        .await?;
    if let Some(first) = sent.unprocessed.first() {
        return Err(format!(
            "{} tasks not sent, the first for {}",
            sent.unprocessed.len(),
            first.reason
        )
        .into());
    }
    Ok(count)
}

/// What the workers share.
struct Shared {
    clients: Clients,
    queue_url: String,
    config: JobConfig,
    total: u64,
    producer: Producer,
    finished: AtomicBool,
    redelivered: AtomicUsize,
    /// Claims of the gather won (each then scans and writes the summary).
    gathers: AtomicUsize,
    process_started: Instant,
    scatter_time: Duration,
    /// Set once, by the worker that detects completion: process and gather durations, totals,
    /// the summary file.
    gathered: tokio::sync::Mutex<Option<(Duration, Duration, Totals, String)>>,
    /// Held by a worker while it writes to the progress table (a task's count, the claim of
    /// the gather): this process's workers write there one at a time. Correctness does not
    /// rest on it (conditions do, across processes too); moto does. moto cancels a
    /// transaction by putting back a copy of the table taken before it began, undoing what
    /// other writers committed meanwhile, and under load it also fails transactions that
    /// another request overlapped. Seen with concurrent writers: tasks' markers and counts
    /// lost, the counter short for ever, a task counted again on its redelivery.
    progress_writes: tokio::sync::Mutex<()>,
}

/// One worker (a stand-in for a Lambda function): receives tasks until the job is gathered and
/// the queue is empty.
async fn work(job: Arc<Shared>) -> Result<(), Error> {
    let delete = sqs::DeleteMessageBatch::new(job.clients.sqs.clone(), &job.queue_url);
    let writer = dynamodb::BatchWriteItem::new(job.clients.dynamodb.clone(), ITEMS_TABLE);
    let options = BatchOptions {
        time_budget: Duration::from_secs(120),
        ..BatchOptions::default()
    };
    loop {
        let received = job
            .clients
            .sqs
            .receive_message()
            .queue_url(&job.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await?;
        let messages = received.messages.unwrap_or_default();
        if messages.is_empty() {
            if job.finished.load(Ordering::SeqCst)
                && queue_is_empty(&job.clients.sqs, &job.queue_url).await?
            {
                return Ok(());
            }
            continue;
        }
        let mut done = Vec::new();
        for message in messages {
            let task: Task = parse_task(message.body.as_deref().unwrap_or_default())?;
            let writes = task.records.iter().map(|(item_no, price)| {
                let item = HashMap::from([
                    ("pk".to_owned(), AttributeValue::S(item_no.clone())),
                    ("price".to_owned(), AttributeValue::N(price.clone())),
                ]);
                WriteRequest::builder()
                    .put_request(
                        PutRequest::builder()
                            .set_item(Some(item))
                            .build()
                            .expect("item is set"),
                    )
                    .build()
            });
            let written = writer.send_all(writes, &options).await?;
            if let Some(first) = written.unprocessed.first() {
                return Err(format!(
                    "task {}: an item was not written: {}",
                    task.number, first.reason
                )
                .into());
            }
            // At least once: the events go before the task is counted, so a crash between the
            // two sends them again rather than never.
            for (item_no, price) in &task.records {
                let event = format!(
                    "{{\"itemNo\": \"{item_no}\", \"price\": {price}, \"event\": \"processed\"}}"
                );
                job.producer
                    .put(event.into_bytes(), item_no.as_str())
                    .await?;
            }
            if !count_task(&job, &task).await? {
                job.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            // After every task, counted now or before: a transaction that was applied but whose
            // answer was lost looks like a redelivery, and must not leave the job ungathered.
            maybe_gather(&job).await?;
            let first_receipt = message
                .attributes
                .as_ref()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .is_none_or(|n| n == "1");
            let crash = job
                .config
                .redeliver_every
                .is_some_and(|k| task.number.is_multiple_of(k) && first_receipt);
            let receipt_handle = message.receipt_handle.unwrap_or_default();
            if crash {
                // Not deleted: the message comes back, as it would once the visibility timeout
                // of a worker that died ran out.
                job.clients
                    .sqs
                    .change_message_visibility()
                    .queue_url(&job.queue_url)
                    .receipt_handle(receipt_handle)
                    .visibility_timeout(CRASH_VISIBILITY_SECONDS)
                    .send()
                    .await?;
            } else {
                done.push(
                    DeleteMessageBatchRequestEntry::builder()
                        .id("task")
                        .receipt_handle(receipt_handle)
                        .build()
                        .expect("id and handle are set"),
                );
            }
        }
        let deleted = delete.send_all(done, &options).await?;
        if let Some(first) = deleted.unprocessed.first() {
            // The message comes back and is processed again, idempotently.
            eprintln!("a message was not deleted: {}", first.reason);
        }
    }
}

/// A task as a worker reads it: its number, and each record's item number and price (as text,
/// exactly as in the input).
struct Task {
    number: usize,
    records: Vec<(String, String)>,
}

fn parse_task(body: &str) -> Result<Task, Error> {
    let value: serde_json::Value = serde_json::from_str(body)?;
    let number = value["task"].as_u64().ok_or("a task without a number")? as usize;
    let mut records = Vec::new();
    for record in value["records"]
        .as_array()
        .ok_or("a task without records")?
    {
        let item_no = record["itemNo"].as_str().ok_or("a record without itemNo")?;
        let price = record["price"]
            .as_number()
            .ok_or("a record without a price")?;
        records.push((item_no.to_owned(), price.to_string()));
    }
    Ok(Task { number, records })
}

/// Counts the task's records towards the total, once: one transaction writes the task's marker
/// (only if absent) and adds to the counter. `false` when the task was already counted.
async fn count_task(job: &Shared, task: &Task) -> Result<bool, Error> {
    let marker = Put::builder()
        .table_name(PROGRESS_TABLE)
        .item("pk", AttributeValue::S(format!("task#{}", task.number)))
        .condition_expression("attribute_not_exists(pk)")
        .build()?;
    let counter = Update::builder()
        .table_name(PROGRESS_TABLE)
        .key("pk", AttributeValue::S("counter".to_owned()))
        .update_expression("ADD #counted :n")
        .expression_attribute_names("#counted", COUNTED)
        .expression_attribute_values(":n", AttributeValue::N(task.records.len().to_string()))
        .build()?;
    // moto fails a transaction with a 500 when another request changes the table while it
    // copies it (no lock), often enough under 16 workers to drain the SDK's retry quota: the
    // job retries transient failures itself. A retry of a transaction that did apply finds its
    // marker and reads as "already counted", which `maybe_gather` after every task tolerates.
    let backoff = RetryPolicy {
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_secs(1),
    };
    let _writing = job.progress_writes.lock().await;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = job
            .clients
            .dynamodb
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(marker.clone()).build())
            .transact_items(TransactWriteItem::builder().update(counter.clone()).build())
            .send()
            .await;
        let error = match result {
            Ok(_) => return Ok(true),
            Err(error) => error,
        };
        let canceled = error
            .as_service_error()
            .is_some_and(|e| e.is_transaction_canceled_exception());
        if canceled {
            return Ok(false);
        }
        if attempt >= 30 || !Failure::from_sdk(&error).transient {
            return Err(error.into());
        }
        tokio::time::sleep(backoff.backoff(attempt)).await;
    }
}

/// If every record is counted, claims the gather (one conditional update: exactly one worker
/// wins it) and runs it.
async fn maybe_gather(job: &Shared) -> Result<(), Error> {
    let counter = job
        .clients
        .dynamodb
        .get_item()
        .table_name(PROGRESS_TABLE)
        .key("pk", AttributeValue::S("counter".to_owned()))
        .consistent_read(true)
        .send()
        .await?;
    let processed = counter
        .item
        .as_ref()
        .and_then(|i| i.get(COUNTED))
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    if processed < job.total {
        return Ok(());
    }
    let writing = job.progress_writes.lock().await;
    // The claim names its claimant, and a claimant's own claim passes the condition: when the
    // SDK retries a claim that applied but whose answer was lost, the retry succeeds instead of
    // reading as another worker's claim, which would leave the job without a gather.
    let claimant = uuid::Uuid::new_v4().to_string();
    let claim = job
        .clients
        .dynamodb
        .update_item()
        .table_name(PROGRESS_TABLE)
        .key("pk", AttributeValue::S("counter".to_owned()))
        .update_expression("SET gathered = :claimant")
        .condition_expression("attribute_not_exists(gathered) OR gathered = :claimant")
        .expression_attribute_values(":claimant", AttributeValue::S(claimant))
        .return_values(ReturnValue::None)
        .send()
        .await;
    drop(writing);
    match claim {
        Ok(_) => {}
        Err(error)
            if error
                .as_service_error()
                .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
        {
            return Ok(());
        }
        Err(error) => return Err(error.into()),
    }
    job.gathers.fetch_add(1, Ordering::SeqCst);
    let process = job.process_started.elapsed();
    let gather_started = Instant::now();
    let totals = scan_totals(&job.clients.dynamodb).await?;
    let gather = gather_started.elapsed();
    let summary = format!(
        concat!(
            "{{\"count\": {}, \"sum\": {}.{:02}, \"min\": {}.{:02}, \"max\": {}.{:02}, ",
            "\"scatter_ms\": {}, \"process_ms\": {}, \"gather_ms\": {}}}\n"
        ),
        totals.count,
        totals.sum_cents / 100,
        totals.sum_cents % 100,
        totals.min_cents / 100,
        totals.min_cents % 100,
        totals.max_cents / 100,
        totals.max_cents % 100,
        job.scatter_time.as_millis(),
        process.as_millis(),
        gather.as_millis(),
    );
    job.clients
        .s3
        .put_object()
        .bucket(BUCKET)
        .key(SUMMARY_KEY)
        .body(summary.clone().into_bytes().into())
        .send()
        .await?;
    let gather = gather_started.elapsed();
    *job.gathered.lock().await = Some((process, gather, totals, summary));
    job.finished.store(true, Ordering::SeqCst);
    Ok(())
}

/// Count, sum, min and max of the items' prices, from a scan of the items table.
async fn scan_totals(client: &aws_sdk_dynamodb::Client) -> Result<Totals, Error> {
    let mut totals = Totals::default();
    for (_, cents) in scan_items(client).await? {
        totals.add(cents);
    }
    Ok(totals)
}

/// Every item of the items table: its item number and price in cents.
pub async fn scan_items(client: &aws_sdk_dynamodb::Client) -> Result<Vec<(String, u64)>, Error> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(ITEMS_TABLE)
            .set_exclusive_start_key(start)
            .send()
            .await?;
        for item in page.items() {
            let key = item
                .get("pk")
                .and_then(|v| v.as_s().ok())
                .ok_or("an item without a key")?;
            let price = item
                .get("price")
                .and_then(|v| v.as_n().ok())
                .ok_or("an item without a price")?;
            items.push((key.clone(), cents_of(price)?));
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return Ok(items);
        }
    }
}

/// "12.3" → 1230 cents.
fn cents_of(price: &str) -> Result<u64, Error> {
    let (whole, fraction) = price.split_once('.').unwrap_or((price, ""));
    let fraction = format!("{fraction:0<2}");
    if fraction.len() > 2 {
        return Err(format!("price {price} has more than two decimals").into());
    }
    Ok(whole.parse::<u64>()? * 100 + fraction.parse::<u64>()?)
}

/// Whether the queue holds no message, visible or in flight.
pub async fn queue_is_empty(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Result<bool, Error> {
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await?;
    let attributes = attributes.attributes.unwrap_or_default();
    let count = |name| {
        attributes
            .get(&name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(count(QueueAttributeName::ApproximateNumberOfMessages) == 0
        && count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible) == 0)
}
