//! The guest's clock. Devices read time only through `VmClock`, which
//! samples the host clock at most once per exit when live, and hands back
//! logged values when replaying. Each value devices saw at an exit is what
//! the log records, so replay gives every device the same time at the same
//! position.

use std::sync::Mutex;
use std::time::Instant;

use crate::devices::Clock;

#[derive(Debug)]
enum Source {
    /// Host monotonic time since `start`.
    Host { start: Instant },
    /// Only values applied from the log.
    Log,
}

#[derive(Debug)]
struct State {
    source: Source,
    /// The value for the current exit, once sampled or applied.
    current: Option<u64>,
    /// Last value ever handed out: time never runs backwards.
    last: u64,
    /// A host sample taken during this exit that the recorder has not
    /// collected yet (it must go into the log).
    fresh: Option<u64>,
    /// Replay: a device read the clock at an exit where the log had no value.
    missing_read: bool,
}

/// The guest's clock: sampled lazily from the host when live, applied from
/// the log when replaying. The recorder collects each host sample with
/// [`VmClock::take_sample`] and logs it; replay applies logged values with
/// [`VmClock::set`] and asks [`VmClock::missing_read`] afterwards.
#[derive(Debug)]
pub struct VmClock(Mutex<State>);

impl VmClock {
    pub fn host() -> Self {
        Self::with(Source::Host { start: Instant::now() })
    }

    pub fn replay() -> Self {
        Self::with(Source::Log)
    }

    fn with(source: Source) -> Self {
        VmClock(Mutex::new(State { source, current: None, last: 0, fresh: None, missing_read: false }))
    }

    /// Replay ends and the VM goes live (failover): from now on time comes
    /// from the host, continuing from the last value the guest saw.
    pub fn go_live(&self) {
        let mut s = self.0.lock().unwrap();
        let back = std::time::Duration::from_nanos(s.last);
        let start = Instant::now().checked_sub(back).unwrap_or_else(Instant::now);
        s.source = Source::Host { start };
        s.missing_read = false;
    }

    /// The clock's state for a snapshot: the last value handed to the
    /// guest (at an exit boundary no value is current). Every such value
    /// was logged, so a replay holds the same one at the same exit.
    pub fn value(&self) -> u64 {
        self.0.lock().unwrap().last
    }

    /// Continues from a snapshot's [`VmClock::value`]: time never goes
    /// back before it, and a live clock runs on from it.
    pub fn restore(&self, ns: u64) {
        let mut s = self.0.lock().unwrap();
        if let Source::Host { start } = &mut s.source {
            *start = Instant::now().checked_sub(std::time::Duration::from_nanos(ns)).unwrap_or_else(Instant::now);
        }
        s.last = ns;
        s.current = None;
        s.fresh = None;
        s.missing_read = false;
    }

    /// A new exit: forget the previous exit's value.
    pub fn begin_exit(&self) {
        let mut s = self.0.lock().unwrap();
        s.current = None;
        s.missing_read = false;
    }

    /// Host time now, without handing it to the guest (live only; in
    /// replay, the last value applied).
    pub fn peek_host(&self) -> u64 {
        let s = self.0.lock().unwrap();
        match &s.source {
            Source::Host { start } => start.elapsed().as_nanos() as u64,
            Source::Log => s.last,
        }
    }

    /// Takes a new host sample for this exit even if one was taken already
    /// (the recorder does this while the guest waits in `hlt`).
    pub fn sample_again(&self) -> u64 {
        self.0.lock().unwrap().current = None;
        self.now_ns()
    }

    /// The value devices see at this exit from now on (replay, and
    /// re-applying a recorded value).
    pub fn set(&self, ns: u64) {
        let mut s = self.0.lock().unwrap();
        s.current = Some(ns);
        s.last = s.last.max(ns);
    }

    /// Whether devices have a time value at this exit.
    pub fn has_value(&self) -> bool {
        self.0.lock().unwrap().current.is_some()
    }

    /// The host sample taken during this exit that must go into the log.
    pub fn take_sample(&self) -> Option<u64> {
        self.0.lock().unwrap().fresh.take()
    }

    /// Replay: whether a device read time where the log had none.
    pub fn missing_read(&self) -> bool {
        self.0.lock().unwrap().missing_read
    }
}

impl Clock for VmClock {
    fn now_ns(&self) -> u64 {
        let mut s = self.0.lock().unwrap();
        if let Some(v) = s.current {
            return v;
        }
        match &s.source {
            Source::Host { start } => {
                let v = (start.elapsed().as_nanos() as u64).max(s.last);
                s.current = Some(v);
                s.last = v;
                s.fresh = Some(v);
                v
            }
            Source::Log => {
                s.missing_read = true;
                s.last
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_clock_samples_once_per_exit() {
        let c = VmClock::host();
        c.begin_exit();
        let a = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(c.now_ns(), a);
        assert_eq!(c.take_sample(), Some(a));
        assert_eq!(c.take_sample(), None);
        c.begin_exit();
        let b = c.now_ns();
        assert!(b >= a + 2_000_000);
        assert_eq!(c.take_sample(), Some(b));
        let r = c.sample_again();
        assert!(r >= b);
    }

    #[test]
    fn going_live_continues_from_the_last_logged_time() {
        let c = VmClock::replay();
        c.begin_exit();
        c.set(5_000_000_000);
        c.go_live();
        c.begin_exit();
        let t = c.now_ns();
        assert!((5_000_000_000..5_500_000_000).contains(&t), "{t}");
        assert_eq!(c.take_sample(), Some(t));
    }

    #[test]
    fn a_restored_clock_continues_from_its_value() {
        let c = VmClock::replay();
        c.begin_exit();
        c.set(700);
        let d = VmClock::replay();
        d.restore(c.value());
        assert_eq!(d.value(), 700);
        d.begin_exit();
        assert_eq!(d.now_ns(), 700);
        assert!(d.missing_read(), "a replayed exit still needs its logged value");
        let h = VmClock::host();
        h.restore(3_000_000_000);
        h.begin_exit();
        let t = h.now_ns();
        assert!((3_000_000_000..3_500_000_000).contains(&t), "{t}");
    }

    #[test]
    fn replay_clock_flags_reads_without_a_value() {
        let c = VmClock::replay();
        c.begin_exit();
        c.set(500);
        assert_eq!(c.now_ns(), 500);
        assert!(!c.missing_read());
        c.begin_exit();
        assert_eq!(c.now_ns(), 500);
        assert!(c.missing_read());
        assert_eq!(c.take_sample(), None);
    }
}
