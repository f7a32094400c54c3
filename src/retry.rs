//! Step 5b: the retry policy. Which errors are worth another attempt, and how long to wait.
//!
//! The producer owns retries of PutRecords: the SDK's retryer is switched off for that call so
//! that attempts are not multiplied (SDK retries inside producer retries), so that a throttled
//! request does not hold an in-flight slot while the SDK sleeps, and so that only the failed
//! entries of a request are sent again. Control-plane calls (ListShards) keep the client's own
//! retry configuration.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::http::Response as HttpResponse;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retry (before jitter).
    pub base_delay: Duration,
    /// Longest wait between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait after `attempts` failed attempts: `base * 2^(attempts-1)` capped at `max`, then
    /// "equal jitter" (uniform in the upper half) so that throttled producers spread out without
    /// ever retrying at once.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(20);
        let delay = self
            .base_delay
            .saturating_mul(1 << exponent)
            .min(self.max_delay);
        let half = delay / 2;
        // Up to `half` more, in nanoseconds (capped where a u64 ends: 584 years).
        let span = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter_nanos = random_u64() % span.saturating_add(1);
        half.saturating_add(Duration::from_nanos(jitter_nanos))
    }
}

/// A fast per-thread pseudo-random number (splitmix64), seeded once per thread from std's
/// randomly keyed hasher. Good enough to spread retries (jitter) and records (random partition
/// keys) evenly; not for secrets. Asking the kernel for randomness on every call would cost
/// more than the rest of a `put`.
pub(crate) fn random_u64() -> u64 {
    STATE.with(splitmix)
}

/// 128 random bits, from [`random_u64`]'s generator in one visit to its thread-local state.
pub(crate) fn random_u128() -> u128 {
    STATE.with(|state| (u128::from(splitmix(state)) << 64) | u128::from(splitmix(state)))
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(
        RandomState::new().hash_one((std::time::Instant::now(), std::thread::current().id())),
    );
}

/// splitmix64's next output.
fn splitmix(state: &Cell<u64>) -> u64 {
    let mut z = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
    state.set(z);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An error as the producer records it: code, message, and whether another attempt may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AttemptError {
    pub code: String,
    pub message: String,
    pub transient: bool,
}

/// Per-record error codes of a PutRecords result that are worth retrying. Anything else a server
/// returns per record (e.g. an oversize `InvalidArgumentException`) is permanent.
pub(crate) fn entry_error_is_transient(code: &str) -> bool {
    matches!(
        service_code(code),
        "ProvisionedThroughputExceededException"
            | "InternalFailure"
            | "InternalFailureException"
            | "ServiceUnavailable"
            | "KMSThrottlingException"
            | "ThrottlingException"
    )
}

/// An error code without the namespace some services put before it: SQS's JSON protocol
/// answers `AWS.SimpleQueueService.BatchRequestTooLong` and `KMS.ThrottlingException` for the
/// codes its documentation calls `BatchRequestTooLong` and (KMS's) `ThrottlingException`.
pub(crate) fn service_code(code: &str) -> &str {
    ["AWS.SimpleQueueService.", "KMS."]
        .iter()
        .find_map(|prefix| code.strip_prefix(prefix))
        .unwrap_or(code)
}

/// Whole-request error codes that are worth retrying.
fn request_code_is_transient(code: &str) -> bool {
    entry_error_is_transient(code)
        || matches!(
            service_code(code),
            "LimitExceededException"
                | "Throttling"
                | "RequestThrottled"
                | "RequestThrottledException"
                | "ThrottledException"
                | "ServiceUnavailableException"
                | "RequestTimeout"
                | "RequestTimeoutException"
                | "TooManyRequestsException"
                | "RequestLimitExceeded"
                | "SlowDown"
                | "InternalServerError"
                | "InternalServerException"
                | "InternalError"
        )
}

/// Classifies a failed SDK call.
pub(crate) fn classify_sdk_error<E>(error: &SdkError<E, HttpResponse>) -> AttemptError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, transient) = match error {
        // A request that could not be built or signed (bad config, no credentials) will not
        // build better next time.
        SdkError::ConstructionFailure(_) => ("ConstructionFailure".to_owned(), false),
        SdkError::TimeoutError(_) => ("Timeout".to_owned(), true),
        SdkError::DispatchFailure(_) => ("ConnectionError".to_owned(), true),
        SdkError::ResponseError(_) => ("ResponseError".to_owned(), true),
        SdkError::ServiceError(context) => {
            let status = context.raw().status().as_u16();
            match context.err().code() {
                Some(code) => (
                    code.to_owned(),
                    request_code_is_transient(code) || status >= 500 || status == 429,
                ),
                None => (format!("HTTP {status}"), status >= 500 || status == 429),
            }
        }
        _ => ("Unknown".to_owned(), true),
    };
    AttemptError {
        code,
        message: describe_sdk_error(error),
        transient,
    }
}

/// A one-line description of an SDK error, with its source chain (the SDK's own `Display`
/// says little more than "service error").
pub(crate) fn describe_sdk_error<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    if let SdkError::ServiceError(context) = error {
        let err = context.err();
        return match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => err.to_string(),
        };
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let policy = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        };
        for _ in 0..100 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.backoff(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let capped = policy.backoff(40);
            assert!(capped >= Duration::from_secs(1) && capped <= Duration::from_secs(2));
        }
    }

    #[test]
    fn the_longest_delays_do_not_overflow() {
        let policy = RetryPolicy {
            base_delay: Duration::MAX,
            max_delay: Duration::MAX,
        };
        for attempts in [1, 2, 64] {
            assert!(policy.backoff(attempts) >= Duration::MAX / 2);
        }
    }

    #[test]
    fn per_record_throttling_and_internal_failure_are_transient() {
        assert!(entry_error_is_transient(
            "ProvisionedThroughputExceededException"
        ));
        assert!(entry_error_is_transient("InternalFailure"));
        assert!(
            entry_error_is_transient("KMS.ThrottlingException"),
            "SQS's form"
        );
        assert!(!request_code_is_transient("KMS.AccessDeniedException"));
        assert_eq!(
            service_code("AWS.SimpleQueueService.BatchRequestTooLong"),
            "BatchRequestTooLong"
        );
        assert!(!entry_error_is_transient("InvalidArgumentException"));
        assert!(!entry_error_is_transient("KMSAccessDeniedException"));
        assert!(request_code_is_transient("ThrottlingException"));
        assert!(request_code_is_transient("Throttling"), "CloudWatch's code");
        assert!(!request_code_is_transient("ResourceNotFoundException"));
        assert!(!request_code_is_transient("AccessDeniedException"));
        assert!(!request_code_is_transient("ValidationException"));
    }
}
