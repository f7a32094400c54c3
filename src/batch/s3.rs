//! S3 DeleteObjects.
//!
//! - **Limits:** 1,000 keys per request; a key is 1 to 1,024 bytes. There is no byte limit on
//!   the request beyond that.
//! - **Versioned keys:** give `version_id` to delete one version; without it a versioned bucket
//!   gets a delete marker, reported in [`Deleted`].
//! - **Retried:** entries of `Errors` whose code is transient (`InternalError`, `SlowDown`,
//!   `ServiceUnavailable`, `RequestTimeout`, `OperationAborted`). Others (`AccessDenied`,
//!   `NoSuchVersion`, ...) come back as permanent. Deleting a key that does not exist succeeds,
//!   as S3 does it.

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;

use super::{
    opt_len, owned, unanswered_retried, BatchCall, BatchConfigError, Failure, ItemResult, Limits,
};

/// Keys per DeleteObjects.
pub const MAX_ITEMS: usize = 1000;
/// Bytes of a key.
pub const MAX_KEY_BYTES: usize = 1024;

/// DeleteObjects in one bucket.
#[derive(Debug, Clone)]
pub struct DeleteObjects {
    client: Client,
    bucket: String,
    limits: Limits,
}

/// What S3 answered for a deleted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The version deleted, when one was named.
    pub version_id: Option<String>,
    /// Whether a delete marker was created (versioned bucket, no version named) or deleted.
    pub delete_marker: Option<bool>,
    pub delete_marker_version_id: Option<String>,
}

impl DeleteObjects {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        DeleteObjects {
            client,
            bucket: bucket.into(),
            limits: Limits {
                max_items: MAX_ITEMS,
                max_bytes: usize::MAX,
                max_item_bytes: usize::MAX,
            },
        }
    }

    pub fn limits(mut self, limits: Limits) -> Result<Self, BatchConfigError> {
        limits.validate(MAX_ITEMS)?;
        self.limits = limits;
        Ok(self)
    }
}

/// Error codes of a DeleteObjects entry worth another attempt.
fn transient(code: &str) -> bool {
    matches!(
        code,
        "InternalError" | "SlowDown" | "ServiceUnavailable" | "RequestTimeout" | "OperationAborted"
    )
}

impl BatchCall for DeleteObjects {
    type Item = ObjectIdentifier;
    type Output = Deleted;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn check(&self, object: &ObjectIdentifier) -> Result<usize, Failure> {
        if object.key.is_empty() || object.key.len() > MAX_KEY_BYTES {
            return Err(Failure::new(
                "KeyTooLongError",
                format!(
                    "a key is 1 to {MAX_KEY_BYTES} bytes, this one {}",
                    object.key.len()
                ),
                false,
            ));
        }
        Ok(object.key.len() + opt_len(object.version_id.as_deref()))
    }

    async fn send(&self, page: &[&ObjectIdentifier]) -> Result<Vec<ItemResult<Deleted>>, Failure> {
        let delete = Delete::builder()
            .set_objects(Some(owned(page)))
            .quiet(false)
            .build()
            .map_err(|e| Failure::new("InvalidRequest", e.to_string(), false))?;
        let output = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .customize()
            .config_override(aws_sdk_s3::Config::builder().retry_config(RetryConfig::disabled()))
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        let mut results: Vec<Option<ItemResult<Deleted>>> = page.iter().map(|_| None).collect();
        // An answer names the key and, when one was given, the version; the first object of the
        // page it fits that has no answer yet is the one it is about: one asking for exactly
        // that version before one that named none (for which the answer can give the version
        // S3 chose).
        let mut answer = |key: Option<&str>, version: Option<&str>, result: ItemResult<Deleted>| {
            let unanswered = |exact: bool| {
                page.iter().zip(&results).position(|(object, slot)| {
                    slot.is_none()
                        && Some(object.key.as_str()) == key
                        && if exact {
                            version.is_some() && object.version_id.as_deref() == version
                        } else {
                            object.version_id.is_none()
                        }
                })
            };
            if let Some(position) = unanswered(true).or_else(|| unanswered(false)) {
                results[position] = Some(result);
            }
        };
        for deleted in output.deleted() {
            answer(
                deleted.key.as_deref(),
                deleted.version_id.as_deref(),
                ItemResult::Done(Deleted {
                    version_id: deleted.version_id.clone(),
                    delete_marker: deleted.delete_marker,
                    delete_marker_version_id: deleted.delete_marker_version_id.clone(),
                }),
            );
        }
        for error in output.errors() {
            let code = error.code.clone().unwrap_or_else(|| "Unknown".to_owned());
            let failure = Failure::new(
                &code,
                error.message.clone().unwrap_or_default(),
                transient(&code),
            );
            answer(
                error.key.as_deref(),
                error.version_id.as_deref(),
                ItemResult::Failed(failure),
            );
        }
        Ok(unanswered_retried(results))
    }

    fn dedup_key(&self, object: &ObjectIdentifier) -> Option<String> {
        Some(format!(
            "{}\u{0}{}",
            object.key,
            object.version_id.as_deref().unwrap_or_default()
        ))
    }
}
