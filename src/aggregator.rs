//! Step 4b: per-shard aggregators. `put` routes each record by its hash key to the aggregator of
//! the shard that owns it, on the caller's thread, under that shard's lock only; a full aggregate
//! is encoded there and handed to the sender as a finished Kinesis record ([`Outgoing`]).
//!
//! An aggregator that receives its first record tells the sender when it must go out
//! (`record_max_buffered_time` after that record's `put`); the sender's timer flushes it then.
//!
//! When the shard map is reloaded, the records still in aggregators are re-routed under the new
//! map, so that an aggregate only ever holds records of one open shard.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::aggregation::{
    records_of_aggregate, AggregateBuilder, AggregateLimits, AggregatePieces, Entry, EntryData,
    Sections, MAGIC,
};
use crate::clock::Stamp;
use crate::metrics::{ShardRef, Statistics};
use crate::prefetch::{prefetch, prefetch_slice, prefetch_spare};
use crate::producer::Shared;
use crate::receipt::ReceiptTx;
use crate::record::UserRecord;
use crate::retry::AttemptError;
use crate::shard_map::{ShardMap, ShardRange};
use crate::sync::lock;

/// What the producer knows about a user record besides the record itself. Not its hash key:
/// only the put path and a reshard's rare paths need that, and the latter compute it again
/// from the record.
#[derive(Debug)]
pub(crate) struct RecordMeta {
    pub put_at: Stamp,
    pub epoch: u64,
    pub backlog_bytes: u32,
    /// Bytes of the record's data (the record itself lives on only in its encoding).
    pub data_len: u32,
    /// What the Kinesis records that carried it went through before it was re-split into
    /// another (after a reshard); `None` for a record never re-split after an attempt (behind
    /// a pointer: the metadata stays 48 bytes).
    pub earlier: Option<Box<Earlier>>,
    /// Where the outcome goes when the record was put with a receipt.
    pub receipt: Option<ReceiptTx>,
}

// Written by `put` for every record and read by the sender three times.
const _: () = assert!(size_of::<RecordMeta>() == 48);

/// A re-split record's history: its failure report needs it when the Kinesis record it is in
/// now expires before an attempt of its own.
#[derive(Debug, Default)]
pub(crate) struct Earlier {
    /// PutRecords attempts of the Kinesis records that carried it before.
    pub attempts: u32,
    /// The last error those attempts met (none when the last one was written, across a
    /// reshard, to a shard that did not own all its records).
    pub last_error: Option<AttemptError>,
}

impl RecordMeta {
    /// PutRecords attempts that carried this record, when `current` carried its Kinesis record.
    pub fn attempts(&self, current: u32) -> u32 {
        let earlier = self.earlier.as_ref().map_or(0, |earlier| earlier.attempts);
        earlier.saturating_add(current)
    }

    /// The record leaves a Kinesis record that made `attempts` attempts, the last of which
    /// met `last_error`, for another: its history keeps both.
    pub fn carry_over(&mut self, attempts: u32, last_error: Option<&AttemptError>) {
        if attempts == 0 {
            return;
        }
        let total = self.attempts(attempts);
        let earlier = self.earlier.get_or_insert_with(Box::default);
        earlier.attempts = total;
        earlier.last_error = last_error.cloned();
    }

    /// The last error of the Kinesis records that carried it before a re-split.
    pub fn earlier_error(&self) -> Option<&AttemptError> {
        self.earlier.as_ref()?.last_error.as_ref()
    }
}

/// One finished Kinesis record on its way through the sender, with what the producer knows of
/// each user record it carries. The records themselves are in the entry's bytes:
/// [`take_user_records`](Self::take_user_records) reads them back when a failure report or a
/// re-route needs them.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub entry: Entry,
    /// One per user record, in the order they sit in the entry.
    pub metas: Vec<RecordMeta>,
    pub backlog_bytes: usize,
    /// `put` time of the oldest record: its buffering deadline and TTL count from here.
    pub oldest_put: Instant,
    /// What the metrics and the answer's handling need of `metas`, read when it was made.
    pub summary: MetaSummary,
    /// The shard the records were routed to (`None` when no open shard covered them).
    pub shard_id: Option<Arc<str>>,
    /// That shard's ordinal ([`NO_SHARD`] exactly when `shard_id` is `None`).
    pub ordinal: ShardOrdinal,
    /// The generation of the routing that chose `shard_id`: while it is still the current
    /// one, the shard is open without looking it up.
    pub generation: u64,
    pub attempts: u32,
    pub last_error: Option<AttemptError>,
    /// When the last attempt ended (its answer, or its failure): later buffering counts from
    /// here.
    pub last_attempt_end: Option<Instant>,
    /// Set when Kinesis acknowledged it: where it was written.
    pub landed: Option<Landed>,
}

/// What [`Outgoing::new`] reads off the records' metadata in one pass, on the thread that
/// closed the aggregate, where the metadata is still in the core's cache: the sender's thread
/// then reads it again only for records with a receipt or a history (`singular`), instead of
/// every record's, from the other core, when the request goes out and again when Kinesis
/// answers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetaSummary {
    /// The sum of the records' put stamps, in nanoseconds, the oldest and the newest.
    pub put_nanos: u128,
    pub oldest_put: Stamp,
    pub newest_put: Stamp,
    /// The sum of the records' data lengths, the least and the most.
    pub data_bytes: u64,
    pub data_min: u32,
    pub data_max: u32,
    /// The records' flush epoch, when they all have the same.
    pub one_epoch: Option<u64>,
    /// Whether some record has a receipt or a history of earlier Kinesis records.
    pub singular: bool,
}

impl MetaSummary {
    /// The summary of `metas`, and their backlog bytes.
    fn of(metas: &[RecordMeta]) -> (MetaSummary, usize) {
        let mut summary = MetaSummary {
            put_nanos: 0,
            oldest_put: metas.first().map_or_else(Stamp::default, |m| m.put_at),
            newest_put: Stamp::default(),
            data_bytes: 0,
            data_min: u32::MAX,
            data_max: 0,
            one_epoch: metas.first().map(|m| m.epoch),
            singular: false,
        };
        let mut backlog_bytes = 0;
        for meta in metas {
            backlog_bytes += meta.backlog_bytes as usize;
            summary.put_nanos += u128::from(meta.put_at.nanos());
            summary.oldest_put = summary.oldest_put.min(meta.put_at);
            summary.newest_put = summary.newest_put.max(meta.put_at);
            summary.data_bytes += u64::from(meta.data_len);
            summary.data_min = summary.data_min.min(meta.data_len);
            summary.data_max = summary.data_max.max(meta.data_len);
            if summary.one_epoch != Some(meta.epoch) {
                summary.one_epoch = None;
            }
            summary.singular |= meta.receipt.is_some() || meta.earlier.is_some();
        }
        (summary, backlog_bytes)
    }

    /// `BufferingTime` of `count` records sent at `now`, in milliseconds: how long each waited
    /// since its put.
    pub fn buffering(&self, count: usize, now: Stamp) -> Statistics {
        if count == 0 {
            return Statistics::default();
        }
        let waited = (count as u128 * u128::from(now.nanos())).saturating_sub(self.put_nanos);
        Statistics {
            count: count as u64,
            sum: waited as f64 * 1e-6,
            min: now.nanos_since(self.newest_put) as f64 * 1e-6,
            max: now.nanos_since(self.oldest_put) as f64 * 1e-6,
        }
    }

    /// The data sizes of `count` records, in bytes.
    pub fn data_sizes(&self, count: usize) -> Statistics {
        if count == 0 {
            return Statistics::default();
        }
        Statistics {
            count: count as u64,
            sum: self.data_bytes as f64,
            min: f64::from(self.data_min),
            max: f64::from(self.data_max),
        }
    }
}

/// Where Kinesis wrote a Kinesis record.
#[derive(Debug)]
pub(crate) struct Landed {
    pub shard_id: Arc<str>,
    pub ordinal: ShardOrdinal,
    pub sequence_number: Arc<str>,
}

impl Landed {
    pub fn shard(&self) -> ShardRef<'_> {
        ShardRef {
            id: &self.shard_id,
            ordinal: self.ordinal,
        }
    }
}

/// A number of a shard's own for the producer's life, given when a shard map or an answer
/// first names the shard. The sender's lanes and the metrics' per-shard rows are vectors
/// indexed by it rather than maps keyed by the shard's name: at 10,000 shards, hashing a name
/// and probing a table read cold memory for every Kinesis record sent and answered.
pub(crate) type ShardOrdinal = u32;

/// The ordinal of "no shard": records no open shard covered (they go out unaggregated).
pub(crate) const NO_SHARD: ShardOrdinal = 0;

/// Gives out shard ordinals, one per shard name, from 1. A stream that is resharded often adds
/// names over time; each costs its entry here and a pointer's room in the vectors indexed by
/// ordinal. A shard is named by the first map that lists it (or an answer that it took a
/// record), and a map lists a shard only while it is open, before its children exist: so a
/// parent's ordinal is smaller than its children's, which order mode uses as their age.
#[derive(Default)]
pub(crate) struct ShardOrdinals {
    by_name: HashMap<Arc<str>, ShardOrdinal, foldhash::fast::RandomState>,
    /// The hash key range of each shard a map named, by ordinal (from 1): order mode holds a
    /// shard's lane while a closed shard whose range overlaps it still has records to settle,
    /// and a closed shard's range is in no current map.
    ranges: Vec<Option<(u128, u128)>>,
}

impl ShardOrdinals {
    pub fn of(&mut self, shard_id: &Arc<str>) -> ShardOrdinal {
        if let Some(&ordinal) = self.by_name.get(shard_id) {
            return ordinal;
        }
        // Four billion shard names would take hundreds of gigabytes first.
        let ordinal = ShardOrdinal::try_from(self.by_name.len() + 1).unwrap_or(ShardOrdinal::MAX);
        self.by_name.insert(Arc::clone(shard_id), ordinal);
        ordinal
    }

    /// [`of`](Self::of) for a shard of a map, whose range is remembered.
    fn of_shard(&mut self, shard: &ShardRange) -> ShardOrdinal {
        let ordinal = self.of(&shard.shard_id);
        let at = ordinal as usize;
        if self.ranges.len() <= at {
            self.ranges.resize(at + 1, None);
        }
        self.ranges[at] = Some((shard.start, shard.end));
        ordinal
    }

    /// The hash key range of the shard at `ordinal`, if a map named it.
    pub fn range(&self, ordinal: ShardOrdinal) -> Option<(u128, u128)> {
        self.ranges.get(ordinal as usize).copied().flatten()
    }
}

impl Outgoing {
    fn new(entry: Entry, metas: Vec<RecordMeta>, shard: RoutedTo, generation: u64) -> Self {
        let (shard_id, ordinal) = shard;
        let (summary, backlog_bytes) = MetaSummary::of(&metas);
        let oldest_put = if metas.is_empty() {
            Instant::now()
        } else {
            summary.oldest_put.instant()
        };
        Outgoing {
            entry,
            metas,
            backlog_bytes,
            oldest_put,
            summary,
            shard_id,
            ordinal,
            generation,
            attempts: 0,
            last_error: None,
            last_attempt_end: None,
            landed: None,
        }
    }

    /// The shard it was routed to, for the metrics.
    pub fn shard(&self) -> Option<ShardRef<'_>> {
        self.shard_id.as_ref().map(|id| ShardRef {
            id,
            ordinal: self.ordinal,
        })
    }

    /// User records carried.
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    /// The user records carried, read back from the entry (which is left empty): byte for
    /// byte what was put.
    pub fn take_user_records(&mut self) -> Vec<UserRecord> {
        let entry = &mut self.entry;
        let data = std::mem::replace(&mut entry.data, EntryData::Whole(Bytes::new()));
        match data {
            EntryData::Pieces(pieces) => pieces.into_records(),
            EntryData::Whole(data) if entry.aggregated => records_of_aggregate(&data),
            EntryData::Whole(data) => vec![UserRecord::from_parts(
                data,
                std::mem::take(&mut entry.partition_key),
                entry.explicit_hash_key.take(),
            )],
        }
    }

    /// The hash keys of the user records it carries, read back from its encoding (for the
    /// rare check of an aggregate written to an unexpected shard).
    pub fn hash_keys(&self) -> Vec<u128> {
        let entry = &self.entry;
        let records = match &entry.data {
            EntryData::Pieces(pieces) => records_of_aggregate(&pieces.to_bytes()),
            EntryData::Whole(data) if entry.aggregated => records_of_aggregate(data),
            EntryData::Whole(data) => vec![UserRecord::from_parts(
                data.clone(),
                entry.partition_key.clone(),
                entry.explicit_hash_key.clone(),
            )],
        };
        records.iter().map(UserRecord::hash_key).collect()
    }

    /// Bytes this record counts against the PutRecords request limit.
    pub fn request_size(&self) -> usize {
        self.entry.data.len() + self.entry.partition_key.len()
    }

    /// Calls `f(epoch, count)` for each run of records sharing a flush epoch (usually one).
    pub fn for_each_epoch_run(&self, mut f: impl FnMut(u64, u64)) {
        let mut run: Option<(u64, u64)> = None;
        for meta in &self.metas {
            match &mut run {
                Some((epoch, count)) if *epoch == meta.epoch => *count += 1,
                _ => {
                    if let Some((epoch, count)) = run {
                        f(epoch, count);
                    }
                    run = Some((meta.epoch, 1));
                }
            }
        }
        if let Some((epoch, count)) = run {
            f(epoch, count);
        }
    }
}

/// Emptied lists of [`RecordMeta`], handed back when Kinesis acknowledges a record and taken by
/// a slot starting an aggregate, so that the list is not allocated on the putting thread and
/// freed on the sender's once per Kinesis record. Only short lists are kept (the ones of small
/// aggregates, where the allocation weighs most), at most `META_POOL_MAX` of them.
#[derive(Default)]
pub(crate) struct MetaPool {
    free: Mutex<Vec<Vec<RecordMeta>>>,
}

/// Lists kept, and the most records a kept list may hold: 4 MiB at most between them.
const META_POOL_MAX: usize = 1024;
const META_POOL_LIST_MAX: usize = 64;

impl MetaPool {
    /// An empty list, with room when one was kept.
    fn take(&self) -> Vec<RecordMeta> {
        lock(&self.free).pop().unwrap_or_default()
    }

    /// Keeps the room of each of `lists` that is small for a later aggregate, while the pool is
    /// not full (one lock for all of them).
    pub fn give_all(&self, mut lists: Vec<Vec<RecordMeta>>) {
        lists.retain(|metas| metas.capacity() > 0 && metas.capacity() <= META_POOL_LIST_MAX);
        if lists.is_empty() {
            return;
        }
        for metas in &mut lists {
            metas.clear();
        }
        let mut free = lock(&self.free);
        let room = META_POOL_MAX.saturating_sub(free.len());
        free.extend(lists.into_iter().take(room));
    }
}

/// The buffers of an acknowledged aggregate: its sections, and its record list when that is too
/// long for the [`MetaPool`].
pub(crate) struct Room {
    sections: Sections,
    spare_box: Option<Box<AggregatePieces>>,
    metas: Vec<RecordMeta>,
}

impl Room {
    /// The room of `entry`, if it was an aggregate sent in its pieces; `metas` comes back
    /// when it is short. (A small aggregate's single copy was made by the thread that closed
    /// it, most often the one that frees it now, and fits no builder: it is not kept.)
    pub fn of(entry: Entry, metas: Vec<RecordMeta>) -> (Option<Room>, Option<Vec<RecordMeta>>) {
        let Some(mut pieces) = entry.into_room() else {
            return (None, Some(metas));
        };
        let Some(sections) = pieces.take_room() else {
            return (None, Some(metas));
        };
        let (metas, back) = if metas.capacity() > META_POOL_LIST_MAX {
            let mut metas = metas;
            metas.clear();
            (metas, None)
        } else {
            (Vec::new(), Some(metas))
        };
        let room = Room {
            sections,
            spare_box: Some(pieces),
            metas,
        };
        (Some(room), back)
    }

    /// The buffers an empty builder let go of.
    fn of_builder(sections: Sections) -> Room {
        Room {
            sections,
            spare_box: None,
            metas: Vec::new(),
        }
    }

    fn bytes(&self) -> usize {
        let spare_box = self
            .spare_box
            .as_ref()
            .map_or(0, |_| size_of::<AggregatePieces>());
        self.sections.capacity() + spare_box + self.metas.capacity() * size_of::<RecordMeta>()
    }
}

/// Rooms of acknowledged aggregates, for the aggregates put threads start next (see
/// [`AggregateBuilder::furnish`]): with them a put thread allocates nothing for a new
/// aggregate, and the sender frees nothing another thread allocated. They hold `max` bytes at
/// most: an eighth of the backlog, about what two requests in flight hold at 100-byte records.
pub(crate) struct RoomPool {
    free: Mutex<Rooms>,
    max: usize,
}

struct Rooms {
    rooms: Vec<Room>,
    bytes: usize,
}

impl RoomPool {
    pub fn new(max: usize) -> Self {
        RoomPool {
            free: Mutex::new(Rooms {
                rooms: Vec::new(),
                bytes: 0,
            }),
            max,
        }
    }

    /// A kept room, if there is one.
    fn take(&self) -> Option<Room> {
        let mut free = lock(&self.free);
        let room = free.rooms.pop()?;
        free.bytes -= room.bytes();
        Some(room)
    }

    /// Keeps `room` if the pool has space for it; else it is freed, after the lock is let go.
    fn give(&self, room: Room) {
        let refused = self.keep(&mut lock(&self.free), room);
        drop(refused);
    }

    /// Keeps each of `rooms` while the pool stays within its bytes (one lock for all); the
    /// rest are freed, after the lock is let go.
    pub fn give_all(&self, mut rooms: Vec<Room>) {
        if rooms.is_empty() {
            return;
        }
        let mut free = lock(&self.free);
        while let Some(room) = rooms.pop() {
            if let Some(room) = self.keep(&mut free, room) {
                rooms.push(room);
                break;
            }
        }
        drop(free);
    }

    /// Adds `room` to `free` if it fits within the pool's bytes; else hands it back.
    fn keep(&self, free: &mut Rooms, room: Room) -> Option<Room> {
        let bytes = room.bytes();
        if free.bytes + bytes > self.max {
            return Some(room);
        }
        free.bytes += bytes;
        free.rooms.push(room);
        None
    }

    /// Bytes of the rooms kept now.
    pub fn bytes(&self) -> usize {
        lock(&self.free).bytes
    }
}

/// Hands a slot whose builder [`wants_room`](AggregateBuilder::wants_room) a kept room, if
/// there is one.
fn furnish(shared: &Shared, slot: &mut Slot) {
    if !slot.builder.wants_room() {
        return;
    }
    if let Some(room) = shared.rooms.take() {
        let Room {
            sections,
            spare_box,
            metas,
        } = room;
        slot.builder.furnish(sections, spare_box);
        if slot.metas.capacity() < metas.capacity() {
            slot.metas = metas;
        }
    }
}

/// The shard map with one aggregator per open shard, plus one last slot for records no open
/// shard covers (they go out unaggregated and Kinesis routes them).
pub(crate) struct Routing {
    pub generation: u64,
    pub map: ShardMap,
    slots: Vec<Mutex<Slot>>,
    /// One per slot: held from the moment an aggregate leaves its slot until it is handed to
    /// the sender, so that a shard's aggregates reach the sender in the order they closed even
    /// when one is checksummed after its slot's lock is let go (see `Emission`).
    emitting: Vec<Mutex<()>>,
    /// Looked up for every Kinesis record the sender queues: a fast seeded hash.
    shard_ids: HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// Each shard's ordinal, in the map's order.
    ordinals: Vec<ShardOrdinal>,
}

/// A shard's name and ordinal, or `None` and [`NO_SHARD`].
pub(crate) type RoutedTo = (Option<Arc<str>>, ShardOrdinal);

struct Slot {
    builder: AggregateBuilder,
    metas: Vec<RecordMeta>,
    /// The earliest `put` among the records held: the aggregate's deadline counts from here.
    earliest_put: Option<Stamp>,
    /// Bumped whenever the aggregate is taken out, so that an old timer does not flush a newer
    /// aggregate early.
    cycle: u64,
    /// Set when a newer map replaced this routing: writers must look up the routing again.
    retired: bool,
    /// Buffer room the empty builder kept from its last aggregate, counted in
    /// [`Shared::idle_room`] until the next record uses it.
    idle_room: usize,
}

impl Slot {
    /// Asks for what closing the slot's aggregate reads: the builder's buffers and the
    /// records' metadata.
    fn prefetch_contents(&self) {
        self.builder.prefetch_finish();
        prefetch_slice(&self.metas);
    }
}

impl Routing {
    pub fn new(
        generation: u64,
        map: ShardMap,
        limits: AggregateLimits,
        ordinals: &Mutex<ShardOrdinals>,
    ) -> Self {
        // Taken before the slots are built, so the lock is held only for the lookups.
        let ordinals: Vec<ShardOrdinal> = {
            let mut known = lock(ordinals);
            map.shards().iter().map(|s| known.of_shard(s)).collect()
        };
        let slots = (0..=map.len())
            .map(|_| {
                Mutex::new(Slot {
                    builder: AggregateBuilder::new(limits),
                    metas: Vec::new(),
                    earliest_put: None,
                    cycle: 0,
                    retired: false,
                    idle_room: 0,
                })
            })
            .collect();
        let shard_ids = map.shards().iter().map(|s| s.shard_id.clone()).collect();
        let emitting = (0..=map.len()).map(|_| Mutex::new(())).collect();
        Routing {
            generation,
            map,
            slots,
            emitting,
            shard_ids,
            ordinals,
        }
    }

    /// Whether `shard_id` is an open shard of this map.
    pub fn has_shard(&self, shard_id: &str) -> bool {
        self.shard_ids.contains(shard_id)
    }

    /// Asks for all of a slot's cache lines at once (the `Slot` itself, not its buffers), not
    /// one after the other as the code reaches them.
    fn prefetch_slot(&self, slot: usize) {
        let slot = &self.slots[slot];
        prefetch(slot, std::mem::size_of_val(slot));
    }

    /// Whether records of `slot` are aggregated: aggregation is on and the slot is an open
    /// shard's (the last slot's records go out alone, for Kinesis to route).
    fn aggregates(&self, shared: &Shared, slot: usize) -> bool {
        shared.config.aggregation && slot < self.map.len()
    }

    /// The shard of `slot`: `None` for the last slot.
    pub fn shard(&self, slot: usize) -> RoutedTo {
        match self.map.shards().get(slot) {
            Some(shard) => (Some(shard.shard_id.clone()), self.ordinals[slot]),
            None => (None, NO_SHARD),
        }
    }
}

/// Whether `enqueue` is placing a new record (which `stop` may refuse) or re-routing one the
/// producer already holds (which must never be refused).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    New,
    Reroute,
}

/// Places a record in its shard's aggregator. A new record gets its flush epoch here, under the
/// slot lock, after the stop check: `stop` sets its flag before visiting every slot, so a record
/// is either refused or visited. Hands the record back if the producer is stopping.
pub(crate) fn enqueue(
    shared: &Shared,
    record: UserRecord,
    hash_key: u128,
    mut meta: RecordMeta,
    admission: Admission,
) -> Result<(), Box<(UserRecord, RecordMeta)>> {
    loop {
        // A guard, not a clone: no shared reference count is written on the put path.
        let routing = shared.routing.load();
        let index = routing
            .map
            .shard_index(hash_key)
            .unwrap_or(routing.map.len());
        routing.prefetch_slot(index);
        let mut slot = lock(&routing.slots[index]);
        if slot.retired {
            continue;
        }
        if routing.aggregates(shared, index) {
            // And the lines of its buffers the record will be written to.
            slot.builder.prefetch();
            prefetch_spare(&slot.metas);
        }
        if admission == Admission::New {
            if shared.closed.load(Ordering::SeqCst) {
                return Err(Box::new((record, meta)));
            }
            meta.epoch = shared.backlog.enter_epoch();
        }
        let emission = add_to_slot(shared, &routing, index, &mut slot, record, hash_key, meta);
        // The next `put` to this shard need not wait while the full aggregate is handed over.
        drop(slot);
        if let Some(emission) = emission {
            emission.send(shared);
        }
        return Ok(());
    }
}

/// From this many shards on, `admit` asks for a record's slot before the record takes its
/// room, as the slots no longer fit in a core's cache (a few hundred bytes each). With fewer,
/// the slot is most likely cached, and finding it twice would cost a second routing lookup
/// for nothing.
const EARLY_PREFETCH_SHARDS: usize = 1_024;

/// Whether `admit` should ask for slots early under `map` (see [`EARLY_PREFETCH_SHARDS`]).
pub(crate) fn early_prefetch(map: &ShardMap) -> bool {
    map.len() >= EARLY_PREFETCH_SHARDS
}

/// Asks for the memory of the slot (the `Slot` itself, not its buffers) a record of
/// `hash_key` goes to (see [`prefetch`]).
pub(crate) fn prefetch_slot(shared: &Shared, hash_key: u128) {
    let routing = shared.routing.load();
    let index = routing
        .map
        .shard_index(hash_key)
        .unwrap_or(routing.map.len());
    routing.prefetch_slot(index);
}

/// Adds a record to its slot. When that closes a full aggregate, the aggregate comes back for
/// the caller to send once it has let go of the slot's lock.
fn add_to_slot<'a>(
    shared: &Shared,
    routing: &'a Routing,
    index: usize,
    slot: &mut Slot,
    record: UserRecord,
    hash_key: u128,
    meta: RecordMeta,
) -> Option<Emission<'a>> {
    // Kept room about to hold records counts in the backlog from now on, not as idle.
    set_idle_room(shared, slot, 0);
    if !routing.aggregates(shared, index)
        || AggregateBuilder::solo_len(&record) > shared.config.aggregation_max_size
    {
        // Too big to share an aggregate (or aggregation is off): it goes out alone. Whatever
        // the slot holds goes first, so the shard's records leave in `put` order.
        emit_slot(shared, routing, index, slot);
        let entry = entry_alone(shared, record);
        shared.hand_over(Outgoing::new(
            entry,
            vec![meta],
            routing.shard(index),
            routing.generation,
        ));
        return None;
    }
    let mut emission: Option<Emission> = None;
    furnish(shared, slot);
    if let Err(record) = slot.builder.try_push_routed(record, hash_key) {
        // The aggregate is full: it goes out and the record starts the next one, which it
        // always fits (its solo size was checked above).
        let full = take_emission(shared, routing, index, slot);
        furnish(shared, slot);
        if let Err(record) = slot.builder.try_push_routed(record, hash_key) {
            // Unreachable by the check above; if it were not, the aggregate still goes first.
            if let Some(full) = full {
                full.send(shared);
            }
            let entry = Entry::plain(&record);
            let shard = routing.shard(index);
            let outgoing = Outgoing::new(entry, vec![meta], shard, routing.generation);
            shared.hand_over(outgoing);
            return None;
        }
        emission = full;
    }
    if slot.metas.capacity() == 0 {
        let last = slot.builder.capacity();
        slot.metas = shared.metas.take();
        if slot.metas.capacity() < last {
            slot.metas.reserve_exact(last + last / 2);
        }
    }
    let put_at = meta.put_at;
    slot.metas.push(meta);
    // A deadline for the first record, and again for a re-routed record older than those held.
    if slot.earliest_put.is_none_or(|earliest| put_at < earliest) {
        slot.earliest_put = Some(put_at);
        leave_slot_deadline(shared, routing, index, slot, put_at);
    }
    emission
}

/// Tells the sender when the aggregate in `slot` (at `index` of `routing`), whose oldest record
/// was put at `put_at`, closes.
///
/// The sender sends a request when its oldest record has waited the whole buffered time, so an
/// aggregate closes a little before that (`close_lead_nanos`): long enough for aggregates
/// closing around it to fill a request with it, instead of each leaving alone in a tiny one. At
/// a high rate that takes milliseconds, and the aggregate stays open for nearly the whole
/// buffered time, gathering more records; at a low rate it closes at half the time.
fn leave_slot_deadline(
    shared: &Shared,
    routing: &Routing,
    index: usize,
    slot: &Slot,
    put_at: Stamp,
) {
    let lead = shared.close_lead(put_at);
    shared.leave_deadline(
        put_at.instant() + shared.config.record_max_buffered_time.saturating_sub(lead),
        AggregateId {
            generation: routing.generation,
            slot: index,
            cycle: slot.cycle,
        },
    );
}

/// `record` in a Kinesis record of its own: plain, or, when aggregation is on and its data
/// starts with the aggregate's magic (readers would take it for an aggregate), as an aggregate
/// of one, as for a lone record (`admit` checked that it fits a record with its key).
fn entry_alone(shared: &Shared, record: UserRecord) -> Entry {
    match shared.config.aggregation && record.data().starts_with(&MAGIC) {
        true => alone_in_an_aggregate(record),
        false => Entry::plain(&record),
    }
}

/// `record` as an aggregate of one, whatever its size.
fn alone_in_an_aggregate(record: UserRecord) -> Entry {
    let mut builder = AggregateBuilder::new(AggregateLimits {
        max_size: usize::MAX,
        max_count: 1,
    });
    // Plain only if the builder refused it, which these limits rule out: sent, never lost.
    let plain = Entry::plain(&record);
    if builder.try_push(record).is_err() {
        return plain;
    }
    builder.finish_entry(false).unwrap_or(plain)
}

/// Encodes what the slot holds (if anything) and hands it to the sender, while the slot is still
/// locked, so the sender sees a shard's aggregates in order.
///
/// A slot keeps its aggregate's buffers for the next one while the producer's idle room stays
/// under its cap: a busy shard then writes every aggregate into the same memory instead of
/// allocating it on the putting thread and freeing it on the sender's, and all the shards
/// together hold at most the cap in room no record uses.
fn emit_slot(shared: &Shared, routing: &Routing, index: usize, slot: &mut Slot) -> bool {
    let Some(emission) = take_emission(shared, routing, index, slot) else {
        return false;
    };
    emission.send(shared);
    true
}

/// Takes the slot's aggregate out, with the slot's place in the order of sending
/// (its `emitting` lock, taken while the slot's lock is still held). `None` when it is empty.
fn take_emission<'a>(
    shared: &Shared,
    routing: &'a Routing,
    index: usize,
    slot: &mut Slot,
) -> Option<Emission<'a>> {
    slot.cycle += 1;
    slot.earliest_put = None;
    let entry = slot.builder.finish_entry(true);
    if shared.idle_room.load(Ordering::Relaxed) >= shared.idle_room_max {
        // Empty builders keep all the room they may: this one's goes to the pool, for the
        // next aggregate a put thread starts (freed here, it would be freed on another thread
        // than the one that allocated it).
        if let Some(sections) = slot.builder.release_room() {
            shared.rooms.give(Room::of_builder(sections));
        }
    }
    set_idle_room(shared, slot, slot.builder.idle_room());
    let entry = entry?;
    Some(Emission {
        closed: Closed {
            entry,
            metas: std::mem::take(&mut slot.metas),
            shard: routing.shard(index),
            generation: routing.generation,
        },
        _turn: lock(&routing.emitting[index]),
    })
}

/// An aggregate taken out of its slot and not yet handed to the sender.
struct Emission<'a> {
    closed: Closed,
    /// Its shard's turn to send: the next aggregate of the shard waits for this one.
    _turn: MutexGuard<'a, ()>,
}

impl Emission<'_> {
    /// Hands the aggregate to the sender (its checksum is computed when its request body is
    /// written, with the other aggregates': `aggregation::checksum_all`).
    fn send(self, shared: &Shared) {
        let Emission { closed, _turn } = self;
        let Closed {
            entry,
            metas,
            shard,
            generation,
        } = closed;
        shared.hand_over(Outgoing::new(entry, metas, shard, generation));
    }
}

/// A closed aggregate with where it goes; its Kinesis record is made once the slot's lock is
/// let go.
struct Closed {
    entry: Entry,
    metas: Vec<RecordMeta>,
    shard: RoutedTo,
    generation: u64,
}

/// Records that `slot`'s empty builder keeps `room` bytes, keeping the producer's total
/// ([`Shared::idle_room`]) in step.
fn set_idle_room(shared: &Shared, slot: &mut Slot, room: usize) {
    if room > slot.idle_room {
        shared
            .idle_room
            .fetch_add(room - slot.idle_room, Ordering::Relaxed);
    } else if room < slot.idle_room {
        shared
            .idle_room
            .fetch_sub(slot.idle_room - room, Ordering::Relaxed);
    }
    slot.idle_room = room;
}

/// The sender's timer: flushes each aggregate of `due` that is still in its slot, and says how
/// many there were.
pub(crate) fn flush_expired(shared: &Shared, due: &[AggregateId]) -> usize {
    if due.is_empty() {
        return 0;
    }
    let mut flushed = 0;
    let mut routing = shared.routing.load();
    let prefetch_slot_of = |routing: &Routing, aggregate: &AggregateId| {
        if aggregate.generation == routing.generation {
            routing.prefetch_slot(aggregate.slot);
            let turn = &routing.emitting[aggregate.slot];
            prefetch(turn, std::mem::size_of_val(turn));
        }
    };
    for ahead in due.iter().take(PREFETCH_AHEAD) {
        prefetch_slot_of(&routing, ahead);
    }
    for (i, aggregate) in due.iter().enumerate() {
        // The slots of the next deadlines are read from memory while this one is flushed, and
        // the buffers of the next one, whose slot has arrived by now (when no put holds it).
        if let Some(ahead) = due.get(i + PREFETCH_AHEAD) {
            prefetch_slot_of(&routing, ahead);
        }
        if let Some(next) = due
            .get(i + 1)
            .filter(|n| n.generation == routing.generation)
        {
            if let Ok(slot) = routing.slots[next.slot].try_lock() {
                if slot.cycle == next.cycle {
                    slot.prefetch_contents();
                }
            }
        }
        // A map installed meanwhile retires the slots of this one: as before the batch, an
        // aggregate of an older map is left to the re-route.
        if shared.routing_generation.load(Ordering::Acquire) != routing.generation {
            routing = shared.routing.load();
        }
        if aggregate.generation != routing.generation {
            continue;
        }
        let mut slot = lock(&routing.slots[aggregate.slot]);
        if slot.cycle == aggregate.cycle && !slot.retired {
            slot.prefetch_contents();
            flushed += usize::from(emit_slot(shared, &routing, aggregate.slot, &mut slot));
        }
    }
    flushed
}

/// Which aggregate a deadline is for: the routing generation and slot it was started in, and
/// the slot's cycle then (a later aggregate of the slot has a later cycle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct AggregateId {
    pub generation: u64,
    pub slot: usize,
    pub cycle: u64,
}

/// How many deadlines ahead `flush_expired` asks for a slot's memory: far enough for it to
/// arrive, near enough to still be in the cache when its turn comes.
const PREFETCH_AHEAD: usize = 2;

/// Sends every aggregate now, whatever its age (`flush` and `stop`).
pub(crate) fn flush_all(shared: &Shared) {
    let _no_reroute = lock(&shared.routing_change);
    let routing = shared.routing();
    for index in 0..routing.slots.len() {
        let mut slot = lock(&routing.slots[index]);
        emit_slot(shared, &routing, index, &mut slot);
        // A `put` may have taken a full aggregate out of this slot and not yet handed it to
        // the sender (it lets go of the slot first): wait for its turn to end, so that every
        // record the slot took before this pass is with the sender when the pass ends. `stop`
        // relies on it: its message must follow every record accepted before it.
        drop(lock(&routing.emitting[index]));
    }
}

/// What a map change takes from an old aggregator: the whole aggregate, moved to the slot at
/// this index of the new routing, or its records, to be routed again.
enum Carried {
    Whole(usize),
    Records(Vec<UserRecord>, Vec<RecordMeta>),
}

/// Installs a new shard map. The aggregators of shards it still has carry on in its routing as
/// they are; the records held for shards it no longer has are routed again. (The slot of keys
/// no shard covered holds none: its records go out alone.)
///
/// `listed_in` is how long ListShards took, for the log.
pub(crate) fn install_map(shared: &Shared, map: ShardMap, listed_in: Duration) {
    let _exclusive = lock(&shared.routing_change);
    let old = shared.routing();
    if old.map == map {
        return;
    }
    let started = Instant::now();
    let new = Arc::new(Routing::new(
        old.generation + 1,
        map,
        shared.aggregate_limits(),
        &shared.shard_ordinals,
    ));
    // The new slots stay locked until every record of the old ones is in them: a `put` that
    // finds the new map waits here rather than overtake an older record of its shard (order
    // per key holds across a map change, on shards the change did not touch too). The old
    // slots are drained while they are still open to `put`s that loaded the old map, so
    // nothing is refused meanwhile.
    let mut new_slots: Vec<MutexGuard<Slot>> = new.slots.iter().map(lock).collect();
    shared
        .early_prefetch
        .store(early_prefetch(&new.map), Ordering::Relaxed);
    shared.routing.store(Arc::clone(&new));
    shared
        .routing_generation
        .store(old.generation + 1, Ordering::Release);
    // Until here puts went on with the old map; from here one that finds the new map waits.
    let built = started.elapsed();
    // A shard's range never changes: when the new map still has a shard, its aggregate moves
    // over whole, and its records are neither read back nor encoded again, so a change that
    // touches a few shards of thousands costs the few (puts wait for this pass). Those moves
    // come first, into slots nothing was routed to yet; then the records of the other slots are
    // routed again (into a kept aggregator too, had the old map overlapped it).
    let stays: Vec<Option<usize>> = (0..old.slots.len())
        .map(|index| {
            let shard = old.map.shards().get(index)?;
            let at = new.map.shard_index(shard.start)?;
            // The range too: a stream deleted and created again under its name numbers its
            // shards from zero again.
            (new.map.shards()[at] == *shard).then_some(at)
        })
        .collect();
    let kept_first = (0..old.slots.len())
        .filter(|&index| stays[index].is_some())
        .chain((0..old.slots.len()).filter(|&index| stays[index].is_none()));
    let (mut kept, mut rerouted) = (0usize, 0usize);
    for index in kept_first {
        let carried = {
            let mut slot = lock(&old.slots[index]);
            slot.retired = true;
            match stays[index] {
                // Always empty, as `load_shard_map` lists a shard once; were a map to name one
                // twice, the second copy's records would be routed again, not lost.
                Some(at) if new_slots[at].metas.is_empty() => {
                    let target = &mut new_slots[at];
                    std::mem::swap(&mut target.builder, &mut slot.builder);
                    std::mem::swap(&mut target.metas, &mut slot.metas);
                    std::mem::swap(&mut target.idle_room, &mut slot.idle_room);
                    target.earliest_put = slot.earliest_put.take();
                    // What the old slot got back is an empty builder, let go with the routing.
                    set_idle_room(shared, &mut slot, 0);
                    Carried::Whole(at)
                }
                _ => {
                    slot.earliest_put = None;
                    // `take_records` lets go of the builder's buffers, kept room included.
                    set_idle_room(shared, &mut slot, 0);
                    Carried::Records(slot.builder.take_records(), std::mem::take(&mut slot.metas))
                }
            }
        };
        // An aggregate a `put` took out of this slot before it was retired reaches the sender
        // before anything of the new slots does.
        drop(lock(&old.emitting[index]));
        let (records, metas) = match carried {
            Carried::Whole(at) => {
                let target = &new_slots[at];
                kept += target.metas.len();
                // The old slot's deadline names the old routing, which the timer skips.
                if let Some(put_at) = target.earliest_put {
                    leave_slot_deadline(shared, &new, at, target, put_at);
                }
                continue;
            }
            Carried::Records(records, metas) => (records, metas),
        };
        rerouted += metas.len();
        for (record, meta) in records.into_iter().zip(metas) {
            let hash_key = record.hash_key();
            let target = new.map.shard_index(hash_key).unwrap_or(new.map.len());
            let slot = &mut new_slots[target];
            if let Some(emission) = add_to_slot(shared, &new, target, slot, record, hash_key, meta)
            {
                emission.send(shared);
            }
        }
    }
    drop(new_slots);
    tracing::info!(
        shards_before = old.map.len(),
        shards_after = new.map.len(),
        records_kept = kept,
        records_rerouted = rerouted,
        micros = started.elapsed().as_micros() as u64,
        micros_building = built.as_micros() as u64,
        listing_millis = listed_in.as_millis() as u64,
        "shard map changed; the buffered records of shards it closed were routed again"
    );
}

/// Routes records the producer already holds again, under the current map (after a reshard).
pub(crate) fn reroute(shared: &Shared, records: Vec<UserRecord>, metas: Vec<RecordMeta>) {
    debug_assert_eq!(records.len(), metas.len());
    for (record, meta) in records.into_iter().zip(metas) {
        let hash_key = record.hash_key();
        if let Err(refused) = enqueue(shared, record, hash_key, meta, Admission::Reroute) {
            let (record, meta) = *refused;
            // Unreachable by construction (re-routing ignores `stop`), but never drop a record.
            let entry = Entry::plain(&record);
            shared.hand_over(Outgoing::new(entry, vec![meta], (None, NO_SHARD), 0));
        }
    }
}

/// Packs user records into Kinesis records for `shard`, in the order given, by the rules of a
/// shard's aggregator: aggregates up to the configured limits; alone, a record too big to share
/// one (or every record, when aggregation is off or no open shard covers them). Order mode uses
/// it to put the records of a closed shard back at the front of the shards that took over its
/// keys, ahead of newer records, rather than behind them in the aggregators.
pub(crate) fn pack(
    shared: &Shared,
    records: Vec<(UserRecord, RecordMeta)>,
    shard: RoutedTo,
    generation: u64,
) -> Vec<Outgoing> {
    let aggregates = shared.config.aggregation && shard.0.is_some();
    let mut packed = Vec::new();
    let mut builder = AggregateBuilder::new(shared.aggregate_limits());
    let mut metas = Vec::new();
    let finish = |builder: &mut AggregateBuilder,
                  metas: &mut Vec<RecordMeta>,
                  packed: &mut Vec<Outgoing>| {
        if let Some(entry) = builder.finish_entry(false) {
            let metas = std::mem::take(metas);
            packed.push(Outgoing::new(entry, metas, shard.clone(), generation));
        }
    };
    for (record, meta) in records {
        let alone = if !aggregates
            || AggregateBuilder::solo_len(&record) > shared.config.aggregation_max_size
        {
            entry_alone(shared, record)
        } else {
            // Rare (after a reshard): the key tables hash the keys themselves.
            match builder.try_push(record) {
                Ok(()) => {
                    metas.push(meta);
                    continue;
                }
                Err(record) => {
                    finish(&mut builder, &mut metas, &mut packed);
                    match builder.try_push(record) {
                        Ok(()) => {
                            metas.push(meta);
                            continue;
                        }
                        // Unreachable by the size check above; if it were not, it goes alone.
                        Err(record) => Entry::plain(&record),
                    }
                }
            }
        };
        // A record going alone leaves after what was gathered before it.
        finish(&mut builder, &mut metas, &mut packed);
        packed.push(Outgoing::new(alone, vec![meta], shard.clone(), generation));
    }
    finish(&mut builder, &mut metas, &mut packed);
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_re_split_record_keeps_its_attempts_and_their_last_error() {
        let mut meta = metas(1, 1).pop().expect("one");
        meta.carry_over(0, None);
        assert!(meta.earlier.is_none(), "never sent: nothing to keep");
        let throttled = AttemptError {
            code: "ProvisionedThroughputExceededException".into(),
            message: "slow down".into(),
            transient: true,
        };
        meta.carry_over(2, Some(&throttled));
        assert_eq!(meta.attempts(1), 3);
        assert_eq!(meta.earlier_error(), Some(&throttled));
        // Re-split again before its new Kinesis record was sent: unchanged.
        meta.carry_over(0, None);
        assert_eq!(meta.attempts(0), 2);
        assert_eq!(meta.earlier_error(), Some(&throttled));
        // Its next Kinesis record was written, to a shard a reshard had taken its key from:
        // its last attempt met no error.
        meta.carry_over(1, None);
        assert_eq!(meta.attempts(0), 3);
        assert_eq!(meta.earlier_error(), None);
    }

    #[test]
    fn an_acknowledged_aggregates_room_comes_back_empty_and_the_pool_keeps_its_bound() {
        let aggregate = |records: usize| {
            let mut builder = AggregateBuilder::new(AggregateLimits {
                max_size: 1 << 20,
                max_count: usize::MAX,
            });
            for i in 0..records {
                builder
                    .try_push(UserRecord::new(vec![7u8; 100], format!("k{i}")))
                    .unwrap();
            }
            builder.finish_entry(false).unwrap()
        };
        // A long record list rides with the room, emptied; a short one goes to the MetaPool.
        let (room, rest) = Room::of(aggregate(300), metas(400, 300));
        let room = room.expect("an aggregate has room");
        assert!(rest.is_none());
        assert!(room.metas.is_empty() && room.metas.capacity() >= 400);
        assert!(room.sections.capacity() > 0 && room.spare_box.is_some());
        let (short, rest) = Room::of(aggregate(300), metas(8, 3));
        assert!(short.is_some_and(|room| room.metas.capacity() == 0));
        assert_eq!(rest.map(|metas| metas.len()), Some(3));
        // A small aggregate's single copy and a plain record have none.
        assert!(matches!(
            Room::of(aggregate(3), metas(8, 3)),
            (None, Some(_))
        ));
        let plain = Entry::plain(&UserRecord::new("x", "k"));
        assert!(matches!(Room::of(plain, metas(1, 1)), (None, Some(_))));
        // The pool keeps rooms up to its bytes and hands them out again.
        let bytes = room.bytes();
        let pool = RoomPool::new(2 * bytes + bytes / 2);
        let rooms = (0..4).map(|_| Room::of(aggregate(300), metas(400, 300)).0.unwrap());
        pool.give_all(rooms.collect());
        assert_eq!(pool.bytes(), 2 * bytes);
        assert!(pool.take().is_some() && pool.take().is_some());
        assert!(pool.take().is_none());
        assert_eq!(pool.bytes(), 0);
        // One at a time (an empty builder's buffers), within the same bound.
        for _ in 0..3 {
            pool.give(Room::of(aggregate(300), metas(400, 300)).0.unwrap());
        }
        assert_eq!(pool.bytes(), 2 * bytes);
    }

    fn metas(capacity: usize, len: usize) -> Vec<RecordMeta> {
        let mut metas = Vec::with_capacity(capacity);
        metas.extend((0..len).map(|_| RecordMeta {
            put_at: Stamp::now(),
            epoch: 0,
            backlog_bytes: 1,
            data_len: 1,
            earlier: None,
            receipt: None,
        }));
        metas
    }

    #[test]
    fn a_summary_gives_what_reading_every_record_gives() {
        let mut next = crate::test_rng::xorshift64(7);
        let start = Stamp::now();
        let stamp = |nanos: u64| Stamp::of(start.instant() + Duration::from_nanos(nanos));
        for len in [0usize, 1, 2, 353] {
            for case in 0..4 {
                let metas: Vec<RecordMeta> = (0..len)
                    .map(|_| RecordMeta {
                        put_at: stamp(next() % 100_000_000),
                        epoch: if case == 1 { next() % 2 } else { 5 },
                        backlog_bytes: (next() % 2_000) as u32,
                        data_len: (next() % 1_000) as u32,
                        earlier: (case == 2).then(Box::<Earlier>::default),
                        receipt: None,
                    })
                    .collect();
                let (summary, backlog_bytes) = MetaSummary::of(&metas);
                let now = stamp(150_000_000);
                let waited = metas.iter().map(|m| now.nanos_since(m.put_at));
                let sizes = metas.iter().map(|m| u64::from(m.data_len));
                let close = |a: Statistics, b: Statistics| {
                    assert_eq!(a.count, b.count);
                    for (x, y) in [(a.sum, b.sum), (a.min, b.min), (a.max, b.max)] {
                        assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{a:?} {b:?}");
                    }
                };
                close(
                    summary.buffering(len, now),
                    Statistics::of_integers(waited, 1e-6),
                );
                close(summary.data_sizes(len), Statistics::of_integers(sizes, 1.0));
                let bytes: usize = metas.iter().map(|m| m.backlog_bytes as usize).sum();
                assert_eq!(backlog_bytes, bytes);
                let mut runs = 0;
                let mut last = None;
                for meta in &metas {
                    if last != Some(meta.epoch) {
                        runs += 1;
                        last = Some(meta.epoch);
                    }
                }
                let one = (runs == 1).then(|| metas[0].epoch);
                assert_eq!(summary.one_epoch, one, "len {len}, case {case}");
                assert_eq!(summary.singular, len > 0 && case == 2);
            }
        }
    }

    #[test]
    fn the_meta_pool_keeps_only_short_lists_and_only_so_many() {
        let pool = MetaPool::default();
        pool.give_all(vec![metas(META_POOL_LIST_MAX + 1, 3), Vec::new()]);
        assert_eq!(
            lock(&pool.free).len(),
            0,
            "long and roomless lists are let go"
        );
        pool.give_all(vec![metas(8, 5)]);
        pool.give_all((1..META_POOL_MAX + 10).map(|_| metas(8, 5)).collect());
        assert_eq!(lock(&pool.free).len(), META_POOL_MAX);
        let taken = pool.take();
        assert!(taken.is_empty(), "a kept list comes back empty");
        assert_eq!(taken.capacity(), 8);
        assert_eq!(lock(&pool.free).len(), META_POOL_MAX - 1);
    }
}
