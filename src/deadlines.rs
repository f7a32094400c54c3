//! The sender's aggregate deadlines: how put threads leave them for it, and how it keeps them.
//!
//! Every aggregate that receives its first record gets a deadline, so a stream of thousands of
//! shards makes one per Kinesis record, and most of them lie a whole buffered time ahead, long
//! after the sender's next wake-up. [`LeftDeadlines`] lets a put thread leave such a deadline
//! for the sender to collect when it next wakes, and has it wake the sender only when the
//! deadline comes before that. (A channel message per deadline would wake the sender's task,
//! and often its thread, once per Kinesis record.)
//!
//! [`MostlySorted`] keeps them. Each deadline is a record's put time plus a buffered time less
//! a lead that changes slowly, so most arrive later than the one before. Keys that arrive in
//! order wait in a `VecDeque`, where pushing and popping touch only its ends; those that
//! arrive earlier than the latest key (after a put waited for backlog room, or while the lead
//! grows) wait in a binary heap beside it, no worse off than in a binary heap alone, which paid
//! a chain of cache misses for every pop once it held thousands of deadlines.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::sync::lock;

/// Deadlines put threads left for the sender, and whether the sender sleeps past them.
///
/// Both sit behind one lock, so that a deadline is either collected in time by the sender or
/// seen by its put thread as due before the sender wakes: the sender records when it will wake
/// only if no deadline left for it comes sooner ([`try_sleep_until`](Self::try_sleep_until)),
/// and a put thread reads that time under the same lock as it leaves its deadline
/// ([`leave`](Self::leave)).
#[derive(Debug)]
pub(crate) struct LeftDeadlines<K> {
    inner: Mutex<Left<K>>,
}

#[derive(Debug)]
struct Left<K> {
    deadlines: Vec<(Instant, K)>,
    /// The earliest of `deadlines`.
    earliest: Option<Instant>,
    /// When the sleeping sender wakes by itself; `None` while it is awake (it collects before
    /// it sleeps again) and once a put thread has been told to wake it.
    sleeps_until: Option<Instant>,
}

impl<K> LeftDeadlines<K> {
    pub fn new() -> Self {
        LeftDeadlines {
            inner: Mutex::new(Left {
                deadlines: Vec::new(),
                earliest: None,
                sleeps_until: None,
            }),
        }
    }

    /// Leaves a deadline for the sender. Returns `true` when the caller must wake the sender:
    /// it sleeps past `at`. Only the first such caller is told to; later ones find the sender
    /// being woken.
    pub fn leave(&self, at: Instant, key: K) -> bool {
        let mut left = lock(&self.inner);
        left.deadlines.push((at, key));
        left.earliest = Some(left.earliest.map_or(at, |earliest| earliest.min(at)));
        match left.sleeps_until {
            Some(wake) if at < wake => {
                left.sleeps_until = None;
                true
            }
            _ => false,
        }
    }

    /// The sender, awake: moves the deadlines left so far into `into`, which must be empty
    /// (its buffer is kept for the next time).
    pub fn collect(&self, into: &mut Vec<(Instant, K)>) {
        debug_assert!(into.is_empty());
        let mut left = lock(&self.inner);
        left.sleeps_until = None;
        left.earliest = None;
        std::mem::swap(&mut left.deadlines, into);
    }

    /// The sender, about to sleep until `wake` at the latest: returns `false`, recording
    /// nothing, when a deadline left since it last collected comes before `wake` (it must
    /// collect first). Later ones stay until it wakes.
    pub fn try_sleep_until(&self, wake: Instant) -> bool {
        let mut left = lock(&self.inner);
        if left.earliest.is_some_and(|earliest| earliest < wake) {
            return false;
        }
        left.sleeps_until = Some(wake);
        true
    }

    /// The sender woke: until it sleeps again, nothing left for it needs to wake it.
    pub fn awake(&self) {
        lock(&self.inner).sleeps_until = None;
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.inner).deadlines.is_empty()
    }
}

/// A priority queue, smallest key first, for keys that mostly arrive in ascending order.
#[derive(Debug)]
pub(crate) struct MostlySorted<K> {
    /// Keys in ascending order.
    sorted: VecDeque<K>,
    /// Keys that arrived earlier than the last key of `sorted`.
    strays: BinaryHeap<Reverse<K>>,
}

impl<K: Ord + Copy> MostlySorted<K> {
    pub fn new() -> Self {
        MostlySorted {
            sorted: VecDeque::new(),
            strays: BinaryHeap::new(),
        }
    }

    pub fn push(&mut self, key: K) {
        match self.sorted.back() {
            Some(last) if key < *last => self.strays.push(Reverse(key)),
            _ => self.sorted.push_back(key),
        }
    }

    /// The smallest key.
    pub fn peek(&self) -> Option<K> {
        match (self.sorted.front(), self.strays.peek()) {
            (Some(a), Some(Reverse(b))) => Some(*a.min(b)),
            (a, b) => a.copied().or(b.map(|Reverse(b)| *b)),
        }
    }

    /// Takes the smallest key.
    pub fn pop(&mut self) -> Option<K> {
        let from_strays = match (self.sorted.front(), self.strays.peek()) {
            (Some(a), Some(Reverse(b))) => b < a,
            (None, Some(_)) => true,
            _ => false,
        };
        if from_strays {
            self.strays.pop().map(|Reverse(key)| key)
        } else {
            self.sorted.pop_front()
        }
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.strays.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_put_thread_wakes_the_sender_only_for_a_deadline_before_its_wake_up() {
        let left = LeftDeadlines::new();
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut collected = Vec::new();
        // Awake: nothing wakes it. A deadline before its wake-up must be collected first; a
        // later one may wait for it.
        assert!(!left.leave(now + ms(5), 1));
        assert!(!left.try_sleep_until(now + ms(50)));
        assert!(left.try_sleep_until(now + ms(5)));
        left.collect(&mut collected);
        assert_eq!(collected, vec![(now + ms(5), 1)]);
        collected.clear();
        assert!(left.is_empty());
        // Asleep until 50 ms: a later deadline waits for it, an earlier one wakes it, once.
        assert!(left.try_sleep_until(now + ms(50)));
        assert!(!left.leave(now + ms(80), 2));
        assert!(!left.leave(now + ms(50), 3));
        assert!(left.leave(now + ms(10), 4));
        assert!(!left.leave(now + ms(1), 5));
        left.collect(&mut collected);
        let keys: Vec<u32> = collected.iter().map(|(_, k)| *k).collect();
        assert_eq!(keys, vec![2, 3, 4, 5]);
        collected.clear();
        // Awake again after collecting: nothing wakes it until it sleeps.
        assert!(!left.leave(now, 6));
        // Woken by something else while asleep: `awake` stops put threads waking it again.
        left.collect(&mut collected);
        assert!(left.try_sleep_until(now + ms(50)));
        left.awake();
        assert!(!left.leave(now + ms(1), 7));
    }

    #[test]
    fn a_sleeping_sender_sees_a_deadline_left_for_it_in_time() {
        // A sender thread that sleeps until its next deadline (a minute when it has none)
        // unless woken, and put threads that leave a few near deadlines and then pause for
        // 600 ms. Each deadline must be seen within 400 ms of being due (room for a busy
        // machine): without the wake-up, the sender would sleep through each pause.
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc};
        let left = Arc::new(LeftDeadlines::<u32>::new());
        let done = Arc::new(AtomicBool::new(false));
        let (wake_tx, wake_rx) = mpsc::channel::<()>();
        let sender = {
            let (left, done) = (Arc::clone(&left), Arc::clone(&done));
            std::thread::spawn(move || {
                let (mut fired, mut latest) = (0u32, Duration::ZERO);
                let mut collected = Vec::new();
                let mut pending = MostlySorted::new();
                loop {
                    left.collect(&mut collected);
                    for (at, key) in collected.drain(..) {
                        pending.push((at, key));
                    }
                    let now = Instant::now();
                    while let Some((at, _)) = pending.peek().filter(|(at, _)| *at <= now) {
                        latest = latest.max(now - at);
                        fired += 1;
                        pending.pop();
                    }
                    if done.load(Ordering::SeqCst) && pending.is_empty() {
                        return (fired, latest);
                    }
                    let wake = pending
                        .peek()
                        .map_or(now + Duration::from_secs(60), |(at, _)| at);
                    if left.try_sleep_until(wake) {
                        let _ = wake_rx.recv_timeout(wake.saturating_duration_since(now));
                    }
                }
            })
        };
        let left_here = Arc::clone(&left);
        let items = leave_with_pauses(move |at| left_here.leave(at, 0), &done, &wake_tx);
        let (fired, latest) = sender.join().unwrap();
        assert_eq!(fired, items);
        assert!(
            latest < Duration::from_millis(400),
            "a deadline fired {latest:?} late"
        );
    }

    /// Pops everything, checking that each key comes out no smaller than the one before.
    fn drain(queue: &mut MostlySorted<(u64, u32)>) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while let Some(peeked) = queue.peek() {
            let popped = queue.pop();
            assert_eq!(popped, Some(peeked));
            out.push(peeked);
        }
        assert!(queue.is_empty());
        assert_eq!(queue.pop(), None);
        out
    }

    #[test]
    fn keys_come_out_in_order_however_they_arrive() {
        // In order, in reverse, with repeats, and a drift with jumps back (as when the
        // buffered time's lead grows): compared against a plain sort of the same keys.
        let mut next = crate::test_rng::xorshift64(0x2545_F491_4F6C_DD1D);
        let drift: Vec<u64> = (0..5_000u64)
            .map(|i| 10_000 + i * 10 + next() % 40 - if i % 700 == 0 { 900 } else { 0 })
            .collect();
        let cases: Vec<Vec<u64>> = vec![
            (0..1_000).collect(),
            (0..1_000).rev().collect(),
            vec![5, 5, 5, 1, 1, 9, 9, 0, 5],
            drift,
            vec![],
        ];
        for keys in cases {
            let mut queue = MostlySorted::new();
            let mut expected = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                queue.push((*key, i as u32));
                expected.push((*key, i as u32));
            }
            assert_eq!(queue.len(), keys.len());
            expected.sort();
            assert_eq!(drain(&mut queue), expected);
        }
    }

    #[test]
    fn pops_and_pushes_may_interleave() {
        let mut queue = MostlySorted::new();
        let mut model = BinaryHeap::new();
        let mut t = 100u64;
        for i in 0..3_000u32 {
            // Mostly later keys, every seventh one earlier than the last.
            t = if i % 7 == 0 { t - 5 } else { t + 3 };
            queue.push((t, i));
            model.push(Reverse((t, i)));
            if i % 3 == 0 {
                assert_eq!(queue.pop(), model.pop().map(|Reverse(k)| k));
            }
            assert_eq!(queue.peek(), model.peek().map(|Reverse(k)| *k));
            assert_eq!(queue.len(), model.len());
        }
    }

    /// For the tests of what put threads leave for a sleeping sender: two threads each leave
    /// three items, due 1 (or 2), 3 and 40 ms ahead, then pause for 600 ms, four times over.
    /// `leave` leaves one item due at the given time and says whether the sender must be woken
    /// (through `wake_tx`). At the end, sets `done` and wakes the sender a last time. Returns how
    /// many items were left.
    pub(crate) fn leave_with_pauses(
        leave: impl Fn(Instant) -> bool + Send + Sync + 'static,
        done: &std::sync::atomic::AtomicBool,
        wake_tx: &std::sync::mpsc::Sender<()>,
    ) -> u32 {
        use std::sync::Arc;
        use std::time::Duration;
        let leave = Arc::new(leave);
        let puts: Vec<_> = (0..2u64)
            .map(|thread| {
                let (leave, wake_tx) = (Arc::clone(&leave), wake_tx.clone());
                std::thread::spawn(move || {
                    for _ in 0..4 {
                        for ahead in [1 + thread, 3, 40] {
                            if leave(Instant::now() + Duration::from_millis(ahead)) {
                                let _ = wake_tx.send(());
                            }
                        }
                        std::thread::sleep(Duration::from_millis(600));
                    }
                })
            })
            .collect();
        for put in puts {
            put.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = wake_tx.send(());
        2 * 4 * 3
    }
}
