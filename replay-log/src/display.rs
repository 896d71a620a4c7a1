//! One-line text forms for `ftvm log dump` and diagnostics. Numbers that
//! are addresses, ports or digests print in hex; counts and times in decimal.

use std::fmt;

use crate::{EndReason, Event, ExitKind, Record};

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::Boot => f.write_str("boot"),
            ExitKind::IoIn(p) => write!(f, "io-in({p:#x})"),
            ExitKind::IoOut(p) => write!(f, "io-out({p:#x})"),
            ExitKind::MmioRead(a) => write!(f, "mmio-read({a:#x})"),
            ExitKind::MmioWrite(a) => write!(f, "mmio-write({a:#x})"),
            ExitKind::Hlt => f.write_str("hlt"),
            ExitKind::IrqWindowOpen => f.write_str("irq-window"),
            ExitKind::Trap(id) => write!(f, "trap({id:#x})"),
            ExitKind::Msr(m) => write!(f, "msr({m:#x})"),
            ExitKind::Stop => f.write_str("stop"),
            ExitKind::Resync => f.write_str("resync"),
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Exit(status) => write!(f, "exit({status})"),
            EndReason::Reset => f.write_str("reset"),
            EndReason::Interrupted => f.write_str("interrupted"),
            EndReason::Halted => f.write_str("halted"),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.kind_name();
        match self {
            Event::WallClock { epoch_secs } => write!(f, "{name} epoch_secs={epoch_secs}"),
            Event::Time { ns } => write!(f, "{name} ns={ns}"),
            // Escaped so control bytes from the guest can't mangle a terminal.
            Event::SerialIn { bytes } => write!(f, "{name} \"{}\"", bytes.escape_ascii()),
            Event::Interrupt { vector } => write!(f, "{name} vector={vector:#x}"),
            Event::Check { regs_digest } => write!(f, "{name} regs_digest={regs_digest:#018x}"),
            Event::Progress { frames_out } => write!(f, "{name} frames_out={frames_out}"),
            Event::Pages { pages } => match (pages.first(), pages.last()) {
                (Some((lo, _)), Some((hi, _))) => write!(f, "{name} count={} first={lo:#x} last={hi:#x}", pages.len()),
                _ => write!(f, "{name} count=0"),
            },
            Event::VcpuState { state } => write!(f, "{name} bytes={}", state.len()),
            Event::NetRx { frame } => write!(f, "{name} len={}", frame.len()),
            Event::NetTx { len, digest } => write!(f, "{name} len={len} digest={digest:#018x}"),
            Event::End {
                reason,
                regs_digest,
                mem_digest,
            } => write!(
                f,
                "{name} reason={reason} regs_digest={regs_digest:#018x} mem_digest={mem_digest:#018x}"
            ),
        }
    }
}

/// The record number is not part of a record; callers that have it
/// prefix it themselves ("#12 @1234 ...").
impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "@{} rip={:#x} {} {}",
            self.pos.ordinal, self.pos.rip, self.pos.exit, self.event
        )
    }
}
