//! Step 5: the sender. One task collects finished Kinesis records into PutRecords requests,
//! sends up to `max_in_flight` of them at once, and decides the fate of every entry of every
//! result: acknowledged, retried after a backoff, or failed.
//!
//! A request goes out when it is full (500 records or `collection_max_size` bytes) or when its
//! oldest user record has waited `record_max_buffered_time`. Only the failed entries of a
//! request are retried; see [`crate::retry`] for which errors qualify.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::sync::{mpsc, watch};

use crate::aggregator::{self, Outgoing};
use crate::config::Config;
use crate::error::{DeliveryError, FailureKind};
use crate::producer::{Inbound, Shared};
use crate::retry::{classify_sdk_error, entry_error_is_transient, AttemptError};
use crate::shard_map::StreamId;
use crate::stats::add;

/// Runs the sender until `stop` has ended with every record acknowledged or failed.
pub(crate) async fn run(shared: Arc<Shared>, inbound: mpsc::UnboundedReceiver<Inbound>) {
    let (results_tx, results_rx) = mpsc::unbounded_channel();
    let mut sender = Sender {
        shared,
        inbound,
        pending: VecDeque::new(),
        pending_bytes: 0,
        pending_oldest: None,
        parked: Vec::new(),
        isolating: VecDeque::new(),
        deadlines: BinaryHeap::new(),
        retries: BinaryHeap::new(),
        retry_seq: 0,
        in_flight: 0,
        results_tx,
        results_rx,
        flush_requested: false,
        stop_deadline: None,
        cancel: watch::Sender::new(false),
    };
    sender.run().await;
}

struct Sender {
    shared: Arc<Shared>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    /// Kinesis records waiting for a request, oldest first (retries go back to the front).
    pending: VecDeque<Outgoing>,
    pending_bytes: usize,
    /// The earliest `put` among pending records: the next request is due at this plus
    /// `record_max_buffered_time`.
    pending_oldest: Option<Instant>,
    /// Aggregates written to a shard the map did not predict, waiting for the reloaded map to
    /// tell whether that shard owns all their records.
    parked: Vec<(Outgoing, Arc<str>)>,
    /// Halves of requests refused as a whole for invalid input, sent on their own to find the
    /// entry at fault.
    isolating: VecDeque<Vec<Outgoing>>,
    /// Aggregator deadlines: (when, routing generation, slot, cycle).
    deadlines: BinaryHeap<Reverse<(Instant, u64, usize, u64)>>,
    /// Records waiting out their backoff.
    retries: BinaryHeap<Reverse<Retry>>,
    retry_seq: u64,
    in_flight: usize,
    results_tx: mpsc::UnboundedSender<Completed>,
    results_rx: mpsc::UnboundedReceiver<Completed>,
    flush_requested: bool,
    stop_deadline: Option<Instant>,
    /// Set at the stop deadline: requests in flight give up.
    cancel: watch::Sender<bool>,
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
    outcome: Outcome,
}

enum Outcome {
    Answered(PutRecordsOutput),
    Failed(AttemptError),
    Cancelled,
}

impl Sender {
    async fn run(&mut self) {
        loop {
            let now = Instant::now();
            self.fire_deadlines(now);
            self.release_retries(now);
            if self.stop_deadline.is_some_and(|deadline| now >= deadline) {
                self.abandon_all();
            }
            self.dispatch(now);
            if self.stop_deadline.is_some()
                && self.pending.is_empty()
                && self.isolating.is_empty()
                && self.parked.is_empty()
                && self.retries.is_empty()
                && self.in_flight == 0
            {
                match self.inbound.try_recv() {
                    Ok(message) => {
                        self.handle(message);
                        continue;
                    }
                    Err(_) => break,
                }
            }
            let wake = self.next_wake(now);
            tokio::select! {
                Some(completed) = self.results_rx.recv() => self.complete(completed),
                Some(message) = self.inbound.recv() => self.handle(message),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn handle(&mut self, message: Inbound) {
        match message {
            Inbound::Record(outgoing) => self.enqueue_pending(outgoing, false),
            Inbound::Deadline {
                at,
                generation,
                slot,
                cycle,
            } => self.deadlines.push(Reverse((at, generation, slot, cycle))),
            Inbound::Flush => self.flush_requested = true,
            Inbound::Stop { deadline } => {
                self.stop_deadline = Some(self.stop_deadline.map_or(deadline, |d| d.min(deadline)));
            }
            Inbound::MapRefreshed => {
                for (outgoing, actual) in std::mem::take(&mut self.parked) {
                    self.settle_misplaced(outgoing, actual, false);
                }
            }
        }
    }

    /// Queues a Kinesis record for the next request; a retry goes to the front.
    fn enqueue_pending(&mut self, outgoing: Outgoing, front: bool) {
        self.pending_bytes += outgoing.request_size();
        let put = outgoing.oldest_put;
        self.pending_oldest = Some(self.pending_oldest.map_or(put, |oldest| oldest.min(put)));
        if front {
            self.pending.push_front(outgoing);
        } else {
            self.pending.push_back(outgoing);
        }
    }

    fn fire_deadlines(&mut self, now: Instant) {
        while let Some(&Reverse((at, generation, slot, cycle))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            // The aggregate comes back through the inbound channel, in order with the rest.
            aggregator::flush_expired(&self.shared, generation, slot, cycle);
        }
    }

    fn release_retries(&mut self, now: Instant) {
        while self.retries.peek().is_some_and(|Reverse(r)| r.at <= now) {
            if let Some(Reverse(retry)) = self.retries.pop() {
                self.enqueue_pending(retry.outgoing, true);
            }
        }
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(3600);
        if let Some(Reverse((at, ..))) = self.deadlines.peek() {
            wake = wake.min(*at);
        }
        if let Some(Reverse(retry)) = self.retries.peek() {
            wake = wake.min(retry.at);
        }
        if let Some(oldest) = self.pending_oldest {
            if self.in_flight < self.shared.config.max_in_flight {
                wake = wake.min(oldest + self.shared.config.record_max_buffered_time);
            }
        }
        if let Some(deadline) = self.stop_deadline {
            wake = wake.min(deadline);
        }
        wake
    }

    fn should_send(&self, now: Instant) -> bool {
        let config = &self.shared.config;
        let Some(oldest) = self.pending_oldest else {
            return false;
        };
        self.flush_requested
            || self.stop_deadline.is_some()
            || self.pending.len() >= config.collection_max_count
            || self.pending_bytes >= config.collection_max_size
            || oldest + config.record_max_buffered_time <= now
    }

    fn dispatch(&mut self, now: Instant) {
        while self.in_flight < self.shared.config.max_in_flight {
            let Some(mut batch) = self.isolating.pop_front() else {
                break;
            };
            let ttl = self.shared.config.record_ttl;
            for outgoing in std::mem::take(&mut batch) {
                if now >= outgoing.oldest_put + ttl {
                    self.expire(outgoing);
                } else {
                    batch.push(outgoing);
                }
            }
            if !batch.is_empty() {
                self.spawn_request(batch);
            }
        }
        while self.in_flight < self.shared.config.max_in_flight && self.should_send(now) {
            let batch = self.take_batch(now);
            if !batch.is_empty() {
                self.spawn_request(batch);
            }
        }
        if self.pending.is_empty() {
            self.flush_requested = false;
        }
    }

    /// Takes the next request's worth of records, failing those whose TTL has passed.
    fn take_batch(&mut self, now: Instant) -> Vec<Outgoing> {
        let config = &self.shared.config;
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(front) = self.pending.front() {
            let size = front.request_size();
            if !joins_request(batch.len(), bytes, size, config) {
                break;
            }
            let Some(outgoing) = self.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= size;
            if now >= outgoing.oldest_put + config.record_ttl {
                self.expire(outgoing);
                continue;
            }
            bytes += size;
            batch.push(outgoing);
        }
        self.pending_oldest = self.pending.iter().map(|o| o.oldest_put).min();
        batch
    }

    fn spawn_request(&mut self, mut batch: Vec<Outgoing>) {
        self.in_flight += 1;
        for outgoing in &mut batch {
            outgoing.attempts += 1;
        }
        add(&self.shared.stats.requests, 1);
        let results = self.results_tx.clone();
        let mut cancelled = self.cancel.subscribe();
        let mut in_flight = InFlight {
            shared: Arc::clone(&self.shared),
            batch,
        };
        tokio::spawn(async move {
            let shared = Arc::clone(&in_flight.shared);
            let timeout = shared.config.request_timeout;
            let outcome = tokio::select! {
                result = tokio::time::timeout(timeout, put_records(&shared, &in_flight.batch)) => match result {
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
            let batch = std::mem::take(&mut in_flight.batch);
            if let Err(mpsc::error::SendError(completed)) =
                results.send(Completed { batch, outcome })
            {
                // The sender is gone: the guard reports these records as it drops.
                in_flight.batch.extend(completed.batch);
            }
        });
    }

    fn complete(&mut self, completed: Completed) {
        self.in_flight -= 1;
        let Completed { batch, outcome } = completed;
        match outcome {
            Outcome::Answered(output) if output.records().len() == batch.len() => {
                let mut stale_map = false;
                for (outgoing, result) in batch.into_iter().zip(output.records()) {
                    match result.error_code() {
                        None => {
                            let actual = result.shard_id().unwrap_or_default();
                            let misplaced = outgoing
                                .shard_id
                                .as_deref()
                                .is_some_and(|expected| !actual.is_empty() && expected != actual);
                            stale_map |= misplaced;
                            if misplaced && outgoing.entry.aggregated {
                                self.settle_misplaced(outgoing, Arc::from(actual), true);
                            } else {
                                // A plain record is wherever Kinesis routed its own key: fine.
                                self.shared.acknowledge(outgoing);
                            }
                        }
                        Some(code) => {
                            if code == "ProvisionedThroughputExceededException" {
                                add(&self.shared.stats.throttled_entries, 1);
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
                    .metas
                    .iter()
                    .all(|m| (shard.start..=shard.end).contains(&m.hash_key)) =>
            {
                self.shared.acknowledge(outgoing);
            }
            None if may_wait => self.parked.push((outgoing, actual)),
            _ => {
                add(
                    &self.shared.stats.records_resent_after_reshard,
                    outgoing.records.len() as u64,
                );
                tracing::debug!(shard = %actual, records = outgoing.records.len(), "re-sending an aggregate written to a shard that does not own all its records");
                aggregator::reroute(&self.shared, outgoing.records, outgoing.metas);
                if self.stop_deadline.is_some() {
                    // Stopping: the aggregators are not waited for, so send them out now.
                    aggregator::flush_all(&self.shared);
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
        for outgoing in batch {
            self.retry_or_fail(outgoing, error.clone());
        }
    }

    fn retry_or_fail(&mut self, mut outgoing: Outgoing, error: AttemptError) {
        if !error.transient {
            let failure = DeliveryError {
                code: error.code.into(),
                message: error.message.into(),
                kind: FailureKind::Permanent,
            };
            self.shared.fail(outgoing, failure);
            return;
        }
        let at = Instant::now() + self.shared.config.retry.backoff(outgoing.attempts);
        outgoing.last_error = Some(error);
        if at >= outgoing.oldest_put + self.shared.config.record_ttl {
            // It would expire while waiting: fail now with its last error.
            self.expire(outgoing);
            return;
        }
        add(&self.shared.stats.entry_retries, 1);
        self.retry_seq += 1;
        self.retries.push(Reverse(Retry {
            at,
            seq: self.retry_seq,
            outgoing,
        }));
    }

    fn expire(&self, outgoing: Outgoing) {
        let (code, message) = match &outgoing.last_error {
            Some(last) => (last.code.as_str(), last.message.as_str()),
            None => ("Expired", "the record's TTL passed before it could be sent"),
        };
        let error = DeliveryError {
            code: code.into(),
            message: message.into(),
            kind: FailureKind::Expired,
        };
        self.shared.fail(outgoing, error);
    }

    /// The stop deadline passed: everything not yet in flight fails now, and requests in flight
    /// are told to give up.
    fn abandon_all(&mut self) {
        for outgoing in self.pending.drain(..) {
            self.shared.fail(
                outgoing,
                DeliveryError::stopped("the stop deadline passed before the record was sent"),
            );
        }
        self.pending_bytes = 0;
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
        for (outgoing, shard) in self.parked.drain(..) {
            let message = format!("the stop deadline passed before the records could be re-sent; they were written to {shard}, which may not own all of them");
            self.shared.fail(outgoing, DeliveryError::stopped(&message));
        }
        self.pending_oldest = None;
        self.cancel.send_replace(true);
    }
}

impl Drop for Sender {
    /// Normally everything is done by now. If the task ends early (its runtime shut down, or a
    /// panic), whatever it still holds is reported failed rather than lost.
    fn drop(&mut self) {
        let error =
            DeliveryError::stopped("the producer's sender task ended before the record was sent");
        for outgoing in self.pending.drain(..) {
            self.shared.fail(outgoing, error.clone());
        }
        for Reverse(retry) in self.retries.drain() {
            self.shared.fail(retry.outgoing, error.clone());
        }
        for outgoing in self.isolating.drain(..).flatten() {
            self.shared.fail(outgoing, error.clone());
        }
        for (outgoing, _) in self.parked.drain(..) {
            self.shared.fail(outgoing, error.clone());
        }
        self.inbound.close();
        while let Ok(message) = self.inbound.try_recv() {
            if let Inbound::Record(outgoing) = message {
                self.shared.fail(outgoing, error.clone());
            }
        }
        self.shared.finish();
    }
}

/// Whether a Kinesis record of `size` bytes may join a request that already holds `count`
/// records of `bytes` bytes. The first record always may: validation keeps every record within
/// `max_record_size`, which is at most `collection_max_size`.
fn joins_request(count: usize, bytes: usize, size: usize, config: &Config) -> bool {
    count == 0
        || (count < config.collection_max_count && bytes + size <= config.collection_max_size)
}

/// A request's records while its task runs. If the task is dropped before it hands them back
/// (its runtime shut down), they are reported failed rather than lost.
struct InFlight {
    shared: Arc<Shared>,
    batch: Vec<Outgoing>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for outgoing in self.batch.drain(..) {
            self.shared.fail(
                outgoing,
                DeliveryError::stopped("the producer's request task ended before its answer; the records may have been written"),
            );
        }
    }
}

/// Whole-request errors that mean "something in this request is invalid".
fn is_invalid_input(code: &str) -> bool {
    matches!(
        code,
        "ValidationException" | "InvalidArgumentException" | "SerializationException"
    )
}

/// One PutRecords call, with the SDK's retries off (the sender retries, per entry).
async fn put_records(
    shared: &Shared,
    batch: &[Outgoing],
) -> Result<PutRecordsOutput, AttemptError> {
    let mut entries = Vec::with_capacity(batch.len());
    for outgoing in batch {
        let entry = PutRecordsRequestEntry::builder()
            .data(Blob::new(outgoing.entry.data.to_vec()))
            .partition_key(outgoing.entry.partition_key.clone())
            .set_explicit_hash_key(outgoing.entry.explicit_hash_key.clone())
            .build()
            .map_err(|e| AttemptError {
                code: "ConstructionFailure".to_owned(),
                message: e.to_string(),
                transient: false,
            })?;
        entries.push(entry);
    }
    let request = shared.client.put_records().set_records(Some(entries));
    let request = match &shared.stream {
        StreamId::Name(name) => request.stream_name(name),
        StreamId::Arn(arn) => request.stream_arn(arn),
    };
    request
        .customize()
        .config_override(
            aws_sdk_kinesis::config::Config::builder().retry_config(RetryConfig::disabled()),
        )
        .send()
        .await
        .map_err(|e| classify_sdk_error(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
