//! Step 6: the public handle. `Producer` validates and admits records, owns the shared state the
//! pipeline works on, and drives flush and stop.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::aggregation::{AggregateBuilder, AggregateLimits, MAGIC};
use crate::aggregator::{
    self, Admission, Landed, MetaPool, Outgoing, RecordMeta, Room, RoomPool, Routing, ShardOrdinal,
    ShardOrdinals,
};
use crate::backlog::{Backlog, NoRoom};
use crate::clock::Stamp;
use crate::config::{Config, ProducerBuilder};
use crate::deadlines::LeftDeadlines;
use crate::error::{BuildError, DeliveryError, FailedRecord, FailureKind, PutError, PutRefusal};
use crate::mailbox::{Left, Mailbox};
use crate::metrics::{MetricName, MetricsSnapshot, Recorder, Statistics};
use crate::receipt::{Delivered, Receipt, ReceiptTx};
use crate::record::RecordProblem;
use crate::request_body::BodyPool;
use crate::shard_map::{load_shard_map, ShardMap, StreamId};
use crate::stats::{add, Counters, Stats};
use crate::sync::lock;

/// What reaches the sender task besides Kinesis records (those wait in [`Shared::mailbox`]).
pub(crate) enum Inbound {
    /// Send everything buffered now (`flush`).
    Flush,
    /// A put left a deadline due before the sender's next wake-up (see [`LeftDeadlines`]), or
    /// a Kinesis record that is due before it or fills a request (see [`Mailbox`]): nothing
    /// else to do.
    Wake,
    /// A put found the backlog full: send early what waits only for its buffering time.
    Pressure,
    /// Sent by the sender behind the aggregates a relief closed (`early`: it closed some):
    /// the lanes may send them now, and the next put finding the backlog full may ask again.
    Relieved { early: bool },
    /// Send everything, then end; at `deadline`, report what is left as failed.
    Stop { deadline: Instant },
    /// A shard map reload finished: `loaded` says whether ListShards answered (the map may or
    /// may not have changed). `generation` is the routing's then: every aggregate routed by an
    /// older one is ahead of this message (the map's installation waited for them).
    MapRefreshed { loaded: bool, generation: u64 },
}

/// What acknowledged Kinesis records give back, gathered over one answer and handed back in one
/// go ([`Shared::give_back`]): the backlog's semaphores, its epoch book and the metadata pool
/// each take a lock, and the counters are shared with the putting threads, so a request of 500
/// records pays for each once instead of 500 times.
#[derive(Default)]
pub(crate) struct Returns {
    user_records: usize,
    user_record_bytes: u64,
    kinesis_records: u64,
    kinesis_bytes: u64,
    backlog_bytes: usize,
    /// (epoch, records), runs of one epoch merged.
    epochs: Vec<(u64, u64)>,
    metas: Vec<Vec<RecordMeta>>,
    rooms: Vec<Room>,
}

impl Returns {
    fn add(&mut self, outgoing: Outgoing) {
        self.user_records += outgoing.len();
        self.user_record_bytes += outgoing.summary.data_bytes;
        self.kinesis_records += 1;
        self.kinesis_bytes += outgoing.request_size() as u64;
        self.backlog_bytes += outgoing.backlog_bytes;
        let epochs = &mut self.epochs;
        let mut add_run = |epoch, count| match epochs.last_mut() {
            Some((last, total)) if *last == epoch => *total += count,
            _ => epochs.push((epoch, count)),
        };
        match outgoing.summary.one_epoch {
            Some(epoch) => add_run(epoch, outgoing.len() as u64),
            None => outgoing.for_each_epoch_run(add_run),
        }
        let (room, metas) = Room::of(outgoing.entry, outgoing.metas);
        self.rooms.extend(room);
        self.metas.extend(metas);
    }
}

/// State shared by the handle, the put path, the sender task and request tasks.
pub(crate) struct Shared {
    pub config: Config,
    pub stream: StreamId,
    pub client: Client,
    pub backlog: Backlog,
    pub routing: ArcSwap<Routing>,
    /// The current routing's generation, readable without loading the routing.
    pub routing_generation: AtomicU64,
    /// Whether `admit` asks for a record's aggregator early (see
    /// `aggregator::EARLY_PREFETCH_SHARDS`), set with each routing.
    pub early_prefetch: AtomicBool,
    /// Held while the routing is replaced or every aggregator is visited, so the two never
    /// interleave.
    pub routing_change: Mutex<()>,
    /// Each shard name's ordinal (see `aggregator::ShardOrdinal`).
    pub shard_ordinals: Mutex<ShardOrdinals>,
    /// Set by `stop`: new records are refused.
    pub closed: AtomicBool,
    /// When the producer was built: a placeholder `put_at` until a record is placed (reading
    /// the clock once per record, not twice).
    pub built_at: Instant,
    pub stats: Counters,
    /// KPL-style metrics; `metrics_on` is false at level none, and nothing is recorded then.
    pub metrics: Mutex<Recorder>,
    pub metrics_on: bool,
    /// Buffers of PutRecords bodies, reused from one request to the next.
    pub bodies: Arc<BodyPool>,
    /// Buffer room that empty aggregators keep for their next aggregate, in bytes, and the
    /// most they may keep between them (see `aggregator::emit_slot`).
    pub idle_room: AtomicUsize,
    pub idle_room_max: usize,
    /// Record lists of acknowledged Kinesis records, for new aggregates.
    pub metas: MetaPool,
    /// Buffers of acknowledged aggregates, for new aggregates.
    pub rooms: RoomPool,
    /// How long before its records' buffering deadline an aggregate closes, in nanoseconds:
    /// twice the time the sender expects a request to take to fill from what arrives (see
    /// `sender::Sender::update_close_lead`), and when it measured that, in nanoseconds since
    /// `built_at`. Read through [`close_lead`](Self::close_lead).
    pub close_lead_nanos: AtomicU64,
    pub close_lead_set_nanos: AtomicU64,
    /// A put found the backlog full and the sender has not yet answered with a relief (see
    /// [`backlog_full`](Self::backlog_full)).
    pub pressure: AtomicBool,
    /// Deadlines of new aggregates, left for the sender to collect when it next wakes.
    pub left_deadlines: LeftDeadlines<aggregator::AggregateId>,
    /// Finished Kinesis records, left for the sender to collect when it next wakes.
    pub mailbox: Mailbox<Outgoing>,
    inbound: mpsc::UnboundedSender<Inbound>,
    failures: Mutex<Option<mpsc::UnboundedSender<FailedRecord>>>,
    /// A reload task is running.
    refreshing: AtomicBool,
    /// Someone asked for a reload the running task has not started yet.
    refresh_wanted: AtomicBool,
    /// `stop` has closed the producer and flushed the aggregators.
    stop_begun: AtomicBool,
    /// Becomes true when the sender task has ended: every record is acknowledged or failed.
    pub done: watch::Sender<bool>,
    /// Becomes true when the last metrics upload after the end is over (true from the start
    /// when metrics are not uploaded).
    pub metrics_uploaded: watch::Sender<bool>,
}

impl Shared {
    /// The current routing, kept (a reference count) by the caller.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// The ordinal of a shard named by an answer rather than by the map.
    pub fn shard_ordinal(&self, shard_id: &Arc<str>) -> ShardOrdinal {
        lock(&self.shard_ordinals).of(shard_id)
    }

    /// The metrics the recorder does not hold, read now: `received` user records (one sample
    /// each; since start for a snapshot, since the last upload for an upload), and one sample
    /// each of the records pending and the backlog's bytes.
    pub fn gauges(&self, received: u64) -> [(MetricName, Statistics); 3] {
        let pending = self.stats.snapshot().user_records_pending;
        [
            (
                MetricName::UserRecordsReceived,
                Statistics::repeated(1.0, received),
            ),
            (
                MetricName::UserRecordsPending,
                Statistics::repeated(pending as f64, 1),
            ),
            (
                MetricName::BacklogBytes,
                Statistics::repeated(self.backlog.bytes_held() as f64, 1),
            ),
        ]
    }

    /// How long before its records' buffering deadline an aggregate whose first record was
    /// put at `put_at` closes: the sender's latest measurement, or half the buffered time when
    /// that is more than two measuring periods old (the sender has been idle, and the rate it
    /// measured is gone).
    pub fn close_lead(&self, put_at: Stamp) -> Duration {
        let set_at = Duration::from_nanos(self.close_lead_set_nanos.load(Ordering::Relaxed));
        let since_built = put_at.instant().saturating_duration_since(self.built_at);
        if since_built.saturating_sub(set_at) > 2 * crate::sender::arrivals_period(&self.config) {
            self.config.record_max_buffered_time / 2
        } else {
            Duration::from_nanos(self.close_lead_nanos.load(Ordering::Relaxed))
        }
    }

    /// A put found the backlog full (it waits, or `try_put` refuses it). Counted, and the first
    /// one since the sender's last relief asks for another: open aggregates may then close
    /// early, since holding them longer would keep the caller waiting instead of filling
    /// them (see `sender::Sender::relieve`).
    pub fn backlog_full(&self) {
        crate::stats::add(&self.stats.puts_found_backlog_full, 1);
        if !self.pressure.swap(true, Ordering::AcqRel) {
            self.send(Inbound::Pressure);
        }
    }

    pub fn aggregate_limits(&self) -> AggregateLimits {
        AggregateLimits {
            max_size: self.config.aggregation_max_size,
            max_count: self.config.aggregation_max_count,
        }
    }

    /// Sends the sender a message. Only fails once the sender task is gone (its runtime shut
    /// down), and no message carries a record: nothing is lost with it.
    pub fn send(&self, message: Inbound) {
        let _ = self.inbound.send(message);
    }

    /// Hands a finished Kinesis record to the sender, waking it only when the record is due
    /// before its next wake-up or fills a request (see [`Mailbox`]). Once the sender task is
    /// gone, nothing will send the record, so it fails here rather than vanish.
    pub fn hand_over(&self, outgoing: Outgoing) {
        let config = &self.config;
        let due = outgoing.oldest_put + config.record_max_buffered_time.min(config.record_ttl);
        let size = outgoing.request_size();
        match self.mailbox.leave(outgoing, size, due) {
            Left::Quietly => {}
            Left::WakeSender => self.send(Inbound::Wake),
            Left::Refused(outgoing) => self.fail(
                outgoing,
                DeliveryError::stopped("the producer's sender task is no longer running"),
            ),
        }
    }

    /// Hands an aggregate's deadline to the sender, waking it only when it sleeps past `at`.
    pub fn leave_deadline(&self, at: Instant, aggregate: aggregator::AggregateId) {
        if self.left_deadlines.leave(at, aggregate) {
            self.send(Inbound::Wake);
        }
    }

    /// A Kinesis record was acknowledged: its user records are done.
    pub fn acknowledge(&self, outgoing: Outgoing) {
        let mut returns = Returns::default();
        self.acknowledge_with(outgoing, None, &mut returns);
        self.give_back(returns);
    }

    /// [`acknowledge`](Self::acknowledge), with the samples of its answer (see
    /// `sender::answered_samples`) when they concern the shard it landed on: one lookup of the
    /// shard's metrics for both (with thousands of shards, each lookup is a cache miss). What
    /// the record gives back goes into `returns`, for [`give_back`](Self::give_back).
    pub fn acknowledge_with(
        &self,
        mut outgoing: Outgoing,
        answered: Option<[(MetricName, Statistics); 3]>,
        returns: &mut Returns,
    ) {
        let landed = outgoing.landed.take();
        if self.metrics_on {
            let shard = landed.as_ref().map(Landed::shard);
            let data = outgoing.summary.data_sizes(outgoing.len());
            let [put, retries] = ends(&outgoing, 1.0);
            // Samples of no count are skipped by the recorder.
            let none = (MetricName::AllErrors, Statistics::default());
            let [a, b, c] = answered.unwrap_or([none; 3]);
            let samples = [
                put,
                retries,
                (MetricName::UserRecordsDataPut, data),
                a,
                b,
                c,
            ];
            lock(&self.metrics).record_all(&samples, shard);
        }
        if let Some(Landed {
            shard_id,
            sequence_number,
            ..
        }) = landed.filter(|_| outgoing.summary.singular)
        {
            let aggregated = outgoing.entry.aggregated;
            for (position, meta) in outgoing.metas.iter_mut().enumerate() {
                if let Some(receipt) = meta.receipt.take().filter(|r| !r.is_dropped()) {
                    receipt.send(Ok(Delivered {
                        shard_id: Arc::clone(&shard_id),
                        sequence_number: Arc::clone(&sequence_number),
                        sub_sequence_number: if aggregated { position as u64 } else { 0 },
                        aggregated,
                        attempts: meta.attempts(outgoing.attempts),
                    }));
                }
            }
        }
        returns.add(outgoing);
    }

    /// Hands back what acknowledged records held, all at once: the counters, the metadata
    /// lists, the backlog's room, and last the epochs (so a `flush` that sees its records end
    /// also sees them counted).
    pub fn give_back(&self, returns: Returns) {
        let Returns {
            user_records,
            user_record_bytes,
            kinesis_records,
            kinesis_bytes,
            backlog_bytes,
            epochs,
            metas,
            rooms,
        } = returns;
        if kinesis_records == 0 {
            return;
        }
        add(&self.stats.user_records_put, user_records as u64);
        add(&self.stats.user_record_bytes_put, user_record_bytes);
        add(&self.stats.kinesis_records_put, kinesis_records);
        add(&self.stats.kinesis_bytes_put, kinesis_bytes);
        self.metas.give_all(metas);
        self.rooms.give_all(rooms);
        self.backlog.release(user_records, backlog_bytes);
        for (epoch, count) in epochs {
            self.backlog.leave_epoch(epoch, count);
        }
    }

    /// A Kinesis record failed for good: each of its user records is reported.
    pub fn fail(&self, outgoing: Outgoing, error: DeliveryError) {
        self.fail_records(outgoing, error, |_| None);
    }

    /// `fail`, each record with the error `own` gives it, else `error`.
    pub fn fail_records(
        &self,
        mut outgoing: Outgoing,
        error: DeliveryError,
        own: impl Fn(&RecordMeta) -> Option<DeliveryError>,
    ) {
        let count = outgoing.len();
        add(&self.stats.user_records_failed, count as u64);
        if self.metrics_on {
            let shard = outgoing.shard();
            let [put, retries] = ends(&outgoing, 0.0);
            let expired = (error.kind == FailureKind::Expired) as u64;
            let expired = Statistics::repeated(1.0, count as u64 * expired);
            let samples = [put, retries, (MetricName::UserRecordExpired, expired)];
            lock(&self.metrics).record_all(&samples, shard);
        }
        let mut subscriber = lock(&self.failures).clone();
        let mut unobserved = 0;
        let records = outgoing.take_user_records();
        debug_assert_eq!(records.len(), outgoing.metas.len());
        for (record, meta) in records.into_iter().zip(outgoing.metas.iter_mut()) {
            let failed = FailedRecord {
                record,
                error: own(meta).unwrap_or_else(|| error.clone()),
                attempts: meta.attempts(outgoing.attempts),
                shard_id: outgoing.shard_id.clone(),
            };
            // The receipt gets the failure, and so does the stream: it is where every
            // failure can be watched, whether or not its receipt is still read.
            let receipt_read = meta
                .receipt
                .take()
                .filter(|receipt| !receipt.is_dropped())
                .is_some_and(|receipt| receipt.send(Err(failed.clone())));
            // `Some(record)` when the subscriber's stream was dropped, maybe for a newer one
            // subscribed since this report began: the most recent subscriber gets the rest.
            let (mut stream_read, unsent) = match subscriber.as_ref() {
                None => (false, None),
                Some(tx) => match tx.send(failed) {
                    Ok(()) => (true, None),
                    Err(mpsc::error::SendError(failed)) => (false, Some(failed)),
                },
            };
            if let Some(failed) = unsent {
                subscriber = lock(&self.failures).clone();
                stream_read = subscriber
                    .as_ref()
                    .is_some_and(|tx| tx.send(failed).is_ok());
            }
            if !receipt_read && !stream_read {
                unobserved += 1;
            }
        }
        if unobserved > 0 {
            add(&self.stats.failures_unobserved, unobserved);
            let attempts = outgoing.metas.iter().map(|m| m.attempts(outgoing.attempts));
            tracing::warn!(
                records = unobserved,
                code = %error.code,
                kind = %error.kind,
                shard = outgoing.shard_id.as_deref().unwrap_or("-"),
                attempts = attempts.max().unwrap_or(outgoing.attempts),
                "records failed and no failure stream is subscribed"
            );
        }
        // The room goes back only after the report, so that `flush` and `stop` return after
        // every failure is on the stream.
        self.release(&outgoing);
    }

    fn release(&self, outgoing: &Outgoing) {
        self.backlog.release(outgoing.len(), outgoing.backlog_bytes);
        outgoing.for_each_epoch_run(|epoch, count| self.backlog.leave_epoch(epoch, count));
    }

    /// Reloads the shard map in the background. Requests made while a reload runs are served
    /// by one more reload after it; reloads are at least a second apart. The sender hears of
    /// each finished reload, so records waiting for a newer map never wait for nothing.
    pub fn request_refresh(self: &Arc<Self>) {
        self.refresh_wanted.store(true, Ordering::SeqCst);
        if self.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            // ListShards has a call quota: reloads are a second apart, and further apart (up to
            // 30 s) while they keep failing.
            let mut failures = 0u32;
            loop {
                while shared.refresh_wanted.swap(false, Ordering::SeqCst) {
                    let listing = Instant::now();
                    let loaded = match load_shard_map(&shared.client, &shared.stream).await {
                        // A listing taken while the stream is resharded can leave a key with
                        // no shard or with two. Order mode holds a closed shard's successors by
                        // their ranges, which needs each key in exactly one: it keeps the map it
                        // has and asks again.
                        Ok(map) if shared.config.preserve_order && !map.covers_every_key_once() => {
                            failures += 1;
                            shared.refresh_wanted.store(true, Ordering::SeqCst);
                            tracing::warn!(shards = map.len(), failures, "shard map reload gave shards that do not cover every hash key exactly once; kept the current map");
                            false
                        }
                        Ok(map) => {
                            failures = 0;
                            add(&shared.stats.shard_map_refreshes, 1);
                            aggregator::install_map(&shared, map, listing.elapsed());
                            true
                        }
                        Err(e) => {
                            failures += 1;
                            shared.refresh_wanted.store(true, Ordering::SeqCst);
                            tracing::warn!(error = %e, failures, "shard map reload failed");
                            false
                        }
                    };
                    let generation = shared.routing_generation.load(Ordering::Acquire);
                    shared.send(Inbound::MapRefreshed { loaded, generation });
                    let pause =
                        Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30));
                    tokio::time::sleep(pause).await;
                    if *shared.done.borrow() {
                        // The sender has ended: nobody waits for a map any more.
                        shared.refresh_wanted.store(false, Ordering::SeqCst);
                        break;
                    }
                }
                shared.refreshing.store(false, Ordering::SeqCst);
                // A request that arrived just before `refreshing` was cleared found it set and
                // left: serve it here unless another task already took over.
                if !shared.refresh_wanted.load(Ordering::SeqCst)
                    || shared.refreshing.swap(true, Ordering::SeqCst)
                {
                    break;
                }
            }
        });
    }

    /// Refuses new records, hands every aggregate to the sender and tells it to finish by
    /// `deadline`. Safe to call more than once: the earliest deadline wins.
    fn begin_stop(&self, deadline: Instant) {
        if !self.stop_begun.swap(true, Ordering::SeqCst) {
            tracing::info!(stream = %self.stream, "producer stopping");
            self.close_intake();
        }
        self.send(Inbound::Stop { deadline });
    }

    /// Refuses new records (a `put` waiting for room too) and hands every aggregate to the
    /// sender: `flush_all` visits each slot after the flag is set, and `enqueue` checks the
    /// flag under the slot's lock, so each record is either refused or handed over.
    pub fn close_intake(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.backlog.close();
        aggregator::flush_all(self);
    }

    /// Called once the sender task and every request task it started have ended: failure
    /// streams end after their last item.
    pub fn finish(&self) {
        // Logged before `done` is set: `stop` returns then, and whatever follows it (a
        // program's exit, a test reading its logs) must find the event already written.
        let stats = self.stats.snapshot();
        tracing::info!(
            stream = %self.stream,
            put = stats.user_records_put,
            failed = stats.user_records_failed,
            "producer stopped"
        );
        let mut failures = lock(&self.failures);
        failures.take();
        // Under the same lock as `notify_failures`, so no subscriber slips in after the end.
        self.done.send_replace(true);
    }
}

/// The per-user-record samples of a Kinesis record's records ending: `UserRecordsPut` (1
/// acknowledged, 0 failed) and `RetriesPerRecord`.
fn ends(outgoing: &Outgoing, put: f64) -> [(MetricName, Statistics); 2] {
    let n = outgoing.len() as u64;
    // Each record's own count: those re-split after a reshard carry earlier attempts.
    let retries = if outgoing.summary.singular {
        let retries = outgoing
            .metas
            .iter()
            .map(|m| u64::from(m.attempts(outgoing.attempts).saturating_sub(1)));
        Statistics::of_integers(retries, 1.0)
    } else if n > 0 {
        Statistics::repeated(f64::from(outgoing.attempts.saturating_sub(1)), n)
    } else {
        Statistics::default()
    };
    [
        (MetricName::UserRecordsPut, Statistics::repeated(put, n)),
        (MetricName::RetriesPerRecord, retries),
    ]
}

/// A long-lived Kinesis producer. Cheap to clone: clones share one pipeline.
///
/// Dropping the last clone without [`stop`](Self::stop) starts a stop in the background with the
/// configured `stop_timeout`: records keep being delivered while the tokio runtime runs, and
/// failures keep going to the failure stream. Nothing waits for it, so a program that exits
/// right after may lose what was still buffered: call `stop().await` to be sure.
#[derive(Clone)]
pub struct Producer {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared
            .begin_stop(deadline_after(self.shared.config.stop_timeout));
    }
}

impl ProducerBuilder {
    /// Validates the configuration, loads the shard map and starts the producer's task.
    /// Must run inside a tokio runtime.
    pub async fn build(self) -> Result<Producer, BuildError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let (mut config, stream, client) = self.resolve().await?;
        let map = load_shard_map(&client, &stream).await?;
        let summary = match &stream {
            StreamId::Name(name) => client.describe_stream_summary().stream_name(name),
            StreamId::Arn(arn) => client.describe_stream_summary().stream_arn(arn),
        };
        match summary.send().await {
            Ok(out) => config.adopt_stream_record_size(
                out.stream_description_summary()
                    .and_then(|s| s.max_record_size_in_kib()),
            ),
            // Not fatal: a producer may lack the permission; the configured size stays.
            Err(e) => {
                tracing::debug!(error = %crate::retry::describe_sdk_error(&e), "DescribeStreamSummary failed; keeping max_record_size")
            }
        }
        let (inbound, inbound_rx) = mpsc::unbounded_channel();
        #[cfg(feature = "cloudwatch-metrics")]
        let uploads_metrics = config.metrics_upload.is_some();
        #[cfg(not(feature = "cloudwatch-metrics"))]
        let uploads_metrics = false;
        let limits = AggregateLimits {
            max_size: config.aggregation_max_size,
            max_count: config.aggregation_max_count,
        };
        tracing::info!(%stream, shards = map.len(), "producer started");
        let shard_ordinals = Mutex::new(ShardOrdinals::default());
        let early_prefetch = AtomicBool::new(aggregator::early_prefetch(&map));
        let routing = Routing::new(0, map, limits, &shard_ordinals);
        let shared = Arc::new(Shared {
            backlog: Backlog::new(config.max_backlog_records, config.max_backlog_bytes),
            routing: ArcSwap::from_pointee(routing),
            routing_generation: AtomicU64::new(0),
            early_prefetch,
            routing_change: Mutex::new(()),
            shard_ordinals,
            closed: AtomicBool::new(false),
            built_at: Instant::now(),
            stats: Counters::default(),
            metrics: Mutex::new(Recorder::new(
                config.metrics_level,
                config.metrics_granularity,
            )),
            metrics_on: Recorder::enabled(config.metrics_level),
            // Bodies in flight hold at most about a third of the backlog (a quarter in data,
            // base64 adds a third), and only buffers that were in flight come back: the pool
            // never holds more than requests once did at the same time.
            bodies: BodyPool::new(config.max_backlog_bytes / 2),
            // A sixteenth of the backlog: 4 MiB by default, room for a few thousand small
            // aggregates, within the memory the backlog's size promises.
            idle_room: AtomicUsize::new(0),
            idle_room_max: config.max_backlog_bytes / 16,
            metas: MetaPool::default(),
            rooms: RoomPool::new(config.max_backlog_bytes / 8),
            close_lead_nanos: AtomicU64::new(
                (config.record_max_buffered_time / 2).as_nanos() as u64
            ),
            close_lead_set_nanos: AtomicU64::new(0),
            pressure: AtomicBool::new(false),
            left_deadlines: LeftDeadlines::new(),
            mailbox: Mailbox::new(),
            inbound,
            failures: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            refresh_wanted: AtomicBool::new(false),
            stop_begun: AtomicBool::new(false),
            done: watch::Sender::new(false),
            metrics_uploaded: watch::Sender::new(!uploads_metrics),
            config,
            stream,
            client,
        });
        runtime.spawn(crate::sender::run(Arc::clone(&shared), inbound_rx));
        #[cfg(feature = "cloudwatch-metrics")]
        if let Some(call) = shared.config.metrics_upload.clone() {
            runtime.spawn(crate::metrics_upload::run(Arc::clone(&shared), call));
        }
        Ok(Producer {
            handle: Arc::new(Handle { shared, runtime }),
        })
    }
}

impl Producer {
    pub fn builder() -> ProducerBuilder {
        ProducerBuilder::default()
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Puts one record, waiting only while the backlog is full.
    pub async fn put(
        &self,
        data: impl Into<Bytes>,
        partition_key: impl Into<String>,
    ) -> Result<(), PutError> {
        self.put_with(crate::UserRecord::new(data, partition_key), None)
            .await
    }

    /// Puts a record whose partition key comes from the configured partitioner (by default a
    /// random UUID, which spreads records evenly over the shards).
    pub async fn put_data(&self, data: impl Into<Bytes>) -> Result<(), PutError> {
        let data = data.into();
        let record = match &self.shared().config.partitioner {
            Some(partitioner) => {
                let key = partitioner(&data);
                crate::UserRecord::new(data, key)
            }
            None => crate::UserRecord::with_uuid_key(data, crate::config::random_partition_key()),
        };
        self.put_with(record, None).await
    }

    /// Puts a record (with an explicit hash key if it has one), waiting while the backlog is
    /// full. Refused records come back inside the error.
    pub async fn put_record(&self, record: crate::UserRecord) -> Result<(), PutError> {
        self.put_with(record, None).await
    }

    /// Puts a record, waiting while the backlog is full, and returns a [`Receipt`]: a future of
    /// where the record was written (shard, sequence number, sub-sequence number, attempts) or
    /// of its failure. A receipt dropped unread loses nothing. Plain `put` pays nothing for
    /// this.
    pub async fn put_with_receipt(&self, record: crate::UserRecord) -> Result<Receipt, PutError> {
        let (tx, receipt) = Receipt::new();
        self.put_with(record, Some(tx)).await.map(|()| receipt)
    }

    /// Puts a record if the backlog has room now; never waits.
    pub fn try_put(&self, record: crate::UserRecord) -> Result<(), PutError> {
        match self.put_now(record, None) {
            Now::Done(result) => result,
            Now::NoRoom(waiting) => {
                self.shared().backlog_full();
                Err(PutError::new(waiting.0, PutRefusal::BacklogFull))
            }
        }
    }

    /// `put_record`, with a receipt's sender if the caller wants one.
    async fn put_with(
        &self,
        record: crate::UserRecord,
        receipt: Option<ReceiptTx>,
    ) -> Result<(), PutError> {
        let shared = self.shared();
        // One unit of tokio's cooperative budget per put, spent whether or not there is room,
        // so that a task putting in a loop yields its worker thread now and then, as it would
        // through the semaphores' futures. (A fast path through `try_acquire` without it let
        // putting tasks hold a worker thread for good, and the fault suite found records
        // written twice with no fault to explain them: answers that sat unread past the
        // request timeout.)
        tokio::task::coop::consume_budget().await;
        // Everything up to the aggregator in one synchronous call: the record and its metadata
        // are built where they are used, not moved through this future's state.
        let (record, hash_key, meta) = match self.put_now(record, receipt) {
            Now::Done(result) => return result,
            Now::NoRoom(waiting) => *waiting,
        };
        match shared
            .backlog
            .wait_for_room(meta.backlog_bytes, || shared.backlog_full())
            .await
        {
            Ok(()) => self.place(record, hash_key, meta),
            Err(_) => Err(PutError::new(record, PutRefusal::Stopped)),
        }
    }

    /// Admits the record and, if the backlog has room for it now, takes the room and places
    /// it.
    fn put_now(&self, record: crate::UserRecord, receipt: Option<ReceiptTx>) -> Now {
        let (hash_key, mut meta) = match self.admit(&record) {
            Ok(admitted) => admitted,
            Err(refusal) => return Now::Done(Err(PutError::new(record, refusal))),
        };
        meta.receipt = receipt;
        match self.shared().backlog.try_acquire(meta.backlog_bytes) {
            Ok(()) => Now::Done(self.place(record, hash_key, meta)),
            // Boxed: the wait that follows costs far more, and `Now` stays two words.
            Err(NoRoom::Full) => Now::NoRoom(Box::new((record, hash_key, meta))),
            Err(NoRoom::Closed) => Now::Done(Err(PutError::new(record, PutRefusal::Stopped))),
        }
    }

    /// Puts a record from a plain (non-async) thread, blocking while the backlog is full.
    /// On a tokio runtime thread it refuses instead of blocking the runtime.
    pub fn put_blocking(&self, record: crate::UserRecord) -> Result<(), PutError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(PutError::new(record, PutRefusal::BlockingInAsyncContext));
        }
        self.handle.runtime.block_on(self.put_record(record))
    }

    /// Checks the record and computes its hash key, before it takes any room.
    fn admit(&self, record: &crate::UserRecord) -> Result<(u128, RecordMeta), PutRefusal> {
        let shared = self.shared();
        let hash_key = record.validate(shared.config.max_record_size)?;
        if shared.config.aggregation && record.data().starts_with(&MAGIC) {
            // It will go out as an aggregate of one (see `aggregator::add_to_slot`).
            let size = AggregateBuilder::solo_len(record) + record.partition_key().len();
            let max = shared.config.max_record_size;
            if size > max {
                return Err(RecordProblem::TooLargeToWrap { size, max }.into());
            }
        }
        if shared.closed.load(Ordering::SeqCst) {
            return Err(PutRefusal::Stopped);
        }
        // The shard's aggregator is on its way from memory while the record takes its room in
        // the backlog and the clock is read (with many shards, where it is likely not cached).
        if shared.early_prefetch.load(Ordering::Relaxed) {
            aggregator::prefetch_slot(shared, hash_key);
        }
        let meta = RecordMeta {
            // Set by `place`, after any wait for room.
            put_at: Stamp::default(),
            epoch: 0,
            // Validation bounds data + key by max_record_size (≤ 10 MiB) and the EHK by 39.
            backlog_bytes: record.backlog_size() as u32,
            data_len: record.data().len() as u32,
            earlier: None,
            receipt: None,
        };
        Ok((hash_key, meta))
    }

    /// Hands an admitted record, whose room is taken, to its aggregator.
    fn place(
        &self,
        record: crate::UserRecord,
        hash_key: u128,
        mut meta: RecordMeta,
    ) -> Result<(), PutError> {
        let shared = self.shared();
        meta.put_at = crate::clock::recent();
        match aggregator::enqueue(shared, record, hash_key, meta, Admission::New) {
            Ok(()) => {
                add(&shared.stats.user_records_received, 1);
                Ok(())
            }
            Err(refused) => {
                let (record, meta) = *refused;
                shared.backlog.release(1, meta.backlog_bytes as usize);
                Err(PutError::new(record, PutRefusal::Stopped))
            }
        }
    }

    /// Returns when every record put before this call is acknowledged or reported failed.
    /// Buffered aggregates are sent at once rather than at their deadline.
    pub async fn flush(&self) {
        let shared = self.shared();
        let target = shared.backlog.begin_flush();
        aggregator::flush_all(shared);
        shared.send(Inbound::Flush);
        shared.backlog.flushed(target).await;
    }

    /// Stops the producer within the configured `stop_timeout`: see
    /// [`stop_within`](Self::stop_within).
    pub async fn stop(&self) {
        self.stop_within(self.shared().config.stop_timeout).await;
    }

    /// Refuses new records, sends everything buffered, waits for requests in flight and their
    /// retries, and returns. At `timeout`, whatever is left is reported failed
    /// ([`FailureKind::Stopped`](crate::FailureKind::Stopped)) and the call returns. Calling it
    /// again (from any clone) waits for the same end; a shorter timeout brings it forward.
    pub async fn stop_within(&self, timeout: Duration) {
        let shared = self.shared();
        let deadline = deadline_after(timeout);
        shared.begin_stop(deadline);
        let mut done = shared.done.subscribe();
        let _ = done.wait_for(|done| *done).await;
        // With metrics uploaded to CloudWatch, the last interval's go out now; within the
        // timeout, so a CloudWatch outage does not hold `stop` up. The wait is timed on the
        // producer's runtime: the caller's may have no timer.
        let mut uploaded = shared.metrics_uploaded.subscribe();
        if !*uploaded.borrow() {
            let wait = self.handle.runtime.spawn(async move {
                let _ = tokio::time::timeout_at(deadline.into(), uploaded.wait_for(|up| *up)).await;
            });
            let _ = wait.await;
        }
    }

    /// Subscribes to failed records. Each failed record is delivered to the most recent
    /// subscriber only; an earlier stream ends after the items it already received. The stream
    /// ends once the producer has stopped. With no subscriber, failures are logged (without
    /// record data) and counted in [`Stats::failures_unobserved`].
    ///
    /// The stream is unbounded so that a slow reader never blocks the producer or `stop`.
    pub fn notify_failures(&self) -> FailureStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = self.shared();
        let mut failures = lock(&shared.failures);
        if !*shared.done.borrow() {
            *failures = Some(tx);
        }
        FailureStream { rx }
    }

    /// Counters of what the producer has done so far.
    pub fn stats(&self) -> Stats {
        let shared = self.shared();
        let mut stats = shared.stats.snapshot();
        stats.idle_aggregator_room_bytes =
            (shared.idle_room.load(Ordering::Relaxed) + shared.rooms.bytes()) as u64;
        stats
    }

    /// The KPL's metrics (and ours), accumulated since the producer started, at the configured
    /// level and granularity. Cheap enough to call every second: one short lock.
    pub fn metrics(&self) -> MetricsSnapshot {
        let shared = self.shared();
        let received = shared.stats.snapshot().user_records_received;
        lock(&shared.metrics).snapshot(shared.stream.name(), &shared.gauges(received))
    }

    /// The shard map records are currently routed by.
    pub fn shard_map(&self) -> ShardMap {
        self.shared().routing().map.clone()
    }
}

/// What [`Producer::put_now`] did with a record.
enum Now {
    /// Placed, or refused.
    Done(Result<(), PutError>),
    /// Admitted, but the backlog has no room for it now.
    NoRoom(Box<(crate::UserRecord, u128, RecordMeta)>),
}

/// Failed records, as a [`futures_core::Stream`] or through [`recv`](Self::recv).
#[derive(Debug)]
pub struct FailureStream {
    rx: mpsc::UnboundedReceiver<FailedRecord>,
}

impl FailureStream {
    /// The next failed record; `None` once the producer has stopped and every failure was read.
    pub async fn recv(&mut self) -> Option<FailedRecord> {
        self.rx.recv().await
    }

    /// A failed record if one is waiting.
    pub fn try_recv(&mut self) -> Option<FailedRecord> {
        self.rx.try_recv().ok()
    }
}

impl futures_core::Stream for FailureStream {
    type Item = FailedRecord;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FailedRecord>> {
        self.rx.poll_recv(cx)
    }
}

/// `now + timeout`, saturating far in the future instead of overflowing.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}
