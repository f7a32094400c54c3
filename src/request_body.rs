//! PutRecords request bodies, written by the producer.
//!
//! The SDK's serializer builds a body by encoding each blob to a fresh base64 string, copying it
//! into a growing JSON string (which doubles, copying again, as it grows) and dropping the
//! multi-megabyte result after the request; a new body then starts on fresh pages. Here the
//! body's exact length is computed first, the blobs are base64-encoded straight into place, and
//! the buffer returns to a pool (bounded by `BodyPool::new`) when the request is done with it.
//! The SDK still sends the request: it signs this body, sends it, and parses the answer (see
//! `sender::put_records`).
//!
//! The JSON has the members the SDK writes for the same input, in its order:
//! `{"Records":[{"Data":"…","ExplicitHashKey":"…","PartitionKey":"…"},…],"StreamName":"…"}` (or
//! `"StreamARN"`), strings escaped as JSON requires (the tests read it back with a JSON parser,
//! and every server the suite runs against parses it).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::aggregation::{checksum_all, Entry, EntryData};
use crate::prefetch::prefetch_slice;
use crate::shard_map::StreamId;
use crate::sync::lock;

const ENTRY_OPEN: &[u8] = b"{\"Data\":\"";
const EXPLICIT_HASH_KEY: &[u8] = b"\",\"ExplicitHashKey\":\"";
const PARTITION_KEY: &[u8] = b"\",\"PartitionKey\":\"";
const ENTRY_CLOSE: &[u8] = b"\"}";
const RECORDS_OPEN: &[u8] = b"{\"Records\":[";
const STREAM_NAME: &[u8] = b"],\"StreamName\":\"";
const STREAM_ARN: &[u8] = b"],\"StreamARN\":\"";
const BODY_CLOSE: &[u8] = b"\"}";

/// How many entries ahead the body's passes ask for an entry's memory.
const PREFETCH_AHEAD: usize = 2;
/// Aggregates checksummed together just before their base64 is written: two groups of eight
/// (see `aggregation::checksums`) of up to 50 KiB each, which a core's cache still holds when
/// their base64 reads them again.
const CHECKSUM_AHEAD: usize = 16;

/// Buffers of finished requests, kept for the next ones: up to `retain_bytes` of capacity.
#[derive(Debug)]
pub(crate) struct BodyPool {
    free: Mutex<Vec<Vec<u8>>>,
    retain_bytes: usize,
}

impl BodyPool {
    pub fn new(retain_bytes: usize) -> Arc<Self> {
        Arc::new(BodyPool {
            free: Mutex::new(Vec::new()),
            retain_bytes,
        })
    }

    /// A buffer for `len` bytes: the smallest free one that holds them, else the largest (grown).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = lock(&self.free);
            let fits = free
                .iter()
                .enumerate()
                .filter(|(_, buf)| buf.capacity() >= len)
                .min_by_key(|(_, buf)| buf.capacity());
            let pick = fits.or_else(|| {
                free.iter()
                    .enumerate()
                    .max_by_key(|(_, buf)| buf.capacity())
            });
            pick.map(|(i, _)| i).map(|i| free.swap_remove(i))
        };
        let mut buf = reused.unwrap_or_default();
        buf.clear();
        buf.reserve_exact(len);
        buf
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = lock(&self.free);
        let held: usize = free.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= self.retain_bytes {
            free.push(buf);
        }
    }

    /// Capacity the pool holds now.
    #[cfg(test)]
    fn held(&self) -> usize {
        lock(&self.free).iter().map(Vec::capacity).sum()
    }
}

/// A body's buffer while the request holds it; back to the pool when dropped.
struct PooledBody {
    buf: Vec<u8>,
    pool: Arc<BodyPool>,
}

impl AsRef<[u8]> for PooledBody {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

/// The JSON body of a PutRecords request carrying `entries` to `stream`.
pub(crate) fn put_records<'a>(
    pool: &Arc<BodyPool>,
    stream: &StreamId,
    entries: impl Iterator<Item = &'a Entry> + Clone,
) -> Bytes {
    let (stream_field, stream_value) = match stream {
        StreamId::Name(name) => (STREAM_NAME, name.as_str()),
        StreamId::Arn(arn) => (STREAM_ARN, arn.as_str()),
    };
    let mut len = RECORDS_OPEN.len() + stream_field.len() + escaped_len(stream_value);
    len += BODY_CLOSE.len();
    let mut count: usize = 0;
    // Each pass asks for the memory of an entry a few places on while it reads this one.
    let mut keys_ahead = entries.clone().skip(PREFETCH_AHEAD);
    for entry in entries.clone() {
        if let Some(ahead) = keys_ahead.next() {
            prefetch_slice(ahead.partition_key.as_bytes());
        }
        count += 1;
        len += ENTRY_OPEN.len()
            + base64_simd::STANDARD.encoded_length(entry.data.len())
            + PARTITION_KEY.len()
            + escaped_len(&entry.partition_key)
            + ENTRY_CLOSE.len();
        if let Some(ehk) = &entry.explicit_hash_key {
            len += EXPLICIT_HASH_KEY.len() + escaped_len(ehk);
        }
    }
    len += count.saturating_sub(1); // commas

    let mut out = pool.take(len);
    out.extend_from_slice(RECORDS_OPEN);
    let mut data_ahead = entries.clone().skip(PREFETCH_AHEAD);
    // Every `CHECKSUM_AHEAD` entries, the next `CHECKSUM_AHEAD` aggregates get their
    // checksums: never behind the loop (and `visit` computes a missing one itself).
    let mut to_checksum = entries.clone().filter_map(|e| match &e.data {
        EntryData::Pieces(pieces) => Some(&**pieces),
        EntryData::Whole(_) => None,
    });
    for (i, entry) in entries.clone().enumerate() {
        if i.is_multiple_of(CHECKSUM_AHEAD) {
            checksum_all(to_checksum.by_ref().take(CHECKSUM_AHEAD));
        }
        if let Some(EntryData::Whole(data)) = data_ahead.next().map(|ahead| &ahead.data) {
            prefetch_slice(data);
        }
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(ENTRY_OPEN);
        match &entry.data {
            EntryData::Whole(data) => base64_simd::STANDARD.encode_append(data, &mut out),
            EntryData::Pieces(pieces) => {
                let mut encoder = PieceEncoder::default();
                pieces.visit(|piece| encoder.push(piece, &mut out));
                encoder.finish(&mut out);
            }
        }
        if let Some(ehk) = &entry.explicit_hash_key {
            out.extend_from_slice(EXPLICIT_HASH_KEY);
            put_escaped(&mut out, ehk);
        }
        out.extend_from_slice(PARTITION_KEY);
        put_escaped(&mut out, &entry.partition_key);
        out.extend_from_slice(ENTRY_CLOSE);
    }
    out.extend_from_slice(stream_field);
    put_escaped(&mut out, stream_value);
    out.extend_from_slice(BODY_CLOSE);
    debug_assert_eq!(out.len(), len);
    Bytes::from_owner(PooledBody {
        buf: out,
        pool: Arc::clone(pool),
    })
}

/// Appends the base64 of the concatenation of the pieces pushed, without concatenating them:
/// each piece's whole 3-byte groups are encoded in place, and the bytes left over join the next
/// piece's first ones.
#[derive(Default)]
struct PieceEncoder {
    carry: [u8; 3],
    held: usize,
}

impl PieceEncoder {
    fn push(&mut self, mut piece: &[u8], out: &mut Vec<u8>) {
        if self.held > 0 {
            let take = (3 - self.held).min(piece.len());
            self.carry[self.held..self.held + take].copy_from_slice(&piece[..take]);
            self.held += take;
            piece = &piece[take..];
            if self.held < 3 {
                return;
            }
            base64_simd::STANDARD.encode_append(self.carry, out);
        }
        let whole = piece.len() - piece.len() % 3;
        base64_simd::STANDARD.encode_append(&piece[..whole], out);
        self.held = piece.len() - whole;
        self.carry[..self.held].copy_from_slice(&piece[whole..]);
    }

    fn finish(self, out: &mut Vec<u8>) {
        base64_simd::STANDARD.encode_append(&self.carry[..self.held], out);
    }
}

/// How a byte of a string is written inside JSON quotes.
enum Escape {
    Plain,
    /// A backslash and this character.
    Short(u8),
    /// `\u00XX`.
    Unicode,
}

fn escape_of(byte: u8) -> Escape {
    match byte {
        b'"' => Escape::Short(b'"'),
        b'\\' => Escape::Short(b'\\'),
        b'\n' => Escape::Short(b'n'),
        b'\r' => Escape::Short(b'r'),
        b'\t' => Escape::Short(b't'),
        0x08 => Escape::Short(b'b'),
        0x0C => Escape::Short(b'f'),
        0x00..=0x1F => Escape::Unicode,
        _ => Escape::Plain,
    }
}

fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match escape_of(b) {
            Escape::Plain => 1,
            Escape::Short(_) => 2,
            Escape::Unicode => 6,
        })
        .sum()
}

/// Appends `s` as the inside of a JSON string (UTF-8 passes through as it is).
fn put_escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut plain_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = escape_of(b);
        if matches!(escape, Escape::Plain) {
            continue;
        }
        out.extend_from_slice(&bytes[plain_from..i]);
        plain_from = i + 1;
        match escape {
            Escape::Short(c) => out.extend_from_slice(&[b'\\', c]),
            Escape::Unicode => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            Escape::Plain => {}
        }
    }
    out.extend_from_slice(&bytes[plain_from..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use proptest::prelude::*;

    fn entry(data: &[u8], key: &str, ehk: Option<&str>) -> Entry {
        Entry {
            data: EntryData::Whole(Bytes::copy_from_slice(data)),
            partition_key: key.to_owned(),
            explicit_hash_key: ehk.map(str::to_owned),
            aggregated: false,
        }
    }

    fn bytes_of(entry: &Entry) -> Bytes {
        match &entry.data {
            EntryData::Whole(bytes) => bytes.clone(),
            EntryData::Pieces(pieces) => pieces.to_bytes(),
        }
    }

    /// An entry as read back: data, partition key, explicit hash key.
    type ReadEntry = (Vec<u8>, String, Option<String>);

    /// Reads a body back with serde_json: the entries and the whole document.
    fn read_back(body: &[u8]) -> (Vec<ReadEntry>, serde_json::Value) {
        let value: serde_json::Value = serde_json::from_slice(body).expect("valid JSON");
        let records = value["Records"]
            .as_array()
            .expect("Records")
            .iter()
            .map(|r| {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(r["Data"].as_str().expect("Data"))
                    .expect("base64");
                let key = r["PartitionKey"].as_str().expect("PartitionKey").to_owned();
                let ehk = r
                    .get("ExplicitHashKey")
                    .map(|v| v.as_str().unwrap().to_owned());
                (data, key, ehk)
            })
            .collect();
        (records, value)
    }

    /// An aggregate in pieces gets its checksum as its body is written; a retry's body writes
    /// the kept checksum. Both read back, checksum verified, as the records pushed.
    #[test]
    fn an_aggregate_in_pieces_reads_back_from_the_first_body_and_a_retrys() {
        use crate::aggregation::tests::build;
        use crate::aggregation::AggregateLimits;
        let records: Vec<crate::UserRecord> = (0..60usize)
            .map(|i| crate::UserRecord::new(vec![i as u8; 100 + i * 37], format!("k{i}")))
            .collect();
        let limits = AggregateLimits {
            max_size: 1 << 20,
            max_count: usize::MAX,
        };
        let entry = build(records.clone(), limits)
            .finish_entry(false)
            .expect("an aggregate");
        assert!(matches!(entry.data, EntryData::Pieces(_)), "in pieces");
        let pool = BodyPool::new(1 << 20);
        for attempt in ["first", "retry"] {
            let body = put_records(&pool, &StreamId::Name("s".into()), [&entry].into_iter());
            let (read, _) = read_back(&body);
            let (data, key, _) = &read[0];
            let users = crate::deaggregate(Bytes::from(data.clone()), key).expect("valid");
            let got: Vec<&[u8]> = users.iter().map(|u| &u.data[..]).collect();
            let want: Vec<&[u8]> = records.iter().map(|r| &r.data()[..]).collect();
            assert_eq!(got, want, "{attempt}");
        }
    }

    #[test]
    fn a_body_reads_back_as_its_entries() {
        let pool = BodyPool::new(1 << 20);
        let entries = [
            entry(b"hello", "key-1", None),
            entry(
                &[0, 255, 7],
                "quote\" back\\slash\n\u{1}\u{7f} é ✓",
                Some("123"),
            ),
            entry(b"", "k", None),
        ];
        let body = put_records(&pool, &StreamId::Name("s".into()), entries.iter());
        let (records, value) = read_back(&body);
        assert_eq!(value["StreamName"], "s");
        assert_eq!(records.len(), 3);
        for (entry, (data, key, ehk)) in entries.iter().zip(records) {
            assert_eq!(bytes_of(entry).as_ref(), data.as_slice());
            assert_eq!(entry.partition_key, key);
            assert_eq!(entry.explicit_hash_key, ehk);
        }
        let arn = "arn:aws:kinesis:us-east-1:000000000000:stream/s";
        let body = put_records(&pool, &StreamId::Arn(arn.into()), entries[..1].iter());
        assert_eq!(read_back(&body).1["StreamARN"], arn);
    }

    #[test]
    fn buffers_return_to_the_pool_within_its_bound() {
        let pool = BodyPool::new(100_000);
        let big = entry(&[1; 30_000], "k", None);
        let small = entry(b"x", "k", None);
        let first = put_records(&pool, &StreamId::Name("s".into()), [&big].into_iter());
        let second = put_records(&pool, &StreamId::Name("s".into()), [&big].into_iter());
        assert_eq!(pool.held(), 0);
        drop(first);
        drop(second);
        let held = pool.held();
        assert!((80_000..=100_000).contains(&held), "{held}");
        // A third, larger than what is left of the bound, is not kept.
        let third = put_records(&pool, &StreamId::Name("s".into()), [&big, &big].into_iter());
        let fourth = put_records(&pool, &StreamId::Name("s".into()), [&small].into_iter());
        assert_eq!(pool.held(), 0);
        drop(third);
        drop(fourth);
        assert!(pool.held() <= 100_000);
    }

    proptest! {
        #[test]
        fn pieces_encode_as_their_concatenation(
            data in prop::collection::vec(any::<u8>(), 0..300),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            at.sort_unstable();
            let bounds = std::iter::once(0).chain(at).chain(std::iter::once(data.len()));
            let bounds: Vec<usize> = bounds.collect();
            let pieces = bounds.windows(2).map(|w| &data[w[0]..w[1]]);
            let mut out = Vec::new();
            let mut encoder = PieceEncoder::default();
            pieces.for_each(|piece| encoder.push(piece, &mut out));
            encoder.finish(&mut out);
            prop_assert_eq!(out, base64_simd::STANDARD.encode_type::<Vec<u8>>(&data));
        }

        #[test]
        fn any_keys_and_data_survive_the_json(
            items in prop::collection::vec(
                (prop::collection::vec(any::<u8>(), 0..200), "\\PC{1,40}|[\\x00-\\x1f\"\\\\]{1,8}", prop::option::of("[0-9]{1,39}")),
                1..20,
            ),
            name in "[a-zA-Z0-9_.-]{1,128}",
        ) {
            let pool = BodyPool::new(1 << 20);
            let entries: Vec<_> = items.iter().map(|(d, k, e)| entry(d, k, e.as_deref())).collect();
            let body = put_records(&pool, &StreamId::Name(name.clone()), entries.iter());
            let (records, value) = read_back(&body);
            prop_assert_eq!(value["StreamName"].as_str(), Some(name.as_str()));
            prop_assert_eq!(records.len(), entries.len());
            for (entry, (data, key, ehk)) in entries.iter().zip(records) {
                prop_assert_eq!(bytes_of(entry), Bytes::from(data));
                prop_assert_eq!(&entry.partition_key, &key);
                prop_assert_eq!(&entry.explicit_hash_key, &ehk);
            }
        }
    }
}
