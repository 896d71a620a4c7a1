//! What the exit loop needs from a vCPU, behind a small trait, so that the
//! engine, recording, replay and failover can be unit-tested against a
//! scripted fake (`fake::FakeVcpu`) without `/dev/kvm`. `KvmVcpu` is the
//! real one.

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

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
}

/// The real vCPU.
pub struct KvmVcpu(pub VcpuFd);

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>, VcpuError> {
        let exit = match self.0.run() {
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
            VcpuExit::FailEntry(reason, cpu) => {
                VmExit::Failed(format!("VM entry failed: hardware reason {reason:#x} on cpu {cpu}"))
            }
            other => VmExit::Failed(format!("unhandled exit {other:?}")),
        })
    }

    fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
        self.0.get_regs()
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.0.set_regs(regs)
    }

    fn sregs(&mut self) -> Result<kvm_sregs, VcpuError> {
        self.0.get_sregs()
    }

    fn interrupts_enabled(&mut self) -> bool {
        self.0.get_kvm_run().if_flag != 0
    }

    fn can_inject(&mut self) -> bool {
        let run = self.0.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    fn inject(&mut self, vector: u8) -> Result<(), VcpuError> {
        crate::kvm_ext::interrupt(&self.0, vector)
    }

    fn arm_kick(&mut self) {
        let p: *mut u8 = &mut self.0.get_kvm_run().immediate_exit;
        // SAFETY: `kvm_run` is the vCPU's mmap, valid while the vCPU fd is
        // open; `Drop` unregisters it before the fd closes.
        unsafe { crate::stop::register_immediate_exit(p) };
    }

    fn clear_kick(&mut self) {
        self.0.set_kvm_immediate_exit(0);
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
        Hlt,
        /// Enable (true) or disable interrupts; no exit.
        If(bool),
        /// `cli; hlt`.
        HaltForever,
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
                    Step::Hlt => return Ok(VmExit::Hlt),
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
