//! Step 6b: receipts. A record put with [`Producer::put_with_receipt`](crate::Producer::put_with_receipt)
//! carries the sending half of a one-shot channel in its metadata, through aggregation,
//! re-splits and retries, to the place where it ends. Records put without one carry `None`
//! and cost a pointer-sized field.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use bytes::Bytes;

use crate::error::{DeliveryError, FailedRecord, FailureKind};
use crate::record::UserRecord;

/// Where an acknowledged record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The shard Kinesis wrote the record to (from the PutRecords result).
    pub shard_id: Arc<str>,
    /// The sequence number of the Kinesis record that carries it (shared by the records of
    /// one aggregate).
    pub sequence_number: Arc<str>,
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

    /// The receipt was dropped: nobody will read an outcome, so none needs to be built.
    pub fn is_dropped(&self) -> bool {
        self.0.is_closed()
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
}

impl Receipt {
    pub(crate) fn new() -> (ReceiptTx, Receipt) {
        let (tx, rx) = oneshot::channel();
        (ReceiptTx(tx), Receipt { rx })
    }
}

impl Future for Receipt {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            // Unreachable: every record ends acknowledged or failed, and both send here (the
            // sender's and the request tasks' drop guards fail what they hold). Should a bug
            // ever drop one silently, say so rather than hang; the record is not at hand.
            Poll::Ready(Err(_)) => Poll::Ready(Err(FailedRecord {
                record: UserRecord::new(Bytes::new(), String::new()),
                error: DeliveryError {
                    code: "Lost".into(),
                    message: "the producer ended without an outcome for this record (a bug)".into(),
                    kind: FailureKind::Stopped,
                },
                attempts: 0,
                shard_id: None,
            })),
        }
    }
}
