//! Step 2: the KPL aggregation format. Packs user records into one Kinesis record and unpacks
//! them again. See `aggregation-format.md` for the format in prose.
//!
//! An aggregated record is `F3 89 9A C2 | AggregatedRecord (protobuf) | MD5(protobuf)`. The
//! encoder here writes the protobuf by hand, field by field in tag order, so that the size of an
//! aggregate is known exactly, varint by varint, before a record is added — the limits are never
//! crossed and never guessed. Reading aggregates back is [`crate::deaggregation`].

use std::hash::BuildHasher;
use std::sync::OnceLock;

use bytes::{BufMut, Bytes};
use prost::encoding::{encode_varint, encoded_len_varint};

use crate::record::UserRecord;

/// The four bytes every aggregated Kinesis record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
pub(crate) const DIGEST_LEN: usize = 16;
/// Magic plus checksum: what an aggregate costs before its first byte of protobuf.
pub(crate) const FRAME_LEN: usize = MAGIC.len() + DIGEST_LEN;

// Protobuf keys (field number << 3 | wire type 2, length-delimited) and (1 << 3 | 0) etc.
const KEY_PARTITION_KEY_TABLE: u8 = 0x0A;
const KEY_EXPLICIT_HASH_KEY_TABLE: u8 = 0x12;
const KEY_RECORDS: u8 = 0x1A;
const KEY_RECORD_PARTITION_KEY_INDEX: u8 = 0x08;
const KEY_RECORD_EXPLICIT_HASH_KEY_INDEX: u8 = 0x10;
const KEY_RECORD_DATA: u8 = 0x1A;

/// A record's fields before its data: four one-byte keys, each with a varint of at most 10
/// bytes (44; in practice a handful).
struct Header {
    bytes: [u8; 44],
    len: usize,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            bytes: [0; 44],
            len: 0,
        }
    }
}

impl Header {
    /// Appends `key` and `value` as a varint (at most four fields).
    fn field(&mut self, key: u8, mut value: u64) {
        self.bytes[self.len] = key;
        self.len += 1;
        while value >= 0x80 {
            self.bytes[self.len] = (value as u8) | 0x80;
            self.len += 1;
            value >>= 7;
        }
        self.bytes[self.len] = value as u8;
        self.len += 1;
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Bytes taken by a length-delimited field with a one-byte key.
fn delimited_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Bytes taken by a varint field with a one-byte key.
fn varint_field_len(value: u32) -> usize {
    1 + encoded_len_varint(u64::from(value))
}

/// Limits one aggregate must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateLimits {
    /// Largest encoded aggregate, magic and checksum included (KPL default 51,200).
    pub max_size: usize,
    /// Most user records in one aggregate.
    pub max_count: usize,
}

impl Default for AggregateLimits {
    fn default() -> Self {
        AggregateLimits {
            max_size: 51_200,
            max_count: u32::MAX as usize,
        }
    }
}

/// One finished Kinesis record: what goes into a PutRecords entry.
#[derive(Debug, Clone)]
pub struct KinesisEntry {
    pub data: Bytes,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    /// False when the entry is one user record sent as it is.
    pub aggregated: bool,
}

/// A Kinesis record as the producer holds it until Kinesis has it: like [`KinesisEntry`], but
/// an aggregate stays in the pieces it was built in.
#[derive(Debug)]
pub(crate) struct Entry {
    pub data: EntryData,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub aggregated: bool,
}

/// A Kinesis record's bytes: one buffer (a record sent as it is), or an aggregate's pieces
/// (a small aggregate's protobuf is one piece). The request body base64-encodes the pieces one
/// after another, so an aggregate is not copied again on its way out.
#[derive(Debug)]
pub(crate) enum EntryData {
    Whole(Bytes),
    Pieces(Box<AggregatePieces>),
}

/// A finished aggregate: its sections as the builder wrote them (or, for a small one, its
/// protobuf copied into one buffer), and their checksum. The checksum is computed when first
/// needed: usually as the request body is written, with the other aggregates' of the request,
/// eight at a time ([`checksum_all`]); else by `visit`, `parts` or `to_bytes`.
#[derive(Debug)]
pub(crate) struct AggregatePieces {
    sections: Sections,
    digest: OnceLock<[u8; DIGEST_LEN]>,
}

/// The protobuf of an aggregate, in the buffers it was written to: the two key tables, and the
/// `records` field in chunks that are added as it grows (a record never spans two chunks).
/// Growing by a new chunk instead of reallocating means no byte is copied twice.
#[derive(Debug, Default)]
pub(crate) struct Sections {
    /// Encoded `partition_key_table` entries (field 1), in table order.
    partition_key_table: Vec<u8>,
    /// Encoded `explicit_hash_key_table` entries (field 2).
    explicit_hash_key_table: Vec<u8>,
    /// Encoded `records` entries (field 3): the first chunk (often the only one) ...
    records: Vec<u8>,
    /// ... and the chunks after it.
    more_records: Vec<Vec<u8>>,
    /// Bytes in all the record chunks.
    records_len: usize,
    /// Empty chunks from an earlier aggregate, taken before any new one is allocated.
    spare: Vec<Vec<u8>>,
}

impl Sections {
    /// Encoded protobuf length.
    fn len(&self) -> usize {
        self.partition_key_table.len() + self.explicit_hash_key_table.len() + self.records_len
    }

    /// Bytes the buffers hold, written or not.
    #[cfg_attr(not(feature = "producer"), allow(dead_code))]
    pub(crate) fn capacity(&self) -> usize {
        self.partition_key_table.capacity()
            + self.explicit_hash_key_table.capacity()
            + self.records.capacity()
            + self.more_records.iter().map(Vec::capacity).sum::<usize>()
            + self.spare.iter().map(Vec::capacity).sum::<usize>()
    }

    /// The same buffers, emptied: the first record chunk and the key tables keep their room,
    /// and the other record chunks wait as spares.
    fn emptied(self) -> Sections {
        let Sections {
            mut partition_key_table,
            mut explicit_hash_key_table,
            mut records,
            more_records,
            records_len: _,
            mut spare,
        } = self;
        partition_key_table.clear();
        explicit_hash_key_table.clear();
        records.clear();
        spare.extend(more_records.into_iter().map(|mut chunk| {
            chunk.clear();
            chunk
        }));
        Sections {
            partition_key_table,
            explicit_hash_key_table,
            records,
            more_records: Vec::new(),
            records_len: 0,
            spare,
        }
    }

    /// The protobuf's bytes, in order.
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        [
            &self.partition_key_table,
            &self.explicit_hash_key_table,
            &self.records,
        ]
        .into_iter()
        .chain(&self.more_records)
        .map(Vec::as_slice)
    }

    fn digest(&self) -> [u8; DIGEST_LEN] {
        crate::md5_lanes::digest_one(self.parts())
    }

    /// Whether the finished aggregate is copied into one exact buffer: a small one is, as the
    /// pieces' spare room would cost more than the copy; a large one stays in its pieces.
    fn goes_out_whole(&self) -> bool {
        self.len() <= PIECES_MIN
    }

    /// The same protobuf in one buffer of its exact size, in the record section (the key
    /// tables left empty): what a small aggregate is sent from, so that the builder keeps its
    /// buffers, spare room and all, for the next aggregate.
    fn joined(&self) -> Sections {
        let mut records = Vec::with_capacity(self.len());
        for part in self.parts() {
            records.extend_from_slice(part);
        }
        Sections {
            records_len: records.len(),
            records,
            ..Sections::default()
        }
    }

    /// The whole aggregate in one buffer: magic, protobuf, checksum.
    fn to_bytes(&self, digest: &[u8; DIGEST_LEN]) -> Bytes {
        let mut out = Vec::with_capacity(FRAME_LEN + self.len());
        out.extend_from_slice(&MAGIC);
        for part in self.parts() {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(digest);
        Bytes::from(out)
    }

    /// Room for `more` bytes of the record section, contiguous: the last chunk if they fit,
    /// else a new chunk (see below). Nothing written moves.
    fn record_room(&mut self, more: usize) -> &mut Vec<u8> {
        let written = self.records_len;
        self.records_len += more;
        let last = self.more_records.last().unwrap_or(&self.records);
        if last.capacity() - last.len() < more {
            // As large as what is written (doubling) while the section is small, so that a
            // small aggregate holds little spare room; `CHUNK_LEN` past that.
            let len = written.clamp(1, CHUNK_LEN);
            let fits = self
                .spare
                .last()
                .is_some_and(|chunk| chunk.capacity() >= more);
            let chunk = fits.then(|| self.spare.pop()).flatten();
            self.more_records
                .push(chunk.unwrap_or_else(|| Vec::with_capacity(more.max(len))));
        }
        match self.more_records.last_mut() {
            Some(chunk) => chunk,
            None => &mut self.records,
        }
    }
}

// The producer sends and reads back aggregates in pieces; without it only `to_bytes` is used.
#[cfg_attr(not(feature = "producer"), allow(dead_code))]
impl AggregatePieces {
    /// Its buffers, taken out (the box stays, to be used again: see
    /// [`AggregateBuilder::furnish`]); `None` for a small aggregate's single copy, which fits
    /// no builder.
    #[cfg(feature = "producer")]
    pub(crate) fn take_room(&mut self) -> Option<Sections> {
        let sections = std::mem::take(&mut self.sections);
        // Only a copy made by `joined` has no partition key table.
        (sections.partition_key_table.capacity() > 0).then_some(sections)
    }

    /// Encoded length, magic and checksum included.
    pub fn len(&self) -> usize {
        FRAME_LEN + self.sections.len()
    }

    /// The checksum, computed now if no pass has computed it yet.
    fn digest(&self) -> &[u8; DIGEST_LEN] {
        self.digest.get_or_init(|| self.sections.digest())
    }

    /// The aggregate's bytes, in order, as slices.
    #[cfg(test)]
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&MAGIC[..])
            .chain(self.sections.parts())
            .chain(std::iter::once(&self.digest()[..]))
    }

    /// Hands `each` the aggregate's bytes in order, in slices (the checksum is computed first
    /// if [`checksum_all`] has not computed it).
    pub fn visit(&self, mut each: impl FnMut(&[u8])) {
        let digest = self.digest();
        each(&MAGIC);
        self.sections.parts().for_each(&mut each);
        each(digest);
    }

    /// The aggregate in one buffer.
    pub fn to_bytes(&self) -> Bytes {
        self.sections.to_bytes(self.digest())
    }

    /// The user records, byte for byte what was pushed, their data slices of the pieces (for a
    /// failure report or a re-route: no copy of the aggregate is made).
    pub fn into_records(self) -> Vec<UserRecord> {
        let Sections {
            partition_key_table,
            explicit_hash_key_table,
            records,
            more_records,
            records_len: _,
            spare: _,
        } = self.sections;
        let parts = [partition_key_table, explicit_hash_key_table, records];
        records_of_protobuf(parts.into_iter().chain(more_records).map(Bytes::from))
    }
}

/// Computes the checksums of those of `aggregates` that have none yet, side by side (see
/// [`checksums`]). The producer calls it as it writes a request body, a few aggregates ahead of
/// their base64, so that each aggregate is read from memory once and then from the cache.
#[cfg_attr(not(feature = "producer"), allow(dead_code))]
pub(crate) fn checksum_all<'a>(aggregates: impl Iterator<Item = &'a AggregatePieces>) {
    let pending: Vec<&AggregatePieces> = aggregates.filter(|a| a.digest.get().is_none()).collect();
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut ends = Vec::with_capacity(pending.len());
    for aggregate in &pending {
        parts.extend(aggregate.sections.parts());
        ends.push(parts.len());
    }
    let messages: Vec<&[&[u8]]> = ends
        .iter()
        .scan(0, |start, &end| {
            let message = &parts[*start..end];
            *start = end;
            Some(message)
        })
        .collect();
    let mut digests = vec![[0u8; DIGEST_LEN]; pending.len()];
    checksums(&messages, &mut digests);
    for (aggregate, digest) in pending.iter().zip(digests) {
        // Set once: only the thread writing the body computes it.
        let _ = aggregate.digest.set(digest);
    }
}

/// The MD5 checksums of several aggregates' protobuf messages, each given as the slices it is
/// made of, into `out` (one per message). With AVX2, eight messages are hashed at once, one in
/// each lane of a vector register: about seven times the bytes per second of hashing them one
/// by one, which is what the producer does with the aggregates of a request. The result is the
/// same as hashing each message alone.
///
/// # Panics
/// If `out` does not have one digest per message.
pub fn checksums(messages: &[&[&[u8]]], out: &mut [[u8; DIGEST_LEN]]) {
    crate::md5_lanes::digests(messages, out);
}

impl EntryData {
    #[cfg_attr(not(feature = "producer"), allow(dead_code))]
    pub fn len(&self) -> usize {
        match self {
            EntryData::Whole(bytes) => bytes.len(),
            EntryData::Pieces(pieces) => pieces.len(),
        }
    }

    /// The bytes in one buffer: a whole one as it is, an aggregate's pieces joined.
    pub fn into_bytes(self) -> Bytes {
        match self {
            EntryData::Whole(bytes) => bytes,
            EntryData::Pieces(pieces) => pieces.to_bytes(),
        }
    }
}

impl KinesisEntry {
    /// A user record sent to Kinesis as it is.
    pub fn plain(record: &UserRecord) -> Self {
        Entry::plain(record).into_kinesis_entry()
    }
}

impl Entry {
    /// Asks for the line where the data and the partition key begin, each with the word
    /// before it: the allocator keeps a buffer's size there, and reads it when the buffer is
    /// freed.
    #[cfg(feature = "producer")]
    pub(crate) fn prefetch_data(&self) {
        use crate::prefetch::prefetch;
        let word = size_of::<usize>();
        if let EntryData::Whole(bytes) = &self.data {
            prefetch(bytes.as_ptr().wrapping_sub(word), word + 1);
        }
        prefetch(self.partition_key.as_ptr().wrapping_sub(word), word + 1);
    }

    /// A user record sent to Kinesis as it is.
    pub fn plain(record: &UserRecord) -> Self {
        Entry {
            data: EntryData::Whole(record.data().clone()),
            partition_key: record.partition_key().to_owned(),
            explicit_hash_key: record.explicit_hash_key().map(str::to_owned),
            aggregated: false,
        }
    }

    /// The buffers of an aggregate, for a later one to write into (see
    /// [`AggregateBuilder::furnish`]); `None` for a record sent as it is.
    #[cfg(feature = "producer")]
    pub(crate) fn into_room(self) -> Option<Box<AggregatePieces>> {
        match self.data {
            EntryData::Pieces(pieces) => Some(pieces),
            EntryData::Whole(_) => None,
        }
    }

    fn into_kinesis_entry(self) -> KinesisEntry {
        KinesisEntry {
            data: self.data.into_bytes(),
            partition_key: self.partition_key,
            explicit_hash_key: self.explicit_hash_key,
            aggregated: self.aggregated,
        }
    }
}

/// Builds one aggregate for one shard, knowing its exact encoded size at every step.
///
/// Each record is encoded as it is pushed: its partition key (and explicit hash key) into the
/// key tables when they are new there, its data and key indices into the record section. The
/// builder keeps only those bytes, not the records (except the first, which routes the
/// aggregate and goes out as itself when it stays alone); [`finish`](Self::finish) joins the
/// sections behind the magic and appends the checksum. Keys are de-duplicated; every user
/// record keeps its own key.
#[derive(Debug)]
pub struct AggregateBuilder {
    limits: AggregateLimits,
    /// The first record, whole.
    first: Option<UserRecord>,
    /// Records pushed.
    count: usize,
    /// What is encoded so far.
    sections: Sections,
    partition_keys: KeyTable,
    explicit_hash_keys: KeyTable,
    /// Section sizes of the previous aggregate: the next one reserves this much at its first
    /// record instead of regrowing step by step (and an idle builder holds no memory, unless
    /// `finish_entry` was told to keep its room).
    last_sizes: (usize, usize, usize),
    /// Records in the previous aggregate.
    last_count: usize,
    /// The box of a sent aggregate (see [`furnish`](Self::furnish)), emptied, for the next.
    spare_box: Option<Box<AggregatePieces>>,
}

impl AggregateBuilder {
    pub fn new(limits: AggregateLimits) -> Self {
        AggregateBuilder {
            limits,
            first: None,
            count: 0,
            sections: Sections::default(),
            partition_keys: KeyTable::default(),
            explicit_hash_keys: KeyTable::default(),
            last_sizes: (0, 0, 0),
            last_count: 0,
            spare_box: None,
        }
    }

    /// Records the previous aggregate held: what the next one is likely to hold.
    pub fn capacity(&self) -> usize {
        self.last_count
    }

    /// Whether the builder is empty and holds no buffer: the moment to
    /// [`furnish`](Self::furnish) it.
    #[cfg(feature = "producer")]
    pub(crate) fn wants_room(&self) -> bool {
        self.count == 0 && self.sections.capacity() == 0
    }

    /// Gives a builder that [`wants_room`](Self::wants_room) the buffers of an earlier
    /// aggregate (and the box of a sent one), to write its next aggregate into instead of
    /// allocating, and instead of another thread freeing them: with glibc's allocator, a
    /// thread that frees what another allocated queues for that thread's arena lock.
    #[cfg(feature = "producer")]
    pub(crate) fn furnish(&mut self, sections: Sections, spare_box: Option<Box<AggregatePieces>>) {
        debug_assert!(self.wants_room());
        self.sections = sections.emptied();
        if let Some(mut spare) = spare_box.filter(|_| self.spare_box.is_none()) {
            spare.digest = OnceLock::new();
            self.spare_box = Some(spare);
        }
    }

    /// The buffers an empty builder kept from its last aggregate, taken out of it.
    #[cfg(feature = "producer")]
    pub(crate) fn release_room(&mut self) -> Option<Sections> {
        (self.count == 0 && self.sections.capacity() > 0)
            .then(|| std::mem::take(&mut self.sections))
    }

    /// Bytes of buffer an empty builder holds for its next aggregate (see `finish_entry`).
    #[cfg_attr(not(feature = "producer"), allow(dead_code))]
    pub(crate) fn idle_room(&self) -> usize {
        if self.count > 0 {
            0
        } else {
            self.sections.capacity()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Asks for the cache lines [`finish_entry`](Self::finish_entry) reads: a lone
    /// record's keys (it goes out as itself), or a small aggregate's sections (a large one is
    /// not read there).
    #[cfg(feature = "producer")]
    pub(crate) fn prefetch_finish(&self) {
        use crate::prefetch::prefetch;
        if self.count == 1 {
            if let Some(first) = &self.first {
                let key = first.partition_key();
                prefetch(key.as_ptr(), key.len());
                if let Some(ehk) = first.explicit_hash_key() {
                    prefetch(ehk.as_ptr(), ehk.len());
                }
            }
        } else if self.sections.goes_out_whole() {
            for part in self.sections.parts() {
                prefetch(part.as_ptr(), part.len());
            }
        }
    }

    /// Asks for the cache lines the next [`try_push`](Self::try_push) touches in the builder's
    /// buffers: where the record section and the partition key table end, and the partition
    /// keys' hashes, which a small table scans.
    #[cfg(feature = "producer")]
    pub(crate) fn prefetch(&self) {
        use crate::prefetch::{prefetch_slice, prefetch_spare};
        let sections = &self.sections;
        prefetch_spare(sections.more_records.last().unwrap_or(&sections.records));
        prefetch_spare(&sections.partition_key_table);
        let keys = &self.partition_keys;
        if keys.hashes.len() <= SCAN_MAX {
            prefetch_slice(&keys.hashes);
        }
        prefetch_spare(&keys.entries);
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Encoded protobuf length (without magic and checksum).
    fn body_len(&self) -> usize {
        self.sections.len()
    }

    /// Encoded size of the aggregate as it stands, magic and checksum included.
    pub fn encoded_len(&self) -> usize {
        FRAME_LEN + self.body_len()
    }

    /// The encoded size of an aggregate holding only `record`.
    pub fn solo_len(record: &UserRecord) -> usize {
        let ehk = record.explicit_hash_key();
        FRAME_LEN
            + delimited_len(record.partition_key().len())
            + ehk.map_or(0, |k| delimited_len(k.len()))
            + delimited_len(record_body_len(0, ehk.map(|_| 0), record.data().len()))
    }

    /// Adds `record` if the aggregate stays within its limits; otherwise hands it back untouched.
    pub fn try_push(&mut self, record: UserRecord) -> Result<(), UserRecord> {
        self.push(record, None)
    }

    /// [`try_push`](Self::try_push) for a record whose hash key (what
    /// [`UserRecord::validate`] returned) is known: the key tables look it up by that instead
    /// of hashing its key again. It is the MD5 of the partition key, or the explicit hash
    /// key's value, which stands for exactly one string (the text has no leading zeros).
    #[cfg(feature = "producer")]
    pub(crate) fn try_push_routed(
        &mut self,
        record: UserRecord,
        hash_key: u128,
    ) -> Result<(), UserRecord> {
        self.push(record, Some(hash_key))
    }

    fn push(&mut self, record: UserRecord, hash_key: Option<u128>) -> Result<(), UserRecord> {
        if self.count >= self.limits.max_count {
            return Err(record);
        }
        let key = record.partition_key();
        // The hash key is the explicit hash key's value when there is one, else the partition
        // key's MD5: it stands for exactly one of the two keys, and the other is hashed here.
        let routed_by_ehk = record.explicit_hash_key().is_some();
        let known = |ehk: bool| hash_key.filter(|_| ehk == routed_by_ehk);
        let (pk_index, pk_new, pk_hash) =
            self.partition_keys
                .find(key, known(false), &self.sections.partition_key_table);
        let ehk = record.explicit_hash_key().map(|k| {
            (
                k,
                self.explicit_hash_keys.find(
                    k,
                    known(true),
                    &self.sections.explicit_hash_key_table,
                ),
            )
        });
        let ehk_index = ehk.map(|(_, (index, _, _))| index);
        let body_len = record_body_len(pk_index, ehk_index, record.data().len());
        let mut added = delimited_len(body_len);
        if pk_new {
            added += delimited_len(key.len());
        }
        if let Some((k, (_, true, _))) = ehk {
            added += delimited_len(k.len());
        }
        if FRAME_LEN + self.body_len() + added > self.limits.max_size {
            return Err(record);
        }
        if self.count == 0 {
            // Room like the previous aggregate's, up to a few KiB: what a slot reserves is not
            // in the backlog's count, and 10,000 shards each holding one record must not each
            // hold 50 KB.
            // Half as much again as last time: an aggregate that closes on its deadline holds a
            // varying number of records, and regrowing costs more than the spare room.
            // Buffers kept from the last aggregate are used as they are when they hold as much
            // as it did.
            let reserve = |buf: &mut Vec<u8>, last: usize, least: usize| {
                let last = last.min(RESERVE_MAX).max(least);
                if buf.capacity() < last {
                    buf.reserve_exact((last + last / 2).min(RESERVE_MAX).max(least));
                }
            };
            let (pk, ehk, records) = self.last_sizes;
            let sections = &mut self.sections;
            reserve(&mut sections.partition_key_table, pk, 0);
            reserve(&mut sections.explicit_hash_key_table, ehk, 0);
            reserve(&mut sections.records, records, added);
        }
        if pk_new {
            self.partition_keys.append(
                &mut self.sections.partition_key_table,
                KEY_PARTITION_KEY_TABLE,
                key,
                pk_hash,
            );
        }
        if let Some((k, (_, true, hash))) = ehk {
            self.explicit_hash_keys.append(
                &mut self.sections.explicit_hash_key_table,
                KEY_EXPLICIT_HASH_KEY_TABLE,
                k,
                hash,
            );
        }
        // Everything before the data, built on the stack and written with one copy (the
        // record's room is already reserved).
        let mut header = Header::default();
        header.field(KEY_RECORDS, body_len as u64);
        // proto2 `required`: the index is written even when it is 0. prost's proto3-style
        // encoding would skip a zero, and the KCL's parser then rejects the record.
        header.field(KEY_RECORD_PARTITION_KEY_INDEX, u64::from(pk_index));
        if let Some(index) = ehk_index {
            header.field(KEY_RECORD_EXPLICIT_HASH_KEY_INDEX, u64::from(index));
        }
        header.field(KEY_RECORD_DATA, record.data().len() as u64);
        let out = self.sections.record_room(delimited_len(body_len));
        out.extend_from_slice(header.bytes());
        out.extend_from_slice(record.data());
        if self.count == 0 {
            self.first = Some(record);
        }
        self.count += 1;
        Ok(())
    }

    /// Encodes what was pushed and starts over. One record goes out as itself, not aggregated:
    /// that is smaller and every consumer reads it (as the KPL does), unless its data starts
    /// with the aggregate's magic bytes, which would make readers take it for an aggregate: it
    /// then goes out as an aggregate of one. Returns `None` when empty.
    ///
    /// The builder does not validate keys: push records that passed
    /// [`UserRecord::validate`](crate::UserRecord::validate) (the producer validates every
    /// record at `put`), and only records of one shard, as a KCL consumer drops an aggregate
    /// whose records its shard does not all own.
    pub fn finish(&mut self) -> Option<KinesisEntry> {
        // Joined into one buffer right after: a small aggregate is not copied on its own first.
        self.take_entry(false, false).map(Entry::into_kinesis_entry)
    }

    /// [`finish`](Self::finish), keeping an aggregate in its pieces. With `keep_room`, the
    /// buffers of an aggregate sent as one copy stay with the builder, emptied, and the next
    /// aggregate writes into them instead of allocating ([`idle_room`](Self::idle_room) says
    /// how much that is).
    ///
    /// An aggregate's checksum is not computed here but when its request body is written,
    /// with the other aggregates' ([`checksum_all`]), or by [`AggregatePieces::to_bytes`].
    #[cfg_attr(not(feature = "producer"), allow(dead_code))]
    pub(crate) fn finish_entry(&mut self, keep_room: bool) -> Option<Entry> {
        self.take_entry(keep_room, true)
    }

    /// [`finish_entry`](Self::finish_entry), copying a small aggregate into one exact buffer
    /// only if `join_small`.
    fn take_entry(&mut self, keep_room: bool, join_small: bool) -> Option<Entry> {
        // `first` is set exactly when a record was pushed.
        debug_assert_eq!(self.first.is_some(), self.count > 0);
        let first = self.first.take()?;
        // A lone record goes out plain, unless its data starts with the aggregate's magic:
        // readers would take it for an aggregate (and one that forwards a KPL aggregate would
        // have it split), so it goes out as an aggregate of one, which every reader gives back
        // as it was put.
        if self.count == 1 && !first.data().starts_with(&MAGIC) {
            let sections = self.clear();
            if keep_room {
                self.sections = sections.emptied();
            }
            return Some(Entry::plain(&first));
        }
        // The first record's key routes the aggregate to the first record's hash key, which
        // lies in the shard every record of this aggregate belongs to.
        let (_, partition_key, explicit_hash_key) = first.into_parts();
        let sections = self.clear();
        let sections = if join_small && sections.goes_out_whole() {
            let joined = sections.joined();
            if keep_room {
                self.sections = sections.emptied();
            }
            joined
        } else {
            sections
        };
        Some(Entry {
            data: EntryData::Pieces(match self.spare_box.take() {
                Some(mut pieces) => {
                    pieces.sections = sections;
                    pieces
                }
                None => Box::new(AggregatePieces {
                    sections,
                    digest: OnceLock::new(),
                }),
            }),
            partition_key,
            explicit_hash_key,
            aggregated: true,
        })
    }

    /// Removes and returns the records (used to re-route them): decoded from the encoding,
    /// byte for byte what was pushed.
    pub fn take_records(&mut self) -> Vec<UserRecord> {
        match self.count {
            0 => Vec::new(),
            1 => {
                let first = self.first.take();
                self.clear();
                first.into_iter().collect()
            }
            _ => {
                let data = self.encode();
                self.clear();
                records_of_aggregate(&data)
            }
        }
    }

    /// Starts over, remembering the sizes of what it held; returns what it held.
    fn clear(&mut self) -> Sections {
        let sections = std::mem::take(&mut self.sections);
        self.last_sizes = (
            sections.partition_key_table.len(),
            sections.explicit_hash_key_table.len(),
            sections.records_len,
        );
        self.last_count = self.count;
        self.count = 0;
        self.first = None;
        self.partition_keys.clear();
        self.explicit_hash_keys.clear();
        sections
    }

    fn encode(&self) -> Bytes {
        let out = self.sections.to_bytes(&self.sections.digest());
        debug_assert_eq!(out.len(), self.encoded_len());
        out
    }
}

/// The user records of an aggregate this module encoded, in order. Their data are slices of
/// `data`, not copies: when a whole aggregate fails (or is re-routed), its records hold the
/// aggregate's memory between them instead of a second copy of it. Nothing is validated: the
/// records were checked when they were pushed, or, through the public builder, not at all, and
/// either way they come back as they went in.
pub(crate) fn records_of_aggregate(data: &Bytes) -> Vec<UserRecord> {
    let end = data.len().saturating_sub(DIGEST_LEN);
    records_of_protobuf([data.slice(MAGIC.len().min(end)..end)])
}

/// The user records of an aggregate's protobuf, given in parts that each hold whole fields (as
/// the sections of [`AggregatePieces`] do): protobuf merges repeated fields from one part to
/// the next. Decoding from `Bytes` makes each record's data a slice of its part.
fn records_of_protobuf(parts: impl IntoIterator<Item = Bytes>) -> Vec<UserRecord> {
    use prost::Message;

    let mut aggregate = crate::deaggregation::proto::AggregatedRecord::default();
    for part in parts {
        if let Err(error) = aggregate.merge(part) {
            // Unreachable: the encoder writes valid protobuf (tests and fuzzing check it).
            unreachable!("an aggregate this producer encoded does not decode: {error}");
        }
    }
    let table =
        |table: &[String], index: Option<u64>| index.and_then(|i| table.get(i as usize)).cloned();
    aggregate
        .records
        .iter()
        .map(|r| {
            let data = r.data.clone().unwrap_or_default();
            let key =
                table(&aggregate.partition_key_table, r.partition_key_index).unwrap_or_default();
            let ehk = table(
                &aggregate.explicit_hash_key_table,
                r.explicit_hash_key_index,
            );
            UserRecord::from_parts(data, key, ehk)
        })
        .collect()
}

fn record_body_len(pk_index: u32, ehk_index: Option<u32>, data_len: usize) -> usize {
    varint_field_len(pk_index) + ehk_index.map_or(0, varint_field_len) + delimited_len(data_len)
}

/// Makes room in a key table for `more` bytes: doubling while the table is small, then growing
/// by half, as an aggregate counts in the backlog only by what it holds, and a table of tens of
/// kilobytes must not carry as much spare room. (The record section grows by chunks instead.)
fn grow(buf: &mut Vec<u8>, more: usize) {
    if buf.capacity() - buf.len() < more {
        let len = buf.len();
        let step = if len < RESERVE_MAX { len } else { len / 2 };
        buf.reserve_exact(more.max(step));
    }
}

/// Writes a length-delimited field; returns where its bytes start.
fn put_delimited(out: &mut Vec<u8>, key: u8, bytes: &[u8]) -> usize {
    out.put_u8(key);
    encode_varint(bytes.len() as u64, out);
    let at = out.len();
    out.extend_from_slice(bytes);
    at
}

/// A de-duplicating key table. It stores, per distinct key, where the key's bytes sit in the
/// encoded table, so keys are never copied twice; lookups go through a seeded 64-bit hash of
/// the key and are confirmed against those bytes. Small tables (most aggregates of a stream
/// with many shards) are scanned; larger ones get a hash index.
#[derive(Debug, Default)]
struct KeyTable {
    hasher: foldhash::fast::RandomState,
    /// The hash of each entry's key, in table order.
    hashes: Vec<u64>,
    /// Where each entry's key bytes start in the encoded table, and their length.
    entries: Vec<(u32, u32)>,
    /// Hash → first table index with it, once the table is past `SCAN_MAX` entries.
    by_hash: HashIndex,
}

/// Size of the record chunks after the first, once the section has grown past it: one size, so
/// that a freed chunk fits the next.
const CHUNK_LEN: usize = 8 << 10;
/// Aggregates up to this size are sent from one buffer (see `finish_entry`).
const PIECES_MIN: usize = 8 << 10;

/// Most bytes a section reserves when an aggregate starts (it grows past this as needed).
const RESERVE_MAX: usize = 4 << 10;

/// Up to this many entries, a lookup scans the hashes instead of using the index.
const SCAN_MAX: usize = 16;

impl KeyTable {
    /// The table index `key` has or would get, whether it is new, and its hash (for `insert`).
    /// `table` is the encoded table the entries point into. `known`: a 128-bit hash of the key
    /// the caller has at hand (its MD5, or an explicit hash key's value), folded and seeded
    /// here instead of hashing the key's bytes.
    fn find(&self, key: &str, known: Option<u128>, table: &[u8]) -> (u32, bool, u64) {
        let hash = match known {
            Some(known) => self
                .hasher
                .hash_one((known as u64) ^ ((known >> 64) as u64)),
            None => self.hasher.hash_one(key),
        };
        let is_key = |index: usize| {
            let (at, len) = self.entries[index];
            &table[at as usize..(at + len) as usize] == key.as_bytes()
        };
        let found = if self.hashes.len() <= SCAN_MAX {
            (0..self.hashes.len()).find(|&i| self.hashes[i] == hash && is_key(i))
        } else {
            // A 64-bit hash collision with another key: that key simply gets its own entry.
            self.by_hash
                .first(hash, &self.hashes)
                .filter(|&i| is_key(i))
        };
        match found {
            Some(index) => (index as u32, false, hash),
            None => (self.entries.len() as u32, true, hash),
        }
    }

    /// Writes `key` (new to the table) into the encoded `table` as field `field`, and indexes it.
    fn append(&mut self, table: &mut Vec<u8>, field: u8, key: &str, hash: u64) {
        grow(table, delimited_len(key.len()));
        let at = put_delimited(table, field, key.as_bytes());
        self.insert(hash, at, key.len());
    }

    /// A new entry whose key bytes start at `at` in the encoded table.
    fn insert(&mut self, hash: u64, at: usize, len: usize) {
        // Aggregates are at most a few MiB (the record size limit): offsets fit in 32 bits.
        self.entries.push((at as u32, len as u32));
        self.hashes.push(hash);
        if self.hashes.len() > SCAN_MAX {
            self.by_hash.insert(&self.hashes);
        }
    }

    /// Empties the table, keeping its room for the next aggregate (a few bytes per key).
    fn clear(&mut self) {
        self.by_hash.clear();
        self.hashes.clear();
        self.entries.clear();
    }
}

/// A key table's index: for each hash, the first entry with it. Open addressing with linear
/// probing over a power-of-two array at most half full; a slot holds an entry's index + 1 (0:
/// empty), and the entry's hash is read from the table's `hashes`. A general hash map costs
/// three times as much per new key, and a table of random keys adds one for each record.
#[derive(Debug, Default)]
struct HashIndex {
    slots: Vec<u32>,
    /// Entries indexed so far (an entry whose hash an earlier one has takes no slot, but
    /// counts here).
    len: usize,
}

impl HashIndex {
    /// The first entry whose hash is `hash`, if any.
    fn first(&self, hash: u64, hashes: &[u64]) -> Option<usize> {
        match self.probe(hash, hashes) {
            Probe::Found(entry) => Some(entry),
            Probe::Empty(_) => None,
        }
    }

    /// Indexes the entries of `hashes` not indexed yet (the last one; after `clear` or a
    /// resize, all of them), each unless an earlier entry has its hash. The index stays at
    /// most half full.
    fn insert(&mut self, hashes: &[u64]) {
        if hashes.len() * 2 > self.slots.len() {
            let size = (hashes.len() * 2).next_power_of_two().max(64);
            self.slots.clear();
            self.slots.resize(size, 0);
            self.len = 0;
        }
        while self.len < hashes.len() {
            let index = self.len;
            if let Probe::Empty(slot) = self.probe(hashes[index], hashes) {
                // Entries are at most a few million (an aggregate is at most a few MiB).
                self.slots[slot] = index as u32 + 1;
            }
            self.len += 1;
        }
    }

    fn probe(&self, hash: u64, hashes: &[u64]) -> Probe {
        if self.slots.is_empty() {
            return Probe::Empty(0);
        }
        let mask = self.slots.len() - 1;
        // The high bits: the seeded hash mixes them best.
        let mut slot = (hash >> 32) as usize & mask;
        loop {
            match self.slots[slot] {
                0 => return Probe::Empty(slot),
                taken => {
                    let entry = taken as usize - 1;
                    if hashes[entry] == hash {
                        return Probe::Found(entry);
                    }
                }
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Forgets every entry, keeping the room.
    fn clear(&mut self) {
        if self.len > 0 {
            self.slots.fill(0);
            self.len = 0;
        }
    }
}

enum Probe {
    Found(usize),
    Empty(usize),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::deaggregation::proto;
    use prost::Message;

    pub(crate) const GOLDEN: &str = "f3899ac20a03706b310a03706b3212273137303134313138333436303436393233313733313638373330333731353838343130353732381a0908001a0568656c6c6f1a0b080110001a05776f726c641a0508001a01217f093cf43a88b936f0e60ffbd5ed26a3";

    pub(crate) fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn golden_records() -> Vec<UserRecord> {
        vec![
            UserRecord::new("hello", "pk1"),
            UserRecord::new("world", "pk2").with_explicit_hash_key((1u128 << 127).to_string()),
            UserRecord::new("!", "pk1"),
        ]
    }

    pub(crate) fn build(records: Vec<UserRecord>, limits: AggregateLimits) -> AggregateBuilder {
        let mut builder = AggregateBuilder::new(limits);
        for r in records {
            builder.try_push(r).expect("fits");
        }
        builder
    }

    #[test]
    fn a_lone_record_that_looks_like_an_aggregate_goes_out_as_an_aggregate_of_one() {
        // The golden aggregate's bytes, forwarded as one record's data.
        let golden: Vec<u8> = (0..GOLDEN.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&GOLDEN[i..i + 2], 16).unwrap())
            .collect();
        for data in [golden, [&MAGIC[..], b"and more than twenty bytes"].concat()] {
            let record = UserRecord::new(data.clone(), "forwarded");
            let entry = build(vec![record], AggregateLimits::default())
                .finish()
                .unwrap();
            assert_ne!(entry.data, data, "wrapped");
            let read = crate::deaggregate(entry.data, &entry.partition_key).unwrap();
            assert_eq!(read.len(), 1);
            assert_eq!(read[0].data, data);
            assert!(read[0].aggregated);
        }
        let plain = build(
            vec![UserRecord::new("plain", "k")],
            AggregateLimits::default(),
        )
        .finish()
        .unwrap();
        assert_eq!(
            &plain.data[..],
            b"plain",
            "other lone records go out as they are"
        );
    }

    #[test]
    fn encodes_the_golden_vector_byte_for_byte() {
        let mut builder = build(golden_records(), AggregateLimits::default());
        assert_eq!(builder.encoded_len(), 102);
        let entry = builder.finish().expect("not empty");
        assert_eq!(hex(&entry.data), GOLDEN);
        assert!(entry.aggregated);
        assert_eq!(entry.partition_key, "pk1");
        assert_eq!(entry.explicit_hash_key, None);
        assert_eq!(records_of_aggregate(&entry.data), golden_records());
        assert!(builder.is_empty());
    }

    #[test]
    fn encoder_matches_prost_and_required_zero_index_is_written() {
        let mut builder = build(golden_records(), AggregateLimits::default());
        let entry = builder.finish().unwrap();
        let body = &entry.data[4..entry.data.len() - 16];
        let decoded = proto::AggregatedRecord::decode(body).unwrap();
        assert_eq!(decoded.encode_to_vec(), body);
        // The index 0 is on the wire, so a decoder sees it present.
        assert_eq!(decoded.records[0].partition_key_index, Some(0));
        assert_eq!(&decoded.records[0].encode_to_vec()[..2], &[0x08, 0x00]);
    }

    /// Each aggregate's key tables as decoded: (partition keys, explicit hash keys).
    #[cfg(feature = "producer")]
    fn key_tables(entry: &KinesisEntry) -> (Vec<String>, Vec<String>) {
        let body = &entry.data[MAGIC.len()..entry.data.len() - DIGEST_LEN];
        let decoded = proto::AggregatedRecord::decode(body).unwrap();
        (decoded.partition_key_table, decoded.explicit_hash_key_table)
    }

    #[cfg(feature = "producer")]
    #[test]
    fn key_tables_hold_each_distinct_key_once_by_either_hash_across_reused_room() {
        // 300 keys, each in many aggregates, past the size from which tables are indexed,
        // pushed with their hash keys (as the producer does) and without (hashed here), by
        // builders that keep their room from one aggregate to the next.
        let limits = AggregateLimits {
            max_size: 20_000,
            max_count: usize::MAX,
        };
        for routed in [true, false] {
            let mut builder = AggregateBuilder::new(limits);
            let mut pushed = Vec::new();
            let check = |builder: &mut AggregateBuilder, pushed: &mut Vec<UserRecord>| {
                let entry = builder.finish_entry(true).unwrap().into_kinesis_entry();
                let (pks, ehks) = key_tables(&entry);
                let distinct = |keys: &mut dyn Iterator<Item = &str>| {
                    keys.collect::<std::collections::BTreeSet<_>>().len()
                };
                assert_eq!(
                    pks.len(),
                    distinct(&mut pushed.iter().map(|r| r.partition_key()))
                );
                assert_eq!(pks.len(), distinct(&mut pks.iter().map(String::as_str)));
                assert_eq!(
                    ehks.len(),
                    distinct(&mut pushed.iter().filter_map(|r| r.explicit_hash_key()))
                );
                assert_eq!(records_of_aggregate(&entry.data), *pushed);
                pushed.clear();
            };
            for i in 0..6_000u64 {
                let n = (i * 7) % 300;
                let data = vec![b'x'; (i % 5) as usize];
                // Every fourth key has an explicit hash key of its own, so both repeat. (A key
                // put both with and without one may take two entries in one aggregate: routed,
                // it is found by its MD5 without, by its bytes with.)
                let record = if n % 4 == 0 {
                    UserRecord::new(data, format!("ehk-key-{n}"))
                        .with_explicit_hash_key((u128::from(n) << 100).to_string())
                } else {
                    UserRecord::new(data, format!("key-{n}"))
                };
                let hash_key = record.validate(1 << 20).unwrap();
                let push = |builder: &mut AggregateBuilder, record| {
                    if routed {
                        builder.try_push_routed(record, hash_key)
                    } else {
                        builder.try_push(record)
                    }
                };
                if let Err(back) = push(&mut builder, record.clone()) {
                    check(&mut builder, &mut pushed);
                    push(&mut builder, back).unwrap();
                }
                pushed.push(record);
            }
            check(&mut builder, &mut pushed);
        }
    }

    #[cfg(feature = "producer")]
    #[test]
    fn keys_that_share_a_hash_each_get_an_entry_and_read_back() {
        // A caller's hash that does not tell keys apart (it never happens with MD5 of
        // distinct keys in practice) costs room, never a wrong key: lookups compare bytes.
        let mut builder = AggregateBuilder::new(AggregateLimits::default());
        let records: Vec<_> = (0..100)
            .map(|i| UserRecord::new(vec![b'd'; 3], format!("k{}", i % 40)))
            .collect();
        for record in &records {
            builder.try_push_routed(record.clone(), 7).unwrap();
        }
        let entry = builder.finish().unwrap();
        let (pks, _) = key_tables(&entry);
        assert!(pks.len() >= 40, "{}", pks.len());
        assert_eq!(records_of_aggregate(&entry.data), records);
    }

    #[test]
    fn size_accounting_is_exact_across_varint_boundaries() {
        // Data lengths and key counts chosen to cross 1- and 2-byte varint boundaries.
        let mut builder = AggregateBuilder::new(AggregateLimits {
            max_size: 10 << 20,
            max_count: usize::MAX,
        });
        for i in 0..300u32 {
            let data = vec![b'x'; (i as usize * 7) % 200];
            let mut record = UserRecord::new(data, format!("key-{}", i % 150));
            if i % 3 == 0 {
                record = record.with_explicit_hash_key((u128::from(i) << 90).to_string());
            }
            builder.try_push(record).unwrap();
            let expected = builder.encoded_len();
            let probe = builder.encode();
            assert_eq!(probe.len(), expected, "after {} records", i + 1);
        }
    }

    #[test]
    fn never_exceeds_the_size_or_count_limit() {
        let limits = AggregateLimits {
            max_size: 1_000,
            max_count: 7,
        };
        let mut builder = AggregateBuilder::new(limits);
        let mut rejected = 0;
        for i in 0..50 {
            let record = UserRecord::new(vec![0u8; 37 + i], format!("k{i}"));
            if builder.try_push(record).is_err() {
                rejected += 1;
                assert!(builder.len() <= limits.max_count);
                let entry = builder.finish().unwrap();
                assert!(entry.data.len() <= limits.max_size);
            }
        }
        assert!(rejected > 0);
    }

    #[test]
    fn full_aggregates_one_after_another_read_back_exactly() {
        // Full aggregates one after another, each sized by the one before (see `try_push`),
        // with runs of few distinct keys and of many, with and without explicit hash keys:
        // each reads back, checksum included, as exactly the records pushed into it.
        let limits = AggregateLimits {
            max_size: 4_000,
            max_count: usize::MAX,
        };
        let mut builder = AggregateBuilder::new(limits);
        let mut pushed = Vec::new();
        let mut checked = 0;
        for i in 0..3_000usize {
            let distinct = if (i / 400) % 2 == 0 { 3 } else { 1_000 };
            let mut record = UserRecord::new(
                vec![(i % 251) as u8; 20 + i % 90],
                format!("k{}", i % distinct),
            );
            if i % 7 == 0 {
                record = record.with_explicit_hash_key((i as u128 * 977).to_string());
            }
            let expected_len = builder.encoded_len();
            if let Err(record) = builder.try_push(record.clone()) {
                let entry = builder.finish().expect("not empty");
                assert_eq!(entry.data.len(), expected_len);
                assert!(entry.data.len() <= limits.max_size);
                let read =
                    crate::deaggregation::deaggregate(entry.data.clone(), &entry.partition_key)
                        .expect("a valid aggregate, checksum included");
                let read: Vec<UserRecord> = read
                    .into_iter()
                    .map(|r| UserRecord::from_parts(r.data, r.partition_key, r.explicit_hash_key))
                    .collect();
                assert_eq!(read, std::mem::take(&mut pushed), "aggregate {checked}");
                checked += 1;
                pushed.push(record.clone());
                builder.try_push(record).expect("fits an empty aggregate");
            } else {
                pushed.push(record);
            }
        }
        assert!(checked > 20, "{checked} aggregates checked");
    }

    #[test]
    fn a_large_aggregate_in_pieces_is_the_same_bytes() {
        // Past `PIECES_MIN`, with records of every size around the chunk length: the pieces
        // join into exactly the bytes `finish` returns, and those read back.
        let records: Vec<UserRecord> = (0..200usize)
            .map(|i| {
                let record =
                    UserRecord::new(vec![i as u8; (i * 97) % (CHUNK_LEN + 300)], format!("k{i}"));
                match i % 5 {
                    0 => record.with_explicit_hash_key((i as u128 * 7919).to_string()),
                    _ => record,
                }
            })
            .collect();
        let limits = AggregateLimits {
            max_size: 1 << 20,
            max_count: usize::MAX,
        };
        let entry = build(records.clone(), limits).finish_entry(false).unwrap();
        let EntryData::Pieces(pieces) = &entry.data else {
            panic!("a large aggregate stays in pieces");
        };
        let whole = build(records.clone(), limits).finish().unwrap().data;
        // The body's pass: checksummed block by block the first time, from the kept checksum
        // the next.
        for pass in ["computing the checksum", "with the checksum known"] {
            let mut visited = Vec::new();
            pieces.visit(|block| visited.extend_from_slice(block));
            assert_eq!(visited, whole, "{pass}");
        }
        assert!(pieces.parts().count() > 4, "several chunks");
        let joined: Vec<u8> = pieces.parts().flatten().copied().collect();
        assert_eq!(joined, whole);
        assert_eq!(entry.data.len(), whole.len());
        assert_eq!(records_of_aggregate(&pieces.to_bytes()), records);
        // Read back from the pieces themselves, without joining them.
        let EntryData::Pieces(pieces) = entry.data else {
            unreachable!()
        };
        assert_eq!(pieces.into_records(), records);
    }

    #[test]
    #[cfg(feature = "producer")]
    fn a_builder_furnished_with_a_sent_aggregates_room_encodes_the_same_bytes() {
        // The builder writes each aggregate into the room of the one before: the pieces of a
        // large one that was sent (with its box), or the buffers a builder let go after a
        // small one went out as one copy; larger, smaller, and with records larger than a
        // chunk. It must encode what a fresh builder encodes.
        let limits = AggregateLimits {
            max_size: 1 << 20,
            max_count: usize::MAX,
        };
        let mut furnished = AggregateBuilder::new(limits);
        let mut room: Option<(Sections, Option<Box<AggregatePieces>>)> = None;
        let (mut from_pieces, mut from_builder) = (0, 0);
        for round in 0..40usize {
            let count = 1 + (round * 13) % 60;
            let size = [100, 1_000, 12_000, 3][round % 4];
            let records: Vec<UserRecord> = (0..count)
                .map(|i| UserRecord::new(vec![(round ^ i) as u8; size], format!("k{round}-{i}")))
                .collect();
            if let Some((sections, spare_box)) = room.take() {
                assert!(furnished.wants_room());
                furnished.furnish(sections, spare_box);
                assert!(!furnished.wants_room());
            }
            let mut fresh = AggregateBuilder::new(limits);
            for record in &records {
                furnished.try_push(record.clone()).unwrap();
                fresh.try_push(record.clone()).unwrap();
            }
            let sent = furnished.finish_entry(true).unwrap();
            let expected = fresh.finish().unwrap();
            if let Some(sections) = furnished.release_room() {
                // Sent as one copy: the builder kept its buffers, and lets them go.
                assert!(furnished.wants_room() && furnished.release_room().is_none());
                from_builder += 1;
                room = Some((sections, None));
            }
            let EntryData::Pieces(pieces) = &sent.data else {
                // A lone record of plain data goes out as it is.
                assert_eq!(count, 1, "round {round}");
                assert_eq!(sent.data.into_bytes(), expected.data);
                continue;
            };
            assert_eq!(pieces.to_bytes(), expected.data, "round {round}");
            assert_eq!(records_of_aggregate(&expected.data), records);
            let mut pieces = sent.into_room().expect("an aggregate");
            match pieces.take_room() {
                Some(sections) => {
                    from_pieces += 1;
                    room = Some((sections, Some(pieces)));
                }
                // A single copy has no room to hand on, only its builder's.
                None => assert!(room.is_some(), "round {round}"),
            }
        }
        assert!(
            from_pieces > 5 && from_builder > 5,
            "{from_pieces} {from_builder}"
        );
    }

    #[test]
    fn a_builder_that_keeps_its_room_encodes_the_same_bytes() {
        // Aggregates of 1 to 40 records, some past `PIECES_MIN`, some with explicit hash keys,
        // one after another through a builder that keeps its buffers and one that does not.
        let limits = AggregateLimits {
            max_size: 1 << 20,
            max_count: usize::MAX,
        };
        let mut keeping = AggregateBuilder::new(limits);
        let mut fresh = AggregateBuilder::new(limits);
        for round in 0..60usize {
            let count = 1 + (round * 7) % 40;
            let size = if round % 9 == 8 {
                900
            } else {
                (round * 31) % 200
            };
            let records: Vec<UserRecord> = (0..count)
                .map(|i| {
                    let record = UserRecord::new(vec![(round + i) as u8; size], format!("k{i}"));
                    if (round + i) % 4 == 0 {
                        record.with_explicit_hash_key((i as u128 * 104_729).to_string())
                    } else {
                        record
                    }
                })
                .collect();
            for record in &records {
                keeping.try_push(record.clone()).unwrap();
                fresh.try_push(record.clone()).unwrap();
            }
            let kept = keeping.finish_entry(true).unwrap();
            let expected = fresh.finish().unwrap();
            assert_eq!(kept.data.into_bytes(), expected.data, "round {round}");
            assert_eq!(kept.partition_key, expected.partition_key);
            assert!(keeping.is_empty());
            // Room is kept only for what went out as one copy, and never past an aggregate's
            // worth of it.
            assert!(
                keeping.idle_room() <= 2 * PIECES_MIN + RESERVE_MAX,
                "round {round}"
            );
            assert_eq!(fresh.idle_room(), 0);
        }
        assert!(keeping.idle_room() > 0);
        keeping.try_push(UserRecord::new("x", "k")).unwrap();
        assert_eq!(keeping.idle_room(), 0, "room in use is not idle");
    }

    #[test]
    fn solo_len_matches_a_one_record_aggregate() {
        let record = UserRecord::new(vec![1u8; 300], "abc").with_explicit_hash_key("12345");
        let builder = build(vec![record.clone()], AggregateLimits::default());
        assert_eq!(AggregateBuilder::solo_len(&record), builder.encoded_len());
    }

    #[test]
    fn take_records_gives_back_exactly_what_was_pushed() {
        let mut builder = build(golden_records(), AggregateLimits::default());
        assert_eq!(builder.take_records(), golden_records());
        assert!(builder.is_empty());
        assert_eq!(builder.take_records(), Vec::<UserRecord>::new());
        let one = UserRecord::new(vec![0u8, 255, 7], "solo").with_explicit_hash_key("42");
        let mut builder = build(vec![one.clone()], AggregateLimits::default());
        assert_eq!(builder.take_records(), vec![one]);
        // The builder is reusable afterwards, and encodes as a fresh one would.
        let mut reused = build(golden_records(), AggregateLimits::default());
        reused.take_records();
        for r in golden_records() {
            reused.try_push(r).unwrap();
        }
        assert_eq!(hex(&reused.finish().unwrap().data), GOLDEN);
        // The public builder does not validate: whatever went in comes back.
        let odd = vec![
            UserRecord::new("a", "k").with_explicit_hash_key("not a number"),
            UserRecord::new("", "k2"),
        ];
        let mut builder = build(odd.clone(), AggregateLimits::default());
        assert_eq!(builder.take_records(), odd);
    }

    #[test]
    fn one_record_goes_out_plain() {
        let record = UserRecord::new("only", "k").with_explicit_hash_key("7");
        let mut builder = build(vec![record], AggregateLimits::default());
        let entry = builder.finish().unwrap();
        assert!(!entry.aggregated);
        assert_eq!(&entry.data[..], b"only");
        assert_eq!(entry.explicit_hash_key.as_deref(), Some("7"));
    }
}
