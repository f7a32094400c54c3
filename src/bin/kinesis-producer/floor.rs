//! The floor: the CPU cost of the work no KPL-compatible producer can skip, measured on the
//! sizes of the run just made.
//!
//! An SDK interceptor reads, in every PutRecords body as it is sent, the size of each Kinesis
//! record's data (and whether it is an aggregate) and the size of the body. After the run the
//! same operations are timed, on buffers of those sizes filled with the run's record data:
//! - MD5 over each aggregate's protobuf message (its checksum), eight at a time as the producer
//!   computes them (`aggregation::checksums`), in groups of like sizes;
//! - MD5 of each partition key routing needs (one per distinct key, only when aggregating:
//!   without aggregation Kinesis routes);
//! - SHA-256 over each request body (SigV4 signs the payload's hash);
//! - base64 of each Kinesis record's data (the JSON protocol carries blobs in base64).
//!
//! These functions cost the same whatever the bytes are, so equal sizes and call counts give
//! the cost of the same bytes without keeping them.

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use aws_sdk_kinesis::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_kinesis::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_kinesis::error::BoxError;
use kinesis_producer::aggregation::checksums;
use md5::{Digest as _, Md5};
use sha2::{Digest as _, Sha256};

use crate::usage::thread_cpu_nanos;

/// The KPL aggregate's magic prefix.
#[cfg(test)]
const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Sizes seen on the wire, per PutRecords attempt.
#[derive(Default, Debug)]
pub struct Sizes {
    /// Data size of each Kinesis record sent.
    pub blobs: Vec<u32>,
    /// For each aggregate sent: the bytes its MD5 covers (between magic and checksum).
    pub aggregates: Vec<u32>,
    /// Size of each PutRecords request body.
    pub bodies: Vec<u32>,
    /// CPU the recorder itself took (reading every body for its blobs): `perf`'s own work,
    /// which it leaves out of the producer's CPU as it leaves out the sink's. Not counted: the
    /// two clock readings per request that time it, and the cache lines its scan displaces.
    pub recorder_cpu_ns: u64,
}

/// The interceptor that fills [`Sizes`]; it only reads lengths.
#[derive(Debug, Clone, Default)]
pub struct SizeRecorder(pub Arc<Mutex<Sizes>>);

impl Intercept for SizeRecorder {
    fn name(&self) -> &'static str {
        "perf-size-recorder"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let is_put_records = context
            .request()
            .headers()
            .get("x-amz-target")
            .is_some_and(|t| t.ends_with(".PutRecords"));
        if is_put_records {
            let started = thread_cpu_nanos();
            let body = context.request().body().bytes().unwrap_or_default();
            let mut sizes = self.0.lock().unwrap();
            sizes.bodies.push(body.len() as u32);
            note_blobs(body, &mut sizes);
            sizes.recorder_cpu_ns += thread_cpu_nanos().saturating_sub(started);
        }
        Ok(())
    }
}

/// Base64 of the magic's first three bytes and the top six bits of its fourth: how every
/// aggregate's `Data` begins.
const MAGIC_BASE64: &[u8] = b"84maw";

/// Notes the size of every `"Data":"…"` blob of a PutRecords body (base64 has no quote, so
/// each ends at the next one), and of each aggregate's checksummed part.
fn note_blobs(body: &[u8], sizes: &mut Sizes) {
    const FIELD: &[u8] = b"\"Data\":\"";
    let mut rest = body;
    while let Some(at) = memchr::memmem::find(rest, FIELD) {
        rest = &rest[at + FIELD.len()..];
        let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
        let encoded = &rest[..end];
        let padding = encoded.iter().rev().take_while(|&&b| b == b'=').count();
        let len = (encoded.len() / 4 * 3).saturating_sub(padding);
        sizes.blobs.push(len as u32);
        if len > 20 && encoded.starts_with(MAGIC_BASE64) {
            sizes.aggregates.push(len as u32 - 20);
        }
        rest = &rest[end..];
    }
}

/// The floor's parts, in CPU nanoseconds for the whole run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Floor {
    pub md5_aggregates_ns: u64,
    pub md5_keys_ns: u64,
    pub sha256_bodies_ns: u64,
    pub base64_blobs_ns: u64,
}

impl Floor {
    pub fn total_ns(&self) -> u64 {
        self.md5_aggregates_ns + self.md5_keys_ns + self.sha256_bodies_ns + self.base64_blobs_ns
    }
}

/// Times the floor's operations for these sizes, plus `key_hashes` MD5s of `key_len`-byte keys,
/// on buffers filled with `sample` (the run's record data) on this thread.
pub fn measure(sizes: &Sizes, key_hashes: u64, key_len: usize, sample: &[u8]) -> Floor {
    let largest = [&sizes.blobs, &sizes.aggregates, &sizes.bodies]
        .iter()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(0) as usize;
    let fill = if sample.is_empty() {
        &[0u8][..]
    } else {
        sample
    };
    let buffer: Vec<u8> = fill
        .iter()
        .copied()
        .cycle()
        .take(largest.max(key_len))
        .collect();
    // Work of no items is 0, not the cost of reading the clock twice (which, on a busy
    // machine, could round to 1 ns per record).
    let timed = |items: usize, work: &mut dyn FnMut()| {
        if items == 0 {
            return 0;
        }
        let start = thread_cpu_nanos();
        work();
        thread_cpu_nanos() - start
    };
    Floor {
        md5_aggregates_ns: timed(sizes.aggregates.len(), &mut || {
            // `checksums` groups them by size itself, as it does in the producer.
            let parts: Vec<[&[u8]; 1]> = sizes
                .aggregates
                .iter()
                .map(|&n| [&buffer[..n as usize]])
                .collect();
            let messages: Vec<&[&[u8]]> = parts.iter().map(|p| &p[..]).collect();
            let mut digests = vec![[0u8; 16]; messages.len()];
            checksums(black_box(&messages), &mut digests);
            black_box(digests);
        }),
        md5_keys_ns: timed(usize::from(key_hashes > 0), &mut || {
            let key = &buffer[..key_len];
            for _ in 0..key_hashes {
                black_box(Md5::digest(black_box(key)));
            }
        }),
        sha256_bodies_ns: timed(sizes.bodies.len(), &mut || {
            for &n in &sizes.bodies {
                black_box(Sha256::digest(&buffer[..n as usize]));
            }
        }),
        base64_blobs_ns: timed(sizes.blobs.len(), &mut || {
            // Into a buffer that is already there: the encoding, not an allocation.
            let mut out = vec![0u8; base64_simd::STANDARD.encoded_length(largest)];
            for &n in &sizes.blobs {
                let out = base64_simd::Out::from_slice(&mut out);
                black_box(base64_simd::STANDARD.encode(&buffer[..n as usize], out));
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_sizes_come_from_the_body() {
        let aggregate = [&MAGIC[..], &[7u8; 40]].concat();
        let mut body = String::from("{\"Records\":[");
        for (i, blob) in [&b"a"[..], b"ab", b"abc", &aggregate].iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let data = aws_smithy_types::base64::encode(blob);
            body.push_str(&format!("{{\"Data\":\"{data}\",\"PartitionKey\":\"k\"}}"));
        }
        body.push_str("],\"StreamName\":\"s\"}");
        let mut sizes = Sizes::default();
        note_blobs(body.as_bytes(), &mut sizes);
        assert_eq!(sizes.blobs, [1, 2, 3, 44]);
        assert_eq!(sizes.aggregates, [24]);
    }
}
