//! Quickstart, no AWS account needed: `cargo run --release --example quickstart`.
//!
//! Starts an embedded Kinesis (ferrokinesis) on 127.0.0.1, creates a 4-shard stream, puts
//! 1,000,000 records of 100 bytes with random partition keys, stops the producer, reads every
//! shard back, de-aggregates, and checks that each record arrived exactly once and on the shard
//! that owns its hash key. Pass a number to change the record count.

#[path = "../tests/support/local_kinesis.rs"]
mod local_kinesis;

use std::io::Write;
use std::time::{Duration, Instant};

use kinesis_producer::record::partition_key_hash;
use kinesis_producer::Producer;

const STREAM: &str = "quickstart";
const RECORD_SIZE: usize = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1_000_000,
    };
    let kinesis = local_kinesis::LocalKinesis::start(false).await;
    kinesis.create_stream(STREAM, 4).await;
    println!(
        "embedded Kinesis at {}, stream {STREAM:?} with 4 shards",
        kinesis.endpoint
    );

    let producer = Producer::builder()
        .stream_name(STREAM)
        .client(kinesis.client.clone())
        .build()
        .await?;
    let mut failures = producer.notify_failures();
    let failure_log = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(failed) = failures.recv().await {
            if n < 5 {
                eprintln!(
                    "failed: {} ({})",
                    failed.error,
                    failed.record.partition_key()
                );
            }
            n += 1;
        }
        n
    });

    let started = Instant::now();
    let mut last_report = started;
    for i in 0..count {
        // Each record carries its index, so the read-back can tell exactly which arrived.
        let mut data = vec![b'.'; RECORD_SIZE];
        data[..8].copy_from_slice(&(i as u64).to_be_bytes());
        producer.put_data(data).await?; // key: a random UUID
        if last_report.elapsed() >= Duration::from_secs(1) || i + 1 == count {
            last_report = Instant::now();
            let rate = (i + 1) as f64 / started.elapsed().as_secs_f64();
            eprint!("\rput {:>9}/{count} records ({rate:>9.0} records/s)", i + 1);
            std::io::stderr().flush()?;
        }
    }
    producer.stop().await;
    let elapsed = started.elapsed();
    eprintln!();
    let failed = failure_log.await?;
    let stats = producer.stats();

    println!("reading every shard back...");
    let read = kinesis.read_all(STREAM).await;
    let ranges = kinesis.hash_ranges(STREAM).await;
    let mut seen = vec![0u8; count];
    let mut misplaced = 0;
    for r in &read {
        let index = u64::from_be_bytes(r.record.data[..8].try_into()?) as usize;
        seen[index] = seen[index].saturating_add(1);
        let (start, end) = ranges[&r.shard_id];
        if !(start..=end).contains(&partition_key_hash(&r.record.partition_key)) {
            misplaced += 1;
        }
    }
    let missing = seen.iter().filter(|&&n| n == 0).count();
    let duplicated = seen.iter().filter(|&&n| n > 1).count();

    let secs = elapsed.as_secs_f64();
    println!("records put:                    {}", stats.user_records_put);
    println!("records failed:                 {failed}");
    println!("records read back:              {}", read.len());
    println!("missing / duplicated / on wrong shard: {missing} / {duplicated} / {misplaced}");
    println!("put → stop:                     {secs:.2} s");
    println!(
        "records/s:                      {:.0}",
        stats.user_records_put as f64 / secs
    );
    println!(
        "user records per Kinesis record: {:.1}",
        stats.user_records_put as f64 / stats.kinesis_records_put.max(1) as f64
    );
    println!(
        "user records per request:       {:.1}",
        stats.user_records_put as f64 / stats.requests.max(1) as f64
    );
    println!("PutRecords requests:            {}", stats.requests);
    if missing + duplicated + misplaced > 0 || failed > 0 {
        return Err("verification failed".into());
    }
    println!("OK: every record arrived once, on the shard that owns its hash key");
    Ok(())
}
