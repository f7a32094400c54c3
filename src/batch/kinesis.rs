//! Kinesis PutRecords in one call, without aggregation, for callers who don't want a
//! background [`Producer`](crate::Producer).
//!
//! - **Limits:** 500 records and 5 MiB per request; a record's data plus partition key at most
//!   1 MiB (raise it for streams with a larger `MaxRecordSizeInKiB`). The partition key is 1 to
//!   256 characters; an explicit hash key must be a decimal below 2^128.
//! - **Retried:** entries failed with `ProvisionedThroughputExceededException`, `InternalFailure`
//!   or `KMSThrottlingException`; others (KMS access errors, ...) come back as permanent.
//! - **Order:** pages run concurrently and retries go later, so records of one key may land out
//!   of order; use the producer with `preserve_order` when order matters.

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;

use super::{entry_result, owned, BatchCall, BatchConfigError, Failure, ItemResult, Limits};
use crate::retry::entry_error_is_transient;

/// Records per PutRecords.
pub const MAX_ITEMS: usize = 500;
/// Bytes per PutRecords (data and partition keys).
pub const MAX_BYTES: usize = 5 << 20;
/// Bytes per record (data and partition key) at the default stream setting.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// PutRecords to one stream, named or by ARN.
#[derive(Debug, Clone)]
pub struct PutRecords {
    client: Client,
    stream: Stream,
    limits: Limits,
}

#[derive(Debug, Clone)]
enum Stream {
    Name(String),
    Arn(String),
}

/// Where Kinesis put a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub shard_id: String,
    pub sequence_number: String,
}

impl PutRecords {
    pub fn new(client: Client, stream_name: impl Into<String>) -> Self {
        Self::to(client, Stream::Name(stream_name.into()))
    }

    pub fn with_arn(client: Client, stream_arn: impl Into<String>) -> Self {
        Self::to(client, Stream::Arn(stream_arn.into()))
    }

    fn to(client: Client, stream: Stream) -> Self {
        PutRecords {
            client,
            stream,
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

impl BatchCall for PutRecords {
    type Item = PutRecordsRequestEntry;
    type Output = Put;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn check(&self, entry: &PutRecordsRequestEntry) -> Result<usize, Failure> {
        let invalid =
            |message: String| Err(Failure::new("InvalidArgumentException", message, false));
        let key = entry.partition_key.as_deref().unwrap_or_default();
        let key_chars = key.chars().count();
        if !(1..=256).contains(&key_chars) {
            return invalid(format!(
                "the partition key has {key_chars} characters; 1 to 256 are allowed"
            ));
        }
        if let Some(hash_key) = entry.explicit_hash_key.as_deref() {
            if crate::record::parse_explicit_hash_key(hash_key).is_none() {
                return invalid(format!(
                    "explicit hash key {hash_key:?} is not a decimal below 2^128"
                ));
            }
        }
        Ok(entry.data.as_ref().len() + key.len())
    }

    async fn send(
        &self,
        page: &[&PutRecordsRequestEntry],
    ) -> Result<Vec<ItemResult<Put>>, Failure> {
        let request = self.client.put_records().set_records(Some(owned(page)));
        let request = match &self.stream {
            Stream::Name(name) => request.stream_name(name),
            Stream::Arn(arn) => request.stream_arn(arn),
        };
        let output = request
            .customize()
            .config_override(
                aws_sdk_kinesis::Config::builder().retry_config(RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        // Positional: entry i is about record i. Records past a short answer are retried.
        Ok(output
            .records()
            .iter()
            .take(page.len())
            .map(|entry| {
                entry_result(
                    entry.error_code.as_deref(),
                    entry.error_message.as_deref(),
                    entry_error_is_transient,
                    || Put {
                        shard_id: entry.shard_id.clone().unwrap_or_default(),
                        sequence_number: entry.sequence_number.clone().unwrap_or_default(),
                    },
                )
            })
            .collect())
    }
}
