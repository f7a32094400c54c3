//! The batch helpers against moto (a real local server speaking the AWS APIs), through the real
//! SDK clients over HTTP. Partial failures and outages come from a fault proxy in front of the
//! server, never from mocks of our own code.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, KeySchemaElement, KeyType, PutRequest,
    ScalarAttributeType, WriteRequest,
};
use aws_sdk_s3::types::ObjectIdentifier;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use kinesis_producer::batch::{
    dynamodb, firehose, kinesis, s3, sqs, BatchCall, BatchOptions, Limits, ReasonKind, RetryPolicy,
    Submitted,
};
use support::batch_faults::{self, BatchFaultProxy, Plan, Request};
use support::moto::{moto, sdk_config};

/// Quick retries, so that tests of retrying take milliseconds.
fn quick() -> BatchOptions {
    BatchOptions {
        retry: RetryPolicy {
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
        },
        ..BatchOptions::default()
    }
}

/// How often the fault layer has met each item (by a key the test picks), so that a rule can
/// fail only an item's first attempts.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, u32>>>);

impl Seen {
    /// Counts one more meeting of `key`; 1 at the first.
    fn meet(&self, key: impl Into<String>) -> u32 {
        let mut counts = self.0.lock().unwrap();
        let n = counts.entry(key.into()).or_default();
        *n += 1;
        *n
    }
}

/// A fault rule: `plan` for requests of `operation`, the rest pass.
fn on(
    operation: &'static str,
    plan: impl Fn(&Request) -> Plan + Send + Sync + 'static,
) -> impl Fn(&Request) -> Plan + Send + Sync + 'static {
    move |request| {
        if request.operation().as_deref() == Some(operation) {
            plan(request)
        } else {
            Plan::Pass
        }
    }
}

async fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&sdk_config(endpoint).await)
}

async fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(endpoint).await)
}

async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::from(&sdk_config(endpoint).await)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

async fn firehose_client(endpoint: &str) -> aws_sdk_firehose::Client {
    aws_sdk_firehose::Client::new(&sdk_config(endpoint).await)
}

async fn kinesis_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(&sdk_config(endpoint).await)
}

/// A message with an id of its own (a standard queue de-duplicates by id).
fn message(body: impl Into<String>) -> SendMessageBatchRequestEntry {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    SendMessageBatchRequestEntry::builder()
        .id(format!("m{id}"))
        .message_body(body)
        .build()
        .expect("entry")
}

async fn create_queue(client: &aws_sdk_sqs::Client, name: &str) -> String {
    let mut request = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        request = request.attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true");
    }
    request
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("url")
}

/// Every message body in the queue, received until it is empty, each deleted with the
/// DeleteMessageBatch helper.
async fn drain_queue(client: &aws_sdk_sqs::Client, url: &str) -> Vec<String> {
    let delete = sqs::DeleteMessageBatch::new(client.clone(), url);
    let mut bodies = Vec::new();
    loop {
        let received = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .send()
            .await
            .expect("receive");
        let messages = received.messages.unwrap_or_default();
        if messages.is_empty() {
            return bodies;
        }
        let mut handles = Vec::new();
        for m in messages {
            bodies.push(m.body.unwrap_or_default());
            let handle = m.receipt_handle.unwrap_or_default();
            handles.push(
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id("d")
                    .receipt_handle(handle)
                    .build()
                    .expect("entry"),
            );
        }
        let deleted = delete.send_all(handles, &quick()).await.expect("options");
        assert!(deleted.is_complete(), "{:?}", deleted.unprocessed.first());
    }
}

#[tokio::test]
async fn sqs_sends_every_message_of_two_full_pages_and_one_more() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "pages").await;
    let bodies: Vec<String> = (0..2 * sqs::MAX_ITEMS + 1)
        .map(|i| format!("message {i}"))
        .collect();
    let call = sqs::SendMessageBatch::new(client.clone(), &url);
    let outcome = call
        .send_all(bodies.iter().map(message), &quick())
        .await
        .expect("options");
    assert!(outcome.is_complete(), "{:?}", outcome.unprocessed);
    assert_eq!(outcome.succeeded.len(), 21);
    assert_eq!(outcome.requests, 3);
    let mut received = drain_queue(&client, &url).await;
    received.sort();
    let mut expected = bodies.clone();
    expected.sort();
    assert_eq!(received, expected);
}

#[tokio::test]
async fn sqs_oversize_messages_are_returned_and_never_affect_the_others() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "oversize").await;
    let limit = 256 * 1024;
    let call = sqs::SendMessageBatch::new(client.clone(), &url)
        .limits(Limits {
            max_items: 10,
            max_bytes: limit,
            max_item_bytes: limit,
        })
        .expect("limits");
    // Good, then three oversize in a row, then good ones, then oversize again: the peer that
    // lost everything after consecutive oversize bodies is the bug this guards against.
    let mut bodies: Vec<String> = Vec::new();
    for i in 0..25 {
        let oversize = matches!(i, 3..=5 | 24);
        bodies.push(if oversize {
            "x".repeat(limit + 1)
        } else {
            format!("good {i}")
        });
    }
    let outcome = call
        .send_all(bodies.iter().map(message), &quick())
        .await
        .expect("options");
    let rejected: Vec<usize> = outcome.unprocessed.iter().map(|u| u.index).collect();
    assert_eq!(rejected, [3, 4, 5, 24]);
    for u in &outcome.unprocessed {
        assert_eq!(u.reason.kind, ReasonKind::Rejected);
        assert_eq!(u.reason.code, "ItemTooLarge");
        assert_eq!(u.attempts, 0);
        assert_eq!(
            u.item.message_body.len(),
            limit + 1,
            "the item comes back whole"
        );
    }
    assert_eq!(outcome.succeeded.len(), 21);
    // Big messages near the batch limit are paged by bytes.
    let near = "y".repeat(100 * 1024);
    let outcome = call
        .send_all((0..5).map(|_| message(near.clone())), &quick())
        .await
        .expect("options");
    assert!(outcome.is_complete());
    assert_eq!(
        outcome.requests, 3,
        "two 100 KiB messages per 256 KiB request"
    );
    assert_eq!(drain_queue(&client, &url).await.len(), 26);
}

/// Fails the SendMessageBatch entries whose body says so: `transient` ones on their first two
/// attempts (by a counter in the proxy), `permanent` ones always.
fn sqs_rule(seen: Seen) -> impl Fn(&Request) -> Plan + Send + Sync + 'static {
    on("SendMessageBatch", move |request| {
        batch_faults::sqs_fail(request, |_, entry| {
            let body = entry["MessageBody"].as_str().unwrap_or_default().to_owned();
            if body.starts_with("permanent") {
                return Some(("InvalidParameterValue".to_owned(), true));
            }
            if body.starts_with("transient") && seen.meet(body) <= 2 {
                return Some(("InternalError".to_owned(), false));
            }
            None
        })
    })
}

#[tokio::test]
async fn sqs_retries_transient_failures_and_returns_sender_faults_at_once() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "partial").await;
    let proxy = BatchFaultProxy::start(&server.endpoint, sqs_rule(Default::default())).await;
    let through_proxy = sqs_client(&proxy.endpoint).await;
    let call = sqs::SendMessageBatch::new(through_proxy, &url);
    let bodies: Vec<String> = (0..30)
        .map(|i| match i % 5 {
            0 => format!("transient {i}"),
            1 => format!("permanent {i}"),
            _ => format!("plain {i}"),
        })
        .collect();
    let outcome = call
        .send_all(bodies.iter().map(message), &quick())
        .await
        .expect("options");
    let permanent: Vec<usize> = outcome.unprocessed.iter().map(|u| u.index).collect();
    assert_eq!(
        permanent,
        (0..30).filter(|i| i % 5 == 1).collect::<Vec<_>>()
    );
    for u in &outcome.unprocessed {
        assert_eq!(u.reason.kind, ReasonKind::Permanent);
        assert_eq!(u.reason.code, "InvalidParameterValue");
        assert_eq!(u.attempts, 1, "a sender fault is not retried");
    }
    assert_eq!(outcome.succeeded.len(), 24);
    for s in &outcome.succeeded {
        let expected = if s.index % 5 == 0 { 3 } else { 1 };
        assert_eq!(s.attempts, expected, "message {}", s.index);
    }
    let mut received = drain_queue(&client, &url).await;
    received.sort();
    let mut expected: Vec<String> = bodies
        .into_iter()
        .filter(|b| !b.starts_with("permanent"))
        .collect();
    expected.sort();
    assert_eq!(received, expected, "each delivered once");
}

#[tokio::test]
async fn the_time_budget_bounds_the_whole_call_and_every_unsent_item_comes_back() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "budget").await;
    let refuse = on("SendMessageBatch", |_| Plan::Refuse {
        status: 503,
        code: "ServiceUnavailable".to_owned(),
    });
    let proxy = BatchFaultProxy::start(&server.endpoint, refuse).await;
    let call = sqs::SendMessageBatch::new(sqs_client(&proxy.endpoint).await, &url);
    let options = BatchOptions {
        time_budget: Duration::from_millis(1500),
        max_attempts: 1000,
        concurrency: 2,
        retry: RetryPolicy {
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        },
        ..BatchOptions::default()
    };
    let started = Instant::now();
    let outcome = call
        .send_all((0..95).map(|i| message(format!("m{i}"))), &options)
        .await
        .expect("options");
    let elapsed = started.elapsed();
    // The budget is for the call: ten pages at two at a time don't get ten budgets (which
    // would take 7.5 s); what is above 1.5 s is the last attempts' own time.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(outcome.succeeded.is_empty());
    let indexes: Vec<usize> = outcome.unprocessed.iter().map(|u| u.index).collect();
    assert_eq!(
        indexes,
        (0..95).collect::<Vec<_>>(),
        "every item, once, in order"
    );
    // A page's retries finish before its worker takes another page: pages still queued when
    // the budget ran out come back unsent.
    // A request still in flight at the deadline is cut short: its items are `Unknown`.
    for u in &outcome.unprocessed {
        match (u.reason.kind, u.reason.code.as_str()) {
            (ReasonKind::GaveUp, "ServiceUnavailable") => assert!(u.attempts > 0),
            (ReasonKind::GaveUp, "NotSent") => assert_eq!(u.attempts, 0),
            (ReasonKind::Unknown, "BudgetExhausted") => assert!(u.attempts > 0),
            _ => panic!("unexpected reason {}", u.reason),
        }
        assert_eq!(u.item.message_body, format!("m{}", u.index));
    }
    assert!(
        outcome.unprocessed.iter().any(|u| u.attempts > 1),
        "retried within the budget"
    );
    assert!(drain_queue(&client, &url).await.is_empty());
}

#[tokio::test]
async fn an_attempt_limit_ends_retries_with_the_last_error() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "attempts").await;
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("SendMessageBatch", |_| Plan::ResetBefore),
    )
    .await;
    let call = sqs::SendMessageBatch::new(sqs_client(&proxy.endpoint).await, &url);
    let options = BatchOptions {
        max_attempts: 3,
        ..quick()
    };
    let outcome = call
        .send_all([message("a"), message("b")], &options)
        .await
        .expect("options");
    assert_eq!(outcome.unprocessed.len(), 2);
    for u in &outcome.unprocessed {
        assert_eq!(u.reason.kind, ReasonKind::GaveUp);
        assert_eq!(u.attempts, 3);
        assert_eq!(u.reason.code, "ConnectionError", "{}", u.reason);
    }
    assert_eq!(proxy.requests(), 3);
}

/// A page refused whole for one bad item is halved until that item is alone; those refused
/// requests do not use up the other items' attempts, which stay for their own failures.
#[tokio::test]
async fn splitting_a_refused_page_leaves_the_other_items_their_attempts() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "split-attempts").await;
    let reset_once = std::sync::atomic::AtomicBool::new(false);
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("SendMessageBatch", move |request| {
            let body = String::from_utf8_lossy(&request.body).into_owned();
            if body.contains("bad item") {
                Plan::Refuse {
                    status: 400,
                    code: "InvalidParameterValue".to_owned(),
                }
            } else if !reset_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                Plan::ResetBefore
            } else {
                Plan::Pass
            }
        }),
    )
    .await;
    let call = sqs::SendMessageBatch::new(sqs_client(&proxy.endpoint).await, &url);
    let options = BatchOptions {
        max_attempts: 2,
        ..quick()
    };
    let items = ["a", "b", "c", "bad item"].map(message);
    let outcome = call.send_all(items, &options).await.expect("options");
    // "a" and "b" went in the first half, which was reset once and retried: two attempts.
    assert_eq!(outcome.unprocessed.len(), 1, "{:?}", outcome.unprocessed);
    let bad = &outcome.unprocessed[0];
    assert_eq!(bad.index, 3);
    assert_eq!(bad.reason.kind, ReasonKind::Permanent);
    assert_eq!(drain_queue(&client, &url).await.len(), 3);
}

/// A retry policy of the longest delays (no retry in practice) gives the items up when the
/// budget cannot hold the wait, instead of overflowing the clock.
#[tokio::test]
async fn the_longest_retry_delays_give_up_instead_of_overflowing_the_clock() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "longest-delays").await;
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("SendMessageBatch", |_| Plan::ResetBefore),
    )
    .await;
    let call = sqs::SendMessageBatch::new(sqs_client(&proxy.endpoint).await, &url);
    let options = BatchOptions {
        retry: RetryPolicy {
            base_delay: Duration::MAX,
            max_delay: Duration::MAX,
        },
        time_budget: Duration::from_secs(60),
        ..quick()
    };
    let started = Instant::now();
    let outcome = call
        .send_all([message("a")], &options)
        .await
        .expect("options");
    // A delay past the time budget means giving up at once, not sleeping out the budget.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(outcome.unprocessed.len(), 1);
    let unprocessed = &outcome.unprocessed[0];
    assert_eq!(unprocessed.reason.kind, ReasonKind::GaveUp);
    assert_eq!(unprocessed.attempts, 1);
}

/// An item whose size sends the batch before it is buffered keeps its de-duplication key in
/// the new batch, and a time budget of `Duration::MAX` means no limit.
#[tokio::test]
async fn sqs_dispatcher_deduplicates_after_a_batch_sent_for_its_size() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "dedup-after-size").await;
    let call = sqs::SendMessageBatch::new(sqs_client(&server.endpoint).await, &url);
    let mut dispatcher = call
        .dispatcher(BatchOptions {
            deduplicate: true,
            time_budget: Duration::MAX,
            ..quick()
        })
        .expect("options");
    let with = |id: &str, body: String| {
        let mut m = message(body);
        m.id = id.to_owned();
        m
    };
    let big = |c: &str| c.repeat(600 << 10);
    let first = dispatcher.submit(with("a", big("a"))).await;
    assert_eq!(first, Submitted::Buffered);
    // Both together pass the 1 MiB a request may carry: the first goes alone.
    let second = dispatcher.submit(with("z", big("z"))).await;
    assert_eq!(second, Submitted::Buffered);
    let third = dispatcher.submit(with("z", "small".to_owned())).await;
    assert_eq!(third, Submitted::Duplicate);
    let outcome = dispatcher.flush().await;
    assert!(outcome.is_complete(), "{:?}", outcome.unprocessed);
    assert_eq!(outcome.deduplicated, [2]);
    assert_eq!(drain_queue(&client, &url).await.len(), 2);
}

#[tokio::test]
async fn sqs_dispatcher_sends_full_batches_and_each_flush_returns_only_its_own_failures() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "dispatcher").await;
    let proxy = BatchFaultProxy::start(&server.endpoint, sqs_rule(Default::default())).await;
    let call = sqs::SendMessageBatch::new(sqs_client(&proxy.endpoint).await, &url);
    let mut dispatcher = call
        .dispatcher(BatchOptions {
            deduplicate: true,
            ..quick()
        })
        .expect("options");
    let mut submitted = Vec::new();
    for i in 0..9 {
        submitted.push(dispatcher.submit(message(format!("first {i}"))).await);
    }
    assert!(submitted.iter().all(|s| *s == Submitted::Buffered));
    assert_eq!(
        proxy.requests(),
        0,
        "nothing is sent before a batch is full"
    );
    assert_eq!(
        dispatcher.submit(message("permanent 9")).await,
        Submitted::Sent
    );
    assert_eq!(proxy.requests(), 1);
    // The helper numbers entries itself, so ids only matter for de-duplication.
    let mut with_id = message("duplicate of 10");
    with_id.id = "same".to_owned();
    assert_eq!(
        dispatcher.submit(with_id.clone()).await,
        Submitted::Buffered
    );
    assert_eq!(dispatcher.submit(with_id).await, Submitted::Duplicate);
    assert_eq!(dispatcher.submit(message("")).await, Submitted::Rejected);
    let first = dispatcher.flush().await;
    let failed: Vec<(usize, ReasonKind)> = first
        .unprocessed
        .iter()
        .map(|u| (u.index, u.reason.kind))
        .collect();
    assert_eq!(
        failed,
        [(9, ReasonKind::Permanent), (12, ReasonKind::Rejected)]
    );
    assert_eq!(first.deduplicated, [11]);
    assert_eq!(first.succeeded.len(), 10);

    for i in 0..3 {
        dispatcher.submit(message(format!("second {i}"))).await;
    }
    let second = dispatcher.flush().await;
    assert!(
        second.is_complete(),
        "the first flush's failures are not reported again"
    );
    assert_eq!(
        second.succeeded.iter().map(|s| s.index).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(drain_queue(&client, &url).await.len(), 9 + 1 + 3);
}

/// Group "a" meets transient failures and must still arrive in order; group "b" meets a
/// permanent failure at its 6th message (index 11), after which its later messages are held
/// back. Returns the unprocessed (index, kind) and the bodies received, in order.
async fn fifo_scenario(strict: Option<bool>) -> (Vec<(usize, ReasonKind)>, Vec<String>) {
    fifo_scenario_via(strict, false).await
}

/// [`fifo_scenario`], through `send_all` or a dispatcher (which sends each batch of ten as it
/// fills, so that a group's failure and its later messages are in different sends).
async fn fifo_scenario_via(
    strict: Option<bool>,
    dispatcher: bool,
) -> (Vec<(usize, ReasonKind)>, Vec<String>) {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "orders.fifo").await;
    let proxy = BatchFaultProxy::start(&server.endpoint, sqs_rule(Default::default())).await;
    let mut call = sqs::SendMessageBatch::new(sqs_client(&proxy.endpoint).await, &url);
    if let Some(strict) = strict {
        call = call.strict_group_order(strict);
    }
    let entry = fifo_entry;
    let mut entries = Vec::new();
    for i in 0..30 {
        let a_body = if i % 7 == 3 {
            format!("transient a{i:02}")
        } else {
            format!("a{i:02}")
        };
        entries.push(entry("a", i, a_body));
        let b_body = if i == 5 {
            format!("permanent b{i:02}")
        } else {
            format!("b{i:02}")
        };
        entries.push(entry("b", i, b_body));
    }
    let missing_group = SendMessageBatchRequestEntry::builder()
        .id("y")
        .message_body("no group")
        .build()
        .expect("entry");
    entries.push(missing_group);
    let outcome = if dispatcher {
        let mut dispatcher = call.dispatcher(quick()).expect("options");
        for entry in entries {
            dispatcher.submit(entry).await;
        }
        dispatcher.flush().await
    } else {
        call.send_all(entries, &quick()).await.expect("options")
    };
    let kinds = outcome
        .unprocessed
        .iter()
        .map(|u| (u.index, u.reason.kind))
        .collect();
    (kinds, drain_queue(&client, &url).await)
}

/// A FIFO message of `group`, its `i`-th, de-duplicated by both.
fn fifo_entry(group: &str, i: usize, body: String) -> SendMessageBatchRequestEntry {
    SendMessageBatchRequestEntry::builder()
        .id("x")
        .message_body(body)
        .message_group_id(group)
        .message_deduplication_id(format!("{group}-{i}"))
        .build()
        .expect("entry")
}

fn group_a_in_order() -> Vec<String> {
    (0..30)
        .map(|i| {
            if i % 7 == 3 {
                format!("transient a{i:02}")
            } else {
                format!("a{i:02}")
            }
        })
        .collect()
}

#[tokio::test]
async fn sqs_fifo_keeps_group_order_and_delivers_nothing_of_a_group_after_a_failure() {
    assert_strict_group_order(fifo_scenario(None).await);
}

#[tokio::test]
async fn sqs_fifo_dispatcher_holds_back_a_failed_group_in_its_later_batches() {
    assert_strict_group_order(fifo_scenario_via(None, true).await);
}

/// With one message per group in a request: b05's failure holds back every later b, and group
/// a arrives whole and in order.
fn assert_strict_group_order((kinds, received): (Vec<(usize, ReasonKind)>, Vec<String>)) {
    let mut expected = vec![(11, ReasonKind::Permanent)];
    expected.extend((6..30).map(|i| (2 * i + 1, ReasonKind::Blocked)));
    expected.push((60, ReasonKind::Rejected));
    assert_eq!(kinds, expected);
    let group_a: Vec<String> = received
        .iter()
        .filter(|b| b.contains('a'))
        .cloned()
        .collect();
    assert_eq!(group_a, group_a_in_order(), "group a in order, each once");
    let group_b: Vec<&str> = received
        .iter()
        .filter(|b| b.starts_with('b'))
        .map(String::as_str)
        .collect();
    assert_eq!(group_b, ["b00", "b01", "b02", "b03", "b04"]);
}

/// A message refused before it is sent (too large) fails its group as a refused answer does:
/// the group's earlier messages go, its later ones come back `Blocked`; other groups go on.
#[tokio::test]
async fn sqs_fifo_message_refused_before_sending_blocks_its_group() {
    let server = moto().await;
    let client = sqs_client(&server.endpoint).await;
    let url = create_queue(&client, "refused.fifo").await;
    let call = sqs::SendMessageBatch::new(sqs_client(&server.endpoint).await, &url);
    let entry = fifo_entry;
    let entries = || {
        (0..4)
            .flat_map(|i| {
                let c = if i == 1 {
                    "c".repeat(2 << 20)
                } else {
                    format!("c{i}")
                };
                [entry("c", i, c), entry("d", i, format!("d{i}"))]
            })
            .collect::<Vec<_>>()
    };
    let expected = vec![
        (2, ReasonKind::Rejected),
        (4, ReasonKind::Blocked),
        (6, ReasonKind::Blocked),
    ];
    let outcome = call.send_all(entries(), &quick()).await.expect("options");
    let kinds: Vec<_> = outcome
        .unprocessed
        .iter()
        .map(|u| (u.index, u.reason.kind))
        .collect();
    assert_eq!(kinds, expected, "send_all");
    let received = drain_queue(&client, &url).await;
    let group = |g: char| -> Vec<&str> {
        received
            .iter()
            .filter(|b| b.starts_with(g))
            .map(String::as_str)
            .collect()
    };
    assert_eq!(group('c'), ["c0"]);
    assert_eq!(group('d'), ["d0", "d1", "d2", "d3"]);

    let mut dispatcher = call.dispatcher(quick()).expect("options");
    for entry in entries() {
        dispatcher.submit(entry).await;
    }
    let outcome = dispatcher.flush().await;
    let kinds: Vec<_> = outcome
        .unprocessed
        .iter()
        .map(|u| (u.index, u.reason.kind))
        .collect();
    assert_eq!(kinds, expected, "dispatcher");
}

#[tokio::test]
async fn sqs_fifo_without_strict_order_holds_back_only_later_requests() {
    let (kinds, received) = fifo_scenario(Some(false)).await;
    // b05 failed in the request of indexes 10..=19; its group's later requests are held back.
    let mut expected = vec![(11, ReasonKind::Permanent)];
    expected.extend((10..30).map(|i| (2 * i + 1, ReasonKind::Blocked)));
    expected.push((60, ReasonKind::Rejected));
    assert_eq!(kinds, expected);
    // Inside a request SQS decides: b06..b09 went in with b05's request, and a retried message
    // of group a lands after the later messages its request delivered.
    let group_b: Vec<&str> = received
        .iter()
        .filter(|b| b.starts_with('b'))
        .map(String::as_str)
        .collect();
    assert_eq!(
        group_b,
        ["b00", "b01", "b02", "b03", "b04", "b06", "b07", "b08", "b09"]
    );
    let mut group_a: Vec<String> = received
        .iter()
        .filter(|b| b.contains('a'))
        .cloned()
        .collect();
    assert_ne!(group_a, group_a_in_order());
    group_a.sort();
    let mut all_a = group_a_in_order();
    all_a.sort();
    assert_eq!(group_a, all_a, "each once");
}

async fn create_table(client: &aws_sdk_dynamodb::Client, name: &str) {
    client
        .create_table()
        .table_name(name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("definition"),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("sk")
                .attribute_type(ScalarAttributeType::N)
                .build()
                .expect("definition"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .expect("key"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("sk")
                .key_type(KeyType::Range)
                .build()
                .expect("key"),
        )
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .send()
        .await
        .expect("create table");
}

fn key(pk: &str, sk: usize) -> dynamodb::Item {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(pk.to_owned())),
        ("sk".to_owned(), AttributeValue::N(sk.to_string())),
    ])
}

fn put(pk: &str, sk: usize, value: &str) -> WriteRequest {
    let mut item = key(pk, sk);
    item.insert("value".to_owned(), AttributeValue::S(value.to_owned()));
    WriteRequest::builder()
        .put_request(
            PutRequest::builder()
                .set_item(Some(item))
                .build()
                .expect("put"),
        )
        .build()
}

async fn scan_values(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> HashMap<(String, String), String> {
    let mut out = HashMap::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan");
        for item in page.items.unwrap_or_default() {
            let text = |name: &str| match item.get(name) {
                Some(AttributeValue::S(s) | AttributeValue::N(s)) => s.clone(),
                _ => String::new(),
            };
            out.insert((text("pk"), text("sk")), text("value"));
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return out;
        }
    }
}

#[tokio::test]
async fn dynamodb_writes_retry_unprocessed_items_until_all_land() {
    let server = moto().await;
    let client = dynamodb_client(&server.endpoint).await;
    create_table(&client, "items").await;
    // Each request: every third item is left unprocessed, on its first attempt only.
    let seen = Seen::default();
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("BatchWriteItem", move |request: &Request| {
            batch_faults::dynamodb_write_fail(request, |position, _, item| {
                let text = item.to_string();
                let n = seen.meet(text);
                position % 3 == 0 && n == 1
            })
        }),
    )
    .await;
    let call = dynamodb::BatchWriteItem::new(dynamodb_client(&proxy.endpoint).await, "items");
    let count = 2 * dynamodb::MAX_WRITE_ITEMS + 1;
    let outcome = call
        .send_all((0..count).map(|i| put("p", i, &format!("v{i}"))), &quick())
        .await
        .expect("options");
    assert!(outcome.is_complete(), "{:?}", outcome.unprocessed);
    assert_eq!(outcome.succeeded.len(), count);
    assert!(
        outcome.succeeded.iter().any(|s| s.attempts == 2),
        "some were retried"
    );
    let values = scan_values(&client, "items").await;
    assert_eq!(values.len(), count);
    for i in 0..count {
        assert_eq!(values[&("p".to_owned(), i.to_string())], format!("v{i}"));
    }
}

/// An unprocessed write that DynamoDB writes back in another form (a number normalised) matches
/// no write sent: no write of that request counts as applied, and the retry lands them all.
#[tokio::test]
async fn dynamodb_unprocessed_items_that_match_nothing_sent_are_retried_not_taken_as_written() {
    let server = moto().await;
    let client = dynamodb_client(&server.endpoint).await;
    create_table(&client, "echoes").await;
    let seen = Seen::default();
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("BatchWriteItem", move |request: &Request| {
            batch_faults::dynamodb_write_fail_echoing(
                request,
                |position, _, item| position == 1 && seen.meet(item.to_string()) == 1,
                |mut item| {
                    if let Some(n) = item.pointer_mut("/PutRequest/Item/amount/N") {
                        *n = "1.5".into();
                    }
                    item
                },
            )
        }),
    )
    .await;
    let call = dynamodb::BatchWriteItem::new(dynamodb_client(&proxy.endpoint).await, "echoes");
    let writes = (0..5).map(|i| {
        let mut item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("p".to_owned())),
            ("sk".to_owned(), AttributeValue::N(i.to_string())),
            ("value".to_owned(), AttributeValue::S(format!("v{i}"))),
        ]);
        item.insert("amount".to_owned(), AttributeValue::N("1.50".to_owned()));
        WriteRequest::builder()
            .put_request(
                PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .expect("put"),
            )
            .build()
    });
    let outcome = call.send_all(writes, &quick()).await.expect("options");
    assert!(outcome.is_complete(), "{:?}", outcome.unprocessed);
    assert!(
        outcome.succeeded.iter().all(|s| s.attempts == 2),
        "all retried"
    );
    assert_eq!(scan_values(&client, "echoes").await.len(), 5);
}

#[tokio::test]
async fn dynamodb_finds_the_one_bad_item_of_a_refused_batch_and_writes_the_rest() {
    let server = moto().await;
    let client = dynamodb_client(&server.endpoint).await;
    create_table(&client, "strict").await;
    let call = dynamodb::BatchWriteItem::new(client.clone(), "strict");
    let mut writes: Vec<WriteRequest> = (0..20).map(|i| put("p", i, "ok")).collect();
    // Passes our checks, but lacks the table's sort key: DynamoDB refuses the whole request.
    let mut no_sort_key = HashMap::from([("pk".to_owned(), AttributeValue::S("bad".to_owned()))]);
    no_sort_key.insert("value".to_owned(), AttributeValue::S("x".to_owned()));
    writes[13] = WriteRequest::builder()
        .put_request(
            PutRequest::builder()
                .set_item(Some(no_sort_key))
                .build()
                .expect("put"),
        )
        .build();
    let outcome = call.send_all(writes, &quick()).await.expect("options");
    assert_eq!(outcome.unprocessed.len(), 1);
    assert_eq!(outcome.unprocessed[0].index, 13);
    assert_eq!(outcome.unprocessed[0].reason.kind, ReasonKind::Permanent);
    assert_eq!(outcome.unprocessed[0].reason.code, "ValidationException");
    assert_eq!(scan_values(&client, "strict").await.len(), 19);
}

#[tokio::test]
async fn dynamodb_deduplication_keeps_the_last_write_to_a_key() {
    let server = moto().await;
    let client = dynamodb_client(&server.endpoint).await;
    create_table(&client, "dedup").await;
    let call = dynamodb::BatchWriteItem::new(client.clone(), "dedup").key_attributes(["pk", "sk"]);
    let writes = vec![put("a", 1, "old"), put("b", 1, "only"), put("a", 1, "new")];
    let options = BatchOptions {
        deduplicate: true,
        ..quick()
    };
    let outcome = call
        .send_all(writes.clone(), &options)
        .await
        .expect("options");
    assert_eq!(outcome.deduplicated, [0]);
    assert_eq!(outcome.succeeded.len(), 2);
    let mut dispatcher = call.dispatcher(options).expect("options");
    for write in [put("c", 1, "old"), put("c", 1, "new")] {
        dispatcher.submit(write).await;
    }
    let flushed = dispatcher.flush().await;
    assert_eq!(flushed.deduplicated, [0]);
    let values = scan_values(&client, "dedup").await;
    assert_eq!(values[&("a".to_owned(), "1".to_owned())], "new");
    assert_eq!(values[&("c".to_owned(), "1".to_owned())], "new");
}

#[tokio::test]
async fn dynamodb_gets_retry_unprocessed_keys_and_keep_partial_results_when_time_runs_out() {
    let server = moto().await;
    let client = dynamodb_client(&server.endpoint).await;
    create_table(&client, "reads").await;
    let writer = dynamodb::BatchWriteItem::new(client.clone(), "reads");
    let written = writer
        .send_all((0..150).map(|i| put("p", i, &format!("v{i}"))), &quick())
        .await
        .expect("options");
    assert!(written.is_complete());

    // Keys with an odd sort key are unprocessed on their first attempt; keys 7 and 8 always.
    let seen = Seen::default();
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("BatchGetItem", move |request: &Request| {
            batch_faults::dynamodb_get_fail(request, |_, _, key| {
                let sk: usize = key["sk"]["N"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let n = seen.meet(sk.to_string());
                sk == 7 || sk == 8 || (sk % 2 == 1 && n == 1)
            })
        }),
    )
    .await;
    let reader = dynamodb::BatchGetItem::new(dynamodb_client(&proxy.endpoint).await, "reads")
        .consistent_read(true)
        .projection("#v", HashMap::from([("#v".to_owned(), "value".to_owned())]));
    // 2 × 100 + 1 keys: 150 that exist, 51 that don't. The budget leaves room for the other
    // 199 to be fetched on a loaded machine while the two keys that never come back retry.
    let options = BatchOptions {
        time_budget: Duration::from_secs(6),
        max_attempts: 1000,
        ..quick()
    };
    let outcome = reader
        .send_all(
            (0..2 * dynamodb::MAX_GET_KEYS + 1).map(|i| key("p", i)),
            &options,
        )
        .await
        .expect("options");
    let unprocessed: Vec<usize> = outcome.unprocessed.iter().map(|u| u.index).collect();
    assert_eq!(unprocessed, [7, 8], "only the keys that never came back");
    // Time runs out between attempts (the last error stands) or during one (cut in flight).
    for u in &outcome.unprocessed {
        match (u.reason.kind, u.reason.code.as_str()) {
            (ReasonKind::GaveUp, "UnprocessedKeys") | (ReasonKind::Unknown, "BudgetExhausted") => {}
            _ => panic!("key {}: unexpected reason {}", u.index, u.reason),
        }
        assert_eq!(u.item, key("p", u.index));
    }
    assert_eq!(
        outcome.succeeded.len(),
        199,
        "answers fetched before time ran out are kept"
    );
    for s in &outcome.succeeded {
        match &s.output {
            Some(item) if s.index < 150 => {
                assert_eq!(item["value"], AttributeValue::S(format!("v{}", s.index)));
            }
            None if s.index >= 150 => {}
            other => panic!("key {} answered {other:?}", s.index),
        }
    }
}

#[tokio::test]
async fn s3_deletes_a_thousand_keys_a_request_and_retries_only_transient_errors() {
    let server = moto().await;
    let client = s3_client(&server.endpoint).await;
    client
        .create_bucket()
        .bucket("bin")
        .send()
        .await
        .expect("bucket");
    let count = 2 * s3::MAX_ITEMS + 1;
    for i in 0..count {
        client
            .put_object()
            .bucket("bin")
            .key(format!("k/{i:04} & <odd>"))
            .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
            .send()
            .await
            .expect("put");
    }
    let seen = Seen::default();
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("DeleteObjects", move |request: &Request| {
            batch_faults::s3_delete_fail(request, |_, key, _| {
                let number: usize = key[2..6].parse().unwrap_or(0);
                let n = seen.meet(key.to_owned());
                match number % 100 {
                    0 => Some("AccessDenied".to_owned()),
                    1 if n == 1 => Some("SlowDown".to_owned()),
                    2 if n <= 2 => Some("InternalError".to_owned()),
                    _ => None,
                }
            })
        }),
    )
    .await;
    let call = s3::DeleteObjects::new(s3_client(&proxy.endpoint).await, "bin");
    let objects = (0..count).map(|i| {
        ObjectIdentifier::builder()
            .key(format!("k/{i:04} & <odd>"))
            .build()
            .expect("id")
    });
    let outcome = call.send_all(objects, &quick()).await.expect("options");
    let denied: Vec<usize> = outcome.unprocessed.iter().map(|u| u.index).collect();
    assert_eq!(
        denied,
        (0..count).filter(|i| i % 100 == 0).collect::<Vec<_>>()
    );
    assert!(outcome
        .unprocessed
        .iter()
        .all(|u| u.reason.code == "AccessDenied" && u.attempts == 1));
    assert_eq!(outcome.succeeded.len(), count - denied.len());
    let retried: usize = outcome.succeeded.iter().filter(|s| s.attempts > 1).count();
    assert_eq!(
        retried,
        (0..count).filter(|i| matches!(i % 100, 1 | 2)).count()
    );
    // The fault layer reported AccessDenied for objects the server did delete: the bucket is empty.
    let listed = client
        .list_objects_v2()
        .bucket("bin")
        .send()
        .await
        .expect("list");
    assert_eq!(listed.key_count, Some(0));
}

async fn versioned_bucket(client: &aws_sdk_s3::Client, name: &str) {
    client
        .create_bucket()
        .bucket(name)
        .send()
        .await
        .expect("bucket");
    client
        .put_bucket_versioning()
        .bucket(name)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .expect("versioning");
}

#[tokio::test]
async fn s3_deletes_named_versions_of_a_versioned_bucket() {
    let server = moto().await;
    let client = s3_client(&server.endpoint).await;
    versioned_bucket(&client, "versions").await;
    let mut versions = Vec::new();
    for round in 0..2 {
        for i in 0..3 {
            let put = client
                .put_object()
                .bucket("versions")
                .key(format!("doc{i}"))
                .body(aws_sdk_s3::primitives::ByteStream::from(
                    format!("v{round}").into_bytes(),
                ))
                .send()
                .await
                .expect("put");
            versions.push((format!("doc{i}"), put.version_id.expect("a version id")));
        }
    }
    let call = s3::DeleteObjects::new(client.clone(), "versions");
    let objects = versions.iter().map(|(key, version)| {
        ObjectIdentifier::builder()
            .key(key)
            .version_id(version)
            .build()
            .expect("id")
    });
    let outcome = call.send_all(objects, &quick()).await.expect("options");
    assert!(outcome.is_complete(), "{:?}", outcome.unprocessed);
    for s in &outcome.succeeded {
        assert_eq!(
            s.output.version_id.as_deref(),
            Some(versions[s.index].1.as_str())
        );
    }
    let left = client
        .list_object_versions()
        .bucket("versions")
        .send()
        .await
        .expect("list");
    assert!(left.versions.unwrap_or_default().is_empty());
}

/// One request deletes a key's named version and (without a version) the key itself, and the
/// answers come back in the other order: each goes to the object that asked for it.
#[tokio::test]
async fn s3_answers_go_to_the_exact_version_first_whatever_their_order() {
    let server = moto().await;
    let client = s3_client(&server.endpoint).await;
    versioned_bucket(&client, "both").await;
    let mut versions = Vec::new();
    for round in 0..2 {
        let put = client
            .put_object()
            .bucket("both")
            .key("doc")
            .body(aws_sdk_s3::primitives::ByteStream::from(
                format!("v{round}").into_bytes(),
            ))
            .send()
            .await
            .expect("put");
        versions.push(put.version_id.expect("a version id"));
    }
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("DeleteObjects", batch_faults::s3_reverse_deleted),
    )
    .await;
    let call = s3::DeleteObjects::new(s3_client(&proxy.endpoint).await, "both");
    let objects = [
        ObjectIdentifier::builder().key("doc").build().expect("id"),
        ObjectIdentifier::builder()
            .key("doc")
            .version_id(&versions[0])
            .build()
            .expect("id"),
    ];
    let outcome = call.send_all(objects, &quick()).await.expect("options");
    assert!(outcome.is_complete(), "{:?}", outcome.unprocessed);
    assert_eq!(proxy.requests(), 1, "one request, each answer placed");
    let by_index = |i: usize| {
        &outcome
            .succeeded
            .iter()
            .find(|s| s.index == i)
            .unwrap()
            .output
    };
    assert_eq!(
        by_index(1).version_id.as_deref(),
        Some(versions[0].as_str())
    );
    assert_eq!(by_index(0).delete_marker, Some(true), "{:?}", by_index(0));
}

#[tokio::test]
async fn firehose_retries_failed_entries_by_position() {
    let server = moto().await;
    let s3 = s3_client(&server.endpoint).await;
    s3.create_bucket()
        .bucket("firehose-out")
        .send()
        .await
        .expect("bucket");
    let client = firehose_client(&server.endpoint).await;
    client
        .create_delivery_stream()
        .delivery_stream_name("events")
        .delivery_stream_type(aws_sdk_firehose::types::DeliveryStreamType::DirectPut)
        .extended_s3_destination_configuration(
            aws_sdk_firehose::types::ExtendedS3DestinationConfiguration::builder()
                .role_arn("arn:aws:iam::123456789012:role/firehose")
                .bucket_arn("arn:aws:s3:::firehose-out")
                .build()
                .expect("destination"),
        )
        .send()
        .await
        .expect("delivery stream");
    let seen = Seen::default();
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("PutRecordBatch", move |request: &Request| {
            batch_faults::firehose_fail(request, |_, record| {
                let data = record["Data"].as_str().unwrap_or_default().to_owned();
                let n = seen.meet(data.clone());
                (data.len() % 3 == 0 && n == 1).then(|| "ServiceUnavailableException".to_owned())
            })
        }),
    )
    .await;
    let call = firehose::PutRecordBatch::new(firehose_client(&proxy.endpoint).await, "events");
    let count = 2 * firehose::MAX_ITEMS + 1;
    let records = (0..count).map(|i| {
        aws_sdk_firehose::types::Record::builder()
            .data(aws_sdk_firehose::primitives::Blob::new(
                format!("record {i}\n").repeat(i % 4 + 1),
            ))
            .build()
            .expect("record")
    });
    let oversize = aws_sdk_firehose::types::Record::builder()
        .data(aws_sdk_firehose::primitives::Blob::new(vec![
            b'x';
            firehose::MAX_RECORD_BYTES
                + 1
        ]))
        .build()
        .expect("record");
    let outcome = call
        .send_all(records.chain([oversize]), &quick())
        .await
        .expect("options");
    assert_eq!(outcome.unprocessed.len(), 1);
    assert_eq!(outcome.unprocessed[0].index, count);
    assert_eq!(outcome.succeeded.len(), count);
    assert!(
        outcome.succeeded.iter().all(|s| !s.output.is_empty()),
        "record ids"
    );
    assert!(outcome.succeeded.iter().any(|s| s.attempts == 2));
}

#[tokio::test]
async fn kinesis_one_shot_puts_every_record_and_retries_throttled_ones() {
    let server = moto().await;
    let client = kinesis_client(&server.endpoint).await;
    client
        .create_stream()
        .stream_name("oneshot")
        .shard_count(2)
        .send()
        .await
        .expect("stream");
    let seen = Seen::default();
    let proxy = BatchFaultProxy::start(
        &server.endpoint,
        on("PutRecords", move |request: &Request| {
            batch_faults::kinesis_fail(request, |position, record| {
                let key = record["PartitionKey"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let n = seen.meet(key);
                (position % 4 == 1 && n == 1)
                    .then(|| "ProvisionedThroughputExceededException".to_owned())
            })
        }),
    )
    .await;
    let call = kinesis::PutRecords::new(kinesis_client(&proxy.endpoint).await, "oneshot");
    // One request at a time: moto numbers a shard's records as "highest so far + 1" without a
    // lock (moto/kinesis/models.py, Shard.put_record), so concurrent PutRecords to one shard
    // overwrite each other's records on the server.
    let one_at_a_time = BatchOptions {
        concurrency: 1,
        ..quick()
    };
    let count = 2 * kinesis::MAX_ITEMS + 1;
    let entries = (0..count).map(|i| {
        aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
            .data(aws_sdk_kinesis::primitives::Blob::new(format!("event {i}")))
            .partition_key(format!("key-{i}"))
            .build()
            .expect("entry")
    });
    let bad_key = aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
        .data(aws_sdk_kinesis::primitives::Blob::new("x"))
        .partition_key("")
        .build()
        .expect("entry");
    let outcome = call
        .send_all(entries.chain([bad_key]), &one_at_a_time)
        .await
        .expect("options");
    assert_eq!(outcome.unprocessed.len(), 1);
    assert_eq!(outcome.unprocessed[0].reason.kind, ReasonKind::Rejected);
    assert_eq!(outcome.succeeded.len(), count);
    assert!(outcome
        .succeeded
        .iter()
        .all(|s| s.output.shard_id.starts_with("shardId-")));
    assert!(outcome.succeeded.iter().any(|s| s.attempts == 2));
    let mut read = Vec::new();
    let shards = client
        .list_shards()
        .stream_name("oneshot")
        .send()
        .await
        .expect("shards");
    for shard in shards.shards.unwrap_or_default() {
        let iterator = client
            .get_shard_iterator()
            .stream_name("oneshot")
            .shard_id(shard.shard_id)
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("iterator")
            .shard_iterator
            .expect("iterator");
        let mut iterator = Some(iterator);
        while let Some(current) = iterator.take() {
            let page = client
                .get_records()
                .shard_iterator(current)
                .limit(10_000)
                .send()
                .await
                .expect("records");
            if page.records.is_empty() {
                break;
            }
            for record in &page.records {
                read.push(String::from_utf8_lossy(record.data.as_ref()).into_owned());
            }
            iterator = page.next_shard_iterator;
        }
    }
    read.sort();
    let mut expected: Vec<String> = (0..count).map(|i| format!("event {i}")).collect();
    expected.sort();
    assert!(
        read == expected,
        "{} records read back, {count} expected, each once",
        read.len()
    );
}

/// A CloudWatch client. `compress: false` keeps request bodies readable to the fault layer
/// (the SDK gzips large PutMetricData bodies; the shim takes both).
async fn cloudwatch_client(endpoint: &str, compress: bool) -> aws_sdk_cloudwatch::Client {
    let config = aws_sdk_cloudwatch::config::Builder::from(&sdk_config(endpoint).await)
        .disable_request_compression(!compress)
        .build();
    aws_sdk_cloudwatch::Client::from_conf(config)
}

#[tokio::test]
async fn cloudwatch_pages_a_thousand_data_retries_throttling_and_isolates_a_refused_datum() {
    use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, Statistic};

    let server = moto().await;
    // Throttles the first two PutMetricData requests; refuses any request carrying the datum
    // named "poison", as CloudWatch refuses a whole request over one bad datum.
    let throttled = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let proxy = BatchFaultProxy::start(
        &server.cloudwatch_endpoint,
        on("PutMetricData", move |request: &Request| {
            if throttled.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                return Plan::Refuse {
                    status: 400,
                    code: "Throttling".to_owned(),
                };
            }
            if request.body.windows(6).any(|w| w == b"poison") {
                return Plan::Refuse {
                    status: 400,
                    code: "InvalidParameterValue".to_owned(),
                };
            }
            Plan::Pass
        }),
    )
    .await;
    let call = kinesis_producer::batch::cloudwatch::PutMetricData::new(
        cloudwatch_client(&proxy.endpoint, false).await,
        "Shop",
    )
    .expect("namespace");
    let now = aws_sdk_cloudwatch::primitives::DateTime::from(std::time::SystemTime::now());
    let count = 2 * kinesis_producer::batch::cloudwatch::MAX_ITEMS + 1;
    let datum = |i: usize| {
        MetricDatum::builder()
            .metric_name(format!("Orders{}", i % 3))
            .dimensions(Dimension::builder().name("Region").value("eu").build())
            .timestamp(now)
            .value(1.0)
            .build()
    };
    let mut data: Vec<MetricDatum> = (0..count).map(datum).collect();
    data[1500] = MetricDatum::builder()
        .metric_name("poison")
        .value(1.0)
        .timestamp(now)
        .build();
    // Invalid by CloudWatch's rules: returned before sending.
    data.push(
        MetricDatum::builder()
            .metric_name("NaN")
            .value(f64::NAN)
            .build(),
    );
    let outcome = call.send_all(data, &quick()).await.expect("options");
    let failed: Vec<(usize, ReasonKind)> = outcome
        .unprocessed
        .iter()
        .take(5)
        .map(|u| (u.index, u.reason.kind))
        .collect();
    assert_eq!(
        failed,
        [(1500, ReasonKind::Permanent), (count, ReasonKind::Rejected)],
        "first reason: {}",
        outcome.unprocessed[0].reason
    );
    assert_eq!(outcome.succeeded.len(), count - 1);

    // Straight to the shim with the SDK's request compression on (bodies over 10 KB are gzipped).
    let client = cloudwatch_client(&server.cloudwatch_endpoint, true).await;
    let direct = kinesis_producer::batch::cloudwatch::PutMetricData::new(client.clone(), "Shop")
        .expect("namespace");
    let outcome = direct
        .send_all((0..999).map(|i| datum(3 * i)), &quick())
        .await
        .expect("options");
    assert!(outcome.is_complete(), "{:?}", outcome.unprocessed.first());

    // Read back: each metric's sum counts its data exactly once.
    for metric in 0..3 {
        let extra = if metric == 0 { 999 } else { 0 };
        let expected = extra + (0..count).filter(|i| i % 3 == metric && *i != 1500).count();
        let stats = client
            .get_metric_statistics()
            .namespace("Shop")
            .metric_name(format!("Orders{metric}"))
            .dimensions(Dimension::builder().name("Region").value("eu").build())
            .start_time(aws_sdk_cloudwatch::primitives::DateTime::from_secs(
                now.secs() - 600,
            ))
            .end_time(aws_sdk_cloudwatch::primitives::DateTime::from_secs(
                now.secs() + 600,
            ))
            .period(3600)
            .statistics(Statistic::Sum)
            .send()
            .await
            .expect("statistics");
        let sum: f64 = stats.datapoints().iter().filter_map(|d| d.sum).sum();
        assert_eq!(sum as usize, expected, "Orders{metric}");
    }
}

/// Sum and sample count of a metric in `namespace` over the last ten minutes, at exactly
/// `dimensions`.
#[cfg(feature = "cloudwatch-metrics")]
async fn metric_total(
    client: &aws_sdk_cloudwatch::Client,
    namespace: &str,
    name: &str,
    dimensions: &[(&str, &str)],
) -> (f64, f64) {
    use aws_sdk_cloudwatch::primitives::DateTime;
    use aws_sdk_cloudwatch::types::{Dimension, Statistic};
    let now = DateTime::from(std::time::SystemTime::now()).secs();
    let stats = client
        .get_metric_statistics()
        .namespace(namespace)
        .metric_name(name)
        .set_dimensions(Some(
            dimensions
                .iter()
                .map(|(n, v)| Dimension::builder().name(*n).value(*v).build())
                .collect(),
        ))
        .start_time(DateTime::from_secs(now - 600))
        .end_time(DateTime::from_secs(now + 600))
        .period(3600)
        .statistics(Statistic::Sum)
        .statistics(Statistic::SampleCount)
        .send()
        .await
        .expect("statistics");
    let points = stats.datapoints();
    (
        points.iter().filter_map(|d| d.sum).sum(),
        points.iter().filter_map(|d| d.sample_count).sum(),
    )
}

#[cfg(feature = "cloudwatch-metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_uploads_its_metrics_to_cloudwatch_each_interval_and_at_stop() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use support::local_kinesis::LocalKinesis;

    let server = moto().await;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("metered", 2).await;
    // Counts the uploads on their way to CloudWatch.
    let uploads = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&uploads);
    let proxy = BatchFaultProxy::start(
        &server.cloudwatch_endpoint,
        on("PutMetricData", move |_: &Request| {
            counted.fetch_add(1, Ordering::SeqCst);
            Plan::Pass
        }),
    )
    .await;
    let cloudwatch = cloudwatch_client(&proxy.endpoint, false).await;
    let producer = support::producer_for(&kinesis.endpoint, "metered", |b| {
        b.cloudwatch_metrics(cloudwatch, "ProducerTest")
            .metrics_upload_interval(Duration::from_millis(300))
    })
    .await;
    for i in 0..1_000 {
        producer.put(format!("{i}"), format!("k{i}")).await.unwrap();
    }
    producer.flush().await;
    // A few intervals pass; then more records, which only the upload at `stop` can carry.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let before_last = uploads.load(Ordering::SeqCst);
    assert!(before_last >= 1, "uploads every interval");
    for i in 1_000..1_500 {
        producer.put(format!("{i}"), format!("k{i}")).await.unwrap();
    }
    producer.stop().await;
    assert!(
        uploads.load(Ordering::SeqCst) > before_last,
        "an upload at stop"
    );
    let stats = producer.stats();
    assert_eq!(stats.user_records_put, 1_500);
    assert_eq!(stats.metric_data_not_uploaded, 0);

    // Read back from CloudWatch: each interval was uploaded once, nothing twice, nothing lost.
    // moto answers a query with every datum whose dimensions include the ones asked for (real
    // CloudWatch: exactly those), so each level's own figures are its total less the finer
    // level's.
    let client = cloudwatch_client(&server.cloudwatch_endpoint, true).await;
    let ns = "ProducerTest";
    let stream = [("StreamName", "metered")];
    let shards: Vec<String> = producer
        .shard_map()
        .shards()
        .iter()
        .map(|s| s.shard_id.to_string())
        .collect();
    let levels = |name: &'static str| {
        let client = client.clone();
        let shards = shards.clone();
        async move {
            let all = metric_total(&client, ns, name, &[]).await;
            let in_stream = metric_total(&client, ns, name, &stream).await;
            let mut in_shards = (0.0, 0.0);
            for shard in &shards {
                let dims = [("StreamName", "metered"), ("ShardId", shard.as_str())];
                let (sum, count) = metric_total(&client, ns, name, &dims).await;
                in_shards = (in_shards.0 + sum, in_shards.1 + count);
            }
            let global = (all.0 - in_stream.0, all.1 - in_stream.1);
            let stream_only = (in_stream.0 - in_shards.0, in_stream.1 - in_shards.1);
            (global, stream_only, in_shards)
        }
    };
    // (sum, sample count) globally, for the stream, and over its shards.
    let all_put = (1_500.0, 1_500.0);
    assert_eq!(levels("UserRecordsPut").await, (all_put, all_put, all_put));
    let data: usize = (0..1_500).map(|i: usize| i.to_string().len()).sum();
    let data = (data as f64, 1_500.0);
    assert_eq!(levels("UserRecordsDataPut").await, (data, data, data));
    // Received: global and stream only, one sample per record.
    assert_eq!(
        levels("UserRecordsReceived").await,
        (all_put, all_put, (0.0, 0.0))
    );
}

#[cfg(feature = "cloudwatch-metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_metrics_upload_is_counted_and_holds_nothing_up() {
    use support::local_kinesis::LocalKinesis;

    let server = moto().await;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("unmetered", 1).await;
    let proxy = BatchFaultProxy::start(
        &server.cloudwatch_endpoint,
        on("PutMetricData", |_: &Request| Plan::Refuse {
            status: 400,
            code: "AccessDeniedException".to_owned(),
        }),
    )
    .await;
    let cloudwatch = cloudwatch_client(&proxy.endpoint, false).await;
    let producer = support::producer_for(&kinesis.endpoint, "unmetered", |b| {
        b.cloudwatch_metrics(cloudwatch, "ProducerTest")
            .metrics_upload_interval(Duration::from_millis(200))
    })
    .await;
    for i in 0..200 {
        producer.put(format!("{i}"), format!("k{i}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    producer.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let stats = producer.stats();
    assert_eq!(stats.user_records_put, 200);
    assert!(stats.metric_data_not_uploaded > 0);
}
