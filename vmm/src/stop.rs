//! Stopping a run from outside the exit loop: a signal (SIGINT/SIGTERM),
//! or another thread of this VMM (a primary the witness fenced, a backup
//! the witness dropped). The request becomes an [`Ending`] that the loop
//! returns; `main` turns it into a message and an exit code. Nothing but
//! `main` calls `process::exit`.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use crossbeam_channel::{Receiver, Sender};

use crate::engine::Ending;

/// Set from a signal handler (SIGINT/SIGTERM): stop at the next exit and
/// close the log cleanly.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The signal that kicks the vCPU thread out of `KVM_RUN`.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

/// `kvm_run.immediate_exit` of this process's vCPU, once registered. The
/// signal handlers set it, so a kick that lands between the loop's check
/// and its next `KVM_RUN` still makes that `KVM_RUN` return at once.
static IMMEDIATE_EXIT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// Registers the vCPU's `immediate_exit` byte (see [`IMMEDIATE_EXIT`]).
///
/// # Safety
/// `p` must stay valid for writes for as long as it is registered (the
/// vCPU's `kvm_run` mapping lives as long as the vCPU fd); pass null to
/// unregister before it goes away.
pub unsafe fn register_immediate_exit(p: *mut u8) {
    IMMEDIATE_EXIT.store(p, Ordering::SeqCst);
}

fn set_immediate_exit() {
    let p = IMMEDIATE_EXIT.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `register_immediate_exit`'s contract: `p` is valid for
        // writes while registered; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

extern "C" fn on_kick(_: libc::c_int) {
    set_immediate_exit();
}

/// A shareable "stop this run" request.
#[derive(Clone)]
pub struct StopHandle(Arc<Inner>);

struct Inner {
    ending: Mutex<Option<Ending>>,
    /// Entries into and returns from `KVM_RUN`: odd while the guest runs.
    runs: AtomicU64,
    /// pthread id of the vCPU thread (0 until it registers). A mutex, not
    /// an atomic: the thread must not exit between reading the id and
    /// signalling it (the guard clears it under the same lock).
    vcpu_thread: Mutex<u64>,
    /// Wakes threads that wait on something else (a record channel).
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl Default for StopHandle {
    fn default() -> Self {
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        StopHandle(Arc::new(Inner {
            ending: Mutex::new(None),
            runs: AtomicU64::new(0),
            vcpu_thread: Mutex::new(0),
            wake_tx,
            wake_rx,
        }))
    }
}

impl StopHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to end with `ending` (the first request wins) and kicks
    /// the vCPU out of the guest so it sees the request promptly even if
    /// the guest never exits.
    pub fn stop(&self, ending: Ending) {
        {
            let mut e = self.0.ending.lock().unwrap();
            if e.is_none() {
                *e = Some(ending);
            }
        }
        let _ = self.0.wake_tx.try_send(());
        self.kick();
    }

    /// Makes the vCPU thread leave the guest now (`KVM_RUN` returns EINTR,
    /// or the next one returns at once), without asking it to stop: a
    /// timer interrupt is due and the guest has not exited.
    pub fn kick(&self) {
        let guard = self.0.vcpu_thread.lock().unwrap();
        let tid = *guard;
        if tid != 0 {
            // SAFETY: `tid` was stored by `register_vcpu_thread` from
            // `pthread_self` of a thread that is still running the exit
            // loop: it clears the id under this lock (held until after the
            // call) before it returns, so it cannot have exited. KICK_SIGNAL
            // has a no-op handler installed, so delivery only interrupts
            // `KVM_RUN` (EINTR).
            unsafe { libc::pthread_kill(tid as libc::pthread_t, KICK_SIGNAL) };
        }
        drop(guard);
    }

    /// The exit loop is about to enter the guest.
    pub fn entering(&self) {
        self.0.runs.fetch_add(1, Ordering::SeqCst);
    }

    /// The exit loop is back from the guest.
    pub fn left(&self) {
        self.0.runs.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts entries and returns: odd while the guest runs; a value
    /// names one stay in the guest.
    pub fn runs(&self) -> u64 {
        self.0.runs.load(Ordering::SeqCst)
    }

    /// The requested ending, if any.
    pub fn requested(&self) -> Option<Ending> {
        self.0.ending.lock().unwrap().clone()
    }

    /// A channel that becomes readable once a stop is requested: for
    /// threads blocked on another channel (select on both).
    pub fn wakeup(&self) -> &Receiver<()> {
        &self.0.wake_rx
    }

    /// Called by the thread that runs the exit loop.
    pub fn register_vcpu_thread(&self) -> VcpuThreadGuard {
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        *self.0.vcpu_thread.lock().unwrap() = me;
        VcpuThreadGuard(self.clone())
    }
}

/// Unregisters the vCPU thread when the exit loop returns.
pub struct VcpuThreadGuard(StopHandle);

impl Drop for VcpuThreadGuard {
    fn drop(&mut self) {
        *self.0 .0.vcpu_thread.lock().unwrap() = 0;
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler
        // does nothing (async-signal-safe). No SA_RESTART, so a blocked
        // KVM_RUN returns EINTR to the loop.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    set_immediate_exit();
}

/// SIGINT/SIGTERM end the run cleanly: the log gets its end record. No
/// SA_RESTART, so a blocked `KVM_RUN` returns to the loop.
pub fn install_interrupt_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler
        // only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn first_request_wins_and_wakes_waiters() {
        let h = StopHandle::new();
        assert!(h.requested().is_none());
        assert!(h.wakeup().try_recv().is_err());
        h.stop(Ending::Stopped { why: "fenced".into(), code: 75 });
        h.stop(Ending::Interrupted);
        assert_eq!(h.requested(), Some(Ending::Stopped { why: "fenced".into(), code: 75 }));
        assert!(h.wakeup().recv_timeout(Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn kicks_a_registered_thread_out_of_a_blocking_call() {
        let h = StopHandle::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let h2 = h.clone();
        let t = std::thread::spawn(move || {
            let _g = h2.register_vcpu_thread();
            tx.send(()).unwrap();
            // A blocking syscall stands in for KVM_RUN: the kick must
            // interrupt it with EINTR.
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: `fds` has room for the two descriptors pipe writes.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let mut b = [0u8; 1];
            // SAFETY: reading one byte into a live one-byte buffer.
            let r = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
            let err = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: closing the descriptors pipe gave us.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            (r, err)
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        h.stop(Ending::Interrupted);
        let (r, err) = t.join().unwrap();
        assert_eq!(r, -1);
        assert_eq!(err, Some(libc::EINTR));
    }
}
