//! gdb's side of a stop: reporting it (with `O` notes), serving packets
//! until gdb resumes, Ctrl-C while the guest runs, gdb going away.

use super::*;
use gdbstub::conn::Connection;

fn note_packet(text: &str) -> Vec<u8> {
    // An `O` packet: console output gdb prints as it arrives.
    let mut hex = String::from("O");
    for b in text.bytes() {
        hex.push_str(&format!("{b:02x}"));
    }
    let sum = hex.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${hex}#{sum:02x}").into_bytes()
}


fn stub_err<E: std::fmt::Display>(e: E) -> String {
    format!("gdb connection: {e}")
}

fn stop_reason(stop: Stop) -> SingleThreadStopReason<u64> {
    match stop {
        Stop::Step => SingleThreadStopReason::DoneStep,
        Stop::Break(_) => SingleThreadStopReason::SwBreak(()),
        Stop::Interrupt => SingleThreadStopReason::Signal(Signal::SIGINT),
        Stop::Refused => SingleThreadStopReason::Signal(Signal::SIGTRAP),
        Stop::Begin => SingleThreadStopReason::ReplayLog { tid: None, pos: ReplayLogPosition::Begin },
        Stop::End => SingleThreadStopReason::ReplayLog { tid: None, pos: ReplayLogPosition::End },
    }
}


impl Session {
    /// While the guest runs: did gdb send Ctrl-C, or go away?
    pub(super) fn poll_ctrl_c(&mut self) {
        let Some(GdbStubStateMachine::Running(r)) = &mut self.sm else { return };
        match r.borrow_conn().poll() {
            Poll::Closed => {
                self.quit = Some(Quit::Disconnected("gdb closed the connection while the guest ran".into()));
                return;
            }
            Poll::Nothing => return,
            Poll::Data => {}
        }
        let Some(GdbStubStateMachine::Running(mut r)) = self.sm.take() else { return };
        let next = match r.borrow_conn().read() {
            Ok(byte) => r.incoming_data(&mut self.t, byte).map_err(stub_err),
            Err(e) => Err(stub_err(e)),
        };
        match next {
            Ok(sm) => {
                if matches!(sm, GdbStubStateMachine::CtrlCInterrupt(_)) {
                    self.mode = Mode::Stopped;
                }
                self.sm = Some(sm);
            }
            Err(e) => self.quit = Some(Quit::Disconnected(e)),
        }
    }

    /// Serves gdb at a stop until it resumes, or goes away.
    pub(super) fn serve(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        self.complete(at)?;
        let cpu = at.vcpu().capture().map_err(kvm("capture the vCPU state", at.ordinal))?;
        self.t.cpu = Some(cpu);
        self.t.info = crate::gdb::target::StopInfo {
            pos: self.tr.pos(),
            exit: self.exit_text.clone(),
            guest_ns: m.clock.value(),
            log_last: self.log_last,
            checkpoints: format!(
                "{} checkpoints, every {} exits, {} bytes: {:?}",
                self.ckpts.len(),
                self.ckpts.interval(),
                self.ckpts.bytes(),
                self.ckpts.ordinals()
            ),
            ended: self.ended.clone(),
        };
        let Some(mut sm) = self.sm.take() else {
            self.quit.get_or_insert(Quit::Disconnected("no gdb connection".into()));
            return Ok(());
        };
        if let Some(stop) = self.pending.take() {
            sm = match sm {
                GdbStubStateMachine::Running(mut r) => {
                    for n in self.notes.drain(..) {
                        let _ = Connection::write_all(r.borrow_conn(), &note_packet(&n));
                    }
                    match r.report_stop(&mut self.t, stop_reason(stop)) {
                        Ok(sm) => sm,
                        Err(e) => {
                            self.quit = Some(Quit::Disconnected(stub_err(e)));
                            return Ok(());
                        }
                    }
                }
                other => other,
            };
        }
        if let GdbStubStateMachine::Idle(i) = &mut sm {
            if i.borrow_conn().holding() {
                // A `monitor goto` is done (or failed): its notes, then its OK.
                let notes: Vec<u8> = self.notes.drain(..).flat_map(|n| note_packet(&n)).collect();
                if let Err(e) = i.borrow_conn().release(&notes) {
                    self.quit = Some(Quit::Disconnected(format!("gdb connection lost: {e}")));
                    return Ok(());
                }
            }
        }
        for n in self.notes.drain(..) {
            // Not waiting for a stop reply: gdb cannot be told now.
            log::info!("{}", n.trim_end());
        }
        loop {
            sm = match sm {
                GdbStubStateMachine::Idle(mut i) => {
                    if let Some(req @ Request::Goto(_)) = self.t.request.take() {
                        self.sm = Some(GdbStubStateMachine::Idle(i));
                        self.request(req);
                        break;
                    }
                    let byte = match i.borrow_conn().read() {
                        Ok(b) => b,
                        Err(e) => {
                            self.quit = Some(Quit::Disconnected(format!("gdb connection lost: {e}")));
                            return Ok(());
                        }
                    };
                    match i.incoming_data(&mut self.t, byte) {
                        Ok(sm) => sm,
                        Err(e) => {
                            self.quit = Some(Quit::Disconnected(stub_err(e)));
                            return Ok(());
                        }
                    }
                }
                GdbStubStateMachine::Running(r) => {
                    let req = self.t.request.take().unwrap_or(Request::Continue);
                    self.sm = Some(GdbStubStateMachine::Running(r));
                    self.request(req);
                    break;
                }
                GdbStubStateMachine::CtrlCInterrupt(c) => {
                    match c.interrupt_handled(&mut self.t, Some(SingleThreadStopReason::<u64>::Signal(Signal::SIGINT))) {
                        Ok(sm) => sm,
                        Err(e) => {
                            self.quit = Some(Quit::Disconnected(stub_err(e)));
                            return Ok(());
                        }
                    }
                }
                GdbStubStateMachine::Disconnected(mut d) => {
                    if d.get_reason() == DisconnectReason::Kill {
                        // gdb's `kill` sends vKill and waits for its OK,
                        // which gdbstub sends only in extended mode.
                        let _ = Connection::write_all(d.borrow_conn(), b"$OK#9a");
                    }
                    self.quit = Some(match d.get_reason() {
                        DisconnectReason::Kill => Quit::Killed,
                        _ => Quit::Detached,
                    });
                    return Ok(());
                }
            };
        }
        self.notes.append(&mut self.t.notes);
        if self.t.diverged_now {
            self.t.diverged_now = false;
            self.notes.push(
                "ftvm: registers or memory were changed from gdb: from here the run diverges from the recording (no more log checks; `monitor goto N` returns to the recording)\n".into(),
            );
            log::warn!("ftvm: gdb changed the guest: the run now diverges from the recording");
        }
        if self.t.cpu_written {
            self.t.cpu_written = false;
            if let Some(c) = &self.t.cpu {
                at.vcpu().restore(c).map_err(kvm("set the vCPU state gdb wrote", at.ordinal))?;
            }
        }
        Ok(())
    }
}
