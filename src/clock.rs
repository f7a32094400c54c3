//! The time `put` stamps on a record.
//!
//! Reading the monotonic clock costs 26 ns a call on the 2-core machine the targets are
//! measured on (a hypervisor's clock, read through the vDSO), about a fifteenth of what W1
//! spent per record beyond the floor. The CPU's time-stamp counter costs 9.8 ns to read there. So a
//! thread that reads the clock remembers the reading with the counter's value, and while fewer
//! than [`REUSE_TICKS`] ticks (a few tens of microseconds at the counter's gigahertz rates)
//! have passed since, `put` stamps that reading again: a record's time can be early by that
//! much, never late. Only where the counter runs at a constant rate in every power state and
//! on every core (the CPU says so: "invariant TSC"); elsewhere every call reads the clock.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A moment as nanoseconds since the process first asked (see `base`): eight bytes where an
/// `Instant` takes sixteen, compared and subtracted as integers. Each record's metadata holds
/// one, and the sender reads them all again for the buffering-time metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(u64);

impl Stamp {
    /// `at`, or the base for a moment before it.
    pub fn of(at: Instant) -> Stamp {
        // 2^64 ns is 584 years.
        Stamp(at.saturating_duration_since(base()).as_nanos() as u64)
    }

    pub fn now() -> Stamp {
        Stamp::of(Instant::now())
    }

    pub fn instant(self) -> Instant {
        base() + Duration::from_nanos(self.0)
    }

    /// Nanoseconds since the base.
    pub fn nanos(self) -> u64 {
        self.0
    }

    /// Nanoseconds from `earlier` to `self`; 0 if `earlier` is later.
    pub fn nanos_since(self, earlier: Stamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// The moment stamps count from: the first time one was asked for.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Counter ticks within which a thread's last clock reading is used again: 38 µs at the
/// 2.6 GHz of the machine the targets are measured on, 100 µs at 1 GHz.
const REUSE_TICKS: u64 = 100_000;

thread_local! {
    /// The counter's value and the clock's reading at this thread's last clock read.
    static LAST: Cell<Option<(u64, Stamp)>> = const { Cell::new(None) };
}

/// Now, or a reading of this thread's at most [`REUSE_TICKS`] counter ticks old.
pub(crate) fn recent() -> Stamp {
    match ticks() {
        Some(tick) => LAST.with(|last| match last.get() {
            // A counter that went back (another core's, if ever they differ) wraps to a large
            // difference, and the clock is read.
            Some((at, reading)) if tick.wrapping_sub(at) < REUSE_TICKS => reading,
            _ => {
                let reading = Stamp::now();
                last.set(Some((tick, reading)));
                reading
            }
        }),
        None => Stamp::now(),
    }
}

/// The time-stamp counter, where it is invariant.
#[cfg(target_arch = "x86_64")]
fn ticks() -> Option<u64> {
    use std::sync::OnceLock;
    static INVARIANT: OnceLock<bool> = OnceLock::new();
    let invariant = *INVARIANT.get_or_init(|| {
        use std::arch::x86_64::__cpuid;
        // Leaf 0x8000_0007, EDX bit 8: the counter runs at a constant rate in every ACPI
        // state. The leaf exists when the highest extended leaf reaches it.
        __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
    });
    // SAFETY: RDTSC exists on every x86_64 CPU and only reads the counter.
    invariant.then(|| unsafe { std::arch::x86_64::_rdtsc() })
}

#[cfg(not(target_arch = "x86_64"))]
fn ticks() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reading_is_never_late_and_never_much_early() {
        // Against the clock read just before and just after: never after the later reading,
        // and within a millisecond (far more than the reuse window; room for a busy machine)
        // of the earlier one.
        for round in 0..20_000u32 {
            let before = Stamp::now();
            let stamped = recent();
            let after = Stamp::now();
            assert!(stamped <= after, "round {round}");
            assert!(
                before.nanos_since(stamped) < 1_000_000,
                "round {round}: {} ns early",
                before.nanos_since(stamped)
            );
            if round % 1_000 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    #[test]
    fn a_pause_longer_than_the_window_gets_a_new_reading() {
        let first = recent();
        std::thread::sleep(Duration::from_millis(5));
        let second = recent();
        assert!(second.nanos_since(first) >= 5_000_000);
    }

    #[test]
    fn a_stamp_is_its_instant_to_the_nanosecond() {
        let at = Instant::now() + Duration::from_millis(3);
        let stamp = Stamp::of(at);
        assert!(stamp.instant().max(at) - stamp.instant().min(at) < Duration::from_nanos(2));
        assert_eq!(
            Stamp::of(at + Duration::from_micros(7)).nanos_since(stamp),
            7_000
        );
        assert_eq!(stamp.nanos_since(Stamp::of(at + Duration::from_secs(1))), 0);
        // A moment before the base counts as the base.
        let long_ago = Instant::now().checked_sub(Duration::from_secs(3_600));
        if let Some(long_ago) = long_ago {
            assert!(Stamp::of(long_ago) <= Stamp::now());
        }
    }
}
