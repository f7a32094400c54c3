//! The scatter-gather example's job, run whole for a small N against the real local servers
//! (moto for S3, SQS and DynamoDB; the embedded Kinesis server), with SQS redeliveries injected.

#[path = "../examples/scatter_gather/job.rs"]
mod job;
mod support;

use std::collections::HashMap;

use job::{Clients, JobConfig};
use support::local_kinesis::LocalKinesis;
use support::moto::{moto, sdk_config};

/// Runs the job and checks every promise of the example: the summary file, the items, the
/// events, and an empty queue.
async fn run_and_check(config: JobConfig) -> job::Report {
    let server = moto().await;
    let kinesis = LocalKinesis::start(false).await;
    let clients = Clients::new(&sdk_config(&server.endpoint).await, kinesis.client.clone());
    let queue_url = job::create_resources(&clients).await.expect("resources");
    // A job that never completes fails the test instead of hanging it.
    let run = job::run(&clients, &queue_url, &config);
    let report = tokio::time::timeout(std::time::Duration::from_secs(180), run)
        .await
        .expect("the job completes within 3 minutes")
        .expect("the job runs");

    // The summary: matches the input, and is the file in S3.
    let (_, expected) = job::input_file(config.records);
    assert_eq!(report.expected, expected);
    assert_eq!(report.gathered, expected, "gathered totals");
    assert_eq!(report.gathers, 1, "exactly one worker won the gather");
    let summary = clients
        .s3
        .get_object()
        .bucket(job::BUCKET)
        .key(job::SUMMARY_KEY)
        .send()
        .await
        .expect("summary file");
    let summary = summary.body.collect().await.expect("body").into_bytes();
    let summary: serde_json::Value = serde_json::from_slice(&summary).expect("summary is JSON");
    assert_eq!(summary["count"], config.records);
    let cents = |v: &serde_json::Value| (v.as_f64().expect("a number") * 100.0).round() as u64;
    assert_eq!(cents(&summary["sum"]), expected.sum_cents);
    assert_eq!(cents(&summary["min"]), expected.min_cents);
    assert_eq!(cents(&summary["max"]), expected.max_cents);
    for phase in ["scatter_ms", "process_ms", "gather_ms"] {
        assert!(summary[phase].is_u64(), "{phase}");
    }

    // Every record is an item with its price.
    let items: HashMap<String, u64> = job::scan_items(&clients.dynamodb)
        .await
        .expect("scan")
        .into_iter()
        .collect();
    assert_eq!(items.len(), config.records);
    for i in 0..config.records {
        assert_eq!(items[&format!("item#{i}")], job::price_cents(i), "item#{i}");
    }

    // One event per record at least; more only for redelivered tasks (at least once).
    let events = kinesis.read_all(job::STREAM).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for event in &events {
        let value: serde_json::Value =
            serde_json::from_slice(&event.record.data).expect("event JSON");
        let item = value["itemNo"].as_str().expect("itemNo").to_owned();
        assert_eq!(event.record.partition_key, item, "keyed by item");
        *seen.entry(item).or_default() += 1;
    }
    assert_eq!(seen.len(), config.records, "every record has an event");
    let extra = events.len() - config.records;
    assert!(
        extra <= report.redelivered * config.chunk,
        "{extra} extra events for {} redeliveries",
        report.redelivered
    );

    // Nothing is left in the queue.
    let empty = job::queue_is_empty(&clients.sqs, &queue_url)
        .await
        .expect("attributes");
    assert!(empty, "messages left in the queue");
    report
}

#[tokio::test]
async fn chunked_job_counts_every_record_once_and_gathers_once_despite_redeliveries() {
    let report = run_and_check(JobConfig {
        records: 700,
        chunk: 9,
        workers: 3,
        redeliver_every: Some(4),
    })
    .await;
    assert_eq!(report.messages, 78);
    assert!(
        report.redelivered >= 20,
        "every 4th task came back: {}",
        report.redelivered
    );
}

#[tokio::test]
async fn per_record_job_writes_and_reports_every_record() {
    let report = run_and_check(JobConfig {
        records: 120,
        chunk: 1,
        workers: 4,
        redeliver_every: None,
    })
    .await;
    assert_eq!(report.messages, 120);
}
