//! The whole producer, end to end through the real SDK (JSON, base64, SigV4, HTTP), against a
//! null sink: a minimal Kinesis endpoint on 127.0.0.1 that answers ListShards,
//! DescribeStreamSummary and PutRecords (every entry succeeds, on the shard owning its hash
//! key) and stores nothing. Prints records/s for each case.
//!
//! `cargo bench --bench pipeline` (release). The sink shares the process and its 2 cores, so
//! figures compare cases with each other; they are not a ceiling.
//!
//! The "reshard" cases put at a steady pace and, halfway, the sink splits one shard (or every
//! shard): the producer learns of it from the answers, reloads its map and moves what it
//! buffers. They print the longest any `put` call took and how far behind its schedule a put
//! returned, with and without the split (`BENCH_LOG=1` also prints the producer's log line of
//! each map change, with the pass's duration).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use kinesis_producer::record::{parse_explicit_hash_key, partition_key_hash};
use kinesis_producer::{MetricsLevel, Producer, ProducerBuilder, ShardMap, ShardRange, UserRecord};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutRecordsBody {
    records: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    partition_key: String,
    explicit_hash_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct ListShardsBody {
    next_token: Option<String>,
}

/// The sink's stream: its shards now (a reshard replaces them).
type Stream = Arc<RwLock<Arc<ShardMap>>>;

async fn sink(State(stream): State<Stream>, headers: HeaderMap, body: String) -> impl IntoResponse {
    let map = Arc::clone(&stream.read().unwrap());
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let answer = match target.rsplit('.').next().unwrap_or_default() {
        "PutRecords" => {
            let body: PutRecordsBody = serde_json::from_str(&body).expect("PutRecords JSON");
            let records: Vec<_> = body
                .records
                .iter()
                .map(|e| {
                    let hash = match &e.explicit_hash_key {
                        Some(ehk) => parse_explicit_hash_key(ehk).unwrap_or(0),
                        None => partition_key_hash(&e.partition_key),
                    };
                    let shard = map.shard_for(hash).expect("covered");
                    json!({"SequenceNumber": "1", "ShardId": &*shard.shard_id})
                })
                .collect();
            json!({"FailedRecordCount": 0, "Records": records})
        }
        "ListShards" => {
            let body: ListShardsBody = serde_json::from_str(&body).unwrap_or_default();
            let from: usize = body.next_token.and_then(|t| t.parse().ok()).unwrap_or(0);
            let page: Vec<_> = map.shards()[from..]
                .iter()
                .take(1000)
                .map(|s| {
                    json!({
                        "ShardId": &*s.shard_id,
                        "HashKeyRange": {"StartingHashKey": s.start.to_string(), "EndingHashKey": s.end.to_string()},
                        "SequenceNumberRange": {"StartingSequenceNumber": "0"},
                    })
                })
                .collect();
            let next = from + page.len();
            if next < map.len() {
                json!({"Shards": page, "NextToken": next.to_string()})
            } else {
                json!({"Shards": page})
            }
        }
        _ => json!({"StreamDescriptionSummary": {
            "StreamName": "bench", "StreamARN": "arn:aws:kinesis:us-east-1:000000000000:stream/bench",
            "StreamStatus": "ACTIVE", "RetentionPeriodHours": 24, "StreamCreationTimestamp": 0,
            "EnhancedMonitoring": [], "OpenShardCount": map.len()}}),
    };
    (
        [("content-type", "application/x-amz-json-1.1")],
        answer.to_string(),
    )
}

async fn start_sink(shards: usize) -> (String, Stream) {
    let stream: Stream = Arc::new(RwLock::new(Arc::new(ShardMap::uniform(shards))));
    let app = axum::Router::new()
        .fallback(sink)
        .with_state(Arc::clone(&stream))
        .layer(DefaultBodyLimit::max(16 << 20));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (endpoint, stream)
}

/// Splits the stream's first shard, or every shard, each in two new shards with new ids, as
/// SplitShard (or UpdateShardCount to twice the count) does.
fn split_shards(stream: &Stream, every: bool) {
    // Built before the sink's answers are held up by the write lock.
    let old = stream.read().unwrap().shards().to_vec();
    let splitting = if every { old.len() } else { 1 };
    let mut shards = old[splitting..].to_vec();
    let mut next_id = old.len();
    for shard in &old[..splitting] {
        let middle = shard.start + (shard.end - shard.start) / 2;
        for (start, end) in [(shard.start, middle), (middle + 1, shard.end)] {
            shards.push(ShardRange {
                shard_id: Arc::from(format!("shardId-{next_id:012}")),
                start,
                end,
            });
            next_id += 1;
        }
    }
    let split = Arc::new(ShardMap::new(shards));
    *stream.write().unwrap() = split;
}

struct Case {
    shards: usize,
    size: usize,
    records: usize,
    label: &'static str,
    tune: fn(ProducerBuilder) -> ProducerBuilder,
    put: Put,
    /// Puts paced to this many records per second from a thread of their own (`paced_puts`).
    paced: Option<u32>,
    /// The sink splits a shard (or, with `split_all`, every shard) once this many records are
    /// put.
    split_at: Option<usize>,
    split_all: bool,
}

/// How the case puts its records.
#[derive(Clone, Copy, PartialEq)]
enum Put {
    /// `put_data`: keys from the default partitioner (random UUIDs).
    Data,
    /// `put_record` with keys made here.
    Record,
    /// `put_with_receipt` with the same keys, each receipt dropped unread.
    Receipt,
}

async fn run(case: &Case) -> f64 {
    let (endpoint, stream) = start_sink(case.shards).await;
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .build();
    let producer = (case.tune)(
        Producer::builder()
            .stream_name("bench")
            .client(aws_sdk_kinesis::Client::from_conf(config)),
    )
    .build()
    .await
    .unwrap();
    assert_eq!(producer.shard_map().len(), case.shards);
    let data = vec![b'x'; case.size];
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let (mut longest_put, mut latest) = (Duration::ZERO, Duration::ZERO);
    match case.paced {
        Some(rate) => (longest_put, latest) = paced_puts(case, &producer, &stream, rate).await,
        None => {
            for i in 0..case.records {
                let keyed = || UserRecord::new(data.clone(), format!("{:032x}", i * 7919));
                match case.put {
                    Put::Data => producer.put_data(data.clone()).await.unwrap(),
                    Put::Record => producer.put_record(keyed()).await.unwrap(),
                    Put::Receipt => drop(producer.put_with_receipt(keyed()).await.unwrap()),
                }
            }
        }
    }
    producer.stop().await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu_before;
    let stats = producer.stats();
    assert_eq!(stats.user_records_put, case.records as u64, "{stats:?}");
    let rate = case.records as f64 / secs;
    if case.paced.is_some() {
        println!(
            "{:<28} shards={:<6} records={:<8} map_reloads={} longest_put_us={} most_behind_schedule_us={} backlog_full={} resent_after_reshard={}",
            case.label,
            case.shards,
            case.records,
            stats.shard_map_refreshes,
            longest_put.as_micros(),
            latest.as_micros(),
            stats.puts_found_backlog_full,
            stats.records_resent_after_reshard,
        );
        return rate;
    }
    println!(
        "{:<28} shards={:<6} size={:<5} records={:<8} seconds={:<6.2} records_per_s={:<8.0} cpu_us_per_record={:<5.2} per_kinesis_record={:<6.1} per_request={:.0}",
        case.label,
        case.shards,
        case.size,
        case.records,
        secs,
        rate,
        cpu * 1e6 / case.records as f64,
        stats.user_records_put as f64 / stats.kinesis_records_put.max(1) as f64,
        stats.user_records_put as f64 / stats.requests.max(1) as f64,
    );
    rate
}

/// Puts the case's records at `rate` a second from a thread of its own with `put_blocking`,
/// paced by the wall clock (the runtime's timers fire late while its threads are busy, which
/// would hide a stall), splitting the sink's shards when the case says. Gives the longest `put`
/// call, and how far behind its schedule a put ever returned.
async fn paced_puts(
    case: &Case,
    producer: &Producer,
    stream: &Stream,
    rate: u32,
) -> (Duration, Duration) {
    let (producer, stream) = (producer.clone(), Arc::clone(stream));
    let (records, size) = (case.records, case.size);
    let (split_at, split_all) = (case.split_at, case.split_all);
    let putter = std::thread::spawn(move || {
        let data = vec![b'x'; size];
        let started = Instant::now();
        let per_ms = (rate / 1000).max(1) as usize;
        let (mut longest, mut latest) = (Duration::ZERO, Duration::ZERO);
        for i in 0..records {
            if split_at == Some(i) {
                split_shards(&stream, split_all);
            }
            if i % per_ms == 0 {
                let due = started + Duration::from_millis((i / per_ms) as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            let record = UserRecord::new(data.clone(), format!("{:032x}", i * 7919));
            let put_started = Instant::now();
            producer.put_blocking(record).unwrap();
            let returned = Instant::now();
            longest = longest.max(returned - put_started);
            let scheduled = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
            latest = latest.max(returned.saturating_duration_since(scheduled));
        }
        (longest, latest)
    });
    tokio::task::spawn_blocking(move || putter.join().unwrap())
        .await
        .unwrap()
}

/// User + system CPU seconds of this process (producer, SDK and sink together), from
/// /proc/self/stat (clock ticks of 1/100 s).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the file (utime, stime) are 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    // BENCH_LOG=1 prints the producer's `info` lines (a map change's pass and its duration).
    if std::env::var_os("BENCH_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(std::io::stderr)
            .init();
    }
    // `cargo test --benches` runs bench binaries with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let scale = if quick { 50 } else { 1 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let off = |b: ProducerBuilder| b.rate_limit(0);
    // Buffering sized for many shards, the same for every shard count: records aggregate only
    // with others of their shard, so at 10,000 shards an aggregate needs a longer window (and a
    // backlog that can hold that window) to gather more than a few records.
    let sized = |b: ProducerBuilder| {
        b.rate_limit(0)
            .record_max_buffered_time(std::time::Duration::from_secs(1))
            .max_backlog_records(2_000_000)
            .max_backlog_bytes(1 << 30)
    };
    let mut cases = Vec::new();
    for (label, tune) in [
        (
            "scale (limiter off)",
            off as fn(ProducerBuilder) -> ProducerBuilder,
        ),
        ("scale, sized buffer", sized),
    ] {
        for shards in [1, 64, 1_024, 10_000] {
            for (size, records) in [(100, 1_000_000), (1_024, 300_000)] {
                cases.push(Case {
                    shards,
                    size,
                    records: records / scale,
                    label,
                    tune,
                    put: Put::Data,
                    paced: None,
                    split_at: None,
                    split_all: false,
                });
            }
        }
    }
    cases.push(Case {
        shards: 10_000,
        size: 100,
        records: 1_000_000 / scale,
        label: "10k shards, buffered 1 s",
        tune: |b| {
            b.rate_limit(0)
                .record_max_buffered_time(std::time::Duration::from_secs(1))
        },
        put: Put::Data,
        paced: None,
        split_at: None,
        split_all: false,
    });
    // 200,000 records/s for 3 s, below what 10,000 shards take (so that no put waits for
    // backlog room unless a reshard holds it), one shard or every shard split halfway, or
    // none; the producer's defaults otherwise.
    for shards in [1_024, 10_000] {
        for (label, split_at, split_all) in [
            ("reshard: none", None, false),
            ("reshard: split one shard", Some(300_000 / scale), false),
            ("reshard: split every shard", Some(300_000 / scale), true),
        ] {
            cases.push(Case {
                shards,
                size: 100,
                records: 600_000 / scale,
                label,
                tune: off,
                put: Put::Data,
                paced: Some(200_000),
                split_at,
                split_all,
            });
        }
    }
    // A/B at 64 shards, each case three times, interleaved: wall figures vary by ±15% from
    // run to run on this machine, CPU per record much less.
    // The baseline ("limiter off") keeps the default metrics (detailed, per shard).
    type Tune = fn(ProducerBuilder) -> ProducerBuilder;
    let ab: [(&str, Tune, Put); 6] = [
        ("A/B: limiter off", off, Put::Data),
        (
            "A/B: limiter on, not binding",
            |b| b.rate_limit(10_000),
            Put::Data,
        ),
        (
            "A/B: order mode, limiter off",
            |b| b.rate_limit(0).preserve_order(true),
            Put::Data,
        ),
        (
            "A/B: metrics none, limiter off",
            |b| b.rate_limit(0).metrics_level(MetricsLevel::None),
            Put::Data,
        ),
        ("A/B: put_record, limiter off", off, Put::Record),
        ("A/B: put_with_receipt, limiter off", off, Put::Receipt),
    ];
    for _ in 0..3 {
        for (label, tune, put) in ab {
            cases.push(Case {
                shards: 64,
                size: 100,
                records: 1_000_000 / scale,
                label,
                tune,
                put,
                paced: None,
                split_at: None,
                split_all: false,
            });
        }
    }
    // BENCH_FILTER=text runs only the cases whose label contains it; BENCH_SHARDS=n only
    // those with n shards.
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let shards: Option<usize> = std::env::var("BENCH_SHARDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let selected = cases
        .iter()
        .filter(|c| c.label.contains(filter.as_str()) && shards.is_none_or(|n| n == c.shards));
    runtime.block_on(async {
        for case in selected {
            run(case).await;
        }
    });
}
