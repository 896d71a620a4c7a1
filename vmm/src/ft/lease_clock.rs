//! The clock leases are measured on: `CLOCK_BOOTTIME`.
//!
//! `std::time::Instant` is `CLOCK_MONOTONIC` on Linux, which stops while
//! the machine is suspended: a primary whose host slept through its lease
//! would wake up believing it still held it, while the witness (on another
//! machine, awake) had long promoted the backup. `CLOCK_BOOTTIME` counts
//! suspended time too, so a lease measured on it can only run out early,
//! never late. It is monotonic like `Instant` (never jumps back with the
//! wall clock). See docs/DESIGN.md, "Leases".

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on `CLOCK_BOOTTIME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> BootInstant {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists
        // on every Linux since 2.6.39, and clock_gettime only writes `ts`.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed: {}", std::io::Error::last_os_error());
        BootInstant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// Time from `earlier` to this instant; zero if `earlier` is later.
    pub fn saturating_duration_since(&self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    pub fn elapsed(&self) -> Duration {
        BootInstant::now().saturating_duration_since(*self)
    }

    pub fn checked_sub(&self, d: Duration) -> Option<BootInstant> {
        self.0.checked_sub(d).map(BootInstant)
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0 + d)
    }
}

impl Sub<Duration> for BootInstant {
    type Output = BootInstant;
    fn sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_moves_forward_with_real_time() {
        let (b0, i0) = (BootInstant::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (db, di) = (b0.elapsed(), i0.elapsed());
        assert!(db >= Duration::from_millis(30), "{db:?}");
        // Not suspended in between: both clocks agree to a few ms.
        assert!(db.abs_diff(di) < Duration::from_millis(5), "{db:?} vs {di:?}");
        assert!(b0 + Duration::from_secs(1) > BootInstant::now());
        assert_eq!((b0 - Duration::from_secs(1)).saturating_duration_since(b0), Duration::ZERO);
        assert_eq!(b0.checked_sub(Duration::from_secs(u64::MAX)), None);
    }
}
