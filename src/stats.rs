//! Counters the producer keeps as records move through it, and their snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct Counters {
    pub user_records_received: AtomicU64,
    pub user_records_put: AtomicU64,
    pub user_record_bytes_put: AtomicU64,
    pub user_records_failed: AtomicU64,
    pub failures_unobserved: AtomicU64,
    pub kinesis_records_put: AtomicU64,
    pub kinesis_bytes_put: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub entry_retries: AtomicU64,
    pub throttled_entries: AtomicU64,
    pub shard_map_refreshes: AtomicU64,
    pub records_resent_after_reshard: AtomicU64,
    pub metric_data_not_uploaded: AtomicU64,
    pub puts_found_backlog_full: AtomicU64,
    pub reliefs: AtomicU64,
    pub kinesis_records_joined: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A snapshot of what the producer has done so far. Cheap: a handful of atomic loads.
///
/// The counters of acknowledged records move once per answered request, just after its records'
/// receipts resolve; after `flush` or `stop` returns they include every record it waited for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// User records accepted by `put`.
    pub user_records_received: u64,
    /// User records acknowledged by Kinesis.
    pub user_records_put: u64,
    /// Data bytes of the acknowledged user records.
    pub user_record_bytes_put: u64,
    /// User records reported failed.
    pub user_records_failed: u64,
    /// Of those, failures nobody was subscribed to (they were logged instead).
    pub failures_unobserved: u64,
    /// Kinesis records (aggregates or plain records) acknowledged, including an aggregate
    /// written across a reshard whose records were then re-sent (Kinesis did take it).
    pub kinesis_records_put: u64,
    /// Bytes (data + partition key) of the acknowledged Kinesis records.
    pub kinesis_bytes_put: u64,
    /// PutRecords requests sent, retries included.
    pub requests: u64,
    /// PutRecords requests that failed as a whole.
    pub request_errors: u64,
    /// Kinesis records sent again after a failure.
    pub entry_retries: u64,
    /// Kinesis records refused with ProvisionedThroughputExceededException.
    pub throttled_entries: u64,
    /// Shard map reloads that succeeded: the periodic ones
    /// (`shard_map_refresh_interval`) and those a result asked for by showing a record on an
    /// unexpected shard.
    pub shard_map_refreshes: u64,
    /// User records sent again because their aggregate landed on a shard (after a reshard) that
    /// does not own all of them. Non-KCL consumers may see these records twice.
    pub records_resent_after_reshard: u64,
    /// User records accepted but not yet acknowledged or failed.
    pub user_records_pending: u64,
    /// Buffer bytes kept for aggregates to come, so that a busy shard does not allocate every
    /// aggregate anew: what empty aggregators keep for their shard's next aggregate (at most a
    /// sixteenth of `max_backlog_bytes` between all shards, a little over while aggregates
    /// close at once), and the buffers of acknowledged aggregates waiting for new ones (at most
    /// an eighth).
    pub idle_aggregator_room_bytes: u64,
    /// Metric data CloudWatch did not take (feature `cloudwatch-metrics`, with an upload
    /// configured): each was retried within its upload's time and then logged.
    pub metric_data_not_uploaded: u64,
    /// Puts that found the backlog full: they waited for room (`put`, `put_with_receipt`,
    /// `put_blocking`) or were refused (`try_put`). While one waits, lanes send without waiting
    /// for their deadline, and each wave of them may close aggregates early (`reliefs`).
    pub puts_found_backlog_full: u64,
    /// Times the producer closed its oldest aggregates early because puts found the backlog
    /// full while open aggregates held at least half of it (not lanes, requests in flight or
    /// retries: then Kinesis or the endpoint sets the pace, and nothing closes early).
    pub reliefs: u64,
    /// Order mode: Kinesis records that waited in a shard's queue while its one record in
    /// flight was out, and were joined into fuller aggregates before they left (each shard
    /// sends one Kinesis record per round trip, so a full one carries the most). Counted each
    /// time one is taken into a join: the rest of a join that filled an aggregate can be
    /// joined again with the records behind it.
    pub kinesis_records_joined: u64,
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let received = get(&self.user_records_received);
        let put = get(&self.user_records_put);
        let failed = get(&self.user_records_failed);
        Stats {
            user_records_received: received,
            user_records_put: put,
            user_record_bytes_put: get(&self.user_record_bytes_put),
            user_records_failed: failed,
            failures_unobserved: get(&self.failures_unobserved),
            kinesis_records_put: get(&self.kinesis_records_put),
            kinesis_bytes_put: get(&self.kinesis_bytes_put),
            requests: get(&self.requests),
            request_errors: get(&self.request_errors),
            entry_retries: get(&self.entry_retries),
            throttled_entries: get(&self.throttled_entries),
            shard_map_refreshes: get(&self.shard_map_refreshes),
            records_resent_after_reshard: get(&self.records_resent_after_reshard),
            user_records_pending: received.saturating_sub(put + failed),
            // Filled in by `Producer::stats`, which sees the aggregators.
            idle_aggregator_room_bytes: 0,
            metric_data_not_uploaded: get(&self.metric_data_not_uploaded),
            puts_found_backlog_full: get(&self.puts_found_backlog_full),
            reliefs: get(&self.reliefs),
            kinesis_records_joined: get(&self.kinesis_records_joined),
        }
    }
}
