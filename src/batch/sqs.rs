//! SQS SendMessageBatch, standard and FIFO queues, and DeleteMessageBatch.
//!
//! - **Limits:** 10 messages per request; a batch's bytes and one message's bytes are each at
//!   most 1 MiB (the current AWS limit; queues created before 2025 or with a lower
//!   `MaximumMessageSize` need [`SendMessageBatch::limits`] set to match, e.g. 256 KiB).
//!   A message's size is its body plus each attribute's name, type and value, as SQS counts it.
//! - **Checked before sending:** an empty body, characters SQS refuses, a delay outside 0..=900 s;
//!   on a FIFO queue (URL ending in `.fifo`) a missing `MessageGroupId` or a per-message delay.
//! - **Retried:** `Failed` entries whose fault is the service's (`SenderFault: false`); sender
//!   faults come back at once as [`ReasonKind::Permanent`](super::ReasonKind::Permanent).
//! - **Ids:** the helper numbers the entries of each request itself, so entries may carry any
//!   `Id` (even repeated ones); the `Id` you gave is the de-duplication key of a standard queue.
//! - **FIFO:** order per message group holds. Requests go one at a time, in order, each retried
//!   until done before the next, and carry at most one message of each group; once a message
//!   of a group is not delivered, the group's later messages are held back
//!   ([`ReasonKind::Blocked`](super::ReasonKind::Blocked)). With few groups that makes requests
//!   small: [`SendMessageBatch::strict_group_order`]`(false)` lets a request carry several
//!   messages of a group, and then order holds only while SQS accepts whole requests — if it
//!   fails one message, later messages of its group in that same request are already enqueued
//!   and the failed one lands after them on retry. De-duplication uses `MessageDeduplicationId`.

use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;

use super::{
    opt_len, unanswered_retried, BatchCall, BatchConfigError, Failure, ItemResult, Limits,
};

/// The most messages SendMessageBatch takes.
pub const MAX_ITEMS: usize = 10;
/// The batch and message size limit in force at AWS (1 MiB).
pub const MAX_BYTES: usize = 1 << 20;

/// SendMessageBatch to one queue.
#[derive(Debug, Clone)]
pub struct SendMessageBatch {
    client: Client,
    queue_url: String,
    fifo: bool,
    strict_group_order: bool,
    limits: Limits,
}

/// What SQS answered for a sent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub message_id: String,
    /// FIFO queues only.
    pub sequence_number: Option<String>,
}

impl SendMessageBatch {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        let queue_url = queue_url.into();
        SendMessageBatch {
            client,
            fifo: queue_url.ends_with(".fifo"),
            strict_group_order: true,
            queue_url,
            limits: Limits {
                max_items: MAX_ITEMS,
                max_bytes: MAX_BYTES,
                max_item_bytes: MAX_BYTES,
            },
        }
    }

    /// FIFO queues: at most one message of each message group per request (the default), or
    /// several, trading order under partial failures for bigger requests (see the module docs).
    pub fn strict_group_order(mut self, strict: bool) -> Self {
        self.strict_group_order = strict;
        self
    }

    /// Sets the limits (e.g. 256 KiB for a queue with that `MaximumMessageSize`).
    pub fn limits(mut self, limits: Limits) -> Result<Self, BatchConfigError> {
        limits.validate(MAX_ITEMS)?;
        self.limits = limits;
        Ok(self)
    }
}

/// The size SQS counts for a message: body, and each attribute's name, type and value.
pub fn message_size(entry: &SendMessageBatchRequestEntry) -> usize {
    let attributes = entry.message_attributes.iter().flatten();
    entry.message_body.len()
        + attributes
            .map(|(name, value)| {
                name.len()
                    + value.data_type.len()
                    + opt_len(value.string_value.as_deref())
                    + value.binary_value.as_ref().map_or(0, |b| b.as_ref().len())
            })
            .sum::<usize>()
}

/// Whether SQS accepts `c` in a message body: #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to
/// #xFFFD | #x10000 to #x10FFFF.
fn allowed_in_body(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | ' '..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

impl BatchCall for SendMessageBatch {
    type Item = SendMessageBatchRequestEntry;
    type Output = Sent;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn check(&self, entry: &Self::Item) -> Result<usize, Failure> {
        let invalid = |message: String| Err(Failure::new("InvalidParameterValue", message, false));
        if entry.message_body.is_empty() {
            return invalid("the message body is empty".to_owned());
        }
        if let Some(bad) = entry.message_body.chars().find(|c| !allowed_in_body(*c)) {
            return invalid(format!(
                "the body contains {bad:?}, which SQS does not accept"
            ));
        }
        if let Some(delay) = entry.delay_seconds {
            if self.fifo {
                return invalid("FIFO queues take no per-message DelaySeconds".to_owned());
            }
            if !(0..=900).contains(&delay) {
                return invalid(format!("DelaySeconds {delay} is outside 0..=900"));
            }
        }
        if self.fifo && entry.message_group_id.is_none() {
            return invalid("a FIFO queue needs a MessageGroupId".to_owned());
        }
        if opt_len(entry.message_deduplication_id.as_deref()) > 128 {
            return invalid("MessageDeduplicationId is longer than 128 characters".to_owned());
        }
        Ok(message_size(entry))
    }

    async fn send(&self, page: &[&Self::Item]) -> Result<Vec<ItemResult<Sent>>, Failure> {
        let entries = numbered(page, |entry| &mut entry.id);
        let output = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .customize()
            .config_override(aws_sdk_sqs::Config::builder().retry_config(RetryConfig::disabled()))
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        let sent = output.successful().iter().map(|ok| {
            let sent = Sent {
                message_id: ok.message_id.clone(),
                sequence_number: ok.sequence_number.clone(),
            };
            (ok.id.as_str(), sent)
        });
        Ok(results_by_position(page.len(), sent, output.failed()))
    }

    fn dedup_key(&self, entry: &Self::Item) -> Option<String> {
        if self.fifo {
            entry.message_deduplication_id.clone()
        } else {
            Some(entry.id.clone())
        }
    }

    fn order_key(&self, entry: &Self::Item) -> Option<String> {
        self.fifo.then(|| entry.message_group_id.clone()).flatten()
    }

    fn strict_order(&self) -> bool {
        self.strict_group_order
    }
}

/// The page's entries with their positions as ids: the request is valid whatever ids the caller
/// used, and the answer maps back without a lookup.
fn numbered<T: Clone>(page: &[&T], id: impl Fn(&mut T) -> &mut String) -> Vec<T> {
    let number = |(position, entry): (usize, &&T)| {
        let mut entry = (*entry).clone();
        *id(&mut entry) = position.to_string();
        entry
    };
    page.iter().enumerate().map(number).collect()
}

/// The results of an SQS batch answer whose entry ids are positions in the page: `Successful`
/// ones done, `Failed` ones retried unless the sender is at fault, unmentioned ones retried.
fn results_by_position<'a, O>(
    len: usize,
    successful: impl Iterator<Item = (&'a str, O)>,
    failed: &[BatchResultErrorEntry],
) -> Vec<ItemResult<O>> {
    let mut results: Vec<Option<ItemResult<O>>> = (0..len).map(|_| None).collect();
    let slot = |id: &str| id.parse::<usize>().ok().filter(|p| *p < len);
    for (id, output) in successful {
        if let Some(position) = slot(id) {
            results[position] = Some(ItemResult::Done(output));
        }
    }
    for failed in failed {
        if let Some(position) = slot(&failed.id) {
            results[position] = Some(ItemResult::Failed(Failure::new(
                failed.code.clone(),
                failed.message.clone().unwrap_or_default(),
                !failed.sender_fault,
            )));
        }
    }
    unanswered_retried(results)
}

/// DeleteMessageBatch on one queue: 10 receipt handles per request. Entries with a transient
/// `Failed` result are retried; an invalid or expired receipt handle (a sender fault) comes back
/// at once. The helper numbers the entries itself, as for sending.
#[derive(Debug, Clone)]
pub struct DeleteMessageBatch {
    client: Client,
    queue_url: String,
}

impl DeleteMessageBatch {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        DeleteMessageBatch {
            client,
            queue_url: queue_url.into(),
        }
    }
}

impl BatchCall for DeleteMessageBatch {
    type Item = DeleteMessageBatchRequestEntry;
    type Output = ();

    fn limits(&self) -> Limits {
        Limits {
            max_items: MAX_ITEMS,
            max_bytes: usize::MAX,
            max_item_bytes: usize::MAX,
        }
    }

    fn check(&self, entry: &Self::Item) -> Result<usize, Failure> {
        if entry.receipt_handle.is_empty() {
            return Err(Failure::new(
                "ReceiptHandleIsInvalid",
                "the receipt handle is empty",
                false,
            ));
        }
        Ok(entry.receipt_handle.len())
    }

    async fn send(&self, page: &[&Self::Item]) -> Result<Vec<ItemResult<()>>, Failure> {
        let entries = numbered(page, |entry| &mut entry.id);
        let output = self
            .client
            .delete_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .customize()
            .config_override(aws_sdk_sqs::Config::builder().retry_config(RetryConfig::disabled()))
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        let deleted = output.successful().iter().map(|ok| (ok.id.as_str(), ()));
        Ok(results_by_position(page.len(), deleted, output.failed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_characters_follow_the_sqs_rule() {
        assert!("tab\tnew\nline\r é 😀".chars().all(allowed_in_body));
        assert!(!allowed_in_body('\u{0}'));
        assert!(!allowed_in_body('\u{1F}'));
        assert!(!allowed_in_body('\u{FFFE}'));
    }
}
