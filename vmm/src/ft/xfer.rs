//! State transfer (rule 5): a backup that joins gets a snapshot of the
//! primary's VM taken at one exit, then the log from the first record after
//! that exit, instead of the whole log from boot. The log sender asks for
//! a snapshot here; the vCPU thread (which owns the VM) takes it at the end
//! of its next exit (`Recorder`, at `Observed::ExitDone`) and hands it back
//! with the byte offset in the in-memory log where that exit's records end.
//! Everything before that offset is then never needed again, so the
//! primary drops it (`LogBuf::trim_before`): its memory no longer grows
//! with the run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use replay_log::{Header, Position};

/// A snapshot taken for a joining backup.
pub struct Taken {
    /// The snapshot in the file format of docs/SNAPSHOT.md.
    pub bytes: Vec<u8>,
    /// Offset in the `LogBuf` just past the last record of the snapshot's
    /// exit: the backup gets the log from there on.
    pub offset: usize,
    pub position: Position,
    /// How long the guest was paused to take and encode it.
    pub pause: Duration,
}

/// Requests for snapshots, between the log sender and the vCPU thread.
pub struct Transfers {
    /// The guest, as snapshots name it.
    pub guest: Header,
    pending: AtomicBool,
    reply: Mutex<Option<Sender<Result<Taken, String>>>>,
    /// While a backup is joining: the ordinal from which it has the VM
    /// (the snapshot's), so that the lag throttle measures it from there
    /// rather than from boot. `u64::MAX` while the snapshot is still to be
    /// taken (nothing to throttle against yet).
    floor: AtomicU64,
    /// Where the records start in the log from boot, for a VMM whose log
    /// starts at boot (a primary that booted the guest): while nothing of
    /// it was dropped, a backup can replay it from boot instead (`BOOT`),
    /// with no snapshot at all. That is what a backup in the view from the
    /// start gets: it protects the guest from its first exit.
    boot_records: Mutex<Option<usize>>,
}

impl Transfers {
    pub fn new(guest: Header) -> Arc<Self> {
        Arc::new(Transfers { guest, pending: AtomicBool::new(false), reply: Mutex::new(None), floor: AtomicU64::new(0), boot_records: Mutex::new(None) })
    }

    /// This VMM's log starts at boot; its records at `offset`.
    pub fn set_boot_records(&self, offset: usize) {
        *self.boot_records.lock().unwrap() = Some(offset);
    }

    pub fn boot_records(&self) -> Option<usize> {
        *self.boot_records.lock().unwrap()
    }

    /// Asks for a snapshot at the vCPU's next exit; the answer comes on
    /// the returned channel. A request still unanswered is replaced (its
    /// sender, a stream that was given up, gets nothing).
    pub fn request(&self) -> Receiver<Result<Taken, String>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        *self.reply.lock().unwrap() = Some(tx);
        self.floor.store(u64::MAX, Ordering::SeqCst);
        self.pending.store(true, Ordering::SeqCst);
        rx
    }

    /// Whether a snapshot is asked for (cheap: checked at every exit).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Takes the request, for the vCPU thread to answer.
    pub fn take(&self) -> Option<Sender<Result<Taken, String>>> {
        self.pending.store(false, Ordering::SeqCst);
        self.reply.lock().unwrap().take()
    }

    /// The snapshot was taken at `ordinal`.
    pub fn taken_at(&self, ordinal: u64) {
        self.floor.store(ordinal, Ordering::SeqCst);
    }

    /// What the lag throttle counts the backup as having, at least.
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::SeqCst)
    }
}
