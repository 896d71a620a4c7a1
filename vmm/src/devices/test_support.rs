//! Fixtures shared by the device unit tests: a clock the test moves by hand,
//! an interrupt line and an output sink that record what they were given,
//! and byte-wide port accessors for any `BusDevice`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{BusDevice, Clock, IrqLine, OutputSink};

/// A clock that stands still until the test sets it, and counts its reads.
#[derive(Default)]
pub(crate) struct ManualClock {
    now: AtomicU64,
    reads: AtomicU64,
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.now.load(Ordering::SeqCst)
    }
}

impl ManualClock {
    /// Moves guest time to `ns`.
    pub(crate) fn set(&self, ns: u64) {
        self.now.store(ns, Ordering::SeqCst);
    }
    /// How many times the device has read the clock.
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
}

/// An interrupt line that records every level it is driven to.
#[derive(Clone, Default)]
pub(crate) struct Levels(Arc<Mutex<Vec<bool>>>);

impl IrqLine for Levels {
    fn set_level(&self, high: bool) {
        self.0.lock().unwrap().push(high);
    }
}

impl Levels {
    /// The levels driven since the last `take`, oldest first.
    pub(crate) fn take(&self) -> Vec<bool> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// An output sink that keeps every byte emitted.
#[derive(Clone, Default)]
pub(crate) struct Sink(Arc<Mutex<Vec<u8>>>);

impl OutputSink for Sink {
    fn emit(&mut self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

impl Sink {
    /// Everything emitted so far.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// One-byte read at `off` (the buffer starts as 0xff).
pub(crate) fn rd(dev: &mut impl BusDevice, off: u64) -> u8 {
    let mut d = [0xff];
    dev.read(off, &mut d);
    d[0]
}

/// One-byte write of `v` at `off`.
pub(crate) fn wr(dev: &mut impl BusDevice, off: u64, v: u8) {
    dev.write(off, &[v]);
}
