//! Errors: why a record was refused at `put`, why a delivered record failed, why `build` failed.

use std::sync::Arc;

use crate::record::{RecordProblem, UserRecord};

/// A record the producer refused at `put`. The record comes back with the reason.
///
/// Behind a pointer: `Result<(), PutError>` is then one word, which every `put` returns and
/// its future holds, instead of the record's size with the reason's.
#[derive(Debug, thiserror::Error)]
#[error("record refused: {}", .0.reason)]
pub struct PutError(Box<Refused>);

#[derive(Debug)]
struct Refused {
    record: UserRecord,
    reason: PutRefusal,
}

impl PutError {
    // Cold: a refusal is rare, and its allocation stays out of `put`'s fast path.
    #[cold]
    pub(crate) fn new(record: UserRecord, reason: PutRefusal) -> Self {
        PutError(Box::new(Refused { record, reason }))
    }

    pub fn reason(&self) -> &PutRefusal {
        &self.0.reason
    }

    pub fn record(&self) -> &UserRecord {
        &self.0.record
    }

    /// Takes the refused record back.
    pub fn into_record(self) -> UserRecord {
        self.0.record
    }
}

/// Why `put` refused a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PutRefusal {
    #[error("{0}")]
    Invalid(#[from] RecordProblem),
    #[error("the backlog is full (try_put does not wait)")]
    BacklogFull,
    #[error("the producer is stopping or stopped")]
    Stopped,
    #[error(
        "put_blocking was called on a tokio runtime thread, where blocking would stall the runtime; use put().await"
    )]
    BlockingInAsyncContext,
}

/// A record the producer accepted but could not deliver.
#[derive(Debug, Clone)]
pub struct FailedRecord {
    /// The record, with its data, partition key and explicit hash key.
    pub record: UserRecord,
    /// What went wrong last.
    pub error: DeliveryError,
    /// PutRecords attempts that carried this record (0 if it was never sent).
    pub attempts: u32,
    /// The shard the record was routed to, when it was routed to one.
    pub shard_id: Option<Arc<str>>,
}

/// The reason a record failed: the last error code and message, and what made it final.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message} ({kind})")]
pub struct DeliveryError {
    /// The Kinesis error code (e.g. `ProvisionedThroughputExceededException`,
    /// `ResourceNotFoundException`) or one of ours: `Timeout`, `ConnectionError`, `Stopped`.
    pub code: Arc<str>,
    pub message: Arc<str>,
    pub kind: FailureKind,
}

impl DeliveryError {
    pub(crate) fn stopped(message: &str) -> Self {
        DeliveryError {
            code: "Stopped".into(),
            message: message.into(),
            kind: FailureKind::Stopped,
        }
    }
}

/// What made a failure final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// Kinesis answered with an error that retrying cannot fix.
    Permanent,
    /// The record's TTL passed while it was still failing with a transient error.
    Expired,
    /// `stop` reached its deadline before the record was acknowledged. If the record was in a
    /// request still in flight at that moment, it may have been written anyway.
    Stopped,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureKind::Permanent => "permanent error",
            FailureKind::Expired => "record TTL expired",
            FailureKind::Stopped => "stop deadline passed",
        })
    }
}

/// Why `ProducerBuilder::build` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("invalid config: {field} = {value}; allowed: {allowed}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        allowed: String,
    },
    #[error("no stream given: set stream_name or stream_arn")]
    MissingStream,
    #[error("both stream_name and stream_arn are set: set one")]
    AmbiguousStream,
    #[error("could not load the shard map: {0}")]
    ShardMap(String),
    #[error("build must run inside a tokio runtime")]
    NoRuntime,
}
