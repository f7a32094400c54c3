//! A priority queue for keys that arrive almost in order, such as the sender's aggregate
//! deadlines: each is a record's put time plus a buffered time that changes slowly, so nearly
//! every deadline is later than the one before it.
//!
//! Keys that arrive in order wait in a `VecDeque`, where pushing and popping touch only its
//! ends; the few that arrive earlier than the latest key wait in a binary heap beside it. A
//! binary heap alone paid a chain of cache misses for every pop once it held thousands of
//! deadlines (one per open aggregate: 10,000 and more on a large stream).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

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
