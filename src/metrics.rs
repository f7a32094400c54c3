//! Step 7: metrics. The KPL's metrics — its names, units, levels and granularities — so that
//! dashboards and alarms built for the KPL read ours, plus three of our own.
//!
//! Every metric is a statistic set (sample count, sum, minimum, maximum), as CloudWatch keeps
//! them, accumulated since the producer started. Counters such as `UserRecordsPut` take one
//! sample per user record that ended: 1 when it was acknowledged, 0 when it failed, so `sum`
//! counts successes and `count` counts ends. The sender records them under one lock per
//! request; the callers' threads touch nothing here.

/// Error counts by code (and shard): a fast seeded hash, not SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;

/// How many metrics are recorded, as the KPL's `MetricsLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum MetricsLevel {
    /// Nothing is recorded.
    None,
    /// The metrics the KPL marks "summary": UserRecordsPut, KinesisRecordsPut, ErrorsByCode,
    /// AllErrors, UserRecordExpired, BufferingTime.
    Summary,
    /// Every metric (the KPL's default).
    #[default]
    Detailed,
}

/// Which dimensions metrics are kept at, as the KPL's `MetricsGranularity`: each level adds to
/// the coarser ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum MetricsGranularity {
    /// No dimension.
    Global,
    /// Also with `StreamName`.
    Stream,
    /// Also with `StreamName` and `ShardId`, for metrics that concern a shard (the KPL's
    /// default).
    #[default]
    Shard,
}

/// What a metric's values measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Count,
    Bytes,
    Milliseconds,
}

impl Unit {
    /// The CloudWatch name of the unit.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Bytes => "Bytes",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

/// The metrics. The first fifteen are the KPL's, with its meaning; the last three are ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum MetricName {
    /// User records accepted by `put` (global and stream only, one sample each).
    UserRecordsReceived,
    /// User records accepted and not yet ended, when the snapshot was taken.
    UserRecordsPending,
    /// One sample per user record that ended: 1 acknowledged, 0 failed.
    UserRecordsPut,
    /// Data bytes of each acknowledged user record.
    UserRecordsDataPut,
    /// One sample per Kinesis record attempt: 1 acknowledged, 0 failed.
    KinesisRecordsPut,
    /// Bytes (data + partition key) of each acknowledged Kinesis record.
    KinesisRecordsDataPut,
    /// Errors, with an `ErrorCode` dimension: one per failed Kinesis record attempt (with the
    /// shard) and one per failed PutRecords request (without).
    ErrorsByCode,
    /// Every attempt's outcome: 1 for each error counted in `ErrorsByCode`, 0 for each
    /// acknowledged Kinesis record.
    AllErrors,
    /// Attempts minus one, per user record that ended.
    RetriesPerRecord,
    /// One sample per user record that failed because its TTL passed.
    UserRecordExpired,
    /// Per user record and attempt: the wait before the attempt was sent (from `put`, or from
    /// the end of the previous attempt).
    BufferingTime,
    /// Duration of each PutRecords call.
    RequestTime,
    /// User records in each Kinesis record sent.
    UserRecordsPerKinesisRecord,
    /// Kinesis records in each PutRecords request.
    KinesisRecordsPerPutRecordsRequest,
    /// User records in each PutRecords request.
    UserRecordsPerPutRecordsRequest,
    /// Ours: user records sent again because their aggregate landed, after a reshard, on a
    /// shard that does not own all of them (with the shard it landed on). Consumers that do
    /// not apply the KCL's rule may read these records twice.
    UserRecordsResentAfterReshard,
    /// Ours: how long a shard's queue waited for its rate limiter before it could send again.
    LimiterWaitTime,
    /// Ours: bytes held in the backlog when the snapshot was taken.
    BacklogBytes,
}

const METRIC_COUNT: usize = 18;

const ALL_METRICS: [MetricName; METRIC_COUNT] = [
    MetricName::UserRecordsReceived,
    MetricName::UserRecordsPending,
    MetricName::UserRecordsPut,
    MetricName::UserRecordsDataPut,
    MetricName::KinesisRecordsPut,
    MetricName::KinesisRecordsDataPut,
    MetricName::ErrorsByCode,
    MetricName::AllErrors,
    MetricName::RetriesPerRecord,
    MetricName::UserRecordExpired,
    MetricName::BufferingTime,
    MetricName::RequestTime,
    MetricName::UserRecordsPerKinesisRecord,
    MetricName::KinesisRecordsPerPutRecordsRequest,
    MetricName::UserRecordsPerPutRecordsRequest,
    MetricName::UserRecordsResentAfterReshard,
    MetricName::LimiterWaitTime,
    MetricName::BacklogBytes,
];

impl MetricName {
    /// The name as the KPL (and CloudWatch) spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricName::UserRecordsReceived => "UserRecordsReceived",
            MetricName::UserRecordsPending => "UserRecordsPending",
            MetricName::UserRecordsPut => "UserRecordsPut",
            MetricName::UserRecordsDataPut => "UserRecordsDataPut",
            MetricName::KinesisRecordsPut => "KinesisRecordsPut",
            MetricName::KinesisRecordsDataPut => "KinesisRecordsDataPut",
            MetricName::ErrorsByCode => "ErrorsByCode",
            MetricName::AllErrors => "AllErrors",
            MetricName::RetriesPerRecord => "RetriesPerRecord",
            MetricName::UserRecordExpired => "UserRecordExpired",
            MetricName::BufferingTime => "BufferingTime",
            MetricName::RequestTime => "RequestTime",
            MetricName::UserRecordsPerKinesisRecord => "UserRecordsPerKinesisRecord",
            MetricName::KinesisRecordsPerPutRecordsRequest => "KinesisRecordsPerPutRecordsRequest",
            MetricName::UserRecordsPerPutRecordsRequest => "UserRecordsPerPutRecordsRequest",
            MetricName::UserRecordsResentAfterReshard => "UserRecordsResentAfterReshard",
            MetricName::LimiterWaitTime => "LimiterWaitTime",
            MetricName::BacklogBytes => "BacklogBytes",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            MetricName::UserRecordsDataPut
            | MetricName::KinesisRecordsDataPut
            | MetricName::BacklogBytes => Unit::Bytes,
            MetricName::BufferingTime | MetricName::RequestTime | MetricName::LimiterWaitTime => {
                Unit::Milliseconds
            }
            _ => Unit::Count,
        }
    }

    /// The level the metric belongs to (the KPL's assignment for its fifteen).
    pub fn level(self) -> MetricsLevel {
        match self {
            MetricName::UserRecordsPut
            | MetricName::KinesisRecordsPut
            | MetricName::ErrorsByCode
            | MetricName::AllErrors
            | MetricName::UserRecordExpired
            | MetricName::BufferingTime
            | MetricName::UserRecordsResentAfterReshard => MetricsLevel::Summary,
            _ => MetricsLevel::Detailed,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Where the metric sits in a shard's row, for the metrics that have a shard dimension.
    /// Those recorded with each acknowledgement come first, then those recorded as each
    /// Kinesis record is sent: a row is 64-byte aligned, so each group spans as few cache
    /// lines as it can.
    fn shard_slot(self) -> Option<usize> {
        use MetricName::*;
        Some(match self {
            UserRecordsPut => 0,
            RetriesPerRecord => 1,
            UserRecordsDataPut => 2,
            KinesisRecordsPut => 3,
            KinesisRecordsDataPut => 4,
            AllErrors => 5,
            BufferingTime => 6,
            UserRecordsPerKinesisRecord => 7,
            UserRecordExpired => 8,
            UserRecordsResentAfterReshard => 9,
            LimiterWaitTime => 10,
            UserRecordsReceived
            | UserRecordsPending
            | ErrorsByCode
            | RequestTime
            | KinesisRecordsPerPutRecordsRequest
            | UserRecordsPerPutRecordsRequest
            | BacklogBytes => return None,
        })
    }
}

/// A statistic set: how many samples, their sum, smallest and largest.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Statistics {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Statistics {
    /// `n` samples of `value`.
    pub(crate) fn repeated(value: f64, n: u64) -> Self {
        Statistics {
            count: n,
            sum: value * n as f64,
            min: value,
            max: value,
        }
    }

    /// Samples given as integers (bytes, nanoseconds), each multiplied by `scale`: integer
    /// arithmetic per sample, floating point once.
    pub(crate) fn of_integers(values: impl Iterator<Item = u64>, scale: f64) -> Self {
        let (mut count, mut sum, mut min, mut max) = (0u64, 0u64, u64::MAX, 0u64);
        for value in values {
            count += 1;
            sum = sum.saturating_add(value);
            min = min.min(value);
            max = max.max(value);
        }
        if count == 0 {
            return Statistics::default();
        }
        Statistics {
            count,
            sum: sum as f64 * scale,
            min: min as f64 * scale,
            max: max as f64 * scale,
        }
    }

    /// Adds one sample.
    pub(crate) fn add(&mut self, value: f64) {
        self.merge(&Statistics::repeated(value, 1));
    }

    pub(crate) fn merge(&mut self, other: &Statistics) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Mean of the samples (0 without samples).
    pub fn average(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// One metric at one set of dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: MetricName,
    /// `(name, value)` pairs: none (global), `StreamName`, `StreamName` and `ShardId`; plus
    /// `ErrorCode` for `ErrorsByCode`.
    pub dimensions: Vec<(&'static str, String)>,
    pub statistics: Statistics,
}

impl Metric {
    fn dimension(&self, name: &str) -> Option<&str> {
        self.dimensions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What `Producer::metrics()` returns: every recorded metric at every kept granularity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub metrics: Vec<Metric>,
}

impl MetricsSnapshot {
    /// The metric without dimensions (for `ErrorsByCode`, summed over the codes).
    pub fn global(&self, name: MetricName) -> Statistics {
        let mut total = Statistics::default();
        for metric in &self.metrics {
            let global = metric.dimension("StreamName").is_none();
            if metric.name == name && global {
                total.merge(&metric.statistics);
            }
        }
        total
    }

    /// The metric for one shard (summed over error codes for `ErrorsByCode`).
    pub fn shard(&self, name: MetricName, shard_id: &str) -> Statistics {
        let mut total = Statistics::default();
        for metric in &self.metrics {
            if metric.name == name && metric.dimension("ShardId") == Some(shard_id) {
                total.merge(&metric.statistics);
            }
        }
        total
    }

    /// `ErrorsByCode` for one code, without other dimensions.
    pub fn errors(&self, code: &str) -> Statistics {
        self.metrics
            .iter()
            .find(|m| {
                m.name == MetricName::ErrorsByCode
                    && m.dimension("ErrorCode") == Some(code)
                    && m.dimension("StreamName").is_none()
            })
            .map(|m| m.statistics)
            .unwrap_or_default()
    }
}

/// The global statistics, indexed by `MetricName::index`.
type Row = [Statistics; METRIC_COUNT];

/// A shard as the recorder is told of it: its name, and its ordinal, by which its row is found
/// (see `aggregator::ShardOrdinal`; every name has one ordinal for the producer's life).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShardRef<'a> {
    pub id: &'a Arc<str>,
    pub ordinal: u32,
}

/// How many metrics have a per-shard figure (see [`MetricName::shard_slot`]).
const SHARD_METRIC_COUNT: usize = 11;

/// One shard's statistics, for the metrics that have a shard dimension only, and in the order
/// that puts those recorded together for each Kinesis record in the same cache lines.
#[derive(Clone)]
#[repr(C, align(64))]
struct ShardRow {
    statistics: [Statistics; SHARD_METRIC_COUNT],
    shard_id: Arc<str>,
}

impl ShardRow {
    fn new(shard_id: &Arc<str>) -> Box<Self> {
        Box::new(ShardRow {
            statistics: [Statistics::default(); SHARD_METRIC_COUNT],
            shard_id: Arc::clone(shard_id),
        })
    }
}

/// The metrics as they are being recorded (behind a mutex in the producer's shared state).
///
/// Samples go into `current`. An upload to CloudWatch [`drain`](Self::drain)s it, reporting
/// what it held as that interval's figures and merging it into `done`; a snapshot shows both
/// together, so it is the same whether uploads run or not.
pub(crate) struct Recorder {
    level: MetricsLevel,
    granularity: MetricsGranularity,
    current: Rows,
    done: Rows,
    /// Whether `drain` ever ran (else `done` is empty and a snapshot reads `current` alone).
    drained: bool,
}

/// Statistics at every granularity.
#[derive(Clone)]
struct Rows {
    global: Row,
    /// By shard ordinal: a shard that recorded nothing holds a null pointer's room.
    shards: Vec<Option<Box<ShardRow>>>,
    /// `ErrorsByCode` per code.
    errors: HashMap<Arc<str>, ErrorCount>,
}

impl Default for Rows {
    fn default() -> Self {
        Rows {
            global: [Statistics::default(); METRIC_COUNT],
            shards: Vec::new(),
            errors: HashMap::default(),
        }
    }
}

impl Rows {
    /// The row of `shard`, made on first use.
    fn shard_row(&mut self, shard: ShardRef) -> &mut ShardRow {
        let at = shard.ordinal as usize;
        if self.shards.len() <= at {
            self.shards.resize_with(at + 1, || None);
        }
        self.shards[at].get_or_insert_with(|| ShardRow::new(shard.id))
    }

    /// Adds `other`'s samples to these.
    fn merge(&mut self, other: &Rows) {
        for (into, from) in self.global.iter_mut().zip(&other.global) {
            into.merge(from);
        }
        for (ordinal, row) in other.shards.iter().enumerate() {
            let Some(row) = row else { continue };
            let shard = ShardRef {
                id: &row.shard_id,
                ordinal: ordinal as u32,
            };
            let into = self.shard_row(shard);
            for (into, from) in into.statistics.iter_mut().zip(&row.statistics) {
                into.merge(from);
            }
        }
        for (code, count) in &other.errors {
            let into = self.errors.entry(Arc::clone(code)).or_default();
            into.total.merge(&count.total);
            for (shard, statistics) in &count.per_shard {
                into.per_shard
                    .entry(Arc::clone(shard))
                    .or_default()
                    .merge(statistics);
            }
        }
    }
}

/// One error code's count, in all and per shard.
#[derive(Default, Clone)]
struct ErrorCount {
    total: Statistics,
    per_shard: HashMap<Arc<str>, Statistics>,
}

impl Recorder {
    pub fn new(level: MetricsLevel, granularity: MetricsGranularity) -> Self {
        Recorder {
            level,
            granularity,
            current: Rows::default(),
            done: Rows::default(),
            drained: false,
        }
    }

    /// Whether anything is recorded at all (callers skip their work when not).
    pub fn enabled(level: MetricsLevel) -> bool {
        level > MetricsLevel::None
    }

    /// Merges samples of `name`, for `shard` when it concerns one.
    pub fn record(&mut self, name: MetricName, samples: Statistics, shard: Option<ShardRef>) {
        self.record_all(&[(name, samples)], shard);
    }

    /// Merges samples of several metrics about one shard, looking its row up once (with
    /// thousands of shards, each row is likely a cache miss). Metrics without a shard
    /// dimension count globally only.
    pub fn record_all(&mut self, samples: &[(MetricName, Statistics)], shard: Option<ShardRef>) {
        let level = self.level;
        let kept = || {
            samples
                .iter()
                .filter(move |(name, s)| name.level() <= level && s.count > 0)
        };
        if kept().next().is_none() {
            return;
        }
        let rows = &mut self.current;
        for (name, s) in kept() {
            rows.global[name.index()].merge(s);
        }
        if let Some(shard) = shard.filter(|_| self.granularity == MetricsGranularity::Shard) {
            let row = rows.shard_row(shard);
            for (name, s) in kept() {
                if let Some(slot) = name.shard_slot() {
                    row.statistics[slot].merge(s);
                }
            }
        }
    }

    /// Asks for the memory of `shard`'s row, when it has one and shard-level figures are kept
    /// (a hint, see `prefetch`).
    pub fn prefetch_row(&self, shard: Option<ShardRef>) {
        if let Some(shard) = shard.filter(|_| self.granularity == MetricsGranularity::Shard) {
            if let Some(Some(row)) = self.current.shards.get(shard.ordinal as usize) {
                crate::prefetch::prefetch(&**row as *const ShardRow, size_of::<ShardRow>());
            }
        }
    }

    /// One sample of `name`.
    pub fn add(&mut self, name: MetricName, value: f64, shard: Option<ShardRef>) {
        self.record(name, Statistics::repeated(value, 1), shard);
    }

    /// An error: `ErrorsByCode` for its code and `AllErrors`, for `shard` when the error
    /// concerns one Kinesis record.
    pub fn error(&mut self, code: &str, shard: Option<ShardRef>) {
        self.add(MetricName::AllErrors, 1.0, shard);
        if MetricName::ErrorsByCode.level() > self.level {
            return;
        }
        let count = self.current.errors.entry(Arc::from(code)).or_default();
        count.total.add(1.0);
        if let Some(shard) = shard.filter(|_| self.granularity == MetricsGranularity::Shard) {
            count
                .per_shard
                .entry(Arc::clone(shard.id))
                .or_default()
                .add(1.0);
        }
    }

    /// The snapshot, with the gauges and put-side counters the recorder does not hold.
    pub fn snapshot(&self, stream: &str, gauges: &[(MetricName, Statistics)]) -> MetricsSnapshot {
        if !self.drained {
            return self.snapshot_of(&self.current, stream, gauges);
        }
        let mut all = self.done.clone();
        all.merge(&self.current);
        self.snapshot_of(&all, stream, gauges)
    }

    /// What was recorded since the last drain (with `gauges` for the same interval), which then
    /// counts as done.
    #[cfg_attr(not(feature = "cloudwatch-metrics"), allow(dead_code))]
    pub fn drain(&mut self, stream: &str, gauges: &[(MetricName, Statistics)]) -> MetricsSnapshot {
        let current = std::mem::take(&mut self.current);
        let out = self.snapshot_of(&current, stream, gauges);
        self.done.merge(&current);
        self.drained = true;
        out
    }

    fn snapshot_of(
        &self,
        rows: &Rows,
        stream: &str,
        gauges: &[(MetricName, Statistics)],
    ) -> MetricsSnapshot {
        let mut out = MetricsSnapshot::default();
        if self.level == MetricsLevel::None {
            return out;
        }
        let stream_dims = || vec![("StreamName", stream.to_owned())];
        let shard_dims = |shard: &str| {
            vec![
                ("StreamName", stream.to_owned()),
                ("ShardId", shard.to_owned()),
            ]
        };
        let mut push = |name: MetricName, dimensions, statistics: Statistics| {
            if statistics.count > 0 && name.level() <= self.level {
                out.metrics.push(Metric {
                    name,
                    dimensions,
                    statistics,
                });
            }
        };
        let mut global = rows.global;
        for (name, statistics) in gauges {
            global[name.index()] = *statistics;
        }
        // One producer writes one stream: its stream-level figures are the global ones.
        for name in ALL_METRICS {
            if name == MetricName::ErrorsByCode {
                continue;
            }
            push(name, Vec::new(), global[name.index()]);
            if self.granularity >= MetricsGranularity::Stream {
                push(name, stream_dims(), global[name.index()]);
            }
        }
        let mut shards: Vec<&ShardRow> = rows.shards.iter().flatten().map(|row| &**row).collect();
        shards.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        for row in shards {
            for name in ALL_METRICS {
                if let Some(slot) = name.shard_slot() {
                    push(name, shard_dims(&row.shard_id), row.statistics[slot]);
                }
            }
        }
        let mut codes: Vec<_> = rows.errors.iter().collect();
        codes.sort_by(|a, b| a.0.cmp(b.0));
        for (code, count) in codes {
            let with_code = |mut dims: Vec<(&'static str, String)>| {
                dims.push(("ErrorCode", code.to_string()));
                dims
            };
            push(MetricName::ErrorsByCode, with_code(Vec::new()), count.total);
            if self.granularity >= MetricsGranularity::Stream {
                push(
                    MetricName::ErrorsByCode,
                    with_code(stream_dims()),
                    count.total,
                );
            }
            let mut per_shard: Vec<_> = count.per_shard.iter().collect();
            per_shard.sort_by(|a, b| a.0.cmp(b.0));
            for (shard, statistics) in per_shard {
                push(
                    MetricName::ErrorsByCode,
                    with_code(shard_dims(shard)),
                    *statistics,
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str) -> Arc<str> {
        Arc::from(id)
    }

    fn at(id: &Arc<str>, ordinal: u32) -> Option<ShardRef<'_>> {
        Some(ShardRef { id, ordinal })
    }

    #[test]
    fn samples_roll_up_from_shard_to_stream_to_global() {
        let mut recorder = Recorder::new(MetricsLevel::Detailed, MetricsGranularity::Shard);
        let (a, b) = (shard("shardId-a"), shard("shardId-b"));
        recorder.record(
            MetricName::UserRecordsPut,
            Statistics::repeated(1.0, 3),
            at(&a, 1),
        );
        recorder.add(MetricName::UserRecordsPut, 0.0, at(&b, 2));
        recorder.add(MetricName::RequestTime, 12.5, None);
        recorder.error("ProvisionedThroughputExceededException", at(&a, 1));
        recorder.error("ServiceUnavailable", None);
        let snapshot = recorder.snapshot("s", &[]);

        let put = snapshot.global(MetricName::UserRecordsPut);
        assert_eq!((put.count, put.sum, put.min, put.max), (4, 3.0, 0.0, 1.0));
        assert_eq!(
            snapshot.shard(MetricName::UserRecordsPut, "shardId-a").sum,
            3.0
        );
        assert_eq!(
            snapshot
                .shard(MetricName::UserRecordsPut, "shardId-b")
                .count,
            1
        );
        assert_eq!(snapshot.global(MetricName::RequestTime).average(), 12.5);
        assert_eq!(snapshot.global(MetricName::AllErrors).sum, 2.0);
        assert_eq!(snapshot.global(MetricName::ErrorsByCode).sum, 2.0);
        assert_eq!(snapshot.errors("ServiceUnavailable").sum, 1.0);
        assert_eq!(
            snapshot.shard(MetricName::ErrorsByCode, "shardId-a").sum,
            1.0
        );
        let stream_level = snapshot
            .metrics
            .iter()
            .filter(|m| m.name == MetricName::UserRecordsPut)
            .filter(|m| m.dimensions == vec![("StreamName", "s".to_owned())])
            .count();
        assert_eq!(stream_level, 1);
    }

    #[test]
    fn a_drain_reports_its_interval_only_and_snapshots_still_see_everything() {
        let (a, b) = (shard("shardId-a"), shard("shardId-b"));
        let record = |recorder: &mut Recorder, round: u32| {
            for i in 0..=round {
                let value = f64::from(10 * round + i);
                recorder.add(MetricName::BufferingTime, value, at(&a, 1));
                recorder.add(MetricName::UserRecordsPut, 1.0, at(&b, 2));
            }
            recorder.error(&format!("E{}", round % 2), at(&a, 1));
        };
        let mut draining = Recorder::new(MetricsLevel::Detailed, MetricsGranularity::Shard);
        let mut plain = Recorder::new(MetricsLevel::Detailed, MetricsGranularity::Shard);
        let mut drained = Vec::new();
        for round in 0..4 {
            record(&mut draining, round);
            record(&mut plain, round);
            drained.push(draining.drain("s", &[]));
            assert_eq!(draining.snapshot("s", &[]), plain.snapshot("s", &[]));
        }
        // Each interval's figures are that interval's, extremes included.
        let buffering = drained[2].shard(MetricName::BufferingTime, "shardId-a");
        assert_eq!(
            (buffering.count, buffering.min, buffering.max),
            (3, 20.0, 22.0)
        );
        assert_eq!(drained[3].errors("E1").sum, 1.0);
        assert_eq!(drained[3].errors("E0").count, 0);
        // Together they are everything.
        let total: u64 = drained
            .iter()
            .map(|d| d.shard(MetricName::UserRecordsPut, "shardId-b").count)
            .sum();
        assert_eq!(total, 1 + 2 + 3 + 4);
        assert!(draining.drain("s", &[]).metrics.is_empty(), "nothing new");
    }

    #[test]
    fn integer_samples_scale_once() {
        let s = Statistics::of_integers([3_000_000u64, 1_000_000, 2_000_000].into_iter(), 1e-6);
        assert_eq!((s.count, s.sum, s.min, s.max), (3, 6.0, 1.0, 3.0));
        assert_eq!(Statistics::of_integers(std::iter::empty(), 1.0).count, 0);
    }

    #[test]
    fn level_and_granularity_filter_what_is_kept() {
        let mut summary = Recorder::new(MetricsLevel::Summary, MetricsGranularity::Global);
        let a = shard("shardId-a");
        summary.add(MetricName::UserRecordsPut, 1.0, at(&a, 1));
        summary.add(MetricName::RequestTime, 5.0, None); // detailed: dropped
        let snapshot = summary.snapshot(
            "s",
            &[(MetricName::UserRecordsPending, Statistics::repeated(7.0, 1))],
        );
        assert_eq!(snapshot.global(MetricName::RequestTime).count, 0);
        assert_eq!(snapshot.global(MetricName::UserRecordsPending).count, 0);
        assert_eq!(snapshot.global(MetricName::UserRecordsPut).sum, 1.0);
        assert!(snapshot.metrics.iter().all(|m| m.dimensions.is_empty()));

        let mut none = Recorder::new(MetricsLevel::None, MetricsGranularity::Shard);
        none.add(MetricName::UserRecordsPut, 1.0, at(&a, 1));
        assert!(none.snapshot("s", &[]).metrics.is_empty());
    }

    #[test]
    fn names_units_and_levels_match_the_kpl() {
        assert_eq!(MetricName::UserRecordsDataPut.unit(), Unit::Bytes);
        assert_eq!(MetricName::BufferingTime.unit(), Unit::Milliseconds);
        assert_eq!(MetricName::RetriesPerRecord.unit(), Unit::Count);
        assert_eq!(MetricName::BufferingTime.level(), MetricsLevel::Summary);
        assert_eq!(MetricName::RequestTime.level(), MetricsLevel::Detailed);
        assert_eq!(
            MetricName::UserRecordsPerKinesisRecord.level(),
            MetricsLevel::Detailed
        );
        for (i, name) in ALL_METRICS.iter().enumerate() {
            assert_eq!(name.index(), i, "{}", name.as_str());
        }
        // Each metric with a shard dimension has its own place in a shard's row.
        let mut slots: Vec<usize> = ALL_METRICS.iter().filter_map(|m| m.shard_slot()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..SHARD_METRIC_COUNT).collect::<Vec<_>>());
    }
}
