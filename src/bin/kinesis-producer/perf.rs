//! `kinesis-producer perf`: puts N generated records through the producer as fast as it takes
//! them (or at a given rate), then prints what that cost, one `key=value` figure per line:
//! CPU per record, throughput, aggregation density, peak memory, put→acknowledgement latency,
//! and the floor (see `floor.rs`) with the efficiency `floor / cpu`.
//!
//! `perf-sink` runs the null sink alone, so that other producers can be measured against the
//! same endpoint.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use bytes::Bytes;
use clap::ValueEnum;
use kinesis_producer::{
    MetricsGranularity, MetricsLevel, Producer, PutRefusal, Receipt, UserRecord,
};

use crate::floor::{self, SizeRecorder};
use crate::sink::{Sink, SinkConfig, SinkCounters};
use crate::usage;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["endpoint_url", "null_sink"])))]
pub struct PerfArgs {
    /// User records to put.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Data bytes per record.
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Partition keys: a random UUID per record (the default partitioner), a random explicit
    /// hash key per record (with a one-letter partition key), or one fixed key.
    #[arg(long, value_enum, default_value_t = Keys::Random)]
    keys: Keys,
    /// Shards of the null sink's stream (with --endpoint-url the stream decides).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Threads putting records, each a share of them.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Sends to this endpoint (a real or local Kinesis; credentials from the environment).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// Starts the null sink in this process and sends to it.
    #[arg(long)]
    null_sink: bool,
    /// Stream name (with --endpoint-url).
    #[arg(long, default_value = "perf")]
    stream_name: String,
    /// AWS region (default with --null-sink: us-east-1; else from the environment).
    #[arg(long)]
    region: Option<String>,
    /// Sends one Kinesis record per user record instead of KPL aggregates.
    #[arg(long)]
    no_aggregation: bool,
    /// Gives each record data of its own, allocated and filled by the put thread as a
    /// service's serializer would (that work counts in the CPU figures), instead of one static
    /// buffer that every record shares and whose hand-over costs nothing.
    #[arg(long)]
    owned_data: bool,
    /// Total put rate in records/s, paced evenly (default: as fast as the producer takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Per-shard rate limit in percent of the shard limits; 0 (the default here) turns the
    /// limiter off so that it does not pace the measurement.
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Measures put→acknowledgement latency on every K-th record (through a receipt); 0: none.
    /// Timing a record costs about 2.5 µs (its receipt, and the task that awaits it), counted
    /// in the CPU figures: one in 1,000 adds about 2.5 ns per record.
    #[arg(long, default_value_t = 1_000)]
    latency_every: u64,
    /// The producer's record_max_buffered_time, in milliseconds.
    #[arg(long)]
    record_max_buffered_time_ms: Option<u64>,
    /// The producer's max_backlog_records.
    #[arg(long)]
    max_backlog_records: Option<usize>,
    /// The producer's max_backlog_bytes.
    #[arg(long)]
    max_backlog_bytes: Option<usize>,
    /// The producer's max_in_flight.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// The producer's record_ttl, in milliseconds.
    #[arg(long)]
    record_ttl_ms: Option<u64>,
    /// The producer's request_timeout, in milliseconds.
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// The producer's aggregation_max_count: user records per aggregate at most (to measure
    /// what a Kinesis record costs at a given aggregation density).
    #[arg(long)]
    aggregation_max_count: Option<usize>,
    /// The producer's aggregation_max_size: bytes per aggregate at most.
    #[arg(long)]
    aggregation_max_size: Option<usize>,
    /// The producer's collection_max_size: bytes per PutRecords request at most.
    #[arg(long)]
    collection_max_size: Option<usize>,
    /// The producer's metrics_level.
    #[arg(long, value_enum, default_value_t = Level::Detailed)]
    metrics_level: Level,
    /// The producer's metrics_granularity.
    #[arg(long, value_enum, default_value_t = Granularity::Shard)]
    metrics_granularity: Granularity,
    /// With --null-sink: stop answering PutRecords after this many of them (a stalled
    /// endpoint), to measure memory while nothing is acknowledged.
    #[arg(long, requires = "null_sink")]
    sink_stall_after: Option<u64>,
    /// With --null-sink: hold each PutRecords answer back this many milliseconds, as the round
    /// trip to a real endpoint would (to measure what in-flight limits, such as order mode's
    /// one request per shard, cost in throughput).
    #[arg(long, requires = "null_sink")]
    sink_delay_ms: Option<u64>,
    /// The producer's preserve_order: one Kinesis record per shard outstanding at a time.
    #[arg(long)]
    preserve_order: bool,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Keys {
    Random,
    Ehk,
    Fixed,
}

/// `--metrics-level`: the library's [`MetricsLevel`].
#[derive(Clone, Copy, ValueEnum)]
enum Level {
    None,
    Summary,
    Detailed,
}

/// `--metrics-granularity`: the library's [`MetricsGranularity`].
#[derive(Clone, Copy, ValueEnum)]
enum Granularity {
    Global,
    Stream,
    Shard,
}

const FIXED_KEY: &str = "fixed-key";
/// Longest paced run (`--records / --rate`): ten days.
const MAX_PACED_SECONDS: f64 = 864_000.0;
/// Most put threads.
const MAX_THREADS: usize = 1_024;
/// Most shards a run or the sink models (a map of them is built up front).
const MAX_SHARDS: usize = 100_000;
/// Distinct explicit hash keys with `--keys ehk`, shared out among the put threads.
const EHK_POOL: usize = 65_536;
/// Length of a hyphenated UUID, the default partitioner's keys.
const UUID_LEN: usize = 36;

/// What the put threads share.
struct Workload {
    producer: Producer,
    data: Bytes,
    owned_data: bool,
    keys: Keys,
    rate: Option<f64>,
    latency_every: u64,
    started: Instant,
    latencies: Mutex<Vec<Duration>>,
    refused: AtomicU64,
}

pub async fn run(args: PerfArgs) -> Result<bool, String> {
    if args.records == 0 || args.threads == 0 || args.shards == 0 {
        return Err("--records, --threads and --shards must be at least 1".into());
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err("--rate must be a positive number of records per second".into());
    }
    if args
        .rate
        .is_some_and(|r| args.records as f64 / r > MAX_PACED_SECONDS)
    {
        return Err(format!(
            "at --rate the run would last more than {MAX_PACED_SECONDS} seconds: raise it or put fewer --records"
        ));
    }
    if args.threads > MAX_THREADS {
        return Err(format!("--threads must be at most {MAX_THREADS}"));
    }
    if args.shards > MAX_SHARDS {
        return Err(format!("--shards must be at most {MAX_SHARDS}"));
    }
    if args.record_size > crate::RECORD_SIZE_LIMIT {
        return Err(format!(
            "--record-size must be at most {} (Kinesis' largest record, with its key)",
            crate::RECORD_SIZE_LIMIT
        ));
    }
    let sink = if args.null_sink {
        let config = SinkConfig {
            shards: args.shards,
            stall_after: args.sink_stall_after,
            answer_delay: args.sink_delay_ms.map(Duration::from_millis),
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Some(Sink::start(addr, config).map_err(|e| format!("starting the null sink: {e}"))?)
    } else {
        None
    };
    let sizes = SizeRecorder::default();
    let client = client(&args, sink.as_ref(), sizes.clone()).await;
    let mut builder = Producer::builder()
        .stream_name(&args.stream_name)
        .client(client)
        .aggregation(!args.no_aggregation)
        .preserve_order(args.preserve_order)
        .rate_limit(args.rate_limit)
        .metrics_level(match args.metrics_level {
            Level::None => MetricsLevel::None,
            Level::Summary => MetricsLevel::Summary,
            Level::Detailed => MetricsLevel::Detailed,
        })
        .metrics_granularity(match args.metrics_granularity {
            Granularity::Global => MetricsGranularity::Global,
            Granularity::Stream => MetricsGranularity::Stream,
            Granularity::Shard => MetricsGranularity::Shard,
        });
    if let Some(n) = args.aggregation_max_count {
        builder = builder.aggregation_max_count(n);
    }
    if let Some(n) = args.aggregation_max_size {
        builder = builder.aggregation_max_size(n);
    }
    if let Some(n) = args.collection_max_size {
        builder = builder.collection_max_size(n);
    }
    if let Some(ms) = args.record_max_buffered_time_ms {
        builder = builder.record_max_buffered_time(Duration::from_millis(ms));
    }
    if let Some(n) = args.max_backlog_records {
        builder = builder.max_backlog_records(n);
    }
    if let Some(n) = args.max_backlog_bytes {
        builder = builder.max_backlog_bytes(n);
    }
    if let Some(n) = args.max_in_flight {
        builder = builder.max_in_flight(n);
    }
    if let Some(ms) = args.record_ttl_ms {
        builder = builder.record_ttl(Duration::from_millis(ms));
    }
    if let Some(ms) = args.request_timeout_ms {
        builder = builder.request_timeout(Duration::from_millis(ms));
    }
    let producer = builder.build().await.map_err(|e| e.to_string())?;
    let failed = Arc::new(AtomicU64::new(0));
    let failure_counter = {
        let mut failures = producer.notify_failures();
        let failed = Arc::clone(&failed);
        // A thread of its own, as a service's failure handler would be: the runtime's threads
        // are busy sending, and reports waiting for them hold their records' memory.
        std::thread::Builder::new()
            .name("perf-failures".into())
            .spawn(move || {
                let count = async {
                    while failures.recv().await.is_some() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                };
                match tokio::runtime::Builder::new_current_thread().build() {
                    Ok(runtime) => runtime.block_on(count),
                    Err(e) => eprintln!("perf: the failure counter has no runtime: {e}"),
                }
            })
            .map_err(|e| format!("cannot start the failure counter's thread: {e}"))?
    };
    // Static bytes: handing them over costs the caller nothing (no allocation, no shared
    // reference count bouncing between the put thread and the sender), so what is measured is
    // the producer's work alone.
    let data = Bytes::from_static(Vec::leak(
        (0..args.record_size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    ));
    let mut pools: Vec<Vec<String>> = (0..args.threads as u64)
        .map(|t| ehk_pool(args.keys, t, args.threads))
        .collect();
    let workload = Arc::new(Workload {
        producer: producer.clone(),
        data: data.clone(),
        owned_data: args.owned_data,
        keys: args.keys,
        rate: args.rate,
        latency_every: args.latency_every,
        started: Instant::now(),
        latencies: Mutex::new(Vec::new()),
        refused: AtomicU64::new(0),
    });

    let cpu_before = usage::process_cpu_seconds();
    let started = Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let threads: Vec<_> = (0..args.threads as u64)
        .map(|t| {
            let share = share(args.records, args.threads as u64, t);
            let (workload, runtime) = (Arc::clone(&workload), runtime.clone());
            let pool = std::mem::take(&mut pools[t as usize]);
            std::thread::Builder::new()
                .name(format!("perf-put-{t}"))
                .spawn(move || runtime.block_on(put_share(&workload, share, pool)))
                .map_err(|e| format!("starting a put thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    for thread in threads {
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "a put thread panicked".to_string())?;
    }
    producer.stop().await;
    let wall = started.elapsed().as_secs_f64();
    let process_cpu = usage::process_cpu_seconds() - cpu_before;
    let _ = tokio::task::spawn_blocking(move || failure_counter.join()).await;
    let sink_report = sink.map(Sink::stop);

    let stats = producer.stats();
    let records = args.records;
    let data_bytes = u128::from(records) * args.record_size as u128;
    let sink_cpu = sink_report.map_or(0.0, |r| r.cpu_seconds);
    let sizes = std::mem::take(&mut *sizes.0.lock().unwrap());
    let recorder_cpu = sizes.recorder_cpu_ns as f64 * 1e-9;
    let cpu = (process_cpu - sink_cpu - recorder_cpu).max(0.0);
    let cpu_ns_per_record = cpu * 1e9 / records as f64;
    let key_hashes = match (args.keys, args.no_aggregation) {
        (_, true) | (Keys::Ehk, _) => 0,
        (Keys::Random, false) => records,
        (Keys::Fixed, false) => 1,
    };
    let key_len = if args.keys == Keys::Fixed {
        FIXED_KEY.len()
    } else {
        UUID_LEN
    };
    // On a thread of its own (named, so that profiles can tell it from the run).
    let floor = std::thread::Builder::new()
        .name("perf-floor".into())
        .spawn(move || floor::measure(&sizes, key_hashes, key_len, &data))
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the floor thread panicked".to_string())?;
    let floor_ns_per_record = floor.total_ns() as f64 / records as f64;
    let mut latencies = std::mem::take(&mut *workload.latencies.lock().unwrap());
    latencies.sort_unstable();
    let percentile = |p: usize| {
        latencies
            .get((latencies.len().saturating_sub(1)) * p / 100)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let failed = failed.load(Ordering::Relaxed);
    let refused = workload.refused.load(Ordering::Relaxed);
    let per = |n: u64, d: u64| n as f64 / d.max(1) as f64;
    let lines: Vec<(&str, String)> = vec![
        ("records", records.to_string()),
        ("record_size", args.record_size.to_string()),
        ("bytes", data_bytes.to_string()),
        (
            "keys",
            args.keys.to_possible_value().unwrap().get_name().to_owned(),
        ),
        ("shards", producer.shard_map().len().to_string()),
        ("threads", args.threads.to_string()),
        ("aggregation", (!args.no_aggregation).to_string()),
        ("owned_data", args.owned_data.to_string()),
        ("preserve_order", args.preserve_order.to_string()),
        ("sink_delay_ms", args.sink_delay_ms.unwrap_or(0).to_string()),
        ("acknowledged", stats.user_records_put.to_string()),
        ("failed", failed.to_string()),
        ("refused", refused.to_string()),
        ("wall_seconds", format!("{wall:.3}")),
        ("cpu_seconds", format!("{cpu:.3}")),
        ("process_cpu_seconds", format!("{process_cpu:.3}")),
        ("sink_cpu_seconds", format!("{sink_cpu:.3}")),
        ("recorder_cpu_seconds", format!("{recorder_cpu:.6}")),
        ("cpu_ns_per_record", format!("{cpu_ns_per_record:.0}")),
        (
            "records_per_second",
            format!("{:.0}", records as f64 / wall),
        ),
        (
            "mb_per_second",
            format!("{:.2}", data_bytes as f64 / wall / 1e6),
        ),
        ("kinesis_records", stats.kinesis_records_put.to_string()),
        ("requests", stats.requests.to_string()),
        (
            "user_records_per_kinesis_record",
            format!(
                "{:.1}",
                per(stats.user_records_put, stats.kinesis_records_put)
            ),
        ),
        (
            "user_records_per_request",
            format!("{:.1}", per(stats.user_records_put, stats.requests)),
        ),
        (
            "puts_found_backlog_full",
            stats.puts_found_backlog_full.to_string(),
        ),
        ("reliefs", stats.reliefs.to_string()),
        (
            "kinesis_records_joined",
            stats.kinesis_records_joined.to_string(),
        ),
        ("peak_rss_bytes", usage::peak_rss_bytes().to_string()),
        ("latency_samples", latencies.len().to_string()),
        ("latency_p50_ms", format!("{:.1}", percentile(50))),
        ("latency_p99_ms", format!("{:.1}", percentile(99))),
        ("latency_max_ms", format!("{:.1}", percentile(100))),
        (
            "floor_md5_aggregates_ns_per_record",
            per_record(floor.md5_aggregates_ns, records),
        ),
        (
            "floor_md5_keys_ns_per_record",
            per_record(floor.md5_keys_ns, records),
        ),
        (
            "floor_sha256_bodies_ns_per_record",
            per_record(floor.sha256_bodies_ns, records),
        ),
        (
            "floor_base64_ns_per_record",
            per_record(floor.base64_blobs_ns, records),
        ),
        ("floor_ns_per_record", format!("{floor_ns_per_record:.0}")),
        (
            "efficiency",
            format!("{:.3}", floor_ns_per_record / cpu_ns_per_record),
        ),
        // What the producer spends beyond the floor: unlike the ratio, it does not rise when
        // a floor function gets slower or fall when one gets faster.
        (
            "beyond_floor_ns_per_record",
            format!("{:.0}", cpu_ns_per_record - floor_ns_per_record),
        ),
    ];
    let mut out = String::new();
    for (key, value) in lines {
        out.push_str(&format!("{key}={value}\n"));
    }
    if let Some(report) = sink_report {
        out.push_str(&format!(
            "sink_put_records_requests={}\nsink_entries={}\nsink_stalled_requests={}\n",
            report.put_records_requests, report.entries, report.stalled_requests
        ));
    }
    print!("{out}");
    Ok(stats.user_records_put == records && failed == 0 && refused == 0)
}

fn per_record(ns: u64, records: u64) -> String {
    format!("{:.0}", ns as f64 / records as f64)
}

/// Thread `t`'s records out of `n` split over `threads`.
fn share(n: u64, threads: u64, t: u64) -> std::ops::Range<u64> {
    let at = |t: u64| (u128::from(n) * u128::from(t) / u128::from(threads)) as u64;
    at(t)..at(t + 1)
}

/// A client for the null sink (fixed credentials, us-east-1) or for --endpoint-url (the
/// environment's credentials), with the size recorder the floor needs.
async fn client(
    args: &PerfArgs,
    sink: Option<&Sink>,
    sizes: SizeRecorder,
) -> aws_sdk_kinesis::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(sink) = sink {
        loader = loader
            .endpoint_url(&sink.endpoint)
            .credentials_provider(Credentials::new("perf", "perf", None, None, "perf"))
            .region(Region::new(
                args.region.clone().unwrap_or_else(|| "us-east-1".into()),
            ));
    } else {
        if let Some(url) = &args.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(region) = &args.region {
            loader = loader.region(Region::new(region.clone()));
        }
    }
    let config = aws_sdk_kinesis::config::Builder::from(&loader.load().await)
        .interceptor(sizes)
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

/// Puts records `share` of the run from this thread.
async fn put_share(work: &Workload, share: std::ops::Range<u64>, ehk_pool: Vec<String>) {
    // One collector per thread awaits the receipts in put order, so that timing a record costs
    // one channel send, not a task of its own (and the wake-ups that go with it). A receipt that
    // resolves while an older one is still pending is seen when its turn comes: the figures can
    // only err on the long side.
    let (receipts, mut pending) = tokio::sync::mpsc::unbounded_channel::<(Instant, Receipt)>();
    let collector = tokio::spawn(async move {
        let mut measured = Vec::new();
        while let Some((put_at, receipt)) = pending.recv().await {
            if receipt.await.is_ok() {
                measured.push(put_at.elapsed());
            }
        }
        measured
    });
    let mut key_state = share.start ^ 0x2545_F491_4F6C_DD1D;
    // Records until the next timed one: a countdown, not `i % latency_every`, whose division
    // (about 10 ns here) would count as the producer's CPU.
    let first_timed = match work.latency_every {
        0 => u64::MAX,
        every => (every - share.start % every) % every,
    };
    let mut until_timed = first_timed;
    for i in share {
        if let Some(rate) = work.rate {
            let due = work.started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let data = if work.owned_data {
            Bytes::from(work.data.to_vec())
        } else {
            work.data.clone()
        };
        let record = match work.keys {
            Keys::Random => None,
            Keys::Fixed => Some(UserRecord::new(data.clone(), FIXED_KEY)),
            Keys::Ehk => {
                let ehk = ehk_pool[i as usize % ehk_pool.len()].clone();
                Some(UserRecord::new(data.clone(), "k").with_explicit_hash_key(ehk))
            }
        };
        let timed = until_timed == 0;
        until_timed = match until_timed {
            0 => work.latency_every.max(1) - 1,
            left => left - 1,
        };
        let outcome = if timed {
            // A timed record needs a key of its own to carry a receipt; a random one from
            // splitmix, like the default partitioner's (`Uuid::new_v4` would ask the kernel, a
            // system call `perf` would count as the producer's).
            let record = record.unwrap_or_else(|| {
                let key = uuid::Uuid::from_u64_pair(
                    next_random(&mut key_state),
                    next_random(&mut key_state),
                );
                UserRecord::new(data, key.to_string())
            });
            let put_at = Instant::now();
            work.producer
                .put_with_receipt(record)
                .await
                .map(|receipt| drop(receipts.send((put_at, receipt))))
        } else {
            match record {
                Some(record) => work.producer.put_record(record).await,
                None => work.producer.put_data(data).await,
            }
        };
        if let Err(error) = outcome {
            work.refused.fetch_add(1, Ordering::Relaxed);
            if !matches!(error.reason(), PutRefusal::Stopped) {
                eprintln!(
                    "kinesis-producer perf: record {i} refused: {}",
                    error.reason()
                );
            }
        }
    }
    drop(receipts);
    let measured = collector.await.unwrap_or_default();
    work.latencies.lock().unwrap().extend(measured);
}

/// A put thread's explicit hash keys with `--keys ehk`, made before the clock starts: writing a
/// 128-bit number in decimal is the caller's work, not the producer's, and would cost a tenth
/// of what is measured. Random keys, spread evenly over any shard count: a share of
/// [`EHK_POOL`], at least 4,096, so that many threads do not hold gigabytes of keys.
fn ehk_pool(keys: Keys, thread: u64, threads: usize) -> Vec<String> {
    if keys != Keys::Ehk {
        return Vec::new();
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (thread + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..(EHK_POOL / threads.max(1)).max(4_096))
        .map(|_| {
            let high = u128::from(next_random(&mut state)) << 64;
            (high | u128::from(next_random(&mut state))).to_string()
        })
        .collect()
}

/// splitmix64: explicit hash keys spread evenly, cheaply.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(clap::Args)]
pub struct SinkArgs {
    /// Port on 127.0.0.1 (0: any free port; the endpoint is printed either way).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Shards of the stream the sink pretends to hold.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Stop answering PutRecords after this many of them.
    #[arg(long)]
    stall_after: Option<u64>,
    /// Hold each PutRecords answer back this many milliseconds (a real endpoint's round trip).
    #[arg(long)]
    answer_delay_ms: Option<u64>,
}

/// Serves until SIGINT or SIGTERM, then prints the sink's counters.
pub async fn run_sink(args: SinkArgs) -> Result<bool, String> {
    if args.shards == 0 || args.shards > MAX_SHARDS {
        return Err(format!("--shards must be 1 ..= {MAX_SHARDS}"));
    }
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, args.port))
        .await
        .map_err(|e| format!("binding 127.0.0.1:{}: {e}", args.port))?;
    let endpoint = format!(
        "http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    println!("endpoint={endpoint}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let counters = Arc::new(SinkCounters::default());
    let config = SinkConfig {
        shards: args.shards,
        stall_after: args.stall_after,
        answer_delay: args.answer_delay_ms.map(Duration::from_millis),
    };
    tokio::select! {
        _ = crate::sink::serve(listener, config, Arc::clone(&counters)) => {}
        _ = crate::shutdown_signal() => {}
    }
    let served = counters.report(0.0);
    println!(
        "put_records_requests={}\nentries={}\nstalled_requests={}",
        served.put_records_requests, served.entries, served.stalled_requests
    );
    Ok(true)
}
