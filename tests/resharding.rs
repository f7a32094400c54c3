//! Resharding under load, per-shard rate limiting and order mode, against the embedded server
//! through the real SDK.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kinesis_producer::deaggregate;
use kinesis_producer::record::partition_key_hash;
use support::local_kinesis::{count_by_index, LocalKinesis, RawRecord, ReadRecord};
use support::{drain, producer_for};

/// Reads user records whose data start with `key:seq:` from Kinesis records in shard and
/// sequence-number order, asserts that each key's numbers strictly increase, and counts them.
fn count_in_order(raw: &[RawRecord]) -> usize {
    let mut last: HashMap<usize, i64> = HashMap::new();
    let mut count = 0;
    for r in raw {
        for user in deaggregate(r.data.clone(), &r.partition_key).unwrap() {
            let text = String::from_utf8_lossy(&user.data).into_owned();
            let mut parts = text.split(':');
            let key: usize = parts.next().unwrap().parse().unwrap();
            let seq: i64 = parts.next().unwrap().parse().unwrap();
            let previous = last.insert(key, seq).unwrap_or(-1);
            assert!(seq > previous, "key {key}: {seq} after {previous}");
            count += 1;
        }
    }
    count
}

/// Asserts that the numbers of each key's records (data `key:seq:…`), in the order a KCL
/// consumer reads them, strictly increase.
fn assert_each_key_increases(delivered: &[ReadRecord]) {
    let mut last: HashMap<usize, i64> = HashMap::new();
    for read in delivered {
        let text = String::from_utf8_lossy(&read.record.data).into_owned();
        let mut parts = text.split(':');
        let key: usize = parts.next().unwrap().parse().unwrap();
        let seq: i64 = parts.next().unwrap().parse().unwrap();
        let previous = last.insert(key, seq).unwrap_or(-1);
        assert!(
            seq > previous,
            "key {key}: {seq} after {previous} (read from {})",
            read.shard_id
        );
    }
}

/// A shard as a ListShards answer lists an open one (no ending sequence number).
fn listed_open((id, start, end): &(String, u128, u128)) -> serde_json::Value {
    serde_json::json!({
        "ShardId": id,
        "HashKeyRange": {
            "StartingHashKey": start.to_string(),
            "EndingHashKey": end.to_string(),
        },
        "SequenceNumberRange": {"StartingSequenceNumber": "0"},
    })
}

/// Puts `rounds` rounds of one 100-byte record (`key:seq:…`, partition key `k{key}`) for each
/// of `keys` keys, pausing 20 ms between rounds; gives the number put.
async fn put_rounds(producer: &kinesis_producer::Producer, keys: usize, rounds: usize) -> usize {
    for seq in 0..rounds {
        for key in 0..keys {
            let mut data = format!("{key}:{seq}:").into_bytes();
            data.resize(100, b'.');
            let record = kinesis_producer::UserRecord::new(data, format!("k{key}"));
            producer.put_record(record).await.expect("accepted");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    keys * rounds
}

async fn reshard(kinesis: &LocalKinesis, stream: &str, shards: i32) {
    kinesis
        .client
        .update_shard_count()
        .stream_name(stream)
        .target_shard_count(shards)
        .scaling_type(aws_sdk_kinesis::types::ScalingType::UniformScaling)
        .send()
        .await
        .expect("UpdateShardCount");
    kinesis.wait_active(stream).await;
}

/// Splits the stream's first open shard (by starting hash key) in half, and waits for it.
async fn split_first_shard(kinesis: &LocalKinesis, stream: &str) {
    let open = kinesis.open_shards(stream).await;
    let (first, start, end) = open[0].clone();
    kinesis
        .client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(&first)
        .new_starting_hash_key((start + (end - start) / 2).to_string())
        .send()
        .await
        .expect("SplitShard");
    kinesis.wait_active(stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_loses_nothing_and_a_kcl_reader_sees_every_record() {
    const RECORDS: u32 = 500_000;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("reshard", 4).await;
    let producer = producer_for(&kinesis.endpoint, "reshard", |b| {
        b.shard_map_refresh_interval(Duration::from_secs(2))
    })
    .await;
    let failures = producer.notify_failures();
    let putting = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for i in 0..RECORDS {
                producer
                    .put(
                        format!("{i:08}").into_bytes(),
                        format!("key-{}", i % 10_007),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    // Reshape the stream while records flow: 4 → 8 → 3, then a split and a merge.
    let stats = || producer.stats().user_records_received;
    wait_until(|| stats() >= 60_000).await;
    reshard(&kinesis, "reshard", 8).await;
    wait_until(|| stats() >= 180_000).await;
    reshard(&kinesis, "reshard", 3).await;
    wait_until(|| stats() >= 300_000).await;
    split_first_shard(&kinesis, "reshard").await;
    wait_until(|| stats() >= 400_000).await;
    let open = kinesis.open_shards("reshard").await;
    kinesis
        .client
        .merge_shards()
        .stream_name("reshard")
        .shard_to_merge(&open[1].0)
        .adjacent_shard_to_merge(&open[2].0)
        .send()
        .await
        .unwrap();
    kinesis.wait_active("reshard").await;
    putting.await.unwrap();
    producer.stop().await;

    assert!(drain(failures).await.is_empty(), "nothing failed");
    let stats = producer.stats();
    assert_eq!(stats.user_records_put, u64::from(RECORDS));
    assert!(stats.shard_map_refreshes >= 4, "{stats:?}");
    assert_eq!(
        producer.shard_map().len(),
        kinesis.open_shards("reshard").await.len()
    );

    let (delivered, discarded) = kinesis.read_as_kcl("reshard").await;
    let seen = count_by_index(&delivered, RECORDS as usize);
    let missing = seen.iter().filter(|n| **n == 0).count();
    let duplicates: u64 = seen.iter().map(|n| u64::from(n.saturating_sub(1))).sum();
    assert_eq!(missing, 0, "a KCL reader gets every record");
    assert!(
        duplicates <= stats.records_resent_after_reshard,
        "duplicates ({duplicates}) only where counted ({stats:?})"
    );
    println!(
        "reshard under load: {} aggregates thrown away by the KCL rule, {} records re-sent, {duplicates} duplicates seen, {} map reloads",
        discarded, stats.records_resent_after_reshard, stats.shard_map_refreshes
    );
}

async fn wait_until(mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(120), "timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` partition keys that `open` routes to shards other than `shard`.
fn keys_off_shard(open: &[(String, u128, u128)], shard: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("cold-{i}"))
        .filter(|k| shard_of(open, k) != shard)
        .take(n)
        .collect()
}

/// The shard owning a partition key, among `open`.
fn shard_of(open: &[(String, u128, u128)], key: &str) -> String {
    let hash = partition_key_hash(key);
    open.iter()
        .find(|(_, start, end)| (*start..=*end).contains(&hash))
        .map(|s| s.0.clone())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_limited_locally_while_other_shards_keep_their_pace() {
    let kinesis = LocalKinesis::start(true).await; // the server enforces 1 MiB/s per shard
    kinesis.create_stream("hot", 4).await;
    let open = kinesis.open_shards("hot").await;
    let producer = producer_for(&kinesis.endpoint, "hot", |b| b).await;
    let failures = producer.notify_failures();
    // 4 MiB for one key: four seconds of that shard's capacity.
    let hot_shard = shard_of(&open, "hot-key");
    let started = Instant::now();
    let hot = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for i in 0..4_096 {
                producer.put(vec![b'h'; 1_000], "hot-key").await.unwrap();
                if i % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile, a trickle on keys of the other shards.
    let cold_keys = keys_off_shard(&open, &hot_shard, 50);
    for round in 0..10 {
        for key in &cold_keys {
            producer
                .put(format!("cold {round}"), key.clone())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other shards soon hold every cold record, while the hot shard is still working
    // through its backlog (read as soon as they are there, not after a fixed wait that a slow
    // machine could overrun).
    let cold_put = Instant::now();
    let deadline = cold_put + Duration::from_secs(10);
    let landed = loop {
        let landed = kinesis
            .read_all("hot")
            .await
            .iter()
            .filter(|r| r.record.data.starts_with(b"cold"))
            .count();
        if landed == 500 || Instant::now() > deadline {
            break landed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cold_took = cold_put.elapsed();
    let hot_still_busy = producer.stats().user_records_pending > 0;
    assert_eq!(landed, 500, "the other shards kept their pace");
    assert!(
        hot_still_busy,
        "the hot shard is still backlogged when the cold records are in ({cold_took:?})"
    );
    hot.await.unwrap();
    producer.stop().await;
    let hot_took = started.elapsed();
    assert!(drain(failures).await.is_empty(), "nothing lost");
    let stats = producer.stats();
    assert_eq!(stats.user_records_put, 4_096 + 500);
    assert!(
        hot_took >= Duration::from_secs(2),
        "the hot shard was held to its limit ({hot_took:?})"
    );
    println!(
        "hot key: {hot_took:?} for 4 MiB on one shard; {} entries throttled by the server, {} retried; {} requests; all cold records landed {cold_took:?} after the last was put",
        stats.throttled_entries, stats.entry_retries, stats.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_mode_keeps_each_keys_records_in_order_under_throttling() {
    let kinesis = LocalKinesis::start(true).await;
    kinesis.create_stream("ordered", 4).await;
    let producer = producer_for(&kinesis.endpoint, "ordered", |b| {
        b.preserve_order(true)
            // Above the server's limit, so that it throttles and records are retried.
            .rate_limit(400)
            // Aggregates of 600 KB: two in a second pass a shard's 1 MiB/s, however slow the
            // round trips (with 50 KB aggregates, one request at a time per shard passes it only
            // while a round trip takes under 47 ms, which a loaded machine may not keep).
            .aggregation_max_size(600_000)
            .retry_base_delay(Duration::from_millis(20))
    })
    .await;
    let failures = producer.notify_failures();
    const KEYS: usize = 20;
    const PER_KEY: usize = 800;
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let mut data = format!("{key}:{seq}:").into_bytes();
            data.resize(500, b'.');
            producer.put(data, format!("key-{key}")).await.unwrap();
        }
    }
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    let stats = producer.stats();
    assert!(
        stats.throttled_entries > 0,
        "the server throttled: {stats:?}"
    );

    // Per shard, in sequence order, each key's numbers must strictly increase.
    let raw = kinesis.read_raw("ordered").await; // sorted by shard, then sequence number
    assert_eq!(count_in_order(&raw), KEYS * PER_KEY);
    println!(
        "order mode: {} entries throttled, {} retried, order held",
        stats.throttled_entries, stats.entry_retries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_putting_to_one_shard_keep_each_keys_order_in_order_mode() {
    // Several threads fill one shard's small aggregates; an aggregate is checksummed after
    // its shard's lock is let go, while the next one fills. The shard's aggregates must still
    // reach Kinesis in the order they closed.
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("threads", 1).await;
    let producer = producer_for(&kinesis.endpoint, "threads", |b| {
        b.preserve_order(true).aggregation_max_size(4_096)
    })
    .await;
    let failures = producer.notify_failures();
    const THREADS: usize = 4;
    const PER_THREAD: usize = 5_000;
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let producer = producer.clone();
            std::thread::spawn(move || {
                for seq in 0..PER_THREAD {
                    let mut data = format!("{thread}:{seq}:").into_bytes();
                    data.resize(100, b'.');
                    let record = kinesis_producer::UserRecord::new(data, format!("t-{thread}"));
                    producer.put_blocking(record).expect("accepted");
                }
            })
        })
        .collect();
    tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| t.join().unwrap()))
        .await
        .unwrap();
    producer.stop().await;
    assert!(drain(failures).await.is_empty());

    let raw = kinesis.read_raw("threads").await; // in sequence-number order
    assert_eq!(count_in_order(&raw), THREADS * PER_THREAD);
    assert!(raw.len() > 100, "aggregates closed often: {}", raw.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_held_back_by_its_limiter_does_not_make_other_shards_send_tiny_requests() {
    let kinesis = LocalKinesis::start(true).await;
    kinesis.create_stream("backlogged", 4).await;
    let open = kinesis.open_shards("backlogged").await;
    // Unaggregated, so thousands of the hot key's records queue behind its shard's limiter.
    let producer = producer_for(&kinesis.endpoint, "backlogged", |b| {
        b.aggregation(false).rate_limit(100)
    })
    .await;
    let failures = producer.notify_failures();
    let hot_shard = shard_of(&open, "hot-key");
    let hot = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for i in 0..4_000 {
                producer.put(vec![b'h'; 100], "hot-key").await.unwrap();
                if i % 500 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cold_keys = keys_off_shard(&open, &hot_shard, 100);
    let before = producer.stats().requests;
    for round in 0..20 {
        for key in &cold_keys {
            producer
                .put(format!("cold {round}"), key.clone())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    producer.flush().await;
    let during = producer.stats().requests - before;
    hot.await.unwrap();
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    assert_eq!(producer.stats().user_records_put, 4_000 + 2_000);
    println!("2,000 records of other shards while the hot shard was backlogged: {during} requests");
    // The hot shard sends at most about 1,000 records/s in requests of its own; the cold records
    // gather into requests too, instead of leaving a few at a time.
    assert!(during < 600, "{during} requests");
}

/// The same, with a `flush` called while the hot shard is backlogged: it waits for that backlog,
/// and meanwhile the other shards still gather their records into requests (a pending flush
/// makes requests go at once only while something it waits for can be sent now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waiting_on_a_limited_shard_does_not_make_other_shards_send_tiny_requests() {
    let kinesis = LocalKinesis::start(true).await;
    kinesis.create_stream("flush-backlogged", 4).await;
    let open = kinesis.open_shards("flush-backlogged").await;
    let producer = producer_for(&kinesis.endpoint, "flush-backlogged", |b| {
        b.aggregation(false).rate_limit(100)
    })
    .await;
    let failures = producer.notify_failures();
    let hot_shard = shard_of(&open, "hot-key");
    for _ in 0..3_000 {
        producer.put(vec![b'h'; 100], "hot-key").await.unwrap();
    }
    let flushing = {
        let producer = producer.clone();
        tokio::spawn(async move { producer.flush().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cold_keys = keys_off_shard(&open, &hot_shard, 100);
    let before = producer.stats().requests;
    // A trickle: one record every 2 ms.
    for i in 0..400 {
        let key = cold_keys[i % cold_keys.len()].clone();
        producer.put(format!("cold {i}"), key).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let during = producer.stats().requests - before;
    flushing.await.unwrap();
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    assert_eq!(producer.stats().user_records_put, 3_000 + 400);
    println!("400 records of other shards, one every 2 ms, during a flush of a backlogged shard: {during} requests");
    // Gathered for up to 100 ms each: a dozen or so, not one request per record.
    assert!(during < 100, "{during} requests");
}

/// In order mode a shard sends one Kinesis record per round trip. When an acknowledgement frees
/// a shard that has its next record queued, that record goes at once, not at its deadline:
/// it has already waited a round trip, and waiting more would cost the shard throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_mode_sends_a_shards_next_record_when_the_one_before_is_answered() {
    use support::faults::{FaultProxy, Schedule};
    const ROUND_TRIP: Duration = Duration::from_millis(500);
    const BUFFERED: Duration = Duration::from_secs(5);
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("round-trips", 1).await;
    let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(1, 0.0, Vec::new())).await;
    let producer = producer_for(&proxy.endpoint, "round-trips", |b| {
        b.preserve_order(true)
            .aggregation_max_count(10)
            .record_max_buffered_time(BUFFERED)
    })
    .await;
    let failures = producer.notify_failures();
    proxy.delay_answers(Some(ROUND_TRIP));
    let put_aggregate = |first: usize| {
        let producer = producer.clone();
        async move {
            let mut receipts = Vec::new();
            for seq in first..first + 10 {
                let mut data = format!("0:{seq}:").into_bytes();
                data.resize(100, b'.');
                let record = kinesis_producer::UserRecord::new(data, "k0");
                receipts.push(producer.put_with_receipt(record).await.expect("accepted"));
            }
            receipts
        }
    };
    // An aggregate closes when a record finds it full: the 11th record closes the first ten.
    // The first aggregate goes with a flush.
    let first = put_aggregate(0).await;
    let flushing = {
        let producer = producer.clone();
        tokio::spawn(async move { producer.flush().await })
    };
    let sent = Instant::now();
    while producer.stats().requests == 0 {
        assert!(
            sent.elapsed() < BUFFERED / 2,
            "the flush sends the first aggregate"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The second fills and closes while the first is out: it waits for the answer, then goes
    // at once. (The ten records after it, the first of which closes it, wait in the aggregator
    // for the stop.)
    let put_at = Instant::now();
    let second = put_aggregate(10).await;
    let _closing = put_aggregate(20).await;
    for receipt in first {
        receipt.await.expect("acknowledged");
    }
    flushing.await.expect("flush");
    for receipt in second {
        receipt.await.expect("acknowledged");
    }
    let took = put_at.elapsed();
    producer.stop().await;
    assert!(drain(failures).await.is_empty(), "nothing failed");
    let stats = producer.stats();
    assert_eq!(stats.requests, 3, "one request per aggregate: {stats:?}");
    // Sent when the first was answered (under one round trip after it was put), answered a
    // round trip later; at its deadline it would have taken the whole buffered time.
    assert!(
        took < 2 * ROUND_TRIP + BUFFERED / 4,
        "the second aggregate was acknowledged {took:?} after it was put (round trip {ROUND_TRIP:?}, buffered time {BUFFERED:?})"
    );
    let raw = kinesis.read_raw("round-trips").await;
    assert_eq!(count_in_order(&raw), 30);
    println!("order mode, {ROUND_TRIP:?} round trips: the next aggregate was acknowledged {took:?} after it was put");
}

/// In order mode, aggregates that close at their deadline while their shard's record is out
/// queue behind it; with round trips longer than the buffered time, several do. They are
/// joined into fuller aggregates before they leave, within the aggregate limits, each key
/// still in order and every aggregate still of one shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_mode_joins_the_aggregates_a_slow_round_trip_left_queued() {
    use support::faults::{FaultProxy, Schedule};
    const MAX_SIZE: usize = 6_000;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("joined", 2).await;
    let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(1, 0.0, Vec::new())).await;
    let producer = producer_for(&proxy.endpoint, "joined", |b| {
        b.preserve_order(true)
            .record_max_buffered_time(Duration::from_millis(50))
            .aggregation_max_size(MAX_SIZE)
    })
    .await;
    let failures = producer.notify_failures();
    proxy.delay_answers(Some(Duration::from_millis(300)));
    let put = put_rounds(&producer, 16, 60).await;
    producer.stop().await;
    assert!(drain(failures).await.is_empty(), "nothing failed");
    let stats = producer.stats();
    // About six 50 ms aggregates per shard wait out each 300 ms round trip.
    assert!(
        stats.kinesis_records_joined >= 10,
        "aggregates were joined: {stats:?}"
    );
    let (delivered, discarded) = kinesis.read_as_kcl("joined").await;
    assert_eq!(
        discarded, 0,
        "every aggregate holds records of its own shard"
    );
    assert_each_key_increases(&delivered);
    assert_eq!(delivered.len(), put, "every record once");
    let raw = kinesis.read_raw("joined").await;
    let largest = raw.iter().map(|r| r.data.len()).max().unwrap_or(0);
    assert!(largest <= MAX_SIZE, "an aggregate of {largest} bytes");
    // A 50 ms aggregate of a shard holds at most three rounds of its eight keys (24 records);
    // joined, up to 6,000 bytes (about 50 of these records).
    let per_kinesis_record = put as f64 / raw.len() as f64;
    assert!(
        per_kinesis_record >= 30.0,
        "{per_kinesis_record:.1} user records per Kinesis record"
    );
    println!(
        "order mode, 300 ms round trips, 50 ms buffering: {put} records in {} Kinesis records and {} requests; {} Kinesis records joined; largest {largest} bytes",
        raw.len(),
        stats.requests,
        stats.kinesis_records_joined
    );
}

/// In order mode with round trips longer than the buffering time, a shard keeps up only by
/// joining the aggregates that queue behind its record in flight. After an outage longer than
/// half the TTL the queue's front is old; it must still be joined with what follows, or the
/// shard sends one small aggregate per round trip, falls further behind at every one, and the
/// records it gets from then on keep expiring queued (before the fix: 1,232 of 1,680 records
/// failed here, none joined).
/// Joining still keeps each record at least half its TTL: no Kinesis record holds user records
/// put more than half a TTL apart (plus a buffering time and some slack), although the size
/// limit would let the first one after the outage hold all the outage's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_mode_catches_up_after_an_outage_longer_than_half_the_ttl() {
    use support::faults::{Fault, FaultProxy, Schedule};
    const TTL: Duration = Duration::from_secs(6);
    const OUTAGE: Duration = Duration::from_millis(3_600);
    const PUTTING: Duration = Duration::from_secs(9);
    const KEYS: usize = 4;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("catch-up", 1).await;
    // Every request refused until healed; every answer held 200 ms, four times the buffering.
    let proxy = FaultProxy::start(
        &kinesis.endpoint,
        Schedule::new(1, 1.0, vec![Fault::Refuse(503, "ServiceUnavailable")]),
    )
    .await;
    proxy.delay_answers(Some(Duration::from_millis(200)));
    let producer = producer_for(&proxy.endpoint, "catch-up", |b| {
        b.preserve_order(true)
            .rate_limit(0)
            .record_max_buffered_time(Duration::from_millis(50))
            .record_ttl(TTL)
            .retry_base_delay(Duration::from_millis(100))
            .retry_max_delay(Duration::from_millis(200))
            .aggregation_max_size(1_000_000)
    })
    .await;
    let failures = producer.notify_failures();
    let started = Instant::now();
    let mut put = 0;
    for seq in 0.. {
        if started.elapsed() >= PUTTING {
            break;
        }
        if started.elapsed() >= OUTAGE {
            proxy.heal();
        }
        for key in 0..KEYS {
            let put_ms = started.elapsed().as_millis();
            let mut data = format!("{key}:{seq}:{put_ms}:").into_bytes();
            data.resize(100, b'.');
            let record = kinesis_producer::UserRecord::new(data, format!("k{key}"));
            producer.put_record(record).await.expect("accepted");
            put += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    producer.stop().await;
    let failed = drain(failures).await;
    let stats = producer.stats();
    println!(
        "order mode after a {OUTAGE:?} outage (TTL {TTL:?}, 200 ms round trips): {put} put, {} failed, {} Kinesis records joined",
        failed.len(),
        stats.kinesis_records_joined
    );
    assert!(
        failed.is_empty(),
        "{} of {put} records failed, the first {:?}",
        failed.len(),
        failed.first()
    );
    assert!(stats.kinesis_records_joined > 0, "{stats:?}");
    // Refusals write nothing and the held answers come well within the request timeout: each
    // record once, in order.
    let delivered = kinesis.read_all("catch-up").await;
    assert_eq!(delivered.len(), put, "every record once");
    assert_each_key_increases(&delivered);
    let put_ms = |data: &[u8]| -> u128 {
        let text = String::from_utf8_lossy(data).into_owned();
        text.split(':').nth(2).unwrap().parse().unwrap()
    };
    let mut widest = 0;
    for raw in kinesis.read_raw("catch-up").await {
        let times: Vec<u128> = deaggregate(raw.data.clone(), &raw.partition_key)
            .unwrap()
            .iter()
            .map(|user| put_ms(&user.data))
            .collect();
        let spread = times.iter().max().unwrap() - times.iter().min().unwrap();
        widest = widest.max(spread);
    }
    assert!(
        widest <= (TTL / 2 + Duration::from_millis(300)).as_millis(),
        "a Kinesis record holds records put {widest} ms apart"
    );
    println!("the widest Kinesis record holds records put {widest} ms apart");
}

/// A map change re-routes the records the old aggregators hold, on every shard, the ones the
/// change did not touch too. In order mode each key keeps its order through it: a `put` that
/// finds the new map waits until the older records of its shard are in the new aggregators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_across_map_changes_on_the_shards_they_did_not_touch() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("reload-order", 8).await;
    let producer = producer_for(&kinesis.endpoint, "reload-order", |b| {
        b.preserve_order(true)
            // The aggregators hold many records when the map changes.
            .record_max_buffered_time(Duration::from_secs(2))
            .shard_map_refresh_interval(Duration::from_secs(1))
    })
    .await;
    let failures = producer.notify_failures();
    let done = Arc::new(AtomicBool::new(false));
    // Probe keys 1 to 7, one on each of the shards the splits below leave alone (the first
    // shard is split again and again); the other keys fill every aggregator.
    const PROBES: usize = 8;
    let putter = |keys: std::ops::Range<usize>| {
        let (producer, done) = (producer.clone(), done.clone());
        std::thread::spawn(move || {
            let mut probes_put = 0;
            for seq in 0.. {
                for key in keys.clone() {
                    let mut data = format!("{key}:{seq}:").into_bytes();
                    data.resize(100, b'.');
                    let record = if key < PROBES {
                        probes_put += 1;
                        let hash_key = (key as u128) << 125 | 12_345;
                        kinesis_producer::UserRecord::new(data, "probe")
                            .with_explicit_hash_key(hash_key.to_string())
                    } else {
                        kinesis_producer::UserRecord::new(data, format!("k{key}"))
                    };
                    producer.put_blocking(record).expect("accepted");
                }
                if done.load(Ordering::SeqCst) {
                    return probes_put;
                }
            }
            unreachable!()
        })
    };
    let probes = putter(1..PROBES);
    let others = putter(PROBES..2_000);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        split_first_shard(&kinesis, "reload-order").await;
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    done.store(true, Ordering::SeqCst);
    let probes_put = tokio::task::spawn_blocking(move || {
        others.join().expect("putter");
        probes.join().expect("putter")
    })
    .await
    .expect("putters");
    producer.stop().await;
    assert!(drain(failures).await.is_empty());
    let stats = producer.stats();
    assert!(stats.shard_map_refreshes >= 4, "{stats:?}");
    // The probes' records, by shard and sequence number: each probe's numbers increase by one.
    let raw = kinesis.read_raw("reload-order").await;
    let mut next = [0u64; PROBES];
    for r in &raw {
        for user in deaggregate(r.data.clone(), &r.partition_key).unwrap() {
            let text = String::from_utf8_lossy(&user.data).into_owned();
            let mut parts = text.split(':');
            let key: usize = parts.next().unwrap().parse().unwrap();
            let seq: u64 = parts.next().unwrap().parse().unwrap();
            if key < PROBES {
                assert_eq!(
                    seq, next[key],
                    "probe {key}: {seq} where {} was next",
                    next[key]
                );
                next[key] += 1;
            }
        }
    }
    assert_eq!(next.iter().sum::<u64>(), probes_put as u64);
}

/// Order mode across reshards that move keys: a closed shard's records (queued, in flight,
/// retried after an injected fault, or written across the new shards and sent again) must reach
/// the shards that took over their keys ahead of any newer record of those keys. Read as a KCL
/// consumer reads (a parent before its children, aggregates outside their shard thrown away),
/// each key's numbers strictly increase and every record is there once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_across_reshards_for_the_keys_they_move() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use support::faults::{Fault, FaultProxy, Schedule};
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("moved-order", 2).await;
    // Faults that leave no doubt (nothing written), so that retries build queues in the lanes
    // and a reshard finds records queued, in flight and waiting to be retried.
    let faults = vec![
        Fault::Refuse(500, "InternalFailure"),
        Fault::Refuse(400, "ProvisionedThroughputExceededException"),
        Fault::ResetBefore,
    ];
    let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(7, 0.2, faults)).await;
    let producer = producer_for(&proxy.endpoint, "moved-order", |b| {
        b.preserve_order(true)
            .aggregation_max_count(40)
            .retry_base_delay(Duration::from_millis(50))
            .shard_map_refresh_interval(Duration::from_secs(1))
            // Room for a slow machine: a request answered after its timeout is sent again
            // (written twice), and a record past its TTL fails; either would fail the checks.
            .request_timeout(Duration::from_secs(30))
            .record_ttl(Duration::from_secs(300))
    })
    .await;
    let failures = producer.notify_failures();
    let done = Arc::new(AtomicBool::new(false));
    const KEYS: usize = 64;
    let putter = |keys: std::ops::Range<usize>| {
        let (producer, done) = (producer.clone(), done.clone());
        std::thread::spawn(move || {
            let mut put = 0usize;
            for seq in 0.. {
                for key in keys.clone() {
                    let mut data = format!("{key}:{seq}:").into_bytes();
                    data.resize(100, b'.');
                    let record = kinesis_producer::UserRecord::new(data, format!("k{key}"));
                    producer.put_blocking(record).expect("accepted");
                    put += 1;
                }
                // A pause per round keeps the rate well under what order mode sends, and the
                // volume to read back modest.
                std::thread::sleep(Duration::from_millis(5));
                if done.load(Ordering::SeqCst) {
                    return put;
                }
            }
            unreachable!()
        })
    };
    let putters = [putter(0..KEYS / 2), putter(KEYS / 2..KEYS)];
    let pause = || tokio::time::sleep(Duration::from_millis(1_500));
    pause().await;
    reshard(&kinesis, "moved-order", 4).await;
    pause().await;
    split_first_shard(&kinesis, "moved-order").await;
    pause().await;
    let open = kinesis.open_shards("moved-order").await;
    kinesis
        .client
        .merge_shards()
        .stream_name("moved-order")
        .shard_to_merge(&open[2].0)
        .adjacent_shard_to_merge(&open[3].0)
        .send()
        .await
        .expect("MergeShards");
    kinesis.wait_active("moved-order").await;
    pause().await;
    reshard(&kinesis, "moved-order", 3).await;
    pause().await;
    done.store(true, Ordering::SeqCst);
    let put: usize = tokio::task::spawn_blocking(move || {
        putters.into_iter().map(|p| p.join().expect("putter")).sum()
    })
    .await
    .expect("putters");
    producer.stop().await;
    assert!(drain(failures).await.is_empty(), "nothing failed");
    let stats = producer.stats();
    assert!(stats.shard_map_refreshes >= 4, "{stats:?}");
    assert!(stats.entry_retries > 0, "faults made retries: {stats:?}");

    // A KCL consumer reads a shard's parent before the shard; here a child's id is always
    // greater than its parent's, and `read_as_kcl` gives shards in id order.
    let (delivered, discarded) = kinesis.read_as_kcl("moved-order").await;
    assert_each_key_increases(&delivered);
    assert_eq!(delivered.len(), put, "every record once");
    println!(
        "order across reshards: {put} records, {} map reloads, {} aggregates thrown away by the KCL rule, {} records re-sent, {} retries, {} Kinesis records joined; {}",
        stats.shard_map_refreshes,
        discarded,
        stats.records_resent_after_reshard,
        stats.entry_retries,
        stats.kinesis_records_joined,
        proxy.summary()
    );
}

/// A listing taken while a stream reshards can show a parent open beside its children (its
/// pages are read one by one), or a shard on two pages. The producer leaves out a shard that a
/// listed shard names as its parent, and keeps one of a shard listed twice: no record is
/// predicted for the parent, so no answer contradicts the map, and nothing is reloaded or sent
/// again. With the parent in the map (listed after its first
/// child, it wins their tie of starting keys), every answer for that child's keys named a shard
/// other than the one predicted and made the producer reload the map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_shows_a_parent_beside_its_children_routes_by_the_children() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use support::faults::{FaultProxy, Schedule};
    let kinesis = LocalKinesis::start(false).await;
    for (stream, preserve_order) in [("stale-parent", false), ("stale-parent-order", true)] {
        kinesis.create_stream(stream, 2).await;
        let parent = kinesis.open_shards(stream).await[0].clone();
        split_first_shard(&kinesis, stream).await;
        let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(1, 0.0, Vec::new())).await;
        let stale = listed_open(&parent);
        let edited = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&edited);
        proxy.edit_listings(Some(Box::new(move |shards| {
            // An open shard listed twice, as on two pages (this server lists closed shards too).
            let open = shards
                .iter()
                .find(|s| s["SequenceNumberRange"]["EndingSequenceNumber"].is_null());
            let twice = open.expect("an open shard").clone();
            shards.push(twice);
            shards.push(stale.clone());
            counter.fetch_add(1, Ordering::SeqCst);
        })));
        let producer = producer_for(&proxy.endpoint, stream, |b| {
            b.preserve_order(preserve_order)
                .shard_map_refresh_interval(Duration::from_secs(3600))
        })
        .await;
        assert_eq!(
            producer.shard_map().len(),
            3,
            "the children and the other shard, once"
        );
        let failures = producer.notify_failures();
        let put = put_rounds(&producer, 64, 50).await;
        producer.stop().await;
        assert!(drain(failures).await.is_empty(), "nothing failed");
        assert!(
            edited.load(Ordering::SeqCst) >= 1,
            "the listing showed the parent"
        );
        let stats = producer.stats();
        assert_eq!(stats.shard_map_refreshes, 0, "no reload: {stats:?}");
        assert_eq!(stats.records_resent_after_reshard, 0, "{stats:?}");
        let (delivered, discarded) = kinesis.read_as_kcl(stream).await;
        assert_eq!(discarded, 0, "no aggregate outside its shard");
        assert_eq!(delivered.len(), put, "every record once");
        if preserve_order {
            assert_each_key_increases(&delivered);
        }
    }
}

/// A first listing can also leave keys without a shard (a shard on a page not read yet, or
/// one that opened between pages). Records of those keys go out alone, for Kinesis to route by
/// their own keys, and the first answer naming the shard the map lacks brings a reload that
/// lists it. In order mode they wait in a lane of their own, which holds every other lane while
/// it has records. Every record lands once; in order mode each key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_map_with_a_gap_is_reloaded_and_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use support::faults::{FaultProxy, Schedule};
    let kinesis = LocalKinesis::start(false).await;
    for (stream, preserve_order) in [("gap", false), ("gap-order", true)] {
        kinesis.create_stream(stream, 3).await;
        let hidden = kinesis.open_shards(stream).await[1].0.clone();
        let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(1, 0.0, Vec::new())).await;
        let first = Arc::new(AtomicBool::new(true));
        let first_listing = Arc::clone(&first);
        proxy.edit_listings(Some(Box::new(move |shards| {
            if first_listing.swap(false, Ordering::SeqCst) {
                shards.retain(|shard| shard["ShardId"] != hidden.as_str());
            }
        })));
        let producer = producer_for(&proxy.endpoint, stream, |b| {
            b.preserve_order(preserve_order)
                .shard_map_refresh_interval(Duration::from_secs(3600))
        })
        .await;
        assert!(
            !first.load(Ordering::SeqCst),
            "the first listing left a shard out"
        );
        let failures = producer.notify_failures();
        let put = put_rounds(&producer, 64, 100).await;
        producer.stop().await;
        assert!(drain(failures).await.is_empty(), "nothing failed");
        let stats = producer.stats();
        assert!(
            stats.shard_map_refreshes >= 1,
            "the map was reloaded: {stats:?}"
        );
        let (delivered, discarded) = kinesis.read_as_kcl(stream).await;
        if preserve_order {
            assert_each_key_increases(&delivered);
        }
        assert_eq!(discarded, 0, "no aggregate outside its shard");
        assert_eq!(delivered.len(), put, "every record once");
        println!(
            "{stream}: {put} records, {} map reloads, {} Kinesis records in {} requests",
            stats.shard_map_refreshes, stats.kinesis_records_put, stats.requests
        );
    }
}

/// Listings can lag behind a reshard: a split's children take writes before ListShards shows
/// them. Answers then name shards the map lacks; their records wait for a reload that names
/// them (up to three reloads), and in order mode hold their lanes meanwhile. Here the two
/// listings after the split show the stream as it was before it (reloads are a second apart):
/// every record lands once, and each key's numbers strictly increase as the KCL reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_while_listings_lag_behind_a_split() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use support::faults::{FaultProxy, Schedule};
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("lagging", 2).await;
    let before = kinesis.open_shards("lagging").await;
    let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(1, 0.0, Vec::new())).await;
    let producer = producer_for(&proxy.endpoint, "lagging", |b| {
        b.preserve_order(true)
            .aggregation_max_count(40)
            .shard_map_refresh_interval(Duration::from_secs(3600))
    })
    .await;
    let failures = producer.notify_failures();
    let putting = {
        let producer = producer.clone();
        tokio::spawn(async move { put_rounds(&producer, 64, 150).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The old shards, open, in place of whatever the server lists.
    let old: Vec<serde_json::Value> = before.iter().map(listed_open).collect();
    // Counted, not timed: with three lagging listings the waiting records would be settled
    // without the shard they landed on (sent again, ahead of newer records of their keys).
    const LAGGING: usize = 2;
    let lagged = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&lagged);
    proxy.edit_listings(Some(Box::new(move |shards| {
        if counter.fetch_add(1, Ordering::SeqCst) < LAGGING {
            *shards = old.clone();
        }
    })));
    split_first_shard(&kinesis, "lagging").await;
    let put = putting.await.expect("putter");
    producer.stop().await;
    assert!(drain(failures).await.is_empty(), "nothing failed");
    let stats = producer.stats();
    assert!(
        lagged.load(Ordering::SeqCst) > LAGGING,
        "listings lagged, then one showed the split: {stats:?}"
    );
    assert!(stats.shard_map_refreshes > LAGGING as u64, "{stats:?}");
    let (delivered, discarded) = kinesis.read_as_kcl("lagging").await;
    assert_each_key_increases(&delivered);
    assert_eq!(delivered.len(), put, "every record once");
    println!(
        "lagging listings: {put} records, {LAGGING} listings lagged, {} map reloads, {discarded} aggregates thrown away by the KCL rule, {} records re-sent",
        stats.shard_map_refreshes,
        stats.records_resent_after_reshard
    );
}

/// A map change moves the aggregator of each shard it keeps as it is, with nothing read back
/// or encoded again. What that aggregator holds still goes out at its own deadline, with no
/// `put` after the change to start a new one, and not before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_kept_across_a_map_change_goes_out_at_its_deadline() {
    use support::faults::{FaultProxy, Schedule};
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("kept", 2).await;
    let open = kinesis.open_shards("kept").await;
    let proxy = FaultProxy::start(&kinesis.endpoint, Schedule::new(1, 0.0, Vec::new())).await;
    let producer = producer_for(&proxy.endpoint, "kept", |b| {
        b.shard_map_refresh_interval(Duration::from_secs(1))
            .record_max_buffered_time(Duration::from_secs(6))
    })
    .await;
    // Until the records are in their aggregator, listings show the stream before the split.
    let before: Vec<serde_json::Value> = open.iter().map(listed_open).collect();
    proxy.edit_listings(Some(Box::new(move |shards| *shards = before.clone())));
    split_first_shard(&kinesis, "kept").await;
    let put_at = Instant::now();
    let mut receipts = Vec::new();
    for key in keys_off_shard(&open, &open[0].0, 20) {
        let record = kinesis_producer::UserRecord::new(b"kept".to_vec(), key);
        receipts.push(producer.put_with_receipt(record).await.expect("accepted"));
    }
    assert_eq!(producer.shard_map().len(), 2, "the map before the split");
    // The timer's next reload, within a second, finds the split while the records wait in
    // their aggregator (a lone aggregate closes at half the buffered time, 3 s).
    proxy.edit_listings(None);
    wait_until(|| producer.shard_map().len() == 3).await;
    let stats = producer.stats();
    assert_eq!(
        stats.user_records_put, 0,
        "still buffered at the reload: {stats:?}"
    );
    for receipt in receipts {
        let delivered = tokio::time::timeout(Duration::from_secs(15), receipt)
            .await
            .expect("sent by its deadline, with no put after the map change")
            .expect("delivered");
        assert_eq!(&*delivered.shard_id, open[1].0);
        assert!(delivered.aggregated);
    }
    let waited = put_at.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "not sent early: {waited:?}"
    );
    producer.stop().await;
}

/// Unaggregated small records on one key, against a server that enforces the shard limits:
/// throttled entries are retried and every record lands. Prints what the limiter's settings
/// cost (README, Rate limiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_records_on_one_throttled_shard_all_land() {
    let kinesis = LocalKinesis::start(true).await; // 1,000 records/s per shard
    kinesis.create_stream("small-hot", 1).await;
    let producer = producer_for(&kinesis.endpoint, "small-hot", |b| {
        b.aggregation(false).record_ttl(Duration::from_secs(120))
    })
    .await;
    let failures = producer.notify_failures();
    const RECORDS: u64 = 8_000;
    let started = Instant::now();
    for i in 0..RECORDS {
        producer.put(format!("{i:0100}"), "one key").await.unwrap();
    }
    producer.stop().await;
    let took = started.elapsed();
    assert!(drain(failures).await.is_empty(), "nothing lost");
    let stats = producer.stats();
    assert_eq!(stats.user_records_put, RECORDS);
    assert_eq!(kinesis.read_all("small-hot").await.len() as u64, RECORDS);
    // The limiter starts above the server's 1,000 records/s: the shard must have throttled, or
    // this test did not test what its name says.
    assert!(stats.throttled_entries > 0, "{stats:?}");
    println!(
        "small records on one key: {RECORDS} in {took:?}; {} entries throttled ({:.1}%), {} requests",
        stats.throttled_entries,
        stats.throttled_entries as f64 * 100.0 / RECORDS as f64,
        stats.requests
    );
}

/// A throttled record whose retry finds its shard closed is re-split under the new map; when
/// its TTL then passes before its new Kinesis record is sent, its failure still names the
/// throttling its attempt met (README, Retries and failures: "it fails with its last error"),
/// not a bare expiry. It waits for a request slot held by a request that gets no answer, and
/// fails at its TTL, not when that request times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_re_split_after_a_reshard_fails_at_its_ttl_with_its_last_error() {
    use kinesis_producer::{FailureKind, UserRecord};
    use support::faults::{Fault, FaultProxy, Schedule};
    const THROTTLED: &str = "ProvisionedThroughputExceededException";
    const TTL: Duration = Duration::from_secs(10);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(14);
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream("re-split-expiry", 1).await;
    let parent = kinesis.open_shards("re-split-expiry").await[0].0.clone();
    let proxy = FaultProxy::start(
        &kinesis.endpoint,
        Schedule::new(1, 1.0, vec![Fault::Refuse(400, THROTTLED)]),
    )
    .await;
    let producer = producer_for(&proxy.endpoint, "re-split-expiry", |b| {
        b.rate_limit(0)
            .max_in_flight(1)
            .record_ttl(TTL)
            // The retry comes 4 to 8 s after the refusal: after the reloads below (one a
            // second).
            .retry_base_delay(Duration::from_secs(8))
            .retry_max_delay(Duration::from_secs(8))
            // The request holding the one slot ends well after the record's TTL.
            .request_timeout(REQUEST_TIMEOUT)
            .shard_map_refresh_interval(Duration::from_secs(1))
    })
    .await;
    let failures = producer.notify_failures();
    let put_at = Instant::now();
    let throttled = producer
        .put_with_receipt(UserRecord::new(b"throttled".to_vec(), "a"))
        .await
        .expect("accepted");
    wait_until(|| producer.stats().entry_retries >= 1).await;
    // From here requests pass, but their answers take longer than the TTL: another record's
    // request holds the one slot in flight while the throttled record waits for its retry,
    // and frees it (timed out) only 4 s after the TTL.
    proxy.heal();
    proxy.delay_answers(Some(Duration::from_secs(60)));
    let holder = producer
        .put_with_receipt(UserRecord::new(b"holder".to_vec(), "b"))
        .await
        .expect("accepted");
    wait_until(|| {
        proxy
            .counts
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    split_first_shard(&kinesis, "re-split-expiry").await;
    let reloads = producer.stats().shard_map_refreshes;
    // Two reloads after the split: the second began after it.
    wait_until(|| producer.stats().shard_map_refreshes >= reloads + 2).await;
    let failed = throttled.await.expect_err("the record expires");
    let reported_after = put_at.elapsed();
    println!("the re-split record was reported {reported_after:?} after its put (TTL {TTL:?})");
    let retries = producer.stats().entry_retries;
    proxy.delay_answers(None);
    assert_eq!(failed.error.kind, FailureKind::Expired);
    assert_ne!(
        failed.shard_id.as_deref(),
        Some(parent.as_str()),
        "its retry found the shard closed and re-split it (retries: {retries})"
    );
    assert_eq!(&*failed.error.code, THROTTLED, "{failed:?}");
    assert_eq!(failed.attempts, 1, "{failed:?}");
    assert!(
        reported_after < TTL + Duration::from_secs(2),
        "reported {reported_after:?} after its put: at its TTL ({TTL:?}), not when the slot freed"
    );
    // The record that held the slot timed out past its own TTL.
    let held = holder
        .await
        .expect_err("the record holding the slot expires");
    assert_eq!(&*held.error.code, "Timeout", "{held:?}");
    producer.stop().await;
    let reported = drain(failures).await;
    assert_eq!(
        reported.len(),
        2,
        "the two records failed once each: {reported:?}"
    );
}
