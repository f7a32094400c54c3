//! How put threads hand finished Kinesis records to the sender without waking it for each.
//!
//! A full aggregate is a Kinesis record, and at 100-byte records one closes every few hundred
//! `put`s. Handed over as a channel message, each woke the sender's task, and usually its
//! thread, to add one record to requests that go out only when full or due: on a 2-core
//! machine, a hundred wake-ups per request cost more than everything else `put` does beyond
//! the floor. A put thread now leaves the record in the [`Mailbox`], and wakes the sender only
//! when the sender sleeps and the record changes what it would do: the record is due (its
//! buffered time or its TTL ends) before the sender's wake-up, or the records left since then
//! fill a request.
//!
//! The sender collects everything at the top of each pass and after each message it receives
//! (so the records handed over before a `Flush`, `Stop` or `MapRefreshed` are handled before
//! it), and sleeps only with the mailbox empty. The lock makes the two sides agree: a record
//! is either collected by the sender before it sleeps, or left while it sleeps, and then its
//! put thread reads under the same lock the sleep it must compare with.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use crate::sync::lock;

/// Items left for the sender; see the module's documentation.
#[derive(Debug)]
pub(crate) struct Mailbox<T> {
    inner: Mutex<Mail<T>>,
}

#[derive(Debug)]
struct Mail<T> {
    /// What was left since the sender last collected (so, while it sleeps, since it went to
    /// sleep: it sleeps only with nothing left), and their request bytes.
    items: VecDeque<T>,
    bytes: usize,
    /// What the sleeping sender waits for; `None` while it is awake (it collects before it
    /// sleeps again) and once a put thread has been told to wake it.
    sleep: Option<Sleep>,
    /// The sender is gone: nothing more is accepted.
    closed: bool,
}

/// What wakes a sleeping sender: an item due before `until`, or items that bring what it
/// holds to a full request (`room_count` items or `room_bytes` bytes more). Room of zero
/// wakes it for anything (it is flushing or stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sleep {
    pub until: Instant,
    pub room_count: usize,
    pub room_bytes: usize,
}

/// What [`Mailbox::leave`] asks of its caller.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Left<T> {
    /// Left; the sender will collect it in time.
    Quietly,
    /// Left; the caller must wake the sender.
    WakeSender,
    /// The sender is gone: the item comes back.
    Refused(T),
}

impl<T> Mailbox<T> {
    pub fn new() -> Self {
        Mailbox {
            inner: Mutex::new(Mail {
                items: VecDeque::new(),
                bytes: 0,
                sleep: None,
                closed: false,
            }),
        }
    }

    /// Leaves `item`, of `bytes` request bytes, which the sender must handle by `due`. Only
    /// the first caller that must wake a sleeping sender is told to; later ones find it being
    /// woken.
    pub fn leave(&self, item: T, bytes: usize, due: Instant) -> Left<T> {
        let mut mail = lock(&self.inner);
        if mail.closed {
            return Left::Refused(item);
        }
        mail.items.push_back(item);
        mail.bytes += bytes;
        match mail.sleep {
            Some(sleep)
                if due < sleep.until
                    || mail.items.len() >= sleep.room_count
                    || mail.bytes >= sleep.room_bytes =>
            {
                mail.sleep = None;
                Left::WakeSender
            }
            _ => Left::Quietly,
        }
    }

    /// The sender, awake: moves what was left into `into`, in the order it was left. `into`
    /// must be empty; its buffer is kept for the next time.
    pub fn collect(&self, into: &mut VecDeque<T>) {
        debug_assert!(into.is_empty());
        let mut mail = lock(&self.inner);
        mail.sleep = None;
        mail.bytes = 0;
        std::mem::swap(&mut mail.items, into);
    }

    /// The sender, about to sleep: returns `false`, recording nothing, when something was
    /// left since it last collected (it must collect first).
    pub fn try_sleep(&self, sleep: Sleep) -> bool {
        let mut mail = lock(&self.inner);
        if !mail.items.is_empty() {
            return false;
        }
        mail.sleep = Some(sleep);
        true
    }

    /// The sender woke: until it sleeps again, nothing left for it needs to wake it.
    pub fn awake(&self) {
        lock(&self.inner).sleep = None;
    }

    /// The sender is gone: refuses what comes from now on, and returns what is left.
    pub fn close(&self) -> VecDeque<T> {
        let mut mail = lock(&self.inner);
        mail.closed = true;
        std::mem::take(&mut mail.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sleep(until: Instant, room_count: usize, room_bytes: usize) -> Sleep {
        Sleep {
            until,
            room_count,
            room_bytes,
        }
    }

    #[test]
    fn a_put_thread_wakes_the_sender_only_when_its_record_changes_what_the_sender_would_do() {
        let mailbox = Mailbox::new();
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut collected = VecDeque::new();
        // Awake: nothing wakes it, and it may not sleep before it collects.
        assert_eq!(mailbox.leave(1, 10, now), Left::Quietly);
        assert!(!mailbox.try_sleep(sleep(now + ms(50), 3, 100)));
        mailbox.collect(&mut collected);
        assert_eq!(collected, vec![1]);
        collected.clear();
        // Asleep until 50 ms with room for 3 records or 100 bytes: records due later stay
        // until the third one fills the request.
        assert!(mailbox.try_sleep(sleep(now + ms(50), 3, 100)));
        assert_eq!(mailbox.leave(2, 10, now + ms(80)), Left::Quietly);
        assert_eq!(mailbox.leave(3, 10, now + ms(50)), Left::Quietly);
        assert_eq!(mailbox.leave(4, 10, now + ms(90)), Left::WakeSender);
        // Being woken: later ones need not wake it again.
        assert_eq!(mailbox.leave(5, 10, now), Left::Quietly);
        mailbox.collect(&mut collected);
        assert_eq!(collected, vec![2, 3, 4, 5]);
        collected.clear();
        // The bytes fill it as well.
        assert!(mailbox.try_sleep(sleep(now + ms(50), 3, 100)));
        assert_eq!(mailbox.leave(6, 60, now + ms(80)), Left::Quietly);
        assert_eq!(mailbox.leave(7, 40, now + ms(80)), Left::WakeSender);
        mailbox.collect(&mut collected);
        collected.clear();
        // A record due before the wake-up wakes it at once; so does anything when its room is
        // zero (flushing).
        assert!(mailbox.try_sleep(sleep(now + ms(50), 3, 100)));
        assert_eq!(mailbox.leave(8, 1, now + ms(49)), Left::WakeSender);
        mailbox.collect(&mut collected);
        collected.clear();
        assert!(mailbox.try_sleep(sleep(now + ms(50), 0, 0)));
        assert_eq!(mailbox.leave(9, 1, now + ms(500)), Left::WakeSender);
        // Woken by something else: `awake` stops put threads waking it again.
        mailbox.collect(&mut collected);
        collected.clear();
        assert!(mailbox.try_sleep(sleep(now + ms(50), 0, 0)));
        mailbox.awake();
        assert_eq!(mailbox.leave(10, 1, now), Left::Quietly);
        // Closed: what is left comes back, and later items are refused.
        assert_eq!(mailbox.close(), vec![10]);
        assert_eq!(mailbox.leave(11, 1, now), Left::Refused(11));
    }

    #[test]
    fn a_sleeping_sender_sees_every_record_in_time() {
        // A sender thread that collects, then sleeps until its next due record (a minute when
        // it holds none) unless woken; put threads leave records due soon, then pause for
        // 600 ms. Every record must be collected, each within 400 ms of being due (room for a
        // busy machine): without the wake-up, the sender would sleep through each pause.
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc};
        let mailbox = Arc::new(Mailbox::<Instant>::new());
        let done = Arc::new(AtomicBool::new(false));
        let (wake_tx, wake_rx) = mpsc::channel::<()>();
        let sender = {
            let (mailbox, done) = (Arc::clone(&mailbox), Arc::clone(&done));
            std::thread::spawn(move || {
                let (mut handled, mut latest) = (0u32, Duration::ZERO);
                let mut collected = VecDeque::new();
                let mut held: Vec<Instant> = Vec::new();
                loop {
                    mailbox.collect(&mut collected);
                    held.extend(collected.drain(..));
                    let now = Instant::now();
                    held.retain(|due| {
                        if *due > now {
                            return true;
                        }
                        latest = latest.max(now - *due);
                        handled += 1;
                        false
                    });
                    if done.load(Ordering::SeqCst) && held.is_empty() {
                        return (handled, latest);
                    }
                    let until = held
                        .iter()
                        .min()
                        .copied()
                        .unwrap_or(now + Duration::from_secs(60));
                    if mailbox.try_sleep(sleep(until, 1_000, usize::MAX)) {
                        let _ = wake_rx.recv_timeout(until.saturating_duration_since(now));
                    }
                }
            })
        };
        let mailbox_here = Arc::clone(&mailbox);
        let wake = move |due| mailbox_here.leave(due, 1, due) == Left::WakeSender;
        let items = crate::deadlines::tests::leave_with_pauses(wake, &done, &wake_tx);
        let (handled, latest) = sender.join().unwrap();
        assert_eq!(handled, items);
        assert!(
            latest < Duration::from_millis(400),
            "a record was handled {latest:?} after it was due"
        );
    }
}
