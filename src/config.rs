//! The producer's configuration: a builder with validated, documented defaults.
//!
//! Defaults follow the KPL where the KPL is right (aggregation size, collection limits, buffered
//! time, TTL, in-flight requests, request timeout). Every value is checked at `build()`, and an
//! invalid one fails with the field's name and its allowed range.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::Client;

use crate::error::BuildError;
use crate::metrics::{MetricsGranularity, MetricsLevel};
use crate::retry::RetryPolicy;
use crate::shard_map::StreamId;

/// Kinesis' largest record when the stream allows it (10 MiB).
pub const MAX_RECORD_SIZE_LIMIT: usize = 10 << 20;
/// Kinesis' largest PutRecords request in current documentation (10 MiB).
pub const MAX_REQUEST_SIZE_LIMIT: usize = 10 << 20;
/// Records per PutRecords request.
pub const MAX_RECORDS_PER_REQUEST: usize = 500;

/// The largest aggregate a record of `max_record_size` bytes holds with its partition key (1 KiB
/// of room), and never under 64 bytes.
fn aggregate_max(max_record_size: usize) -> usize {
    max_record_size.saturating_sub(1024).max(64)
}

/// `record_ttl` when none is set (or this much past `record_max_buffered_time`, if that is
/// longer).
const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(30);

/// Supplies a partition key for records put without one.
pub type Partitioner = Arc<dyn Fn(&[u8]) -> String + Send + Sync>;

/// The default partitioner's key: a random version 4 UUID, written in place (no allocation).
/// Its bits come from a per-thread generator rather than the kernel (as `Uuid::new_v4` does,
/// one system call per key): a key only has to spread records evenly over the hash space.
pub(crate) fn random_partition_key() -> crate::record::UuidText {
    crate::record::UuidText::random_v4(crate::retry::random_u128())
}

/// The producer's settings; validated by `ProducerBuilder::resolve`. See [`ProducerBuilder`]
/// for what each one means.
#[derive(Clone)]
pub(crate) struct Config {
    pub max_backlog_records: usize,
    pub max_backlog_bytes: usize,
    pub max_record_size: usize,
    pub aggregation: bool,
    pub aggregation_max_size: usize,
    pub aggregation_max_count: usize,
    pub collection_max_count: usize,
    pub collection_max_size: usize,
    pub record_max_buffered_time: Duration,
    pub record_ttl: Duration,
    pub max_in_flight: usize,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    pub stop_timeout: Duration,
    /// `None`: the default, a random UUID per record ([`random_partition_key`]).
    pub partitioner: Option<Partitioner>,
    pub shard_map_refresh_interval: Duration,
    /// Percent of the per-shard limits; 0 turns the limiter off.
    pub rate_limit: u32,
    pub preserve_order: bool,
    pub metrics_level: MetricsLevel,
    pub metrics_granularity: MetricsGranularity,
    /// Whether `max_record_size` was set by the user (else the stream's own is adopted).
    pub max_record_size_explicit: bool,
    /// `aggregation_max_size` was set by the user (else it follows a lower `max_record_size`).
    pub aggregation_max_size_explicit: bool,
    /// `record_ttl` was set by the user (else it follows a longer `record_max_buffered_time`).
    pub record_ttl_explicit: bool,
    /// Where metrics are uploaded (CloudWatch client and namespace), if anywhere, and how often.
    #[cfg(feature = "cloudwatch-metrics")]
    pub metrics_upload_to: Option<(aws_sdk_cloudwatch::Client, String)>,
    #[cfg(feature = "cloudwatch-metrics")]
    pub metrics_upload_interval: Duration,
    /// The upload's call, once `resolve` has checked the namespace.
    #[cfg(feature = "cloudwatch-metrics")]
    pub metrics_upload: Option<crate::batch::cloudwatch::PutMetricData>,
}

/// Builds a [`Producer`](crate::Producer). Obtain one with `Producer::builder()`.
///
/// | setting | default | allowed |
/// |---|---|---|
/// | `stream_name` / `stream_arn` | — (one is required) | |
/// | `client` | built from aws-config's default chain | |
/// | `region`, `endpoint_url` | from the environment (`AWS_REGION`, `AWS_ENDPOINT_URL`) | |
/// | `max_backlog_records` | 100,000 | 1 ..= 2^60 − 1 |
/// | `max_backlog_bytes` | 64 MiB | ≥ `max_record_size` + 64 |
/// | `max_record_size` | 1 MiB | 1 KiB ..= 10 MiB |
/// | `aggregation` | on | |
/// | `aggregation_max_size` | 51,200 B, or `max_record_size` − 1 KiB if smaller | 64 B ..= `max_record_size` − 1 KiB (64 B at least); not checked with aggregation off |
/// | `aggregation_max_count` | 4,294,967,295 | ≥ 1 |
/// | `collection_max_count` | 500 | 1 ..= 500 |
/// | `collection_max_size` | 5 MiB | `max_record_size` ..= 10 MiB |
/// | `record_max_buffered_time` | 100 ms | 1 ms ..= 1 h |
/// | `record_ttl` | 30 s, or `record_max_buffered_time` + 30 s if 30 s does not outlast it | 100 ms ..= 1 day, > `record_max_buffered_time` |
/// | `max_in_flight` | 24 | 1 ..= 1,024 |
/// | `request_timeout` | 6 s | 100 ms ..= 10 min |
/// | `retry_base_delay` | 100 ms | 1 ms ..= `retry_max_delay` |
/// | `retry_max_delay` | 5 s | ≤ 10 min |
/// | `stop_timeout` | 30 s | ≤ 1 day |
/// | `shard_map_refresh_interval` | 60 s | 1 s ..= 1 day |
/// | `rate_limit` | 150 (%) | 0 (off) ..= 10,000 |
/// | `preserve_order` | off | |
/// | `metrics_level` | detailed | none, summary, detailed |
/// | `metrics_granularity` | shard | global, stream, shard |
/// | `cloudwatch_metrics` (feature `cloudwatch-metrics`) | off | a namespace of 1 to 255 characters, not `AWS/…` |
/// | `metrics_upload_interval` | 60 s | 100 ms ..= 1 day |
#[must_use]
#[derive(Default)]
pub struct ProducerBuilder {
    stream_name: Option<String>,
    stream_arn: Option<String>,
    client: Option<Client>,
    region: Option<String>,
    endpoint_url: Option<String>,
    config: Config,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_backlog_records: 100_000,
            max_backlog_bytes: 64 << 20,
            max_record_size: 1 << 20,
            aggregation: true,
            aggregation_max_size: 51_200,
            aggregation_max_count: u32::MAX as usize,
            collection_max_count: MAX_RECORDS_PER_REQUEST,
            collection_max_size: 5 << 20,
            record_max_buffered_time: Duration::from_millis(100),
            record_ttl: DEFAULT_RECORD_TTL,
            max_in_flight: 24,
            request_timeout: Duration::from_secs(6),
            retry: RetryPolicy::default(),
            stop_timeout: Duration::from_secs(30),
            partitioner: None,
            shard_map_refresh_interval: Duration::from_secs(60),
            rate_limit: 150,
            preserve_order: false,
            metrics_level: MetricsLevel::Detailed,
            metrics_granularity: MetricsGranularity::Shard,
            max_record_size_explicit: false,
            aggregation_max_size_explicit: false,
            record_ttl_explicit: false,
            #[cfg(feature = "cloudwatch-metrics")]
            metrics_upload_to: None,
            #[cfg(feature = "cloudwatch-metrics")]
            metrics_upload_interval: Duration::from_secs(60),
            #[cfg(feature = "cloudwatch-metrics")]
            metrics_upload: None,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $($(#[$doc])* pub fn $name(mut self, value: $ty) -> Self {
            self.config.$name = value;
            self
        })*
    };
}

impl ProducerBuilder {
    /// The stream to write to, by name.
    pub fn stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream_name = Some(name.into());
        self
    }

    /// The stream to write to, by ARN.
    pub fn stream_arn(mut self, arn: impl Into<String>) -> Self {
        self.stream_arn = Some(arn.into());
        self
    }

    /// Uses this client (its region, endpoint, credentials and HTTP settings). Its retry
    /// configuration applies to ListShards; PutRecords retries are the producer's own.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Region for the client built from aws-config (ignored with [`client`](Self::client)).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Endpoint override for the client built from aws-config (ignored with
    /// [`client`](Self::client)). `AWS_ENDPOINT_URL` is honoured without it.
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    setters! {
        /// Most records held between `put` and their end (acknowledged or failed).
        max_backlog_records: usize,
        /// Most bytes (data + keys) held between `put` and their end. A request goes out only
        /// while those in flight hold less than a quarter of it (so at most a quarter plus one
        /// request), which bounds memory when an endpoint stalls; a producer that must keep more
        /// bytes in flight (a fast stream far away) needs a larger backlog.
        max_backlog_bytes: usize,
        /// Packs user records into KPL aggregates. Off: one Kinesis record per user record.
        aggregation: bool,
        /// Most user records in one aggregate.
        aggregation_max_count: usize,
        /// Most Kinesis records in one PutRecords request.
        collection_max_count: usize,
        /// Most bytes (data + partition keys) in one PutRecords request.
        collection_max_size: usize,
        /// How long a record may wait for an aggregate or request to fill before it is sent.
        record_max_buffered_time: Duration,
        /// Most PutRecords requests in flight at once.
        max_in_flight: usize,
        /// How long one PutRecords request may take, from when its body is written (signing,
        /// sending, the answer), before it counts as failed (transient).
        request_timeout: Duration,
        /// How long `stop` keeps delivering before it reports what is left as failed.
        stop_timeout: Duration,
        /// How often the shard map is reloaded even when no result says it changed.
        shard_map_refresh_interval: Duration,
        /// Per-shard rate limit, in percent of Kinesis' shard limits (1,000 records/s and
        /// 1 MiB/s); 0 turns the limiter off.
        rate_limit: u32,
        /// Keeps the order of records per shard (so per partition key): one request in flight
        /// per shard, one Kinesis record per shard per request, retries before anything newer.
        /// A shard then carries at most `aggregation_max_size` per round trip (aggregates
        /// queued meanwhile are joined into full ones): over slow round trips, raise it.
        preserve_order: bool,
        /// Which metrics [`Producer::metrics`](crate::Producer::metrics) keeps: none, the
        /// KPL's summary ones, or all (default, as the KPL).
        metrics_level: MetricsLevel,
        /// Dimensions metrics are kept at: global, also per stream, also per shard (default,
        /// as the KPL).
        metrics_granularity: MetricsGranularity,
    }

    /// Largest record (data + partition key) accepted at `put`. Unset, the producer adopts the
    /// stream's `MaxRecordSizeInKiB` (DescribeStreamSummary) when the stream reports one; set,
    /// it is lowered to the stream's if the stream's is smaller.
    pub fn max_record_size(mut self, bytes: usize) -> Self {
        self.config.max_record_size = bytes;
        self.config.max_record_size_explicit = true;
        self
    }

    /// Largest aggregate in bytes, magic and checksum included. Unset, it is 51,200 bytes, or
    /// `max_record_size` − 1 KiB (at least 64) if that is smaller.
    pub fn aggregation_max_size(mut self, bytes: usize) -> Self {
        self.config.aggregation_max_size = bytes;
        self.config.aggregation_max_size_explicit = true;
        self
    }

    /// How long after `put` a record may keep being retried before it fails. Unset, it is 30 s,
    /// or `record_max_buffered_time` + 30 s if 30 s does not outlast the buffering time.
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.config.record_ttl = ttl;
        self.config.record_ttl_explicit = true;
        self
    }

    /// Wait before the first retry; each later retry waits twice as long, up to
    /// [`retry_max_delay`](Self::retry_max_delay), with jitter.
    pub fn retry_base_delay(mut self, delay: Duration) -> Self {
        self.config.retry.base_delay = delay;
        self
    }

    /// Longest wait between two attempts.
    pub fn retry_max_delay(mut self, delay: Duration) -> Self {
        self.config.retry.max_delay = delay;
        self
    }

    /// Uploads the metrics to CloudWatch under `namespace`, every
    /// [`metrics_upload_interval`](Self::metrics_upload_interval), as the KPL does: each
    /// upload holds the figures recorded since the previous one, one statistic set per metric
    /// and dimension set, at the configured level and granularity. Off by default.
    #[cfg(feature = "cloudwatch-metrics")]
    pub fn cloudwatch_metrics(
        mut self,
        client: aws_sdk_cloudwatch::Client,
        namespace: impl Into<String>,
    ) -> Self {
        self.config.metrics_upload_to = Some((client, namespace.into()));
        self
    }

    /// How often metrics are uploaded with [`cloudwatch_metrics`](Self::cloudwatch_metrics)
    /// (default 60 s, as the KPL's `MetricsUploadDelay`).
    #[cfg(feature = "cloudwatch-metrics")]
    pub fn metrics_upload_interval(mut self, interval: Duration) -> Self {
        self.config.metrics_upload_interval = interval;
        self
    }

    /// Supplies partition keys for [`Producer::put_data`](crate::Producer::put_data).
    /// Default: a random UUID per record.
    pub fn partitioner(mut self, f: impl Fn(&[u8]) -> String + Send + Sync + 'static) -> Self {
        self.config.partitioner = Some(Arc::new(f));
        self
    }

    /// Validates the settings and resolves the stream and the client. Loading the shard map is
    /// left to `Producer::build`.
    pub(crate) async fn resolve(self) -> Result<(Config, StreamId, Client), BuildError> {
        let stream = match (self.stream_name, self.stream_arn) {
            (Some(name), None) => StreamId::Name(name),
            (None, Some(arn)) => StreamId::Arn(arn),
            (None, None) => return Err(BuildError::MissingStream),
            (Some(_), Some(_)) => return Err(BuildError::AmbiguousStream),
        };
        let (StreamId::Name(name) | StreamId::Arn(name)) = &stream;
        if name.is_empty() {
            return Err(invalid("stream", "\"\"", "a non-empty stream name or ARN"));
        }
        let mut d = self.config;
        // Defaults that follow the settings they depend on, so that setting one alone works.
        let aggregate_max = aggregate_max(d.max_record_size);
        if !d.aggregation_max_size_explicit {
            d.aggregation_max_size = d.aggregation_max_size.min(aggregate_max);
        }
        if !d.record_ttl_explicit && d.record_ttl <= d.record_max_buffered_time {
            d.record_ttl = d
                .record_max_buffered_time
                .saturating_add(DEFAULT_RECORD_TTL);
        }
        check_range(
            "max_backlog_records",
            d.max_backlog_records,
            1,
            usize::MAX >> 4,
        )?;
        check_range(
            "max_record_size",
            d.max_record_size,
            1024,
            MAX_RECORD_SIZE_LIMIT,
        )?;
        // Room for the largest record and its explicit hash key (39 digits at most).
        check_range(
            "max_backlog_bytes",
            d.max_backlog_bytes,
            d.max_record_size + 64,
            usize::MAX >> 4,
        )?;
        if d.aggregation {
            check_range(
                "aggregation_max_size",
                d.aggregation_max_size,
                64,
                aggregate_max,
            )?;
        }
        check_range(
            "aggregation_max_count",
            d.aggregation_max_count,
            1,
            usize::MAX,
        )?;
        check_range(
            "collection_max_count",
            d.collection_max_count,
            1,
            MAX_RECORDS_PER_REQUEST,
        )?;
        check_range(
            "collection_max_size",
            d.collection_max_size,
            d.max_record_size,
            MAX_REQUEST_SIZE_LIMIT,
        )?;
        check_range("max_in_flight", d.max_in_flight, 1, 1024)?;
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        check_duration(
            "record_max_buffered_time",
            d.record_max_buffered_time,
            ms(1),
            secs(3600),
        )?;
        check_duration("record_ttl", d.record_ttl, ms(100), secs(86_400))?;
        if d.record_ttl <= d.record_max_buffered_time {
            return Err(invalid(
                "record_ttl",
                format!("{:?}", d.record_ttl),
                format!(
                    "longer than record_max_buffered_time ({:?}), or records expire before they are sent",
                    d.record_max_buffered_time
                ),
            ));
        }
        check_duration("request_timeout", d.request_timeout, ms(100), secs(600))?;
        check_duration("retry_max_delay", d.retry.max_delay, ms(1), secs(600))?;
        check_duration(
            "retry_base_delay",
            d.retry.base_delay,
            ms(1),
            d.retry.max_delay,
        )?;
        check_duration("stop_timeout", d.stop_timeout, Duration::ZERO, secs(86_400))?;
        check_duration(
            "shard_map_refresh_interval",
            d.shard_map_refresh_interval,
            secs(1),
            secs(86_400),
        )?;
        check_range("rate_limit", d.rate_limit as usize, 0, 10_000)?;
        #[cfg(feature = "cloudwatch-metrics")]
        let d = {
            let mut d = d;
            check_duration(
                "metrics_upload_interval",
                d.metrics_upload_interval,
                ms(100),
                secs(86_400),
            )?;
            if let Some((client, namespace)) = d.metrics_upload_to.take() {
                let call = crate::batch::cloudwatch::PutMetricData::new(client, namespace.clone())
                    .map_err(|_| {
                        invalid(
                            "cloudwatch_metrics",
                            format!("namespace {namespace:?}"),
                            "a namespace of 1 to 255 characters, not starting with \"AWS/\"",
                        )
                    })?;
                d.metrics_upload = Some(call);
            }
            d
        };

        let client = match self.client {
            Some(client) => client,
            None => {
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
                if let Some(region) = self.region {
                    loader = loader.region(aws_config::Region::new(region));
                }
                if let Some(url) = self.endpoint_url {
                    loader = loader.endpoint_url(url);
                }
                Client::new(&loader.load().await)
            }
        };
        Ok((d, stream, client))
    }
}

fn invalid(field: &'static str, value: impl ToString, allowed: impl ToString) -> BuildError {
    BuildError::InvalidConfig {
        field,
        value: value.to_string(),
        allowed: allowed.to_string(),
    }
}

fn check_range(
    field: &'static str,
    value: usize,
    min: usize,
    max: usize,
) -> Result<(), BuildError> {
    if value < min || value > max {
        return Err(invalid(field, value, format!("{min} ..= {max}")));
    }
    Ok(())
}

fn check_duration(
    field: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), BuildError> {
    if value < min || value > max {
        return Err(invalid(
            field,
            format!("{value:?}"),
            format!("{min:?} ..= {max:?}"),
        ));
    }
    Ok(())
}

impl Config {
    /// The record size limit once the stream's own (`MaxRecordSizeInKiB`) is known: adopted when
    /// the user set none, and never above the stream's. Kept within what a request and the
    /// backlog can hold.
    pub fn adopt_stream_record_size(&mut self, stream_kib: Option<i32>) {
        let Some(kib) = stream_kib.filter(|k| *k > 0) else {
            return;
        };
        let stream_max = (kib as usize).saturating_mul(1024);
        let wanted = if self.max_record_size_explicit {
            self.max_record_size.min(stream_max)
        } else {
            stream_max
        };
        self.max_record_size = wanted
            .min(self.collection_max_size)
            .min(self.max_backlog_bytes - 64)
            .min(MAX_RECORD_SIZE_LIMIT);
        // An aggregate, with its partition key, must still fit a record of the new size (the
        // same 1 KiB of room `resolve` asks for).
        let aggregate_max = aggregate_max(self.max_record_size);
        if self.aggregation_max_size > aggregate_max {
            tracing::warn!(
                configured = self.aggregation_max_size,
                adopted = aggregate_max,
                stream_max_record_size = self.max_record_size,
                "aggregation_max_size lowered to fit the stream's max record size"
            );
            self.aggregation_max_size = aggregate_max;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn error_of(builder: ProducerBuilder) -> String {
        match builder.resolve().await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an invalid config"),
        }
    }

    fn base() -> ProducerBuilder {
        ProducerBuilder::default()
            .stream_name("s")
            .region("us-east-1")
    }

    #[cfg(feature = "cloudwatch-metrics")]
    #[tokio::test]
    async fn a_bad_metrics_upload_is_refused_by_name() {
        let client = || {
            let config = aws_sdk_cloudwatch::Config::builder()
                .behavior_version(aws_sdk_cloudwatch::config::BehaviorVersion::latest())
                .region(aws_sdk_cloudwatch::config::Region::new("us-east-1"))
                .build();
            aws_sdk_cloudwatch::Client::from_conf(config)
        };
        let e = error_of(base().cloudwatch_metrics(client(), "AWS/Kinesis")).await;
        assert!(
            e.contains("cloudwatch_metrics") && e.contains("AWS/"),
            "{e}"
        );
        let e = error_of(base().cloudwatch_metrics(client(), "")).await;
        assert!(e.contains("cloudwatch_metrics"), "{e}");
        let e = error_of(base().metrics_upload_interval(Duration::from_millis(10))).await;
        assert!(
            e.contains("metrics_upload_interval") && e.contains("100ms"),
            "{e}"
        );
        let e = error_of(base().metrics_upload_interval(Duration::from_secs(86_401))).await;
        assert!(
            e.contains("metrics_upload_interval") && e.contains("86400s"),
            "{e}"
        );
        let ok = base()
            .cloudwatch_metrics(client(), "KinesisProducerLibrary")
            .resolve()
            .await;
        assert!(ok.is_ok_and(|(config, _, _)| config.metrics_upload.is_some()));
    }

    /// Every validated setting, below and above its range: each fails at `build` with the
    /// field's name.
    #[tokio::test]
    async fn every_setting_out_of_range_is_refused_by_name() {
        type Tune = fn(ProducerBuilder) -> ProducerBuilder;
        let cases: Vec<(&str, Tune)> = vec![
            ("max_backlog_records", |b| b.max_backlog_records(0)),
            ("max_backlog_records", |b| b.max_backlog_records(usize::MAX)),
            ("max_record_size", |b| b.max_record_size(1023)),
            ("max_record_size", |b| b.max_record_size((10 << 20) + 1)),
            ("max_backlog_bytes", |b| b.max_backlog_bytes(1 << 20)),
            ("max_backlog_bytes", |b| b.max_backlog_bytes(usize::MAX)),
            ("aggregation_max_size", |b| b.aggregation_max_size(63)),
            ("aggregation_max_size", |b| b.aggregation_max_size(1 << 20)),
            ("aggregation_max_count", |b| b.aggregation_max_count(0)),
            ("collection_max_count", |b| b.collection_max_count(0)),
            ("collection_max_count", |b| b.collection_max_count(501)),
            ("collection_max_size", |b| b.collection_max_size(1000)),
            ("collection_max_size", |b| {
                b.collection_max_size((10 << 20) + 1)
            }),
            ("max_in_flight", |b| b.max_in_flight(0)),
            ("max_in_flight", |b| b.max_in_flight(1025)),
            ("record_max_buffered_time", |b| {
                b.record_max_buffered_time(Duration::ZERO)
            }),
            ("record_max_buffered_time", |b| {
                b.record_max_buffered_time(Duration::from_secs(3601))
            }),
            ("record_ttl", |b| b.record_ttl(Duration::from_millis(99))),
            ("record_ttl", |b| b.record_ttl(Duration::from_secs(86_401))),
            ("record_ttl", |b| {
                b.record_ttl(Duration::from_secs(2))
                    .record_max_buffered_time(Duration::from_secs(2))
            }),
            ("request_timeout", |b| {
                b.request_timeout(Duration::from_millis(99))
            }),
            ("request_timeout", |b| {
                b.request_timeout(Duration::from_secs(601))
            }),
            ("retry_max_delay", |b| b.retry_max_delay(Duration::ZERO)),
            ("retry_max_delay", |b| {
                b.retry_max_delay(Duration::from_secs(601))
            }),
            ("retry_base_delay", |b| b.retry_base_delay(Duration::ZERO)),
            ("retry_base_delay", |b| {
                b.retry_base_delay(Duration::from_secs(10))
                    .retry_max_delay(Duration::from_secs(5))
            }),
            ("stop_timeout", |b| {
                b.stop_timeout(Duration::from_secs(86_401))
            }),
            ("shard_map_refresh_interval", |b| {
                b.shard_map_refresh_interval(Duration::from_millis(999))
            }),
            ("shard_map_refresh_interval", |b| {
                b.shard_map_refresh_interval(Duration::from_secs(86_401))
            }),
            ("rate_limit", |b| b.rate_limit(10_001)),
            ("stream", |_| ProducerBuilder::default().stream_name("")),
        ];
        for (field, tune) in cases {
            let e = error_of(tune(base())).await;
            assert!(e.contains(&format!("{field} =")), "{field}: {e}");
            assert!(e.contains("allowed"), "{field}: {e}");
        }
        let none = ProducerBuilder::default().region("us-east-1");
        assert!(error_of(none).await.contains("no stream given"));
        let both = base().stream_arn("arn:aws:kinesis:us-east-1:1:stream/s");
        assert!(error_of(both)
            .await
            .contains("both stream_name and stream_arn"));
    }

    #[tokio::test]
    async fn invalid_values_name_the_field_and_the_range() {
        let e = error_of(base().collection_max_count(501)).await;
        assert!(
            e.contains("collection_max_count = 501") && e.contains("1 ..= 500"),
            "{e}"
        );
        let e = error_of(base().max_record_size(11 << 20)).await;
        assert!(
            e.contains("max_record_size") && e.contains("10485760"),
            "{e}"
        );
        let e = error_of(base().max_in_flight(0)).await;
        assert!(e.contains("max_in_flight = 0"), "{e}");
        let e = error_of(base().record_ttl(Duration::from_millis(1))).await;
        assert!(e.contains("record_ttl"), "{e}");
        let e = error_of(
            base()
                .record_max_buffered_time(Duration::from_secs(1))
                .record_ttl(Duration::from_millis(500)),
        )
        .await;
        assert!(e.contains("longer than record_max_buffered_time"), "{e}");
        let e = error_of(base().max_backlog_bytes(1 << 20)).await;
        assert!(e.contains("max_backlog_bytes"), "{e}");
        let e = error_of(base().max_backlog_records(usize::MAX)).await;
        assert!(e.contains("max_backlog_records"), "{e}");
        let e = error_of(base().max_record_size(6 << 20)).await;
        assert!(e.contains("collection_max_size"), "{e}");
        let e = error_of(ProducerBuilder::default()).await;
        assert!(e.contains("stream_name or stream_arn"), "{e}");
        let e = error_of(base().stream_arn("arn")).await;
        assert!(e.contains("both"), "{e}");
    }

    #[tokio::test]
    async fn defaults_follow_the_settings_they_depend_on() {
        // The smallest record size alone: the default aggregate shrinks to fit it.
        let (config, ..) = base().max_record_size(1024).resolve().await.unwrap();
        assert_eq!(config.aggregation_max_size, 64);
        let (config, ..) = base().max_record_size(10_000).resolve().await.unwrap();
        assert_eq!(config.aggregation_max_size, 10_000 - 1024);
        // Without aggregation the aggregate size does not matter.
        let (config, ..) = base()
            .max_record_size(20_000)
            .aggregation(false)
            .aggregation_max_size(1 << 20)
            .resolve()
            .await
            .unwrap();
        assert_eq!(config.max_record_size, 20_000);
        // Set by the user, it is checked, not lowered.
        let e = error_of(base().max_record_size(10_000).aggregation_max_size(51_200)).await;
        assert!(e.contains("aggregation_max_size = 51200"), "{e}");
        // A long buffering time alone: the default TTL outlasts it.
        let (config, ..) = base()
            .record_max_buffered_time(Duration::from_secs(60))
            .resolve()
            .await
            .unwrap();
        assert_eq!(config.record_ttl, Duration::from_secs(90));
        let (config, ..) = base().resolve().await.unwrap();
        assert_eq!(config.record_ttl, Duration::from_secs(30));
    }

    #[test]
    fn the_streams_record_size_is_adopted_unless_set_lower() {
        let mut config = Config::default();
        config.adopt_stream_record_size(Some(2048));
        assert_eq!(config.max_record_size, 2 << 20);
        config.adopt_stream_record_size(None);
        assert_eq!(config.max_record_size, 2 << 20);
        // A stream allowing 10 MiB: capped by what one request may carry (5 MiB by default).
        let mut config = Config::default();
        config.adopt_stream_record_size(Some(10_240));
        assert_eq!(config.max_record_size, 5 << 20);
        // Set by the user: kept if lower, lowered to the stream's if higher.
        let mut config = Config {
            max_record_size: 100_000,
            max_record_size_explicit: true,
            ..Config::default()
        };
        config.adopt_stream_record_size(Some(1024));
        assert_eq!(config.max_record_size, 100_000);
        let mut config = Config {
            max_record_size: 3 << 20,
            max_record_size_explicit: true,
            ..Config::default()
        };
        config.adopt_stream_record_size(Some(1024));
        assert_eq!(config.max_record_size, 1 << 20);
        // Aggregates set larger than the stream's records allow shrink with them.
        let mut config = Config {
            max_record_size: 4 << 20,
            max_record_size_explicit: true,
            aggregation_max_size: 2 << 20,
            ..Config::default()
        };
        config.adopt_stream_record_size(Some(1024));
        assert_eq!(config.max_record_size, 1 << 20);
        assert_eq!(config.aggregation_max_size, (1 << 20) - 1024);
        // The default aggregate size fits any stream's records and stays.
        let mut config = Config::default();
        config.adopt_stream_record_size(Some(1024));
        assert_eq!(config.aggregation_max_size, 51_200);
    }

    #[tokio::test]
    async fn defaults_are_valid_and_match_the_kpl() {
        let (config, _, _) = base().resolve().await.expect("valid");
        assert_eq!(config.aggregation_max_size, 51_200);
        assert_eq!(config.collection_max_count, 500);
        assert_eq!(config.collection_max_size, 5 << 20);
        assert_eq!(config.record_max_buffered_time, Duration::from_millis(100));
        assert_eq!(config.record_ttl, Duration::from_secs(30));
        assert_eq!(config.max_in_flight, 24);
        assert_eq!(config.request_timeout, Duration::from_secs(6));
        assert!(config.partitioner.is_none(), "random UUIDs");
    }

    #[test]
    fn default_keys_are_distinct_v4_uuids_spread_evenly_over_the_shards() {
        let map = crate::ShardMap::uniform(16);
        let mut per_shard = [0u32; 16];
        let mut seen = std::collections::HashSet::new();
        for _ in 0..160_000 {
            let key = random_partition_key().as_str().to_owned();
            let uuid = uuid::Uuid::parse_str(&key).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 4, "{key}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{key}");
            assert_eq!(key, uuid.hyphenated().to_string(), "the canonical text");
            let hash = crate::record::partition_key_hash(&key);
            per_shard[map.shard_index(hash).expect("covered")] += 1;
            assert!(seen.insert(key), "a repeated key");
        }
        // 10,000 expected per shard; a fair generator stays within a few percent.
        for count in per_shard {
            assert!((9_500..=10_500).contains(&count), "{per_shard:?}");
        }
    }
}
