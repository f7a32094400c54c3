//! Step 4a: the backlog. Bounds what the producer holds, in records and in bytes, and keeps the
//! book that `flush` waits on.
//!
//! A record takes its room at `put` and gives it back when it ends: acknowledged by Kinesis, or
//! reported failed. So everything between `put` and that end (aggregators, requests being
//! assembled, requests in flight, retries waiting out their backoff) counts against the bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::{watch, Semaphore, TryAcquireError};

use crate::sync::lock;

pub(crate) struct Backlog {
    records: Semaphore,
    bytes: Semaphore,
    max_bytes: usize,
    /// Puts waiting in `acquire`.
    waiting: AtomicUsize,
    epochs: Mutex<EpochBook>,
    /// The oldest flush epoch that still has records outstanding (or the current epoch when
    /// none has): every epoch below it is finished.
    finished_below: watch::Sender<u64>,
}

/// One put counted in `Backlog::waiting` while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Outstanding records per flush epoch. `flush` starts a new epoch and waits until every older
/// one has no record left, so records put after the call never delay it.
struct EpochBook {
    current: u64,
    outstanding: VecDeque<(u64, u64)>,
}

/// Why room could not be taken.
pub(crate) enum NoRoom {
    Full,
    Closed,
}

impl Backlog {
    pub fn new(max_records: usize, max_bytes: usize) -> Self {
        Backlog {
            records: Semaphore::new(max_records),
            bytes: Semaphore::new(max_bytes),
            max_bytes,
            waiting: AtomicUsize::new(0),
            epochs: Mutex::new(EpochBook {
                current: 0,
                outstanding: VecDeque::new(),
            }),
            finished_below: watch::Sender::new(0),
        }
    }

    /// Once [`try_acquire`](Self::try_acquire) found the backlog full: calls `on_full` and
    /// waits for room for one record of `bytes` bytes.
    pub async fn wait_for_room(&self, bytes: u32, on_full: impl FnOnce()) -> Result<(), NoRoom> {
        // Counted as waiting until this returns or is dropped.
        let _waiting = Waiting::new(&self.waiting);
        on_full();
        let record = self.records.acquire().await.map_err(|_| NoRoom::Closed)?;
        match self.bytes.acquire_many(bytes).await {
            Ok(room) => {
                record.forget();
                room.forget();
                Ok(())
            }
            Err(_) => Err(NoRoom::Closed),
        }
    }

    /// Whether a put is waiting for room now.
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Takes room for one record if there is some now.
    pub fn try_acquire(&self, bytes: u32) -> Result<(), NoRoom> {
        let map = |e| match e {
            TryAcquireError::Closed => NoRoom::Closed,
            TryAcquireError::NoPermits => NoRoom::Full,
        };
        let record = self.records.try_acquire().map_err(map)?;
        let room = self.bytes.try_acquire_many(bytes).map_err(map)?;
        record.forget();
        room.forget();
        Ok(())
    }

    /// Bytes of the records held now.
    pub fn bytes_held(&self) -> usize {
        self.max_bytes
            .saturating_sub(self.bytes.available_permits())
    }

    /// Gives back the room of `records` records totalling `bytes` bytes.
    pub fn release(&self, records: usize, bytes: usize) {
        self.records.add_permits(records);
        self.bytes.add_permits(bytes);
    }

    /// Wakes every waiting `acquire` with `Closed`; later ones fail at once.
    pub fn close(&self) {
        self.records.close();
        self.bytes.close();
    }

    /// Counts one accepted record in the current epoch and returns that epoch.
    pub fn enter_epoch(&self) -> u64 {
        let mut book = lock(&self.epochs);
        let current = book.current;
        match book.outstanding.back_mut() {
            Some((epoch, count)) if *epoch == current => *count += 1,
            _ => book.outstanding.push_back((current, 1)),
        }
        current
    }

    /// `count` records of `epoch` have ended.
    pub fn leave_epoch(&self, epoch: u64, count: u64) {
        let mut book = lock(&self.epochs);
        let position = book.outstanding.partition_point(|(e, _)| *e < epoch);
        if let Some((e, outstanding)) = book.outstanding.get_mut(position) {
            if *e == epoch {
                *outstanding = outstanding.saturating_sub(count);
            }
        }
        let before = book.outstanding.front().map(|(e, _)| *e);
        while book.outstanding.front().is_some_and(|(_, n)| *n == 0) {
            book.outstanding.pop_front();
        }
        if book.outstanding.front().map(|(e, _)| *e) != before {
            self.publish(&book);
        }
    }

    /// Starts a new epoch; returns the one `flush` must see finished.
    pub fn begin_flush(&self) -> u64 {
        let mut book = lock(&self.epochs);
        let target = book.current;
        book.current += 1;
        self.publish(&book);
        target
    }

    /// Returns once every record of `epoch` and earlier has ended.
    pub async fn flushed(&self, epoch: u64) {
        let mut finished = self.finished_below.subscribe();
        // The sender lives as long as `self`, so this only ends when the condition holds.
        let _ = finished.wait_for(|below| *below > epoch).await;
    }

    fn publish(&self, book: &EpochBook) {
        let below = book
            .outstanding
            .front()
            .map_or(book.current, |(epoch, _)| *epoch);
        self.finished_below.send_replace(below);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_bounded_in_records_and_bytes() {
        let backlog = Backlog::new(2, 100);
        assert!(backlog.try_acquire(60).is_ok());
        assert!(matches!(backlog.try_acquire(60), Err(NoRoom::Full)));
        assert!(backlog.try_acquire(40).is_ok());
        assert!(matches!(backlog.try_acquire(0), Err(NoRoom::Full)));
        backlog.release(2, 100);
        backlog.close();
        assert!(matches!(backlog.try_acquire(1), Err(NoRoom::Closed)));
    }

    #[tokio::test]
    async fn flush_waits_only_for_earlier_epochs() {
        let backlog = Backlog::new(10, 10);
        let first = backlog.enter_epoch();
        let target = backlog.begin_flush();
        let later = backlog.enter_epoch();
        assert_eq!((first, target, later), (0, 0, 1));
        let flushed = backlog.flushed(target);
        tokio::pin!(flushed);
        assert!(futures_poll_once(flushed.as_mut()).await.is_none());
        backlog.leave_epoch(first, 1);
        // The later record is still outstanding, and the flush is done anyway.
        flushed.await;
        backlog.leave_epoch(later, 1);
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        tokio::time::timeout(std::time::Duration::from_millis(20), f)
            .await
            .ok()
    }
}
