//! A KPL-compatible producer for Amazon Kinesis Data Streams.
//!
//! ```no_run
//! # async fn example(client: aws_sdk_kinesis::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use kinesis_producer::Producer;
//!
//! let producer = Producer::builder()
//!     .stream_name("events")
//!     .client(client)
//!     .build()
//!     .await?; // validates the config and loads the shard map
//! let mut failures = producer.notify_failures();
//! tokio::spawn(async move {
//!     while let Some(failed) = failures.recv().await {
//!         eprintln!("{} failed: {}", failed.record.partition_key(), failed.error);
//!     }
//! });
//! producer.put(&b"hello"[..], "user-42").await?; // waits only while the backlog is full
//! producer.stop().await; // sends everything, then returns
//! # Ok(()) }
//! ```
//!
//! # Where a record goes after `put`
//!
//! The source files follow the record:
//!
//! 1. [`record`]: the [`UserRecord`] is validated on the caller's thread and gets its hash key
//!    (explicit hash key, else MD5 of the partition key).
//! 2. `backlog`: it takes room in the bounded backlog (records and bytes); `put` waits there,
//!    `try_put` gives up there.
//! 3. [`shard_map`] and `aggregator`: it is routed to the aggregator of the shard that owns its
//!    hash key, under that shard's lock only, and packed by the [`aggregation`] format code.
//!    A full aggregate is encoded on the spot.
//! 4. `sender`: one task keeps finished aggregates in one lane per shard, each behind its
//!    `limiter`, collects them into PutRecords requests, sends up to `max_in_flight` at once,
//!    retries failed entries per the `retry` policy, and ends each record: acknowledged, or
//!    reported on the [`FailureStream`]. As a request's body is written (`request_body`), its
//!    aggregates get their checksums, eight at a time (`md5_lanes`).
//! 5. `producer`: the [`Producer`] handle ties it together, with `flush` and `stop`;
//!    `receipt` gives one record's outcome to a caller who asks ([`Producer::put_with_receipt`]).
//! 6. [`metrics`]: the KPL's metrics, recorded by the sender as requests go out and come back,
//!    read with [`Producer::metrics`].
//!
//! Every record handed to the producer ends in exactly one of two ways: acknowledged by
//! Kinesis, or reported failed with its data and reason. Delivery is at least once.
//!
//! # Features
//!
//! - `producer` (default): the [`Producer`] and everything it needs (AWS SDK, tokio).
//! - `cli` (default): the `kinesis-producer` binary.
//! - `jsonl`: [`jsonl`], the parser of the CLI's JSON-lines input.
//! - `batch-sqs`, `batch-dynamodb`, `batch-s3`, `batch-cloudwatch`, `batch-firehose`,
//!   `batch-kinesis` (or `batch-all`): the batch helpers of `batch`, one service each.
//! - `cloudwatch-metrics`: the producer uploads its metrics to CloudWatch
//!   (`ProducerBuilder::cloudwatch_metrics`).
//!
//! With `default-features = false` the crate is the aggregation format alone —
//! [`aggregation`], [`deaggregation`], [`record`], [`shard_map`] — for consumers that only
//! read aggregates, without the SDK.

pub mod aggregation;
#[cfg(feature = "batch")]
pub mod batch;
pub mod deaggregation;
#[cfg(feature = "jsonl")]
pub mod jsonl;
pub mod record;
pub mod shard_map;

#[cfg(feature = "producer")]
mod aggregator;
#[cfg(feature = "producer")]
mod backlog;
#[cfg(feature = "producer")]
mod clock;
#[cfg(feature = "producer")]
mod config;
#[cfg(feature = "producer")]
mod deadlines;
#[cfg(feature = "producer")]
mod error;
#[cfg(feature = "producer")]
mod limiter;
#[cfg(feature = "producer")]
mod mailbox;
mod md5_lanes;
#[cfg(feature = "producer")]
pub mod metrics;
#[cfg(feature = "cloudwatch-metrics")]
mod metrics_upload;
#[cfg(feature = "producer")]
mod prefetch;
#[cfg(feature = "producer")]
mod producer;
#[cfg(feature = "producer")]
mod ranges;
#[cfg(feature = "producer")]
mod receipt;
#[cfg(feature = "producer")]
mod request_body;
#[cfg(any(feature = "producer", feature = "batch"))]
mod retry;
#[cfg(feature = "producer")]
mod sender;
#[cfg(feature = "producer")]
mod stats;
#[cfg(any(feature = "producer", feature = "batch"))]
mod sync;
#[cfg(test)]
mod test_rng;

pub use deaggregation::{
    deaggregate, DeaggregatedRecord, DeaggregationError, Deaggregator, OutOfRange,
};
pub use record::{RecordProblem, UserRecord};
pub use shard_map::{ShardMap, ShardRange};

#[cfg(feature = "producer")]
pub use config::{Partitioner, ProducerBuilder};
#[cfg(feature = "producer")]
pub use error::{BuildError, DeliveryError, FailedRecord, FailureKind, PutError, PutRefusal};
#[cfg(feature = "producer")]
pub use metrics::{MetricName, MetricsGranularity, MetricsLevel, MetricsSnapshot};
#[cfg(feature = "producer")]
pub use producer::{FailureStream, Producer};
#[cfg(feature = "producer")]
pub use receipt::{Delivered, Receipt};
#[cfg(any(feature = "producer", feature = "batch"))]
pub use retry::RetryPolicy;
#[cfg(feature = "producer")]
pub use stats::Stats;
