//! The vCPU loop. Every `VcpuExit` is handled in `handle_exit`: the one
//! place where positions are counted and where recording and replay hook in
//! (through `Inputs`). Events reach the guest only at deterministic exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use replay_log::{EndReason, ExitKind, Position};

use crate::devices::{Clock, StopRequest};
use crate::digest;
use crate::machine::Machine;
use crate::vm::Vm;

/// Set from a signal handler (SIGINT/SIGTERM): stop at the next exit and
/// close the log cleanly.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("KVM {what} failed at exit #{ordinal}: {err}")]
    Kvm { what: &'static str, ordinal: u64, err: kvm_ioctls::Error },
    #[error("KVM could not run the guest at exit #{ordinal} (rip {rip:#x}): {what}")]
    Guest { ordinal: u64, rip: u64, what: String },
    #[error("guest halted with interrupts disabled at exit #{ordinal} (rip {rip:#x}): it can never wake up")]
    HaltedForever { ordinal: u64, rip: u64 },
    #[error("guest halted at exit #{ordinal} (rip {rip:#x}) with no timer armed and no input left to wait for")]
    Stuck { ordinal: u64, rip: u64 },
    #[error("replay diverged at exit #{ordinal} (rip {rip:#x}): the log has {expected}, replay {found}")]
    Diverged { ordinal: u64, rip: u64, expected: String, found: String },
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
    vcpu: &'a mut VcpuFd,
}

impl<'a> ExitPoint<'a> {
    pub fn new(ordinal: u64, exit: ExitKind, vcpu: &'a mut VcpuFd) -> Self {
        ExitPoint { ordinal, exit, rip: None, vcpu }
    }

    fn kvm_run(&mut self) -> &mut kvm_bindings::kvm_run {
        self.vcpu.get_kvm_run()
    }

    pub fn rip(&mut self) -> Result<u64, EngineError> {
        if let Some(r) = self.rip {
            return Ok(r);
        }
        let r = self
            .vcpu
            .get_regs()
            .map_err(|err| EngineError::Kvm { what: "get regs", ordinal: self.ordinal, err })?
            .rip;
        self.rip = Some(r);
        Ok(r)
    }

    pub fn position(&mut self) -> Result<Position, EngineError> {
        Ok(Position { ordinal: self.ordinal, rip: self.rip()?, exit: self.exit })
    }

    pub fn regs_digest(&mut self) -> Result<u64, EngineError> {
        let o = self.ordinal;
        let r = self.vcpu.get_regs().map_err(|err| EngineError::Kvm { what: "get regs", ordinal: o, err })?;
        let s = self.vcpu.get_sregs().map_err(|err| EngineError::Kvm { what: "get sregs", ordinal: o, err })?;
        Ok(digest::regs_digest(&r, &s))
    }

    pub fn diverged(&mut self, expected: String, found: String) -> EngineError {
        EngineError::Diverged { ordinal: self.ordinal, rip: self.rip.unwrap_or(0), expected, found }
    }
}

/// How a run ended, other than by an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The guest stopped the VM (exit port, reset, triple fault).
    Guest(StopRequest),
    /// SIGINT/SIGTERM (live), or replay reached an `Interrupted` end record.
    Interrupted,
    /// Replay ran out of log before its end record; the text says where.
    LogIncomplete(String),
}

pub enum Flow {
    Continue,
    Stop(Ending),
}

/// Where the nondeterministic inputs come from: the host (plain run and
/// recording) or a log (replay). The engine calls these at fixed points of
/// every deterministic exit, in the same order in every mode.
pub trait Inputs {
    /// Ordinal 0, before the guest runs: set the wall-clock base.
    fn boot(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError>;
    /// Before the exit's device access; replay gives devices their time here.
    fn before_dispatch(&mut self, m: &Machine, ordinal: u64, exit: ExitKind) -> Result<(), EngineError>;
    /// Inputs that arrive at this exit. With `wait`, the guest is halted
    /// with nothing pending: live blocks for the next timer or input byte;
    /// replay must find one in the log.
    fn deliver(&mut self, m: &Machine, at: &mut ExitPoint, wait: bool) -> Result<Flow, EngineError>;
    /// An interrupt was injected after this exit.
    fn injected(&mut self, m: &Machine, at: &mut ExitPoint, vector: u8) -> Result<(), EngineError>;
    /// The exit is fully handled: periodic checks, end-of-log detection.
    fn exit_done(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError>;
    /// The run ends here.
    /// `mem_digest` hashes guest memory (a fraction of a second for a large
    /// guest): call it only when the digest is needed.
    fn finish(&mut self, m: &Machine, at: &mut ExitPoint, reason: EndReason, mem_digest: &dyn Fn() -> u64) -> Result<(), EngineError>;
    /// Live only: guest time of the host clock, for the summary.
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
}

impl ExitStats {
    pub fn total(&self) -> u64 {
        self.io_in + self.io_out + self.mmio + self.hlt + self.irq_window + self.msr
    }
}

pub struct Outcome {
    pub ending: Ending,
    pub stats: ExitStats,
    pub exits: u64,
    pub wall: Duration,
}

pub struct RunOptions {
    pub verbose: bool,
}

/// Copies what an exit needs out of `kvm_run` and performs its device
/// access. Returns `None` for exits that are not deterministic (signals):
/// those don't count as positions.
fn handle_exit<I: Inputs>(
    exit: VcpuExit<'_>,
    m: &Machine,
    inputs: &mut I,
    next_ordinal: u64,
    stats: &mut ExitStats,
    verbose: bool,
) -> Result<Option<ExitKind>, EngineError> {
    let fail = |what: String| EngineError::Guest { ordinal: next_ordinal, rip: 0, what };
    let kind = match &exit {
        VcpuExit::IoIn(port, _) => ExitKind::IoIn(*port),
        VcpuExit::IoOut(port, _) => ExitKind::IoOut(*port),
        VcpuExit::MmioRead(a, _) => ExitKind::MmioRead(*a),
        VcpuExit::MmioWrite(a, _) => ExitKind::MmioWrite(*a),
        // A `hlt` may be a patched rdtsc: classified by the caller, which
        // can read the registers.
        VcpuExit::Hlt => {
            stats.hlt += 1;
            return Ok(Some(ExitKind::Hlt));
        }
        VcpuExit::X86Rdmsr(ref e) => ExitKind::Msr(e.index),
        VcpuExit::X86Wrmsr(ref e) => ExitKind::Msr(e.index),
        VcpuExit::IrqWindowOpen => ExitKind::IrqWindowOpen,
        VcpuExit::Shutdown => ExitKind::Stop,
        VcpuExit::Intr => {
            stats.signals += 1;
            return Ok(None);
        }
        VcpuExit::InternalError => {
            return Err(fail("KVM internal error (the instruction emulator failed)".into()))
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Err(fail(format!("VM entry failed: hardware reason {reason:#x} on cpu {cpu}")))
        }
        other => return Err(fail(format!("unhandled exit {other:?}"))),
    };
    m.clock.begin_exit();
    m.ordinal.store(next_ordinal, Ordering::Relaxed);
    inputs.before_dispatch(m, next_ordinal, kind)?;
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.io_in += 1;
            if !m.pio.read(port.into(), data) {
                if verbose {
                    eprintln!("ftvm: read of unmapped port {port:#x} ({} bytes)", data.len());
                }
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            stats.io_out += 1;
            if !m.pio.write(port.into(), data) && verbose {
                eprintln!("ftvm: write of unmapped port {port:#x}: {data:02x?}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.mmio += 1;
            if !m.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio += 1;
            m.mmio.write(addr, data);
        }
        VcpuExit::X86Rdmsr(e) => {
            stats.msr += 1;
            // Only the time MSRs are sent here (see vm::TIME_MSRS).
            if e.index == 0x10 {
                *e.data = m.clock.now_ns() * crate::linux::TSC_HZ / 1_000_000_000;
            } else {
                *e.error = 1;
            }
        }
        VcpuExit::X86Wrmsr(e) => {
            stats.msr += 1;
            // Writing the TSC is ignored: the guest's TSC is guest time.
            if e.index != 0x10 {
                *e.error = 1;
            }
        }
        VcpuExit::IrqWindowOpen => stats.irq_window += 1,
        VcpuExit::Shutdown => m.stop.request(StopRequest::Reset),
        _ => unreachable!("filtered above"),
    }
    Ok(Some(kind))
}

fn end_reason(req: StopRequest) -> EndReason {
    match req {
        StopRequest::Exit(s) => EndReason::Exit(s),
        StopRequest::Reset => EndReason::Reset,
        StopRequest::Halt => EndReason::Halted,
    }
}

/// Runs the guest until it stops, the user interrupts, or replay ends.
pub fn run<I: Inputs>(vm: &mut Vm, inputs: &mut I, opts: &RunOptions) -> Result<Outcome, EngineError> {
    let started = Instant::now();
    let mut stats = ExitStats::default();
    let mut ordinal = 0u64;
    let mut last_kind = ExitKind::Boot;
    inputs.boot(&vm.machine, &mut ExitPoint::new(0, ExitKind::Boot, &mut vm.vcpu))?;
    let mut last_progress = Instant::now();

    let ending = loop {
        if INTERRUPTED.load(Ordering::Relaxed) {
            let mut at = ExitPoint::new(ordinal, last_kind, &mut vm.vcpu);
            inputs.finish(&vm.machine, &mut at, EndReason::Interrupted, &|| digest::mem_digest(&vm.mem))?;
            break Ending::Interrupted;
        }
        if opts.verbose && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!(
                "ftvm: {:.1}s exit #{ordinal} ({} in, {} out, {} hlt, {} irqs) {}",
                started.elapsed().as_secs_f64(),
                stats.io_in, stats.io_out, stats.hlt, stats.interrupts,
                inputs.summary()
            );
        }
        let m = &vm.machine;
        let kind = match vm.vcpu.run() {
            Ok(exit) => handle_exit(exit, m, inputs, ordinal + 1, &mut stats, opts.verbose),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                stats.signals += 1;
                continue;
            }
            Err(err) => return Err(EngineError::Kvm { what: "run", ordinal, err }),
        };
        let kind = match kind {
            Ok(Some(k)) => k,
            Ok(None) => continue,
            Err(EngineError::Guest { ordinal, what, .. }) => {
                let rip = vm.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(EngineError::Guest { ordinal, rip, what });
            }
            Err(e) => return Err(e),
        };
        ordinal += 1;
        let kind = if kind == ExitKind::Hlt {
            let m = &vm.machine;
            let mut regs = vm.vcpu.get_regs().map_err(|err| EngineError::Kvm { what: "get regs", ordinal, err })?;
            let trap = vm.traps.as_ref().and_then(|t| t.lookup(&vm.mem, regs.rip));
            let kind = match trap {
                Some((site, _)) => ExitKind::Trap(site),
                None => ExitKind::Hlt,
            };
            m.clock.begin_exit();
            m.ordinal.store(ordinal, Ordering::Relaxed);
            inputs.before_dispatch(m, ordinal, kind)?;
            if let Some((site, tk)) = trap {
                // Emulate the rdtsc/rdtscp that was patched into this hlt.
                stats.hlt -= 1;
                stats.traps += 1;
                let tsc = m.clock.now_ns() * crate::linux::TSC_HZ / 1_000_000_000;
                regs.rax = tsc & 0xffff_ffff;
                regs.rdx = tsc >> 32;
                if tk == crate::linux::TrapKind::Rdtscp {
                    regs.rcx = 0;
                }
                regs.rip = site + tk.insn_len();
                vm.vcpu.set_regs(&regs).map_err(|err| EngineError::Kvm { what: "set regs", ordinal, err })?;
            }
            kind
        } else {
            kind
        };
        last_kind = kind;
        let mut at = ExitPoint::new(ordinal, kind, &mut vm.vcpu);

        // Time the devices saw during the access also moves the timer.
        if m.clock.has_value() {
            m.pit.lock().unwrap().update();
        }
        if let Flow::Stop(e) = inputs.deliver(m, &mut at, false)? {
            break e;
        }
        if kind == ExitKind::Hlt && at.kvm_run().if_flag == 0 {
            // `cli; hlt`: nothing can ever wake the guest. This is how
            // Linux powers off a machine without ACPI.
            m.stop.request(StopRequest::Halt);
        }
        if kind == ExitKind::Hlt && m.stop.get().is_none() {
            let mut stop = None;
            while !m.pic.lock().unwrap().has_interrupt() && !INTERRUPTED.load(Ordering::Relaxed) {
                if let Flow::Stop(e) = inputs.deliver(m, &mut at, true)? {
                    stop = Some(e);
                    break;
                }
            }
            if let Some(e) = stop {
                break e;
            }
        }
        if let Some(req) = m.stop.get() {
            let mem = &vm.mem;
            inputs.finish(m, &mut at, end_reason(req), &|| digest::mem_digest(mem))?;
            break Ending::Guest(req);
        }

        // Interrupt delivery: only here, at a deterministic exit where the
        // guest can take one. We never ask KVM for interrupt-window exits:
        // on the PVM backend they arrive at host-dependent points, which
        // would make positions unrepeatable; a pending interrupt waits for
        // the guest's next exit with interrupts enabled instead.
        let pending = m.pic.lock().unwrap().has_interrupt();
        if pending {
            let run = at.kvm_run();
            if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
                let vector = m.pic.lock().unwrap().acknowledge();
                crate::kvm_ext::interrupt(at.vcpu, vector)
                    .map_err(|err| EngineError::Kvm { what: "interrupt", ordinal, err })?;
                stats.interrupts += 1;
                inputs.injected(m, &mut at, vector)?;
            }
        }

        if let Flow::Stop(e) = inputs.exit_done(m, &mut at)? {
            break e;
        }
    };
    Ok(Outcome { ending, stats, exits: ordinal, wall: started.elapsed() })
}
