//! Emulated devices. Each one is a deterministic state machine: it sees only
//! `(offset, data)` accesses from the guest, the VMM clock it is handed, and
//! input the VMM pushes into it. Its interrupt line and output sink are
//! injected. That is what makes record/replay a matter of logging what is
//! injected, and lets every device be tested without KVM.

pub mod cmos;
pub mod debug_exit;
pub mod i8042;
pub mod pic;
pub mod pit;
#[cfg(test)]
pub(crate) mod test_support;
pub mod uart;

use std::sync::{Arc, Mutex};

/// A device on the PIO or MMIO bus. `offset` is relative to the base the
/// device was registered at; `data.len()` is the access width (1, 2 or 4).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// One interrupt request line into the interrupt controller. Devices drive
/// the level; the controller decides what an edge or a level means.
pub trait IrqLine: Send {
    fn set_level(&self, high: bool);
}

/// Where guest output goes. The VMM decides whether bytes go straight to
/// stdout, are held back until the backup has acknowledged the log (FT), or
/// are captured by a test.
pub trait OutputSink: Send {
    fn emit(&mut self, bytes: &[u8]);
}

/// Guest time as the VMM owns it. Devices read time only through this, so
/// recording can log each value read and replay can hand the same values back.
pub trait Clock: Send + Sync {
    /// Nanoseconds of guest time since the VM started.
    fn now_ns(&self) -> u64;
}

/// Why the guest asked the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// Written to the debug exit port: the VM ends with this status.
    Exit(u8),
    /// The i8042 reset line was pulsed (or the guest triple-faulted).
    Reset,
    /// The guest halted with interrupts disabled: powered off.
    Halt,
}

/// Shared slot where devices post a stop request; the vCPU loop checks it
/// after every exit.
#[derive(Clone, Default)]
pub struct StopSignal(Arc<Mutex<Option<StopRequest>>>);

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }
    /// The first request wins; later ones are ignored.
    pub fn request(&self, req: StopRequest) {
        let mut slot = self.0.lock().unwrap();
        if slot.is_none() {
            *slot = Some(req);
        }
    }
    pub fn get(&self) -> Option<StopRequest> {
        *self.0.lock().unwrap()
    }
}
