//! Emulated devices. Each one is a deterministic state machine: it sees only
//! `(offset, data)` accesses from the guest, the VMM clock it is handed, and
//! input the VMM pushes into it. Its interrupt line and output sink are
//! injected. That is what makes record/replay a matter of logging what is
//! injected, and lets every device be tested without KVM.
//!
//! Each device's state is also plain data (`XxxState`, pub fields, as
//! rust-vmm's vm-superio does): `state()` takes it, `restore()` puts it
//! back into a device that keeps its wiring (clock, interrupt line, output
//! sink), `from_state()` builds a new device from it. Snapshots are made
//! of these. A state holds everything that affects the device's future
//! behaviour; the wiring is not state.

pub mod cmos;
pub mod debug_exit;
pub mod i8042;
pub mod pic;
pub mod pit;
#[cfg(test)]
pub(crate) mod test_support;
pub mod uart;

use std::sync::{Arc, Mutex};

/// Why a device refused a state (`restore`, `from_state`): a value no
/// device of that kind can hold, from a damaged or hand-made snapshot.
/// Refused up front, so that a bad value can never reach the device's
/// logic (an index past its RAM, a priority past its eight lines).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("{device} state: {what}")]
    BadState { device: &'static str, what: String },
}

impl DeviceError {
    pub(crate) fn bad(device: &'static str, what: impl Into<String>) -> Self {
        DeviceError::BadState { device, what: what.into() }
    }
}

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
