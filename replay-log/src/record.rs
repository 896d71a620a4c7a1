//! What the log holds. See FORMAT.md for the byte layout.

/// The kind of VM exit a record is attached to, with the port or address
/// where there is one. Replay checks it: reaching the same ordinal at a
/// different kind of exit means execution diverged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// Before the first `KVM_RUN` (ordinal 0).
    Boot,
    IoIn(u16),
    IoOut(u16),
    MmioRead(u64),
    MmioWrite(u64),
    Hlt,
    IrqWindowOpen,
    /// A trapped instruction the VMM emulates (e.g. a patched `rdtsc`).
    Trap(u64),
    /// A model-specific register read or write sent to userspace.
    Msr(u32),
    /// The VM stopped (exit port, reset, shutdown).
    Stop,
    /// Not an exit of the guest's: the VMM stopped a guest that ran too
    /// long without exiting (a signal kick) and logged its state there
    /// (`Pages`, `VcpuState`), so replay applies that state instead of
    /// running to this point.
    Resync,
}

/// A point in the guest's execution: the count of deterministic exits so
/// far, plus what replay must see there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Deterministic exits completed before this one (0 = boot).
    pub ordinal: u64,
    /// Guest RIP at the exit, as KVM reports it.
    pub rip: u64,
    pub exit: ExitKind,
}

/// Why the recorded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The guest wrote this status to the debug exit port.
    Exit(u8),
    /// The guest reset the machine (i8042 or triple fault).
    Reset,
    /// The recorder was stopped from outside (signal); the run is cut here.
    Interrupted,
    /// The guest halted the CPU with interrupts disabled: how a machine
    /// without ACPI powers off (Linux's `poweroff` ends in `cli; hlt`).
    Halted,
}

/// One nondeterministic input, or one check replay must pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Wall-clock base (seconds since the Unix epoch) for the CMOS clock.
    WallClock { epoch_secs: u64 },
    /// The VMM clock read at this exit: nanoseconds of guest time.
    Time { ns: u64 },
    /// Bytes that arrived on the serial port at this exit.
    SerialIn { bytes: Vec<u8> },
    /// Interrupt vector injected with `KVM_INTERRUPT` after this exit.
    /// Replay derives the same injection from the device state and checks it.
    Interrupt { vector: u8 },
    /// Digest of the vCPU's general registers at this exit.
    Check { regs_digest: u64 },
    /// Guest pages as they are at this position: (guest-physical address
    /// of a 4 KiB page, its 4096 bytes). A resync's memory delta, in as
    /// many records as it takes.
    Pages { pages: Vec<(u64, Vec<u8>)> },
    /// The vCPU's complete state at this position, in the layout of
    /// FORMAT.md ("vCPU state"), opaque to this crate.
    VcpuState { state: Vec<u8> },
    /// An Ethernet frame the network card received at this exit (its
    /// bytes, as the host's tap gave them), handed to the guest here.
    NetRx { frame: Vec<u8> },
    /// A frame the guest transmitted at this exit: its length and a
    /// digest of its bytes (FNV-1a, FORMAT.md). Not an input: replay
    /// compares the frames it transmits with these.
    NetTx { len: u32, digest: u64 },
    /// The primary got this far with nothing else to log (a streamed
    /// high-water mark; never needed in a file). `frames_out`: the primary
    /// had put on the wire every frame the guest sent through this exit
    /// ordinal (0: none yet): a backup that takes over must not send them
    /// again, and must send every later one (`ft/held_frames.rs`).
    Progress { frames_out: u64 },
    /// The run ended here: why, the final register digest and a digest of
    /// guest memory.
    End {
        reason: EndReason,
        regs_digest: u64,
        mem_digest: u64,
    },
}

impl Event {
    /// Whether the record carries an input the guest is given (applied by
    /// the VMM at its position), as opposed to a check or a mark.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            Event::WallClock { .. } | Event::Time { .. } | Event::SerialIn { .. } | Event::Pages { .. } | Event::VcpuState { .. } | Event::NetRx { .. }
        )
    }

    /// Short stable name, used by `log dump` and `log stats`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Event::WallClock { .. } => "wallclock",
            Event::Time { .. } => "time",
            Event::SerialIn { .. } => "serial-in",
            Event::Interrupt { .. } => "interrupt",
            Event::Check { .. } => "check",
            Event::Pages { .. } => "pages",
            Event::VcpuState { .. } => "vcpu-state",
            Event::NetRx { .. } => "net-rx",
            Event::NetTx { .. } => "net-tx",
            Event::Progress { .. } => "progress",
            Event::End { .. } => "end",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub pos: Position,
    pub event: Event,
}

/// Names the guest a log was recorded from; replay refuses a log whose
/// header doesn't match the guest it is asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// SHA-256 of the kernel file as loaded.
    pub kernel_sha256: [u8; 32],
    /// SHA-256 of the initrd, if any.
    pub initrd_sha256: Option<[u8; 32]>,
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// The guest's command line.
    pub cmdline: String,
    /// `ftvm` version that wrote the log.
    pub ftvm_version: String,
    /// Free-form name of the kernel (file name or "built-in test guest").
    pub kernel_name: String,
    /// The MAC of the guest's virtio-net card, if it has one (version 3;
    /// absent, i.e. no card, in older logs).
    pub net_mac: Option<[u8; 6]>,
}
