//! Firehose PutRecordBatch.
//!
//! - **Limits:** 500 records and 4 MiB per request; 1,000 KiB per record.
//! - **Retried:** entries of `RequestResponses` with an `ErrorCode` that is transient
//!   (`ServiceUnavailableException`, `InternalFailure`, throttling); others (e.g. KMS access
//!   errors) come back as permanent. The answer is positional: entry `i` is about record `i`.

use aws_sdk_firehose::config::retry::RetryConfig;
use aws_sdk_firehose::types::Record;
use aws_sdk_firehose::Client;

use super::{entry_result, owned, BatchCall, BatchConfigError, Failure, ItemResult, Limits};

/// Records per PutRecordBatch.
pub const MAX_ITEMS: usize = 500;
/// Bytes per PutRecordBatch.
pub const MAX_BYTES: usize = 4 << 20;
/// Bytes per record (1,000 KiB).
pub const MAX_RECORD_BYTES: usize = 1000 * 1024;

/// PutRecordBatch to one delivery stream.
#[derive(Debug, Clone)]
pub struct PutRecordBatch {
    client: Client,
    delivery_stream: String,
    limits: Limits,
}

impl PutRecordBatch {
    pub fn new(client: Client, delivery_stream: impl Into<String>) -> Self {
        PutRecordBatch {
            client,
            delivery_stream: delivery_stream.into(),
            limits: Limits {
                max_items: MAX_ITEMS,
                max_bytes: MAX_BYTES,
                max_item_bytes: MAX_RECORD_BYTES,
            },
        }
    }

    pub fn limits(mut self, limits: Limits) -> Result<Self, BatchConfigError> {
        limits.validate(MAX_ITEMS)?;
        self.limits = limits;
        Ok(self)
    }
}

/// Error codes of a PutRecordBatch entry worth another attempt.
fn transient(code: &str) -> bool {
    matches!(
        code,
        "ServiceUnavailableException"
            | "ServiceUnavailable"
            | "InternalFailure"
            | "ThrottlingException"
    )
}

impl BatchCall for PutRecordBatch {
    type Item = Record;
    /// The record id Firehose gave the record.
    type Output = String;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn check(&self, record: &Record) -> Result<usize, Failure> {
        Ok(record.data.as_ref().len())
    }

    async fn send(&self, page: &[&Record]) -> Result<Vec<ItemResult<String>>, Failure> {
        let output = self
            .client
            .put_record_batch()
            .delivery_stream_name(&self.delivery_stream)
            .set_records(Some(owned(page)))
            .customize()
            .config_override(
                aws_sdk_firehose::Config::builder().retry_config(RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        // Positional: entry i is about record i. Records past a short answer are retried.
        Ok(output
            .request_responses()
            .iter()
            .take(page.len())
            .map(|entry| {
                entry_result(
                    entry.error_code.as_deref(),
                    entry.error_message.as_deref(),
                    transient,
                    || entry.record_id.clone().unwrap_or_default(),
                )
            })
            .collect())
    }
}
