//! Nothing lost under faults. Each scenario puts numbered records through a fault layer
//! (`support::faults`) between the real SDK and the embedded server, stops the producer, reads
//! the stream back with the KCL's rule, and checks the invariants:
//!
//! 1. every record put ends exactly once: acknowledged (its receipt says where) or failed (its
//!    receipt and the failure stream say why), never both, never neither;
//! 2. every acknowledged record is in the stream; a record appears twice only when a fault made
//!    its outcome ambiguous (written, but not acknowledged), and never more often than the
//!    fault layer counted such records;
//! 3. with only transient faults, nothing fails.
//!
//! A failing run prints its seed; `KP_FAULT_SEED=<seed>` replays the same fault schedule.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kinesis_producer::{Producer, Receipt, UserRecord};
use support::drain;
use support::faults::{Fault, FaultProxy, Schedule};
use support::local_kinesis::{client_for, LocalKinesis};

const TIMEOUT: Duration = Duration::from_millis(800);

struct Scenario {
    name: &'static str,
    seed: u64,
    rate: f64,
    faults: Vec<Fault>,
    putters: usize,
    records: usize,
    /// Split a shard once half of the records are put.
    reshard: bool,
}

struct Report {
    put: usize,
    acknowledged: usize,
    failed: usize,
    duplicates: usize,
    ambiguous: u64,
    seconds: f64,
}

fn id_of(data: &[u8]) -> (usize, usize) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split(':');
    let putter = parts.next().unwrap().parse().unwrap();
    let i = parts.next().unwrap().parse().unwrap();
    (putter, i)
}

async fn run(scenario: Scenario) -> Report {
    let started = Instant::now();
    let kinesis = LocalKinesis::start(false).await;
    kinesis.create_stream(scenario.name, 4).await;
    let schedule = Schedule::new(scenario.seed, scenario.rate, scenario.faults.clone());
    let proxy = FaultProxy::start(&kinesis.endpoint, schedule).await;
    let producer = Producer::builder()
        .stream_name(scenario.name)
        .client(client_for(&proxy.endpoint))
        .request_timeout(TIMEOUT)
        .retry_base_delay(Duration::from_millis(20))
        .retry_max_delay(Duration::from_millis(500))
        .record_ttl(Duration::from_secs(60))
        .stop_timeout(Duration::from_secs(60))
        .build()
        .await
        .expect("producer builds");
    let failures = drain_in_background(producer.notify_failures());

    let per_putter = scenario.records / scenario.putters;
    let mut putters = Vec::new();
    for putter in 0..scenario.putters {
        let producer = producer.clone();
        putters.push(tokio::spawn(async move {
            let mut receipts: Vec<(usize, Receipt)> = Vec::with_capacity(per_putter);
            for i in 0..per_putter {
                let mut data = format!("{putter}:{i}:").into_bytes();
                data.resize(100, b'.');
                let record = UserRecord::new(data, format!("key-{putter}-{}", i % 997));
                receipts.push((
                    i,
                    producer.put_with_receipt(record).await.expect("accepted"),
                ));
            }
            receipts
        }));
    }
    if scenario.reshard {
        while producer.stats().user_records_received < (scenario.records / 2) as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let parent = kinesis.open_shards(scenario.name).await[0].clone();
        kinesis
            .client
            .split_shard()
            .stream_name(scenario.name)
            .shard_to_split(&parent.0)
            .new_starting_hash_key((parent.1 / 2 + parent.2 / 2).to_string())
            .send()
            .await
            .expect("SplitShard");
    }
    let mut receipts = Vec::new();
    for (putter, handle) in putters.into_iter().enumerate() {
        for (i, receipt) in handle.await.expect("putter") {
            receipts.push(((putter, i), receipt));
        }
    }
    producer.stop().await;
    let streamed = failures.await.expect("failure drain");

    // 1. Every record ends exactly once.
    let mut acknowledged = HashSet::new();
    let mut failed = HashSet::new();
    for (id, receipt) in receipts {
        match tokio::time::timeout(Duration::from_secs(5), receipt).await {
            Ok(Ok(_)) => assert!(acknowledged.insert(id)),
            Ok(Err(_)) => assert!(failed.insert(id)),
            Err(_) => panic!("{}: record {id:?} has no outcome after stop", scenario.name),
        }
    }
    let put = scenario.putters * per_putter;
    assert_eq!(acknowledged.len() + failed.len(), put, "{}", scenario.name);
    let streamed_ids: HashSet<_> = streamed.iter().map(|f| id_of(f.record.data())).collect();
    assert_eq!(
        streamed_ids, failed,
        "{}: the failure stream and the receipts agree",
        scenario.name
    );
    let stats = producer.stats();
    assert_eq!(stats.user_records_put as usize, acknowledged.len());
    assert_eq!(stats.user_records_failed as usize, failed.len());
    assert_eq!(stats.user_records_pending, 0);

    // 2. Every acknowledged record is in the stream; duplicates only where ambiguous.
    let (read, _discarded) = kinesis.read_as_kcl(scenario.name).await;
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    for r in &read {
        *seen.entry(id_of(&r.record.data)).or_default() += 1;
    }
    for id in &acknowledged {
        assert!(
            seen.contains_key(id),
            "{}: acknowledged {id:?} is not in the stream",
            scenario.name
        );
    }
    assert!(seen
        .keys()
        .all(|id| acknowledged.contains(id) || failed.contains(id)));
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let ambiguous = proxy.counts.ambiguous_records.load(Ordering::Relaxed);
    assert!(
        duplicates as u64 <= ambiguous,
        "{}: {duplicates} duplicates, but only {ambiguous} records were made ambiguous",
        scenario.name
    );
    let report = Report {
        put,
        acknowledged: acknowledged.len(),
        failed: failed.len(),
        duplicates,
        ambiguous,
        seconds: started.elapsed().as_secs_f64(),
    };
    println!(
        "{}: {} put, {} acknowledged, {} failed, {} duplicates read (≤ {} ambiguous), {} entry retries, {:.1} s; {}",
        scenario.name,
        report.put,
        report.acknowledged,
        report.failed,
        report.duplicates,
        report.ambiguous,
        stats.entry_retries,
        report.seconds,
        proxy.summary()
    );
    report
}

fn drain_in_background(
    failures: kinesis_producer::FailureStream,
) -> tokio::task::JoinHandle<Vec<kinesis_producer::FailedRecord>> {
    tokio::spawn(drain(failures))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_alone_loses_nothing_and_fails_nothing() {
    let mut total = 0;
    for (n, fault) in Fault::all(TIMEOUT).into_iter().enumerate() {
        let report = run(Scenario {
            name: "alone",
            seed: 1_000 + n as u64,
            rate: 0.3,
            faults: vec![fault],
            putters: 2,
            records: 60_000,
            reshard: false,
        })
        .await;
        assert_eq!(report.failed, 0, "{fault:?}: transient faults fail nothing");
        if !fault.ambiguous() {
            assert_eq!(report.duplicates, 0, "{fault:?}");
        }
        total += report.put;
    }
    println!("{total} records through single faults");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_mixed_at_20_percent_with_8_putters_loses_nothing() {
    let report = run(Scenario {
        name: "mixed",
        seed: 7,
        rate: 0.2,
        faults: Fault::all(TIMEOUT),
        putters: 8,
        records: 320_000,
        reshard: false,
    })
    .await;
    assert_eq!(report.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_in_the_middle_of_mixed_faults_loses_nothing() {
    let report = run(Scenario {
        name: "mixed-reshard",
        seed: 11,
        rate: 0.2,
        faults: Fault::all(TIMEOUT),
        putters: 8,
        records: 200_000,
        reshard: true,
    })
    .await;
    assert_eq!(report.failed, 0);
}
