//! What gdb sees at a stop: the vCPU's state as captured there, guest
//! memory through the guest's page tables, the breakpoints it set, and
//! what it asks for next (continue, step, reverse, `monitor goto`). The
//! `gdbstub` traits are implemented on [`DbgTarget`], which owns all of
//! it, so the stub can live across stops while the vCPU belongs to the
//! exit loop; the session (`session.rs`) fills it at each stop and carries
//! out the request when gdb resumes.

use gdbstub::common::Signal;
use gdbstub::target::ext::base::reverse_exec::{ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep, SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, SwBreakpoint, SwBreakpointOps};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use vm_memory::GuestMemoryMmap;

use super::monitor::{self, Command};
use super::paging::Paging;
use super::position::Pos;
use crate::vcpu_state::VcpuState;

/// Hardware execute breakpoints: the debug registers DR0-DR3.
pub const MAX_BREAKPOINTS: usize = 4;

/// What gdb asked for when it resumed (or with `monitor goto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Continue,
    Step,
    ReverseContinue,
    ReverseStep,
    Goto(Pos),
}

/// Where the replay stands, for `monitor when` and `monitor checkpoints`
/// (the session fills it at each stop).
#[derive(Debug, Clone, Default)]
pub struct StopInfo {
    pub pos: Option<Pos>,
    /// The exit as the log has it: kind and RIP.
    pub exit: String,
    pub guest_ns: u64,
    /// The last exit the log has.
    pub log_last: u64,
    pub checkpoints: String,
    /// Why the replay cannot go on from here, if it cannot.
    pub ended: Option<String>,
}

pub struct DbgTarget {
    pub mem: GuestMemoryMmap,
    /// The vCPU as captured at this stop (its pending exit completed).
    pub cpu: Option<VcpuState>,
    /// gdb changed `cpu`: it goes back into the vCPU before it runs.
    pub cpu_written: bool,
    /// gdb changed registers or memory: the run is no longer the recording.
    pub diverged: bool,
    /// Set by the first write that diverged, for the session to announce.
    pub diverged_now: bool,
    /// Breakpoints gdb set (software and hardware alike become debug
    /// registers: `int3` does not exit on our KVMs).
    pub breakpoints: Vec<u64>,
    /// Software ones among them (for the stop reason gdb expects).
    pub sw: Vec<u64>,
    /// Whether this KVM stops at hardware breakpoints (measured at boot).
    pub hw_breakpoints: bool,
    pub request: Option<Request>,
    pub info: StopInfo,
    /// Messages for gdb's console at the next stop.
    pub notes: Vec<String>,
    /// Breakpoints already warned about (user-accessible pages).
    warned: Vec<u64>,
    /// Holds gdb's output back until a `monitor goto` is done (see
    /// `conn.rs`).
    pub hold: std::rc::Rc<std::cell::Cell<bool>>,
}

impl DbgTarget {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        DbgTarget {
            mem,
            cpu: None,
            cpu_written: false,
            diverged: false,
            diverged_now: false,
            breakpoints: Vec::new(),
            sw: Vec::new(),
            hw_breakpoints: true,
            request: None,
            info: StopInfo::default(),
            notes: Vec::new(),
            warned: Vec::new(),
            hold: Default::default(),
        }
    }

    fn paging(&self) -> Paging {
        self.cpu.as_ref().map_or(Paging::default(), |c| Paging { cr0: c.sregs.cr0, cr3: c.sregs.cr3, cr4: c.sregs.cr4 })
    }

    fn diverge(&mut self) {
        if !self.diverged {
            self.diverged = true;
            self.diverged_now = true;
        }
    }

    /// Adds a breakpoint: false (gdb then says it cannot insert it) when
    /// the address is not mapped or all debug registers are taken.
    fn add_breakpoint(&mut self, addr: u64, sw: bool) -> bool {
        if self.breakpoints.contains(&addr) {
            if sw && !self.sw.contains(&addr) {
                self.sw.push(addr);
            }
            return true;
        }
        let Some(m) = self.paging().translate(&self.mem, addr) else {
            log::warn!("ftvm: gdb: breakpoint at {addr:#x} refused: the address is not mapped in the guest's page tables");
            return false;
        };
        if !self.hw_breakpoints {
            // This KVM ignores the debug registers: a breakpoint is a `hlt`
            // patched over the instruction's first byte while the guest
            // runs (`session/patch.rs`). `hlt` exits only at CPL0.
            if m.user {
                let w = format!(
                    "ftvm: breakpoint at {addr:#x} refused: this KVM does not stop at hardware breakpoints (measured at start) and int3 does not exit; ftvm patches a hlt there instead, which works for kernel (CPL0) code only, and this page is user-accessible\n"
                );
                log::warn!("{}", w.trim_end());
                self.notes.push(w);
                return false;
            }
            let mut b = [0u8; 1];
            if vm_memory::Bytes::read_slice(&self.mem, &mut b, vm_memory::GuestAddress(m.gpa)).is_err() || b[0] == super::session::HLT {
                log::warn!("ftvm: gdb: breakpoint at {addr:#x} refused: the instruction there is a hlt (or one of ftvm's rdtsc traps), which cannot be patched into a breakpoint");
                return false;
            }
        }
        if self.breakpoints.len() >= MAX_BREAKPOINTS {
            log::warn!(
                "ftvm: gdb: breakpoint at {addr:#x} refused: all {MAX_BREAKPOINTS} debug registers are in use (int3 does not exit on this KVM)"
            );
            return false;
        }
        if m.user && !self.warned.contains(&addr) {
            // The page is user-accessible: code there may run at CPL3,
            // where this KVM does not stop at debug registers. (gdb inserts
            // its breakpoints again at every resume: the check follows the
            // guest's page tables as they change.)
            self.warned.push(addr);
            let w = format!("ftvm: breakpoint at {addr:#x} is in a user-accessible page: it stops the guest only while it runs at CPL0, not CPL3\n");
            log::warn!("{}", w.trim_end());
            self.notes.push(w);
        }
        self.breakpoints.push(addr);
        if sw {
            self.sw.push(addr);
        }
        true
    }

    fn remove_breakpoint(&mut self, addr: u64) -> bool {
        let had = self.breakpoints.contains(&addr);
        self.breakpoints.retain(|&a| a != addr);
        self.sw.retain(|&a| a != addr);
        had
    }

    fn sregs_text(&self) -> String {
        let Some(c) = &self.cpu else { return "no vCPU state here".into() };
        let s = &c.sregs;
        let seg = |n: &str, g: &kvm_bindings::kvm_segment| {
            format!("{n:<3}{:#06x} base {:#018x} limit {:#010x} dpl {} l {}\n", g.selector, g.base, g.limit, g.dpl, g.l)
        };
        let mut out = format!(
            "cr0 {:#018x}  cr2 {:#018x}  cr3 {:#018x}\ncr4 {:#018x}  cr8 {:#x}  efer {:#x}\n",
            s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer
        );
        for (n, g) in [("cs", &s.cs), ("ss", &s.ss), ("ds", &s.ds), ("es", &s.es), ("fs", &s.fs), ("gs", &s.gs), ("tr", &s.tr)] {
            out.push_str(&seg(n, g));
        }
        out.push_str(&format!("gdt base {:#x} limit {:#x}; idt base {:#x} limit {:#x}\n", s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit));
        out
    }
}

/// Offsets in the FXSAVE image that starts the XSAVE area.
const FX_MXCSR: usize = 24;
const FX_ST: usize = 32;
const FX_XMM: usize = 160;

impl Target for DbgTarget {
    type Arch = X86_64_SSE;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    /// gdb must never fall back to writing `int3` into guest memory: it
    /// does not exit here, and the write would be a diversion.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl SingleThreadBase for DbgTarget {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs) -> TargetResult<(), Self> {
        let Some(c) = &self.cpu else { return Err(TargetError::NonFatal) };
        let r = &c.regs;
        regs.regs = [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15];
        regs.rip = r.rip;
        regs.eflags = r.rflags as u32;
        let s = &c.sregs;
        regs.segments.cs = u32::from(s.cs.selector);
        regs.segments.ss = u32::from(s.ss.selector);
        regs.segments.ds = u32::from(s.ds.selector);
        regs.segments.es = u32::from(s.es.selector);
        regs.segments.fs = u32::from(s.fs.selector);
        regs.segments.gs = u32::from(s.gs.selector);
        let x = &c.xsave;
        if x.len() >= 512 {
            let u16at = |o: usize| u32::from(u16::from_le_bytes([x[o], x[o + 1]]));
            let u32at = |o: usize| u32::from_le_bytes([x[o], x[o + 1], x[o + 2], x[o + 3]]);
            regs.fpu.fctrl = u16at(0);
            regs.fpu.fstat = u16at(2);
            // FXSAVE keeps an abridged tag (1 = valid); gdb wants the full
            // one (00 valid, 11 empty).
            let abridged = x[4];
            regs.fpu.ftag = (0..8).map(|i| if abridged & (1 << i) != 0 { 0 } else { 3 << (2 * i) }).sum();
            regs.fpu.fop = u16at(6);
            regs.fpu.fioff = u32at(8);
            regs.fpu.fiseg = u32at(12);
            regs.fpu.fooff = u32at(16);
            regs.fpu.foseg = u32at(20);
            regs.mxcsr = u32at(FX_MXCSR);
            for i in 0..8 {
                regs.st[i].copy_from_slice(&x[FX_ST + 16 * i..FX_ST + 16 * i + 10]);
            }
            for i in 0..16 {
                let mut b = [0u8; 16];
                b.copy_from_slice(&x[FX_XMM + 16 * i..FX_XMM + 16 * i + 16]);
                regs.xmm[i] = u128::from_le_bytes(b);
            }
        }
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs) -> TargetResult<(), Self> {
        let mut now = X86_64CoreRegs::default();
        self.read_registers(&mut now)?;
        if now == *regs {
            // gdb writes back what it read (e.g. around calls): no change.
            return Ok(());
        }
        if now.segments != regs.segments {
            log::warn!("ftvm: gdb: segment selectors cannot be changed from gdb (their descriptors would not follow); kept");
        }
        let Some(c) = &mut self.cpu else { return Err(TargetError::NonFatal) };
        let g = &regs.regs;
        let r = &mut c.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) = (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) = (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = regs.rip;
        r.rflags = (r.rflags & !0xffff_ffff) | u64::from(regs.eflags);
        let x = &mut c.xsave;
        if x.len() >= 512 {
            x[FX_MXCSR..FX_MXCSR + 4].copy_from_slice(&regs.mxcsr.to_le_bytes());
            for i in 0..8 {
                x[FX_ST + 16 * i..FX_ST + 16 * i + 10].copy_from_slice(&regs.st[i]);
            }
            for i in 0..16 {
                x[FX_XMM + 16 * i..FX_XMM + 16 * i + 16].copy_from_slice(&regs.xmm[i].to_le_bytes());
            }
        }
        self.cpu_written = true;
        self.diverge();
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let n = self.paging().read(&self.mem, start, data);
        if n == 0 && !data.is_empty() {
            // gdb: "Cannot access memory at address ..."
            return Err(TargetError::Errno(14));
        }
        Ok(n)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8]) -> TargetResult<(), Self> {
        let p = self.paging();
        let mut now = vec![0u8; data.len()];
        if p.read(&self.mem, start, &mut now) == data.len() && now == data {
            return Ok(());
        }
        if !p.write(&self.mem, start, data) {
            return Err(TargetError::Errno(14));
        }
        self.diverge();
        Ok(())
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for DbgTarget {
    fn resume(&mut self, signal: Option<Signal>) -> Result<(), Self::Error> {
        if signal.is_some() {
            log::warn!("ftvm: gdb: signals cannot be delivered to a replayed guest; ignored");
        }
        self.request = Some(Request::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_reverse_cont(&mut self) -> Option<ReverseContOps<'_, (), Self>> {
        Some(self)
    }

    fn support_reverse_step(&mut self) -> Option<ReverseStepOps<'_, (), Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for DbgTarget {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.request = Some(Request::Step);
        Ok(())
    }
}

impl ReverseCont<()> for DbgTarget {
    fn reverse_cont(&mut self) -> Result<(), Self::Error> {
        self.request = Some(Request::ReverseContinue);
        Ok(())
    }
}

impl ReverseStep<()> for DbgTarget {
    fn reverse_step(&mut self, _tid: ()) -> Result<(), Self::Error> {
        self.request = Some(Request::ReverseStep);
        Ok(())
    }
}

impl Breakpoints for DbgTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for DbgTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_breakpoint(addr, true))
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_breakpoint(addr))
    }
}

impl HwBreakpoint for DbgTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_breakpoint(addr, false))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_breakpoint(addr))
    }
}

impl MonitorCmd for DbgTarget {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), Self::Error> {
        let cmd = String::from_utf8_lossy(cmd);
        match monitor::parse(&cmd) {
            Err(e) => outputln!(out, "{e}"),
            Ok(Command::Help) => out.write_raw(monitor::HELP.as_bytes()),
            Ok(Command::When) => {
                let i = &self.info;
                match i.pos {
                    Some(p) => outputln!(out, "at {p}"),
                    None => outputln!(out, "at exit #? (position unknown)"),
                }
                outputln!(out, "exit: {}", i.exit);
                outputln!(out, "guest time: {}.{:09} s", i.guest_ns / 1_000_000_000, i.guest_ns % 1_000_000_000);
                outputln!(out, "log: last exit #{}", i.log_last);
                if self.diverged {
                    outputln!(out, "diverged: registers or memory were changed from gdb; this is no longer the recorded run (monitor goto N returns to it)");
                }
                if let Some(e) = &i.ended {
                    outputln!(out, "the replay ended here: {e}");
                }
            }
            Ok(Command::Sregs) => out.write_raw(self.sregs_text().as_bytes()),
            Ok(Command::Checkpoints) => outputln!(out, "{}", self.info.checkpoints),
            Ok(Command::Goto { ordinal, steps }) => {
                if ordinal > self.info.log_last {
                    outputln!(out, "cannot go to exit #{ordinal}: the log ends at exit #{}", self.info.log_last);
                } else {
                    let p = Pos { ordinal, anchor: None, steps };
                    outputln!(out, "going to {p} (then `flushregs` so that gdb reads the registers again)");
                    self.request = Some(Request::Goto(p));
                    // gdb gets the end of this command once it is there.
                    self.hold.set(true);
                }
            }
        }
        Ok(())
    }
}
