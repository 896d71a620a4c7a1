//! Kicking a guest that computes without exiting. ftvm delivers inputs only
//! at VM exits, so a guest spinning in a loop (a CPU-bound process) would
//! never get its timer interrupt. A kicker thread watches the timer's next
//! deadline; when it has passed by a grace of half a timer period
//! ([`GRACE_DIVISOR`]) and the vCPU is still in the
//! same stay in the guest, it kicks the vCPU out (a signal: `KVM_RUN`
//! returns EINTR at whatever instruction the guest was at). The grace is
//! counted in the vCPU thread's CPU time since the deadline, not in wall
//! time: a guest the host did not let run (another VM, or the FT backup on
//! the same CPU) had no chance to exit on its own, and a kick would cost a
//! resync it did not need; a bound in wall time ([`MAX_STRETCH`] graces)
//! still kicks a guest that runs too little to use it. The exit loop
//! then makes that point a position of its own (`ExitKind::Resync`): the
//! recorder logs the vCPU state and the pages written since the last exit,
//! and the interrupt is injected there. Replay applies that state instead
//! of running the guest to the point.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock::VmClock;
use crate::stop::StopHandle;

/// How late past its deadline a timer interrupt may be before the guest is
/// kicked: half a timer period. A kick costs a state capture and a memory
/// delta when recording, so the guest's own exits get the first chance;
/// but a tick later than a whole period would merge with the next one, and
/// a guest that counts ticks (Linux without a TSC) would lose time.
pub const GRACE_DIVISOR: u64 = 2;
/// Bounds on the grace, for very fast or very slow (or one-shot) timers.
pub const MIN_GRACE: Duration = Duration::from_millis(2);
pub const MAX_GRACE: Duration = Duration::from_millis(25);
/// The timer's kick comes at the latest this many graces (wall time) after
/// its deadline, however little the vCPU thread ran meanwhile; for a
/// periodic timer at most 3/4 of its period (later, the tick would merge
/// with the next one), but never before the grace.
pub const MAX_STRETCH: u64 = 4;
/// Shorter waits than this for the rest of a grace kick at once (no
/// near-busy loop of clock reads while the vCPU waits for a CPU).
const MIN_LOOK: Duration = Duration::from_micros(250);

/// The wall-time bound past a deadline (see [`MAX_STRETCH`]).
fn stretch(grace: u64, tick_ns: Option<u64>) -> u64 {
    let most = grace.saturating_mul(MAX_STRETCH);
    tick_ns.map_or(most, |t| (t / 4 * 3).clamp(grace, most))
}
/// Longest the kicker sleeps between looks.
const NAP: Duration = Duration::from_millis(20);
const NONE: u64 = u64::MAX;

struct Shared {
    /// Guest time of the timer's next deadline; `NONE` if no timer is armed.
    deadline_ns: AtomicU64,
    /// CPU time the guest may compute past the deadline before a kick.
    grace_ns: AtomicU64,
    /// Wall time past the deadline after which it is kicked regardless.
    stretch_ns: AtomicU64,
    /// Guest time when held output needs a mark even if the guest has not
    /// exited (group commit's bound); `NONE` if nothing waits.
    mark_due_ns: AtomicU64,
    quit: AtomicBool,
    kicks: AtomicU64,
    stop: StopHandle,
    clock: Arc<VmClock>,
}

/// The kicker thread; stops when dropped.
pub struct Kicker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    pub fn start(stop: StopHandle, clock: Arc<VmClock>) -> Kicker {
        let shared = Arc::new(Shared {
            deadline_ns: AtomicU64::new(NONE),
            grace_ns: AtomicU64::new(MIN_GRACE.as_nanos() as u64),
            stretch_ns: AtomicU64::new(MIN_GRACE.as_nanos() as u64),
            mark_due_ns: AtomicU64::new(NONE),
            quit: AtomicBool::new(false),
            kicks: AtomicU64::new(0),
            stop,
            clock,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-kicker".into())
            .spawn(move || watch(&s))
            .map_err(|e| log::warn!("cannot start the kicker thread ({e}): a guest that never exits will not get its timer"))
            .ok();
        Kicker { shared, thread }
    }

    /// The timer's next deadline in guest ns (`None`: no timer armed) and
    /// its period (`None`: one-shot).
    pub fn set_due(&self, deadline_ns: Option<u64>, tick_ns: Option<u64>) {
        let grace = tick_ns
            .map_or(MIN_GRACE.as_nanos() as u64 * 2, |t| t / GRACE_DIVISOR)
            .clamp(MIN_GRACE.as_nanos() as u64, MAX_GRACE.as_nanos() as u64);
        self.shared.grace_ns.store(grace, Ordering::SeqCst);
        self.shared.stretch_ns.store(stretch(grace, tick_ns), Ordering::SeqCst);
        let v = deadline_ns.unwrap_or(NONE);
        if self.shared.deadline_ns.swap(v, Ordering::SeqCst) != v {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }

    /// Held output waits for a mark: kick at `at_ns` (guest time) if the
    /// guest has not exited by then. `None` clears it.
    pub fn set_mark_due(&self, at_ns: Option<u64>) {
        let v = at_ns.unwrap_or(NONE);
        if self.shared.mark_due_ns.swap(v, Ordering::SeqCst) != v {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }

    /// Kicks so far.
    pub fn kicks(&self) -> u64 {
        self.shared.kicks.load(Ordering::Relaxed)
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn watch(s: &Shared) {
    let mut look = Look { kicked_run: u64::MAX, seen: None };
    while !s.quit.load(Ordering::SeqCst) {
        let timer = Timer {
            deadline: s.deadline_ns.load(Ordering::SeqCst),
            grace: s.grace_ns.load(Ordering::SeqCst),
            stretch: s.stretch_ns.load(Ordering::SeqCst),
        };
        let mark = s.mark_due_ns.load(Ordering::SeqCst);
        let now = s.clock.peek_host();
        // The vCPU's CPU clock is read only while a timer kick is pending.
        let cpu = || s.stop.vcpu_cpu_ns();
        match look.next(now, s.stop.runs(), timer, mark, cpu) {
            None => {
                s.kicks.fetch_add(1, Ordering::Relaxed);
                s.stop.kick();
                std::thread::park_timeout(MIN_GRACE);
            }
            Some(wait) => std::thread::park_timeout(wait.min(NAP)),
        }
    }
}

/// The timer as the kicker sees it (guest ns; `deadline` `NONE`: unarmed).
#[derive(Clone, Copy)]
struct Timer {
    deadline: u64,
    grace: u64,
    stretch: u64,
}

/// The kicker's memory between looks.
struct Look {
    /// The stay in the guest last kicked: one kick per stay.
    kicked_run: u64,
    /// The stay, deadline and vCPU CPU time when the deadline was first
    /// seen passed in that stay: the grace counts CPU time from there.
    seen: Option<(u64, u64, Option<u64>)>,
}

impl Look {
    /// At `now`, in stay `run` (odd: in the guest): `None` to kick now, or
    /// how long to wait before looking again. Held output (`mark`) waits
    /// on wall time; the timer on what the guest ran.
    fn next(&mut self, now: u64, run: u64, t: Timer, mark: u64, cpu: impl FnOnce() -> Option<u64>) -> Option<Duration> {
        let due = t.deadline.min(mark);
        if due == NONE {
            return Some(NAP);
        }
        if now < due {
            return Some(Duration::from_nanos(due - now));
        }
        if run.is_multiple_of(2) || run == self.kicked_run {
            // Out of the guest, or kicked already: the loop moves the
            // deadline once the timer fires; until then look again shortly
            // (another stay may need a kick).
            return Some(MIN_GRACE);
        }
        let wait = if mark <= now {
            Duration::ZERO
        } else {
            let until_mark = if mark == NONE { NAP } else { Duration::from_nanos(mark - now) };
            timer_wait(&mut self.seen, cpu(), run, t, now).min(until_mark)
        };
        if !wait.is_zero() {
            return Some(wait);
        }
        self.kicked_run = run;
        self.seen = None;
        None
    }
}

/// How long before the timer's kick is due in stay `run`, its deadline
/// having passed at `now` (guest ns): zero once the vCPU thread used the
/// grace in CPU time since the deadline was first seen passed in this
/// stay (`cpu_ns`: its clock; without one, wall time counts), or the
/// stretch of wall time went by.
fn timer_wait(seen: &mut Option<(u64, u64, Option<u64>)>, cpu_ns: Option<u64>, run: u64, t: Timer, now: u64) -> Duration {
    let late = now.saturating_sub(t.deadline);
    if late >= t.stretch {
        return Duration::ZERO;
    }
    let ran = match *seen {
        Some((r, d, Some(c0))) if r == run && d == t.deadline => cpu_ns.map_or(late, |c| c.saturating_sub(c0)),
        Some((r, d, None)) if r == run && d == t.deadline => late,
        _ => {
            // First seen now: what ran between the deadline and now is not
            // known, so only what runs from here counts (the stretch keeps
            // the kick from coming much later).
            *seen = Some((run, t.deadline, cpu_ns));
            if cpu_ns.is_none() {
                late
            } else {
                0
            }
        }
    };
    let wait = Duration::from_nanos(t.grace.saturating_sub(ran).min(t.stretch - late));
    if wait < MIN_LOOK {
        Duration::ZERO
    } else {
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 5_000_000;
    const T: Timer = Timer { deadline: 100_000_000, grace: G, stretch: 4 * G };

    #[test]
    fn the_grace_counts_what_the_vcpu_ran() {
        let mut seen = None;
        // Deadline at 100 ms, first seen 1 ms later: the grace starts now.
        assert_eq!(timer_wait(&mut seen, Some(7_000), 3, T, 101_000_000), Duration::from_nanos(G));
        // 10 ms of wall time later the vCPU ran 1 ms (preempted): wait on,
        // but not past the stretch.
        assert_eq!(timer_wait(&mut seen, Some(1_007_000), 3, T, 111_000_000), Duration::from_nanos(G - 1_000_000));
        assert_eq!(timer_wait(&mut seen, Some(1_007_000), 3, T, 118_000_000), Duration::from_nanos(2_000_000));
        // It ran the whole grace (or all but a moment): kick.
        assert_eq!(timer_wait(&mut seen, Some(G + 7_000 - 100_000), 3, T, 112_000_000), Duration::ZERO);
    }

    #[test]
    fn a_vcpu_that_hardly_runs_is_kicked_after_the_stretch() {
        let t = Timer { deadline: 0, ..T };
        let mut seen = None;
        assert!(!timer_wait(&mut seen, Some(0), 3, t, 1).is_zero());
        assert!(!timer_wait(&mut seen, Some(0), 3, t, 4 * G - MIN_LOOK.as_nanos() as u64 - 1).is_zero());
        assert!(timer_wait(&mut seen, Some(0), 3, t, 4 * G - 1).is_zero());
        assert!(timer_wait(&mut seen, Some(0), 3, t, 4 * G).is_zero());
        // Periodic timers: at most 3/4 of the period, never under the grace.
        assert_eq!(stretch(G, None), 4 * G);
        assert_eq!(stretch(G, Some(4 * G)), 3 * G);
        assert_eq!(stretch(G, Some(G)), G);
        assert_eq!(stretch(G, Some(100 * G)), 4 * G);
    }

    #[test]
    fn a_new_stay_or_deadline_starts_counting_again() {
        let t = Timer { deadline: 0, ..T };
        let mut seen = None;
        timer_wait(&mut seen, Some(0), 3, t, 1_000);
        // Another stay: what the vCPU used before it does not count.
        assert_eq!(timer_wait(&mut seen, Some(G), 5, t, 2_000), Duration::from_nanos(G));
        // Another deadline in that stay: neither.
        let t2 = Timer { deadline: 1_500, ..T };
        assert_eq!(timer_wait(&mut seen, Some(2 * G), 5, t2, 3_000), Duration::from_nanos(G));
        assert!(timer_wait(&mut seen, Some(3 * G), 5, t2, 4_000).is_zero());
    }

    #[test]
    fn without_a_cpu_clock_wall_time_counts() {
        let t = Timer { deadline: 0, ..T };
        let mut seen = None;
        assert_eq!(timer_wait(&mut seen, None, 3, t, 1_000_000), Duration::from_nanos(G - 1_000_000));
        assert!(timer_wait(&mut seen, None, 3, t, G).is_zero());
    }

    /// Held output is not kept waiting by a timer's grace: the kicker
    /// looks again at the mark's time, and kicks then.
    #[test]
    fn a_mark_due_inside_a_timers_grace_is_kicked_on_time() {
        let mut look = Look { kicked_run: u64::MAX, seen: None };
        let mark = T.deadline + 1_000_000;
        // Just past the deadline; the mark due in 1 ms, the grace 5 ms.
        let w = look.next(T.deadline + 1_000, 3, T, mark, || Some(0)).expect("not yet");
        assert_eq!(w, Duration::from_nanos(999_000));
        assert_eq!(look.next(mark, 3, T, mark, || Some(500_000)), None, "the mark's kick");
        // One kick per stay; the next stay is looked at again.
        assert_eq!(look.next(mark + 1, 3, T, mark, || Some(500_000)), Some(MIN_GRACE));
        assert_eq!(look.next(mark + 2, 4, T, mark, || Some(500_000)), Some(MIN_GRACE), "out of the guest");
        // A new stay past the deadline: its grace counts from now.
        assert_eq!(look.next(mark + 3, 5, T, NONE, || Some(600_000)), Some(Duration::from_nanos(G)));
        assert_eq!(look.next(mark + 4, 5, T, NONE, || Some(600_000 + G)), None, "the timer's kick");
        // Nothing armed, or not due yet.
        assert_eq!(look.next(0, 7, Timer { deadline: NONE, ..T }, NONE, || None), Some(NAP));
        assert_eq!(look.next(T.deadline - 10, 7, T, NONE, || None), Some(Duration::from_nanos(10)));
    }

    /// The vCPU thread's CPU clock, read from another thread, brackets
    /// what the thread's own clock says it used (not the reader's clock,
    /// nor the process's, which other tests' threads move).
    #[test]
    fn the_vcpu_threads_cpu_time_is_read() {
        fn own_cpu_ns() -> u64 {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `ts` is a valid out pointer.
            assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) }, 0);
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        }
        let stop = StopHandle::new();
        assert_eq!(stop.vcpu_cpu_ns(), None);
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            let _g = s2.register_vcpu_thread();
            tx.send((0, 0)).unwrap();
            go_rx.recv().unwrap();
            let (c0, t0) = (own_cpu_ns(), std::time::Instant::now());
            while own_cpu_ns() - c0 < 50_000_000 && t0.elapsed() < Duration::from_secs(20) {
                std::hint::spin_loop();
            }
            tx.send((c0, own_cpu_ns())).unwrap();
            go_rx.recv().unwrap();
        });
        rx.recv().unwrap();
        let before = stop.vcpu_cpu_ns().expect("a registered thread's clock");
        go_tx.send(()).unwrap();
        let (c0, c1) = rx.recv().unwrap();
        let after = stop.vcpu_cpu_ns().unwrap();
        go_tx.send(()).unwrap();
        t.join().unwrap();
        let (seen, own) = (after - before, c1 - c0);
        assert!(own >= 50_000_000, "the thread spun {own} ns");
        assert!(seen >= own && seen < own + 40_000_000, "read {seen} ns from outside, the thread used {own} ns");
        assert_eq!(stop.vcpu_cpu_ns(), None);
    }
}
