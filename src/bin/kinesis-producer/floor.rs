//! The floor: the CPU cost of the work no KPL-compatible producer can skip, measured on the
//! sizes of the run just made.
//!
//! An SDK interceptor notes, for every PutRecords attempt, the size of each Kinesis record's
//! data (and whether it is an aggregate) and the size of the request body. After the run the
//! same operations are timed, on buffers of those sizes filled with the run's record data:
//! - MD5 over each aggregate's protobuf message (its checksum);
//! - MD5 of each partition key routing needs (one per distinct key, only when aggregating:
//!   without aggregation Kinesis routes);
//! - SHA-256 over each request body (SigV4 signs the payload's hash);
//! - base64 of each Kinesis record's data (the JSON protocol carries blobs in base64).
//!
//! These functions cost the same whatever the bytes are, so equal sizes and call counts give
//! the cost of the same bytes without keeping them.

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use aws_sdk_kinesis::config::interceptors::{
    BeforeSerializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_kinesis::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_kinesis::error::BoxError;
use aws_sdk_kinesis::operation::put_records::PutRecordsInput;
use md5::{Digest as _, Md5};
use sha2::{Digest as _, Sha256};

use crate::usage::thread_cpu_nanos;

/// The KPL aggregate's magic prefix.
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
}

/// The interceptor that fills [`Sizes`]; it only reads lengths.
#[derive(Debug, Clone, Default)]
pub struct SizeRecorder(pub Arc<Mutex<Sizes>>);

impl Intercept for SizeRecorder {
    fn name(&self) -> &'static str {
        "perf-size-recorder"
    }

    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(input) = context.input().downcast_ref::<PutRecordsInput>() {
            let mut sizes = self.0.lock().unwrap();
            for entry in input.records() {
                let data = entry.data().as_ref();
                sizes.blobs.push(data.len() as u32);
                if data.len() > 20 && data[..4] == MAGIC {
                    sizes.aggregates.push(data.len() as u32 - 20);
                }
            }
        }
        Ok(())
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
            let length = context.request().body().bytes().map_or(0, <[u8]>::len);
            self.0.lock().unwrap().bodies.push(length as u32);
        }
        Ok(())
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
    let timed = |work: &mut dyn FnMut()| {
        let start = thread_cpu_nanos();
        work();
        thread_cpu_nanos() - start
    };
    Floor {
        md5_aggregates_ns: timed(&mut || {
            for &n in &sizes.aggregates {
                black_box(Md5::digest(&buffer[..n as usize]));
            }
        }),
        md5_keys_ns: timed(&mut || {
            let key = &buffer[..key_len];
            for _ in 0..key_hashes {
                black_box(Md5::digest(black_box(key)));
            }
        }),
        sha256_bodies_ns: timed(&mut || {
            for &n in &sizes.bodies {
                black_box(Sha256::digest(&buffer[..n as usize]));
            }
        }),
        base64_blobs_ns: timed(&mut || {
            for &n in &sizes.blobs {
                black_box(aws_smithy_types::base64::encode(&buffer[..n as usize]));
            }
        }),
    }
}
