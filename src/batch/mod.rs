//! Batch helpers for the AWS batch APIs other than the producer's: SQS, DynamoDB, S3,
//! CloudWatch, Firehose, and a one-shot Kinesis PutRecords.
//!
//! Each of these calls takes a few items per request and may fail some of them while the rest
//! succeed. The helpers page the caller's items by count and bytes, retry what failed for a
//! transient reason with exponential backoff and jitter, and hand back every item that did not
//! make it, with its reason. Nothing is dropped silently.
//!
//! Two styles, over the same engine:
//!
//! 1. **One call** — [`BatchCall::send_all`]: give all the items (the SDK's own entry types),
//!    get an [`Outcome`] back. Pages run concurrently up to [`BatchOptions::concurrency`], and
//!    [`BatchOptions::time_budget`] bounds the whole call, not each page. A worker finishes a
//!    page, retries included, before it takes the next, so pages still queued when the budget
//!    runs out come back unsent (code `NotSent`, 0 attempts).
//! 2. **Dispatcher** — [`BatchCall::dispatcher`]: [`Dispatcher::submit`] buffers items one at a
//!    time and sends a batch as soon as it is full; [`Dispatcher::flush`] sends the rest and
//!    returns the outcome of everything submitted since the previous flush.
//!
//! Each service lives behind its own cargo feature (`batch-sqs`, `batch-dynamodb`, `batch-s3`,
//! `batch-cloudwatch`, `batch-firehose`, `batch-kinesis`), so producer users don't compile S3.
//!
//! # What "unprocessed" means
//!
//! An item is unprocessed when the helper could not confirm that the service applied it. Its
//! [`Reason`] says why, and whether sending it again could help:
//!
//! - [`ReasonKind::Rejected`]: refused before sending (too large, or invalid for the service);
//! - [`ReasonKind::Permanent`]: the service refused it for a reason a retry won't change;
//! - [`ReasonKind::GaveUp`]: it kept failing for a transient reason until the time budget or the
//!   attempt limit ran out;
//! - [`ReasonKind::Unknown`]: its request was still in flight when the time budget ran out, so
//!   it may or may not have been applied;
//! - [`ReasonKind::Blocked`]: held back, unsent, because an earlier item of the same ordered group
//!   (an SQS FIFO message group) was not delivered; sending it would have broken the order.
//!
//! # Retries and the SDK's own retryer
//!
//! The helpers switch the SDK's retryer off for the batch call itself, so that each attempt is
//! one request, counted against the one time budget, and only the failed items are sent again.

mod engine;

#[cfg(feature = "batch-cloudwatch")]
pub mod cloudwatch;
#[cfg(feature = "batch-dynamodb")]
pub mod dynamodb;
#[cfg(feature = "batch-firehose")]
pub mod firehose;
#[cfg(feature = "batch-kinesis")]
pub mod kinesis;
#[cfg(feature = "batch-s3")]
pub mod s3;
#[cfg(feature = "batch-sqs")]
pub mod sqs;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use crate::retry::RetryPolicy;
pub use engine::{Dispatcher, Submitted};

/// How a call behaves: concurrency, the time budget, retries, de-duplication.
///
/// The defaults suit a service call inside a request handler: 4 pages at once, 30 seconds for
/// the whole call, backoff from 100 ms to 5 s, at most 10 attempts per item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOptions {
    /// Pages sent at once (at least 1). Ordered calls (SQS FIFO) always send one at a time.
    pub concurrency: usize,
    /// Time for the whole call: every page, retry and backoff. A dispatcher gives each batch it
    /// sends this budget.
    pub time_budget: Duration,
    /// Backoff between attempts of the items that failed transiently.
    pub retry: RetryPolicy,
    /// Attempts per item (at least 1), within the time budget.
    pub max_attempts: u32,
    /// Drop duplicates by the service's rule (see each service), logging each one; off by
    /// default. Dropped items are listed in [`Outcome::deduplicated`].
    pub deduplicate: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            concurrency: 4,
            time_budget: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            max_attempts: 10,
            deduplicate: false,
        }
    }
}

impl BatchOptions {
    /// Checks the options, naming the first bad field.
    pub fn validate(&self) -> Result<(), BatchConfigError> {
        if self.concurrency == 0 {
            return Err(BatchConfigError::new("concurrency", "must be at least 1"));
        }
        if self.max_attempts == 0 {
            return Err(BatchConfigError::new("max_attempts", "must be at least 1"));
        }
        if self.time_budget.is_zero() {
            return Err(BatchConfigError::new(
                "time_budget",
                "must be more than zero",
            ));
        }
        if self.retry.base_delay > self.retry.max_delay {
            return Err(BatchConfigError::new(
                "retry",
                "base_delay must not exceed max_delay",
            ));
        }
        Ok(())
    }
}

/// A service's request limits. Each service starts from its current AWS limits
/// ([`Limits::MAX_ITEMS`] of each module, etc.) and lets the caller lower them, or raise the
/// byte limits where AWS has raised them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Items per request.
    pub max_items: usize,
    /// Bytes per request, as the service counts them (see each service).
    pub max_bytes: usize,
    /// Bytes per item; a larger item is returned as [`ReasonKind::Rejected`] without being sent.
    pub max_item_bytes: usize,
}

impl Limits {
    /// Checks these limits against the service's hard maximum number of items per request.
    pub fn validate(&self, service_max_items: usize) -> Result<(), BatchConfigError> {
        if self.max_items == 0 || self.max_items > service_max_items {
            return Err(BatchConfigError::new(
                "max_items",
                format!("must be in 1..={service_max_items}"),
            ));
        }
        if self.max_bytes == 0 {
            return Err(BatchConfigError::new("max_bytes", "must be at least 1"));
        }
        if self.max_item_bytes == 0 || self.max_item_bytes > self.max_bytes {
            return Err(BatchConfigError::new(
                "max_item_bytes",
                "must be in 1..=max_bytes",
            ));
        }
        Ok(())
    }
}

/// A bad option or limit, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid batch setting `{field}`: {problem}")]
pub struct BatchConfigError {
    /// The setting.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl BatchConfigError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        BatchConfigError {
            field,
            problem: problem.into(),
        }
    }
}

/// Why an item is unprocessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReasonKind {
    /// Refused before sending: too large, or invalid for the service.
    Rejected,
    /// Refused by the service for a reason a retry won't change.
    Permanent,
    /// Failed transiently until the time budget or the attempt limit ran out.
    GaveUp,
    /// In flight when the time budget ran out: it may or may not have been applied.
    Unknown,
    /// Not sent, because an earlier item of its ordered group was not delivered.
    Blocked,
}

/// Why an item is unprocessed: the kind, and the service's (or our) error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub kind: ReasonKind,
    /// The error code, e.g. `InternalError`, `ProvisionedThroughputExceededException`,
    /// `ItemTooLarge`.
    pub code: String,
    pub message: String,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}: {}", self.kind, self.code, self.message)
    }
}

/// One failure as a service reports it, before the helper decides what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: String,
    pub message: String,
    /// Whether another attempt may succeed (throttling, a server error, a timeout).
    pub transient: bool,
}

impl Failure {
    pub fn new(code: impl Into<String>, message: impl Into<String>, transient: bool) -> Self {
        Failure {
            code: code.into(),
            message: message.into(),
            transient,
        }
    }

    /// A failed SDK call, classified by the producer's retry rules (throttling, 5xx, timeouts
    /// and connection errors are transient); for [`BatchCall::send`] implementations.
    pub fn from_sdk<E>(
        error: &aws_smithy_runtime_api::client::result::SdkError<
            E,
            aws_smithy_runtime_api::http::Response,
        >,
    ) -> Self
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    {
        let attempt = crate::retry::classify_sdk_error(error);
        Failure {
            code: attempt.code,
            message: attempt.message,
            transient: attempt.transient,
        }
    }

    /// The service's answer did not mention the item: worth another attempt.
    pub(crate) fn no_result() -> Self {
        Failure::new(
            "NoResult",
            "the service's answer did not mention this item",
            true,
        )
    }

    /// A whole-request refusal that one bad item can cause; the engine then splits the page in
    /// halves to find that item rather than failing its neighbours.
    fn blames_an_item(&self) -> bool {
        !self.transient
            && matches!(
                crate::retry::service_code(&self.code),
                "ValidationException"
                    | "InvalidParameterValue"
                    | "InvalidParameterValueException"
                    | "InvalidParameterCombination"
                    | "InvalidParameterException"
                    | "MissingParameter"
                    | "MissingRequiredParameter"
                    | "InvalidArgument"
                    | "InvalidArgumentException"
                    | "InvalidAttributeValue"
                    | "InvalidMessageContents"
                    | "MalformedXML"
                    | "InvalidRequest"
                    | "SerializationException"
                    | "BatchRequestTooLong"
                    | "EntityTooLarge"
            )
    }
}

/// What the service said about one item of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemResult<T> {
    /// Applied; the service's answer for it.
    Done(T),
    Failed(Failure),
}

/// An item the service applied: its position in the caller's input (or in the dispatcher's
/// submissions since the last flush) and the service's answer for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Succeeded<O> {
    pub index: usize,
    pub output: O,
    /// Attempts it took (1 when the first request succeeded).
    pub attempts: u32,
}

/// An item that was not applied, given back with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Unprocessed<T> {
    pub index: usize,
    pub item: T,
    pub reason: Reason,
    /// Requests that carried it (0 when it was never sent).
    pub attempts: u32,
}

/// The result of a call, or of a dispatcher's flush. Every item given is in exactly one of
/// `succeeded`, `unprocessed` and `deduplicated`, each sorted by index.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<T, O> {
    pub succeeded: Vec<Succeeded<O>>,
    pub unprocessed: Vec<Unprocessed<T>>,
    /// Indexes of the items dropped as duplicates (only with [`BatchOptions::deduplicate`]).
    pub deduplicated: Vec<usize>,
    /// Requests sent.
    pub requests: u64,
    pub elapsed: Duration,
}

impl<T, O> Default for Outcome<T, O> {
    fn default() -> Self {
        Outcome {
            succeeded: Vec::new(),
            unprocessed: Vec::new(),
            deduplicated: Vec::new(),
            requests: 0,
            elapsed: Duration::ZERO,
        }
    }
}

impl<T, O> Outcome<T, O> {
    /// Whether every item was applied (or dropped as a duplicate on request).
    pub fn is_complete(&self) -> bool {
        self.unprocessed.is_empty()
    }
}

/// Which of two duplicates a de-duplicating call keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The first: a later duplicate is the same message again (SQS ids, FIFO deduplication ids).
    First,
    /// The last: a later write to the same key supersedes the earlier one (DynamoDB).
    Last,
}

/// One batch API of one service: how to size and check an item, and how to send a page of them.
///
/// The helpers in this module implement it; implement it yourself to get paging, retries,
/// the time budget and the dispatcher for another batch API.
pub trait BatchCall: Send + Sync + 'static {
    /// What the caller gives: the SDK's entry type.
    type Item: Clone + Send + Sync + 'static;
    /// What the service answers for an applied item.
    type Output: Send + 'static;

    /// The request limits in force.
    fn limits(&self) -> Limits;

    /// The item's size as the service counts it against [`Limits`], or why it can't be sent.
    /// The engine checks the size against [`Limits::max_item_bytes`] itself.
    fn check(&self, item: &Self::Item) -> Result<usize, Failure>;

    /// Sends one page (within the limits) and says what happened to each item, in order. An
    /// `Err` is a failure of the whole request. The engine keeps the items (for retries and to
    /// give back), so the request takes the one copy of them an SDK request needs.
    fn send(
        &self,
        page: &[&Self::Item],
    ) -> impl Future<Output = Result<Vec<ItemResult<Self::Output>>, Failure>> + Send;

    /// The key by which [`BatchOptions::deduplicate`] finds duplicates; `None` never collides.
    fn dedup_key(&self, _item: &Self::Item) -> Option<String> {
        None
    }

    /// Which duplicate to keep.
    fn keep(&self) -> Keep {
        Keep::First
    }

    /// The group within which order must hold (an SQS FIFO message group). When any item has
    /// one, the call sends one page at a time, and an item is held back once an earlier item of
    /// its group has failed.
    fn order_key(&self, _item: &Self::Item) -> Option<String> {
        None
    }

    /// Whether a request may carry only one item of each ordered group, so that a failed item
    /// can never be followed by a delivered item of its group in the same request.
    fn strict_order(&self) -> bool {
        false
    }

    /// Sends all `items`: see the module docs. The caller's items are moved in and come back
    /// only in [`Outcome::unprocessed`].
    fn send_all(
        &self,
        items: impl IntoIterator<Item = Self::Item>,
        options: &BatchOptions,
    ) -> impl Future<Output = Result<Outcome<Self::Item, Self::Output>, BatchConfigError>> + Send
    where
        Self: Clone,
    {
        let call = Arc::new(self.clone());
        let items: Vec<Self::Item> = items.into_iter().collect();
        let options = options.clone();
        async move {
            options.validate()?;
            Ok(engine::send_all(call, items, &options).await)
        }
    }

    /// A dispatcher that buffers submitted items and sends them in full batches.
    fn dispatcher(&self, options: BatchOptions) -> Result<Dispatcher<Self>, BatchConfigError>
    where
        Self: Clone + Sized,
    {
        options.validate()?;
        Ok(Dispatcher::new(Arc::new(self.clone()), options))
    }
}

/// One entry of an answer that reports per item: failed when it carries an error code.
#[cfg(any(feature = "batch-firehose", feature = "batch-kinesis"))]
pub(crate) fn entry_result<O>(
    error_code: Option<&str>,
    error_message: Option<&str>,
    transient: impl Fn(&str) -> bool,
    done: impl FnOnce() -> O,
) -> ItemResult<O> {
    match error_code {
        Some(code) => ItemResult::Failed(Failure::new(
            code,
            error_message.unwrap_or_default(),
            transient(code),
        )),
        None => ItemResult::Done(done()),
    }
}

/// The results of an answer that names its items (by id or key); an item it did not mention
/// is tried again.
#[cfg(any(feature = "batch-sqs", feature = "batch-s3"))]
pub(crate) fn unanswered_retried<O>(results: Vec<Option<ItemResult<O>>>) -> Vec<ItemResult<O>> {
    results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| ItemResult::Failed(Failure::no_result())))
        .collect()
}

/// The page's items, copied once into the SDK request that takes them by value.
#[cfg(any(
    feature = "batch-dynamodb",
    feature = "batch-s3",
    feature = "batch-cloudwatch",
    feature = "batch-firehose",
    feature = "batch-kinesis"
))]
pub(crate) fn owned<T: Clone>(page: &[&T]) -> Vec<T> {
    page.iter().map(|item| (*item).clone()).collect()
}

/// Bytes of an optional string.
#[cfg(any(feature = "batch-sqs", feature = "batch-s3"))]
pub(crate) fn opt_len(value: Option<&str>) -> usize {
    value.map_or(0, str::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_one_item_can_cause_is_recognised_in_either_form_of_its_code() {
        for code in [
            "BatchRequestTooLong",
            "AWS.SimpleQueueService.BatchRequestTooLong",
            "ValidationException",
        ] {
            assert!(Failure::new(code, "", false).blames_an_item(), "{code}");
        }
        assert!(!Failure::new("AccessDenied", "", false).blames_an_item());
        assert!(!Failure::new("ValidationException", "", true).blames_an_item());
    }
}
