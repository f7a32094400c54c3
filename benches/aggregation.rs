//! The producer's hot path, without a runtime or a network: packing user records into KPL
//! aggregates (encoding and MD5 included), the aggregates' checksums one by one and eight at a
//! time, hashing + routing a record to its shard, and routing alone.
//!
//! `cargo bench --bench aggregation` prints records/s (elements) and MB/s (bytes).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kinesis_producer::aggregation::{checksums, AggregateBuilder, AggregateLimits};
use kinesis_producer::record::partition_key_hash;
use kinesis_producer::{ShardMap, UserRecord};
use md5::{Digest, Md5};
use std::hint::black_box;

#[path = "../tests/support/rng.rs"]
mod rng;

use rng::Rng;

const RECORDS: usize = 20_000;

fn workload(size: usize) -> Vec<UserRecord> {
    let mut rng = Rng(42);
    (0..RECORDS)
        .map(|_| {
            let data: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
            UserRecord::new(data, rng.uuid_key())
        })
        .collect()
}

/// Packs every record into as many aggregates as it takes; returns the encoded bytes.
fn aggregate_all(records: Vec<UserRecord>) -> usize {
    let mut builder = AggregateBuilder::new(AggregateLimits::default());
    let mut encoded = 0;
    for record in records {
        if let Err(record) = builder.try_push(record) {
            encoded += builder.finish().map_or(0, |entry| entry.data.len());
            let _ = builder.try_push(record);
        }
    }
    encoded + builder.finish().map_or(0, |entry| entry.data.len())
}

fn aggregation(c: &mut Criterion) {
    for size in [100, 1024] {
        let records = workload(size);
        let bytes: usize = records.iter().map(UserRecord::kinesis_size).sum();
        let mut group = c.benchmark_group(format!("aggregate/{size}B-records"));
        group.throughput(Throughput::Elements(RECORDS as u64));
        group.bench_function("records", |b| {
            b.iter_batched(
                || records.clone(),
                |r| black_box(aggregate_all(r)),
                BatchSize::LargeInput,
            )
        });
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function("bytes", |b| {
            b.iter_batched(
                || records.clone(),
                |r| black_box(aggregate_all(r)),
                BatchSize::LargeInput,
            )
        });
        group.finish();
    }
}

fn hash_and_route(c: &mut Criterion) {
    let mut rng = Rng(7);
    let keys: Vec<String> = (0..RECORDS).map(|_| rng.uuid_key()).collect();
    let mut group = c.benchmark_group("hash-and-route");
    group.throughput(Throughput::Elements(RECORDS as u64));
    for shards in [1, 4, 500, 10_000] {
        let map = ShardMap::uniform(shards);
        group.bench_function(format!("{shards}-shards"), |b| {
            b.iter(|| {
                let mut sum = 0usize;
                for key in &keys {
                    sum += map.shard_index(partition_key_hash(key)).unwrap_or(0);
                }
                black_box(sum)
            })
        });
    }
    group.finish();
}

/// Routing alone, over hash keys computed beforehand: the map's table-narrowed search against a
/// binary search of every start (how routing worked before the table), on 1,000,000 random
/// keys so that the lookups are not all in the cache.
fn route_only(c: &mut Criterion) {
    const KEYS: usize = 1_000_000;
    let mut rng = Rng(11);
    let hashes: Vec<u128> = (0..KEYS)
        .map(|_| (u128::from(rng.next()) << 64) | u128::from(rng.next()))
        .collect();
    let mut group = c.benchmark_group("route-only");
    group.throughput(Throughput::Elements(KEYS as u64));
    for shards in [1, 500, 10_000, 100_000] {
        let map = ShardMap::uniform(shards);
        let starts: Vec<u128> = map.shards().iter().map(|s| s.start).collect();
        group.bench_function(format!("{shards}-shards"), |b| {
            b.iter(|| {
                let mut sum = 0usize;
                for &hash in &hashes {
                    sum += map.shard_index(hash).unwrap_or(0);
                }
                black_box(sum)
            })
        });
        group.bench_function(format!("{shards}-shards-search-all-starts"), |b| {
            b.iter(|| {
                let mut sum = 0usize;
                for &hash in &hashes {
                    sum += starts.partition_point(|&start| start <= hash) - 1;
                }
                black_box(sum)
            })
        });
    }
    group.finish();
}

/// The checksums of a request's worth of full aggregates (64 of 50 KiB, in 8 KiB pieces as the
/// producer writes them): with `md-5` one by one, and with `checksums` side by side.
fn aggregate_checksums(c: &mut Criterion) {
    const AGGREGATES: usize = 64;
    const SIZE: usize = 50 << 10;
    let bytes: Vec<u8> = (0..AGGREGATES * SIZE)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let pieces: Vec<Vec<&[u8]>> = bytes
        .chunks(SIZE)
        .map(|a| a.chunks(8 << 10).collect())
        .collect();
    let messages: Vec<&[&[u8]]> = pieces.iter().map(Vec::as_slice).collect();
    let mut group = c.benchmark_group("checksums/64x50KiB");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("one-by-one", |b| {
        b.iter(|| {
            for message in &messages {
                let mut md5 = Md5::new();
                message.iter().for_each(|piece| md5.update(piece));
                black_box(md5.finalize());
            }
        })
    });
    group.bench_function("side-by-side", |b| {
        let mut out = vec![[0u8; 16]; AGGREGATES];
        b.iter(|| checksums(black_box(&messages), &mut out))
    });
    group.finish();
}

criterion_group!(
    benches,
    aggregation,
    aggregate_checksums,
    hash_and_route,
    route_only
);
criterion_main!(benches);
