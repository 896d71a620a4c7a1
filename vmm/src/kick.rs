//! Kicking a guest that computes without exiting. ftvm delivers inputs only
//! at VM exits, so a guest spinning in a loop (a CPU-bound process) would
//! never get its timer interrupt. A kicker thread watches the timer's next
//! deadline; when it has passed by a grace of half a timer period
//! ([`GRACE_DIVISOR`]) and the vCPU is still in the
//! same stay in the guest, it kicks the vCPU out (a signal: `KVM_RUN`
//! returns EINTR at whatever instruction the guest was at). The exit loop
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
/// Longest the kicker sleeps between looks.
const NAP: Duration = Duration::from_millis(20);
const NONE: u64 = u64::MAX;

struct Shared {
    /// Guest time when the guest is to be kicked if it has not exited:
    /// the timer's next deadline plus the grace; `NONE` if no timer is armed.
    due_ns: AtomicU64,
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
            due_ns: AtomicU64::new(NONE),
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
        let v = deadline_ns.map_or(NONE, |d| d.saturating_add(grace));
        if self.shared.due_ns.swap(v, Ordering::SeqCst) != v {
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
    // The stay in the guest last kicked: one kick per stay.
    let mut kicked_run = u64::MAX;
    while !s.quit.load(Ordering::SeqCst) {
        let due = s.due_ns.load(Ordering::SeqCst).min(s.mark_due_ns.load(Ordering::SeqCst));
        if due == NONE {
            std::thread::park_timeout(NAP);
            continue;
        }
        let now = s.clock.peek_host();
        if now < due {
            std::thread::park_timeout(Duration::from_nanos(due - now).min(NAP));
            continue;
        }
        let run = s.stop.runs();
        if run % 2 == 1 && run != kicked_run {
            kicked_run = run;
            s.kicks.fetch_add(1, Ordering::Relaxed);
            s.stop.kick();
        }
        // Overdue: the loop moves the deadline once the timer fires; until
        // then look again shortly (another stay may need a kick).
        std::thread::park_timeout(MIN_GRACE);
    }
}
