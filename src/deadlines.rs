//! The sender's aggregate deadlines: how put threads hand them over, and how the sender keeps
//! them.
//!
//! Every aggregate that receives its first record has a deadline, one message per Kinesis
//! record: on a stream of thousands of shards most deadlines lie a whole buffered time ahead,
//! long after the sender's next wake-up. [`Handover`] lets a put thread leave such a deadline
//! for the sender to collect when it next wakes, and wakes it only when the deadline comes
//! before that. (Sent as channel messages, they woke the sender's task, and often its thread,
//! once per Kinesis record.)
//!
//! [`MostlySorted`] keeps them: each deadline is a record's put time plus a buffered time that
//! changes slowly, so nearly every one is later than the one before it. Keys that arrive in
//! order wait in a `VecDeque`, where pushing and popping touch only its ends; the few that
//! arrive earlier than the latest key wait in a binary heap beside it. A binary heap alone paid
//! a chain of cache misses for every pop once it held thousands of deadlines.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::sync::lock;

/// Deadlines handed from put threads to the sender, and whether the sender sleeps past them.
///
/// Both sit behind one lock, so that a deadline is either collected by the sender before it
/// sleeps or seen by its put thread as due before the sender's wake-up: the sender records the
/// time it will wake only when nothing waits here ([`sleep_until`](Self::sleep_until)), and a
/// put thread reads that time under the same lock as it leaves its deadline.
#[derive(Debug)]
pub(crate) struct Handover<K> {
    inner: Mutex<Waiting<K>>,
}

#[derive(Debug)]
struct Waiting<K> {
    deadlines: Vec<(Instant, K)>,
    /// When the sleeping sender wakes by itself; `None` while it is awake (it collects the
    /// deadlines before it sleeps again) or once a put thread has chosen to wake it.
    sleeps_until: Option<Instant>,
}

impl<K> Handover<K> {
    pub fn new() -> Self {
        Handover {
            inner: Mutex::new(Waiting {
                deadlines: Vec::new(),
                sleeps_until: None,
            }),
        }
    }

    /// Leaves a deadline for the sender. Returns `true` when the caller must wake the sender:
    /// it sleeps past `at`. Only the first such caller is told to; later ones find the sender
    /// being woken.
    pub fn leave(&self, at: Instant, key: K) -> bool {
        let mut waiting = lock(&self.inner);
        waiting.deadlines.push((at, key));
        match waiting.sleeps_until {
            Some(wake) if at < wake => {
                waiting.sleeps_until = None;
                true
            }
            _ => false,
        }
    }

    /// The sender, awake: moves the deadlines left so far into `into` (`into` should be
    /// empty: its buffer is kept for the next time).
    pub fn collect(&self, into: &mut Vec<(Instant, K)>) {
        let mut waiting = lock(&self.inner);
        waiting.sleeps_until = None;
        std::mem::swap(&mut waiting.deadlines, into);
    }

    /// The sender, about to sleep until `wake` at the latest: returns `false`, and records
    /// nothing, when deadlines wait to be collected first.
    pub fn sleep_until(&self, wake: Instant) -> bool {
        let mut waiting = lock(&self.inner);
        if !waiting.deadlines.is_empty() {
            return false;
        }
        waiting.sleeps_until = Some(wake);
        true
    }
}

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
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_put_thread_wakes_the_sender_only_for_a_deadline_before_its_wake_up() {
        let handover = Handover::new();
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut collected = Vec::new();
        // Awake: nothing wakes it; it collects before sleeping.
        assert!(!handover.leave(now + ms(5), 1));
        assert!(!handover.sleep_until(now + ms(50)));
        handover.collect(&mut collected);
        assert_eq!(collected, vec![(now + ms(5), 1)]);
        collected.clear();
        // Asleep until 50 ms: a later deadline waits for it, an earlier one wakes it, once.
        assert!(handover.sleep_until(now + ms(50)));
        assert!(!handover.leave(now + ms(80), 2));
        assert!(!handover.leave(now + ms(50), 3));
        assert!(handover.leave(now + ms(10), 4));
        assert!(!handover.leave(now + ms(1), 5));
        handover.collect(&mut collected);
        let keys: Vec<u32> = collected.iter().map(|(_, k)| *k).collect();
        assert_eq!(keys, vec![2, 3, 4, 5]);
        // Awake again after collecting: nothing wakes it until it sleeps.
        assert!(!handover.leave(now, 6));
    }

    #[test]
    fn a_sleeping_sender_sees_a_deadline_left_for_it_in_time() {
        // A sender thread that sleeps until its next deadline (a minute when it has none)
        // unless woken, and put threads that leave a few near deadlines and then pause for
        // 300 ms. Each deadline must be seen within 250 ms of being due: without the wake-up,
        // the sender would sleep through each pause.
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc};
        let handover = Arc::new(Handover::<u32>::new());
        let done = Arc::new(AtomicBool::new(false));
        let (wake_tx, wake_rx) = mpsc::channel::<()>();
        let sender = {
            let (handover, done) = (Arc::clone(&handover), Arc::clone(&done));
            std::thread::spawn(move || {
                let (mut fired, mut latest) = (0u32, Duration::ZERO);
                let mut collected = Vec::new();
                let mut pending = MostlySorted::new();
                loop {
                    handover.collect(&mut collected);
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
                    if handover.sleep_until(wake) {
                        let _ = wake_rx.recv_timeout(wake.saturating_duration_since(now));
                    }
                }
            })
        };
        let puts: Vec<_> = (0..2u64)
            .map(|thread| {
                let (handover, wake_tx) = (Arc::clone(&handover), wake_tx.clone());
                std::thread::spawn(move || {
                    for round in 0..4u32 {
                        for ahead in [1 + thread, 3, 40] {
                            let at = Instant::now() + Duration::from_millis(ahead);
                            if handover.leave(at, round) {
                                let _ = wake_tx.send(());
                            }
                        }
                        std::thread::sleep(Duration::from_millis(300));
                    }
                })
            })
            .collect();
        for put in puts {
            put.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let _ = wake_tx.send(());
        let (fired, latest) = sender.join().unwrap();
        assert_eq!(fired, 2 * 4 * 3);
        assert!(
            latest < Duration::from_millis(250),
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
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
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
}
