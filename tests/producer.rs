//! The producer against a real Kinesis API server (ferrokinesis, in-process on 127.0.0.1), through
//! the real aws-sdk-kinesis client over HTTP.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinesis_producer::record::partition_key_hash;
use kinesis_producer::{FailureKind, Producer, PutRefusal, RecordProblem, UserRecord};
use support::local_kinesis::LocalKinesis;
use support::proxy::Proxy;
use support::rng::Rng;
use support::{drain, producer_for};

type Key = (String, Option<String>, Vec<u8>);

fn key_of(record: &UserRecord) -> Key {
    (
        record.partition_key().to_owned(),
        record.explicit_hash_key().map(str::to_owned),
        record.data().to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_random_workload_arrives_whole_and_every_record_on_its_own_shard() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("round-trip", 4).await;
    // The defaults, except that a slow machine must not time a request out after the server
    // wrote it (a duplicate the exact counts below would catch) or expire a record.
    let producer = producer_for(&kinesis.endpoint, "round-trip", |b| {
        b.request_timeout(Duration::from_secs(60))
            .record_ttl(Duration::from_secs(300))
    })
    .await;
    let failures = producer.notify_failures();

    let mut rng = Rng(0x5eed_1234);
    let hot_keys: Vec<String> = (0..20).map(|i| format!("hot-{i}")).collect();
    let mut sent = Vec::new();
    for i in 0..30_000u64 {
        let size = match rng.below(100) {
            0 => 60_000 + rng.below(40_000) as usize, // too big to share an aggregate
            1..=9 => 0,
            _ => rng.below(2_000) as usize,
        };
        let key = if rng.below(3) == 0 {
            hot_keys[rng.below(20) as usize].clone()
        } else {
            // Unicode keys of every length up to 256 characters.
            "ключ🔑".repeat(1 + rng.below(50) as usize) + &i.to_string()
        };
        // Up to 256 characters, and within 256 UTF-8 bytes: the embedded server counts key
        // length in bytes (Kinesis counts characters).
        let mut key: String = key.chars().take(256).collect();
        while key.len() > 256 {
            key.pop();
        }
        let mut record = UserRecord::new(rng.bytes(size), key);
        if rng.below(4) == 0 {
            let ehk = (u128::from(rng.next()) << 64 | u128::from(rng.next())).to_string();
            record = record.with_explicit_hash_key(ehk);
        }
        sent.push(record);
    }
    // Put from four tasks at once.
    let mut tasks = Vec::new();
    for chunk in sent.chunks(sent.len() / 4 + 1) {
        let producer = producer.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for record in chunk {
                producer.put_record(record).await.expect("accepted");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    producer.stop().await;
    let failed = drain(failures).await;
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first().map(|f| (&f.error, f.attempts))
    );

    let stats = producer.stats();
    assert_eq!(stats.user_records_put, sent.len() as u64);
    assert!(
        stats.kinesis_records_put * 5 < stats.user_records_put,
        "aggregation packs records: {stats:?}"
    );

    let read = kinesis.read_all("round-trip").await;
    assert_eq!(read.len(), sent.len());
    let ranges = kinesis.hash_ranges("round-trip").await;
    // Unmatched sent records by (partition key, data), with their explicit hash keys.
    let mut unmatched: HashMap<(String, Vec<u8>), Vec<Option<String>>> = HashMap::new();
    for record in &sent {
        let (_, ehk, data) = key_of(record);
        unmatched
            .entry((record.partition_key().to_owned(), data))
            .or_default()
            .push(ehk);
    }
    // Aggregated reads name their explicit hash key and match one sent record exactly; match
    // them first, so a plain read (which matches any twin in its shard) never takes theirs.
    let mut ordered: Vec<_> = read.iter().collect();
    ordered.sort_by_key(|r| !r.record.aggregated);
    for r in ordered {
        let (start, end) = ranges[&r.shard_id];
        let hash_of = |ehk: &Option<String>| match ehk {
            Some(ehk) => ehk.parse::<u128>().unwrap(),
            None => partition_key_hash(&r.record.partition_key),
        };
        let candidates = unmatched
            .get_mut(&(r.record.partition_key.clone(), r.record.data.to_vec()))
            .unwrap_or_else(|| panic!("a record nobody sent: {:?}", r.record.partition_key));
        // An aggregate carries each record's explicit hash key; Kinesis does not return it
        // for a plain record, so any sent twin whose hash key is in this shard matches.
        let position = candidates
            .iter()
            .position(|ehk| {
                (!r.record.aggregated || *ehk == r.record.explicit_hash_key)
                    && (start..=end).contains(&hash_of(ehk))
            })
            .unwrap_or_else(|| {
                panic!(
                    "record {:?} (aggregated: {}) is on {}, which does not own its hash key",
                    r.record.partition_key, r.record.aggregated, r.shard_id
                )
            });
        candidates.swap_remove(position);
    }
    assert!(
        unmatched.values().all(Vec::is_empty),
        "every sent record was read once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_stream_still_receives_every_record() {
    let kinesis = LocalKinesis::start(true).await;
    kinesis.create_stream("throttled", 1).await;
    // One shard takes 1000 records/s; unaggregated, 2,500 records must be throttled and retried.
    let producer = producer_for(&kinesis.endpoint, "throttled", |b| {
        b.aggregation(false)
            .retry_base_delay(Duration::from_millis(50))
    })
    .await;
    let failures = producer.notify_failures();
    for i in 0..2_500 {
        producer
            .put(format!("record {i}"), format!("k{i}"))
            .await
            .unwrap();
    }
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    let stats = producer.stats();
    assert!(
        stats.throttled_entries > 0,
        "the server throttled: {stats:?}"
    );
    assert!(stats.entry_retries > 0);
    assert_eq!(stats.user_records_put, 2_500);
    assert_eq!(kinesis.read_all("throttled").await.len(), 2_500);
}

/// The producer writes the PutRecords JSON itself: keys JSON must escape reach the server as
/// they were put, and each record lands on the shard the MD5 of its exact key names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_json_must_escape_arrive_exactly_and_on_their_own_shard() {
    let kinesis = LocalKinesis::start(false).await;
    let keys = [
        "quote\"d",
        "back\\slash",
        "\\\"",
        "new\nline",
        "tab\tand\rreturn",
        "control\u{1}\u{8}\u{c}\u{1f}",
        "delete\u{7f}",
        "slash/and<html>&",
        "separator\u{2028}\u{2029}",
        "key🔑ключ",
    ];
    for aggregation in [true, false] {
        let stream = format!("escapes-{aggregation}");
        kinesis.create_stream(&stream, 4).await;
        let producer =
            producer_for(&kinesis.endpoint, &stream, |b| b.aggregation(aggregation)).await;
        let failures = producer.notify_failures();
        let mut sent = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            for j in 0..3 {
                let data = format!("{key} {i} {j}").into_bytes();
                producer.put(data.clone(), *key).await.expect("accepted");
                sent.push((key.to_string(), data));
            }
        }
        producer.stop().await;
        assert!(
            drain(failures).await.is_empty(),
            "aggregation {aggregation}"
        );
        let (read, discarded) = kinesis.read_as_kcl(&stream).await;
        assert_eq!(discarded, 0);
        let ranges = kinesis.hash_ranges(&stream).await;
        let mut got: Vec<(String, Vec<u8>)> = read
            .iter()
            .map(|r| {
                let (start, end) = ranges[&r.shard_id];
                let hash = partition_key_hash(&r.record.partition_key);
                assert!(
                    (start..=end).contains(&hash),
                    "{:?} read from {}",
                    r.record.partition_key,
                    r.shard_id
                );
                (r.record.partition_key.clone(), r.record.data.to_vec())
            })
            .collect();
        got.sort();
        sent.sort();
        assert_eq!(got, sent, "aggregation {aggregation}");
    }
}

#[tokio::test]
async fn bad_records_are_refused_with_a_clear_error_and_given_back() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("bad-input", 1).await;
    let producer = producer_for(&kinesis.endpoint, "bad-input", |b| b).await;

    let cases: Vec<(UserRecord, &str)> = vec![
        (UserRecord::new("d", ""), "partition key is empty"),
        (UserRecord::new("d", "x".repeat(257)), "257 characters"),
        (
            UserRecord::new("d", "k").with_explicit_hash_key("-5"),
            "explicit hash key",
        ),
        (
            UserRecord::new("d", "k").with_explicit_hash_key((u128::MAX).to_string() + "0"),
            "explicit hash key",
        ),
        (
            UserRecord::new(vec![0u8; 1 << 20], "k"),
            "1048577 bytes (data + partition key); the maximum is 1048576",
        ),
    ];
    for (record, message) in cases {
        let error = producer.put_record(record.clone()).await.unwrap_err();
        assert!(error.to_string().contains(message), "{error}");
        assert!(matches!(error.reason(), PutRefusal::Invalid(_)));
        assert_eq!(error.into_record(), record, "the record comes back whole");
        let error = producer.try_put(record.clone()).unwrap_err();
        assert_eq!(error.into_record(), record);
    }
    assert!(matches!(
        producer.put("d", "").await.unwrap_err().reason(),
        PutRefusal::Invalid(RecordProblem::EmptyPartitionKey)
    ));

    // The producer is unharmed: a good record still goes through.
    producer.put("fine", "k").await.unwrap();
    producer.stop().await;
    let after = producer.put("late", "k").await.unwrap_err();
    assert_eq!(after.reason(), &PutRefusal::Stopped);
    assert_eq!(after.into_record().data().as_ref(), b"late");
    assert_eq!(producer.stats().user_records_put, 1);
    assert_eq!(kinesis.read_all("bad-input").await.len(), 1);
}

#[tokio::test]
async fn a_record_the_server_refuses_fails_alone_not_with_its_request() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("isolate", 1).await;
    let producer = producer_for(&kinesis.endpoint, "isolate", |b| b.aggregation(false)).await;
    let failures = producer.notify_failures();
    // 200 two-byte characters: valid for Kinesis (256 characters at most), but this server
    // counts 400 bytes and refuses the whole PutRecords request with a ValidationException.
    let refused_key = "é".repeat(200);
    for i in 0..100 {
        producer
            .put(format!("good {i}"), format!("k{i}"))
            .await
            .unwrap();
        if i == 60 {
            producer.put("bad", refused_key.clone()).await.unwrap();
        }
    }
    producer.stop().await;
    let failed = drain(failures).await;
    assert_eq!(failed.len(), 1, "only the refused record fails");
    assert_eq!(failed[0].record.partition_key(), refused_key);
    assert_eq!(&*failed[0].error.code, "ValidationException");
    assert_eq!(failed[0].error.kind, FailureKind::Permanent);
    assert_eq!(kinesis.read_all("isolate").await.len(), 100);
}

#[tokio::test]
async fn invalid_config_fails_at_build_naming_the_field() {
    let kinesis = LocalKinesis::start(false).await;
    let error = Producer::builder()
        .stream_name("s")
        .client(kinesis.client.clone())
        .aggregation_max_size(10)
        .build()
        .await
        .err()
        .expect("invalid");
    assert!(
        error.to_string().contains("aggregation_max_size = 10"),
        "{error}"
    );
    let error = Producer::builder()
        .stream_name("does-not-exist")
        .client(kinesis.client.clone())
        .build()
        .await
        .err()
        .expect("no such stream");
    assert!(error.to_string().contains("ResourceNotFound"), "{error}");
}

#[tokio::test]
async fn stop_twice_with_an_unread_failure_stream_returns_and_reports_everything() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("vanishing", 2).await;
    let producer = producer_for(&kinesis.endpoint, "vanishing", |b| b).await;
    let failures = producer.notify_failures(); // never read until the end
    kinesis
        .client
        .delete_stream()
        .stream_name("vanishing")
        .send()
        .await
        .unwrap();
    for i in 0..1_000 {
        producer.put(vec![7u8; 100], format!("k{i}")).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), producer.stop())
        .await
        .expect("stop returns");
    tokio::time::timeout(Duration::from_secs(1), producer.stop())
        .await
        .expect("a second stop returns at once");
    let failed = drain(failures).await;
    assert_eq!(failed.len(), 1_000);
    for f in &failed {
        assert_eq!(f.error.kind, FailureKind::Permanent);
        assert_eq!(&*f.error.code, "ResourceNotFoundException");
        assert_eq!(f.record.data().len(), 100, "the failure carries the data");
        assert!(f.attempts >= 1);
    }
    let stats = producer.stats();
    assert_eq!(stats.user_records_failed, 1_000);
    assert_eq!(stats.entry_retries, 0, "permanent errors are not retried");
}

#[tokio::test]
async fn failures_nobody_subscribed_to_are_counted_and_stop_still_returns() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("unobserved", 1).await;
    let producer = producer_for(&kinesis.endpoint, "unobserved", |b| b).await;
    kinesis
        .client
        .delete_stream()
        .stream_name("unobserved")
        .send()
        .await
        .unwrap();
    for i in 0..50 {
        producer.put("x", format!("k{i}")).await.unwrap();
    }
    producer.stop().await;
    let stats = producer.stats();
    assert_eq!(stats.failures_unobserved, 50);
    assert_eq!(stats.user_records_pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reports_every_record_when_the_endpoint_is_down() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("outage", 2).await;
    let proxy = Proxy::start(&kinesis.endpoint).await;
    let producer = producer_for(&proxy.endpoint, "outage", |b| {
        b.retry_base_delay(Duration::from_millis(20))
            .request_timeout(Duration::from_millis(500))
    })
    .await;
    let failures = producer.notify_failures();
    proxy.down();
    for i in 0..300 {
        producer.put(vec![1u8; 50], format!("k{i}")).await.unwrap();
    }
    let started = Instant::now();
    producer.stop_within(Duration::from_secs(2)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    let failed = drain(failures).await;
    assert_eq!(failed.len(), 300, "every record is reported");
    assert!(failed.iter().all(|f| f.error.kind == FailureKind::Stopped));
    assert!(failed.iter().all(|f| f.attempts >= 1));
    assert_eq!(producer.stats().user_records_pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_outage_heals_without_losing_a_record() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("blip", 2).await;
    let proxy = Proxy::start(&kinesis.endpoint).await;
    let producer = producer_for(&proxy.endpoint, "blip", |b| {
        b.retry_base_delay(Duration::from_millis(20))
            .retry_max_delay(Duration::from_millis(200))
    })
    .await;
    let failures = producer.notify_failures();
    proxy.down();
    for i in 0..500 {
        producer
            .put(format!("v{i}"), format!("k{i}"))
            .await
            .unwrap();
    }
    // The outage lasts until an attempt has failed and is being retried (on a slow machine the
    // first attempt may take longer than a fixed wait), and at least 800 ms.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while producer.stats().entry_retries == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.up();
    producer.flush().await;
    assert_eq!(producer.stats().user_records_put, 500);
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    assert!(producer.stats().entry_retries > 0);
    assert_eq!(kinesis.read_all("blip").await.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_put_from_many_tasks_while_stop_is_called_are_each_accounted_for() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("race", 4).await;
    let producer = producer_for(&kinesis.endpoint, "race", |b| b).await;
    let failures = producer.notify_failures();
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let producer = producer.clone();
        let (accepted, refused) = (accepted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                match producer.put(format!("{t}/{i}"), format!("{t}-{i}")).await {
                    Ok(()) => accepted.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        assert_eq!(e.reason(), &PutRefusal::Stopped);
                        assert_eq!(e.into_record().data(), &format!("{t}/{i}"));
                        refused.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                };
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    producer.stop().await;
    for task in tasks {
        task.await.unwrap();
    }
    let failed = drain(failures).await.len() as u64;
    let stats = producer.stats();
    let accepted = accepted.load(Ordering::SeqCst);
    assert!(accepted > 0);
    assert_eq!(
        refused.load(Ordering::SeqCst),
        8,
        "each task saw exactly one refusal"
    );
    assert_eq!(stats.user_records_put + failed, accepted);
    assert_eq!(stats.user_records_received, accepted);
    assert_eq!(
        kinesis.read_all("race").await.len() as u64,
        stats.user_records_put
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_put_refuses_when_the_backlog_is_full_and_put_blocking_waits() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("backlog", 1).await;
    let proxy = Proxy::start(&kinesis.endpoint).await;
    let producer = producer_for(&proxy.endpoint, "backlog", |b| {
        b.max_backlog_records(10)
            .retry_base_delay(Duration::from_millis(10))
            .retry_max_delay(Duration::from_millis(50))
    })
    .await;
    proxy.down();
    for i in 0..10 {
        producer
            .try_put(UserRecord::new("x", format!("k{i}")))
            .unwrap();
    }
    let full = producer.try_put(UserRecord::new("x", "k10")).unwrap_err();
    assert_eq!(full.reason(), &PutRefusal::BacklogFull);
    assert_eq!(full.into_record().partition_key(), "k10");

    // On a runtime thread, the blocking put refuses rather than stall the runtime.
    let refused = producer
        .put_blocking(UserRecord::new("x", "k"))
        .unwrap_err();
    assert_eq!(refused.reason(), &PutRefusal::BlockingInAsyncContext);

    // From a plain thread it waits for room, which comes once the endpoint is back.
    let blocking = {
        let producer = producer.clone();
        std::thread::spawn(move || producer.put_blocking(UserRecord::new("y", "k11")))
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !blocking.is_finished(),
        "put_blocking waits while the backlog is full"
    );
    proxy.up();
    tokio::task::spawn_blocking(move || blocking.join().unwrap())
        .await
        .unwrap()
        .expect("accepted once there is room");
    producer.flush().await;
    assert_eq!(producer.stats().user_records_put, 11);
    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_sends_what_waits_only_for_its_buffering_time() {
    let kinesis = LocalKinesis::start(false).await;
    // Backlogs' worth of records, each held up to 20 s. Without the relief every backlog
    // would wait for its aggregates' deadline (10 s, half the buffered time at this rate)
    // and then its requests' (20 s): minutes.
    struct Case {
        name: &'static str,
        shards: i32,
        size: usize,
        max_records: usize,
        max_bytes: usize,
        rate_limit: u32,
        backlogs: u64,
        /// Whether open aggregates hold most of the backlog, so that reliefs close some.
        closes: bool,
    }
    let small = Case {
        name: "many small aggregates (the aggregators hold the records)",
        shards: 4,
        size: 100,
        max_records: 500,
        max_bytes: 64 << 20,
        rate_limit: 0,
        backlogs: 10,
        closes: true,
    };
    let cases = [
        Case {
            name: "in order mode",
            ..small
        },
        Case {
            name: "full aggregates waiting in one lane for a request (a backlog under 5 MiB)",
            shards: 1,
            size: 1_000,
            max_records: 100_000,
            max_bytes: (1 << 20) + 64,
            closes: false,
            ..small
        },
        Case {
            name: "the same, the lane held by its rate limiter (150% of 1 MiB/s) until it lets go",
            shards: 1,
            size: 1_000,
            max_records: 100_000,
            max_bytes: (1 << 20) + 64,
            rate_limit: 150,
            backlogs: 3,
            closes: false,
        },
        small,
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let Case {
            name: case,
            shards,
            size,
            max_records,
            max_bytes,
            rate_limit,
            backlogs,
            closes,
        } = case;
        let in_order = case == "in order mode";
        let stream = format!("pressure-{i}");
        kinesis.create_stream(&stream, shards).await;
        let producer = producer_for(&kinesis.endpoint, &stream, |b| {
            b.record_max_buffered_time(Duration::from_secs(20))
                .max_backlog_records(max_records)
                .max_backlog_bytes(max_bytes)
                .rate_limit(rate_limit)
                .preserve_order(in_order)
        })
        .await;
        let count = backlogs * max_records.min(max_bytes / size) as u64;
        let started = Instant::now();
        let put_all = async {
            for i in 0..count {
                producer
                    .put(vec![b'x'; size], format!("k{i}"))
                    .await
                    .unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), put_all)
            .await
            .unwrap_or_else(|_| panic!("{case}: puts still waiting after 60 s"));
        let put_time = started.elapsed();
        producer.flush().await;
        let stats = producer.stats();
        producer.stop().await;
        assert!(
            put_time < Duration::from_secs(15),
            "{case}: {count} puts took {put_time:?}"
        );
        assert!(stats.puts_found_backlog_full > 0, "{case}: {stats:?}");
        assert!(
            if closes {
                stats.reliefs > 0 && stats.puts_found_backlog_full >= stats.reliefs
            } else {
                stats.reliefs == 0
            },
            "{case}: {stats:?}"
        );
        assert_eq!(stats.user_records_put, count, "{case}");
        assert_eq!(
            kinesis.read_all(&stream).await.len() as u64,
            count,
            "{case}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_held_by_retries_closes_no_aggregate_early() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("held", 1).await;
    let proxy = Proxy::start(&kinesis.endpoint).await;
    // Aggregates of at most 8 records, each its own request; a backlog of 10 records. The
    // first 8 go out on their aggregate's deadline (about 5 s: 10 s less the lead at a low
    // rate) and fail, then wait out a backoff.
    let producer = producer_for(&proxy.endpoint, "held", |b| {
        b.max_backlog_records(10)
            .aggregation_max_count(8)
            .collection_max_count(1)
            .record_max_buffered_time(Duration::from_secs(10))
            .retry_base_delay(Duration::from_secs(5))
            .retry_max_delay(Duration::from_secs(5))
    })
    .await;
    proxy.down();
    for i in 0..8 {
        producer.put("x", format!("k{i}")).await.unwrap();
    }
    // Their request fails, and they wait out a backoff of at least 2.5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while producer.stats().request_errors == 0 {
        assert!(Instant::now() < deadline, "no request failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two more fill the backlog in an open aggregate, which may stay open for seconds.
    for i in 8..10 {
        producer.put("x", format!("k{i}")).await.unwrap();
    }
    let requests = producer.stats().requests;
    for _ in 0..3 {
        let full = producer.try_put(UserRecord::new("y", "k")).unwrap_err();
        assert_eq!(full.reason(), &PutRefusal::BacklogFull);
        // The sender's answer to each is a pass through its inbound channel.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = producer.stats();
    assert_eq!(stats.puts_found_backlog_full, 3);
    assert_eq!(
        stats.reliefs, 0,
        "retries, not open aggregates, hold the backlog"
    );
    assert_eq!(
        stats.requests, requests,
        "the open aggregate was not sent early"
    );
    proxy.up();
    producer.flush().await;
    assert_eq!(producer.stats().user_records_put, 10);
    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_try_put_relieves_the_backlog_too() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("refused", 1).await;
    let producer = producer_for(&kinesis.endpoint, "refused", |b| {
        b.max_backlog_records(10)
            .record_max_buffered_time(Duration::from_secs(20))
    })
    .await;
    for i in 0..10 {
        producer
            .try_put(UserRecord::new("x", format!("k{i}")))
            .unwrap();
    }
    // The backlog is full, held by one open aggregate due in about 10 s; nobody waits in
    // `put`, so only the relief this refusal asks for can send it early.
    let full = producer.try_put(UserRecord::new("y", "k10")).unwrap_err();
    assert_eq!(full.reason(), &PutRefusal::BacklogFull);
    let deadline = Instant::now() + Duration::from_secs(5);
    while producer.stats().user_records_put < 10 {
        assert!(
            Instant::now() < deadline,
            "the aggregate waited for its deadline: {:?}",
            producer.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = producer.stats();
    assert_eq!((stats.puts_found_backlog_full, stats.reliefs), (1, 1));
    producer.try_put(UserRecord::new("y", "k10")).unwrap();
    producer.stop().await;
    assert_eq!(kinesis.read_all("refused").await.len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_returns_once_earlier_records_are_acknowledged() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("flush", 2).await;
    // A long buffering time: only flush can make these go out quickly.
    let producer = producer_for(&kinesis.endpoint, "flush", |b| {
        b.record_max_buffered_time(Duration::from_secs(20))
    })
    .await;
    for i in 0..1_234 {
        producer.put(format!("{i}"), format!("k{i}")).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), producer.flush())
        .await
        .expect("flush does not wait for the buffering time");
    assert_eq!(producer.stats().user_records_put, 1_234);
    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregators_keep_room_for_their_next_aggregate_only_up_to_the_cap() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("room", 64).await;
    let put_all = |producer: Producer, count: u64, size: usize| async move {
        let mut rng = Rng(7);
        for i in 0..count {
            let key = format!("{:x}", rng.next());
            producer.put(vec![i as u8; size], key).await.unwrap();
        }
        producer.flush().await;
        let stats = producer.stats();
        assert_eq!(stats.user_records_put, count);
        producer.stop().await;
        stats.idle_aggregator_room_bytes
    };
    // The default backlog (64 MiB) allows 4 MiB of room: every shard keeps its buffers.
    let producer = producer_for(&kinesis.endpoint, "room", |b| b).await;
    let kept = put_all(producer, 3_000, 100).await;
    assert!(kept > 0, "busy shards keep their aggregate's buffers");
    // The smallest backlog allows a sixteenth of it, 64 KiB, in empty aggregators; 64 shards of
    // aggregates of a few 2 KB records would keep several times that. A shard or two may add
    // theirs while the sender and the putter close aggregates at the same moment, never more.
    // The buffers of acknowledged aggregates kept for new ones add an eighth at most.
    let backlog = (1 << 20) + 64;
    let producer = producer_for(&kinesis.endpoint, "room", |b| b.max_backlog_bytes(backlog)).await;
    let kept = put_all(producer, 200, 2_000).await;
    let cap = (backlog / 16 + backlog / 8) as u64;
    assert!(kept > 0);
    assert!(kept <= cap + 2 * 24 * 1024, "kept {kept} bytes, cap {cap}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_can_be_awaited_on_a_runtime_without_timers() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("timerless", 1).await;
    let producer = producer_for(&kinesis.endpoint, "timerless", |b| b).await;
    producer.put("x", "k").await.unwrap();
    let stopping = producer.clone();
    // The producer runs on this test's runtime; `stop` is awaited on one without a timer.
    let stats = tokio::task::spawn_blocking(move || {
        let bare = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        bare.block_on(stopping.stop());
        stopping.stats()
    })
    .await
    .unwrap();
    assert_eq!(stats.user_records_put, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_shard_is_noticed_and_the_map_reloaded() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("split", 1).await;
    let producer = producer_for(&kinesis.endpoint, "split", |b| b).await;
    assert_eq!(producer.shard_map().len(), 1);
    kinesis
        .client
        .split_shard()
        .stream_name("split")
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .unwrap();
    kinesis.wait_active("split").await;
    let failures = producer.notify_failures();
    for round in 0..20 {
        for i in 0..100 {
            producer.put("x", format!("{round}-{i}")).await.unwrap();
        }
        producer.flush().await;
        if producer.shard_map().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(producer.shard_map().len(), 2, "the map was reloaded");
    assert!(producer.stats().shard_map_refreshes >= 1);
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_producer_without_stop_delivers_in_the_background() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("dropped", 2).await;
    let producer = producer_for(&kinesis.endpoint, "dropped", |b| {
        b.record_max_buffered_time(Duration::from_secs(20))
    })
    .await;
    let failures = producer.notify_failures();
    for i in 0..700 {
        producer.put(format!("{i}"), format!("k{i}")).await.unwrap();
    }
    drop(producer); // never blocks; the buffered records still go out
    let failed = tokio::time::timeout(Duration::from_secs(10), drain(failures))
        .await
        .expect("the background stop ends, and with it the failure stream");
    assert!(failed.is_empty());
    assert_eq!(kinesis.read_all("dropped").await.len(), 700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_written_across_a_split_are_resent_so_a_kcl_reader_loses_nothing() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("kcl-split", 1).await;
    let producer = producer_for(&kinesis.endpoint, "kcl-split", |b| b).await;
    // The producer's map still says one shard; the stream now has two children.
    kinesis
        .client
        .split_shard()
        .stream_name("kcl-split")
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .unwrap();
    kinesis.wait_active("kcl-split").await;
    let failures = producer.notify_failures();
    let mut receipts = Vec::new();
    for i in 0..3_000 {
        let record = UserRecord::new(format!("v{i}"), format!("key-{i}"));
        receipts.push(producer.put_with_receipt(record).await.unwrap());
    }
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    let stats = producer.stats();
    assert!(stats.records_resent_after_reshard > 0, "{stats:?}");
    assert_eq!(stats.user_records_put, 3_000);
    // A re-sent record's receipt counts the request that wrote its misplaced aggregate too:
    // each re-send adds an attempt to one record's count.
    let mut retries = 0;
    for receipt in receipts {
        let delivered = receipt.await.expect("delivered");
        retries += u64::from(delivered.attempts - 1);
    }
    assert!(
        retries >= stats.records_resent_after_reshard,
        "receipts count {retries} attempts past the first, {} records re-sent",
        stats.records_resent_after_reshard
    );

    // Read as the KCL does: an aggregate holding any record outside the shard's hash range is
    // thrown away whole.
    let (read, _) = kinesis.read_as_kcl("kcl-split").await;
    let mut delivered: HashMap<String, u32> = HashMap::new();
    for r in read {
        *delivered.entry(r.record.partition_key).or_default() += 1;
    }
    for i in 0..3_000 {
        assert_eq!(
            delivered.get(&format!("key-{i}")).copied().unwrap_or(0),
            1,
            "key-{i} reaches a KCL reader exactly once"
        );
    }
}

/// Records the URI of each request the SDK is about to send, and stops it there.
#[derive(Debug, Clone, Default)]
struct SeeUri(Arc<std::sync::Mutex<Vec<String>>>);

impl aws_sdk_kinesis::config::Intercept for SeeUri {
    fn name(&self) -> &'static str {
        "SeeUri"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_kinesis::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_kinesis::config::RuntimeComponents,
        _: &mut aws_sdk_kinesis::config::ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        self.0
            .lock()
            .unwrap()
            .push(context.request().uri().to_string());
        Err("stopped by the test before anything was sent".into())
    }
}

#[tokio::test]
async fn requests_use_https_unless_a_plain_http_endpoint_is_configured() {
    use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
    for (endpoint, expected) in [
        (None, "https://kinesis.us-east-1.amazonaws.com"),
        (Some("http://127.0.0.1:9"), "http://127.0.0.1:9"),
    ] {
        let seen = SeeUri::default();
        let mut config = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .interceptor(seen.clone());
        if let Some(url) = endpoint {
            config = config.endpoint_url(url);
        }
        let client = aws_sdk_kinesis::Client::from_conf(config.build());
        let built = Producer::builder()
            .stream_name("s")
            .client(client)
            .build()
            .await;
        assert!(
            built.is_err(),
            "nothing was sent, so the shard map did not load"
        );
        let uris = seen.0.lock().unwrap().clone();
        assert!(
            !uris.is_empty() && uris.iter().all(|u| u.starts_with(expected)),
            "{uris:?}"
        );
    }
}

/// A client whose first PutRecords panics (as a faulty interceptor or connector might).
#[derive(Debug, Default)]
struct PanicsOnce(std::sync::atomic::AtomicBool);

impl aws_sdk_kinesis::config::Intercept for PanicsOnce {
    fn name(&self) -> &'static str {
        "PanicsOnce"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_kinesis::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_kinesis::config::RuntimeComponents,
        _: &mut aws_sdk_kinesis::config::ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        let is_put_records = context
            .request()
            .headers()
            .get("x-amz-target")
            .is_some_and(|t| t.ends_with(".PutRecords"));
        if is_put_records && !self.0.swap(true, Ordering::SeqCst) {
            panic!("the test client panics in its first PutRecords");
        }
        Ok(())
    }
}

/// A request whose task panics gives its records back to the sender as a failed attempt: they
/// are retried and acknowledged, and `stop` returns (it used to wait for the request forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_task_that_panics_retries_its_records_and_stop_returns() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("panicky", 2).await;
    let config = kinesis
        .client
        .config()
        .to_builder()
        .interceptor(PanicsOnce::default())
        .build();
    let producer = Producer::builder()
        .stream_name("panicky")
        .client(aws_sdk_kinesis::Client::from_conf(config))
        .build()
        .await
        .expect("producer");
    let failures = producer.notify_failures();
    for i in 0..100 {
        producer
            .put(format!("r{i}"), format!("k{i}"))
            .await
            .unwrap();
    }
    // Well inside the 30 s stop_timeout: a stop that waited for the panicked request would
    // end only at that deadline.
    tokio::time::timeout(Duration::from_secs(15), producer.stop())
        .await
        .expect("stop returns");
    assert!(drain(failures).await.is_empty(), "nothing failed");
    let stats = producer.stats();
    assert_eq!(stats.user_records_put, 100);
    assert!(
        stats.request_errors >= 1,
        "the panicked request counts: {stats:?}"
    );
    let read = kinesis.read_all("panicky").await;
    assert_eq!(read.len(), 100, "every record once");
}

/// A producer whose runtime ended before its sender task ever ran (built on a runtime dropped
/// right after): `stop` on another runtime returns, and a later put is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_returns_when_the_producers_runtime_ended_before_its_sender_ran() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("short-lived", 1).await;
    let client = kinesis.client.clone();
    let producer = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let producer = runtime
            .block_on(
                Producer::builder()
                    .stream_name("short-lived")
                    .client(client)
                    .build(),
            )
            .expect("producer");
        drop(runtime);
        producer
    })
    .join()
    .expect("the building thread");
    tokio::time::timeout(Duration::from_secs(10), producer.stop())
        .await
        .expect("stop returns");
    let refused = producer.put(vec![1u8], "k").await.expect_err("refused");
    assert_eq!(refused.reason(), &PutRefusal::Stopped);
}

/// A producer whose runtime shut down without `stop` (its sender task dropped): what the
/// aggregators held is reported failed at once, to receipts and the failure stream, and a later
/// `put` is refused instead of accepted into an aggregator nobody will send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_when_the_producers_runtime_ends_are_reported_and_later_puts_refused() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("runtime-ends", 2).await;
    let client = kinesis.client.clone();
    let (producer, failures, receipts) = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (producer, failures, receipts) = runtime.block_on(async {
            let producer = Producer::builder()
                .stream_name("runtime-ends")
                .client(client)
                // Held in their aggregators until the runtime ends.
                .record_max_buffered_time(Duration::from_secs(20))
                .build()
                .await
                .expect("producer");
            let failures = producer.notify_failures();
            let mut receipts = Vec::new();
            for i in 0..50 {
                let record = UserRecord::new(format!("r{i}"), format!("k{i}"));
                receipts.push(producer.put_with_receipt(record).await.expect("accepted"));
            }
            (producer, failures, receipts)
        });
        drop(runtime);
        (producer, failures, receipts)
    })
    .join()
    .expect("the building thread");
    for receipt in receipts {
        let outcome = tokio::time::timeout(Duration::from_secs(5), receipt)
            .await
            .expect("the receipt resolves once the runtime has ended");
        let failed = outcome.expect_err("nothing sent the record");
        assert_eq!(failed.error.kind, FailureKind::Stopped);
    }
    let streamed = refuses_stops_and_drains(&producer, failures).await;
    assert_eq!(streamed.len(), 50, "each failure reaches the stream");
    let stats = producer.stats();
    assert_eq!(stats.failures_unobserved, 0);
    assert_eq!(stats.user_records_failed, 50);
}

/// For a producer whose runtime has ended: a later put is refused, `stop` returns, and the
/// failure stream ends; returns what it delivered.
async fn refuses_stops_and_drains(
    producer: &Producer,
    failures: kinesis_producer::FailureStream,
) -> Vec<kinesis_producer::FailedRecord> {
    let refused = producer.put(vec![1u8], "late").await.unwrap_err();
    assert_eq!(refused.reason(), &PutRefusal::Stopped);
    tokio::time::timeout(Duration::from_secs(10), producer.stop())
        .await
        .expect("stop returns");
    drain(failures).await
}

/// A producer whose runtime shuts down while its sender holds records in every place it keeps
/// them: one waiting for its retry, one in a request whose answer is held back, and more queued
/// behind that request for the one slot. Each is reported failed, once, to its receipt and the
/// failure stream (the one in flight saying it may have been written), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_sender_holds_when_its_runtime_ends_are_reported_failed_once() {
    use support::faults::{Fault, FaultProxy, Schedule};
    const QUEUED: usize = 20;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("sender-ends", 2).await;
    let proxy = FaultProxy::start(
        &kinesis.endpoint,
        Schedule::new(
            1,
            1.0,
            vec![Fault::Refuse(400, "ProvisionedThroughputExceededException")],
        ),
    )
    .await;
    let endpoint = proxy.endpoint.clone();
    let (producer, failures, receipts, proxy) = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (producer, failures, receipts) = runtime.block_on(async {
            let producer = producer_for(&endpoint, "sender-ends", |b| {
                b.rate_limit(0)
                    .max_in_flight(1)
                    .record_max_buffered_time(Duration::from_millis(20))
                    .record_ttl(Duration::from_secs(300))
                    .retry_base_delay(Duration::from_secs(60))
                    .retry_max_delay(Duration::from_secs(60))
                    .request_timeout(Duration::from_secs(60))
            })
            .await;
            let failures = producer.notify_failures();
            let until = |done: &dyn Fn() -> bool| {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !done() {
                    assert!(
                        Instant::now() < deadline,
                        "timed out: {:?}",
                        producer.stats()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            let put = |i: usize| {
                producer.put_with_receipt(UserRecord::new(format!("r{i}"), format!("k{i}")))
            };
            // Throttled, then waiting a minute for its retry.
            let mut receipts = vec![put(0).await.expect("accepted")];
            until(&|| producer.stats().entry_retries >= 1);
            // Sent, its answer held back: the one request slot stays taken.
            proxy.heal();
            proxy.delay_answers(Some(Duration::from_secs(120)));
            receipts.push(put(1).await.expect("accepted"));
            until(&|| proxy.counts.requests.load(Ordering::Relaxed) >= 2);
            // Queued behind it, past their buffering time.
            for i in 2..2 + QUEUED {
                receipts.push(put(i).await.expect("accepted"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(producer.stats().requests, 2, "nothing else was sent");
            (producer, failures, receipts)
        });
        drop(runtime);
        (producer, failures, receipts, proxy)
    })
    .join()
    .expect("the producer's thread");
    let mut outcomes = Vec::new();
    for receipt in receipts {
        let outcome = tokio::time::timeout(Duration::from_secs(10), receipt)
            .await
            .expect("the receipt resolves once the runtime has ended");
        outcomes.push(outcome.expect_err("nothing was acknowledged"));
    }
    for failed in &outcomes {
        assert_eq!(failed.error.kind, FailureKind::Stopped, "{failed:?}");
    }
    assert_eq!(outcomes[0].attempts, 1, "{:?}", outcomes[0]);
    assert!(
        outcomes[1].error.message.contains("may have been written"),
        "the record in flight may have been written: {:?}",
        outcomes[1]
    );
    let streamed = refuses_stops_and_drains(&producer, failures).await;
    assert_eq!(streamed.len(), 2 + QUEUED, "each record reported once");
    let stats = producer.stats();
    assert_eq!(stats.user_records_failed, (2 + QUEUED) as u64);
    assert_eq!(stats.user_records_put, 0);
    proxy.delay_answers(None);
}

/// Without a limiter, a shard that always has a full request waiting takes turns with the
/// others: a record for another shard goes out in one of the next requests, not once the busy
/// shard runs dry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_always_fills_a_request_does_not_starve_the_others() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("hot", 2).await;
    let producer = producer_for(&kinesis.endpoint, "hot", |b| {
        b.rate_limit(0)
            .aggregation(false)
            .collection_max_count(10)
            .max_in_flight(1)
            .record_ttl(Duration::from_secs(60))
    })
    .await;
    let busy_until = Instant::now() + Duration::from_secs(4);
    let busy = {
        let producer = producer.clone();
        tokio::spawn(async move {
            while Instant::now() < busy_until {
                let record = UserRecord::new("h", "hot").with_explicit_hash_key("0");
                producer.put_record(record).await.expect("accepted");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The upper half of the hash space: the other shard.
    let other = UserRecord::new("c", "cold").with_explicit_hash_key(u128::MAX.to_string());
    let receipt = producer.put_with_receipt(other).await.expect("accepted");
    let put_at = Instant::now();
    let delivered = tokio::time::timeout(Duration::from_secs(2), receipt)
        .await
        .expect("the other shard's record is sent while the busy shard still has requests")
        .expect("acknowledged");
    assert!(put_at.elapsed() < Duration::from_secs(2));
    assert_eq!(delivered.attempts, 1);
    busy.await.expect("the busy putter");
    producer.stop().await;
}

/// A record waiting for its shard's limiter still expires at its TTL: a large record before it
/// leaves the byte bucket seconds in debt, and the wait for the bucket does not outlast the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_held_back_by_its_limiter_expires_at_its_ttl() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("limited", 1).await;
    let producer = producer_for(&kinesis.endpoint, "limited", |b| {
        // 10% of a shard's 1 MiB/s: about 100 KiB/s.
        b.rate_limit(10)
            .aggregation(false)
            .record_ttl(Duration::from_secs(3))
    })
    .await;
    let big = || UserRecord::new(vec![7u8; 900_000], "k");
    let first = producer.put_with_receipt(big()).await.expect("accepted");
    let second = producer.put_with_receipt(big()).await.expect("accepted");
    let put_at = Instant::now();
    first.await.expect("the first goes out at once");
    let failed = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the second ends")
        .expect_err("the limiter holds it past its TTL");
    let waited = put_at.elapsed();
    assert_eq!(failed.error.kind, FailureKind::Expired);
    assert!(
        waited < Duration::from_millis(6_000),
        "expired {waited:?} after its put, with a TTL of 3 s"
    );
    producer.stop().await;
}

/// A `put` that closes a full aggregate hands it to the sender after it lets go of its shard's
/// slot. `stop` waits for that hand-over: every record accepted before `stop` is sent, none
/// fails as "the sender task is no longer running" after the failure stream has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_racing_puts_that_close_aggregates_sends_every_accepted_record() {
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("close-race", 2).await;
    for round in 0..20u64 {
        let producer = producer_for(&kinesis.endpoint, "close-race", |b| {
            b.aggregation_max_count(2)
        })
        .await;
        let failures = producer.notify_failures();
        let accepted = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let producer = producer.clone();
                let accepted = accepted.clone();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let data = vec![(i % 251) as u8; 16 * 1024];
                        if producer.put(data, format!("{t}-{i}")).await.is_err() {
                            break;
                        }
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10 + round % 7)).await;
        producer.stop().await;
        for task in tasks {
            task.await.expect("putter");
        }
        let stats = producer.stats();
        let failed = drain(failures).await;
        assert!(failed.is_empty(), "round {round}: {:?}", failed[0].error);
        assert_eq!(stats.failures_unobserved, 0, "round {round}");
        assert_eq!(
            stats.user_records_put,
            accepted.load(Ordering::SeqCst),
            "round {round}"
        );
    }
}

/// A record too big to share an aggregate whose data starts with the aggregate magic (a KPL
/// aggregate forwarded from another stream, say) goes out as an aggregate of one, so every
/// reader gives it back as it was put; one too big even for that is refused at `put`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_record_that_looks_like_an_aggregate_is_read_back_as_it_was_put() {
    use kinesis_producer::aggregation::{AggregateBuilder, AggregateLimits, MAGIC};
    use kinesis_producer::Deaggregator;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("magic", 1).await;
    let producer = producer_for(&kinesis.endpoint, "magic", |b| b).await;
    let failures = producer.notify_failures();
    // Magic bytes and 60 KB of zeros: no aggregate, but a reader would try one.
    let fake = [&MAGIC[..], &[0u8; 60_000][..]].concat();
    // A real aggregate of 60 KB, whose inner records belong to other keys.
    let mut builder = AggregateBuilder::new(AggregateLimits {
        max_size: 1 << 20,
        max_count: usize::MAX,
    });
    for i in 0..600 {
        builder
            .try_push(UserRecord::new(vec![b'x'; 100], format!("inner-{i}")))
            .unwrap();
    }
    let forwarded = builder.finish().unwrap().data.to_vec();
    assert!(forwarded.starts_with(&MAGIC) && forwarded.len() > 51_200);
    producer.put(fake.clone(), "fake").await.unwrap();
    producer.put(forwarded.clone(), "forwarded").await.unwrap();
    let too_big = [&MAGIC[..], &vec![0u8; (1 << 20) - 20][..]].concat();
    let refused = producer.put(too_big, "k").await.unwrap_err();
    assert!(
        matches!(
            refused.reason(),
            PutRefusal::Invalid(RecordProblem::TooLargeToWrap { .. })
        ),
        "{refused}"
    );
    producer.stop().await;
    assert!(drain(failures).await.is_empty());

    let strict: Vec<_> = kinesis.read_all("magic").await;
    let data: Vec<&[u8]> = strict.iter().map(|r| &r.record.data[..]).collect();
    assert_eq!(data, [&fake[..], &forwarded[..]]);
    let kcl = Deaggregator::kcl(0, u128::MAX);
    let mut read = Vec::new();
    for raw in kinesis.read_raw("magic").await {
        read.extend(kcl.deaggregate(raw.data, &raw.partition_key).unwrap());
    }
    let data: Vec<&[u8]> = read.iter().map(|r| &r.data[..]).collect();
    assert_eq!(data, [&fake[..], &forwarded[..]]);
}
