//! Running an interval between exits for the session: completing the
//! exit, counting its first arrival, delivering an injected interrupt,
//! single steps, step-overs and free runs with the debug registers; and
//! what each debug exit means.

use super::*;

impl Session {
    /// A debug exit: a step done or a breakpoint hit.
    pub fn debug_exit(&mut self, pc: u64, dr6: u64) -> bool {
        let armed = self.armed.unwrap_or_default();
        if self.probe == Probe::Running(pc) && dr6 & 0x4000 == 0 {
            self.probe = Probe::Done;
            log::debug!("ftvm: gdb: hardware breakpoints work on this KVM (stopped at {pc:#x})");
            return true;
        }
        if self.delivering == Some(pc) && dr6 & 0x4000 == 0 {
            // Not an arrival: the one at step 0 was counted already.
            self.delivering = None;
            self.event = Some(Event::Delivered(pc));
            return true;
        }
        let step = dr6 & 0x4000 != 0 || (armed.single_step && dr6 & 0xf == 0);
        if step {
            if !armed.single_step {
                log::debug!("ftvm: gdb: a step exit with single-step off (pc {pc:#x}); ignored");
                return true;
            }
            self.steps += 1;
            self.tr.step(pc);
            if let Mode::Count { steps, .. } = &mut self.mode {
                *steps += 1;
            }
            self.event = Some(Event::Step(pc));
        } else {
            if armed.hw_breakpoints.iter().all(|b| *b != Some(pc)) {
                log::debug!("ftvm: gdb: a breakpoint exit at {pc:#x} (dr6 {dr6:#x}) not armed; ignored");
                return true;
            }
            self.tr.arrive(pc);
            self.event = Some(Event::Hit(pc));
        }
        self.here = Some(pc);
        true
    }

    /// Completes the exit the vCPU is stopped at (an `in` gets its value,
    /// RIP moves on), with nothing armed: the state gdb sees, and the one
    /// every step of this interval starts from, whatever mode got here.
    pub(super) fn complete(&mut self, at: &mut ExitPoint) -> Result<(), EngineError> {
        if self.completed {
            return Ok(());
        }
        if self.exit_text.is_empty() {
            self.exit_text = exit_text(at)?;
        }
        self.arm(at, GuestDebug::default())?;
        at.vcpu().complete_pending().map_err(kvm("complete the pending exit", at.ordinal))?;
        self.completed = true;
        Ok(())
    }

    /// Arms KVM for `want`. Where the debug registers do not work, its
    /// breakpoints are patched into guest memory instead, for this run
    /// only: `left_guest` takes them out at the next exit of any kind.
    pub(super) fn arm(&mut self, at: &mut ExitPoint, want: GuestDebug) -> Result<(), EngineError> {
        let patch = !self.t.hw_breakpoints;
        if self.armed != Some(want) {
            let kvm_want = if patch { GuestDebug { single_step: want.single_step, hw_breakpoints: [None; 4] } } else { want };
            at.vcpu().set_guest_debug(&kvm_want).map_err(kvm("set guest debug (single-step, debug registers)", at.ordinal))?;
            self.armed = Some(want);
        }
        if patch {
            self.left_guest(None);
            if want.hw_breakpoints.iter().any(Option::is_some) {
                self.patch(at, &want.hw_breakpoints)?;
            }
        }
        Ok(())
    }

    /// Counts the first arrival of the interval: the instruction the
    /// guest is about to run at the end of the exit (RIP, or the handler
    /// of the interrupt injected there).
    pub(super) fn start_interval(&mut self, at: &mut ExitPoint) -> Result<(), EngineError> {
        if self.started {
            return Ok(());
        }
        self.started = true;
        self.complete(at)?;
        let ordinal = at.ordinal;
        let next0 = match self.injected {
            Some(v) => {
                let s = at.vcpu().sregs().map_err(kvm("get sregs", ordinal))?;
                let p = crate::gdb::paging::Paging { cr0: s.cr0, cr3: s.cr3, cr4: s.cr4 };
                let mut gate = [0u8; 16];
                if p.read(at.mem(), s.idt.base + u64::from(v) * 16, &mut gate) != 16 {
                    log::debug!("ftvm: gdb: cannot read IDT gate {v:#x}");
                }
                u64::from(u16::from_le_bytes([gate[0], gate[1]]))
                    | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
                    | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32
            }
            None => at.vcpu().regs().map_err(kvm("get regs", ordinal))?.rip,
        };
        self.tr.arrive(next0);
        self.here = Some(next0);
        self.next0 = Some(next0);
        Ok(())
    }

    /// Runs the guest just far enough to take the interrupt injected at
    /// the exit: a breakpoint on its handler, no single step. A step would
    /// deliver it too, but KVM then leaves the trap flag it set in the
    /// RFLAGS the CPU pushes, and the guest takes a #DB at its `iretq`
    /// (measured here: the test guest died of it).
    pub(super) fn deliver(&mut self, at: &mut ExitPoint) -> Result<bool, EngineError> {
        let pc = self.next0.unwrap_or(0);
        self.arm(at, GuestDebug { single_step: false, hw_breakpoints: [Some(pc), None, None, None] })?;
        // No instruction runs before the handler's first: the position
        // (and every count) stays as it is.
        self.delivering = Some(pc);
        Ok(true)
    }

    /// Whether the vCPU runs at CPL3, where this KVM does not single-step.
    pub(super) fn at_cpl3(&mut self, at: &mut ExitPoint) -> Result<bool, EngineError> {
        let s = at.vcpu().sregs().map_err(kvm("get sregs", at.ordinal))?;
        Ok(s.cs.dpl == 3)
    }

    /// Arms KVM for the mode; false if a stop turned up instead.
    pub(super) fn arm_for_mode(&mut self, at: &mut ExitPoint) -> Result<bool, EngineError> {
        let run = match self.mode.clone() {
            Mode::Stopped => return Ok(false),
            Mode::Free => {
                self.arm(at, GuestDebug::default())?;
                true
            }
            Mode::Run => {
                let bps = self.t.breakpoints.clone();
                self.run_with(at, &bps, true)?
            }
            Mode::Step | Mode::Count { .. } => self.step_once(at)?,
            Mode::Seek(s) if s.goal.ordinal == self.tr.ordinal() => match s.goal.anchor {
                // A breakpoint hit (an arrival, no steps after it), where
                // breakpoints are patched: run to it with the breakpoint
                // armed rather than step the interval. The lab's KVM
                // single-steps, but a step is lost at an `iretq` (the
                // guest then runs on past the goal).
                Some(a) if s.goal.steps == 0 && !self.t.hw_breakpoints => self.seek_arrival(at, &s, a.pc)?,
                _ => self.step_once(at)?,
            },
            Mode::Seek(s) => {
                let bps = if s.scan.is_some() { self.t.breakpoints.clone() } else { Vec::new() };
                self.run_with(at, &bps, false)?
            }
        };
        if run {
            // An interrupt injected at this exit is delivered now.
            self.injected = None;
        }
        Ok(run)
    }

    /// Runs to the goal of a seek that is a breakpoint hit in this
    /// interval, with the breakpoint (and, in a scan, gdb's) armed.
    fn seek_arrival(&mut self, at: &mut ExitPoint, s: &Seek, pc: u64) -> Result<bool, EngineError> {
        if !self.started && self.injected.is_none() {
            // The interval's first instruction: an arrival, maybe the goal,
            // maybe a hit for the scan.
            self.start_interval(at)?;
            let here = self.here.unwrap_or(0);
            if !self.tr.at(&s.goal) && self.t.breakpoints.contains(&here) {
                if let Mode::Seek(Seek { scan: Some((_, hits)), .. }) = &mut self.mode {
                    let p = Pos { ordinal: self.tr.ordinal(), anchor: Some(crate::gdb::position::Anchor { pc: here, nth: 1 }), steps: 0 };
                    hits.push((p, here));
                }
            }
        }
        if self.started && self.injected.is_none() && self.tr.at(&s.goal) {
            self.reached(s.clone());
            return Ok(false);
        }
        let mut bps = if s.scan.is_some() { self.t.breakpoints.clone() } else { Vec::new() };
        if !bps.contains(&pc) {
            bps.push(pc);
        }
        self.run_with(at, &bps, false)
    }

    pub(super) fn step_once(&mut self, at: &mut ExitPoint) -> Result<bool, EngineError> {
        self.start_interval(at)?;
        if self.injected.is_some() {
            return self.deliver(at);
        }
        if let Mode::Seek(s) = &self.mode {
            // The arrival at step 0 may be the goal itself.
            if self.tr.at(&s.goal) {
                let s = s.clone();
                self.reached(s);
                return Ok(false);
            }
        }
        if self.at_cpl3(at)? {
            self.refuse("ftvm: the guest runs at CPL3 here: this KVM cannot single-step it (the #DB would go to the guest)\n");
            return Ok(false);
        }
        self.arm(at, GuestDebug { single_step: true, ..Default::default() })?;
        Ok(true)
    }

    /// Runs freely with hardware breakpoints on `armed`; `stop_at`: a
    /// user breakpoint at the first instruction of the interval stops.
    pub(super) fn run_with(&mut self, at: &mut ExitPoint, armed: &[u64], stop_at: bool) -> Result<bool, EngineError> {
        if armed.is_empty() {
            self.arm(at, GuestDebug::default())?;
            self.tr.run_free(&[]);
            self.here = None;
            return Ok(true);
        }
        if !self.started {
            self.start_interval(at)?;
            let pc = self.here.unwrap_or(0);
            if self.t.breakpoints.contains(&pc) {
                if stop_at && self.injected.is_some() {
                    // Stop once the interrupt is delivered (Delivered).
                    return self.deliver(at);
                }
                if stop_at {
                    self.mode = Mode::Stopped;
                    self.pending = Some(Stop::Break(pc));
                    return Ok(false);
                }
                if let Mode::Seek(s) = &mut self.mode {
                    if let Some((_, hits)) = &mut s.scan {
                        // Named by its arrival, not as the exit's end: with
                        // an interrupt injected there, the stop comes after
                        // its delivery, at the handler.
                        let p = Pos { ordinal: self.tr.ordinal(), anchor: Some(crate::gdb::position::Anchor { pc, nth: 1 }), steps: 0 };
                        hits.push((p, pc));
                    }
                }
            }
        }
        if self.injected.is_some() && self.here.is_some_and(|h| armed.contains(&h)) {
            return self.deliver(at);
        }
        if self.here.is_some_and(|h| armed.contains(&h)) {
            // Step over the breakpoint the guest is at (counted already).
            if self.at_cpl3(at)? {
                self.refuse("ftvm: the guest runs at CPL3 here: this KVM cannot step over the breakpoint\n");
                return Ok(false);
            }
            self.arm(at, GuestDebug { single_step: true, ..Default::default() })?;
            return Ok(true);
        }
        let mut hw = [None; 4];
        for (slot, a) in hw.iter_mut().zip(armed) {
            *slot = Some(*a);
        }
        self.arm(at, GuestDebug { single_step: false, hw_breakpoints: hw })?;
        self.tr.run_free(&armed[..armed.len().min(4)]);
        self.here = None;
        Ok(true)
    }
}
