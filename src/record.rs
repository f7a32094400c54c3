//! Step 1 of a record's journey: what a user record is, how it is validated, and its hash key.
//!
//! Everything here is plain synchronous code: the producer calls it on the caller's thread at
//! `put`, so hashing scales with the number of threads putting.

use std::fmt;

use bytes::Bytes;
use md5::{Digest, Md5};

/// Longest partition key Kinesis accepts, in Unicode scalar values.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// One record as the user hands it to the producer: data, partition key and an optional
/// explicit hash key.
///
/// The producer hands the same value back when it rejects the record at `put`
/// ([`PutError`](crate::PutError)) or reports it failed ([`FailedRecord`](crate::FailedRecord)).
#[derive(Clone)]
pub struct UserRecord {
    data: Bytes,
    partition_key: KeyText,
    explicit_hash_key: Option<String>,
}

/// A partition key as a record holds it: the caller's string, or a random UUID written in
/// place by the default partitioner, so that `put_data` allocates nothing for its key (a
/// third of what `put` itself spends beyond the key's MD5 went to making, allocating and
/// freeing that string).
#[derive(Clone)]
// Only the producer makes UUID keys; the aggregation format alone never does.
#[cfg_attr(not(feature = "producer"), allow(dead_code))]
enum KeyText {
    Owned(String),
    Uuid(UuidText),
}

impl KeyText {
    fn as_str(&self) -> &str {
        match self {
            KeyText::Owned(key) => key,
            KeyText::Uuid(text) => text.as_str(),
        }
    }

    fn into_string(self) -> String {
        match self {
            KeyText::Owned(key) => key,
            KeyText::Uuid(text) => text.as_str().to_owned(),
        }
    }
}

/// A version 4 UUID in its canonical text (lower-case hex, hyphenated), held in place.
#[derive(Clone, Copy)]
pub(crate) struct UuidText([u8; UuidText::LEN]);

#[cfg_attr(not(feature = "producer"), allow(dead_code))]
impl UuidText {
    pub(crate) const LEN: usize = 36;

    /// The UUID of these 128 random bits, with its version (4) and variant (RFC 4122) set.
    pub(crate) fn random_v4(bits: u128) -> Self {
        let bits = (bits & !(0xF << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
        let mut text = [b'-'; Self::LEN];
        let bytes = bits.to_be_bytes();
        // Byte i of the UUID goes to these two characters: the hyphens sit after bytes 3, 5,
        // 7 and 9.
        let mut at = 0;
        for (i, byte) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            let [high, low] = HEX_PAIRS[usize::from(*byte)];
            text[at] = high;
            text[at + 1] = low;
            at += 2;
        }
        UuidText(text)
    }

    pub(crate) fn as_str(&self) -> &str {
        // SAFETY: `random_v4` is the only way to make one, and it writes only ASCII (hex
        // digits from `HEX_PAIRS` and hyphens) into every byte.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

/// Each byte's two lower-case hex digits.
#[cfg_attr(not(feature = "producer"), allow(dead_code))]
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [DIGITS[i >> 4], DIGITS[i & 0xF]];
        i += 1;
    }
    table
};

impl PartialEq for UserRecord {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
            && self.partition_key() == other.partition_key()
            && self.explicit_hash_key == other.explicit_hash_key
    }
}

impl Eq for UserRecord {}

impl UserRecord {
    /// A record routed by the MD5 of its partition key.
    pub fn new(data: impl Into<Bytes>, partition_key: impl Into<String>) -> Self {
        UserRecord {
            data: data.into(),
            partition_key: KeyText::Owned(partition_key.into()),
            explicit_hash_key: None,
        }
    }

    /// A record keyed by a random UUID held in place (the default partitioner's key).
    #[cfg(feature = "producer")]
    pub(crate) fn with_uuid_key(data: Bytes, key: UuidText) -> Self {
        UserRecord {
            data,
            partition_key: KeyText::Uuid(key),
            explicit_hash_key: None,
        }
    }

    /// Routes the record by this explicit hash key (a decimal in `0..=2^128-1`) instead of the
    /// MD5 of its partition key.
    pub fn with_explicit_hash_key(mut self, explicit_hash_key: impl Into<String>) -> Self {
        self.explicit_hash_key = Some(explicit_hash_key.into());
        self
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }

    pub fn partition_key(&self) -> &str {
        self.partition_key.as_str()
    }

    pub fn explicit_hash_key(&self) -> Option<&str> {
        self.explicit_hash_key.as_deref()
    }

    /// Takes the record apart into `(data, partition_key, explicit_hash_key)`.
    pub fn into_parts(self) -> (Bytes, String, Option<String>) {
        (
            self.data,
            self.partition_key.into_string(),
            self.explicit_hash_key,
        )
    }

    /// Puts a record together from its parts (the inverse of [`into_parts`](Self::into_parts)).
    pub(crate) fn from_parts(
        data: Bytes,
        partition_key: String,
        explicit_hash_key: Option<String>,
    ) -> Self {
        UserRecord {
            data,
            partition_key: KeyText::Owned(partition_key),
            explicit_hash_key,
        }
    }

    /// The hash key Kinesis routes the record by, for a record that passed
    /// [`validate`](Self::validate) (which returns the same): its explicit hash key's value,
    /// or the MD5 of its partition key. (An explicit hash key that does not parse counts as
    /// 0; validation refuses it.)
    #[cfg(feature = "producer")]
    pub(crate) fn hash_key(&self) -> u128 {
        match &self.explicit_hash_key {
            Some(ehk) => parse_explicit_hash_key(ehk).unwrap_or(0),
            None => partition_key_hash(self.partition_key()),
        }
    }

    /// The bytes Kinesis counts against its record size limit: data plus partition key.
    pub fn kinesis_size(&self) -> usize {
        self.data.len() + self.partition_key().len()
    }

    /// The bytes this record holds in the producer's backlog.
    #[cfg(feature = "producer")]
    pub(crate) fn backlog_size(&self) -> usize {
        self.kinesis_size() + self.explicit_hash_key.as_ref().map_or(0, String::len)
    }

    /// Checks the record against Kinesis' rules (key length, explicit hash key, data + key at
    /// most `max_record_size` bytes) and returns its hash key.
    pub fn validate(&self, max_record_size: usize) -> Result<u128, RecordProblem> {
        let key = self.partition_key();
        if key.is_empty() {
            return Err(RecordProblem::EmptyPartitionKey);
        }
        // A key of at most 256 bytes has at most 256 characters: only longer ones are counted.
        if key.len() > MAX_PARTITION_KEY_CHARS {
            let chars = key.chars().count();
            if chars > MAX_PARTITION_KEY_CHARS {
                return Err(RecordProblem::PartitionKeyTooLong { chars });
            }
        }
        let size = self.kinesis_size();
        if size > max_record_size {
            return Err(RecordProblem::TooLarge {
                size,
                max: max_record_size,
            });
        }
        match &self.explicit_hash_key {
            Some(ehk) => {
                parse_explicit_hash_key(ehk).ok_or_else(|| RecordProblem::InvalidExplicitHashKey {
                    value: ehk.chars().take(64).collect(),
                })
            }
            None => Ok(partition_key_hash(key)),
        }
    }
}

impl fmt::Debug for UserRecord {
    // Record data may be sensitive and large: show its length, never its bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("data_len", &self.data.len())
            .field("partition_key", &self.partition_key())
            .field("explicit_hash_key", &self.explicit_hash_key)
            .finish()
    }
}

/// Why a record was refused at `put`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordProblem {
    #[error("the partition key is empty (Kinesis requires 1 to 256 characters)")]
    EmptyPartitionKey,
    #[error("the partition key has {chars} characters (Kinesis allows at most 256)")]
    PartitionKeyTooLong { chars: usize },
    #[error(
        "the explicit hash key {value:?} is not a decimal integer in 0..=2^128-1 without leading zeros"
    )]
    InvalidExplicitHashKey { value: String },
    #[error("the record is {size} bytes (data + partition key); the maximum is {max}")]
    TooLarge { size: usize, max: usize },
    /// Its data starts with the KPL aggregate's magic bytes, so (with aggregation on) it goes
    /// out as an aggregate of one, which readers give back as it was put; that aggregate, with
    /// its partition key, would pass the record size limit.
    #[error(
        "the record's data starts with the KPL aggregate magic bytes, so it must go out as an aggregate of one, which is {size} bytes with its partition key; the maximum is {max}"
    )]
    TooLargeToWrap { size: usize, max: usize },
}

/// The hash key Kinesis routes a record by when it has no explicit hash key: the MD5 of the
/// UTF-8 partition key, read as a big-endian 128-bit integer.
pub fn partition_key_hash(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// Parses an explicit hash key as Kinesis does: `0|([1-9]\d{0,38})`, at most 2^128-1.
pub fn parse_explicit_hash_key(text: &str) -> Option<u128> {
    let bytes = text.as_bytes();
    let well_formed = !bytes.is_empty()
        && bytes.len() <= 39
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes[0] != b'0' || bytes.len() == 1);
    if !well_formed {
        return None;
    }
    // Up to 19 digits at a time in a u64 (they always fit), joined in u128 steps that check for
    // overflow: 39 digits can exceed u128::MAX. A third of the cost of parsing digit by digit
    // in u128, on a path every explicit-hash-key record takes.
    const POW10: [u128; 20] = {
        let mut table = [1u128; 20];
        let mut i = 1;
        while i < 20 {
            table[i] = table[i - 1] * 10;
            i += 1;
        }
        table
    };
    let mut value: u128 = 0;
    for chunk in bytes.chunks(19) {
        let part = chunk
            .iter()
            .fold(0u64, |acc, digit| acc * 10 + u64::from(digit - b'0'));
        value = value
            .checked_mul(POW10[chunk.len()])?
            .checked_add(u128::from(part))?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The `uuid` crate comes with the producer.
    #[cfg(feature = "producer")]
    #[test]
    fn a_uuid_key_reads_as_the_uuid_crate_writes_it() {
        let mut next = crate::test_rng::xorshift64(0x1234_5678_9ABC_DEF0);
        for bits in [0, u128::MAX, 0x0123_4567_89AB_CDEF_FEDC_BA98_7654_3210]
            .into_iter()
            .chain(std::iter::repeat_with(|| {
                (u128::from(next()) << 64) | u128::from(next())
            }))
            .take(1_000)
        {
            let expected = uuid::Builder::from_random_bytes(bits.to_be_bytes()).into_uuid();
            let text = UuidText::random_v4(bits);
            assert_eq!(text.as_str(), expected.hyphenated().to_string());
        }
    }

    #[cfg(feature = "producer")]
    #[test]
    fn a_record_with_a_uuid_key_equals_and_parts_as_one_with_the_same_string() {
        let key = UuidText::random_v4(42);
        let held = UserRecord::with_uuid_key(Bytes::from_static(b"d"), key);
        let owned = UserRecord::new(Bytes::from_static(b"d"), key.as_str());
        assert_eq!(held, owned);
        assert_eq!(held.kinesis_size(), 37);
        assert_eq!(held.validate(1 << 20), owned.validate(1 << 20));
        assert_eq!(format!("{held:?}"), format!("{owned:?}"));
        assert_eq!(held.into_parts(), owned.into_parts());
    }

    #[test]
    fn hash_key_is_md5_read_big_endian() {
        // MD5("pk1") = 0x8bb3c5e3...; routing must read it as a big-endian integer.
        let digest: [u8; 16] = Md5::digest(b"pk1").into();
        assert_eq!(partition_key_hash("pk1").to_be_bytes(), digest);
        assert_eq!(
            partition_key_hash(""),
            0xd41d8cd98f00b204e9800998ecf8427e_u128
        );
    }

    proptest::proptest! {
        #[test]
        fn explicit_hash_keys_parse_as_the_standard_library_does(digits in "[1-9][0-9]{0,38}|0") {
            proptest::prop_assert_eq!(parse_explicit_hash_key(&digits), digits.parse::<u128>().ok());
        }
    }

    #[test]
    fn explicit_hash_keys_follow_the_kinesis_pattern() {
        assert_eq!(parse_explicit_hash_key("0"), Some(0));
        assert_eq!(
            parse_explicit_hash_key("340282366920938463463374607431768211455"),
            Some(u128::MAX)
        );
        for bad in [
            "",
            "-1",
            "01",
            "1.5",
            " 1",
            "340282366920938463463374607431768211456",
            "1000000000000000000000000000000000000000",
            "abc",
            "１",
        ] {
            assert_eq!(parse_explicit_hash_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn validation_names_each_problem() {
        let max = 1024;
        assert_eq!(
            UserRecord::new("x", "").validate(max),
            Err(RecordProblem::EmptyPartitionKey)
        );
        let long = "é".repeat(257);
        assert_eq!(
            UserRecord::new("x", long).validate(max),
            Err(RecordProblem::PartitionKeyTooLong { chars: 257 })
        );
        // 256 multi-byte characters are allowed: the limit counts characters, not bytes.
        assert!(UserRecord::new("x", "é".repeat(256)).validate(max).is_ok());
        assert_eq!(
            UserRecord::new(vec![0u8; 1020], "12345").validate(max),
            Err(RecordProblem::TooLarge {
                size: 1025,
                max: 1024
            })
        );
        assert!(matches!(
            UserRecord::new("x", "k")
                .with_explicit_hash_key("2e10")
                .validate(max),
            Err(RecordProblem::InvalidExplicitHashKey { .. })
        ));
        assert_eq!(
            UserRecord::new("x", "k")
                .with_explicit_hash_key("42")
                .validate(max),
            Ok(42)
        );
    }

    #[test]
    fn debug_never_prints_data() {
        let text = format!("{:?}", UserRecord::new("secret-payload", "k"));
        assert!(!text.contains("secret-payload"), "{text}");
    }
}
