//! Step 5: the sender. One task collects finished Kinesis records into PutRecords requests,
//! sends up to `max_in_flight` of them at once, and decides the fate of every entry of every
//! result: acknowledged, retried after a backoff, or failed.
//!
//! Kinesis records wait in one *lane* per shard, each with its rate limiter
//! ([`crate::limiter`]). A request takes records from the lanes that may send, in turn, and goes
//! out when it is full (500 records or `collection_max_size` bytes) or when its oldest user
//! record has waited `record_max_buffered_time`. Only the failed entries of a request are
//! retried; see [`crate::retry`] for which errors qualify.
//!
//! With `preserve_order`, a lane sends one Kinesis record per request and nothing more while
//! that record is outstanding (in flight, or waiting to be retried): Kinesis does not order the
//! records of one PutRecords request, so this is the only way to keep a shard's order. Across a
//! reshard, the lane of a shard that closed keeps its records until none is outstanding, while
//! the lanes of the shards that took over its keys send nothing; its records then go to the
//! front of those lanes, ahead of every newer record (`drain_closed_lanes`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::aggregator::{
    self, AggregateId, Landed, Outgoing, RecordMeta, RoutedTo, Routing, ShardOrdinal, NO_SHARD,
};
use crate::config::Config;
use crate::deadlines::MostlySorted;
use crate::error::{DeliveryError, FailureKind};
use crate::limiter::Limiter;
use crate::mailbox::Sleep;
use crate::metrics::{MetricName, Recorder, ShardRef, Statistics};
use crate::prefetch::{prefetch, prefetch_slice};
use crate::producer::{Inbound, Returns, Shared};
use crate::ranges::RangeIndex;
use crate::record::UserRecord;
use crate::request_body;
use crate::retry::{classify_sdk_error, entry_error_is_transient, AttemptError};
use crate::shard_map::StreamId;
use crate::stats::add;
use crate::sync::lock;

/// Map reloads (failed ones included) a parked aggregate waits through for the shard it landed
/// on to appear.
const PARKED_RELOADS: u32 = 3;

/// Requests sent before they were full that may be in flight at once (see `should_send`).
const MAX_PARTIAL_IN_FLIGHT: usize = 2;

/// A relief closes the open aggregates among this share of the pending deadlines, the oldest
/// (see `Sender::relieve`).
const RELIEF_SHARE: usize = 4;
/// The least time between two reliefs' walks over what the sender holds.
const RELIEF_WALK_GAP: Duration = Duration::from_millis(1);

/// A lane its limiter holds back waits at least this long before it may send again.
const LIMITED_LANE_PACE: Duration = Duration::from_millis(50);
/// Least time between two walks of every lane for records past their TTL that no request could
/// take (`expire_overdue`): such a record is reported at most this long after its TTL.
const OVERDUE_WALK_GAP: Duration = Duration::from_millis(250);

/// The sender's task: runs until `stop` has ended with every record acknowledged or failed.
/// The sender is built before the task first runs, so that a task dropped unpolled (its
/// runtime shut down at once) still reports what reaches it and ends the producer's `stop`.
pub(crate) fn run(
    shared: Arc<Shared>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
) -> impl std::future::Future<Output = ()> + Send {
    let mut sender = Sender::new(shared, inbound);
    async move { sender.run().await }
}

/// Ends the producer ([`Shared::finish`]: its failure streams, `stop`'s wait) when the last of
/// the sender and its request tasks lets go of it. A request task the runtime drops after the
/// sender (it shut down) still reports its records to the subscriber.
struct Ending(Arc<Shared>);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Sender {
    fn new(shared: Arc<Shared>, inbound: mpsc::UnboundedReceiver<Inbound>) -> Sender {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let next_refresh = Instant::now() + shared.config.shard_map_refresh_interval;
        let order_routing = shared.config.preserve_order.then(|| shared.routing());
        let channel_generation = order_routing.as_ref().map_or(0, |r| r.generation);
        Sender {
            ending: Some(Arc::new(Ending(Arc::clone(&shared)))),
            shared,
            inbound,
            mail: VecDeque::new(),
            lanes: Vec::new(),
            ready: VecDeque::new(),
            waking: BinaryHeap::new(),
            pending_count: 0,
            pending_bytes: 0,
            blocked_count: 0,
            blocked_bytes: 0,
            lane_fronts: BTreeMap::new(),
            parked: Vec::new(),
            isolating: VecDeque::new(),
            deadlines: MostlySorted::new(),
            collected: Vec::new(),
            due: Vec::new(),
            retries: BinaryHeap::new(),
            retry_seq: 0,
            in_flight: 0,
            in_flight_bytes: 0,
            partial_in_flight: 0,
            results_tx,
            results_rx,
            flush_requested: false,
            relief_requested: false,
            freed_with_records: false,
            in_flight_backlog_bytes: 0,
            last_relief_walk: None,
            relief_wanted_at: None,
            overdue_walk_at: Instant::now(),
            stop_deadline: None,
            cancel: watch::Sender::new(false),
            next_refresh,
            arrived_count: 0,
            arrived_bytes: 0,
            arrivals_since: Instant::now(),
            arrivals_disturbed: false,
            channel_generation,
            closed_lanes: Vec::new(),
            drain_wanted: false,
            order_routing,
            closed_index: None,
            uncovered_waiting: false,
        }
    }
}

struct Sender {
    shared: Arc<Shared>,
    /// Let go of last in `drop`; each request task holds a clone.
    ending: Option<Arc<Ending>>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    /// Kinesis records collected from the mailbox and not handled yet.
    mail: VecDeque<Outgoing>,
    /// Kinesis records waiting for a request, one lane per shard, by shard ordinal (the lane
    /// of records no open shard covered at `NO_SHARD`). Looked up for every Kinesis record
    /// queued, sent and answered.
    lanes: Vec<Option<Box<Lane>>>,
    /// Lanes that may have something to send now, in turn.
    ready: VecDeque<ShardOrdinal>,
    /// Lanes waiting for their limiter (or, in order mode, a retry's backoff) until a time.
    waking: BinaryHeap<Reverse<(Instant, ShardOrdinal)>>,
    /// Totals over all lanes.
    pending_count: usize,
    pending_bytes: usize,
    /// Of those, what waits in lanes held back until a time (their limiter, or in order mode a
    /// retry's backoff): a request cannot take them now, so they do not make it "full".
    blocked_count: usize,
    blocked_bytes: usize,
    /// For each lane that may send now (not held back until a time), the `put` time of the
    /// oldest user record of its front Kinesis record, as a multiset: its first key is when the
    /// next request is due (plus `record_max_buffered_time`). Records held back by a limiter
    /// do not make a request due: they could not join it.
    lane_fronts: BTreeMap<Instant, u32>,
    /// Aggregates written to a shard the map did not predict, waiting for the reloaded map to
    /// tell whether that shard owns all their records.
    parked: Vec<(Outgoing, Arc<str>, u32)>,
    /// Halves of requests refused as a whole for invalid input, sent on their own to find the
    /// entry at fault.
    isolating: VecDeque<Vec<Outgoing>>,
    /// Aggregator deadlines, earliest first (they arrive almost in order).
    deadlines: MostlySorted<(Instant, AggregateId)>,
    /// Deadlines just collected from the put threads (kept for its room).
    collected: Vec<(Instant, AggregateId)>,
    /// The deadlines that are due, taken from `deadlines` to be flushed together (kept for
    /// its room).
    due: Vec<AggregateId>,
    /// Records waiting out their backoff (without `preserve_order`; with it they wait at the
    /// front of their lane).
    retries: BinaryHeap<Reverse<Retry>>,
    retry_seq: u64,
    in_flight: usize,
    /// Bytes (data + partition keys) of the requests in flight. Each request is held three
    /// times while it is out (our aggregates, the JSON body in base64, the socket), so a
    /// request goes out only while these are under a quarter of the backlog: a stalled endpoint
    /// cannot make memory grow far past the backlog.
    in_flight_bytes: usize,
    /// Requests in flight that were sent before they were full.
    partial_in_flight: usize,
    results_tx: mpsc::UnboundedSender<Completed>,
    results_rx: mpsc::UnboundedReceiver<Completed>,
    flush_requested: bool,
    /// A relief closed aggregates early (see [`relieve`](Sender::relieve)): the lanes send
    /// what they may now, as while a put waits for room.
    relief_requested: bool,
    /// Order mode: an acknowledgement freed a lane that has records queued. They waited a whole
    /// round trip behind the record that ended, and the lane sends nothing else until their
    /// own request ends: holding them longer for a fuller request would cost their shard
    /// throughput, so a request is due at once (see `should_send`).
    freed_with_records: bool,
    /// Backlog bytes (the backlog's own count) of the records in requests in flight.
    in_flight_backlog_bytes: usize,
    /// When a relief last walked what the sender holds, and how long the walk took.
    last_relief_walk: Option<(Instant, Duration)>,
    /// A relief asked for too soon after the last walk, to be made at this time.
    relief_wanted_at: Option<Instant>,
    /// The earliest time `expire_overdue` may walk the lanes again.
    overdue_walk_at: Instant,
    stop_deadline: Option<Instant>,
    /// Set at the stop deadline: requests in flight give up.
    cancel: watch::Sender<bool>,
    next_refresh: Instant,
    /// Fresh Kinesis records (and their request bytes) queued since `arrivals_since` in
    /// lanes that may send: the rate that sets how long before their deadline aggregates close
    /// (`update_close_lead`). Retries and records held by a limiter do not count: they do not
    /// fill requests at that rate.
    arrived_count: usize,
    arrived_bytes: usize,
    arrivals_since: Instant,
    /// A flush or the stop sent every aggregate at once in this period: its rate says nothing
    /// of the traffic, and it is not used.
    arrivals_disturbed: bool,
    /// Order mode (`None` without it): the routing whose map the lanes were last checked
    /// against for shards that closed.
    order_routing: Option<Arc<Routing>>,
    /// Order mode: the routing generation of the latest `MapRefreshed` message. Every aggregate
    /// routed by an older routing is ahead of that message in the channel (it is sent once the
    /// map's installation has retired the old aggregators and waited for what they handed
    /// over), so once it reaches the generation that closed a shard, no more records for that
    /// shard will come. (A record's own generation does not say as much: the installation hands
    /// over aggregates of the new map while old aggregators are still open.)
    channel_generation: u64,
    /// Order mode: the lanes of closed shards not drained yet.
    closed_lanes: Vec<ShardOrdinal>,
    /// Order mode: a closed lane may have become ready to drain.
    drain_wanted: bool,
    /// Order mode: the lane of records no open shard covered (a map with a gap) holds records,
    /// and no other lane sends meanwhile: those records could have any key, and Kinesis routes
    /// them where it will.
    uncovered_waiting: bool,
    /// Order mode: the closed lanes' ranges, built when first searched after `closed_lanes`
    /// changed.
    closed_index: Option<RangeIndex<ShardOrdinal>>,
}

/// How often the sender measures the rate Kinesis records reach it: every 100 ms, or every
/// buffering time if that is longer (a lead is used that long after it is measured).
pub(crate) fn arrivals_period(config: &Config) -> Duration {
    config
        .record_max_buffered_time
        .max(Duration::from_millis(100))
}

/// One shard's queue.
struct Lane {
    /// Its shard (`None` for the lane of records no open shard covered).
    shard_id: Option<Arc<str>>,
    queue: VecDeque<Outgoing>,
    limiter: Option<Limiter>,
    /// Records taken from this lane and not yet ended or returned to it.
    outstanding: usize,
    /// Listed in `ready`.
    listed: bool,
    /// Request bytes of the records queued.
    bytes: usize,
    /// Waiting in `waking` until a time: its records count as blocked.
    waiting: bool,
    /// With `preserve_order`: the record at the front is a retry not to be sent before this.
    not_before: Option<Instant>,
    /// Since when the limiter has held the lane back (for `LimiterWaitTime`).
    limited_since: Option<Instant>,
    /// What the lane has in `lane_fronts`.
    front_key: Option<Instant>,
    /// Order mode's state for reshards (`None` without order mode).
    order: Option<Box<LaneOrder>>,
}

/// What order mode keeps of a lane to hold each key's order across a reshard.
#[derive(Default)]
struct LaneOrder {
    /// Its shard's hash key range (the whole key space for the lane of records no open shard
    /// covered, whose keys could be any).
    range: Option<(u128, u128)>,
    /// Its shard has closed (in the map of this routing generation): the lane sends nothing
    /// more, and once none of its records is outstanding, its records go to the lanes that took
    /// over their keys.
    closed_under: Option<u64>,
    /// Closed lanes of older shards overlapping this one, not drained yet: it sends nothing
    /// until they have gone, as their records are older than any of its own.
    held: u32,
    /// On a closed lane: the lanes it holds.
    holds: Vec<ShardOrdinal>,
}

impl LaneOrder {
    fn blocks(&self) -> bool {
        self.held > 0 || self.closed_under.is_some()
    }
}

impl Lane {
    /// Whether order mode keeps the lane from sending (see [`LaneOrder`]).
    fn order_blocks(&self) -> bool {
        self.order.as_ref().is_some_and(|order| order.blocks())
    }

    fn range(&self) -> Option<(u128, u128)> {
        self.order.as_ref().and_then(|order| order.range)
    }

    fn closed_under(&self) -> Option<u64> {
        self.order.as_ref().and_then(|order| order.closed_under)
    }
}

/// The error code of an entry or request over its shard's throughput.
const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// How many Kinesis records ahead the handling of a request or its answer asks for their
/// memory.
const ANSWER_PREFETCH_AHEAD: usize = 2;

/// How many records ahead `handle_mail` asks for a record's lane's queue (and for the lane
/// itself, twice as far); and how many lanes ahead `take_batch` asks for a lane's first
/// record (and for the lane, twice as far).
const LANE_PREFETCH_AHEAD: usize = 2;

/// How a record that may be retried waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backoff {
    /// An entry throttled on a shard with a limiter waits one base backoff (the limiter paces
    /// its shard); anything else backs off exponentially.
    PacedIfThrottled,
    Exponential,
}

struct Retry {
    at: Instant,
    seq: u64,
    outgoing: Outgoing,
}

impl PartialEq for Retry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Retry {}
impl PartialOrd for Retry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Retry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A request's batch back from its task, with what happened to it.
struct Completed {
    batch: Vec<Outgoing>,
    /// Sent before it was full (on a deadline, a flush or a stop).
    partial: bool,
    /// When the request was sent.
    started: Instant,
    /// Its bytes, counted in `in_flight_bytes`, and its backlog bytes, in
    /// `in_flight_backlog_bytes`.
    bytes: usize,
    backlog_bytes: usize,
    outcome: Outcome,
}

enum Outcome {
    Answered(PutRecordsOutput),
    Failed(AttemptError),
    Cancelled,
}

/// Why a lane stopped giving records to the request being built.
enum Blocked {
    /// Nothing left, or (order mode) a record of the lane is outstanding.
    No,
    /// The request is full; the lane still has records.
    RequestFull,
    /// The lane may send again at this time.
    Until(Instant),
}

impl Sender {
    async fn run(&mut self) {
        loop {
            self.handle_mail();
            self.collect_deadlines();
            let now = Instant::now();
            self.fire_deadlines(now);
            self.release_retries(now);
            self.wake_lanes(now);
            if now >= self.next_refresh {
                self.next_refresh = now + self.shared.config.shard_map_refresh_interval;
                self.shared.request_refresh();
            }
            if now >= self.arrivals_since + arrivals_period(&self.shared.config) {
                self.update_close_lead(now);
            }
            if self.relief_wanted_at.is_some_and(|at| now >= at) {
                self.relief_wanted_at = None;
                self.relieve();
            }
            if self.stop_deadline.is_some_and(|deadline| now >= deadline) {
                self.abandon_all();
            }
            self.dispatch(now);
            if self.stop_deadline.is_some()
                && self.pending_count == 0
                && self.isolating.is_empty()
                && self.parked.is_empty()
                && self.retries.is_empty()
                && self.in_flight == 0
            {
                // Records re-routed into aggregators just before the stop was seen would
                // otherwise wait for a deadline nobody fires: send them now.
                aggregator::flush_all(&self.shared);
                if self.handle_mail() {
                    continue;
                }
                match self.inbound.try_recv() {
                    Ok(message) => {
                        self.handle_mail();
                        self.handle(message);
                        continue;
                    }
                    // A deadline left since the top of the loop is for a record that reached
                    // an aggregator since (a re-route): flush again.
                    Err(_) if !self.shared.left_deadlines.is_empty() => continue,
                    Err(_) => break,
                }
            }
            let wake = self.next_wake(now);
            if !self.shared.mailbox.try_sleep(self.sleep_until(wake)) {
                // A record was left since the top of the loop.
                continue;
            }
            if !self.shared.left_deadlines.try_sleep_until(wake) {
                // A deadline left since the top of the loop comes before `wake`.
                continue;
            }
            tokio::select! {
                Some(completed) = self.results_rx.recv() => {
                    // Records left since the top of the loop are queued first: in order mode,
                    // an answer that frees a lane sends the lane's next record at once, and
                    // that record may be in the mailbox.
                    self.handle_mail();
                    self.complete(completed);
                }
                Some(message) = self.inbound.recv() => {
                    // Every record left before the message was sent is handled before it
                    // (`MapRefreshed` promises that no older aggregate follows it).
                    self.handle_mail();
                    self.handle(message);
                    while let Ok(message) = self.inbound.try_recv() {
                        self.handle_mail();
                        self.handle(message);
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            self.shared.mailbox.awake();
            self.shared.left_deadlines.awake();
        }
    }

    /// What should wake the sender from a sleep until `wake` (see [`Mailbox`]): records due
    /// before then, or enough to fill a request with what may go now; any record at all while
    /// it sends everything it may (flushing, stopping, relieving the backlog, or with a `put`
    /// waiting for room).
    ///
    /// [`Mailbox`]: crate::mailbox::Mailbox
    fn sleep_until(&self, wake: Instant) -> Sleep {
        let config = &self.shared.config;
        let eager = self.flush_requested
            || self.stop_deadline.is_some()
            || self.relief_requested
            || self.freed_with_records
            || self.shared.backlog.has_waiters();
        if eager {
            return Sleep {
                until: wake,
                room_count: 0,
                room_bytes: 0,
            };
        }
        let ready_count = self.pending_count.saturating_sub(self.blocked_count);
        let ready_bytes = self.pending_bytes.saturating_sub(self.blocked_bytes);
        Sleep {
            until: wake,
            room_count: config.collection_max_count.saturating_sub(ready_count),
            room_bytes: config.collection_max_size.saturating_sub(ready_bytes),
        }
    }

    /// Takes the Kinesis records put threads left in the mailbox and queues them, in the
    /// order they were left. While it queues one, it asks for the lane of a record a few
    /// places on, and for that lane's queue a little nearer (the queue's place is only known
    /// once the lane is read). A record leaves `mail` only as it is queued, so a sender that
    /// ends midway reports the rest (`drop`). Returns whether there were any.
    fn handle_mail(&mut self) -> bool {
        self.shared.mailbox.collect(&mut self.mail);
        let any = !self.mail.is_empty();
        while let Some(outgoing) = self.mail.pop_front() {
            if let Some(lane) = self.lane_of(self.mail.get(2 * LANE_PREFETCH_AHEAD - 1)) {
                prefetch(lane as *const Lane, std::mem::size_of::<Lane>());
            }
            if let Some(lane) = self.lane_of(self.mail.get(LANE_PREFETCH_AHEAD - 1)) {
                let (front, back) = lane.queue.as_slices();
                let tail = if back.is_empty() { front } else { back };
                prefetch(tail.as_ptr_range().end, std::mem::size_of::<Outgoing>());
            }
            self.enqueue(outgoing, false);
        }
        any
    }

    /// The lane of a record, if it has one yet.
    fn lane_of(&self, outgoing: Option<&Outgoing>) -> Option<&Lane> {
        self.lane_ref(outgoing?.ordinal)
    }

    /// The lane at `ordinal`, if it exists, to read.
    fn lane_ref(&self, ordinal: ShardOrdinal) -> Option<&Lane> {
        self.lanes.get(ordinal as usize)?.as_deref()
    }

    fn handle(&mut self, message: Inbound) {
        match message {
            Inbound::Wake => {}
            Inbound::Flush => {
                self.flush_requested = true;
                self.arrivals_disturbed = true;
            }
            Inbound::Pressure => self.relieve(),
            Inbound::Relieved { early } => {
                self.relief_requested |= early;
                // Acquire: a put that found the flag still set counted itself as waiting
                // before; `should_send`, next, sees it.
                self.shared.pressure.swap(false, Ordering::AcqRel);
            }
            Inbound::Stop { deadline } => {
                self.arrivals_disturbed = true;
                self.stop_deadline = Some(self.stop_deadline.map_or(deadline, |d| d.min(deadline)));
            }
            Inbound::MapRefreshed { loaded, generation } => {
                self.saw_generation(generation);
                // A parked aggregate waits for a map that knows the shard it landed on; a reload
                // that raced the reshard may not yet, so it gets a few more before the records
                // are re-sent. Failed reloads count too (they retry on their own, further and
                // further apart), so that a ListShards that keeps failing does not hold the
                // records, and a `flush` waiting for them, for ever.
                let routing = self.shared.routing();
                let mut wait_more = false;
                for (outgoing, actual, reloads) in std::mem::take(&mut self.parked) {
                    let known = loaded && routing.has_shard(&actual);
                    if known || reloads + 1 >= PARKED_RELOADS {
                        self.settle_misplaced(outgoing, actual, false);
                    } else {
                        self.parked.push((outgoing, actual, reloads + 1));
                        wait_more = true;
                    }
                }
                if wait_more && loaded {
                    self.shared.request_refresh();
                }
                if loaded && self.order_routing.is_none() {
                    self.resplit_closed_lanes();
                }
            }
        }
    }

    /// The lane at `ordinal`, if it exists.
    fn lane(&mut self, ordinal: ShardOrdinal) -> Option<&mut Lane> {
        lane_at(&mut self.lanes, ordinal)
    }

    /// Queues a Kinesis record in its shard's lane (a retry at the front). A record for a shard
    /// the current map no longer has is re-split under the new map instead: it was never
    /// written, so this loses and duplicates nothing. (In order mode it joins its closed
    /// shard's lane, which re-splits it in turn: `drain_closed_lanes`.)
    fn enqueue(&mut self, outgoing: Outgoing, front: bool) {
        if let Some(order_routing) = &self.order_routing {
            if self.shared.routing_generation.load(Ordering::Acquire) != order_routing.generation {
                self.mark_closed_lanes();
            }
        } else if let Some(shard) = &outgoing.shard_id {
            // Routed by the current map: its shard is open. (A map installed after this check
            // re-splits the lanes it closed when its reload is announced.)
            let current = self.shared.routing_generation.load(Ordering::Acquire);
            if outgoing.generation != current && !self.shared.routing.load().has_shard(shard) {
                self.resplit(outgoing);
                return;
            }
        }
        let key = outgoing.ordinal;
        let (limit, now) = (self.shared.config.rate_limit, Instant::now());
        let routed = outgoing.shard_id.is_some();
        let at = key as usize;
        if self.lanes.len() <= at {
            self.lanes.resize_with(at + 1, || None);
        }
        let (order_mode, created) = (self.order_routing.is_some(), self.lanes[at].is_none());
        let lane = self.lanes[at].get_or_insert_with(|| {
            Box::new(Lane {
                shard_id: outgoing.shard_id.clone(),
                queue: VecDeque::new(),
                limiter: (limit > 0 && routed).then(|| Limiter::new(limit, now)),
                outstanding: 0,
                listed: false,
                bytes: 0,
                waiting: false,
                not_before: None,
                limited_since: None,
                front_key: None,
                order: order_mode.then(Box::default),
            })
        });
        let size = outgoing.request_size();
        if !front && !lane.waiting {
            self.arrived_count += 1;
            self.arrived_bytes += size;
        }
        self.pending_count += 1;
        self.pending_bytes += size;
        lane.bytes += size;
        if front {
            lane.queue.push_front(outgoing);
        } else {
            lane.queue.push_back(outgoing);
        }
        if lane.waiting {
            // Listed again when its time comes (`wake_lanes`).
            self.blocked_count += 1;
            self.blocked_bytes += size;
        } else if !lane.listed && !lane.order_blocks() {
            lane.listed = true;
            self.ready.push_back(key);
        }
        refresh_front(lane, &mut self.lane_fronts);
        if order_mode && created {
            self.adopt_lane(key);
        }
    }

    /// Order mode: a `MapRefreshed` message showed routing `generation`.
    fn saw_generation(&mut self, generation: u64) {
        if self.order_routing.is_none() || generation <= self.channel_generation {
            return;
        }
        self.channel_generation = generation;
        // Closed lanes waiting for the channel to catch up may drain now.
        self.drain_wanted |= !self.closed_lanes.is_empty();
        // A map reload is news even when no record follows it.
        let current = self.shared.routing_generation.load(Ordering::Acquire);
        if self
            .order_routing
            .as_ref()
            .is_some_and(|r| r.generation != current)
        {
            self.mark_closed_lanes();
        }
    }

    /// Order mode: a new lane learns its shard's range and is held by the closed lanes of
    /// older shards it overlaps; a lane for a shard the map has closed is closed at once.
    ///
    /// A shard's ordinal says its age: a map names a parent before any of its children, so the
    /// parent's ordinal is the smaller (see `ShardOrdinals`). Of two overlapping lanes, a closed
    /// one holds the other when its shard is the older; an open lane's shard is in the current
    /// map, so every closed lane overlapping it is an ancestor.
    fn adopt_lane(&mut self, key: ShardOrdinal) {
        let range = match key {
            // Its records may have any key.
            NO_SHARD => Some((0, u128::MAX)),
            _ => lock(&self.shared.shard_ordinals).range(key),
        };
        let mut holders = self.closed_overlapping(range);
        if key != NO_SHARD {
            holders.retain(|&closed| closed < key);
        }
        for &closed in &holders {
            if let Some(order) = self.lane(closed).and_then(|l| l.order.as_mut()) {
                order.holds.push(key);
            }
        }
        let routing = self.order_routing.clone();
        let Some(lane) = lane_at(&mut self.lanes, key) else {
            return;
        };
        if let Some(order) = &mut lane.order {
            order.range = range;
            order.held += holders.len() as u32;
        }
        let closed = lane.shard_id.as_ref().is_some_and(|id| {
            routing
                .as_ref()
                .is_some_and(|routing| !routing.has_shard(id))
        });
        if closed {
            self.close_lanes(vec![key]);
        }
    }

    /// Order mode: the closed lanes whose ranges overlap `range`, oldest first.
    fn closed_overlapping(&mut self, range: Option<(u128, u128)>) -> Vec<ShardOrdinal> {
        let Some((start, end)) = range else {
            return Vec::new();
        };
        if self.closed_lanes.is_empty() {
            return Vec::new();
        }
        let lanes = &self.lanes;
        let closed_range = |key: ShardOrdinal| lanes.get(key as usize)?.as_deref()?.range();
        let closed_lanes = &self.closed_lanes;
        let index = self.closed_index.get_or_insert_with(|| {
            RangeIndex::new(
                closed_lanes
                    .iter()
                    .filter_map(|&key| closed_range(key).map(|(s, e)| (s, e, key)))
                    .collect(),
            )
        });
        let mut found = Vec::new();
        index.overlapping(start, end, |key| found.push(key));
        found.sort_unstable();
        found
    }

    /// Order mode: the map changed; the lanes of shards it no longer has are closed.
    fn mark_closed_lanes(&mut self) {
        let routing = self.shared.routing();
        let closed: Vec<ShardOrdinal> = (0..self.lanes.len())
            .filter_map(|at| {
                let lane = self.lanes[at].as_deref()?;
                let shard_id = lane.shard_id.as_ref()?;
                let closes = lane.closed_under().is_none() && !routing.has_shard(shard_id);
                closes.then_some(at as ShardOrdinal)
            })
            .collect();
        self.order_routing = Some(routing);
        self.close_lanes(closed);
    }

    /// Order mode: closes the lanes at `keys`. Each stops sending and holds the lanes of
    /// younger shards its range overlaps (the open shards of the map that took over its keys,
    /// and any of their line already closed) until its records have gone to them; and the lane
    /// of records no shard covered, as their keys may be its.
    fn close_lanes(&mut self, keys: Vec<ShardOrdinal>) {
        let Some(routing) = self.order_routing.clone() else {
            return;
        };
        if keys.is_empty() {
            return;
        }
        for &key in &keys {
            if let Some(order) = self.lane(key).and_then(|l| l.order.as_mut()) {
                order.closed_under = Some(routing.generation);
            }
            self.closed_lanes.push(key);
        }
        self.closed_index = None;
        for key in keys {
            let mut holds = Vec::new();
            if let Some((start, end)) = self.lane_ref(key).and_then(Lane::range) {
                // The map's shards are sorted and do not overlap.
                let shards = routing.map.shards();
                let first = shards.partition_point(|shard| shard.end < start);
                let overlapping = shards[first..]
                    .iter()
                    .take_while(|s| s.start <= end)
                    .count();
                holds.extend((first..first + overlapping).map(|index| routing.shard(index).1));
                let younger = self.closed_overlapping(Some((start, end)));
                holds.extend(younger.into_iter().filter(|&closed| closed > key));
                holds.push(NO_SHARD);
            }
            holds.retain(|&at| at != key && self.lane_ref(at).is_some());
            for &held in &holds {
                if let Some(order) = self.lane(held).and_then(|l| l.order.as_mut()) {
                    order.held += 1;
                }
            }
            if let Some(order) = self.lane(key).and_then(|l| l.order.as_mut()) {
                order.holds = holds;
            }
            tracing::debug!(lane = key, "order mode: a lane's shard closed");
        }
        self.drain_wanted = true;
    }

    /// Order mode: notes whether the lane of records no shard covered holds any; when it has
    /// just emptied, the lanes it held back may send (and it says so).
    fn watch_uncovered(&mut self) -> bool {
        let waiting = self.uncovered_has_records();
        let emptied = self.uncovered_waiting && !waiting;
        if emptied {
            for at in 1..self.lanes.len() {
                if let Some(lane) = self.lanes[at].as_deref_mut() {
                    list_if_free(lane, at as ShardOrdinal, &mut self.ready);
                }
            }
        }
        self.uncovered_waiting = waiting;
        emptied
    }

    /// Whether the lane of records no open shard covered has any queued or out.
    fn uncovered_has_records(&self) -> bool {
        self.lane_ref(NO_SHARD)
            .is_some_and(|lane| lane.outstanding > 0 || !lane.queue.is_empty())
    }

    /// Order mode: re-splits each closed lane whose records may go now — none outstanding,
    /// no older closed lane holding it, and no more records for it to come through the channel
    /// — into the lanes that took over their keys, at their front, and lets those lanes send.
    /// Lanes ready together never overlap (of two that do, the older holds the younger), so
    /// each pass drains all that are ready; a pass that frees others is followed by another.
    fn drain_closed_lanes(&mut self) {
        self.drain_wanted = false;
        loop {
            let (lanes, channel) = (&self.lanes, self.channel_generation);
            let mut ready = Vec::new();
            self.closed_lanes.retain(|&key| {
                let lane = lanes.get(key as usize).and_then(|l| l.as_deref());
                let drains = lane.is_none_or(|lane| {
                    let order = lane.order.as_deref();
                    lane.outstanding == 0
                        && order.is_some_and(|o| o.held == 0 && o.closed_under <= Some(channel))
                });
                if drains {
                    ready.push(key);
                }
                !drains
            });
            if ready.is_empty() {
                return;
            }
            self.closed_index = None;
            for key in ready {
                self.drain_lane(key);
            }
        }
    }

    /// Order mode: takes a closed lane out and re-splits its records (`drain_closed_lanes`).
    fn drain_lane(&mut self, key: ShardOrdinal) {
        let Some(lane) = self.take_lane_out(key) else {
            return;
        };
        for &held in lane.order.iter().flat_map(|order| &order.holds) {
            let Some(lane) = lane_at(&mut self.lanes, held) else {
                continue;
            };
            if let Some(order) = &mut lane.order {
                order.held = order.held.saturating_sub(1);
            }
            list_if_free(lane, held, &mut self.ready);
        }
        let (range, not_before) = (lane.range(), lane.not_before);
        let not_before = not_before.filter(|at| *at > Instant::now());
        self.resplit_in_order(lane.queue, range, not_before);
    }

    /// Order mode: the records of a drained closed lane (whose range was `range`), in order, to
    /// the front of the lanes that now own their keys: the oldest closed lane that covers a key
    /// (a younger shard of the same line, itself still waiting), or else the open shard the map
    /// gives it. A retry's backoff (`not_before`) carries over to them.
    fn resplit_in_order(
        &mut self,
        queue: VecDeque<Outgoing>,
        range: Option<(u128, u128)>,
        not_before: Option<Instant>,
    ) {
        let routing = match &self.order_routing {
            Some(routing) => Arc::clone(routing),
            None => self.shared.routing(),
        };
        // The closed lanes that may take some of these records, oldest first: few (a younger
        // shard of the same line), looked up once rather than for every record.
        let later: Vec<(ShardOrdinal, (u128, u128))> = self
            .closed_overlapping(range)
            .into_iter()
            .filter_map(|closed| Some((closed, self.lane_ref(closed)?.range()?)))
            .collect();
        // Few: the shards that took over one shard's keys.
        let mut targets: Vec<(RoutedTo, Vec<(UserRecord, RecordMeta)>)> = Vec::new();
        for mut outgoing in queue {
            // Its records keep the attempts that carried them so far, and their last error.
            for meta in &mut outgoing.metas {
                meta.carry_over(outgoing.attempts, outgoing.last_error.as_ref());
            }
            let records = outgoing.take_user_records();
            for (record, meta) in records.into_iter().zip(outgoing.metas) {
                let hash_key = record.hash_key();
                let closed = later
                    .iter()
                    .find(|(_, (start, end))| (*start..=*end).contains(&hash_key))
                    .map(|(closed, _)| *closed);
                let shard = match closed {
                    Some(closed) => (
                        self.lane_ref(closed).and_then(|l| l.shard_id.clone()),
                        closed,
                    ),
                    None => match routing.map.shard_index(hash_key) {
                        Some(index) => routing.shard(index),
                        None => (None, NO_SHARD),
                    },
                };
                match targets
                    .iter_mut()
                    .find(|((_, ordinal), _)| *ordinal == shard.1)
                {
                    Some((_, records)) => records.push((record, meta)),
                    None => targets.push((shard, vec![(record, meta)])),
                }
            }
        }
        for (shard, records) in targets {
            let key = shard.1;
            let packed = aggregator::pack(&self.shared, records, shard, routing.generation);
            for outgoing in packed.into_iter().rev() {
                self.enqueue(outgoing, true);
            }
            if let (Some(at), Some(lane)) = (not_before, self.lane(key)) {
                lane.not_before = Some(lane.not_before.map_or(at, |t| t.max(at)));
            }
        }
    }

    /// Sets how long before its records' buffering deadline an aggregate closes
    /// (`Shared::close_lead`): twice the time a request takes to fill (to
    /// `collection_max_count` records or `collection_max_size` bytes) at the rate fresh Kinesis
    /// records arrived over the last period, within a twentieth (2 ms at least) and a half of
    /// `record_max_buffered_time` and never more than 50 ms short of half, averaged with the
    /// lead before. Busy, with thousands of shards, a request fills in a few milliseconds:
    /// aggregates then stay open for up to 95% of the default 100 ms, not half, and hold more
    /// records (fewer Kinesis records). At low rates it stays at half, so that the aggregates
    /// of many shards still share requests.
    fn update_close_lead(&mut self, now: Instant) {
        let shared = &self.shared;
        if !self.arrivals_disturbed {
            let elapsed = now.saturating_duration_since(self.arrivals_since);
            let (count, bytes) = (self.arrived_count, self.arrived_bytes);
            let measured = close_lead(&shared.config, elapsed, count, bytes);
            // A lead more than two periods old stands for half the buffered time.
            let previous = shared.close_lead(crate::clock::Stamp::of(now));
            let lead = (previous + measured) / 2;
            shared
                .close_lead_nanos
                .store(lead.as_nanos() as u64, Ordering::Relaxed);
            let set_at = now.saturating_duration_since(shared.built_at);
            shared
                .close_lead_set_nanos
                .store(set_at.as_nanos() as u64, Ordering::Relaxed);
        }
        self.arrived_count = 0;
        self.arrived_bytes = 0;
        self.arrivals_since = now;
        self.arrivals_disturbed = false;
    }

    /// Routes a not-yet-written Kinesis record's user records again, under the current map.
    fn resplit(&mut self, mut outgoing: Outgoing) {
        // Its records keep the attempts that carried them so far (receipts, failure reports and
        // RetriesPerRecord count them all) and their last error (an expiry reports it).
        for meta in &mut outgoing.metas {
            meta.carry_over(outgoing.attempts, outgoing.last_error.as_ref());
        }
        let records = outgoing.take_user_records();
        aggregator::reroute(&self.shared, records, outgoing.metas);
        if self.stop_deadline.is_some() {
            // Stopping: the aggregators are not waited for, so send them out now.
            aggregator::flush_all(&self.shared);
        }
    }

    /// After a map reload: the records queued for shards that closed are re-split.
    fn resplit_closed_lanes(&mut self) {
        let routing = self.shared.routing();
        for at in 0..self.lanes.len() {
            let closed = self.lanes[at]
                .as_ref()
                .and_then(|lane| lane.shard_id.as_ref())
                .is_some_and(|id| !routing.has_shard(id));
            if !closed {
                continue;
            }
            let Some(lane) = self.take_lane_out(at as ShardOrdinal) else {
                continue;
            };
            for outgoing in lane.queue {
                self.resplit(outgoing);
            }
        }
    }

    /// Removes the lane at `key`, its records off the totals (pending, blocked, fronts), and
    /// hands it back with them.
    fn take_lane_out(&mut self, key: ShardOrdinal) -> Option<Box<Lane>> {
        let lane = self.lanes.get_mut(key as usize).and_then(Option::take)?;
        if lane.waiting {
            self.blocked_count -= lane.queue.len();
            self.blocked_bytes -= lane.bytes;
        }
        if let Some(front) = lane.front_key {
            multiset_remove(&mut self.lane_fronts, front);
        }
        for outgoing in &lane.queue {
            unqueue(&mut self.pending_count, &mut self.pending_bytes, outgoing);
        }
        Some(lane)
    }

    /// A record taken from its lane has ended or gone back to it: in order mode, the lane may
    /// send again.
    fn release(&mut self, outgoing: &Outgoing) {
        self.release_at(outgoing.ordinal, |_| {});
    }

    /// `release` of a record Kinesis acknowledged, with `f` applied to the lane's limiter (one
    /// lookup of the lane for both). In order mode, a lane it frees with records queued makes
    /// a request due at once ([`freed_with_records`](Sender::freed_with_records)); a lane freed
    /// by a failed attempt does not, as the retry it takes back waits out a backoff first.
    fn release_acknowledged(&mut self, outgoing: &Outgoing, f: impl FnOnce(&mut Limiter)) {
        self.release_at(outgoing.ordinal, f);
        if self.shared.config.preserve_order {
            self.freed_with_records |= self
                .lane_ref(outgoing.ordinal)
                .is_some_and(|lane| lane.listed && lane.outstanding == 0);
        }
    }

    fn release_at(&mut self, ordinal: ShardOrdinal, f: impl FnOnce(&mut Limiter)) {
        let Some(lane) = lane_at(&mut self.lanes, ordinal) else {
            return;
        };
        if let Some(limiter) = &mut lane.limiter {
            f(limiter);
        }
        lane.outstanding = lane.outstanding.saturating_sub(1);
        if lane.outstanding > 0 {
            return;
        }
        if lane.closed_under().is_some() {
            // Order mode: nothing of the closed lane is out any more; it may drain.
            self.drain_wanted = true;
        } else {
            list_if_free(lane, ordinal, &mut self.ready);
        }
    }

    /// Asks for the memory an answered Kinesis record's handling reads: its shard's name (for
    /// the comparison with where it landed), its lane, its records' metadata, and where its
    /// data and key begin (see [`Entry::prefetch_data`](crate::aggregation::Entry)).
    fn prefetch_answered(&self, outgoing: &Outgoing) {
        if let Some(shard_id) = &outgoing.shard_id {
            prefetch_slice(shard_id.as_bytes());
        }
        if let Some(lane) = self.lane_ref(outgoing.ordinal) {
            prefetch(lane as *const Lane, std::mem::size_of::<Lane>());
        }
        prefetch_slice(&outgoing.metas);
        outgoing.entry.prefetch_data();
    }

    /// The lane of `outgoing`.
    fn lane_mut(&mut self, outgoing: &Outgoing) -> Option<&mut Lane> {
        self.lane(outgoing.ordinal)
    }

    /// Moves the deadlines put threads left ([`Shared::leave_deadline`]) into `deadlines`, and
    /// marks the sender awake.
    fn collect_deadlines(&mut self) {
        self.shared.left_deadlines.collect(&mut self.collected);
        for deadline in self.collected.drain(..) {
            self.deadlines.push(deadline);
        }
    }

    fn fire_deadlines(&mut self, now: Instant) {
        while let Some((at, aggregate)) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            self.due.push(aggregate);
        }
        self.flush_due();
    }

    /// Flushes the aggregates of the deadlines in `due` that are still open, and says how many
    /// there were. They come back through the inbound channel, in order with the rest.
    fn flush_due(&mut self) -> usize {
        let flushed = aggregator::flush_expired(&self.shared, &self.due);
        self.due.clear();
        flushed
    }

    /// A put found the backlog full. When open aggregates hold at least half of it (the
    /// records the producer keeps only to gather them with others), the open aggregates among
    /// the oldest quarter of the pending deadlines close now: once puts wait for room no new
    /// record can join them, and holding them longer would only keep the caller waiting. (The
    /// queue also holds the deadlines of aggregates that already closed, full or flushed, until
    /// they fire; when a quarter closes nothing, the next quarter goes, so a relief closes from
    /// one aggregate to about a quarter of them.) When the sender holds most of it (lanes,
    /// requests in flight, retries waiting out a backoff, records held by a limiter or by order
    /// mode, parked or isolated), Kinesis or the endpoint is what limits the rate, and closing
    /// aggregates early would only make more, smaller Kinesis records: nothing closes then.
    /// "Open aggregates" is what the backlog holds beyond that, so it also counts records on
    /// their way in (in the inbound channel, or between taking room and reaching their
    /// aggregator): an estimate that errs towards closing.
    ///
    /// The walk over what the sender holds is skipped when requests in flight alone hold half
    /// the backlog; and a relief asked for within 20 times the last walk's own time after it
    /// (1 ms at least) waits until then (`relief_wanted_at`): a stream where every answer frees
    /// room for one waiting put sends a `Pressure` per answer, and the walks must not take more
    /// than a twentieth of the sender's time.
    ///
    /// A `Relieved` message follows the closed aggregates through the inbound channel; it lets
    /// the lanes send them, and lets the next put that finds the backlog full ask again.
    fn relieve(&mut self) {
        // Deadlines left while the sender slept (those after its wake-up did not wake it).
        self.collect_deadlines();
        let held = self.shared.backlog.bytes_held();
        let now = Instant::now();
        let mut closed = 0;
        if held > 0 && self.in_flight_backlog_bytes * 2 < held {
            if let Some((at, took)) = self.last_relief_walk {
                let next = at + RELIEF_WALK_GAP.max(took * 20);
                if now < next {
                    // Answered then; the put's flag stays set, so nothing asks again meanwhile.
                    self.relief_wanted_at = Some(next);
                    return;
                }
            }
            let in_aggregators = held.saturating_sub(self.held_backlog_bytes());
            self.last_relief_walk = Some((now, now.elapsed()));
            if in_aggregators * 2 >= held {
                while closed == 0 && !self.deadlines.is_empty() {
                    for _ in 0..self.deadlines.len().div_ceil(RELIEF_SHARE) {
                        if let Some((_, aggregate)) = self.deadlines.pop() {
                            self.due.push(aggregate);
                        }
                    }
                    closed = self.flush_due();
                }
            }
        }
        add(&self.shared.stats.reliefs, u64::from(closed > 0));
        self.shared.send(Inbound::Relieved { early: closed > 0 });
    }

    /// Backlog bytes of the records the sender holds: queued in lanes, in requests in flight,
    /// waiting out a backoff, parked or being isolated. Walked for a relief only.
    fn held_backlog_bytes(&self) -> usize {
        let of = |outgoing: &Outgoing| outgoing.backlog_bytes;
        let queued: usize = self
            .lanes
            .iter()
            .flatten()
            .flat_map(|l| &l.queue)
            .map(of)
            .sum();
        let retries: usize = self.retries.iter().map(|Reverse(r)| of(&r.outgoing)).sum();
        let parked: usize = self.parked.iter().map(|(o, ..)| of(o)).sum();
        let isolating: usize = self.isolating.iter().flatten().map(of).sum();
        self.in_flight_backlog_bytes + queued + retries + parked + isolating
    }

    fn release_retries(&mut self, now: Instant) {
        while self.retries.peek().is_some_and(|Reverse(r)| r.at <= now) {
            if let Some(Reverse(retry)) = self.retries.pop() {
                self.enqueue(retry.outgoing, true);
            }
        }
    }

    fn wake_lanes(&mut self, now: Instant) {
        while self
            .waking
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
        {
            if let Some(Reverse((_, key))) = self.waking.pop() {
                if let Some(lane) = lane_at(&mut self.lanes, key) {
                    if lane.waiting {
                        lane.waiting = false;
                        self.blocked_count -= lane.queue.len();
                        self.blocked_bytes -= lane.bytes;
                        refresh_front(lane, &mut self.lane_fronts);
                    }
                    if !lane.listed && !lane.queue.is_empty() {
                        lane.listed = true;
                        self.ready.push_back(key);
                    }
                }
            }
        }
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(3600);
        wake = wake.min(self.next_refresh);
        if let Some((at, ..)) = self.deadlines.peek() {
            wake = wake.min(at);
        }
        if let Some(Reverse(retry)) = self.retries.peek() {
            wake = wake.min(retry.at);
        }
        if let Some(Reverse((at, _))) = self.waking.peek() {
            wake = wake.min(*at);
        }
        if let Some(at) = self.relief_wanted_at {
            wake = wake.min(at);
        }
        if let Some(&oldest) = self.lane_fronts.keys().next() {
            if self.may_send_more()
                && self.partial_in_flight < MAX_PARTIAL_IN_FLIGHT
                && !self.ready.is_empty()
            {
                wake = wake.min(oldest + self.shared.config.record_max_buffered_time);
            }
            // A front no request takes by its TTL: `expire_overdue`.
            let ttl_passes = oldest + self.shared.config.record_ttl;
            wake = wake.min(ttl_passes.max(self.overdue_walk_at));
        }
        if let Some(deadline) = self.stop_deadline.filter(|d| *d > now) {
            wake = wake.min(deadline);
        }
        wake
    }

    fn should_send(&self, now: Instant) -> bool {
        let config = &self.shared.config;
        let Some(&oldest) = self.lane_fronts.keys().next() else {
            return false;
        };
        // Only records that a request could take now count towards a full one: a hot shard's
        // queue waiting for its limiter must not make the other shards' records leave in tiny
        // requests.
        let full = self.pending_count.saturating_sub(self.blocked_count)
            >= config.collection_max_count
            || self.pending_bytes.saturating_sub(self.blocked_bytes) >= config.collection_max_size;
        // A request that is not full goes out on its deadline only while fewer than
        // MAX_PARTIAL_IN_FLIGHT such requests are in flight: under load, records keep gathering
        // behind them into fuller requests instead of leaving a few at a time (each request
        // costs a signature and a round trip). At low rates nothing is in flight and the
        // deadline holds. While a put waits for room in the backlog, records are due at once:
        // holding them longer would not fill the request, only keep the caller waiting.
        // So are they after a relief closed aggregates for a `try_put` that was refused.
        let due = (oldest + config.record_max_buffered_time <= now
            || self.shared.backlog.has_waiters()
            || self.relief_requested)
            && self.partial_in_flight < MAX_PARTIAL_IN_FLIGHT;
        // Order mode: lanes an acknowledgement freed go at once, with whatever else may go (not
        // capped by MAX_PARTIAL_IN_FLIGHT: each answer starts at most one such request, so
        // they cannot pile up beyond the requests that were already out).
        let due = due || self.freed_with_records;
        !self.ready.is_empty()
            && (full || due || self.flush_requested || self.stop_deadline.is_some())
    }

    fn dispatch(&mut self, now: Instant) {
        if self.drain_wanted {
            self.drain_closed_lanes();
        }
        if self.order_routing.is_some() {
            self.watch_uncovered();
        }
        self.send_what_may_go(now);
        // Order mode: the lane of records no shard covered may have emptied on the way (its
        // records expired); the lanes it held back must not wait for the next wake-up.
        if self.order_routing.is_some() && self.watch_uncovered() {
            self.send_what_may_go(now);
        }
        self.expire_overdue(now);
        // The flush is served once nothing left can go now: what waits for a limiter, a retry's
        // backoff or (in order mode) an outstanding record goes when it may, and the flush's
        // wait covers it. Left set, it would send every record arriving later at once, alone.
        if self.pending_count == 0 || (self.ready.is_empty() && self.may_send_more()) {
            self.flush_requested = false;
            self.relief_requested = false;
        }
    }

    /// Fails the records queued past their TTL that no request took: every request slot is
    /// held (by requests that get no answer, until their `request_timeout`), or the cap on
    /// partial requests is reached. Otherwise they would be found only when a request next
    /// takes from their lane. The walk visits every lane, so it runs at most every
    /// [`OVERDUE_WALK_GAP`]. Lanes are skipped where `take_from_lane` would not expire their
    /// records either: one waiting for its limiter (it wakes at its front's TTL itself) and,
    /// in order mode, one whose record is out or that waits for another shard's records.
    fn expire_overdue(&mut self, now: Instant) {
        let ttl = self.shared.config.record_ttl;
        let overdue = |front: Instant| front + ttl <= now;
        if !self.lane_fronts.keys().next().copied().is_some_and(overdue)
            || now < self.overdue_walk_at
        {
            return;
        }
        self.overdue_walk_at = now + OVERDUE_WALK_GAP;
        let order = self.shared.config.preserve_order;
        let mut expired = Vec::new();
        for (at, lane) in self.lanes.iter_mut().enumerate() {
            let Some(lane) = lane.as_deref_mut() else {
                continue;
            };
            let held = order
                && (at as ShardOrdinal == NO_SHARD || lane.outstanding > 0 || lane.order_blocks());
            if lane.waiting || held || !lane.front_key.is_some_and(overdue) {
                continue;
            }
            while lane.queue.front().is_some_and(|f| overdue(f.oldest_put)) {
                let totals = (&mut self.pending_count, &mut self.pending_bytes);
                expired.extend(dequeue_front(lane, totals));
            }
            refresh_front(lane, &mut self.lane_fronts);
        }
        for outgoing in expired {
            self.expire(outgoing);
        }
    }

    /// Sends the halves being isolated, then requests while there is something due.
    fn send_what_may_go(&mut self, now: Instant) {
        while self.may_send_more() {
            let Some(batch) = self.isolating.pop_front() else {
                break;
            };
            let mut live = Vec::with_capacity(batch.len());
            for outgoing in batch {
                if now >= outgoing.oldest_put + self.shared.config.record_ttl {
                    self.release(&outgoing);
                    self.expire(outgoing);
                } else {
                    live.push(outgoing);
                }
            }
            if !live.is_empty() {
                self.spawn_request(live, false);
            }
        }
        while self.may_send_more() && self.should_send(now) {
            let (batch, full) = self.take_batch(now);
            if batch.is_empty() {
                break;
            }
            self.spawn_request(batch, !full);
        }
        // Kept while freed lanes still wait in the turn (for room in flight).
        if self.ready.is_empty() {
            self.freed_with_records = false;
        }
    }

    /// Takes the next request's worth of records from the lanes that may send, in turn, failing
    /// those whose TTL has passed.
    fn take_batch(&mut self, now: Instant) -> (Vec<Outgoing>, bool) {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut full = false;
        let mut again = Vec::new();
        while !full {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            // The lanes a few turns on, and the first record of a nearer one, are asked for
            // while this lane gives its records.
            let lane_ahead = |at: usize| self.lane_ref(*self.ready.get(at)?);
            if let Some(lane) = lane_ahead(2 * LANE_PREFETCH_AHEAD - 1) {
                prefetch(lane as *const Lane, std::mem::size_of::<Lane>());
            }
            if let Some(front) = lane_ahead(LANE_PREFETCH_AHEAD - 1).and_then(|l| l.queue.front()) {
                prefetch(front as *const Outgoing, std::mem::size_of::<Outgoing>());
            }
            match self.take_from_lane(key, now, &mut batch, &mut bytes) {
                Blocked::No => {
                    if let Some(lane) = self.lane(key) {
                        lane.listed = false;
                    }
                }
                Blocked::RequestFull => {
                    full = true;
                    again.push(key);
                }
                Blocked::Until(at) => {
                    if let Some(lane) = lane_at(&mut self.lanes, key) {
                        lane.listed = false;
                        if !lane.waiting {
                            lane.waiting = true;
                            self.blocked_count += lane.queue.len();
                            self.blocked_bytes += lane.bytes;
                            refresh_front(lane, &mut self.lane_fronts);
                        }
                    }
                    self.waking.push(Reverse((at, key)));
                }
            }
        }
        // A lane cut short by a full request goes to the back of the turn: a shard that always
        // has a request's worth waiting must not keep the others from ever sending.
        self.ready.extend(again);
        (batch, full)
    }

    fn take_from_lane(
        &mut self,
        key: ShardOrdinal,
        now: Instant,
        batch: &mut Vec<Outgoing>,
        bytes: &mut usize,
    ) -> Blocked {
        let config = &self.shared.config;
        if config.preserve_order && key != NO_SHARD && self.uncovered_has_records() {
            // Records no shard covered go first (`uncovered_waiting`).
            self.uncovered_waiting = true;
            return Blocked::No;
        }
        let Some(lane) = lane_at(&mut self.lanes, key) else {
            return Blocked::No;
        };
        if config.preserve_order && key != NO_SHARD && lane.outstanding == 0 && !lane.order_blocks()
        {
            let joined = join_front(&self.shared, lane, now);
            if joined.taken > 0 {
                self.pending_count = self.pending_count - joined.taken + joined.made;
                self.pending_bytes = self.pending_bytes - joined.taken_bytes + joined.made_bytes;
                add(
                    &self.shared.stats.kinesis_records_joined,
                    joined.taken as u64,
                );
            }
        }
        let mut taken = 0;
        let mut expired = Vec::new();
        let mut limiter_wait = None;
        let blocked = loop {
            if config.preserve_order && (lane.outstanding > 0 || taken > 0 || lane.order_blocks()) {
                break Blocked::No;
            }
            if let Some(at) = lane.not_before.filter(|at| *at > now) {
                break Blocked::Until(at);
            }
            let Some(front) = lane.queue.front() else {
                break Blocked::No;
            };
            let size = front.request_size();
            if now >= front.oldest_put + config.record_ttl {
                let totals = (&mut self.pending_count, &mut self.pending_bytes);
                expired.extend(dequeue_front(lane, totals));
                continue;
            }
            if !joins_request(batch.len(), *bytes, size, config) {
                break Blocked::RequestFull;
            }
            if let Some(limiter) = &mut lane.limiter {
                if !limiter.try_take(size, now) {
                    lane.limited_since.get_or_insert(now);
                    // Not before a pacing interval: the tokens gather meanwhile, so the lane
                    // sends a batch at its rate instead of one record per request as soon as
                    // one fits.
                    let ready = limiter.ready_at(size, now).max(now + LIMITED_LANE_PACE);
                    // Nor after the front record's TTL: it expires then, not when the limiter
                    // would have let it go (a large record can leave the bucket seconds in debt).
                    break Blocked::Until(ready.min(front.oldest_put + config.record_ttl));
                }
            }
            if let Some(since) = lane.limited_since.take() {
                limiter_wait = Some((now.saturating_duration_since(since), lane.shard_id.clone()));
            }
            let totals = (&mut self.pending_count, &mut self.pending_bytes);
            let Some(outgoing) = dequeue_front(lane, totals) else {
                break Blocked::No;
            };
            lane.not_before = None;
            lane.outstanding += 1;
            taken += 1;
            *bytes += size;
            batch.push(outgoing);
        };
        refresh_front(lane, &mut self.lane_fronts);
        for outgoing in expired {
            self.expire(outgoing);
        }
        if let Some((waited, shard_id)) = limiter_wait.filter(|_| self.shared.metrics_on) {
            let shard = shard_id.as_ref().map(|id| ShardRef { id, ordinal: key });
            lock(&self.shared.metrics).add(MetricName::LimiterWaitTime, millis(waited), shard);
        }
        blocked
    }

    /// Whether another request may go out: fewer than `max_in_flight` are out, and their bytes
    /// are under a quarter of the backlog (so they end at most one request past it; one request
    /// may always be out).
    fn may_send_more(&self) -> bool {
        self.in_flight < self.shared.config.max_in_flight
            && (self.in_flight == 0
                || self.in_flight_bytes < self.shared.config.max_backlog_bytes / 4)
    }

    fn spawn_request(&mut self, mut batch: Vec<Outgoing>, partial: bool) {
        let bytes: usize = batch.iter().map(Outgoing::request_size).sum();
        let backlog_bytes: usize = batch.iter().map(|o| o.backlog_bytes).sum();
        self.in_flight += 1;
        self.in_flight_bytes += bytes;
        self.in_flight_backlog_bytes += backlog_bytes;
        if partial {
            self.partial_in_flight += 1;
        }
        for outgoing in &mut batch {
            outgoing.attempts += 1;
        }
        let started = Instant::now();
        if self.shared.metrics_on {
            record_sent(&mut lock(&self.shared.metrics), &batch, started);
        }
        add(&self.shared.stats.requests, 1);
        let span = tracing::debug_span!(
            "put_records",
            kinesis_records = batch.len(),
            user_records = batch.iter().map(|o| o.len()).sum::<usize>(),
            attempt = batch.iter().map(|o| o.attempts).max().unwrap_or(1),
        );
        let mut cancelled = self.cancel.subscribe();
        let mut in_flight = InFlight {
            shared: Arc::clone(&self.shared),
            batch,
            results: self.results_tx.clone(),
            partial,
            started,
            bytes,
            backlog_bytes,
            _ending: self.ending.clone(),
        };
        tokio::spawn(async move {
            let shared = Arc::clone(&in_flight.shared);
            let timeout = shared.config.request_timeout;
            // The body is written first (a large aggregate is checksummed and encoded on the
            // way): `request_timeout` bounds the wait for the server, not this work, which on a
            // loaded machine (or in a debug build) could otherwise use up the timeout of a
            // request the server then writes, and its retry would write the records twice.
            let entries = in_flight.batch.iter().map(|outgoing| &outgoing.entry);
            let body = request_body::put_records(&shared.bodies, &shared.stream, entries);
            let outcome = tokio::select! {
                result = tokio::time::timeout(timeout, put_records(&shared, body)) => match result {
                    Ok(Ok(output)) => Outcome::Answered(output),
                    Ok(Err(error)) => Outcome::Failed(error),
                    Err(_) => Outcome::Failed(AttemptError {
                        code: "Timeout".to_owned(),
                        message: format!("no answer within the request timeout of {timeout:?}"),
                        transient: true,
                    }),
                },
                _ = cancelled.wait_for(|cancelled| *cancelled) => Outcome::Cancelled,
            };
            in_flight.hand_back(outcome);
        }.instrument(span));
    }

    fn complete(&mut self, completed: Completed) {
        self.in_flight -= 1;
        let Completed {
            mut batch,
            partial,
            started,
            bytes,
            backlog_bytes,
            outcome,
        } = completed;
        self.in_flight_bytes -= bytes;
        self.in_flight_backlog_bytes -= backlog_bytes;
        if partial {
            self.partial_in_flight -= 1;
        }
        let ended = Instant::now();
        for outgoing in &mut batch {
            outgoing.last_attempt_end = Some(ended);
        }
        if self.shared.metrics_on {
            record_answered(
                &mut lock(&self.shared.metrics),
                &batch,
                &outcome,
                ended - started,
            );
        }
        match outcome {
            Outcome::Answered(output) if output.records().len() == batch.len() => {
                tracing::trace!(
                    kinesis_records = batch.len(),
                    failed = output.failed_record_count().unwrap_or(0),
                    "PutRecords answered"
                );
                let mut stale_map = false;
                let mut returns = Returns::default();
                let mut batch = batch.into_iter();
                for ahead in batch.as_slice().iter().take(ANSWER_PREFETCH_AHEAD) {
                    self.prefetch_answered(ahead);
                }
                for result in output.records() {
                    // As many records as results (the guard above): never short.
                    let Some(mut outgoing) = batch.next() else {
                        break;
                    };
                    // The memory of a record a few places on is asked for while this one is
                    // handled.
                    if let Some(ahead) = batch.as_slice().get(ANSWER_PREFETCH_AHEAD - 1) {
                        self.prefetch_answered(ahead);
                    }
                    match result.error_code() {
                        None => {
                            let actual = result.shard_id().unwrap_or_default();
                            let misplaced = outgoing
                                .shard_id
                                .as_deref()
                                .is_some_and(|expected| !actual.is_empty() && expected != actual);
                            let on_routed_shard =
                                !misplaced && !actual.is_empty() && outgoing.shard_id.is_some();
                            // The map's own name for the shard when the record is where it was
                            // routed (nearly always): no new string per Kinesis record.
                            let (landed_on, ordinal) = match &outgoing.shard_id {
                                Some(expected) if on_routed_shard => {
                                    (Arc::clone(expected), outgoing.ordinal)
                                }
                                _ => {
                                    let id = Arc::from(actual);
                                    // Only the metrics read a landed shard's ordinal.
                                    let ordinal = if self.shared.metrics_on {
                                        self.shared.shard_ordinal(&id)
                                    } else {
                                        NO_SHARD
                                    };
                                    (id, ordinal)
                                }
                            };
                            // The answer's metrics count by the routed shard (as the KPL's do):
                            // recorded with the acknowledgement when that is where it landed.
                            let answered =
                                self.shared.metrics_on.then(|| answered_samples(&outgoing));
                            if let Some(answered) = answered.filter(|_| !on_routed_shard) {
                                lock(&self.shared.metrics).record_all(&answered, outgoing.shard());
                            }
                            outgoing.landed = Some(Landed {
                                shard_id: landed_on,
                                ordinal,
                                sequence_number: Arc::from(
                                    result.sequence_number().unwrap_or_default(),
                                ),
                            });
                            // A record no shard of the map covered went out alone and landed
                            // where its own key belongs: on a shard the map lacks, unless a
                            // reload has found it since (a listing taken while the stream
                            // resharded). Rare: looked up only for such records.
                            let uncovered = outgoing.shard_id.is_none()
                                && !actual.is_empty()
                                && !self.shared.routing.load().has_shard(actual);
                            stale_map |= misplaced || uncovered;
                            if misplaced && outgoing.entry.aggregated {
                                self.with_limiter(&outgoing, |limiter| limiter.acknowledged(ended));
                                self.settle_misplaced(outgoing, Arc::from(actual), true);
                            } else {
                                // A plain record is wherever Kinesis routed its own key: fine.
                                self.release_acknowledged(&outgoing, |limiter| {
                                    limiter.acknowledged(ended)
                                });
                                let answered = answered.filter(|_| on_routed_shard);
                                self.shared
                                    .acknowledge_with(outgoing, answered, &mut returns);
                            }
                        }
                        Some(code) => {
                            if code == THROTTLED {
                                self.throttled(&outgoing, ended);
                            }
                            let error = AttemptError {
                                code: code.to_owned(),
                                message: result.error_message().unwrap_or_default().to_owned(),
                                transient: entry_error_is_transient(code),
                            };
                            self.retry_or_fail(outgoing, error);
                        }
                    }
                }
                self.shared.give_back(returns);
                if stale_map {
                    // A record landed on a shard other than the map predicted: the stream was
                    // resharded. Reload the map so later aggregates match the new shards.
                    self.shared.request_refresh();
                }
            }
            Outcome::Answered(output) => {
                let error = AttemptError {
                    code: "ResponseMismatch".to_owned(),
                    message: format!(
                        "PutRecords answered {} results for {} records",
                        output.records().len(),
                        batch.len()
                    ),
                    transient: true,
                };
                self.fail_request(batch, error);
            }
            Outcome::Failed(error) => self.fail_request(batch, error),
            Outcome::Cancelled => {
                for outgoing in batch {
                    self.release(&outgoing);
                    self.shared.fail(
                        outgoing,
                        DeliveryError::stopped(
                            "the stop deadline passed while the request was in flight; the records may have been written",
                        ),
                    );
                }
            }
        }
    }

    /// Kinesis throttled `outgoing` (alone or with its whole request): counted, and its shard's
    /// limiter slows down.
    fn throttled(&mut self, outgoing: &Outgoing, at: Instant) {
        add(&self.shared.stats.throttled_entries, 1);
        self.with_limiter(outgoing, |limiter| limiter.throttled(at));
    }

    fn with_limiter(&mut self, outgoing: &Outgoing, f: impl FnOnce(&mut Limiter)) {
        if let Some(limiter) = self.lane_mut(outgoing).and_then(|l| l.limiter.as_mut()) {
            f(limiter);
        }
    }

    /// An aggregate was written to `actual`, not the shard the map predicted (the stream was
    /// resharded). A KCL consumer throws away an aggregate holding any record outside its
    /// shard's range, so: if the current map shows `actual` owns every record, it is done;
    /// otherwise its records are routed again and re-sent (non-KCL consumers may then see them
    /// twice). If the map does not know `actual` yet, wait for the reload.
    fn settle_misplaced(&mut self, outgoing: Outgoing, actual: Arc<str>, may_wait: bool) {
        let routing = self.shared.routing();
        let owner = routing
            .map
            .shards()
            .iter()
            .find(|shard| shard.shard_id == actual);
        match owner {
            Some(shard)
                if outgoing
                    .hash_keys()
                    .iter()
                    .all(|key| (shard.start..=shard.end).contains(key)) =>
            {
                self.release(&outgoing);
                self.shared.acknowledge(outgoing);
            }
            None if may_wait => self.parked.push((outgoing, actual, 0)),
            _ => {
                // Kinesis did take this aggregate (its metrics counted it with the answer), even
                // though its records go out again.
                let stats = &self.shared.stats;
                add(&stats.kinesis_records_put, 1);
                add(&stats.kinesis_bytes_put, outgoing.request_size() as u64);
                add(&stats.records_resent_after_reshard, outgoing.len() as u64);
                if self.shared.metrics_on {
                    let shard = ShardRef {
                        id: &actual,
                        ordinal: self.shared.shard_ordinal(&actual),
                    };
                    lock(&self.shared.metrics).record(
                        MetricName::UserRecordsResentAfterReshard,
                        Statistics::repeated(1.0, outgoing.len() as u64),
                        Some(shard),
                    );
                }
                tracing::debug!(shard = %actual, records = outgoing.len(), "re-sending an aggregate written to a shard that does not own all its records");
                if self.order_routing.is_some() {
                    // Back to the front of its lane, whose shard has closed (or will be found
                    // closed): the lane re-splits it with the rest, ahead of anything newer.
                    let ordinal = outgoing.ordinal;
                    self.enqueue(outgoing, true);
                    self.release_at(ordinal, |_| {});
                } else {
                    self.release(&outgoing);
                    self.resplit(outgoing);
                }
            }
        }
    }

    fn fail_request(&mut self, mut batch: Vec<Outgoing>, error: AttemptError) {
        add(&self.shared.stats.request_errors, 1);
        tracing::debug!(code = %error.code, transient = error.transient, records = batch.len(), "PutRecords failed");
        if !error.transient && batch.len() > 1 && is_invalid_input(&error.code) {
            // Some servers refuse a whole request for one bad entry (an oversize record, a key
            // they count differently). Halve it until the bad entry is alone, so that one
            // record's fault never fails its neighbours.
            let second = batch.split_off(batch.len() / 2);
            self.isolating.push_back(batch);
            self.isolating.push_back(second);
            return;
        }
        let throttled = error.code == THROTTLED;
        let now = Instant::now();
        for outgoing in batch {
            if throttled {
                // The whole request refused for throughput: each shard in it slows down, and its
                // records back off exponentially, as nothing says which shard was over its limit.
                self.throttled(&outgoing, now);
            }
            self.retry_or_fail_with(outgoing, error.clone(), Backoff::Exponential);
        }
    }

    /// Decides the fate of a record back from a request (it leaves its lane's count here).
    fn retry_or_fail(&mut self, outgoing: Outgoing, error: AttemptError) {
        self.retry_or_fail_with(outgoing, error, Backoff::PacedIfThrottled);
    }

    fn retry_or_fail_with(
        &mut self,
        mut outgoing: Outgoing,
        error: AttemptError,
        backoff: Backoff,
    ) {
        self.release(&outgoing);
        if !error.transient {
            let failure = DeliveryError {
                code: error.code.into(),
                message: error.message.into(),
                kind: FailureKind::Permanent,
            };
            self.shared.fail(outgoing, failure);
            return;
        }
        // A throttled entry of a shard with a limiter: the limiter has just halved that shard's
        // allowance and paces it from here, so the entry waits one base backoff rather than an
        // exponential one that would leave it idle while its shard has room again.
        let paced = backoff == Backoff::PacedIfThrottled
            && error.code == THROTTLED
            && self
                .lane_mut(&outgoing)
                .is_some_and(|lane| lane.limiter.is_some());
        let attempts = if paced { 1 } else { outgoing.attempts };
        let at = Instant::now() + self.shared.config.retry.backoff(attempts);
        outgoing.last_error = Some(error);
        if at >= outgoing.oldest_put + self.shared.config.record_ttl {
            // It would expire while waiting: fail now with its last error.
            self.expire(outgoing);
            return;
        }
        add(&self.shared.stats.entry_retries, 1);
        if self.shared.config.preserve_order {
            // Back to the front of its lane, which sends nothing newer until it has gone (a
            // closed shard's lane re-splits it with the rest, ahead of anything newer: see
            // `drain_closed_lanes`).
            let key = outgoing.ordinal;
            self.enqueue(outgoing, true);
            if let Some(lane) = self.lane(key) {
                // On a closed lane it carries over to the lanes its records go to. (A lane's
                // front may hold a drained lane's records, whose backoff is kept if later.)
                lane.not_before = Some(lane.not_before.map_or(at, |t| t.max(at)));
            }
            return;
        }
        self.retry_seq += 1;
        self.retries.push(Reverse(Retry {
            at,
            seq: self.retry_seq,
            outgoing,
        }));
    }

    /// The TTL of `outgoing`'s records passed: each fails with the last error its attempts
    /// met, in this Kinesis record or, re-split after a reshard, in the ones before it.
    fn expire(&self, outgoing: Outgoing) {
        let expired = |code: &str, message: &str| DeliveryError {
            code: code.into(),
            message: message.into(),
            kind: FailureKind::Expired,
        };
        let Some(last) = &outgoing.last_error else {
            let error = expired("Expired", "the record's TTL passed before it could be sent");
            self.shared
                .fail_records(outgoing, error, |meta| match meta.earlier_error() {
                    Some(last) => Some(expired(&last.code, &last.message)),
                    None if meta.attempts(0) > 0 => Some(expired(
                        "Expired",
                        "the record's TTL passed before it could be sent again",
                    )),
                    None => None,
                });
            return;
        };
        let error = expired(&last.code, &last.message);
        self.shared.fail(outgoing, error);
    }

    /// The stop deadline passed: everything not yet in flight fails now, and requests in flight
    /// are told to give up.
    fn abandon_all(&mut self) {
        for outgoing in self.drain_lanes() {
            self.shared.fail(
                outgoing,
                DeliveryError::stopped("the stop deadline passed before the record was sent"),
            );
        }
        for Reverse(retry) in self.retries.drain() {
            self.shared.fail(
                retry.outgoing,
                DeliveryError::stopped(
                    "the stop deadline passed while the record waited to be retried",
                ),
            );
        }
        for outgoing in self.isolating.drain(..).flatten() {
            self.shared.fail(
                outgoing,
                DeliveryError::stopped("the stop deadline passed before the record was sent"),
            );
        }
        for (outgoing, shard, _) in self.parked.drain(..) {
            let message = format!("the stop deadline passed before the records could be re-sent; they were written to {shard}, which may not own all of them");
            self.shared.fail(outgoing, DeliveryError::stopped(&message));
        }
        self.cancel.send_replace(true);
    }

    /// Empties every lane (the stop deadline passed, or the task is ending).
    fn drain_lanes(&mut self) -> Vec<Outgoing> {
        self.ready.clear();
        self.pending_count = 0;
        self.pending_bytes = 0;
        self.blocked_count = 0;
        self.blocked_bytes = 0;
        self.lane_fronts.clear();
        self.lanes
            .iter_mut()
            .flatten()
            .flat_map(|lane| {
                lane.listed = false;
                lane.waiting = false;
                lane.bytes = 0;
                lane.front_key = None;
                lane.queue.drain(..)
            })
            .collect()
    }
}

impl Drop for Sender {
    /// Normally everything is done by now. If the task ends early (its runtime shut down, or a
    /// panic), the producer refuses new records from here, and whatever it still holds, in its
    /// aggregators too, is reported failed rather than lost.
    fn drop(&mut self) {
        let error =
            DeliveryError::stopped("the producer's sender task ended before the record was sent");
        // Closed first: the aggregates `close_intake` hands over then fail as they are sent.
        self.inbound.close();
        let left = self.shared.mailbox.close();
        self.shared.close_intake();
        for outgoing in self.drain_lanes() {
            self.shared.fail(outgoing, error.clone());
        }
        for Reverse(retry) in self.retries.drain() {
            self.shared.fail(retry.outgoing, error.clone());
        }
        for outgoing in self.isolating.drain(..).flatten() {
            self.shared.fail(outgoing, error.clone());
        }
        for (outgoing, ..) in self.parked.drain(..) {
            self.shared.fail(outgoing, error.clone());
        }
        for outgoing in self.mail.drain(..).chain(left) {
            self.shared.fail(outgoing, error.clone());
        }
        // Requests whose answers wait here: their tasks handed the records over, so they are
        // reported from here. Tasks still running find the channel closed and report theirs.
        self.results_rx.close();
        let unhandled = DeliveryError::stopped("the producer's sender task ended before it handled the request's answer; the records may have been written");
        while let Ok(completed) = self.results_rx.try_recv() {
            for outgoing in completed.batch {
                self.shared.fail(outgoing, unhandled.clone());
            }
        }
        // The producer ends now, or when the last request task still running has reported.
        self.ending.take();
    }
}

/// The lane at `ordinal` (a free function, so that callers can borrow the sender's other
/// fields while they hold it).
fn lane_at(lanes: &mut [Option<Box<Lane>>], ordinal: ShardOrdinal) -> Option<&mut Lane> {
    lanes.get_mut(ordinal as usize)?.as_deref_mut()
}

/// Puts a lane in the turn if it has records and nothing holds it back: none outstanding, no
/// wait until a time, no order-mode hold.
fn list_if_free(lane: &mut Lane, key: ShardOrdinal, ready: &mut VecDeque<ShardOrdinal>) {
    let free = lane.outstanding == 0 && !lane.waiting && !lane.order_blocks();
    if free && !lane.listed && !lane.queue.is_empty() {
        lane.listed = true;
        ready.push_back(key);
    }
}

/// What [`join_front`] did to a lane's queue.
#[derive(Default)]
struct Joined {
    /// Kinesis records taken from the front, and their request bytes ...
    taken: usize,
    taken_bytes: usize,
    /// ... and the ones made of their user records, put back in their place.
    made: usize,
    made_bytes: usize,
}

/// Order mode: joins the Kinesis records at the front of a shard's queue into as few
/// aggregates as the aggregate limits allow, before the front one leaves.
///
/// A shard sends one Kinesis record per round trip in order mode. Aggregates close at their
/// deadline, full or not, and more can close while the one before is out: sent one by one, a
/// shard then carries only what its aggregator gathered in one buffering period per round trip,
/// less and less as round trips grow (with 100 ms round trips, under a third of a shard's
/// 1 MiB/s). Joined, each round trip carries up to `aggregation_max_size`. The user records
/// keep their order. Only Kinesis records not yet sent are joined (a retry goes as it is), and
/// no more of them than it takes to fill one aggregate. A front three quarters full (usually
/// an aggregate closed because it was full) goes as it is; behind a front that is not, full
/// ones are joined too, so that the front leaves full and the rest of the last waits for the
/// next round trip. While a shard's queue stays that long its records are packed up to three
/// times, which costs CPU only where the round trip, not the CPU, sets the pace.
///
/// A Kinesis record's records expire together, at the oldest one's TTL: so Kinesis records are
/// joined only while their first `put`s lie within half a TTL of each other, and each user
/// record keeps at least half of its TTL from its `put`; records whose TTL has passed are not
/// joined. A front however old is joined: after an outage longer than half the TTL, a shard
/// whose round trip is longer than the buffering time would otherwise send one small
/// aggregate per round trip, fall further behind at each, and see the records it gets from
/// then on keep expiring queued (test
/// `order_mode_catches_up_after_an_outage_longer_than_half_the_ttl`).
fn join_front(shared: &Shared, lane: &mut Lane, now: Instant) -> Joined {
    let config = &shared.config;
    let mut joined = Joined::default();
    if !config.aggregation || lane.queue.len() < 2 {
        return joined;
    }
    let fresh = |outgoing: &Outgoing| {
        outgoing.attempts == 0
            && outgoing.landed.is_none()
            && now < outgoing.oldest_put + config.record_ttl
    };
    // Packing a nearly full front again, with the next one, at every round trip, would cost
    // its bytes' encoding and checksum again for a few more bytes per request.
    let nearly_full = |outgoing: &Outgoing| {
        outgoing.request_size().saturating_mul(4) >= config.aggregation_max_size.saturating_mul(3)
            || outgoing.metas.len().saturating_mul(4)
                >= config.aggregation_max_count.saturating_mul(3)
    };
    // The oldest and newest first puts of the records joined so far: none may lose more than
    // half its TTL by going with the others.
    let Some((mut oldest, mut newest)) = lane
        .queue
        .front()
        .filter(|front| !nearly_full(front))
        .map(|front| (front.oldest_put, front.oldest_put))
    else {
        return joined;
    };
    let mut count = 0;
    let mut bytes = 0;
    let mut records = 0;
    // Up to the first record that fills an aggregate: packed, they make a full one and the
    // rest of the last (joined again, with what follows, at the next round trip).
    for outgoing in &lane.queue {
        let full = bytes >= config.aggregation_max_size || records >= config.aggregation_max_count;
        // (A record too big to share an aggregate would go alone again.)
        let alone = outgoing.request_size() > config.aggregation_max_size;
        // Where the limiter holds the shard back, not the round trip, a fuller record would
        // only wait longer for it: join what it lets go now.
        let limited = count > 0
            && lane
                .limiter
                .as_mut()
                .is_some_and(|limiter| !limiter.allows(bytes + outgoing.request_size(), now));
        let put = outgoing.oldest_put;
        let close = newest.max(put) <= oldest.min(put) + config.record_ttl / 2;
        if full || alone || limited || !fresh(outgoing) || !close {
            break;
        }
        (oldest, newest) = (oldest.min(put), newest.max(put));
        count += 1;
        bytes += outgoing.request_size();
        records += outgoing.metas.len();
    }
    if count < 2 {
        return joined;
    }
    // One lane, one shard: the front's routing stands for them all.
    let front = &lane.queue[0];
    let (routed_to, generation) = ((front.shard_id.clone(), front.ordinal), front.generation);
    let mut gathered = Vec::with_capacity(records);
    for mut outgoing in lane.queue.drain(..count) {
        joined.taken += 1;
        joined.taken_bytes += outgoing.request_size();
        let user_records = outgoing.take_user_records();
        gathered.extend(user_records.into_iter().zip(outgoing.metas));
    }
    let made = aggregator::pack(shared, gathered, routed_to, generation);
    for outgoing in made.into_iter().rev() {
        joined.made += 1;
        joined.made_bytes += outgoing.request_size();
        lane.queue.push_front(outgoing);
    }
    lane.bytes = lane.bytes - joined.taken_bytes + joined.made_bytes;
    debug_assert_eq!(
        lane.bytes,
        lane.queue.iter().map(Outgoing::request_size).sum::<usize>()
    );
    joined
}

/// Takes a Kinesis record leaving a lane off the totals.
fn unqueue(count: &mut usize, bytes: &mut usize, outgoing: &Outgoing) {
    *count -= 1;
    *bytes -= outgoing.request_size();
}

/// Takes the front record off its lane, off the lane's bytes and off the sender's pending
/// totals (`pending_count`, `pending_bytes`).
fn dequeue_front(lane: &mut Lane, (count, bytes): (&mut usize, &mut usize)) -> Option<Outgoing> {
    let outgoing = lane.queue.pop_front()?;
    lane.bytes -= outgoing.request_size();
    unqueue(count, bytes, &outgoing);
    Some(outgoing)
}

/// Keeps the lane's entry in `fronts` true: its front record's `put` time while it may send,
/// nothing while it is empty or held back until a time.
fn refresh_front(lane: &mut Lane, fronts: &mut BTreeMap<Instant, u32>) {
    let wanted = match lane.waiting {
        true => None,
        false => lane.queue.front().map(|outgoing| outgoing.oldest_put),
    };
    if wanted == lane.front_key {
        return;
    }
    if let Some(old) = lane.front_key {
        multiset_remove(fronts, old);
    }
    if let Some(new) = wanted {
        *fronts.entry(new).or_default() += 1;
    }
    lane.front_key = wanted;
}

fn multiset_remove(set: &mut BTreeMap<Instant, u32>, key: Instant) {
    if let Some(n) = set.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            set.remove(&key);
        }
    }
}

/// Whether a Kinesis record of `size` bytes may join a request that already holds `count`
/// records of `bytes` bytes. The first record always may: validation keeps every record within
/// `max_record_size`, which is at most `collection_max_size`.
fn joins_request(count: usize, bytes: usize, size: usize, config: &Config) -> bool {
    count == 0
        || (count < config.collection_max_count && bytes + size <= config.collection_max_size)
}

/// A request's records while its task runs. If the task ends before it hands them back (a
/// panic in the client), they go back to the sender as a failed attempt, so that they are
/// retried and the sender stops counting the request; if the sender is gone too (the runtime
/// shut down), they are reported failed rather than lost.
struct InFlight {
    shared: Arc<Shared>,
    batch: Vec<Outgoing>,
    results: mpsc::UnboundedSender<Completed>,
    partial: bool,
    started: Instant,
    bytes: usize,
    backlog_bytes: usize,
    /// Dropped after `drop` has handed the records back.
    _ending: Option<Arc<Ending>>,
}

impl InFlight {
    /// Gives the records back to the sender with what happened to them.
    fn hand_back(&mut self, outcome: Outcome) {
        let completed = Completed {
            batch: std::mem::take(&mut self.batch),
            partial: self.partial,
            started: self.started,
            bytes: self.bytes,
            backlog_bytes: self.backlog_bytes,
            outcome,
        };
        if let Err(mpsc::error::SendError(completed)) = self.results.send(completed) {
            for outgoing in completed.batch {
                self.shared.fail(
                    outgoing,
                    DeliveryError::stopped("the producer's request task ended before its answer; the records may have been written"),
                );
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.batch.is_empty() {
            self.hand_back(Outcome::Failed(AttemptError {
                code: "RequestTaskEnded".to_owned(),
                message: "the request's task ended before an answer (a panic in the client?); the records may have been written".to_owned(),
                transient: true,
            }));
        }
    }
}

/// See [`Sender::update_close_lead`]: `count` Kinesis records of `bytes` arrived in `elapsed`.
fn close_lead(config: &Config, elapsed: Duration, count: usize, bytes: usize) -> Duration {
    let buffered = config.record_max_buffered_time;
    let elapsed = elapsed.as_secs_f64();
    // Seconds to fill a request at this rate: infinite (or NaN) with nothing arriving, which
    // the conversion below refuses, leaving half the buffered time.
    let fill = |limit: usize, arrived: usize| limit as f64 * elapsed / arrived as f64;
    let fill =
        fill(config.collection_max_count, count).min(fill(config.collection_max_size, bytes));
    // The close still has to reach the sender (its timer ticks by the millisecond) before the
    // request is due: 2 ms at least. And an aggregate stays open at most 50 ms past half the
    // buffered time: with a long buffered time it is dense at half already, or the backlog
    // caps how many records all the aggregates hold, and holding them longer would only keep
    // `put`s waiting for room (at 10,000 shards and 1 s, a lead of 50 ms cut records/s by a
    // third).
    let least = (buffered / 20)
        .max(Duration::from_millis(2))
        .max((buffered / 2).saturating_sub(Duration::from_millis(50)))
        .min(buffered / 2);
    Duration::try_from_secs_f64(2.0 * fill)
        .unwrap_or(Duration::MAX)
        .clamp(least, buffered / 2)
}

/// Whole-request errors that mean "something in this request is invalid".
fn is_invalid_input(code: &str) -> bool {
    matches!(
        code,
        "ValidationException" | "InvalidArgumentException" | "SerializationException"
    )
}

/// One PutRecords call, with the SDK's retries off (the sender retries, per entry).
///
/// The SDK gets an input without records and sends, in its place, the body the producer wrote
/// ([`crate::request_body`]): the SDK signs that body, sends it and parses the answer as
/// usual. Its own serializer would copy every blob twice more into a body it regrows by
/// doubling, then drop the megabytes after each request.
async fn put_records(shared: &Shared, body: Bytes) -> Result<PutRecordsOutput, AttemptError> {
    let request = shared.client.put_records().set_records(Some(Vec::new()));
    let request = match &shared.stream {
        StreamId::Name(name) => request.stream_name(name),
        StreamId::Arn(arn) => request.stream_arn(arn),
    };
    request
        .customize()
        .config_override(
            aws_sdk_kinesis::config::Config::builder().retry_config(RetryConfig::disabled()),
        )
        .mutate_request(move |request| {
            request
                .headers_mut()
                .insert("content-length", body.len().to_string());
            *request.body_mut() = SdkBody::from(body.clone());
        })
        .send()
        .await
        .map_err(|e| classify_sdk_error(&e))
}

/// Metrics of a request as it goes out: the buffering before this attempt of each user
/// record, and how many records each Kinesis record and the request carry.
fn record_sent(metrics: &mut Recorder, batch: &[Outgoing], now: Instant) {
    let now_stamp = crate::clock::Stamp::of(now);
    let mut user_records = 0;
    let prefetch_metas = |outgoing: &Outgoing| prefetch_slice(&outgoing.metas);
    batch
        .iter()
        .take(ANSWER_PREFETCH_AHEAD)
        .for_each(prefetch_metas);
    for (i, outgoing) in batch.iter().enumerate() {
        // The metadata of a record a few places on, and its shard's metrics, are asked for
        // while this one's are read.
        if let Some(ahead) = batch.get(i + ANSWER_PREFETCH_AHEAD) {
            prefetch_metas(ahead);
            metrics.prefetch_row(ahead.shard());
        }
        let buffering = match outgoing.last_attempt_end {
            // A retry's records have all waited since the last attempt.
            Some(end) => Statistics::repeated(
                now.saturating_duration_since(end).as_nanos() as f64 * 1e-6,
                outgoing.len() as u64,
            ),
            None => outgoing.summary.buffering(outgoing.len(), now_stamp),
        };
        let n = outgoing.len();
        user_records += n;
        let per_kinesis_record = Statistics::repeated(n as f64, 1);
        let samples = [
            (MetricName::BufferingTime, buffering),
            (MetricName::UserRecordsPerKinesisRecord, per_kinesis_record),
        ];
        metrics.record_all(&samples, outgoing.shard());
    }
    metrics.add(
        MetricName::KinesisRecordsPerPutRecordsRequest,
        batch.len() as f64,
        None,
    );
    metrics.add(
        MetricName::UserRecordsPerPutRecordsRequest,
        user_records as f64,
        None,
    );
}

/// The metrics of a Kinesis record Kinesis accepted, for the shard it was routed to.
fn answered_samples(outgoing: &Outgoing) -> [(MetricName, Statistics); 3] {
    let one = |value: f64| Statistics::repeated(value, 1);
    [
        (MetricName::KinesisRecordsPut, one(1.0)),
        (
            MetricName::KinesisRecordsDataPut,
            one(outgoing.request_size() as f64),
        ),
        (MetricName::AllErrors, one(0.0)),
    ]
}

/// Metrics of a request's answer: its duration, and each failed Kinesis record's outcome (as
/// the KPL counts them: by the shard it was routed to).
fn record_answered(metrics: &mut Recorder, batch: &[Outgoing], outcome: &Outcome, took: Duration) {
    metrics.add(MetricName::RequestTime, millis(took), None);
    match outcome {
        Outcome::Answered(output) if output.records().len() == batch.len() => {
            // Successes are recorded with their acknowledgement (`answered_samples`).
            for (outgoing, result) in batch.iter().zip(output.records()) {
                if let Some(code) = result.error_code() {
                    let shard = outgoing.shard();
                    metrics.add(MetricName::KinesisRecordsPut, 0.0, shard);
                    metrics.error(code, shard);
                }
            }
        }
        Outcome::Answered(_) => metrics.error("ResponseMismatch", None),
        Outcome::Failed(error) => metrics.error(&error.code, None),
        Outcome::Cancelled => {}
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aggregates_close_earlier_the_longer_a_request_takes_to_fill() {
        let config = Config::default(); // 100 ms buffered, 500 records or 5 MiB a request
        let period = Duration::from_millis(100);
        let ms = Duration::from_millis;
        // Nothing arrived, or too little to fill a request in a quarter of the buffered time:
        // half of it, as before any measurement.
        assert_eq!(close_lead(&config, period, 0, 0), ms(50));
        assert_eq!(close_lead(&config, Duration::ZERO, 0, 0), ms(50));
        assert_eq!(close_lead(&config, period, 1_000, 100_000), ms(50));
        // 10,000 small records in 100 ms: a request fills in 5 ms; twice that.
        assert_eq!(close_lead(&config, period, 10_000, 1_000_000), ms(10));
        // Large records fill a request by its bytes first: 5 MiB at 500 MiB/s is 10 ms.
        let lead = close_lead(&config, period, 100, 50 << 20);
        assert!(lead.abs_diff(ms(20)) < ms(1), "{lead:?}");
        // Faster still: never closer to the deadline than a twentieth of the buffered time,
        // 2 ms (or half, if that is less) whatever the buffered time, and never more than 50 ms
        // past half of it.
        assert_eq!(close_lead(&config, period, 1_000_000, 100_000_000), ms(5));
        for (buffered, least) in [
            (ms(20), ms(2)),
            (ms(3), Duration::from_micros(1_500)),
            (ms(1_000), ms(450)),
        ] {
            let config = Config {
                record_max_buffered_time: buffered,
                ..Config::default()
            };
            assert_eq!(close_lead(&config, period, 1_000_000, 100_000_000), least);
        }
    }

    proptest! {
        #[test]
        fn no_request_exceeds_its_record_or_byte_limit(
            sizes in prop::collection::vec(1usize..=(1 << 20), 1..2_000),
            max_count in 1usize..=500,
            max_bytes in (1usize << 20)..=(10 << 20),
        ) {
            let config = Config {
                collection_max_count: max_count,
                collection_max_size: max_bytes,
                ..Config::default()
            };
            let mut requests = Vec::new();
            let (mut count, mut bytes) = (0, 0);
            for &size in &sizes {
                if !joins_request(count, bytes, size, &config) {
                    requests.push((count, bytes));
                    (count, bytes) = (0, 0);
                }
                count += 1;
                bytes += size;
            }
            requests.push((count, bytes));
            prop_assert_eq!(requests.iter().map(|r| r.0).sum::<usize>(), sizes.len());
            for (count, bytes) in requests {
                prop_assert!(count >= 1 && count <= max_count);
                prop_assert!(bytes <= max_bytes);
            }
        }
    }
}
