//! The consumer side: reading user records back out of Kinesis records, as our own tests, the
//! `tail`-style tools and any Rust consumer need it.
//!
//! Two modes:
//! - **strict** ([`deaggregate`], [`Deaggregator::new`]): every defect of an aggregate (bad
//!   checksum, unparseable protobuf, missing required field, index past a key table, invalid
//!   explicit hash key) is an error value.
//! - **KCL** ([`Deaggregator::kcl`]): exactly what the Java KCL 2.x does, so a Rust consumer sees
//!   what a KCL consumer of the same stream sees: a record with a bad checksum, or whose protobuf
//!   does not parse (including missing required fields), is handed over as a plain record; an
//!   aggregate holding any record outside the shard's hash range is dropped whole; a record
//!   whose key index is past its table, or whose explicit hash key is not a number, ends the
//!   aggregate there (the records before it are kept).

use std::ops::RangeInclusive;

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;

use crate::aggregation::{DIGEST_LEN, FRAME_LEN, MAGIC};
use crate::record::{parse_explicit_hash_key, partition_key_hash};

/// prost types mirroring `proto/aggregation.proto`.
///
/// The schema's `required` fields are `Option` here on purpose: prost does not check presence
/// when decoding, and an absent required field must be detected (the KCL rejects the record).
/// Encoding `Some(0)` still writes the field, as proto2 requires.
pub mod proto {
    /// The protobuf body of an aggregated record.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AggregatedRecord {
        #[prost(string, repeated, tag = "1")]
        pub partition_key_table: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub explicit_hash_key_table: Vec<String>,
        #[prost(message, repeated, tag = "3")]
        pub records: Vec<Record>,
    }

    /// One user record inside an aggregate.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Record {
        /// Required by the schema.
        #[prost(uint64, optional, tag = "1")]
        pub partition_key_index: Option<u64>,
        #[prost(uint64, optional, tag = "2")]
        pub explicit_hash_key_index: Option<u64>,
        /// Required by the schema.
        #[prost(bytes = "bytes", optional, tag = "3")]
        pub data: Option<bytes::Bytes>,
        #[prost(message, repeated, tag = "4")]
        pub tags: Vec<Tag>,
    }

    /// A tag (unused by the KPL, kept for schema compatibility).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tag {
        /// Required by the schema.
        #[prost(string, optional, tag = "1")]
        pub key: Option<String>,
        #[prost(string, optional, tag = "2")]
        pub value: Option<String>,
    }
}

/// One user record read back out of a Kinesis record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeaggregatedRecord {
    pub partition_key: String,
    /// Only aggregates carry explicit hash keys; Kinesis does not return them for plain records.
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
    /// Position inside the aggregate (0 for a plain record).
    pub sub_sequence_number: u64,
    /// Whether the Kinesis record was an aggregate.
    pub aggregated: bool,
    /// With a shard range and [`OutOfRange::Flag`]: the record's hash key lies outside it.
    pub outside_shard: bool,
}

/// Why a Kinesis record that claims to be an aggregate (it starts with the magic bytes) could
/// not be read in strict mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeaggregationError {
    #[error("the aggregate's MD5 checksum does not match its contents")]
    ChecksumMismatch,
    #[error("the aggregate's protobuf body cannot be parsed: {0}")]
    Malformed(String),
    #[error("user record {record} has no {field} (a required field)")]
    MissingField { record: usize, field: &'static str },
    #[error(
        "user record {record} refers to {table} index {index}, but the table has {len} entries"
    )]
    IndexOutOfRange {
        record: usize,
        table: &'static str,
        index: u64,
        len: usize,
    },
    #[error("user record {record} has an invalid explicit hash key {value:?}")]
    InvalidExplicitHashKey { record: usize, value: String },
    #[error("user record {record} lies outside the shard's hash key range")]
    OutsideShard { record: usize },
    #[error(
        "the aggregate's records would carry {bytes} bytes of keys, over {limit} ({KEY_BYTES_PER_INPUT_BYTE} per byte of the aggregate): keys within Kinesis's limits never reach that"
    )]
    KeysTooLarge { bytes: u64, limit: u64 },
    #[error("the shard's hash key range starts at {start}, after its end {end}")]
    InvalidShardRange { start: u128, end: u128 },
}

/// Each user record read out of an aggregate owns a copy of its keys, so a small aggregate
/// whose records all point to one huge key table entry could ask for gigabytes. Keys within
/// Kinesis's limits (a partition key of 256 characters, at most 1,024 bytes; an explicit hash
/// key of 39 digits) in records of at least 6 bytes stay under 180 bytes per byte of the
/// aggregate; beyond this many, the aggregate is refused (strict) or handed over whole (KCL
/// mode).
pub const KEY_BYTES_PER_INPUT_BYTE: u64 = 256;

/// What to do with a user record whose hash key lies outside the given shard range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutOfRange {
    /// Keep it, with [`DeaggregatedRecord::outside_shard`] set.
    Flag,
    /// Leave that record out, keep the others.
    Filter,
    /// Drop every record of the aggregate (what the KCL does).
    DropAggregate,
    /// Strict: an error value.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Kcl,
}

/// Configurable de-aggregation; [`deaggregate`] is the strict default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deaggregator {
    mode: Mode,
    shard: Option<RangeInclusive<u128>>,
    out_of_range: OutOfRange,
}

impl Default for Deaggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl Deaggregator {
    /// Strict: defects are errors; no shard range.
    pub fn new() -> Self {
        Deaggregator {
            mode: Mode::Strict,
            shard: None,
            out_of_range: OutOfRange::Flag,
        }
    }

    /// The Java KCL's behaviour for records read from the shard owning `start..=end`.
    pub fn kcl(start: u128, end: u128) -> Self {
        Deaggregator {
            mode: Mode::Kcl,
            shard: Some(start..=end),
            out_of_range: OutOfRange::DropAggregate,
        }
    }

    /// Checks every user record's hash key (explicit hash key, else MD5 of the partition key)
    /// against the range of the shard the Kinesis record was read from.
    pub fn shard_range(mut self, start: u128, end: u128) -> Self {
        self.shard = Some(start..=end);
        self
    }

    /// What to do with records outside the shard range (default [`OutOfRange::Flag`]).
    pub fn out_of_range(mut self, policy: OutOfRange) -> Self {
        self.out_of_range = policy;
        self
    }

    /// Turns one Kinesis record (its data and partition key, as GetRecords returns them) into
    /// user records. A record without the magic prefix, or of 20 bytes or fewer, is not an
    /// aggregate and comes back as a single user record.
    pub fn deaggregate(
        &self,
        data: impl Into<Bytes>,
        partition_key: &str,
    ) -> Result<Vec<DeaggregatedRecord>, DeaggregationError> {
        if let Some(range) = self.shard.as_ref().filter(|r| r.start() > r.end()) {
            // Bounds given the wrong way round would count every record outside the shard.
            return Err(DeaggregationError::InvalidShardRange {
                start: *range.start(),
                end: *range.end(),
            });
        }
        let data = data.into();
        if data.len() <= FRAME_LEN || data[..MAGIC.len()] != MAGIC {
            return Ok(plain(data, partition_key));
        }
        let body = data.slice(MAGIC.len()..data.len() - DIGEST_LEN);
        let digest: [u8; DIGEST_LEN] = Md5::digest(&body).into();
        let parsed = if digest[..] != data[data.len() - DIGEST_LEN..] {
            Err(DeaggregationError::ChecksumMismatch)
        } else {
            parse(body)
        };
        let parsed = parsed.and_then(|aggregate| {
            let bytes = key_bytes(&aggregate);
            let limit = KEY_BYTES_PER_INPUT_BYTE.saturating_mul(data.len() as u64);
            if bytes > limit {
                Err(DeaggregationError::KeysTooLarge { bytes, limit })
            } else {
                Ok(aggregate)
            }
        });
        let aggregate = match (parsed, self.mode) {
            (Ok(aggregate), _) => aggregate,
            (Err(error), Mode::Strict) => return Err(error),
            // The KCL hands such a record to the application as it is (keys too large for
            // their aggregate: the KCL would share them; here each record owns a copy, so the
            // record is handed over whole instead).
            (Err(_), Mode::Kcl) => return Ok(plain(data, partition_key)),
        };
        self.unpack(aggregate)
    }

    fn unpack(
        &self,
        aggregate: proto::AggregatedRecord,
    ) -> Result<Vec<DeaggregatedRecord>, DeaggregationError> {
        let mut out = Vec::with_capacity(aggregate.records.len());
        let pks = &aggregate.partition_key_table;
        let ehks = &aggregate.explicit_hash_key_table;
        for (position, record) in aggregate.records.into_iter().enumerate() {
            let defect = match self.mode {
                Mode::Strict => Err,
                // The KCL logs the exception and keeps what it had already produced.
                Mode::Kcl => |_| Ok(()),
            };
            // `parse` checked that the required fields are present.
            let pk_index = record.partition_key_index.unwrap_or_default();
            // An index past what `usize` holds is out of range on every target, not wrapped.
            let Some(partition_key) = usize::try_from(pk_index).ok().and_then(|i| pks.get(i))
            else {
                defect(DeaggregationError::IndexOutOfRange {
                    record: position,
                    table: "partition key table",
                    index: pk_index,
                    len: pks.len(),
                })?;
                return Ok(out);
            };
            let explicit_hash_key = match record.explicit_hash_key_index {
                None => None,
                Some(index) => match usize::try_from(index).ok().and_then(|i| ehks.get(i)) {
                    Some(key) => Some(key),
                    None => {
                        defect(DeaggregationError::IndexOutOfRange {
                            record: position,
                            table: "explicit hash key table",
                            index,
                            len: ehks.len(),
                        })?;
                        return Ok(out);
                    }
                },
            };
            let hash_key = match (explicit_hash_key, self.mode) {
                (Some(key), Mode::Strict) => match parse_explicit_hash_key(key) {
                    Some(value) => HashKey::In(value),
                    None => {
                        return Err(DeaggregationError::InvalidExplicitHashKey {
                            record: position,
                            value: key.chars().take(64).collect(),
                        })
                    }
                },
                (Some(key), Mode::Kcl) => kcl_hash_key(key),
                (None, _) if self.shard.is_some() => HashKey::In(partition_key_hash(partition_key)),
                (None, _) => HashKey::Unchecked,
            };
            let outside = match (&self.shard, hash_key) {
                (_, HashKey::NotANumber) => return Ok(out), // KCL: exception, keep the prefix
                (Some(range), HashKey::In(value)) => !range.contains(&value),
                (Some(_), HashKey::OutOfDomain) => true,
                (None, _) => false,
                (Some(_), HashKey::Unchecked) => false,
            };
            if outside {
                match self.out_of_range {
                    OutOfRange::Flag => {}
                    OutOfRange::Filter => continue,
                    OutOfRange::DropAggregate => return Ok(Vec::new()),
                    OutOfRange::Error => {
                        return Err(DeaggregationError::OutsideShard { record: position })
                    }
                }
            }
            out.push(DeaggregatedRecord {
                partition_key: partition_key.clone(),
                explicit_hash_key: explicit_hash_key.cloned(),
                data: record.data.unwrap_or_default(),
                sub_sequence_number: position as u64,
                aggregated: true,
                outside_shard: outside,
            });
        }
        Ok(out)
    }
}

/// Reads one Kinesis record strictly: see [`Deaggregator::new`].
pub fn deaggregate(
    data: impl Into<Bytes>,
    partition_key: &str,
) -> Result<Vec<DeaggregatedRecord>, DeaggregationError> {
    Deaggregator::new().deaggregate(data, partition_key)
}

fn plain(data: Bytes, partition_key: &str) -> Vec<DeaggregatedRecord> {
    vec![DeaggregatedRecord {
        partition_key: partition_key.to_owned(),
        explicit_hash_key: None,
        data,
        sub_sequence_number: 0,
        aggregated: false,
        outside_shard: false,
    }]
}

/// Bytes of keys the records of `aggregate` would copy (a key index out of range counts none).
fn key_bytes(aggregate: &proto::AggregatedRecord) -> u64 {
    let len = |table: &[String], index: Option<u64>| {
        index
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| table.get(i))
            .map_or(0, |key| key.len() as u64)
    };
    aggregate
        .records
        .iter()
        .map(|record| {
            len(&aggregate.partition_key_table, record.partition_key_index)
                + len(
                    &aggregate.explicit_hash_key_table,
                    record.explicit_hash_key_index,
                )
        })
        .fold(0u64, u64::saturating_add)
}

/// Decodes the protobuf body and checks that the schema's required fields are present.
fn parse(body: Bytes) -> Result<proto::AggregatedRecord, DeaggregationError> {
    let aggregate = proto::AggregatedRecord::decode(body)
        .map_err(|e| DeaggregationError::Malformed(e.to_string()))?;
    for (position, record) in aggregate.records.iter().enumerate() {
        let missing = if record.partition_key_index.is_none() {
            Some("partition_key_index")
        } else if record.data.is_none() {
            Some("data")
        } else if record.tags.iter().any(|tag| tag.key.is_none()) {
            Some("tag key")
        } else {
            None
        };
        if let Some(field) = missing {
            return Err(DeaggregationError::MissingField {
                record: position,
                field,
            });
        }
    }
    Ok(aggregate)
}

#[derive(Clone, Copy)]
enum HashKey {
    In(u128),
    /// A number outside 0..=2^128-1: outside every shard.
    OutOfDomain,
    NotANumber,
    /// Not computed: no shard range to check against.
    Unchecked,
}

/// An explicit hash key as Java's `new BigInteger(text)` reads it: an optional sign, then at
/// least one decimal digit; leading zeros are fine.
fn kcl_hash_key(text: &str) -> HashKey {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return HashKey::NotANumber;
    }
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return HashKey::In(0);
    }
    match significant.parse::<u128>() {
        Ok(value) if !negative => HashKey::In(value),
        _ => HashKey::OutOfDomain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::tests::{build, golden_records, GOLDEN};
    use crate::aggregation::{AggregateBuilder, AggregateLimits};
    use crate::UserRecord;

    fn golden_bytes() -> Vec<u8> {
        (0..GOLDEN.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&GOLDEN[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Wraps a protobuf body as an aggregate with a correct checksum.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(body);
        out.extend_from_slice(&Md5::digest(body));
        out
    }

    fn aggregate_of(records: Vec<UserRecord>) -> Bytes {
        let mut builder = build(records, AggregateLimits::default());
        builder.finish().unwrap().data
    }

    /// An aggregate of `count` records with empty data, all pointing to one partition key.
    fn one_key_many_records(key: &[u8], count: usize) -> Vec<u8> {
        let mut body = vec![0x0A];
        prost::encoding::encode_varint(key.len() as u64, &mut body);
        body.extend_from_slice(key);
        for _ in 0..count {
            body.extend_from_slice(&[0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00]);
        }
        frame(&body)
    }

    #[test]
    fn a_shard_range_given_the_wrong_way_round_is_an_error_not_a_silent_drop() {
        let data = aggregate_of(vec![UserRecord::new("a", "k")]);
        for deaggregator in [
            Deaggregator::kcl(10, 5),
            Deaggregator::new().shard_range(10, 5),
        ] {
            assert_eq!(
                deaggregator.deaggregate(data.clone(), "k"),
                Err(DeaggregationError::InvalidShardRange { start: 10, end: 5 })
            );
        }
        let whole = Deaggregator::kcl(0, u128::MAX)
            .deaggregate(data, "k")
            .unwrap();
        assert_eq!(whole.len(), 1);
    }

    #[test]
    fn keys_out_of_all_proportion_to_the_aggregate_are_refused_not_copied() {
        // 10,000 records pointing to one 100 KB key: a gigabyte of copies from 160 KB.
        let bomb = one_key_many_records(&[b'k'; 100_000], 10_000);
        match deaggregate(bomb.clone(), "outer") {
            Err(DeaggregationError::KeysTooLarge { bytes, limit }) => {
                assert_eq!(bytes, 1_000_000_000);
                assert_eq!(limit, KEY_BYTES_PER_INPUT_BYTE * bomb.len() as u64);
            }
            other => panic!("{other:?}"),
        }
        let kcl = Deaggregator::kcl(0, u128::MAX)
            .deaggregate(bomb, "outer")
            .unwrap();
        assert_eq!(kcl.len(), 1, "handed over whole");
        assert!(!kcl[0].aggregated);
        // The worst keys Kinesis allows: 256 four-byte characters, in records of no data.
        let key = "\u{1F600}".repeat(256);
        let heavy = one_key_many_records(key.as_bytes(), 10_000);
        assert_eq!(deaggregate(heavy, "outer").unwrap().len(), 10_000);
    }

    #[test]
    fn decodes_the_golden_vector() {
        let out = deaggregate(golden_bytes(), "pk1").unwrap();
        let got: Vec<_> = out
            .iter()
            .map(|r| {
                (
                    r.partition_key.as_str(),
                    r.explicit_hash_key.as_deref(),
                    &r.data[..],
                    r.sub_sequence_number,
                )
            })
            .collect();
        let ehk = (1u128 << 127).to_string();
        assert_eq!(
            got,
            vec![
                ("pk1", None, &b"hello"[..], 0),
                ("pk2", Some(ehk.as_str()), &b"world"[..], 1),
                ("pk1", None, &b"!"[..], 2)
            ]
        );
        assert_eq!(out.len(), golden_records().len());
    }

    #[test]
    fn plain_and_short_records_pass_through_in_both_modes() {
        for deaggregator in [Deaggregator::new(), Deaggregator::kcl(0, u128::MAX)] {
            let out = deaggregator.deaggregate(&b"plain data"[..], "k").unwrap();
            assert_eq!(out.len(), 1);
            assert!(!out[0].aggregated);
            // Magic but too short to hold a checksum: plain, as the KCL treats it.
            let short = [&MAGIC[..], &[0u8; 16]].concat();
            assert!(!deaggregator.deaggregate(short, "k").unwrap()[0].aggregated);
            assert!(!deaggregator.deaggregate(&MAGIC[..3], "k").unwrap()[0].aggregated);
            assert!(!deaggregator.deaggregate(Bytes::new(), "k").unwrap()[0].aggregated);
        }
    }

    #[test]
    fn a_bad_checksum_is_an_error_strictly_and_a_plain_record_for_the_kcl() {
        let mut flipped = golden_bytes();
        flipped[10] ^= 1;
        assert_eq!(
            deaggregate(flipped.clone(), "pk1"),
            Err(DeaggregationError::ChecksumMismatch)
        );
        let kcl = Deaggregator::kcl(0, u128::MAX)
            .deaggregate(flipped.clone(), "pk1")
            .unwrap();
        assert_eq!(kcl.len(), 1);
        assert!(!kcl[0].aggregated);
        assert_eq!(&kcl[0].data[..], &flipped[..]);
    }

    #[test]
    fn garbage_and_truncated_aggregates_are_errors_or_plain_records_never_panics() {
        let garbage = frame(&[0xFF; 12]);
        assert!(matches!(
            deaggregate(garbage.clone(), "k"),
            Err(DeaggregationError::Malformed(_))
        ));
        assert!(
            !Deaggregator::kcl(0, u128::MAX)
                .deaggregate(garbage, "k")
                .unwrap()[0]
                .aggregated
        );
        // Every truncation of a valid aggregate, re-framed with a valid checksum.
        let good = golden_bytes();
        let body = &good[4..good.len() - 16];
        for cut in 0..body.len() {
            let framed = frame(&body[..cut]);
            let _ = deaggregate(framed.clone(), "k");
            let _ = Deaggregator::kcl(0, 5).deaggregate(framed, "k");
        }
    }

    #[test]
    fn a_missing_required_field_is_detected() {
        let body = proto::AggregatedRecord {
            partition_key_table: vec!["a".into()],
            explicit_hash_key_table: vec![],
            records: vec![proto::Record {
                partition_key_index: None,
                explicit_hash_key_index: None,
                data: Some(Bytes::from_static(b"x")),
                tags: vec![],
            }],
        }
        .encode_to_vec();
        assert_eq!(
            deaggregate(frame(&body), "k"),
            Err(DeaggregationError::MissingField {
                record: 0,
                field: "partition_key_index"
            })
        );
        // Java's proto2 parser rejects it, so the KCL passes the record through.
        let kcl = Deaggregator::kcl(0, u128::MAX)
            .deaggregate(frame(&body), "k")
            .unwrap();
        assert!(!kcl[0].aggregated);
    }

    #[test]
    fn an_index_past_the_table_is_an_error_and_the_kcl_keeps_the_records_before_it() {
        let record = |pk: u64| proto::Record {
            partition_key_index: Some(pk),
            explicit_hash_key_index: None,
            data: Some(Bytes::from_static(b"x")),
            tags: vec![],
        };
        let body = proto::AggregatedRecord {
            partition_key_table: vec!["a".into()],
            explicit_hash_key_table: vec![],
            records: vec![record(0), record(3), record(0)],
        }
        .encode_to_vec();
        assert!(matches!(
            deaggregate(frame(&body), "k"),
            Err(DeaggregationError::IndexOutOfRange {
                record: 1,
                index: 3,
                ..
            })
        ));
        let kcl = Deaggregator::kcl(0, u128::MAX)
            .deaggregate(frame(&body), "k")
            .unwrap();
        assert_eq!(kcl.len(), 1);
    }

    #[test]
    fn records_outside_the_shard_are_flagged_filtered_or_drop_the_aggregate() {
        // Two records: one in the lower half of the hash space, one in the upper half.
        let low = UserRecord::new("low", "a").with_explicit_hash_key("5");
        let high = UserRecord::new("high", "b").with_explicit_hash_key(u128::MAX.to_string());
        let data = aggregate_of(vec![low, high]);
        let half = u128::MAX / 2;

        let flagged = Deaggregator::new()
            .shard_range(0, half)
            .deaggregate(data.clone(), "a")
            .unwrap();
        assert_eq!(
            flagged.iter().map(|r| r.outside_shard).collect::<Vec<_>>(),
            [false, true]
        );
        let filtered = Deaggregator::new()
            .shard_range(0, half)
            .out_of_range(OutOfRange::Filter)
            .deaggregate(data.clone(), "a")
            .unwrap();
        assert_eq!(filtered.len(), 1);
        assert_eq!(filtered[0].sub_sequence_number, 0);
        assert_eq!(
            Deaggregator::new()
                .shard_range(0, half)
                .out_of_range(OutOfRange::Error)
                .deaggregate(data.clone(), "a"),
            Err(DeaggregationError::OutsideShard { record: 1 })
        );
        // The KCL throws the whole aggregate away.
        assert!(Deaggregator::kcl(0, half)
            .deaggregate(data.clone(), "a")
            .unwrap()
            .is_empty());
        assert_eq!(
            Deaggregator::kcl(0, u128::MAX)
                .deaggregate(data, "a")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn partition_key_hashes_decide_the_range_when_there_is_no_explicit_hash_key() {
        let key = "some key";
        let hash = partition_key_hash(key);
        let data = aggregate_of(vec![UserRecord::new("1", key), UserRecord::new("2", key)]);
        assert_eq!(
            Deaggregator::kcl(hash, hash)
                .deaggregate(data.clone(), key)
                .unwrap()
                .len(),
            2
        );
        assert!(Deaggregator::kcl(hash + 1, u128::MAX)
            .deaggregate(data, key)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn explicit_hash_keys_are_read_as_java_reads_them_in_kcl_mode() {
        assert!(matches!(kcl_hash_key("007"), HashKey::In(7)));
        assert!(matches!(kcl_hash_key("+7"), HashKey::In(7)));
        assert!(matches!(kcl_hash_key("-0"), HashKey::In(0)));
        assert!(matches!(kcl_hash_key("-1"), HashKey::OutOfDomain));
        assert!(matches!(
            kcl_hash_key("340282366920938463463374607431768211456"),
            HashKey::OutOfDomain
        ));
        assert!(matches!(kcl_hash_key("1e5"), HashKey::NotANumber));
        assert!(matches!(kcl_hash_key(""), HashKey::NotANumber));
        // Strictly, such a key is an error value.
        let body = proto::AggregatedRecord {
            partition_key_table: vec!["a".into()],
            explicit_hash_key_table: vec!["007".into()],
            records: vec![proto::Record {
                partition_key_index: Some(0),
                explicit_hash_key_index: Some(0),
                data: Some(Bytes::new()),
                tags: vec![],
            }],
        }
        .encode_to_vec();
        assert!(matches!(
            deaggregate(frame(&body), "a"),
            Err(DeaggregationError::InvalidExplicitHashKey { record: 0, .. })
        ));
    }

    #[test]
    fn a_single_record_builder_output_is_plain() {
        let record = UserRecord::new("x", "k");
        let mut builder = AggregateBuilder::new(AggregateLimits::default());
        builder.try_push(record).unwrap();
        let entry = builder.finish().unwrap();
        assert!(!deaggregate(entry.data, "k").unwrap()[0].aggregated);
    }
}
