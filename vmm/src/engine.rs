//! The exit loop. Every exit goes through [`run`] in one fixed order, the
//! same in every mode (plain run, recording, replay, primary, backup):
//!
//! 1. classify the exit; only deterministic exits (port I/O, MMIO, `hlt`,
//!    trapped `rdtsc`, MSRs) are positions; signal kicks are not;
//! 2. `Inputs::before_access`: replay may hand over the time value the
//!    device will read during the access;
//! 3. the device access (or the trapped instruction's emulation);
//! 4. time the devices saw moves the timer;
//! 5. `Inputs::arrivals`: what arrives at this exit (time, typed bytes),
//!    each applied by [`crate::apply::apply`];
//! 6. a `hlt` with nothing pending waits: more arrivals, until an
//!    interrupt is pending (live: the host's timer and input; replay: the
//!    log);
//! 7. a stop requested by a device ends the run (`Observed::End`);
//! 8. a pending interrupt is injected if the guest can take it
//!    (`Observed::Injected`);
//! 9. `Observed::ExitDone`: periodic checks, high-water marks, the end of
//!    a replayed log.
//!
//! Inputs reach the guest only at these points, which is what makes a
//! position (the exit ordinal) enough to replay them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use replay_log::{EndReason, Event, ExitKind, Position};
use vm_memory::GuestMemoryMmap;

use crate::apply::{apply, guest_tsc, Stage};
use crate::devices::StopRequest;
use crate::digest;
use crate::linux::{TrapKind, Traps};
use crate::machine::Machine;
use crate::stop::{StopHandle, INTERRUPTED};
use crate::vcpu::{Vcpu, VcpuError, VmExit};
use crate::vcpu_state::VcpuState;

/// `IA32_TIME_STAMP_COUNTER`: reads answer the guest's TSC, writes are
/// ignored (the guest's TSC is guest time).
pub const MSR_IA32_TSC: u32 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("KVM {what} failed at exit #{ordinal}: {err}")]
    Kvm { what: &'static str, ordinal: u64, err: VcpuError },
    #[error("KVM could not run the guest at exit #{ordinal} (rip {rip:#x}): {what}")]
    Guest { ordinal: u64, rip: u64, what: String },
    #[error("guest halted at exit #{ordinal} (rip {rip:#x}) with no timer armed and no input left to wait for")]
    Stuck { ordinal: u64, rip: u64 },
    #[error("replay diverged at exit #{ordinal} (rip {rip:#x}): the log has {expected}, replay {found}")]
    Diverged { ordinal: u64, rip: u64, expected: String, found: String },
    #[error("a '{0}' record is not an input and cannot be applied")]
    NotAnInput(&'static str),
    #[error("{0}")]
    Log(#[from] replay_log::LogError),
    #[error("writing the log: {0}")]
    LogWrite(replay_log::LogError),
}

/// A deterministic exit: the position events are attached to.
pub struct ExitPoint<'a> {
    pub ordinal: u64,
    pub exit: ExitKind,
    rip: Option<u64>,
    vcpu: &'a mut dyn Vcpu,
    mem: &'a GuestMemoryMmap,
    /// At a resync: whether the logged state can take an interrupt. Both
    /// the recording and its replay decide from the state, not from
    /// `kvm_run` (stale after a state is set).
    inject_ok: Option<bool>,
}

impl<'a> ExitPoint<'a> {
    pub fn new(ordinal: u64, exit: ExitKind, vcpu: &'a mut dyn Vcpu, mem: &'a GuestMemoryMmap) -> Self {
        ExitPoint { ordinal, exit, rip: None, vcpu, mem, inject_ok: None }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        self.mem
    }

    /// The vCPU's complete state here, captured for a resync record.
    pub fn capture(&mut self) -> Result<VcpuState, EngineError> {
        let s = self.vcpu.capture().map_err(self.kvm("capture the vCPU state"))?;
        self.inject_ok = Some(s.can_take_interrupt());
        Ok(s)
    }

    /// Sets the vCPU's complete state (a resync being applied).
    pub fn restore(&mut self, s: &VcpuState) -> Result<(), EngineError> {
        self.vcpu.restore(s).map_err(self.kvm("restore the vCPU state"))?;
        self.rip = Some(s.regs.rip);
        self.inject_ok = Some(s.can_take_interrupt());
        Ok(())
    }

    fn can_inject(&mut self) -> bool {
        match self.inject_ok {
            Some(ok) => ok,
            None => self.vcpu.can_inject(),
        }
    }

    fn kvm(&self, what: &'static str) -> impl Fn(VcpuError) -> EngineError {
        let ordinal = self.ordinal;
        move |err| EngineError::Kvm { what, ordinal, err }
    }

    pub fn rip(&mut self) -> Result<u64, EngineError> {
        if let Some(r) = self.rip {
            return Ok(r);
        }
        let r = self.vcpu.regs().map_err(self.kvm("get regs"))?.rip;
        self.rip = Some(r);
        Ok(r)
    }

    pub fn position(&mut self) -> Result<Position, EngineError> {
        Ok(Position { ordinal: self.ordinal, rip: self.rip()?, exit: self.exit })
    }

    pub fn regs_digest(&mut self) -> Result<u64, EngineError> {
        let r = self.vcpu.regs().map_err(self.kvm("get regs"))?;
        let s = self.vcpu.sregs().map_err(self.kvm("get sregs"))?;
        Ok(digest::regs_digest(&r, &s))
    }

    /// A divergence at this exit (RIP as far as known).
    pub fn diverged(&mut self, expected: String, found: String) -> EngineError {
        let rip = self.rip().unwrap_or(0);
        EngineError::Diverged { ordinal: self.ordinal, rip, expected, found }
    }

    /// The vCPU, for inputs that change its state.
    pub fn vcpu(&mut self) -> &mut dyn Vcpu {
        self.vcpu
    }
}

/// How a run ended, other than by an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The guest stopped the VM (exit port, reset, triple fault, power-off).
    Guest(StopRequest),
    /// SIGINT/SIGTERM (live), or replay reached an `Interrupted` end record.
    Interrupted,
    /// Replay ran out of log before its end record; the text says where.
    LogIncomplete(String),
    /// Another part of this VMM ended the run (a fenced primary, a backup
    /// the witness dropped): why, and the process's exit code.
    Stopped { why: String, code: i32 },
}

impl Ending {
    /// The one wording of each ending and its exit code, for every command
    /// that runs a guest (`run`, `record`, `replay`, `primary`, `backup`).
    pub fn describe(&self) -> (String, i32) {
        match self {
            Ending::Guest(StopRequest::Exit(s)) => (format!("guest exited with status {s}"), i32::from(*s)),
            Ending::Guest(StopRequest::Reset) => ("guest reset the machine".into(), 0),
            Ending::Guest(StopRequest::Halt) => ("guest powered off (halted with interrupts disabled)".into(), 0),
            Ending::Interrupted => ("interrupted".into(), 130),
            Ending::LogIncomplete(w) => (w.clone(), 3),
            Ending::Stopped { why, code } => (why.clone(), *code),
        }
    }
}

pub enum Flow {
    Continue,
    Stop(Ending),
}

/// What the engine did at an exit, for the inputs to log (live) or check
/// against the log (replay).
pub enum Observed<'a> {
    /// This vector was injected after the exit.
    Injected(u8),
    /// The exit is fully handled.
    ExitDone,
    /// The run ends here. `mem_digest` hashes guest memory (a fraction of
    /// a second for a large guest): call it only when the digest is needed.
    End { reason: EndReason, mem_digest: &'a dyn Fn() -> u64 },
}

/// Where the nondeterministic inputs come from: the host (plain run,
/// recording, primary), a log (replay), or first one then the other (a
/// backup that takes over). Inputs never touch devices themselves: they
/// say what arrives, and the engine applies it.
pub trait Inputs {
    /// Before the device access of a deterministic exit: a value the device
    /// must see during the access (replay: the logged time). RIP cannot be
    /// read yet (the exit's data is borrowed from the vCPU).
    fn before_access(&mut self, m: &Machine, ordinal: u64, exit: ExitKind) -> Result<Option<Event>, EngineError>;
    /// What arrives at this exit, in the order to apply, pushed to `out`.
    /// At ordinal 0 (boot) this includes the wall clock. With `idle`, the
    /// guest is halted with nothing pending: live waits (bounded) for the
    /// next timer deadline or input; replay must find it in the log.
    fn arrivals(&mut self, m: &Machine, at: &mut ExitPoint, idle: bool, out: &mut Vec<Event>) -> Result<Flow, EngineError>;
    /// What the engine did (see [`Observed`]).
    fn observe(&mut self, m: &Machine, at: &mut ExitPoint, what: Observed) -> Result<Flow, EngineError>;
    /// Live: the vCPU was kicked out of the guest between exits. True
    /// makes this point a position (`ExitKind::Resync`): something is due
    /// (the timer's deadline passed, or an interrupt is waiting). An error
    /// (the log could not be written) ends the run like any other.
    fn kicked(&mut self, _m: &Machine) -> Result<bool, EngineError> {
        Ok(false)
    }
    /// Replay: the log's next position is a resync at `ordinal`; its state
    /// is applied instead of running the guest.
    fn resync_next(&mut self, _m: &Machine, _ordinal: u64) -> Result<bool, EngineError> {
        Ok(false)
    }
    /// At the top of every turn of the exit loop, before the guest runs
    /// again (after boot's arrivals, after each exit, after a debug exit):
    /// a debugger stops the guest here (`gdb/`). Not a position; the
    /// guest has not run since the last one. `at` is the last exit.
    fn pause_point(&mut self, _m: &Machine, _at: &mut ExitPoint) -> Result<Flow, EngineError> {
        Ok(Flow::Continue)
    }
    /// A debug exit (single step, hardware breakpoint) that a debugger
    /// asked for: not a guest exit and never a position, so the ordinal
    /// does not move. False: nobody asked for it (an error).
    fn debug_exit(&mut self, _m: &Machine, _pc: u64, _dr6: u64) -> Result<bool, EngineError> {
        Ok(false)
    }
    /// The vCPU came back from the guest (any exit, a kick or a resync,
    /// before anything looks at guest memory): a debugger that patched
    /// guest code for this run (breakpoints as `hlt`, where the debug
    /// registers do not work) puts it back here. `hlt_rip`: the RIP of a
    /// HLT exit (just after the `hlt`). Returns the breakpoint's address
    /// when that `hlt` was one of the debugger's: the engine then moves RIP
    /// back to it and reports a debug exit (no ordinal, not a position).
    fn left_guest(&mut self, _m: &Machine, _hlt_rip: Option<u64>) -> Result<Option<u64>, EngineError> {
        Ok(None)
    }
    /// A one-line account for progress reports and the run's summary.
    fn summary(&self) -> String;
}

#[derive(Debug, Default, Clone)]
pub struct ExitStats {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub irq_window: u64,
    pub msr: u64,
    pub traps: u64,
    pub interrupts: u64,
    pub signals: u64,
    /// Positions between exits (kicks when live, applied states in replay).
    pub resyncs: u64,
}

impl ExitStats {
    pub fn total(&self) -> u64 {
        self.io_in + self.io_out + self.mmio + self.hlt + self.irq_window + self.msr + self.traps
    }

    /// One line for the run's summary.
    pub fn summary(&self, exits: u64, wall: Duration) -> String {
        format!(
            "{exits} exits ({} in, {} out, {} mmio, {} hlt, {} trap, {} msr, {} resync), {} interrupts injected, {:.2}s",
            self.io_in, self.io_out, self.mmio, self.hlt, self.traps, self.msr, self.resyncs, self.interrupts,
            wall.as_secs_f64()
        )
    }
}

pub struct Outcome {
    pub ending: Ending,
    pub stats: ExitStats,
    pub exits: u64,
    pub wall: Duration,
}

impl Outcome {
    pub fn summary(&self) -> String {
        self.stats.summary(self.exits, self.wall)
    }
}

#[derive(Default)]
pub struct RunOptions {
    /// Progress on stderr every second (at `info` level).
    pub progress: bool,
    /// Stop requests from other threads of this VMM.
    pub stop: StopHandle,
}

/// The guest as the exit loop sees it.
pub struct Guest<'a> {
    pub vcpu: &'a mut dyn Vcpu,
    pub machine: &'a Machine,
    pub mem: &'a GuestMemoryMmap,
    /// Patched `rdtsc`/`rdtscp` sites of a Linux guest.
    pub traps: Option<&'a Traps>,
}

fn end_reason(req: StopRequest) -> EndReason {
    match req {
        StopRequest::Exit(s) => EndReason::Exit(s),
        StopRequest::Reset => EndReason::Reset,
        StopRequest::Halt => EndReason::Halted,
    }
}

/// Asks `inputs` what arrives at this exit and applies it.
fn arrive<I: Inputs + ?Sized>(
    m: &Machine,
    inputs: &mut I,
    at: &mut ExitPoint,
    idle: bool,
    buf: &mut Vec<Event>,
) -> Result<Flow, EngineError> {
    buf.clear();
    let flow = inputs.arrivals(m, at, idle, buf)?;
    for ev in buf.iter() {
        apply(m, Some(&mut *at), ev, Stage::AfterAccess)?;
    }
    Ok(flow)
}

/// Performs the device access of an exit that carries one. Returns false
/// for exits without an access (handled by the caller).
fn access(m: &Machine, exit: VmExit<'_>, stats: &mut ExitStats) {
    match exit {
        VmExit::IoIn(port, data) => {
            stats.io_in += 1;
            if !m.pio.read(port.into(), data) {
                log::debug!("read of unmapped port {port:#x} ({} bytes)", data.len());
                data.fill(0xff);
            }
        }
        VmExit::IoOut(port, data) => {
            stats.io_out += 1;
            if !m.pio.write(port.into(), data) {
                log::debug!("write of unmapped port {port:#x}: {data:02x?}");
            }
        }
        VmExit::MmioRead(addr, data) => {
            stats.mmio += 1;
            if !m.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VmExit::MmioWrite(addr, data) => {
            stats.mmio += 1;
            m.mmio.write(addr, data);
        }
        // Only the time MSRs are sent here (see vm::TIME_MSRS).
        VmExit::RdMsr { index, data, error } => {
            stats.msr += 1;
            if index == MSR_IA32_TSC {
                *data = guest_tsc(m);
            } else {
                *error = 1;
            }
        }
        VmExit::WrMsr { index, error, .. } => {
            stats.msr += 1;
            if index != MSR_IA32_TSC {
                *error = 1;
            }
        }
        VmExit::IrqWindowOpen => stats.irq_window += 1,
        VmExit::Shutdown => m.stop.request(StopRequest::Reset),
        VmExit::Hlt | VmExit::Kicked | VmExit::Failed(_) | VmExit::Debug { .. } => unreachable!("no device access"),
    }
}

fn exit_kind(exit: &VmExit<'_>) -> Option<ExitKind> {
    Some(match exit {
        VmExit::IoIn(port, _) => ExitKind::IoIn(*port),
        VmExit::IoOut(port, _) => ExitKind::IoOut(*port),
        VmExit::MmioRead(a, _) => ExitKind::MmioRead(*a),
        VmExit::MmioWrite(a, _) => ExitKind::MmioWrite(*a),
        VmExit::Hlt => ExitKind::Hlt,
        VmExit::RdMsr { index, .. } | VmExit::WrMsr { index, .. } => ExitKind::Msr(*index),
        VmExit::IrqWindowOpen => ExitKind::IrqWindowOpen,
        VmExit::Shutdown => ExitKind::Stop,
        VmExit::Kicked | VmExit::Failed(_) | VmExit::Debug { .. } => return None,
    })
}

/// Emulates the `rdtsc`/`rdtscp` that was patched into the `hlt` at `site`.
fn emulate_rdtsc(m: &Machine, regs: &mut kvm_regs, site: u64, kind: TrapKind) {
    let tsc = guest_tsc(m);
    regs.rax = tsc & 0xffff_ffff;
    regs.rdx = tsc >> 32;
    if kind == TrapKind::Rdtscp {
        regs.rcx = 0; // IA32_TSC_AUX: CPU 0
    }
    regs.rip = site + kind.insn_len();
}

/// Runs the guest until it stops, the user interrupts, replay ends, or
/// another thread asks it to stop.
pub fn run<I: Inputs + ?Sized>(g: Guest<'_>, inputs: &mut I, opts: &RunOptions) -> Result<Outcome, EngineError> {
    run_from(g, inputs, opts, None)
}

/// [`run`], from boot (`start` is `None`) or from just after the exit at
/// `start`: the VM was put in the state it had at the end of that exit
/// (`snapshot::Snapshot::restore`), so there are no boot arrivals and the
/// next exit is `start.ordinal + 1`. Everything else is the one loop.
/// `Outcome::exits` is the last ordinal reached, counted from boot.
pub fn run_from<I: Inputs + ?Sized>(g: Guest<'_>, inputs: &mut I, opts: &RunOptions, start: Option<Position>) -> Result<Outcome, EngineError> {
    let Guest { vcpu, machine: m, mem, traps } = g;
    let _kick = opts.stop.register_vcpu_thread();
    vcpu.arm_kick();
    let started = Instant::now();
    let mut stats = ExitStats::default();
    let mut ordinal = start.map_or(0, |p| p.ordinal);
    let mut last_kind = start.map_or(ExitKind::Boot, |p| p.exit);
    let mut buf = Vec::new();
    let mut last_progress = Instant::now();
    let mem_digest = || digest::mem_digest(mem);

    // Ordinal 0: boot. The wall clock (and whatever else the log has
    // there) arrives before the first instruction.
    if start.is_none() {
        let mut at = ExitPoint::new(0, ExitKind::Boot, &mut *vcpu, mem);
        if let Flow::Stop(e) = arrive(m, inputs, &mut at, false, &mut buf)? {
            return Ok(Outcome { ending: e, stats, exits: 0, wall: started.elapsed() });
        }
    }

    let ending = 'run: loop {
        if let Some(e) = opts.stop.requested() {
            break e;
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            let mut at = ExitPoint::new(ordinal, last_kind, &mut *vcpu, mem);
            inputs.observe(m, &mut at, Observed::End { reason: EndReason::Interrupted, mem_digest: &mem_digest })?;
            break Ending::Interrupted;
        }
        {
            // A debugger's stop (nothing without one).
            let mut at = ExitPoint::new(ordinal, last_kind, &mut *vcpu, mem);
            if let Flow::Stop(e) = inputs.pause_point(m, &mut at)? {
                break e;
            }
        }
        if opts.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            log::info!(
                "ftvm: {:.1}s exit #{ordinal} ({} in, {} out, {} hlt, {} irqs) {}",
                started.elapsed().as_secs_f64(),
                stats.io_in, stats.io_out, stats.hlt, stats.interrupts,
                inputs.summary()
            );
        }

        // 1-3: run, classify, the one prologue, the access.
        let next = ordinal + 1;
        let kind = 'exit: {
            if inputs.resync_next(m, next)? {
                // Replay: the recorder stopped the guest here, between
                // exits. Finish the pending exit, then its state applies
                // (arrivals) instead of running the guest to this point.
                inputs.left_guest(m, None)?;
                vcpu.complete_pending().map_err(|err| EngineError::Kvm { what: "complete the pending exit", ordinal, err })?;
                ordinal = next;
                stats.resyncs += 1;
                begin_exit(m, inputs, ordinal, ExitKind::Resync)?;
                break 'exit ExitKind::Resync;
            }
            opts.stop.entering();
            let exit = vcpu.run();
            opts.stop.left();
            let exit = exit.map_err(|err| EngineError::Kvm { what: "run", ordinal, err })?;
            let exit = if matches!(exit, VmExit::Hlt) {
                drop(exit);
                let mut regs = vcpu.regs().map_err(|err| EngineError::Kvm { what: "get regs", ordinal, err })?;
                if let Some(pc) = inputs.left_guest(m, Some(regs.rip))? {
                    // A debugger's breakpoint (a patched `hlt`, now put
                    // back): the guest stands at it, not yet run.
                    regs.rip = pc;
                    vcpu.set_regs(&regs).map_err(|err| EngineError::Kvm { what: "set regs", ordinal, err })?;
                    if !inputs.debug_exit(m, pc, 1)? {
                        return Err(EngineError::Guest { ordinal: next, rip: pc, what: "unexpected breakpoint".into() });
                    }
                    continue 'run;
                }
                VmExit::Hlt
            } else {
                inputs.left_guest(m, None)?;
                exit
            };
            let Some(kind) = exit_kind(&exit) else {
                if let VmExit::Failed(what) = &exit {
                    let what = what.clone();
                    drop(exit);
                    let rip = vcpu.regs().map(|r| r.rip).unwrap_or(0);
                    return Err(EngineError::Guest { ordinal: next, rip, what });
                }
                if let VmExit::Debug { pc, dr6 } = &exit {
                    let (pc, dr6) = (*pc, *dr6);
                    drop(exit);
                    // A step or breakpoint a debugger asked for: the guest
                    // made no exit, so no ordinal.
                    if !inputs.debug_exit(m, pc, dr6)? {
                        return Err(EngineError::Guest { ordinal: next, rip: pc, what: format!("unexpected debug exit (dr6 {dr6:#x})") });
                    }
                    continue 'run;
                }
                drop(exit);
                // A kick: the next entry must run the guest again.
                vcpu.clear_kick();
                stats.signals += 1;
                if opts.stop.requested().is_some() || INTERRUPTED.load(Ordering::Relaxed) || !inputs.kicked(m)? {
                    continue 'run;
                }
                ordinal = next;
                stats.resyncs += 1;
                begin_exit(m, inputs, ordinal, ExitKind::Resync)?;
                break 'exit ExitKind::Resync;
            };
            ordinal = next;
            match exit {
                VmExit::Hlt => {
                    // A `hlt` may be a patched rdtsc; RIP tells.
                    let mut regs = vcpu.regs().map_err(|err| EngineError::Kvm { what: "get regs", ordinal, err })?;
                    let trap = traps.and_then(|t| t.lookup(mem, regs.rip));
                    let kind = trap.map_or(ExitKind::Hlt, |(site, _)| ExitKind::Trap(site));
                    begin_exit(m, inputs, ordinal, kind)?;
                    match trap {
                        Some((site, tk)) => {
                            stats.traps += 1;
                            emulate_rdtsc(m, &mut regs, site, tk);
                            vcpu.set_regs(&regs).map_err(|err| EngineError::Kvm { what: "set regs", ordinal, err })?;
                        }
                        None => stats.hlt += 1,
                    }
                    kind
                }
                exit => {
                    begin_exit(m, inputs, ordinal, kind)?;
                    access(m, exit, &mut stats);
                    kind
                }
            }
        };
        last_kind = kind;
        let mut at = ExitPoint::new(ordinal, kind, &mut *vcpu, mem);

        // 4: time the devices saw during the access also moves the timer.
        if m.clock.has_value() {
            m.pit.lock().unwrap().update();
        }
        // 5: arrivals.
        if let Flow::Stop(e) = arrive(m, inputs, &mut at, false, &mut buf)? {
            break e;
        }
        // 6: an idle guest waits for its next interrupt.
        if kind == ExitKind::Hlt && !at.vcpu.interrupts_enabled() {
            // `cli; hlt`: nothing can ever wake the guest. This is how
            // Linux powers off a machine without ACPI.
            m.stop.request(StopRequest::Halt);
        }
        if kind == ExitKind::Hlt && m.stop.get().is_none() {
            let mut stop = None;
            while !m.pic.lock().unwrap().has_interrupt()
                && !INTERRUPTED.load(Ordering::Relaxed)
                && opts.stop.requested().is_none()
            {
                if let Flow::Stop(e) = arrive(m, inputs, &mut at, true, &mut buf)? {
                    stop = Some(e);
                    break;
                }
            }
            if let Some(e) = stop {
                break e;
            }
        }
        // 7: a device asked to stop.
        if let Some(req) = m.stop.get() {
            if let Flow::Stop(e) = inputs.observe(m, &mut at, Observed::End { reason: end_reason(req), mem_digest: &mem_digest })? {
                break e;
            }
            break Ending::Guest(req);
        }
        // 8: interrupt delivery, only here, at a deterministic exit where
        // the guest can take one. ftvm never asks KVM for interrupt-window
        // exits: on the PVM backend they arrive at host-dependent points,
        // which would make positions unrepeatable; a pending interrupt
        // waits for the guest's next exit with interrupts enabled instead.
        if m.pic.lock().unwrap().has_interrupt() && at.can_inject() {
            let vector = m.pic.lock().unwrap().acknowledge();
            at.vcpu.inject(vector).map_err(|err| EngineError::Kvm { what: "interrupt", ordinal, err })?;
            stats.interrupts += 1;
            if let Flow::Stop(e) = inputs.observe(m, &mut at, Observed::Injected(vector))? {
                break e;
            }
        }
        // 9.
        if let Flow::Stop(e) = inputs.observe(m, &mut at, Observed::ExitDone)? {
            break e;
        }
    };
    Ok(Outcome { ending, stats, exits: ordinal, wall: started.elapsed() })
}

/// The prologue of every deterministic exit, before its access.
fn begin_exit<I: Inputs + ?Sized>(m: &Machine, inputs: &mut I, ordinal: u64, kind: ExitKind) -> Result<(), EngineError> {
    m.clock.begin_exit();
    m.ordinal.store(ordinal, Ordering::Relaxed);
    match inputs.before_access(m, ordinal, kind)? {
        // The exit's data is borrowed from the vCPU here: no vCPU access.
        Some(ev) => apply(m, None, &ev, Stage::BeforeAccess),
        None => Ok(()),
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
