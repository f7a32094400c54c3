//! `kinesis-producer put`: ships stdin to a Kinesis stream through the producer, one record per
//! line.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use kinesis_producer::{MetricsSnapshot, Producer, UserRecord};

use crate::{report, StreamArgs};

#[derive(clap::Args)]
pub struct PutArgs {
    #[command(flatten)]
    stream: StreamArgs,
    /// How to read each line.
    #[arg(long, value_enum, default_value_t = Input::Lines)]
    input: Input,
    /// With --input lines: one partition key for every record (default: a random UUID each).
    #[arg(long)]
    partition_key: Option<String>,
    /// Most PutRecords requests in flight.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// How long a record may wait to be batched, in milliseconds.
    #[arg(long)]
    record_max_buffered_time_ms: Option<u64>,
    /// Sends one Kinesis record per line instead of KPL aggregates.
    #[arg(long)]
    no_aggregation: bool,
    /// Largest record (data + partition key) in bytes.
    #[arg(long)]
    max_record_size: Option<usize>,
    /// Prints the producer's metrics (the KPL's names) as one JSON object on stdout at the end.
    #[arg(long)]
    metrics: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Input {
    /// Data = the line without its line ending.
    Lines,
    /// Each line is {"partition_key": ..., "explicit_hash_key": ..., "data" | "data_base64": ...}.
    Jsonl,
}

/// Problems found in the input and at put: each is printed as a JSON line and makes the exit
/// code non-zero.
#[derive(Default)]
struct InputTally {
    lines: AtomicU64,
    malformed: AtomicU64,
    refused: AtomicU64,
}

/// Reads stdin on this (plain) thread and puts each record, blocking while the backlog is full.
fn read_input(producer: &Producer, args: &PutArgs, tally: &InputTally) -> std::io::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        if stdin.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        tally.lines.fetch_add(1, Ordering::Relaxed);
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        let record = match args.input {
            Input::Lines => {
                let key = args
                    .partition_key
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                UserRecord::new(line.clone(), key)
            }
            Input::Jsonl => match kinesis_producer::jsonl::parse_line(&line) {
                Ok(record) => record,
                Err(error) => {
                    tally.malformed.fetch_add(1, Ordering::Relaxed);
                    report(
                        serde_json::json!({"line": number, "error": "malformed input", "reason": error.to_string()}),
                    );
                    continue;
                }
            },
        };
        if let Err(error) = producer.put_blocking(record) {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            report(serde_json::json!({
                "line": number,
                "error": "refused",
                "partition_key": error.record().partition_key(),
                "reason": error.reason().to_string(),
            }));
        }
    }
}

pub async fn run(args: PutArgs) -> Result<bool, String> {
    let mut builder = Producer::builder().client(args.stream.client().await);
    builder = match (&args.stream.stream_name, &args.stream.stream_arn) {
        (Some(name), _) => builder.stream_name(name),
        (None, Some(arn)) => builder.stream_arn(arn),
        (None, None) => return Err("give --stream-name or --stream-arn".into()),
    };
    if let Some(n) = args.max_in_flight {
        builder = builder.max_in_flight(n);
    }
    if let Some(ms) = args.record_max_buffered_time_ms {
        builder = builder.record_max_buffered_time(Duration::from_millis(ms));
    }
    if let Some(size) = args.max_record_size {
        builder = builder.max_record_size(size);
    }
    let producer = builder
        .aggregation(!args.no_aggregation)
        .build()
        .await
        .map_err(|e| e.to_string())?;

    let started = Instant::now();
    let mut failures = producer.notify_failures();
    let failed = Arc::new(AtomicU64::new(0));
    let printer = {
        let failed = Arc::clone(&failed);
        tokio::spawn(async move {
            while let Some(f) = failures.recv().await {
                failed.fetch_add(1, Ordering::Relaxed);
                report(serde_json::json!({
                    "error": "failed",
                    "partition_key": f.record.partition_key(),
                    "explicit_hash_key": f.record.explicit_hash_key(),
                    "code": &*f.error.code,
                    "reason": f.error.to_string(),
                    "attempts": f.attempts,
                    "shard_id": f.shard_id.as_deref(),
                }));
            }
        })
    };
    let print_metrics = args.metrics;
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(show_progress(producer.clone(), started)));
    let tally = Arc::new(InputTally::default());
    let reader = {
        let (producer, tally) = (producer.clone(), Arc::clone(&tally));
        std::thread::spawn(move || read_input(&producer, &args, &tally))
    };
    let read = tokio::task::spawn_blocking(move || reader.join())
        .await
        .map_err(|e| e.to_string())?;
    producer.stop().await;
    let _ = printer.await;
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    if print_metrics {
        println!("{}", metrics_json(&producer.metrics()));
    }

    let stats = producer.stats();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let failures = failed.load(Ordering::Relaxed);
    eprintln!(
        "records={} bytes={} kinesis_records={} requests={} retries={} failures={} malformed={} refused={} seconds={:.3}",
        stats.user_records_put,
        stats.user_record_bytes_put,
        stats.kinesis_records_put,
        stats.requests,
        stats.entry_retries,
        failures,
        get(&tally.malformed),
        get(&tally.refused),
        started.elapsed().as_secs_f64()
    );
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("reading stdin failed: {e}")),
        Err(_) => return Err("the input thread panicked".into()),
    }
    Ok(get(&tally.malformed) == 0
        && get(&tally.refused) == 0
        && failures == 0
        && stats.user_records_put == get(&tally.lines))
}

/// Rewrites one status line on the terminal four times a second: records acknowledged, their
/// rate, and what is still pending.
async fn show_progress(producer: Producer, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let stats = producer.stats();
        let seconds = started.elapsed().as_secs_f64().max(1e-3);
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r{} records put, {:.0} records/s, {} pending, {} failed\x1b[K",
            stats.user_records_put,
            stats.user_records_put as f64 / seconds,
            stats.user_records_pending,
            stats.user_records_failed
        );
        let _ = stderr.flush();
    }
}

/// The metrics snapshot as one JSON object: `{"metrics": [{name, unit, dimensions, count, sum,
/// min, max}, …]}`.
pub fn metrics_json(snapshot: &MetricsSnapshot) -> serde_json::Value {
    let metrics: Vec<_> = snapshot
        .metrics
        .iter()
        .map(|m| {
            let dimensions: serde_json::Map<_, _> = m
                .dimensions
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.clone().into()))
                .collect();
            serde_json::json!({
                "name": m.name.as_str(),
                "unit": m.name.unit().as_str(),
                "dimensions": dimensions,
                "count": m.statistics.count,
                "sum": m.statistics.sum,
                "min": m.statistics.min,
                "max": m.statistics.max,
            })
        })
        .collect();
    serde_json::json!({ "metrics": metrics })
}
