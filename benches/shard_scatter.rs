//! The least CPU a KPL-compatible producer can spend per record as the shard count grows, and
//! how much of W4's gap (`kinesis-producer perf`, 10,000 shards against 1) any design can
//! close.
//!
//! A bare pipeline on one thread, with no runtime, network, SDK, retries, receipts or
//! metrics: for each 100-byte record with a UUID key it hashes the key (MD5), routes it (the
//! crate's `ShardMap`), frames it into its shard's KPL aggregate; each aggregate is closed
//! when full or when its buffering window ends, checksummed (MD5, sixteen closed aggregates at
//! a time through `aggregation::checksums`, as the producer does), base64-encoded into a
//! PutRecords JSON body with its explicit hash key, and every body is hashed (SHA-256) as SigV4
//! would. That is the floor `perf` measures plus the least bookkeeping around it. Three ways to
//! place records:
//!
//! - `per-shard`: each shard's aggregate grows in buffers of its own as records arrive (this
//!   producer's design, and the KPL's);
//! - `per-shard-prefetched`: the same, with each record's shard found 16 records ahead and its
//!   aggregate's memory asked for early (a producer would have to hold records back to do it);
//! - `log`: records go into one buffer in arrival order, and at the window's end are sorted by
//!   shard and framed an aggregate at a time (a producer built around a log).
//!
//! The window is 76,000 records: 100 ms (the default `record_max_buffered_time`) at the
//! 760,000 records/s this producer reaches in W4, so 10,000 shards hold 7.3 records per
//! aggregate (W4 in `perf`: 7 to 9). Each run checks that every record was framed once and
//! that its first aggregate reads back, through the crate's KCL-rule de-aggregator, as records
//! of its own shard.
//!
//! A second table, `least_producer`, runs the same pipeline in the shapes of `perf`'s W1 (100
//! bytes, 1 shard), W2 (1 KiB, 500 shards, 30% of the records, as `perf`'s W2 puts fewer), W3
//! (W2 with a random explicit hash key per record and one partition key, "k": routing parses
//! the explicit hash key instead of hashing the partition key, and each aggregate holds one
//! partition key entry and an explicit hash key entry per record) and W4 (100 bytes, 10,000
//! shards), with every record's data in one shared buffer as `perf`'s
//! are, and with `wire=true` also writing each body, after its headers, to a TCP socket on
//! 127.0.0.1 whose reading thread discards it: the least a producer spends on the network
//! (the writing thread's CPU includes the kernel's for its writes; the reader's is not
//! counted, as `perf` does not count its sink's). Dividing `perf`'s floor by these figures
//! gives the highest efficiency any producer built this way reaches on the machine.
//!
//! `cargo bench --bench shard_scatter [-- RECORDS]` prints, per case, the median of three runs:
//! CPU ns per record (the thread's own time) and its ratio to one shard.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use kinesis_producer::aggregation::checksums;
use kinesis_producer::deaggregation::Deaggregator;
use kinesis_producer::record::{parse_explicit_hash_key, partition_key_hash};
use kinesis_producer::ShardMap;

#[path = "../tests/support/rng.rs"]
mod rng;

const RECORD_SIZE: usize = 100;
const WINDOW: usize = 76_000;
const SHARD_COUNTS: [usize; 4] = [1, 64, 1_024, 10_000];
/// The KPL's default `AggregationMaxSize`.
const AGGREGATE_MAX: usize = 51_200;
const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// How many records ahead `per-shard-prefetched` finds a record's shard.
const AHEAD: usize = 16;
/// Closed aggregates checksummed together, as the producer does while writing a body.
const CHECKSUM_AHEAD: usize = 16;

struct Workload {
    /// Each record's partition key, or with `ehk` its explicit hash key (its partition key is
    /// then "k", as in `perf --keys ehk`).
    keys: Vec<String>,
    ehk: bool,
    /// Each record's data, or one buffer every record shares (as `perf`'s records do).
    data: Vec<Vec<u8>>,
    record_size: usize,
}

impl Workload {
    fn new(records: usize, record_size: usize, shared_data: bool, ehk: bool) -> Self {
        let mut rng = rng::Rng(0x5ca7_7e12);
        let keys = (0..records)
            .map(|_| match ehk {
                true => ((u128::from(rng.next()) << 64) | u128::from(rng.next())).to_string(),
                false => rng.uuid_key(),
            })
            .collect();
        let buffers = if shared_data { 1 } else { records };
        let data = (0..buffers).map(|_| rng.bytes(record_size)).collect();
        Workload {
            keys,
            ehk,
            data,
            record_size,
        }
    }

    /// The shard of record `at`: by its explicit hash key, or by its partition key's MD5.
    fn shard_of(&self, map: &ShardMap, at: usize) -> usize {
        let key = &self.keys[at];
        let hash_key = match self.ehk {
            true => parse_explicit_hash_key(key).expect("a decimal in range"),
            false => partition_key_hash(key),
        };
        map.shard_index(hash_key)
            .expect("a uniform map covers every key")
    }

    fn data(&self, at: usize) -> &[u8] {
        &self.data[at % self.data.len()]
    }
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// One shard's open aggregate, framed as the KPL's `AggregatedRecord` in one buffer that
/// starts with the magic: each record's partition key entry (every key is new: UUID keys do not
/// repeat) and then the record itself. Protobuf allows a repeated field's entries to be
/// interleaved with another's, so the aggregate is complete as it grows and is never copied
/// to be assembled; the crate's de-aggregator reads it back in `check`.
#[derive(Default)]
struct Aggregate {
    bytes: Vec<u8>,
    count: u64,
}

impl Aggregate {
    fn encoded_len(&self) -> usize {
        self.bytes.len().max(MAGIC.len()) + 16
    }

    /// The length of a record's message: its key indexes and its data. With an explicit hash
    /// key (`ehk`), the partition key index is always 0 (the one entry "k") and the explicit
    /// hash key index is the record's; else the partition key index is the record's.
    fn record_len(&self, data: &[u8], ehk: bool) -> usize {
        let indexes = match ehk {
            true => 2 + 1 + varint_len(self.count),
            false => 1 + varint_len(self.count),
        };
        indexes + 1 + varint_len(data.len() as u64) + data.len()
    }

    /// The bytes `key` and `data` would add.
    fn growth(&self, key: &[u8], data: &[u8], ehk: bool) -> usize {
        let record = self.record_len(data, ehk);
        let partition_key = if ehk && self.count == 0 { 3 } else { 0 };
        partition_key
            + 1
            + varint_len(key.len() as u64)
            + key.len()
            + 1
            + varint_len(record as u64)
            + record
    }

    fn push(&mut self, key: &[u8], data: &[u8], sink: &mut Sink, ehk: bool) {
        let record = self.record_len(data, ehk);
        let out = &mut self.bytes;
        if out.is_empty() {
            *out = sink.spare.pop().unwrap_or_default();
            out.clear();
            out.extend_from_slice(&MAGIC);
        }
        if ehk {
            if self.count == 0 {
                out.extend_from_slice(&[0x0a, 1, b'k']);
            }
            out.push(0x12);
        } else {
            out.push(0x0a);
        }
        varint(out, key.len() as u64);
        out.extend_from_slice(key);
        out.push(0x1a);
        varint(out, record as u64);
        out.push(0x08);
        if ehk {
            out.extend_from_slice(&[0, 0x10]);
        }
        varint(out, self.count);
        out.push(0x1a);
        varint(out, data.len() as u64);
        out.extend_from_slice(data);
        self.count += 1;
    }

    /// Adds a record, first closing the aggregate into `sink` if it would grow past the limit.
    fn add(&mut self, key: &[u8], data: &[u8], sink: &mut Sink, shard_start: u128, ehk: bool) {
        if self.count > 0 && self.encoded_len() + self.growth(key, data, ehk) > AGGREGATE_MAX {
            self.close(sink, shard_start);
        }
        self.push(key, data, sink, ehk);
    }

    fn close(&mut self, sink: &mut Sink, shard_start: u128) {
        if self.count == 0 {
            return;
        }
        sink.aggregate(std::mem::take(&mut self.bytes), self.count, shard_start);
        self.count = 0;
    }
}

/// Where closed aggregates go: PutRecords bodies of up to 500 entries, each hashed as SigV4
/// hashes a payload and, when the sink has a wire, written to a TCP socket on 127.0.0.1.
struct Sink {
    /// Closed aggregates (magic and protobuf) waiting for their checksums, with their shard's
    /// start.
    pending: Vec<(Vec<u8>, u128)>,
    /// Their buffers once written, for the next ones.
    spare: Vec<Vec<u8>>,
    digests: Vec<[u8; 16]>,
    wire: Option<Wire>,
    body: Vec<u8>,
    entries: usize,
    kinesis_records: usize,
    user_records: usize,
    digest_bits: u8,
    /// The first aggregate and its shard's start, for the read-back check.
    first: Option<(Vec<u8>, u128)>,
}

impl Sink {
    fn new(wire: Option<Wire>) -> Self {
        Sink {
            pending: Vec::new(),
            spare: Vec::new(),
            digests: Vec::new(),
            wire,
            body: Vec::with_capacity(6 << 20),
            entries: 0,
            kinesis_records: 0,
            user_records: 0,
            digest_bits: 0,
            first: None,
        }
    }

    /// Takes a closed aggregate (magic and protobuf) of `count` records.
    fn aggregate(&mut self, aggregate: Vec<u8>, count: u64, shard_start: u128) {
        self.user_records += count as usize;
        self.pending.push((aggregate, shard_start));
        if self.pending.len() == CHECKSUM_AHEAD {
            self.write_pending();
        }
    }

    /// Checksums the waiting aggregates side by side (`aggregation::checksums`, as the
    /// producer does) and writes them into the body.
    fn write_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        let protobufs: Vec<[&[u8]; 1]> = pending.iter().map(|(a, _)| [&a[MAGIC.len()..]]).collect();
        let messages: Vec<&[&[u8]]> = protobufs.iter().map(|m| &m[..]).collect();
        self.digests.resize(messages.len(), [0; 16]);
        checksums(&messages, &mut self.digests);
        for (at, (mut aggregate, shard_start)) in pending.drain(..).enumerate() {
            aggregate.extend_from_slice(&self.digests[at]);
            self.entry(&aggregate, shard_start);
            self.spare.push(aggregate);
        }
        self.pending = pending;
    }

    fn entry(&mut self, aggregate: &[u8], shard_start: u128) {
        if self.first.is_none() {
            self.first = Some((aggregate.to_vec(), shard_start));
        }
        let body = &mut self.body;
        body.extend_from_slice(if self.entries == 0 {
            b"{\"Records\":[{\"Data\":\""
        } else {
            b",{\"Data\":\""
        });
        let base64 = base64_simd::STANDARD;
        let at = body.len();
        body.resize(at + base64.encoded_length(aggregate.len()), 0);
        let encoded = base64.encode(aggregate, base64_simd::Out::from_slice(&mut body[at..]));
        debug_assert_eq!(encoded.len(), body.len() - at);
        // Routed by the shard's start: the producer's explicit hash key for an aggregate.
        write!(
            body,
            "\",\"ExplicitHashKey\":\"{shard_start}\",\"PartitionKey\":\"a\"}}"
        )
        .expect("writing to a Vec");
        self.entries += 1;
        self.kinesis_records += 1;
        if self.entries == 500 || self.body.len() > 4 << 20 {
            self.send_body();
        }
    }

    /// Sends whatever is buffered.
    fn send(&mut self) {
        self.write_pending();
        self.send_body();
    }

    fn send_body(&mut self) {
        if self.entries == 0 {
            return;
        }
        self.body.extend_from_slice(b"],\"StreamName\":\"bench\"}");
        self.digest_bits ^= <sha2::Sha256 as sha2::Digest>::digest(&self.body)[0];
        if let Some(wire) = &mut self.wire {
            wire.send(&self.body);
        }
        self.body.clear();
        self.entries = 0;
    }
}

/// A TCP connection on 127.0.0.1 to a thread that reads and discards what it is sent: the
/// least a producer spends putting its request bodies on the network. The reader's own CPU
/// is not counted, as `perf` does not count its sink's.
struct Wire {
    stream: TcpStream,
    reader: std::thread::JoinHandle<u64>,
}

impl Wire {
    fn open() -> Wire {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port on 127.0.0.1");
        let address = listener.local_addr().expect("its address");
        let reader = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("the bench's connection");
            let mut buffer = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n as u64,
                }
            }
        });
        let stream = TcpStream::connect(address).expect("connecting to the reader");
        Wire { stream, reader }
    }

    /// A request: about the headers the SDK writes, then the body.
    fn send(&mut self, body: &[u8]) {
        let head = format!(
            "POST / HTTP/1.1\r\ncontent-type: application/x-amz-json-1.1\r\n\
             x-amz-target: Kinesis_20131202.PutRecords\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        self.stream
            .write_all(head.as_bytes())
            .expect("writing to the reader");
        self.stream.write_all(body).expect("writing to the reader");
    }

    /// Closes the connection; the bytes the reader read.
    fn close(self) -> u64 {
        drop(self.stream);
        self.reader.join().expect("the reader thread")
    }
}

fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults and writes nothing, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(at.cast());
    }
}

fn per_shard(work: &Workload, map: &ShardMap, sink: &mut Sink, ahead: usize) {
    let starts: Vec<u128> = map.shards().iter().map(|s| s.start).collect();
    let mut aggregates: Vec<Aggregate> = (0..starts.len()).map(|_| Aggregate::default()).collect();
    let mut open: Vec<usize> = Vec::new();
    let mut routed = std::collections::VecDeque::with_capacity(ahead + 1);
    let records = work.keys.len();
    let mut next = 0;
    for at in 0..records {
        // Routes up to `ahead` records early and asks for their aggregate's memory (with
        // `ahead` 0, each record is routed as it is placed).
        while next < records && next <= at + ahead {
            let shard = work.shard_of(map, next);
            if ahead > 0 {
                prefetch(&aggregates[shard]);
            }
            routed.push_back(shard);
            next += 1;
        }
        if ahead > 0 {
            if let Some(&soon) = routed.get(ahead / 2) {
                let bytes = &aggregates[soon].bytes;
                let tail = bytes.as_ptr().wrapping_add(bytes.len());
                prefetch(tail);
                prefetch(tail.wrapping_add(64));
                prefetch(tail.wrapping_add(128));
            }
        }
        let shard = routed.pop_front().expect("routed ahead");
        let aggregate = &mut aggregates[shard];
        if aggregate.count == 0 {
            open.push(shard);
        }
        aggregate.add(
            work.keys[at].as_bytes(),
            work.data(at),
            sink,
            starts[shard],
            work.ehk,
        );
        if (at + 1) % WINDOW == 0 {
            for shard in open.drain(..) {
                aggregates[shard].close(sink, starts[shard]);
            }
        }
    }
    for shard in open.drain(..) {
        aggregates[shard].close(sink, starts[shard]);
    }
    sink.send();
}

/// Where a logged record sits: its shard, and its key and data in the log.
#[derive(Clone, Copy)]
struct Logged {
    shard: u32,
    at: u32,
    key_len: u32,
    data_len: u32,
}

fn log(work: &Workload, map: &ShardMap, sink: &mut Sink) {
    let starts: Vec<u128> = map.shards().iter().map(|s| s.start).collect();
    let shards = starts.len();
    let mut bytes: Vec<u8> = Vec::new();
    let mut logged: Vec<Logged> = Vec::new();
    let mut ends = vec![0u32; shards + 1];
    let mut order: Vec<u32> = Vec::new();
    let mut aggregate = Aggregate::default();
    let records = work.keys.len();
    for at in 0..records {
        let (key, data) = (work.keys[at].as_bytes(), work.data(at));
        logged.push(Logged {
            shard: work.shard_of(map, at) as u32,
            at: bytes.len() as u32,
            key_len: key.len() as u32,
            data_len: data.len() as u32,
        });
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(data);
        if (at + 1) % WINDOW != 0 && at + 1 != records {
            continue;
        }
        // A counting sort by shard, keeping arrival order within each shard.
        ends.fill(0);
        for record in &logged {
            ends[record.shard as usize + 1] += 1;
        }
        for shard in 0..shards {
            ends[shard + 1] += ends[shard];
        }
        let mut cursor = ends.clone();
        order.resize(logged.len(), 0);
        for (index, record) in logged.iter().enumerate() {
            let slot = &mut cursor[record.shard as usize];
            order[*slot as usize] = index as u32;
            *slot += 1;
        }
        for (position, &index) in order.iter().enumerate() {
            if let Some(&soon) = order.get(position + AHEAD) {
                let start = logged[soon as usize].at as usize;
                let line = bytes.as_ptr().wrapping_add(start);
                prefetch(line);
                prefetch(line.wrapping_add(64));
                prefetch(line.wrapping_add(128));
            }
            let record = logged[index as usize];
            let shard = record.shard as usize;
            let key_end = (record.at + record.key_len) as usize;
            let key = &bytes[record.at as usize..key_end];
            let data = &bytes[key_end..key_end + record.data_len as usize];
            aggregate.add(key, data, sink, starts[shard], work.ehk);
            if position + 1 == ends[shard + 1] as usize {
                aggregate.close(sink, starts[shard]);
            }
        }
        logged.clear();
        bytes.clear();
    }
    sink.send();
}

fn thread_cpu_nanos() -> u128 {
    // SAFETY: clock_gettime writes only the timespec it is given.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128
}

/// The first aggregate holds only records of its shard and reads back as framed.
fn check(sink: &Sink, map: &ShardMap, shard_count: usize, record_size: usize) {
    let (aggregate, start) = sink.first.as_ref().expect("an aggregate was made");
    let shard = map
        .shards()
        .iter()
        .find(|s| s.start == *start)
        .expect("the aggregate's shard");
    let records = Deaggregator::kcl(shard.start, shard.end)
        .deaggregate(aggregate.clone(), "a")
        .expect("the aggregate reads back");
    assert!(
        !records.is_empty(),
        "{shard_count} shards: an empty aggregate"
    );
    for record in &records {
        assert_eq!(record.data.len(), record_size);
        let hash_key = match &record.explicit_hash_key {
            Some(ehk) => parse_explicit_hash_key(ehk).expect("the key as written"),
            None => partition_key_hash(&record.partition_key),
        };
        assert_eq!(
            map.shard_index(hash_key),
            map.shards().iter().position(|s| s.start == *start),
            "{shard_count} shards: a record outside its aggregate's shard"
        );
    }
}

/// The median CPU ns per record of `runs` runs of `strategy` (the thread's own time, with the
/// kernel's for its socket writes when `wire`), and the user records per Kinesis record.
fn measure(work: &Workload, map: &ShardMap, strategy: &str, wire: bool, runs: usize) -> (f64, f64) {
    let records = work.keys.len();
    let mut times = Vec::new();
    let mut per_kinesis_record = 0.0;
    for _ in 0..runs {
        let mut sink = Sink::new(wire.then(Wire::open));
        let began = thread_cpu_nanos();
        match strategy {
            "per-shard" => per_shard(work, map, &mut sink, 0),
            "per-shard-prefetched" => per_shard(work, map, &mut sink, AHEAD),
            _ => log(work, map, &mut sink),
        }
        times.push((thread_cpu_nanos() - began) as f64 / records as f64);
        per_kinesis_record = records as f64 / sink.kinesis_records as f64;
        assert_eq!(
            sink.user_records, records,
            "{strategy}: every record framed once"
        );
        check(&sink, map, map.len(), work.record_size);
        std::hint::black_box(sink.digest_bits);
        if let Some(wire) = sink.wire.take() {
            assert!(wire.close() > 0, "the reader read the bodies");
        }
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], per_kinesis_record)
}

fn main() {
    // `cargo test --benches` runs this without `--bench`: a quick pass, for its checks.
    let quick = !std::env::args().any(|arg| arg == "--bench");
    let records = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .map(|arg| arg.parse().expect("RECORDS must be a number"))
        .unwrap_or(if quick { 10_000 } else { 1_000_000 });
    let runs = if quick { 1 } else { 3 };
    let work = Workload::new(records, RECORD_SIZE, false, false);
    println!("records={records} record_size={RECORD_SIZE} window_records={WINDOW} quick={quick}");
    let strategies = ["per-shard", "per-shard-prefetched", "log"];
    for strategy in strategies {
        let mut one_shard = None;
        for shards in SHARD_COUNTS {
            let map = ShardMap::uniform(shards);
            let (median, per_kinesis_record) = measure(&work, &map, strategy, false, runs);
            let base = *one_shard.get_or_insert(median);
            println!(
                "strategy={strategy} shards={shards} cpu_ns_per_record={median:.0} \
                 x_one_shard={:.2} user_records_per_kinesis_record={per_kinesis_record:.1}",
                median / base
            );
        }
    }
    // The least producer in `perf`'s workloads' shapes: records share one data buffer, as
    // `perf`'s do, and each body is also written to a socket (`wire=true`), as a producer must.
    // W2 and W3 put fewer records, as `perf`'s do (300,000).
    for (workload, record_size, shards, tenths, ehk) in [
        ("W1", 100, 1, 10, false),
        ("W2", 1024, 500, 3, false),
        ("W3", 1024, 500, 3, true),
        ("W4", 100, 10_000, 10, false),
    ] {
        let work = Workload::new((records * tenths / 10).max(1), record_size, true, ehk);
        let map = ShardMap::uniform(shards);
        for (strategy, wire) in [("per-shard", false), ("per-shard", true), ("log", true)] {
            let (median, per_kinesis_record) = measure(&work, &map, strategy, wire, runs);
            println!(
                "least_producer={workload} strategy={strategy} record_size={record_size} \
                 shards={shards} records={} wire={wire} cpu_ns_per_record={median:.0} \
                 user_records_per_kinesis_record={per_kinesis_record:.1}",
                work.keys.len()
            );
        }
    }
}
