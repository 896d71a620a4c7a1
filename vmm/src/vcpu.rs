//! What the exit loop needs from a vCPU, behind a small trait, so that the
//! engine, recording, replay and failover can be unit-tested against a
//! scripted fake (`fake::FakeVcpu`) without `/dev/kvm`. `KvmVcpu` is the
//! real one.

use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region, Msrs, Xsave, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::vcpu_state::VcpuState;

/// A KVM ioctl failed (an errno).
pub type VcpuError = kvm_ioctls::Error;

/// One return from running the vCPU, with the exit's data borrowed from
/// the vCPU (as `kvm_run` does): `in` data is written back into it.
#[derive(Debug)]
pub enum VmExit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    Hlt,
    /// An MSR read sent to userspace: set `data`, or `error` for #GP.
    RdMsr { index: u32, data: &'a mut u64, error: &'a mut u8 },
    /// An MSR write sent to userspace: set `error` for #GP.
    WrMsr { index: u32, data: u64, error: &'a mut u8 },
    IrqWindowOpen,
    /// Triple fault.
    Shutdown,
    /// A signal interrupted `KVM_RUN` (EINTR/EAGAIN, or `KVM_EXIT_INTR`):
    /// not a deterministic exit, never a position.
    Kicked,
    /// KVM could not run the guest (internal error, failed entry, an exit
    /// ftvm does not handle).
    Failed(String),
    /// A debug exit (`KVM_EXIT_DEBUG`: a single step done or a hardware
    /// breakpoint hit) asked for with [`Vcpu::set_guest_debug`]: not a
    /// guest exit, never a position (see `gdb/`).
    Debug { pc: u64, dr6: u64 },
}

/// What the debugger asks KVM for (`KVM_SET_GUEST_DEBUG`): single-step,
/// and up to four hardware execute breakpoints (debug registers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDebug {
    pub single_step: bool,
    pub hw_breakpoints: [Option<u64>; 4],
}

/// The vCPU as the exit loop sees it.
pub trait Vcpu {
    /// Runs the guest until its next exit.
    fn run(&mut self) -> Result<VmExit<'_>, VcpuError>;
    fn regs(&mut self) -> Result<kvm_regs, VcpuError>;
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError>;
    fn sregs(&mut self) -> Result<kvm_sregs, VcpuError>;
    /// RFLAGS.IF as of the last exit.
    fn interrupts_enabled(&mut self) -> bool;
    /// Whether an interrupt can be injected now (IF set, no interrupt
    /// shadow, nothing already pending).
    fn can_inject(&mut self) -> bool;
    /// Queues `vector` for delivery at the next entry (`KVM_INTERRUPT`).
    fn inject(&mut self, vector: u8) -> Result<(), VcpuError>;
    /// Lets a kick (see `stop::StopHandle`) stop the next entry even if it
    /// lands just before it.
    fn arm_kick(&mut self) {}
    /// After a `Kicked` exit: let the next entry run the guest again.
    fn clear_kick(&mut self) {}
    /// The complete vCPU state (see `vcpu_state`).
    fn capture(&mut self) -> Result<VcpuState, VcpuError>;
    /// Sets the complete vCPU state; call `complete_pending` first if the
    /// vCPU is stopped at an exit that was not completed.
    fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError>;
    /// Completes the exit the vCPU is stopped at (an `in` writes its
    /// result, RIP moves past the instruction) without running guest code.
    fn complete_pending(&mut self) -> Result<(), VcpuError>;
    /// Starts or stops tracking the guest pages written.
    fn set_dirty_tracking(&mut self, on: bool) -> Result<(), VcpuError>;
    /// Guest-physical addresses of the pages written since tracking
    /// started or since the last call, which starts a new interval.
    fn take_dirty(&mut self) -> Result<Vec<u64>, VcpuError>;
    /// Single-stepping and hardware breakpoints for a debugger; all off
    /// with `GuestDebug::default()`. Not every vCPU has them.
    fn set_guest_debug(&mut self, _dbg: &GuestDebug) -> Result<(), VcpuError> {
        Err(VcpuError::new(libc::ENOTSUP))
    }
}

/// A guest memory slot as KVM knows it, for switching dirty tracking.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub region: kvm_userspace_memory_region,
}

/// What the vCPU needs from the VM to capture and restore whole states.
pub struct VmLink {
    pub vm: Arc<VmFd>,
    pub slots: Vec<Slot>,
    /// MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`), minus the
    /// time MSRs.
    pub msr_list: Vec<u32>,
    /// Size of the XSAVE area (`KVM_CAP_XSAVE2`, at least 4096).
    pub xsave_size: usize,
}

/// The real vCPU.
pub struct KvmVcpu {
    pub fd: VcpuFd,
    pub link: VmLink,
    tracking: bool,
}

impl KvmVcpu {
    pub fn new(fd: VcpuFd, link: VmLink) -> Self {
        KvmVcpu { fd, link, tracking: false }
    }

    fn get_msrs(&self, out: &mut Vec<(u32, u64)>) -> Result<(), VcpuError> {
        // KVM_GET_MSRS stops at the first MSR it cannot read: skip that one
        // and go on, so one odd MSR does not lose the rest.
        let list = &self.link.msr_list;
        let mut i = 0;
        while i < list.len() {
            let chunk = &list[i..(i + 256).min(list.len())];
            let entries: Vec<kvm_bindings::kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::new(libc::E2BIG))?;
            let n = self.fd.get_msrs(&mut msrs)?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            i += n;
            if n < chunk.len() {
                log::debug!("KVM could not read MSR {:#x}; skipped", chunk[n]);
                i += 1;
            }
        }
        Ok(())
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<(), VcpuError> {
        let mut i = 0;
        while i < msrs.len() {
            let chunk = &msrs[i..(i + 256).min(msrs.len())];
            let entries: Vec<kvm_bindings::kvm_msr_entry> =
                chunk.iter().map(|&(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() }).collect();
            let m = Msrs::from_entries(&entries).map_err(|_| VcpuError::new(libc::E2BIG))?;
            let n = self.fd.set_msrs(&m)?;
            i += n;
            if n < chunk.len() {
                // KVM_SET_MSRS stops at the first it refuses: skip it.
                log::debug!("KVM refused to set MSR {:#x}; skipped", chunk[n].0);
                i += 1;
            }
        }
        Ok(())
    }

    fn set_slot_flags(&mut self, flags: u32) -> Result<(), VcpuError> {
        for slot in &self.link.slots {
            let mut r = slot.region;
            r.flags = flags;
            // SAFETY: the same region `Vm::new` registered (its host mapping
            // is owned by the VM's guest memory and outlives the VM fd);
            // only the flags change.
            unsafe { self.link.vm.set_user_memory_region(r) }?;
        }
        Ok(())
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>, VcpuError> {
        let exit = match self.fd.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(VmExit::Kicked),
            Err(e) => return Err(e),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => VmExit::IoIn(port, data),
            VcpuExit::IoOut(port, data) => VmExit::IoOut(port, data),
            VcpuExit::MmioRead(addr, data) => VmExit::MmioRead(addr, data),
            VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite(addr, data),
            VcpuExit::Hlt => VmExit::Hlt,
            VcpuExit::X86Rdmsr(e) => VmExit::RdMsr { index: e.index, data: e.data, error: e.error },
            VcpuExit::X86Wrmsr(e) => VmExit::WrMsr { index: e.index, data: e.data, error: e.error },
            VcpuExit::IrqWindowOpen => VmExit::IrqWindowOpen,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::Intr => VmExit::Kicked,
            VcpuExit::InternalError => VmExit::Failed("KVM internal error (the instruction emulator failed)".into()),
            VcpuExit::Debug(d) => VmExit::Debug { pc: d.pc, dr6: d.dr6 },
            VcpuExit::FailEntry(reason, cpu) => {
                VmExit::Failed(format!("VM entry failed: hardware reason {reason:#x} on cpu {cpu}"))
            }
            other => VmExit::Failed(format!("unhandled exit {other:?}")),
        })
    }

    fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
        self.fd.get_regs()
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.fd.set_regs(regs)
    }

    fn sregs(&mut self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs()
    }

    fn interrupts_enabled(&mut self) -> bool {
        self.fd.get_kvm_run().if_flag != 0
    }

    fn can_inject(&mut self) -> bool {
        let run = self.fd.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    fn inject(&mut self, vector: u8) -> Result<(), VcpuError> {
        crate::kvm_ext::interrupt(&self.fd, vector)
    }

    fn capture(&mut self) -> Result<VcpuState, VcpuError> {
        let mut xsave = Xsave::new(self.link.xsave_size.div_ceil(4).saturating_sub(1024)).map_err(|_| VcpuError::new(libc::E2BIG))?;
        // SAFETY: `xsave` was allocated for `xsave_size` bytes, the size
        // KVM_CAP_XSAVE2 reported, which is what KVM_GET_XSAVE2 writes.
        unsafe { self.fd.get_xsave2(&mut xsave) }?;
        let region = xsave.as_fam_struct_ref().xsave.region.as_slice();
        let mut area: Vec<u8> = region.iter().flat_map(|w| w.to_le_bytes()).collect();
        area.extend(xsave.as_slice().iter().flat_map(|w| w.to_le_bytes()));
        area.truncate(self.link.xsave_size);
        let mut msrs = Vec::new();
        self.get_msrs(&mut msrs)?;
        Ok(VcpuState {
            regs: self.fd.get_regs()?,
            sregs: self.fd.get_sregs()?,
            xsave: area,
            xcrs: self.fd.get_xcrs()?,
            msrs,
            events: self.fd.get_vcpu_events()?,
            mp_state: self.fd.get_mp_state()?,
            debugregs: self.fd.get_debug_regs()?,
        })
    }

    fn restore(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        if s.xsave.len() != self.link.xsave_size {
            return Err(VcpuError::new(libc::EINVAL));
        }
        // Control registers and EFER first: what the rest is checked against.
        self.fd.set_sregs(&s.sregs)?;
        self.set_msrs(&s.msrs)?;
        self.fd.set_xcrs(&s.xcrs)?;
        let mut xsave = Xsave::new(self.link.xsave_size.div_ceil(4).saturating_sub(1024)).map_err(|_| VcpuError::new(libc::E2BIG))?;
        {
            let words: Vec<u32> = s.xsave.chunks(4).map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_le_bytes(w)
            }).collect();
            let (head, tail) = words.split_at(words.len().min(1024));
            // SAFETY: writes into the fixed-size region of the FAM struct we own.
            let fam = unsafe { xsave.as_mut_fam_struct() };
            fam.xsave.region[..head.len()].copy_from_slice(head);
            let entries = xsave.as_mut_slice();
            entries[..tail.len()].copy_from_slice(tail);
        }
        // SAFETY: `xsave` has the size KVM_CAP_XSAVE2 reported.
        unsafe { self.fd.set_xsave2(&xsave) }?;
        self.fd.set_regs(&s.regs)?;
        self.fd.set_vcpu_events(&s.events)?;
        self.fd.set_mp_state(s.mp_state)?;
        self.fd.set_debug_regs(&s.debugregs)
    }

    fn complete_pending(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let r = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(e),
            // KVM runs no guest code with immediate_exit set.
            Ok(_) => Ok(()),
        };
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    fn set_dirty_tracking(&mut self, on: bool) -> Result<(), VcpuError> {
        if on != self.tracking {
            self.set_slot_flags(if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })?;
            self.tracking = on;
        }
        Ok(())
    }

    fn take_dirty(&mut self) -> Result<Vec<u64>, VcpuError> {
        let mut out = Vec::new();
        for slot in &self.link.slots {
            let r = slot.region;
            let bitmap = self.link.vm.get_dirty_log(r.slot, r.memory_size as usize)?;
            for (i, word) in bitmap.iter().enumerate() {
                let mut w = *word;
                while w != 0 {
                    let bit = w.trailing_zeros() as u64;
                    out.push(r.guest_phys_addr + (i as u64 * 64 + bit) * 4096);
                    w &= w - 1;
                }
            }
        }
        Ok(out)
    }

    fn set_guest_debug(&mut self, dbg: &GuestDebug) -> Result<(), VcpuError> {
        use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP};
        let mut d = kvm_guest_debug::default();
        let mut dr7 = 0u64;
        for (i, bp) in dbg.hw_breakpoints.iter().enumerate() {
            if let Some(addr) = bp {
                d.arch.debugreg[i] = *addr;
                // Global enable (G0..G3), RW=00 (execute), LEN=00.
                dr7 |= 2 << (i * 2);
            }
        }
        if dr7 != 0 {
            // GE, as the measurement in kvm-notes used (0x602 for DR0).
            dr7 |= 0x600;
            d.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        }
        d.arch.debugreg[7] = dr7;
        if dbg.single_step {
            d.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        self.fd.set_guest_debug(&d)
    }

    fn arm_kick(&mut self) {
        let p: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: `kvm_run` is the vCPU's mmap, valid while the vCPU fd is
        // open; `Drop` unregisters it before the fd closes.
        unsafe { crate::stop::register_immediate_exit(p) };
    }

    fn clear_kick(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // SAFETY: null unregisters; nothing is dereferenced.
        unsafe { crate::stop::register_immediate_exit(std::ptr::null_mut()) };
    }
}

#[cfg(test)]
pub mod fake {
    //! A scripted vCPU: a program of port accesses and halts that loops
    //! forever, with a register file the engine can read, so the exit loop
    //! runs without KVM. The same program gives the same exits in every
    //! run, as a deterministic guest does.

    use super::*;

    /// One step of the fake guest's program.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Step {
        Out(u16, Vec<u8>),
        In(u16, usize),
        /// A store to / load from an MMIO address (a device's BAR).
        MmioWrite(u64, Vec<u8>),
        MmioRead(u64, usize),
        Hlt,
        /// Enable (true) or disable interrupts; no exit.
        If(bool),
        /// `cli; hlt`.
        HaltForever,
        /// Computes without exiting until kicked: `run` returns `Kicked`
        /// (as the kicker's signal does), with registers moved on.
        Spin,
    }

    pub struct FakeVcpu {
        program: Vec<Step>,
        /// Index of the next step.
        pc: usize,
        regs: kvm_regs,
        buf: [u8; 8],
        /// Steps of the interrupt handler still to run (it preempts the
        /// program; RIP 0x8000 + 4 * step).
        handler_queue: std::collections::VecDeque<(usize, Step)>,
        /// What the guest runs when an interrupt is injected.
        pub handler: Vec<Step>,
        /// Vectors injected, with the step index they were injected after.
        pub injected: Vec<(usize, u8)>,
        /// Bytes read by `In` steps.
        pub read: Vec<u8>,
        /// A safety net: after this many exits `run` reports a failure.
        pub max_exits: u64,
        /// Time each exit takes (busy-waited), like the cost of a real one.
        pub exit_cost: std::time::Duration,
        /// Where the program continues after its last step.
        pub loop_from: usize,
        /// After this many injected interrupts the guest writes this status
        /// to the debug exit port.
        pub exit_after: Option<(usize, u8)>,
        exits: u64,
        last_in: Option<usize>,
        /// Pages the fake "wrote" (reported by `take_dirty`).
        pub dirty: Vec<u64>,
    }

    impl FakeVcpu {
        pub fn new(program: Vec<Step>) -> Self {
            FakeVcpu {
                program,
                pc: 0,
                regs: kvm_regs { rflags: 0x2, ..Default::default() },
                buf: [0; 8],
                handler_queue: Default::default(),
                handler: vec![Step::Out(0x20, vec![0x20])],
                injected: Vec::new(),
                read: Vec::new(),
                max_exits: 1_000_000,
                exit_cost: std::time::Duration::ZERO,
                loop_from: 0,
                exit_after: None,
                exits: 0,
                last_in: None,
                dirty: Vec::new(),
            }
        }

        /// Step `i` of the program.
        pub fn step(&self, i: usize) -> Step {
            self.program[i].clone()
        }

        fn if_set(&self) -> bool {
            self.regs.rflags & 0x200 != 0
        }
    }

    impl Vcpu for FakeVcpu {
        fn run(&mut self) -> Result<VmExit<'_>, VcpuError> {
            // Data read by the previous `In` step counts as guest state.
            if let Some(n) = self.last_in.take() {
                self.read.extend_from_slice(&self.buf[..n]);
                self.regs.rax = self.regs.rax.rotate_left(8) ^ u64::from_le_bytes(self.buf);
            }
            let t0 = std::time::Instant::now();
            while t0.elapsed() < self.exit_cost {
                std::hint::spin_loop();
            }
            self.exits += 1;
            if self.exits > self.max_exits {
                return Ok(VmExit::Failed("fake guest ran past max_exits".into()));
            }
            loop {
                // RIP names the step, so replay can check it.
                let step = if let Some((i, step)) = self.handler_queue.pop_front() {
                    self.regs.rip = 0x8000 + 4 * i as u64;
                    step
                } else if let Some((n, status)) = self.exit_after.filter(|(n, _)| self.injected.len() >= *n) {
                    let _ = n;
                    self.regs.rip = 0xf000;
                    Step::Out(crate::layout::DEBUG_EXIT_PORT, vec![status])
                } else {
                    if self.pc >= self.program.len() {
                        self.pc = self.loop_from;
                    }
                    let i = self.pc;
                    self.pc += 1;
                    self.regs.rip = 0x1000 + 4 * i as u64;
                    self.program[i].clone()
                };
                self.regs.rcx = self.regs.rcx.wrapping_add(1);
                match step {
                    Step::If(on) => {
                        if on {
                            self.regs.rflags |= 0x200;
                        } else {
                            self.regs.rflags &= !0x200;
                        }
                    }
                    Step::Out(port, data) => {
                        let n = data.len().min(8);
                        self.buf[..n].copy_from_slice(&data[..n]);
                        return Ok(VmExit::IoOut(port, &self.buf[..n]));
                    }
                    Step::In(port, n) => {
                        self.buf = [0; 8];
                        self.last_in = Some(n.min(8));
                        return Ok(VmExit::IoIn(port, &mut self.buf[..n.min(8)]));
                    }
                    Step::MmioWrite(addr, data) => {
                        let n = data.len().min(8);
                        self.buf[..n].copy_from_slice(&data[..n]);
                        return Ok(VmExit::MmioWrite(addr, &self.buf[..n]));
                    }
                    Step::MmioRead(addr, n) => {
                        self.buf = [0; 8];
                        self.last_in = Some(n.min(8));
                        return Ok(VmExit::MmioRead(addr, &mut self.buf[..n.min(8)]));
                    }
                    Step::Hlt => return Ok(VmExit::Hlt),
                    Step::Spin => {
                        self.regs.rdx = self.regs.rdx.wrapping_mul(6364136223846793005).wrapping_add(1);
                        self.dirty.push(0x4000 + (self.regs.rdx & 0xf) * 4096);
                        return Ok(VmExit::Kicked);
                    }
                    Step::HaltForever => {
                        self.regs.rflags &= !0x200;
                        return Ok(VmExit::Hlt);
                    }
                }
            }
        }

        fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
            Ok(self.regs)
        }

        fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
            self.regs = *regs;
            Ok(())
        }

        fn sregs(&mut self) -> Result<kvm_sregs, VcpuError> {
            Ok(kvm_sregs::default())
        }

        fn interrupts_enabled(&mut self) -> bool {
            self.if_set()
        }

        fn can_inject(&mut self) -> bool {
            self.if_set()
        }

        fn capture(&mut self) -> Result<VcpuState, VcpuError> {
            Ok(VcpuState { regs: self.regs, xsave: vec![0; 4096], ..Default::default() })
        }

        fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
            self.regs = state.regs;
            // RIP names a step of the program: continue after it.
            if (0x1000..0x8000).contains(&state.regs.rip) {
                self.pc = ((state.regs.rip - 0x1000) / 4 + 1) as usize;
            }
            Ok(())
        }

        fn complete_pending(&mut self) -> Result<(), VcpuError> {
            if let Some(n) = self.last_in.take() {
                self.read.extend_from_slice(&self.buf[..n]);
                self.regs.rax = self.regs.rax.rotate_left(8) ^ u64::from_le_bytes(self.buf);
            }
            Ok(())
        }

        fn set_dirty_tracking(&mut self, _on: bool) -> Result<(), VcpuError> {
            Ok(())
        }

        fn take_dirty(&mut self) -> Result<Vec<u64>, VcpuError> {
            Ok(std::mem::take(&mut self.dirty))
        }

        fn inject(&mut self, vector: u8) -> Result<(), VcpuError> {
            self.injected.push((self.pc, vector));
            // The handler runs: it changes registers as a real one would,
            // and acknowledges the interrupt at the PIC.
            self.regs.rbx = self.regs.rbx.wrapping_mul(31).wrapping_add(u64::from(vector));
            self.handler_queue.extend(self.handler.iter().cloned().enumerate());
            Ok(())
        }
    }
}
