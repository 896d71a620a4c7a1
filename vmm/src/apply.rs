//! The one place where a nondeterministic input reaches the guest.
//!
//! Recording samples the host and hands what it sampled here; replay reads
//! the log and hands the same records here; the backup does one and then
//! the other. Whatever the mode, an input is applied by this code and no
//! other, which is what makes a replayed run the recorded one. Adding a
//! kind of input means: its record in `replay-log`, an arm in [`apply`],
//! and tests of both.

use replay_log::Event;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::Clock;
use crate::engine::{EngineError, ExitPoint};
use crate::machine::Machine;
use crate::vcpu_state::VcpuState;

/// When, within an exit, an input is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before the exit's device access: a time value the device will read
    /// during the access. The timer does not move yet: a PIT reload at
    /// this exit must see the old deadline untouched, as it did live.
    BeforeAccess,
    /// After the access (and while the guest waits in `hlt`).
    AfterAccess,
}

/// Applies one input to the machine (and, for kinds that need it, to the
/// vCPU at `at`, which is `None` before the access: only time is handed
/// over then).
pub fn apply(m: &Machine, at: Option<&mut ExitPoint>, ev: &Event, stage: Stage) -> Result<(), EngineError> {
    match ev {
        Event::WallClock { epoch_secs } => m.cmos.lock().unwrap().set_wall_base(*epoch_secs),
        Event::Time { ns } => {
            m.clock.set(*ns);
            if stage == Stage::AfterAccess {
                m.pit.lock().unwrap().update();
            }
        }
        Event::SerialIn { bytes } => m.uart.lock().unwrap().push_input(bytes),
        // A resync: the memory the guest wrote since its last exit, then
        // the vCPU as it was where the recorder stopped it.
        Event::Pages { pages } => {
            let at = at.ok_or(EngineError::NotAnInput("pages before an access"))?;
            for (gpa, data) in pages {
                at.mem()
                    .write_slice(data, GuestAddress(*gpa))
                    .map_err(|_| at.diverged(format!("a page at {gpa:#x}"), "has no guest memory there".into()))?;
            }
        }
        Event::VcpuState { state } => {
            let at = at.ok_or(EngineError::NotAnInput("vcpu-state before an access"))?;
            let s = VcpuState::from_bytes(state).map_err(|e| at.diverged(format!("a vCPU state ({e})"), "cannot apply it".into()))?;
            at.restore(&s)?;
        }
        Event::NetRx { frame } => match &m.net {
            Some(net) => net.lock().unwrap().receive(frame),
            None => {
                let at = at.ok_or(EngineError::NotAnInput("net-rx without a card"))?;
                return Err(at.diverged("a received frame".into(), "has no network card".into()));
            }
        },
        // Not inputs: interrupts are derived from device state and checked,
        // the rest are checks and marks.
        Event::Interrupt { .. } | Event::Check { .. } | Event::NetTx { .. } | Event::Progress { .. } | Event::End { .. } => {
            return Err(EngineError::NotAnInput(ev.kind_name()))
        }
    }
    Ok(())
}

/// The guest's TSC, derived from the VM clock: what a trapped `rdtsc` or a
/// read of `IA32_TIME_STAMP_COUNTER` returns.
pub fn guest_tsc(m: &Machine) -> u64 {
    let ns = u128::from(m.clock.now_ns());
    (ns * u128::from(crate::linux::TSC_HZ) / 1_000_000_000) as u64
}
