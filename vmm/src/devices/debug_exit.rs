//! QEMU-style debug exit port: lets a test guest end the VM with a status
//! of its choosing, without ACPI or a triple fault.

use std::fmt;

use super::{BusDevice, StopRequest, StopSignal};

pub struct DebugExit {
    stop: StopSignal,
}

impl DebugExit {
    pub fn new(stop: StopSignal) -> Self {
        Self { stop }
    }
}

/// The debug exit port holds no state of its own: a write asks the VM
/// to stop at once, and a stop ends the run (no snapshot is taken after
/// one). The type is here so every device has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugExitState {}

impl DebugExit {
    pub fn state(&self) -> DebugExitState {
        DebugExitState {}
    }

    /// A port in state `s` that asks `stop` to end the VM.
    pub fn from_state(_s: &DebugExitState, stop: StopSignal) -> Self {
        Self::new(stop)
    }
}

impl fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DebugExit").finish_non_exhaustive()
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Only the low byte of a wider write counts: the status is a byte.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.stop.request(StopRequest::Exit(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_value() {
        let stop = StopSignal::new();
        let mut d = DebugExit::new(stop.clone());
        assert_eq!(stop.get(), None);
        d.write(0, &[42]);
        assert_eq!(stop.get(), Some(StopRequest::Exit(42)));
        // The first request wins.
        d.write(0, &[7]);
        assert_eq!(stop.get(), Some(StopRequest::Exit(42)));
    }

    #[test]
    fn state_round_trip_behaves_identically() {
        let stop = StopSignal::new();
        let mut d = DebugExit::from_state(&DebugExit::new(StopSignal::new()).state(), stop.clone());
        d.write(0, &[5]);
        assert_eq!(stop.get(), Some(StopRequest::Exit(5)));
    }

    #[test]
    fn wide_write_uses_low_byte() {
        let stop = StopSignal::new();
        let mut d = DebugExit::new(stop.clone());
        d.write(0, &[3, 1, 0, 0]);
        assert_eq!(stop.get(), Some(StopRequest::Exit(3)));
    }

    #[test]
    fn reads_zero_and_empty_write_ignored() {
        let stop = StopSignal::new();
        let mut d = DebugExit::new(stop.clone());
        let mut b = [0xff; 4];
        d.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        d.write(0, &[]);
        assert_eq!(stop.get(), None);
    }
}
