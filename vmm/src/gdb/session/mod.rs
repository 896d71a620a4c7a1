//! One gdb session over a replay: where the guest is (`Tracker`), what gdb
//! asked for (`Mode`), and the stops. The exit loop calls in at every
//! turn (`Inputs::pause_point`) and at every debug exit; the session then
//! serves gdb's packets (gdbstub's state machine) until gdb resumes, arms
//! single-step or the debug registers for what it asked, and lets the loop
//! run. Going backwards means starting over from a checkpoint: the session
//! asks the outer loop (`gdb/mod.rs`) for a rewind and seeks forward from
//! there to the moment it wants.
//!
//! Debug exits are not guest exits: the engine does not count them, so the
//! replay's ordinals and the log's checks are those of a plain replay.
//!
//! How each interval between two exits is run, so that positions are
//! exact (see `position.rs`): the instruction about to run at the end of
//! exit N ("next0": RIP, or the handler of an interrupt injected there) is
//! an arrival at step 0 in every mode; the guest then runs freely with the
//! breakpoints in the debug registers, or single-steps, and an arrival at
//! a breakpoint already counted is stepped over first (this KVM does not
//! honour RF: a breakpoint at RIP fires again at once).


use gdbstub::common::Signal;
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::reverse_exec::ReplayLogPosition;
use replay_log::Header;

mod patch;
mod run;
mod serve;

pub use patch::HLT;

use super::conn::{GdbConn, Poll};
use super::position::{Checkpoints, Pos, Tracker};
use super::target::{DbgTarget, Request};
use crate::engine::{EngineError, Ending, ExitPoint, Flow};
use crate::machine::Machine;
use crate::snapshot::Snapshot;
use crate::vcpu::GuestDebug;

/// The code of the `Ending` a session stops the exit loop with when it
/// needs the VM rebuilt from a checkpoint (never an exit status).
pub const REWIND: i32 = -7;

/// How often (in exits) the socket is checked for gdb's Ctrl-C while the
/// guest runs: a syscall every exit would cost more than it is worth.
const CTRL_C_EVERY: u64 = 16;

/// A stop to report to gdb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Step,
    Break(u64),
    Interrupt,
    /// Stopped without moving (a request that cannot be carried out; the
    /// note says why).
    Refused,
    Begin,
    End,
}

/// What a seek does when it reaches its goal.
#[derive(Debug, Clone, Copy)]
enum Then {
    Report(Stop),
    /// `monitor goto`: gdb is not waiting for a stop reply.
    Silent,
    /// The goal was the position gdb resumed from (re-counted with new
    /// breakpoints): carry out the request.
    Resume(Request),
    /// reverse-continue: the hits seen on the way are the candidates.
    ScanDone,
    /// reverse-stepi from an arrival: the goal's step count is now known.
    StepBack,
    /// reverse-stepi from the end of an exit: seek its predecessor's
    /// end, then step to the exit.
    CountTo(u64),
}

/// reverse-continue's scan: the checkpoint it started from (None: boot)
/// and the breakpoint hits seen, with their addresses.
type Scan = (Option<u64>, Vec<(Pos, u64)>);

#[derive(Debug, Clone)]
struct Seek {
    goal: Pos,
    then: Then,
    /// reverse-continue: the checkpoint the scan started from, and the
    /// breakpoint hits seen.
    scan: Option<Scan>,
}

#[derive(Debug, Clone)]
enum Mode {
    Stopped,
    Run,
    Step,
    Seek(Seek),
    /// Step from exit `to - 1` until exit `to`, counting (reverse-stepi).
    Count { to: u64, steps: u64 },
    /// gdb is gone: replay to the end without stopping.
    Free,
}

/// What the last debug exit was.
#[derive(Debug, Clone, Copy)]
enum Event {
    Step(u64),
    Hit(u64),
    /// The interrupt injected at the exit was delivered: the guest is at
    /// its handler's first instruction (next0), not yet run.
    Delivered(u64),
}

/// The measurement of whether this KVM stops at hardware breakpoints
/// (the lab's nested KVM never does; ours does at CPL0): done once, at
/// boot, before gdb gets the first stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Todo,
    Running(u64),
    Done,
}

/// How the session ended, when it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quit {
    Killed,
    Detached,
    Disconnected(String),
}

pub struct Session {
    sm: Option<GdbStubStateMachine<'static, DbgTarget, GdbConn>>,
    pub t: DbgTarget,
    tr: Tracker,
    mode: Mode,
    pending: Option<Stop>,
    notes: Vec<String>,
    event: Option<Event>,
    /// The ordinal whose end the guest is at (None: a new run starts).
    seen: Option<u64>,
    /// The pending exit of the current ordinal was completed.
    completed: bool,
    /// "next0" was counted for this interval.
    started: bool,
    /// The exit as the log has it (kind, RIP), read before completing it.
    exit_text: String,
    /// An interrupt injected at this exit, not yet delivered: its vector.
    injected: Option<u8>,
    /// The guest is at an arrival that was counted (an armed breakpoint
    /// there must be stepped over, not hit again).
    here: Option<u64>,
    /// The first instruction of the interval (see `start_interval`).
    next0: Option<u64>,
    /// Running to deliver the injected interrupt, with a breakpoint on
    /// its handler (see `deliver`).
    delivering: Option<u64>,
    armed: Option<GuestDebug>,
    /// Breakpoints patched into guest memory as `hlt` for the run in
    /// progress (where the debug registers do not work): (address, guest
    /// physical address, the byte it replaced).
    patched: Vec<(u64, u64, u8)>,
    probe: Probe,
    exits_run: u64,
    pub ckpts: Checkpoints<Snapshot>,
    guest: Header,
    log_last: u64,
    /// A rewind the outer loop must do: the checkpoint to restart from
    /// (None: boot).
    rewind: Option<Option<u64>>,
    pub quit: Option<Quit>,
    /// The run cannot go on (the log's end, or an error): why.
    ended: Option<String>,
    /// Single steps taken, for the report.
    pub steps: u64,
}

impl Session {
    pub fn new(conn: GdbConn, t: DbgTarget, guest: Header, log_last: u64, ckpts: Checkpoints<Snapshot>) -> Result<Session, String> {
        let stub = GdbStub::new(conn);
        let mut t = t;
        let sm = stub.run_state_machine(&mut t).map_err(|e| format!("gdb stub: {e}"))?;
        Ok(Session {
            sm: Some(sm),
            t,
            tr: Tracker::new(),
            mode: Mode::Stopped,
            pending: None,
            notes: Vec::new(),
            event: None,
            seen: None,
            completed: false,
            started: false,
            exit_text: String::new(),
            injected: None,
            here: None,
            next0: None,
            delivering: None,
            armed: None,
            patched: Vec::new(),
            probe: Probe::Todo,
            exits_run: 0,
            ckpts,
            guest,
            log_last,
            rewind: None,
            quit: None,
            ended: None,
            steps: 0,
        })
    }

    /// A run (re)starts: from boot, or from the checkpoint of exit `at`
    /// (with the vector of an interrupt injected there, still pending).
    pub fn restart(&mut self, mem: vm_memory::GuestMemoryMmap, injected: Option<u8>) {
        self.t.mem = mem;
        self.t.diverged = false;
        self.t.diverged_now = false;
        self.t.cpu = None;
        self.t.cpu_written = false;
        self.seen = None;
        self.injected = injected;
        self.delivering = None;
        self.event = None;
        self.armed = None;
        self.ended = None;
        // The patches were in the memory of the VM just dropped.
        self.patched.clear();
    }

    pub fn take_rewind(&mut self) -> Option<Option<u64>> {
        self.rewind.take()
    }

    /// An interrupt was injected at the current exit.
    pub fn injected(&mut self, vector: u8) {
        self.injected = Some(vector);
    }

    pub fn is_free(&self) -> bool {
        matches!(self.mode, Mode::Free)
    }

    /// The exit loop's turn: see the module documentation.
    pub fn pause(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError> {
        if self.is_free() {
            self.arm(at, GuestDebug::default())?;
            return Ok(Flow::Continue);
        }
        match self.probe {
            Probe::Todo if std::env::var_os("FTVM_GDB_PATCHED_BREAKPOINTS").is_some_and(|v| v == "1") => {
                // Forced (tests): breakpoints as patched hlt, as in the lab.
                self.probe = Probe::Done;
                self.t.hw_breakpoints = false;
                log::info!("ftvm: gdb: FTVM_GDB_PATCHED_BREAKPOINTS=1: breakpoints are patched hlt instructions, for kernel (CPL0) code only");
            }
            Probe::Todo => {
                // A breakpoint on the first instruction: a KVM that honours
                // debug registers stops there before running anything.
                let rip = at.vcpu().regs().map_err(kvm("get regs", at.ordinal))?.rip;
                self.arm(at, GuestDebug { single_step: false, hw_breakpoints: [Some(rip), None, None, None] })?;
                self.probe = Probe::Running(rip);
                return Ok(Flow::Continue);
            }
            Probe::Running(rip) => {
                // The guest ran on to an exit: no hardware breakpoints here.
                self.probe = Probe::Done;
                self.t.hw_breakpoints = false;
                log::warn!(
                    "ftvm: gdb: this KVM did not stop at a hardware breakpoint on the first instruction ({rip:#x}): breakpoints are patched hlt instructions, for kernel (CPL0) code only"
                );
            }
            Probe::Done => {}
        }
        if self.seen != Some(at.ordinal) {
            self.new_exit(m, at)?;
        } else if let Some(ev) = self.event.take() {
            self.after_debug_exit(ev);
        }
        if let Some(sm) = &mut self.sm {
            keep_alive(sm);
        }
        if let Mode::Run = self.mode {
            self.exits_run += 1;
            if self.exits_run.is_multiple_of(CTRL_C_EVERY) && self.pending.is_none() {
                self.poll_ctrl_c();
            }
        }
        self.drive(m, at)
    }

    /// The run ended (the log's end, the guest stopped, or an error):
    /// serve gdb here until it goes back, or away.
    pub fn at_end(&mut self, m: &Machine, at: &mut ExitPoint, why: String) -> Result<Flow, EngineError> {
        self.left_guest(None);
        if self.quit.is_some() || self.is_free() {
            return Ok(Flow::Continue);
        }
        // The last exit gets no turn of the loop: it is handled here, so a
        // seek whose goal is the end reaches it.
        if self.seen != Some(at.ordinal) {
            self.new_exit(m, at)?;
        }
        self.ended = Some(why.clone());
        if self.rewind.is_none() {
            let running = match &self.mode {
                Mode::Seek(s) => {
                    self.notes.push(format!("ftvm: the replay ended before reaching {}: {why}\n", s.goal));
                    true
                }
                Mode::Run | Mode::Step | Mode::Count { .. } => true,
                _ => false,
            };
            if running || self.pending == Some(Stop::Step) {
                self.notes.push(format!("ftvm: end of the replay at exit #{}: {why}\n", at.ordinal));
                self.mode = Mode::Stopped;
                self.pending = Some(Stop::End);
            }
        }
        self.drive(m, at)
    }

    /// Serves, arms, and says whether the loop runs on.
    fn drive(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError> {
        loop {
            if let Some(r) = &self.rewind {
                log::debug!("ftvm: gdb: rewinding to {}", r.map_or("boot".into(), |o| format!("the checkpoint of exit #{o}")));
                return Ok(Flow::Stop(Ending::Stopped { why: "rewind".into(), code: REWIND }));
            }
            if self.quit.is_some() {
                return Ok(self.quit_flow());
            }
            if self.pending.is_some() || matches!(self.mode, Mode::Stopped) {
                self.serve(m, at)?;
                continue;
            }
            if self.ended.is_some() {
                // Nothing more to run: whatever gdb asked, this is the end.
                self.mode = Mode::Stopped;
                self.pending = Some(Stop::End);
                continue;
            }
            if self.arm_for_mode(at)? {
                return Ok(Flow::Continue);
            }
        }
    }

    fn quit_flow(&mut self) -> Flow {
        match &self.quit {
            Some(Quit::Killed) => Flow::Stop(Ending::Stopped { why: "killed from gdb".into(), code: 0 }),
            _ if self.t.diverged => Flow::Stop(Ending::Stopped { why: "gdb left a diverged run; it ends here".into(), code: 0 }),
            _ => {
                self.mode = Mode::Free;
                Flow::Continue
            }
        }
    }

    fn new_exit(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        self.seen = Some(at.ordinal);
        self.tr.exit(at.ordinal);
        self.completed = false;
        self.started = false;
        self.here = None;
        self.next0 = None;
        self.event = None;
        self.exit_text.clear();
        if let Some(pc) = self.delivering.take() {
            log::warn!("ftvm: gdb: the interrupt handler at {pc:#x} was not stopped at; the guest ran on to exit #{}", at.ordinal);
        }
        // A checkpoint (of the recorded run only), before anything else
        // touches the vCPU: its position is the exit as logged.
        if !self.t.diverged && self.ckpts.due(at.ordinal) && m.stop.get().is_none() {
            self.arm(at, GuestDebug::default())?;
            let t0 = std::time::Instant::now();
            self.exit_text = exit_text(at)?;
            match Snapshot::capture(self.guest.clone(), m, at) {
                Ok(s) => {
                    let bytes = s.memory.stored_bytes() + s.vcpu.xsave.len() as u64 + 4096;
                    log::debug!("ftvm: gdb: checkpoint at exit #{} ({bytes} bytes, {:?})", at.ordinal, t0.elapsed());
                    self.ckpts.add(at.ordinal, bytes, s);
                }
                Err(e) => log::warn!("ftvm: gdb: no checkpoint at exit #{}: {e}", at.ordinal),
            }
            self.completed = true;
        }
        match &self.mode {
            Mode::Step => self.pending = Some(Stop::Step),
            Mode::Count { to, steps } if at.ordinal >= *to => {
                // The instruction stepped last made exit `to`: the moment
                // before it is (to - 1, steps counted).
                let back = Pos { ordinal: to - 1, anchor: None, steps: *steps };
                self.start_seek(back, Then::Report(Stop::Step), false);
            }
            Mode::Seek(_) => self.check_goal(),
            _ => {}
        }
        Ok(())
    }

    fn after_debug_exit(&mut self, ev: Event) {
        let pc = match ev {
            Event::Step(pc) | Event::Hit(pc) => pc,
            Event::Delivered(pc) => {
                if matches!(self.mode, Mode::Run) && self.t.breakpoints.contains(&pc) {
                    self.pending = Some(Stop::Break(pc));
                }
                return;
            }
        };
        match &self.mode {
            Mode::Step => self.pending = Some(Stop::Step),
            Mode::Run if self.t.breakpoints.contains(&pc) => self.pending = Some(Stop::Break(pc)),
            Mode::Seek(_) => {
                // A breakpoint hit on the way (the goal itself excluded).
                let bp = self.t.breakpoints.contains(&pc);
                if let (Mode::Seek(s), Some(p)) = (&mut self.mode, self.tr.pos()) {
                    if let (Some((_, hits)), true, false) = (&mut s.scan, bp, self.tr.at(&s.goal)) {
                        hits.push((p, pc));
                    }
                }
                self.check_goal();
            }
            _ => {}
        }
    }

    /// In a seek: the goal reached (what next), or passed (an error).
    fn check_goal(&mut self) {
        let Mode::Seek(s) = &self.mode else { return };
        if self.tr.at(&s.goal) {
            let s = s.clone();
            self.reached(s);
        } else if self.tr.past(&s.goal) {
            self.notes.push(format!("ftvm: could not reach {} (the replay went past it)\n", s.goal));
            self.mode = Mode::Stopped;
            self.pending = Some(Stop::Refused);
        }
    }

    fn reached(&mut self, s: Seek) {
        log::debug!("ftvm: gdb: reached {}", s.goal);
        match s.then {
            Then::Report(stop) => {
                self.mode = Mode::Stopped;
                self.pending = Some(stop);
            }
            Then::Silent => self.mode = Mode::Stopped,
            Then::Resume(req) => self.request(req),
            Then::ScanDone => {
                let (from, hits) = s.scan.unwrap_or((None, Vec::new()));
                match hits.last() {
                    Some(&(p, pc)) => self.start_seek(p, Then::Report(Stop::Break(pc)), false),
                    None => match from {
                        // Nothing between boot and here: the beginning.
                        None => self.start_seek(Pos::exit(0), Then::Report(Stop::Begin), false),
                        Some(c) => self.start_scan(Pos::exit(c)),
                    },
                }
            }
            Then::StepBack => match self.tr.from_exit() {
                Some(k) if k > 0 => self.start_seek(Pos { ordinal: s.goal.ordinal, anchor: None, steps: k - 1 }, Then::Report(Stop::Step), false),
                _ => self.step_back_from_exit(s.goal.ordinal),
            },
            Then::CountTo(to) => self.mode = Mode::Count { to, steps: 0 },
        }
    }

    /// Seeks `goal`: on in this run if it lies ahead, else from the latest
    /// checkpoint before it.
    fn start_seek(&mut self, goal: Pos, then: Then, scan: bool) {
        let ahead = !self.t.diverged
            && self.ended.is_none()
            && !self.tr.past(&goal)
            && (goal.ordinal > self.tr.ordinal() || self.tr.from_exit().is_some() || goal.anchor.is_some_and(|a| self.tr.counted(a.pc)))
            && !scan;
        let seek = Seek { goal, then, scan: None };
        if ahead && !self.tr.at(&goal) {
            self.mode = Mode::Seek(seek);
            return;
        }
        if ahead {
            self.reached(seek);
            return;
        }
        let from = self.ckpts.before(&goal, false).map(|c| c.0);
        self.mode = Mode::Seek(seek);
        self.rewind = Some(from);
    }

    /// reverse-continue: replays from the checkpoint before `upto` to
    /// `upto`, noting every breakpoint hit.
    fn start_scan(&mut self, upto: Pos) {
        let from = self.ckpts.before(&upto, true).map(|c| c.0);
        self.mode = Mode::Seek(Seek { goal: upto, then: Then::ScanDone, scan: Some((from, Vec::new())) });
        self.rewind = Some(from);
    }

    /// reverse-stepi at the end of exit `n`: the moment before is in the
    /// previous interval, just before the instruction that made exit n.
    fn step_back_from_exit(&mut self, n: u64) {
        if n == 0 {
            self.mode = Mode::Stopped;
            self.pending = Some(Stop::Begin);
            return;
        }
        self.start_seek(Pos::exit(n - 1), Then::CountTo(n), true);
    }

    /// Carries out what gdb asked for at a stop.
    fn request(&mut self, req: Request) {
        let here = self.tr.pos();
        let reverse = matches!(req, Request::ReverseContinue | Request::ReverseStep);
        if reverse && self.t.diverged {
            self.refuse("ftvm: the run diverged from the recording (registers or memory were changed): it cannot run backwards; `monitor goto N` returns to the recording\n");
            return;
        }
        match req {
            Request::Continue => {
                let new_unknown = self.t.breakpoints.iter().any(|&a| !self.tr.counted(a));
                match here {
                    // Breakpoints added in the middle of an interval the
                    // guest ran through freely: count them from its exit.
                    Some(p) if new_unknown && !p.is_exit() && !self.t.diverged => {
                        let from = self.ckpts.before(&p, false).map(|c| c.0);
                        self.mode = Mode::Seek(Seek { goal: p, then: Then::Resume(Request::Continue), scan: None });
                        self.rewind = Some(from);
                    }
                    _ => self.mode = Mode::Run,
                }
            }
            Request::Step => {
                if self.t.cpu.as_ref().is_some_and(|c| c.sregs.cs.dpl == 3 || c.sregs.cs.selector & 3 == 3) {
                    self.refuse("ftvm: cannot single-step CPL3 code on this KVM (the #DB would go to the guest)\n");
                    return;
                }
                self.mode = Mode::Step;
            }
            Request::ReverseContinue => match here {
                None => self.refuse("ftvm: the position here is unknown; reverse-continue is not possible from it\n"),
                Some(p) if p == Pos::exit(0) => {
                    self.mode = Mode::Stopped;
                    self.pending = Some(Stop::Begin);
                }
                Some(p) => self.start_scan(p),
            },
            Request::ReverseStep => match here {
                None => self.refuse("ftvm: the position here is unknown; reverse-stepi is not possible from it\n"),
                Some(p) if p.steps > 0 => self.start_seek(Pos { steps: p.steps - 1, ..p }, Then::Report(Stop::Step), false),
                Some(p) if p.anchor.is_some() => {
                    // Find how many steps from the exit this arrival is.
                    let from = self.ckpts.before(&p, false).map(|c| c.0);
                    // (The goal's interval is always stepped, so the
                    // steps are known when it is reached.)
                    self.mode = Mode::Seek(Seek { goal: p, then: Then::StepBack, scan: None });
                    self.rewind = Some(from);
                }
                Some(p) => self.step_back_from_exit(p.ordinal),
            },
            Request::Goto(p) => {
                if p.ordinal > self.log_last {
                    self.notes.push(format!("ftvm: the log ends at exit #{}\n", self.log_last));
                    self.mode = Mode::Stopped;
                    return;
                }
                self.start_seek(p, Then::Silent, self.t.diverged);
            }
        }
    }

    fn refuse(&mut self, why: &str) {
        log::warn!("{}", why.trim_end());
        self.notes.push(why.into());
        self.mode = Mode::Stopped;
        self.pending = Some(Stop::Refused);
    }
}

/// See `GdbConn::keep_alive`.
fn keep_alive(sm: &mut GdbStubStateMachine<'static, DbgTarget, GdbConn>) {
    match sm {
        GdbStubStateMachine::Idle(i) => i.borrow_conn().keep_alive(),
        GdbStubStateMachine::Running(r) => r.borrow_conn().keep_alive(),
        _ => {}
    }
}

fn kvm(what: &'static str, ordinal: u64) -> impl Fn(crate::vcpu::VcpuError) -> EngineError {
    move |err| EngineError::Kvm { what, ordinal, err }
}

/// The exit as the log has it (`log dump` prints the same kind and RIP);
/// read before the exit is completed.
fn exit_text(at: &mut ExitPoint) -> Result<String, EngineError> {
    if at.ordinal == 0 {
        return Ok("boot (before the first instruction)".into());
    }
    let p = at.position()?;
    Ok(format!("@{} rip={:#x} {}", p.ordinal, p.rip, p.exit))
}

