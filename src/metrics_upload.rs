//! Step 7b (feature `cloudwatch-metrics`): uploads the metrics to CloudWatch, as the KPL does.
//!
//! Every `metrics_upload_interval`, what was recorded since the last upload
//! ([`Recorder::drain`](crate::metrics::Recorder::drain)) goes out as one statistic set per
//! metric and dimension set, through the CloudWatch batch helper (paging, retries with backoff,
//! and the data it could not send reported). A last upload follows the producer's end, and
//! `stop` waits for it within its timeout. Data CloudWatch did not take are logged and counted
//! in [`Stats::metric_data_not_uploaded`](crate::Stats::metric_data_not_uploaded); the
//! producer's records are never held up by an upload.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};
use tokio::time::{Instant, MissedTickBehavior};

use crate::batch::cloudwatch::PutMetricData;
use crate::batch::{BatchCall, BatchOptions};
use crate::metrics::{Metric, Unit};
use crate::producer::Shared;
use crate::stats::add;
use crate::sync::lock;

/// How long one upload may take, retries included: its interval, but at least
/// `UPLOAD_BUDGET_MIN` (a short interval must not cut off a slow but working CloudWatch; a
/// longer upload delays the next tick, it never overlaps it) and at most `UPLOAD_BUDGET_MAX`.
/// The last one, after the producer's end, gets at most `LAST_UPLOAD_BUDGET` (and `stop` waits
/// no longer than its own timeout).
const UPLOAD_BUDGET_MIN: Duration = Duration::from_secs(10);
const UPLOAD_BUDGET_MAX: Duration = Duration::from_secs(30);
const LAST_UPLOAD_BUDGET: Duration = Duration::from_secs(10);

/// Uploads every interval until the producer has ended, then once more, and says so.
pub(crate) async fn run(shared: Arc<Shared>, call: PutMetricData) {
    let interval = shared.config.metrics_upload_interval;
    let mut done = shared.done.subscribe();
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut received_before = 0;
    loop {
        let last = tokio::select! {
            // The end first: a tick due at the same moment must not start a regular upload,
            // with its longer budget, that `stop` would wait for.
            biased;
            _ = done.wait_for(|done| *done) => true,
            _ = ticks.tick() => false,
        };
        let budget = if last {
            LAST_UPLOAD_BUDGET
        } else {
            interval.clamp(UPLOAD_BUDGET_MIN, UPLOAD_BUDGET_MAX)
        };
        send(&shared, &call, budget, &mut received_before).await;
        if last {
            break;
        }
    }
    shared.metrics_uploaded.send_replace(true);
}

/// One upload: the interval's figures, with the gauges read now.
async fn send(shared: &Shared, call: &PutMetricData, budget: Duration, received_before: &mut u64) {
    let received = shared.stats.user_records_received.load(Ordering::Relaxed);
    let gauges = shared.gauges(received - *received_before);
    *received_before = received;
    let snapshot = lock(&shared.metrics).drain(shared.stream.name(), &gauges);
    let at = DateTime::from(SystemTime::now());
    let data: Vec<MetricDatum> = snapshot.metrics.iter().map(|m| datum(m, at)).collect();
    if data.is_empty() {
        return;
    }
    let count = data.len();
    let options = BatchOptions {
        time_budget: budget,
        ..BatchOptions::default()
    };
    match call.send_all(data, &options).await {
        Ok(outcome) if outcome.is_complete() => {
            tracing::debug!(
                data = count,
                requests = outcome.requests,
                "metrics uploaded"
            );
        }
        Ok(outcome) => {
            let lost = outcome.unprocessed.len();
            add(&shared.stats.metric_data_not_uploaded, lost as u64);
            tracing::warn!(
                data = lost,
                of = count,
                reason = %outcome.unprocessed[0].reason,
                "metric data were not uploaded to CloudWatch"
            );
        }
        Err(error) => {
            // Unreachable with the options above, which are valid.
            add(&shared.stats.metric_data_not_uploaded, count as u64);
            tracing::warn!(%error, data = count, "metrics upload refused its options");
        }
    }
}

/// One metric as a CloudWatch datum: its statistic set, unit and dimensions.
fn datum(metric: &Metric, at: DateTime) -> MetricDatum {
    let s = &metric.statistics;
    let statistics = StatisticSet::builder()
        .sample_count(s.count as f64)
        .sum(s.sum)
        .minimum(s.min)
        .maximum(s.max)
        .build();
    let unit = match metric.name.unit() {
        Unit::Count => StandardUnit::Count,
        Unit::Bytes => StandardUnit::Bytes,
        Unit::Milliseconds => StandardUnit::Milliseconds,
    };
    let dimensions = metric
        .dimensions
        .iter()
        .map(|(name, value)| Dimension::builder().name(*name).value(value).build());
    MetricDatum::builder()
        .metric_name(metric.name.as_str())
        .set_dimensions(Some(dimensions.collect()))
        .statistic_values(statistics)
        .unit(unit)
        .timestamp(at)
        .build()
}
