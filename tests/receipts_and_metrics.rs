//! Per-record receipts and the KPL-style metrics, against the embedded Kinesis server through
//! the real SDK, checked against what a reader finds in the stream.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use kinesis_producer::metrics::Statistics;
use kinesis_producer::{
    deaggregate, FailureKind, MetricName, MetricsGranularity, MetricsLevel, UserRecord,
};
use support::local_kinesis::LocalKinesis;
use support::proxy::Proxy;
use support::{drain, producer_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_report_the_shard_and_sequence_number_a_reader_sees() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("receipts", 4).await;
    let producer = producer_for(&kinesis.endpoint, "receipts", |b| b).await;
    let mut receipts = Vec::new();
    for i in 0..3_000u32 {
        let mut record = UserRecord::new(format!("record {i}"), format!("key-{}", i % 211));
        if i % 10 == 0 {
            record = record.with_explicit_hash_key((u128::from(i) << 100).to_string());
        }
        receipts.push((i, producer.put_with_receipt(record).await.unwrap()));
        if i % 500 == 0 {
            // Some records go out alone, unaggregated, as a flush sends a single record.
            producer.flush().await;
        }
    }
    producer.stop().await;

    // What a reader sees: (shard, sequence number, sub-sequence number) -> data.
    let mut seen = HashMap::new();
    for raw in kinesis.read_raw("receipts").await {
        for user in deaggregate(raw.data.clone(), &raw.partition_key).unwrap() {
            let at = (
                raw.shard_id.clone(),
                raw.sequence_number.clone(),
                user.sub_sequence_number,
            );
            assert!(seen.insert(at, (user.data, user.aggregated)).is_none());
        }
    }
    assert_eq!(seen.len(), 3_000);
    let mut plain = 0;
    for (i, receipt) in receipts {
        let delivered = receipt.await.expect("acknowledged");
        assert!(delivered.attempts >= 1);
        let at = (
            delivered.shard_id.to_string(),
            delivered.sequence_number.to_string(),
            delivered.sub_sequence_number,
        );
        let (data, aggregated) = seen.get(&at).expect("the receipt points at a record");
        assert_eq!(&data[..], format!("record {i}").as_bytes(), "{delivered:?}");
        assert_eq!(*aggregated, delivered.aggregated);
        plain += usize::from(!delivered.aggregated);
    }
    assert!(plain > 0, "single records were covered too");
}

#[tokio::test]
async fn a_failed_record_reaches_its_receipt_and_the_failure_stream() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("refused", 1).await;
    let producer = producer_for(&kinesis.endpoint, "refused", |b| b.aggregation(false)).await;
    let failures = producer.notify_failures();
    // Valid for Kinesis (200 characters), but this server counts 400 bytes and refuses it.
    let refused = UserRecord::new("bad", "é".repeat(200));
    let good = producer
        .put_with_receipt(UserRecord::new("good", "k"))
        .await
        .unwrap();
    let bad = producer.put_with_receipt(refused.clone()).await.unwrap();
    producer.stop().await;

    assert!(good.await.is_ok());
    let failed = bad.await.expect_err("the server refused it");
    assert_eq!(failed.record, refused);
    assert_eq!(&*failed.error.code, "ValidationException");
    assert_eq!(failed.error.kind, FailureKind::Permanent);
    let streamed = drain(failures).await;
    assert_eq!(streamed.len(), 1);
    assert_eq!(streamed[0].record, failed.record);
    assert_eq!(streamed[0].error, failed.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_dropped_unread_lose_nothing() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("dropped", 2).await;
    let producer = producer_for(&kinesis.endpoint, "dropped", |b| b).await;
    let failures = producer.notify_failures();
    for i in 0..1_000 {
        let receipt = producer
            .put_with_receipt(UserRecord::new(format!("r{i}"), format!("k{i}")))
            .await
            .unwrap();
        drop(receipt);
    }
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    assert_eq!(producer.stats().user_records_put, 1_000);
    assert_eq!(kinesis.read_all("dropped").await.len(), 1_000);
}

/// A run with every kind of outcome: server throttling (entries retried), a record the server
/// refuses (whole requests refused, bisected, one permanent failure), and an outage long enough
/// for records to expire. Every metric is then checked against what really happened: the
/// stream read back, the failure stream, and each record's receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_exactly_with_what_was_put_acknowledged_retried_and_failed() {
    let kinesis = LocalKinesis::start(true).await; // throttles at 1,000 records/s per shard
    kinesis.create_stream("metered", 2).await;
    let proxy = Proxy::start(&kinesis.endpoint).await;
    let producer = producer_for(&proxy.endpoint, "metered", |b| {
        b.aggregation(false)
            .rate_limit(300) // above the server's limit, so the server throttles
            // Long enough for a refused record to be isolated (its requests bisected between
            // throttled retries) before it could expire, even with the rest of the suite
            // running on a slow machine: a 3 s TTL once let two of the three expire first.
            .record_ttl(Duration::from_secs(10))
            .retry_base_delay(Duration::from_millis(50))
            // Well above what a request takes on a loaded machine: a request that timed out
            // after the server wrote it would be sent again, a duplicate this test counts. (The
            // outage below resets connections; it needs no short timeout.)
            .request_timeout(Duration::from_secs(5))
    })
    .await;
    let failures = producer.notify_failures();
    // Each put is awaited (it returns once the record is taken, not when it is delivered), so
    // that a `flush` after them covers them all.
    let mut receipts = Vec::new();
    for i in 0..3_000 {
        let record = UserRecord::new(format!("record {i}"), format!("k{i}"));
        receipts.push(producer.put_with_receipt(record).await.expect("accepted"));
        if i % 1_000 == 0 {
            let refused = UserRecord::new("refused", "é".repeat(200));
            receipts.push(producer.put_with_receipt(refused).await.expect("accepted"));
        }
    }
    producer.flush().await;
    // An outage outlasting the TTL: these records expire.
    proxy.down();
    for i in 0..50 {
        let record = UserRecord::new(format!("late {i}"), format!("late-{i}"));
        receipts.push(producer.put_with_receipt(record).await.expect("accepted"));
    }
    producer.flush().await;
    proxy.up();
    let after = UserRecord::new("after", "after");
    receipts.push(producer.put_with_receipt(after).await.expect("accepted"));
    let mut outcomes = Vec::new();
    for receipt in receipts {
        outcomes.push(receipt.await);
    }
    producer.stop().await;
    let streamed = drain(failures).await;
    let metrics = producer.metrics();
    let stats = producer.stats();
    let global = |name| metrics.global(name);

    // Ground truth.
    let read = kinesis.read_all("metered").await;
    let acknowledged: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    let failed: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(acknowledged.len() + failed.len(), 3_054);
    assert_eq!(streamed.len(), failed.len());
    let expired = failed
        .iter()
        .filter(|f| f.error.kind == FailureKind::Expired)
        .count();
    let permanent = failed
        .iter()
        .filter(|f| f.error.kind == FailureKind::Permanent)
        .count();
    assert_eq!(permanent, 3, "the refused records");
    assert!(expired >= 50, "the outage outlasted the TTL: {expired}");
    assert_eq!(read.len(), acknowledged.len(), "no duplicates in this run");
    assert!(stats.throttled_entries > 0, "the server throttled");
    let attempts_acknowledged: u64 = acknowledged.iter().map(|d| u64::from(d.attempts)).sum();
    let attempts_failed: u64 = failed.iter().map(|f| u64::from(f.attempts)).sum();
    let attempts = attempts_acknowledged + attempts_failed;
    let retries: u64 = acknowledged
        .iter()
        .map(|d| u64::from(d.attempts) - 1)
        .chain(
            failed
                .iter()
                .map(|f| u64::from(f.attempts.saturating_sub(1))),
        )
        .sum();

    let exact = |s: Statistics| (s.count, s.sum as u64);
    assert_eq!(
        exact(global(MetricName::UserRecordsReceived)),
        (3_054, 3_054)
    );
    assert_eq!(
        exact(global(MetricName::UserRecordsPut)),
        (3_054, acknowledged.len() as u64)
    );
    let data_bytes: usize = read.iter().map(|r| r.record.data.len()).sum();
    assert_eq!(
        global(MetricName::UserRecordsDataPut).sum as usize,
        data_bytes
    );
    assert_eq!(global(MetricName::UserRecordExpired).sum as usize, expired);
    assert_eq!(global(MetricName::RetriesPerRecord).sum as u64, retries);
    assert_eq!(global(MetricName::RetriesPerRecord).count, 3_054);
    // Unaggregated: one Kinesis record per user record and attempt.
    let kinesis_put = global(MetricName::KinesisRecordsPut);
    assert_eq!(kinesis_put.sum as usize, read.len());
    // Each Kinesis record sent is one user record's attempt; only those in answered requests
    // get a KinesisRecordsPut sample (as the KPL counts them).
    assert_eq!(
        global(MetricName::UserRecordsPerKinesisRecord).count,
        attempts
    );
    assert!(kinesis_put.count < attempts, "some requests failed whole");
    let entry_errors = kinesis_put.count - kinesis_put.sum as u64;
    assert_eq!(
        metrics.errors("ProvisionedThroughputExceededException").sum as u64,
        stats.throttled_entries
    );
    assert!(metrics.errors("ValidationException").sum >= 1.0);
    let all_errors = global(MetricName::AllErrors);
    assert_eq!(
        all_errors.sum as u64,
        global(MetricName::ErrorsByCode).sum as u64
    );
    assert_eq!(all_errors.sum as u64, entry_errors + stats.request_errors);
    assert_eq!(all_errors.count, kinesis_put.count + stats.request_errors);
    assert_eq!(global(MetricName::RequestTime).count, stats.requests);
    assert_eq!(
        global(MetricName::KinesisRecordsPerPutRecordsRequest).count,
        stats.requests
    );
    assert_eq!(
        global(MetricName::UserRecordsPerPutRecordsRequest).sum as u64,
        attempts
    );
    assert_eq!(global(MetricName::BufferingTime).count, attempts);
    assert_eq!(global(MetricName::UserRecordsPending).sum, 0.0);
    assert_eq!(global(MetricName::BacklogBytes).sum, 0.0);
    // Shard granularity: the shards add up to the whole.
    let shard_ids: Vec<String> = kinesis
        .open_shards("metered")
        .await
        .into_iter()
        .map(|s| s.0)
        .collect();
    let per_shard: f64 = shard_ids
        .iter()
        .map(|id| metrics.shard(MetricName::UserRecordsPut, id).sum)
        .sum();
    assert_eq!(per_shard as usize, acknowledged.len());
    // The answer's metrics are recorded with the acknowledgement (one shard lookup for both):
    // every shard's count and sum add up to the global ones.
    for name in [
        MetricName::KinesisRecordsPut,
        MetricName::KinesisRecordsDataPut,
        MetricName::AllErrors,
    ] {
        let shards = shard_ids
            .iter()
            .map(|id| exact(metrics.shard(name, id)))
            .fold((0, 0), |(c, s), (count, sum)| (c + count, s + sum));
        let whole = exact(global(name));
        // Request errors concern no shard: only the global AllErrors has them.
        let request_level = if name == MetricName::AllErrors {
            (stats.request_errors, stats.request_errors)
        } else {
            (0, 0)
        };
        assert_eq!(
            (shards.0 + request_level.0, shards.1 + request_level.1),
            whole,
            "{name:?}: shards against the whole"
        );
    }
    println!(
        "metrics: {} acknowledged, {} expired, {} refused; {} entries throttled, {} retries, {} requests ({} failed)",
        acknowledged.len(),
        expired,
        permanent,
        stats.throttled_entries,
        retries,
        stats.requests,
        stats.request_errors
    );
}

#[tokio::test]
async fn metrics_keep_only_the_configured_level_and_granularity() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("levels", 2).await;
    for (level, granularity) in [
        (MetricsLevel::None, MetricsGranularity::Shard),
        (MetricsLevel::Summary, MetricsGranularity::Stream),
        (MetricsLevel::Detailed, MetricsGranularity::Global),
    ] {
        let producer = producer_for(&kinesis.endpoint, "levels", |b| {
            b.metrics_level(level).metrics_granularity(granularity)
        })
        .await;
        for i in 0..100 {
            producer
                .put(format!("r{i}"), format!("k{i}"))
                .await
                .unwrap();
        }
        producer.stop().await;
        let metrics = producer.metrics();
        match level {
            MetricsLevel::None => assert!(metrics.metrics.is_empty()),
            _ => {
                assert_eq!(metrics.global(MetricName::UserRecordsPut).sum, 100.0);
                for metric in &metrics.metrics {
                    assert!(metric.name.level() <= level, "{metric:?}");
                    let dims: Vec<_> = metric.dimensions.iter().map(|d| d.0).collect();
                    match granularity {
                        MetricsGranularity::Global => assert!(dims.is_empty()),
                        _ => assert!(!dims.contains(&"ShardId"), "{metric:?}"),
                    }
                }
                if matches!(granularity, MetricsGranularity::Stream) {
                    // The stream's own rows are there, named after it.
                    let streamed = metrics.metrics.iter().find(|m| {
                        m.name == MetricName::UserRecordsPut
                            && m.dimensions
                                .iter()
                                .any(|(k, v)| *k == "StreamName" && v == "levels")
                    });
                    let streamed = streamed.expect("UserRecordsPut by StreamName");
                    assert_eq!(streamed.statistics.sum, 100.0, "{streamed:?}");
                }
            }
        }
    }
}
