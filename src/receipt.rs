//! Step 6b: receipts. A record put with [`Producer::put_with_receipt`](crate::Producer::put_with_receipt)
//! carries the sending half of a one-shot channel in its metadata, through aggregation,
//! re-splits and retries, to the place where it ends. Records put without one carry `None`
//! and cost a pointer-sized field.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::error::{DeliveryError, FailedRecord};
use crate::record::UserRecord;

/// Where an acknowledged record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The shard Kinesis wrote the record to (from the PutRecords result).
    pub shard_id: Arc<str>,
    /// The sequence number of the Kinesis record that carries it.
    pub sequence_number: String,
    /// Its position inside that Kinesis record: the sub-sequence number consumers (the KCL,
    /// `deaggregate`) report for it. 0 for a record sent on its own.
    pub sub_sequence_number: u64,
    /// Whether the Kinesis record was an aggregate.
    pub aggregated: bool,
    /// PutRecords attempts that carried the record.
    pub attempts: u32,
}

pub(crate) type Outcome = Result<Delivered, FailedRecord>;

/// The sending half, kept in the record's metadata.
#[derive(Debug)]
pub(crate) struct ReceiptTx(oneshot::Sender<Outcome>);

impl ReceiptTx {
    /// Sends the outcome; a receipt dropped unread simply does not take it.
    pub fn send(self, outcome: Outcome) -> bool {
        self.0.send(outcome).is_ok()
    }
}

/// The outcome of one record, as a future: `Ok` with where it was written, or `Err` with the
/// same [`FailedRecord`] the failure stream carries.
///
/// Dropping a receipt unread loses nothing: the record is delivered (or reported on the failure
/// stream) as any other, and the outcome is discarded.
#[derive(Debug)]
pub struct Receipt {
    rx: oneshot::Receiver<Outcome>,
    /// Kept to report the record if the producer ever ended it without an outcome, which no
    /// path does: every record is acknowledged or failed, and the failure carries the record.
    record: Option<UserRecord>,
}

impl Receipt {
    pub(crate) fn new(record: &UserRecord) -> (ReceiptTx, Receipt) {
        let (tx, rx) = oneshot::channel();
        let receipt = Receipt {
            rx,
            record: Some(record.clone()),
        };
        (ReceiptTx(tx), receipt)
    }
}

impl Future for Receipt {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            Poll::Ready(Err(_)) => Poll::Ready(Err(FailedRecord {
                record: self
                    .record
                    .take()
                    .unwrap_or_else(|| UserRecord::new("", "")),
                error: DeliveryError::stopped(
                    "the producer ended without an outcome for this record",
                ),
                attempts: 0,
                shard_id: None,
            })),
        }
    }
}
