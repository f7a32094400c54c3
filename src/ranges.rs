//! Which hash key ranges overlap a range, for order mode across reshards: a closed shard's
//! lane holds the lanes whose ranges overlap its own, and its records go to the lanes that
//! cover their keys. At 10,000 shards a scan of every lane for each closed one would take the
//! sender's thread seconds after a reshard; this index answers in about the time it takes to
//! list the overlapping ranges, which are few (the shards of one map do not overlap, and a
//! closed shard overlaps only its own line of parents and children).

/// Inclusive hash key ranges, each with a key, sorted by start, with the running maximum of
/// their ends: a search walks back from the last range starting at or below the range asked
/// for, and stops where no range so far reaches into it.
pub(crate) struct RangeIndex<K> {
    ranges: Vec<(u128, u128, K)>,
    max_end: Vec<u128>,
}

impl<K: Copy> RangeIndex<K> {
    pub fn new(mut ranges: Vec<(u128, u128, K)>) -> Self {
        ranges.sort_by_key(|&(start, ..)| start);
        let max_end = ranges
            .iter()
            .scan(0u128, |max, &(_, end, _)| {
                *max = (*max).max(end);
                Some(*max)
            })
            .collect();
        RangeIndex { ranges, max_end }
    }

    /// Calls `f` with the key of each range sharing a hash key with `start..=end`.
    pub fn overlapping(&self, start: u128, end: u128, mut f: impl FnMut(K)) {
        let below = self.ranges.partition_point(|&(s, ..)| s <= end);
        for at in (0..below).rev() {
            if self.max_end[at] < start {
                break;
            }
            let (_, range_end, key) = self.ranges[at];
            if range_end >= start {
                f(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::xorshift64;

    #[test]
    fn finds_exactly_the_overlapping_ranges() {
        let mut next = xorshift64(0x05ee_d0f0_4de5);
        // Small coordinates, so that ranges touch, nest and share ends often.
        let mut coordinate = || u128::from(next() % 200);
        for _ in 0..300 {
            let ranges: Vec<(u128, u128, usize)> = (0..(coordinate() as usize % 12))
                .map(|i| {
                    let (a, b) = (coordinate(), coordinate());
                    (a.min(b), a.max(b), i)
                })
                .collect();
            let index = RangeIndex::new(ranges.clone());
            for _ in 0..20 {
                let (a, b) = (coordinate(), coordinate());
                let (start, end) = (a.min(b), a.max(b));
                let mut found = Vec::new();
                index.overlapping(start, end, |key| found.push(key));
                found.sort_unstable();
                let expected: Vec<usize> = ranges
                    .iter()
                    .filter(|&&(s, e, _)| s <= end && start <= e)
                    .map(|&(.., key)| key)
                    .collect();
                assert_eq!(found, expected, "{ranges:?} against {start}..={end}");
            }
        }
    }

    #[test]
    fn the_whole_key_space_and_its_ends() {
        let index = RangeIndex::new(vec![
            (0, u128::MAX / 2, 'a'),
            (u128::MAX / 2 + 1, u128::MAX, 'b'),
        ]);
        let mut found = Vec::new();
        index.overlapping(0, u128::MAX, |key| found.push(key));
        found.sort_unstable();
        assert_eq!(found, ['a', 'b']);
        found.clear();
        index.overlapping(u128::MAX, u128::MAX, |key| found.push(key));
        assert_eq!(found, ['b']);
        found.clear();
        index.overlapping(0, 0, |key| found.push(key));
        assert_eq!(found, ['a']);
    }
}
