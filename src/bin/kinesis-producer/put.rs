//! `kinesis-producer put`: ships stdin to a Kinesis stream through the producer, one record per
//! line.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use kinesis_producer::{MetricsSnapshot, Producer, UserRecord};

use crate::{report, StreamArgs, RECORD_SIZE_LIMIT};

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

/// The longest line read: the largest record Kinesis takes (10 MiB), as JSON with its data in
/// base64 (a third more) and room for the keys. A longer line is skipped, never held whole.
const LINE_MAX: usize = RECORD_SIZE_LIMIT / 3 * 4 + (64 << 10);

/// Reads one line (with its line ending) into `line`, keeping at most `cap` bytes: a longer
/// line is read to its end and dropped. `None` at the end of the input; `Some(false)` for a
/// line that was too long.
fn read_line_within(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<Option<bool>> {
    let mut read_any = false;
    let mut fits = true;
    loop {
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(read_any.then_some(fits));
        }
        read_any = true;
        let (chunk, ends) = match memchr::memchr(b'\n', available) {
            Some(end) => (&available[..=end], true),
            None => (available, false),
        };
        if fits && line.len() + chunk.len() <= cap {
            line.extend_from_slice(chunk);
        } else {
            fits = false;
            line.clear();
        }
        let used = chunk.len();
        input.consume(used);
        if ends {
            return Ok(Some(fits));
        }
    }
}

/// Reads stdin on this (plain) thread and puts each record, blocking while the backlog is full.
fn read_input(producer: &Producer, args: &PutArgs, tally: &InputTally) -> std::io::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let Some(fits) = read_line_within(&mut stdin, &mut line, LINE_MAX)? else {
            return Ok(());
        };
        number += 1;
        tally.lines.fetch_add(1, Ordering::Relaxed);
        if !fits {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            report(serde_json::json!({
                "line": number,
                "error": "refused",
                "reason": format!("the line is longer than {LINE_MAX} bytes, more than any record can hold"),
            }));
            continue;
        }
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
                UserRecord::new(std::mem::take(&mut line), key)
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
    // The reader is a plain thread that says when it is done, not a blocking task: on a signal
    // the command ends while the thread may still wait on stdin, and the runtime's shutdown
    // would wait for a blocking task.
    let (done, read) = tokio::sync::oneshot::channel();
    {
        let (producer, tally) = (producer.clone(), Arc::clone(&tally));
        std::thread::spawn(move || {
            let _ = done.send(read_input(&producer, &args, &tally));
        });
    }
    // SIGINT or SIGTERM: stop as at the end of the input, so that everything already read is
    // sent or reported failed; lines read after that are reported refused.
    let read = tokio::select! {
        read = read => Some(read),
        signal = crate::shutdown_signal() => {
            report(serde_json::json!({"event": "stopping", "signal": signal}));
            None
        }
    };
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
        "records={} bytes={} kinesis_records={} requests={} retries={} failures={} malformed={} refused={} lines={} seconds={:.3}",
        stats.user_records_put,
        stats.user_record_bytes_put,
        stats.kinesis_records_put,
        stats.requests,
        stats.entry_retries,
        failures,
        get(&tally.malformed),
        get(&tally.refused),
        get(&tally.lines),
        started.elapsed().as_secs_f64()
    );
    match read {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => return Err(format!("reading stdin failed: {e}")),
        Some(Err(_)) => return Err("the input thread panicked".into()),
        None => return Ok(false),
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
