//! Step 5a: per-shard rate limiting. Kinesis takes 1,000 records and 1 MiB per second per shard
//! (an aggregate counts as one record). Each shard gets a token bucket for records and one for
//! bytes, filled at `rate_limit` percent of those limits, so a hot shard backs off locally
//! instead of burning requests on throttling errors.
//!
//! The allowance adapts: throttling halves the shard's allowance (multiplicative decrease, down
//! to 10% of the shard limit), at most once per second, the window Kinesis measures in, so that
//! several entries throttled by one overload count once. Success gives it back (additive
//! increase, up to `rate_limit`): 1% of the limit per acknowledged entry, and 20% per second of
//! success, so that a shard of large records, acknowledged a few times a second at the floor,
//! climbs back in seconds rather than minutes. Buckets hold one second's worth, so an idle shard
//! can send a burst.

use std::time::{Duration, Instant};

/// Kinesis' per-shard write limits.
const SHARD_RECORDS_PER_SECOND: f64 = 1_000.0;
const SHARD_BYTES_PER_SECOND: f64 = 1_048_576.0;
/// The allowance never falls below this share of the shard limit.
const FLOOR: f64 = 0.1;
/// What one acknowledged entry gives back.
const STEP: f64 = 0.01;
/// What each second of success gives back, however many entries it carried.
const INCREASE_PER_SECOND: f64 = 0.2;
/// Throttling within this long of the last decrease is the same overload.
const DECREASE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    /// Share of the shard limit allowed now.
    allowance: f64,
    /// Share allowed at most (`rate_limit` / 100).
    ceiling: f64,
    records: f64,
    bytes: f64,
    refilled: Instant,
    /// When the allowance was last halved.
    decreased: Option<Instant>,
    /// Up to when success has been counted into the allowance.
    grown: Instant,
}

impl Limiter {
    /// A full bucket at `rate_limit` percent of the shard limits.
    pub fn new(rate_limit_percent: u32, now: Instant) -> Self {
        let ceiling = f64::from(rate_limit_percent) / 100.0;
        Limiter {
            allowance: ceiling,
            ceiling,
            records: ceiling * SHARD_RECORDS_PER_SECOND,
            bytes: ceiling * SHARD_BYTES_PER_SECOND,
            refilled: now,
            decreased: None,
            grown: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        let (record_cap, byte_cap) = self.capacity();
        self.records =
            (self.records + elapsed * self.allowance * SHARD_RECORDS_PER_SECOND).min(record_cap);
        self.bytes = (self.bytes + elapsed * self.allowance * SHARD_BYTES_PER_SECOND).min(byte_cap);
    }

    fn capacity(&self) -> (f64, f64) {
        (
            self.allowance * SHARD_RECORDS_PER_SECOND,
            self.allowance * SHARD_BYTES_PER_SECOND,
        )
    }

    /// Takes room for one Kinesis record of `bytes` bytes if the bucket has it. A record larger
    /// than the whole byte bucket goes when the bucket is full, leaving it in debt.
    pub fn try_take(&mut self, bytes: usize, now: Instant) -> bool {
        if self.allows(bytes, now) {
            self.records -= 1.0;
            self.bytes -= bytes as f64;
            true
        } else {
            false
        }
    }

    /// Whether [`try_take`](Self::try_take) would take room for a record of `bytes` bytes now
    /// (without taking it).
    pub fn allows(&mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        let (_, byte_cap) = self.capacity();
        let bytes = bytes as f64;
        self.records >= 1.0 && (self.bytes >= bytes || self.bytes >= byte_cap)
    }

    /// When a record of `bytes` bytes can next be taken.
    pub fn ready_at(&self, bytes: usize, now: Instant) -> Instant {
        let (_, byte_cap) = self.capacity();
        let record_wait =
            (1.0 - self.records).max(0.0) / (self.allowance * SHARD_RECORDS_PER_SECOND);
        let byte_need = (bytes as f64).min(byte_cap) - self.bytes;
        let byte_wait = byte_need.max(0.0) / (self.allowance * SHARD_BYTES_PER_SECOND);
        now + Duration::from_secs_f64(record_wait.max(byte_wait))
    }

    /// Kinesis throttled an entry of this shard.
    pub fn throttled(&mut self, now: Instant) {
        if self
            .decreased
            .is_some_and(|at| now.saturating_duration_since(at) < DECREASE_WINDOW)
        {
            return;
        }
        self.decreased = Some(now);
        self.grown = now;
        self.allowance = (self.allowance / 2.0).max(FLOOR.min(self.ceiling));
        let (record_cap, byte_cap) = self.capacity();
        self.records = self.records.min(record_cap);
        self.bytes = self.bytes.min(byte_cap);
    }

    /// Kinesis acknowledged an entry of this shard (answered at `now`): the time since the last
    /// throttling, or the last acknowledgement, counts as success.
    pub fn acknowledged(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.grown).as_secs_f64();
        self.grown = self.grown.max(now);
        let increase = STEP + elapsed * INCREASE_PER_SECOND;
        self.allowance = (self.allowance + increase).min(self.ceiling);
    }

    /// The current allowance, as a percentage of the shard limit.
    #[cfg(test)]
    pub fn allowance_percent(&self) -> f64 {
        self.allowance * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_one_seconds_worth_then_refills_at_the_rate() {
        let start = Instant::now();
        let mut limiter = Limiter::new(100, start);
        let taken = (0..2_000).filter(|_| limiter.try_take(10, start)).count();
        assert_eq!(taken, 1_000);
        assert!(!limiter.try_take(10, start));
        let later = start + Duration::from_millis(100);
        let more = (0..2_000).filter(|_| limiter.try_take(10, later)).count();
        assert!((99..=101).contains(&more), "{more}");
        assert!(limiter.ready_at(10, later) > later);
    }

    #[test]
    fn asking_whether_room_is_there_takes_none() {
        let start = Instant::now();
        let mut limiter = Limiter::new(100, start);
        assert!(limiter.allows(1 << 20, start));
        assert!(limiter.allows(1 << 20, start), "nothing was taken");
        assert!(limiter.try_take(600_000, start));
        assert!(!limiter.allows(600_000, start));
        assert!(limiter.allows(400_000, start));
        // Refilled at 1 MiB/s: 100 ms later, about 100 KiB more.
        let later = start + Duration::from_millis(100);
        assert!(limiter.allows(540_000, later));
        assert!(!limiter.allows(600_000, later));
    }

    #[test]
    fn bytes_are_limited_too_and_an_oversize_record_waits_for_a_full_bucket() {
        let start = Instant::now();
        let mut limiter = Limiter::new(100, start);
        assert!(limiter.try_take(1 << 20, start));
        assert!(!limiter.try_take(1, start));
        // A 3 MiB record (bigger than the bucket) goes once the bucket is full again.
        let full = start + Duration::from_secs(1);
        assert!(limiter.try_take(3 << 20, full));
        assert!(!limiter.try_take(1, full + Duration::from_secs(1)));
        assert!(limiter.try_take(1, full + Duration::from_secs(3)));
    }

    #[test]
    fn throttling_halves_the_allowance_once_per_second_and_success_brings_it_back_slowly() {
        let start = Instant::now();
        let mut limiter = Limiter::new(150, start);
        assert_eq!(limiter.allowance_percent(), 150.0);
        limiter.throttled(start);
        assert_eq!(limiter.allowance_percent(), 75.0);
        // More entries throttled by the same overload (within a second) count once.
        limiter.throttled(start + Duration::from_millis(10));
        limiter.throttled(start + Duration::from_millis(900));
        assert_eq!(limiter.allowance_percent(), 75.0);
        for second in 1..=10 {
            limiter.throttled(start + Duration::from_secs(second));
        }
        let floor_at = start + Duration::from_secs(10);
        assert!((limiter.allowance_percent() - 10.0).abs() < 1e-9, "floor");
        // Each acknowledged entry gives back 1%, and each second of success 20%: large
        // records, acknowledged a few times a second, bring the shard back in seconds.
        for ack in 1..=10 {
            limiter.acknowledged(floor_at + Duration::from_millis(250 * ack));
        }
        let expected = 10.0 + 10.0 + 2.5 * 20.0;
        assert!((limiter.allowance_percent() - expected).abs() < 1e-6);
        // Small records, a thousand acknowledged at once, give back 1% each.
        for _ in 0..50 {
            limiter.acknowledged(floor_at + Duration::from_millis(2_500));
        }
        assert!((limiter.allowance_percent() - (expected + 50.0)).abs() < 1e-6);
        limiter.acknowledged(floor_at + Duration::from_secs(60));
        assert_eq!(limiter.allowance_percent(), 150.0, "ceiling");
    }
}
