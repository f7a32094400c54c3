//! Step 3: shard routing. Which open shard owns a hash key, and loading that map with ListShards.

use std::sync::Arc;

#[cfg(feature = "producer")]
use aws_sdk_kinesis::types::{ShardFilter, ShardFilterType};
#[cfg(feature = "producer")]
use aws_sdk_kinesis::Client;

#[cfg(feature = "producer")]
use crate::error::BuildError;

/// One open shard and the inclusive hash key range it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRange {
    pub shard_id: Arc<str>,
    pub start: u128,
    pub end: u128,
}

/// The open shards of a stream, sorted by their starting hash key.
///
/// Hash keys are parsed into `u128` once, when the map is loaded; routing is a binary search
/// over the starting keys alone, packed together (160 KB for 10,000 shards). A table indexed by
/// a key's top bits first narrows the search to the few starts in that stretch of the key
/// space, so that routing reads about two cache lines instead of the dozen or so a search of
/// every start reaches (each a likely miss with thousands of shards).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMap {
    shards: Vec<ShardRange>,
    starts: Vec<u128>,
    /// `first_start[b]`: how many starts lie below the stretch `b` of the key space (the
    /// stretches are the `2^bucket_bits` values of a key's top bits), and one more entry for
    /// the end. The starts inside stretch `b` are `starts[first_start[b]..first_start[b + 1]]`.
    first_start: Vec<u32>,
    bucket_bits: u32,
    /// Each shard ends where the next starts and the last ends at the top of the key space
    /// (what a stream's open shards normally are): a key at or past the first start is always
    /// covered, and routing need not read the shard's end (a likely cache miss).
    gapless: bool,
}

impl ShardMap {
    pub fn new(mut shards: Vec<ShardRange>) -> Self {
        shards.sort_by_key(|s| s.start);
        let starts: Vec<u128> = shards.iter().map(|s| s.start).collect();
        let gapless = shards.last().is_some_and(|s| s.end == u128::MAX)
            && shards
                .windows(2)
                .all(|w| w[0].start <= w[0].end && w[0].end.checked_add(1) == Some(w[1].start));
        // Two to four stretches per shard, so that most hold one start or none; at most 2^16
        // (256 KB of table; past 65,536 shards a stretch holds one or two starts). A single
        // shard needs no table: its search is one comparison.
        let bucket_bits = match starts.len() {
            0 | 1 => 0,
            n => (n * 2)
                .next_power_of_two()
                .trailing_zeros()
                .min(MAX_BUCKET_BITS),
        };
        let first_start = match bucket_bits {
            0 => Vec::new(),
            bits => {
                let stretches = 1usize << bits;
                let below = |bucket: usize| {
                    if bucket == stretches {
                        return starts.len();
                    }
                    starts.partition_point(|&start| start < (bucket as u128) << (128 - bits))
                };
                // Four billion shards would take hundreds of gigabytes first.
                (0..=stretches)
                    .map(|bucket| u32::try_from(below(bucket)).unwrap_or(u32::MAX))
                    .collect()
            }
        };
        ShardMap {
            shards,
            starts,
            first_start,
            bucket_bits,
            gapless,
        }
    }

    /// `count` shards splitting the hash key space evenly, named as Kinesis names them
    /// (`shardId-000000000000`, …): what a new stream with `count` shards has.
    pub fn uniform(count: usize) -> Self {
        let count = count.max(1) as u128;
        // 2^128 / count, as Kinesis splits a new stream (2^128 itself does not fit a u128).
        let width = match count {
            1 => u128::MAX,
            _ => u128::MAX / count + u128::from(u128::MAX % count == count - 1),
        };
        let count = count as usize;
        ShardMap::new(
            (0..count)
                .map(|i| ShardRange {
                    shard_id: Arc::from(format!("shardId-{i:012}")),
                    start: width * i as u128,
                    end: if i + 1 == count {
                        u128::MAX
                    } else {
                        width * (i as u128 + 1) - 1
                    },
                })
                .collect(),
        )
    }

    pub fn shards(&self) -> &[ShardRange] {
        &self.shards
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Whether every hash key has exactly one shard: the shards neither overlap nor leave a
    /// gap, from 0 to the top of the key space.
    pub fn covers_every_key_once(&self) -> bool {
        self.gapless && self.shards.first().is_some_and(|s| s.start == 0)
    }

    /// Position (in [`shards`](Self::shards)) of the shard owning `hash_key`, or `None` when no
    /// open shard covers it (a gap while the stream is resharding).
    pub fn shard_index(&self, hash_key: u128) -> Option<usize> {
        // The shard is the last one starting at or below the key: every start below the key's
        // stretch is, none past it is, so only the starts inside the stretch need searching.
        let after = if self.bucket_bits == 0 {
            // One shard or none: no table.
            self.starts.partition_point(|&start| start <= hash_key)
        } else {
            let bucket = (hash_key >> (128 - self.bucket_bits)) as usize;
            let (low, high) = (self.first_start[bucket], self.first_start[bucket + 1]);
            let inside = &self.starts[low as usize..high as usize];
            low as usize + inside.partition_point(|&start| start <= hash_key)
        };
        let index = after.checked_sub(1)?;
        (self.gapless || hash_key <= self.shards[index].end).then_some(index)
    }

    /// The shard owning `hash_key`.
    pub fn shard_for(&self, hash_key: u128) -> Option<&ShardRange> {
        self.shard_index(hash_key).map(|i| &self.shards[i])
    }
}

/// Most top bits of a key the routing table is indexed by.
const MAX_BUCKET_BITS: u32 = 16;

/// Which stream the producer writes to.
#[cfg(feature = "producer")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamId {
    Name(String),
    Arn(String),
}

#[cfg(feature = "producer")]
impl StreamId {
    /// The stream's name (from the ARN's last part when only the ARN is known).
    pub fn name(&self) -> &str {
        match self {
            StreamId::Name(name) => name,
            StreamId::Arn(arn) => arn.rsplit('/').next().unwrap_or(arn),
        }
    }
}

#[cfg(feature = "producer")]
impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamId::Name(name) => write!(f, "stream {name}"),
            StreamId::Arn(arn) => write!(f, "stream {arn}"),
        }
    }
}

/// Loads the open shards of a stream with ListShards, following every page.
#[cfg(feature = "producer")]
pub async fn load_shard_map(client: &Client, stream: &StreamId) -> Result<ShardMap, BuildError> {
    let mut shards = Vec::new();
    // Shards the listed ones name as their parents: a listing that pages while the stream is
    // resharded can show a parent open on an early page and its children on a later one.
    let mut parents = std::collections::HashSet::new();
    let mut next_token: Option<String> = None;
    loop {
        let mut request = client.list_shards();
        request = match &next_token {
            // With a NextToken, the stream must not be named again.
            Some(token) => request.next_token(token),
            None => {
                let request = match stream {
                    StreamId::Name(name) => request.stream_name(name),
                    StreamId::Arn(arn) => request.stream_arn(arn),
                };
                request.shard_filter(
                    ShardFilter::builder()
                        .r#type(ShardFilterType::AtLatest)
                        .build()
                        .map_err(|e| BuildError::ShardMap(e.to_string()))?,
                )
            }
        };
        let page = request.send().await.map_err(|e| {
            BuildError::ShardMap(format!(
                "ListShards for {stream} failed: {}",
                crate::retry::describe_sdk_error(&e)
            ))
        })?;
        for shard in page.shards() {
            parents.extend(shard.parent_shard_id().map(str::to_owned));
            parents.extend(shard.adjacent_parent_shard_id().map(str::to_owned));
            // Some servers ignore the AT_LATEST filter: a closed shard has an ending sequence
            // number, and only open shards take writes.
            if shard
                .sequence_number_range()
                .and_then(|r| r.ending_sequence_number())
                .is_some()
            {
                continue;
            }
            let range = shard.hash_key_range().ok_or_else(|| {
                BuildError::ShardMap(format!("shard {} has no hash key range", shard.shard_id()))
            })?;
            let parse = |text: &str| {
                crate::record::parse_explicit_hash_key(text).ok_or_else(|| {
                    BuildError::ShardMap(format!(
                        "shard {} has an invalid hash key {text:?}",
                        shard.shard_id()
                    ))
                })
            };
            shards.push(ShardRange {
                shard_id: Arc::from(shard.shard_id()),
                start: parse(range.starting_hash_key())?,
                end: parse(range.ending_hash_key())?,
            });
        }
        match page.next_token() {
            Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
            _ => break,
        }
    }
    shards.retain(|shard| !parents.contains(&*shard.shard_id));
    // A shard listed twice (on two pages of a listing the stream changed under) is one shard.
    let mut seen: std::collections::HashSet<Arc<str>> = std::collections::HashSet::new();
    shards.retain(|shard| seen.insert(Arc::clone(&shard.shard_id)));
    if shards.is_empty() {
        return Err(BuildError::ShardMap(format!("{stream} has no open shards")));
    }
    Ok(ShardMap::new(shards))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(id: &str, start: u128, end: u128) -> ShardRange {
        ShardRange {
            shard_id: Arc::from(id),
            start,
            end,
        }
    }

    #[test]
    fn a_map_covers_every_key_once_only_without_gaps_or_overlaps() {
        let half = u128::MAX / 2;
        assert!(ShardMap::uniform(1).covers_every_key_once());
        assert!(ShardMap::uniform(7).covers_every_key_once());
        let map = |shards: Vec<ShardRange>| ShardMap::new(shards).covers_every_key_once();
        let two = |a: (u128, u128), b: (u128, u128)| {
            map(vec![range("a", a.0, a.1), range("b", b.0, b.1)])
        };
        assert!(two((0, half), (half + 1, u128::MAX)));
        // A gap in the middle, at the bottom, at the top.
        assert!(!two((0, half - 1), (half + 1, u128::MAX)));
        assert!(!two((1, half), (half + 1, u128::MAX)));
        assert!(!two((0, half), (half + 1, u128::MAX - 1)));
        // A parent listed with its children.
        assert!(!map(vec![
            range("parent", 0, u128::MAX),
            range("child-1", 0, half),
            range("child-2", half + 1, u128::MAX),
        ]));
    }

    #[test]
    fn routes_every_hash_key_to_the_shard_that_owns_it() {
        let half = u128::MAX / 2;
        let map = ShardMap::new(vec![range("b", half + 1, u128::MAX), range("a", 0, half)]);
        assert_eq!(&*map.shard_for(0).unwrap().shard_id, "a");
        assert_eq!(&*map.shard_for(half).unwrap().shard_id, "a");
        assert_eq!(&*map.shard_for(half + 1).unwrap().shard_id, "b");
        assert_eq!(&*map.shard_for(u128::MAX).unwrap().shard_id, "b");
    }

    #[test]
    fn a_uniform_map_covers_the_whole_space_without_gaps() {
        for count in [1, 3, 4, 10_000] {
            let map = ShardMap::uniform(count);
            assert_eq!(map.len(), count);
            assert_eq!(map.shards()[0].start, 0);
            assert_eq!(map.shards()[count - 1].end, u128::MAX);
            for pair in map.shards().windows(2) {
                assert_eq!(pair[0].end + 1, pair[1].start);
            }
        }
        // Where Kinesis splits a new stream: at multiples of 2^128 / count.
        assert_eq!(ShardMap::uniform(2).shards()[1].start, 1 << 127);
        assert_eq!(ShardMap::uniform(4).shards()[3].start, 3 << 126);
        let third = u128::MAX / 3;
        assert_eq!(ShardMap::uniform(3).shards()[1].start, third);
    }

    #[test]
    fn routing_through_the_table_agrees_with_a_search_of_every_start() {
        // No table (one shard, none), a table per size, and the largest table (at 100,000
        // shards its stretches hold one or two starts each). Gaps and crowded starts are in
        // `routing_agrees_with_a_scan_with_and_without_gaps`.
        for count in [0, 1, 2, 3, 500, 10_000, 40_000, 100_000] {
            let map = match count {
                0 => ShardMap::default(),
                _ => ShardMap::uniform(count),
            };
            let starts: Vec<u128> = map.shards().iter().map(|s| s.start).collect();
            let mut probes = vec![0, 1, u128::MAX - 1, u128::MAX];
            for &start in starts.iter().step_by((count / 500).max(1)) {
                probes.extend([start.wrapping_sub(1), start, start + 1]);
            }
            for key in probes {
                let expected = starts.partition_point(|&s| s <= key).checked_sub(1);
                assert_eq!(map.shard_index(key), expected, "{count} shards, key {key}");
            }
        }
    }

    #[test]
    fn a_gap_routes_nowhere() {
        let map = ShardMap::new(vec![range("a", 0, 10), range("b", 20, u128::MAX)]);
        assert_eq!(map.shard_index(15), None);
        assert_eq!(map.shard_index(10), Some(0));
        assert_eq!(map.shard_index(20), Some(1));
        let late = ShardMap::new(vec![range("b", 20, 30)]);
        assert_eq!(late.shard_index(5), None);
        assert_eq!(late.shard_index(31), None);
    }

    #[test]
    fn routing_agrees_with_a_scan_with_and_without_gaps() {
        // Maps cut at pseudo-random points, some with shards left out (gaps, a missing top or
        // bottom): the binary search, which skips the end check on gapless maps, must pick
        // what a scan of every range picks, at every boundary and around it.
        let mut next = crate::test_rng::xorshift64(0x9E37_79B9_7F4A_7C15);
        for round in 0..240 {
            // Few shards, many, and many crowded into one small stretch of the key space.
            let count = match round % 4 {
                3 => 1_500 + round,
                _ => 1 + round % 12,
            };
            let crowded = round % 8 == 7;
            let mut cuts: Vec<u128> = (0..count)
                .map(|_| (u128::from(next()) << 64) | u128::from(next()))
                .map(|cut| {
                    if crowded {
                        (1 << 100) + (cut >> 40)
                    } else {
                        cut
                    }
                })
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            cuts.retain(|&c| c > 0);
            let starts: Vec<u128> = std::iter::once(0).chain(cuts.iter().copied()).collect();
            let shards: Vec<ShardRange> = starts
                .iter()
                .enumerate()
                .map(|(i, &start)| {
                    let end = starts.get(i + 1).map_or(u128::MAX, |next| next - 1);
                    range(&format!("s{i}"), start, end)
                })
                .filter(|_| round % 3 != 0 || !next().is_multiple_of(4))
                .collect();
            let map = ShardMap::new(shards.clone());
            let mut probes = vec![0, 1, u128::MAX, u128::MAX - 1];
            probes.extend((0..200).map(|_| (u128::from(next()) << 64) | u128::from(next())));
            for s in &shards {
                for key in [s.start, s.end] {
                    probes.extend([key, key.wrapping_sub(1), key.wrapping_add(1)]);
                }
            }
            for key in probes {
                // A scan of every range for a few shards; for many, a scan of the ranges
                // around the key's place among the sorted starts.
                let scan = if shards.len() <= 12 {
                    shards.iter().find(|s| s.start <= key && key <= s.end)
                } else {
                    let near = shards
                        .iter()
                        .position(|s| s.start > key)
                        .unwrap_or(shards.len());
                    shards[near.saturating_sub(2)..(near + 1).min(shards.len())]
                        .iter()
                        .find(|s| s.start <= key && key <= s.end)
                };
                assert_eq!(
                    map.shard_for(key).map(|s| &s.shard_id),
                    scan.map(|s| &s.shard_id),
                    "round {round}, key {key}"
                );
            }
        }
    }
}
