//! `ftvm replay --gdb ADDR`: a recording replayed under gdb, forwards and
//! backwards (docs/DESIGN.md, "Debugging a recording").
//!
//! The replay is the ordinary one (`engine::run_from` with a `Replayer`),
//! wrapped in [`DebugInputs`], which hands the exit loop's turns and debug
//! exits to the [`session::Session`]: gdb's packets are served there, at
//! stops, on the vCPU thread. Going backwards rebuilds the VM from a
//! checkpoint (a whole-VM snapshot taken every so many exits while
//! replaying, `position::Checkpoints`) and replays forward to the moment
//! wanted; this loop does the rebuilding.
//!
//! Files: `session.rs` (stops, modes, seeks), `target.rs` (what gdb reads
//! and writes), `position.rs` (positions between exits, checkpoints),
//! `paging.rs` (virtual addresses), `monitor.rs` (`monitor` commands).

pub mod conn;
pub mod monitor;
pub mod paging;
pub mod position;
pub mod session;
pub mod target;

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use replay_log::{Event, ExitKind, LogReader};

use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::console_io::ConsoleInput;
use crate::devices::OutputSink;
use crate::engine::{self, EngineError, Ending, ExitPoint, Flow, Inputs, Observed, RunOptions};
use crate::machine::Machine;
use crate::recorder::Recorder;
use crate::replay::{RecordSource, Replayer};
use crate::snapshot::Snapshot;
use crate::vm::Vm;
use position::Checkpoints;
use session::{Quit, Session, REWIND};
use target::DbgTarget;

#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    #[error("cannot listen for gdb on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error("waiting for gdb on {addr}: {err}")]
    Accept { addr: String, err: std::io::Error },
    #[error("{0}")]
    Log(#[from] replay_log::LogError),
    #[error("{0}")]
    Vm(#[from] crate::vm::VmError),
    #[error("{0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Stub(String),
}

/// Options of `ftvm replay --gdb`.
#[derive(Debug, Clone)]
pub struct GdbOptions {
    /// Where to wait for gdb (ADDR:PORT).
    pub listen: String,
    /// A checkpoint every this many exits (doubled as they thin out).
    pub checkpoint_every: u64,
    /// At most this many checkpoints…
    pub checkpoint_max: usize,
    /// …and this many bytes of them.
    pub checkpoint_bytes: u64,
}

impl Default for GdbOptions {
    fn default() -> Self {
        GdbOptions { listen: "127.0.0.1:1234".into(), checkpoint_every: 1000, checkpoint_max: 64, checkpoint_bytes: 256 << 20 }
    }
}

/// Guest output to stdout, once: a rewound replay runs through output
/// already printed, which is dropped by its byte number.
struct OnceSink {
    next: u64,
    printed: Arc<AtomicU64>,
}

impl OutputSink for OnceSink {
    fn emit(&mut self, bytes: &[u8]) {
        let start = self.next;
        self.next += bytes.len() as u64;
        let printed = self.printed.load(Ordering::Relaxed);
        if self.next > printed {
            let skip = printed.saturating_sub(start) as usize;
            crate::console_io::StdoutSink.emit(&bytes[skip..]);
            self.printed.store(self.next, Ordering::Relaxed);
        }
    }
}

/// The replay's inputs, with the session's stops; after gdb changed the
/// guest (a diversion), inputs from the host instead of the log.
pub struct DebugInputs<'a, S: RecordSource> {
    inner: &'a mut Replayer<S>,
    live: Option<Recorder>,
    s: &'a mut Session,
}

impl<S: RecordSource> DebugInputs<'_, S> {
    fn inputs(&mut self) -> &mut dyn Inputs {
        match &mut self.live {
            Some(l) => l,
            None => &mut *self.inner,
        }
    }
}

impl<S: RecordSource> Inputs for DebugInputs<'_, S> {
    fn before_access(&mut self, m: &Machine, ordinal: u64, exit: ExitKind) -> Result<Option<Event>, EngineError> {
        self.inputs().before_access(m, ordinal, exit)
    }

    fn arrivals(&mut self, m: &Machine, at: &mut ExitPoint, idle: bool, out: &mut Vec<Event>) -> Result<Flow, EngineError> {
        self.inputs().arrivals(m, at, idle, out)
    }

    fn observe(&mut self, m: &Machine, at: &mut ExitPoint, what: Observed) -> Result<Flow, EngineError> {
        if let Observed::Injected(v) = &what {
            self.s.injected(*v);
        }
        self.inputs().observe(m, at, what)
    }

    fn kicked(&mut self, m: &Machine) -> Result<bool, EngineError> {
        self.inputs().kicked(m)
    }

    fn resync_next(&mut self, m: &Machine, ordinal: u64) -> Result<bool, EngineError> {
        self.inputs().resync_next(m, ordinal)
    }

    fn pause_point(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError> {
        let flow = self.s.pause(m, at)?;
        if self.s.t.diverged && self.live.is_none() {
            // rr's "diversion": the guest no longer follows the log, so it
            // gets its time from the host from here on, as a live run.
            m.clock.go_live();
            self.live = Some(Recorder::new(None, ConsoleInput::none()));
        }
        Ok(flow)
    }

    fn debug_exit(&mut self, _m: &Machine, pc: u64, dr6: u64) -> Result<bool, EngineError> {
        Ok(self.s.debug_exit(pc, dr6))
    }

    fn left_guest(&mut self, _m: &Machine, hlt_rip: Option<u64>) -> Result<Option<u64>, EngineError> {
        Ok(self.s.left_guest(hlt_rip))
    }

    fn summary(&self) -> String {
        match &self.live {
            Some(l) => format!("diverged from the log: {}", l.summary()),
            None => self.inner.summary(),
        }
    }
}

/// The last exit ordinal in the log (`monitor goto` refuses beyond it).
fn last_ordinal(log: &Path) -> Result<u64, GdbError> {
    let mut r = LogReader::open(log)?;
    let mut last = 0;
    loop {
        match r.next_record() {
            Ok(Some(rec)) => last = last.max(rec.pos.ordinal),
            Ok(None) => return Ok(last),
            // A damaged or cut log: replay finds and reports it.
            Err(_) => return Ok(last),
        }
    }
}

/// Replays `log` under gdb; returns the exit code.
pub fn replay_under_gdb(log: &Path, cfg: &GuestConfig, opts: &GdbOptions) -> Result<i32, GdbError> {
    let name = log.display().to_string();
    let log_last = last_ordinal(log)?;
    let listener = TcpListener::bind(&opts.listen).map_err(|err| GdbError::Listen { addr: opts.listen.clone(), err })?;
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| opts.listen.clone());
    eprintln!("ftvm: replaying {name} under gdb: waiting for gdb on {addr} (gdb -ex 'target remote {addr}'); the log's last exit is #{log_last}");
    let (conn, peer) = listener.accept().map_err(|err| GdbError::Accept { addr: addr.clone(), err })?;
    drop(listener);
    let _ = conn.set_nodelay(true);
    eprintln!("ftvm: gdb connected from {peer}");
    crate::stop::install_interrupt_handlers();

    let printed = Arc::new(AtomicU64::new(0));
    let mut ckpts = Some(Checkpoints::new(opts.checkpoint_every, opts.checkpoint_max, opts.checkpoint_bytes));
    let mut session: Option<Session> = None;
    let mut from: Option<u64> = None;
    let started = std::time::Instant::now();
    let mut rewinds = 0u64;
    loop {
        let snap: Option<Snapshot> = match (&session, from) {
            (Some(s), Some(o)) => s.ckpts.ordinals().contains(&o).then(|| checkpoint(s, o)).flatten(),
            _ => None,
        };
        let start_bytes = snap.as_ref().map_or(0, |s| s.console_bytes());
        let sink = OnceSink { next: start_bytes, printed: printed.clone() };
        let t0 = std::time::Instant::now();
        let mut vm = Vm::new(cfg, Arc::new(VmClock::replay()), Box::new(sink), Default::default())?;
        let t1 = t0.elapsed();
        let mut rep = Replayer::new(LogReader::open(log)?.end_is_final());
        if let Some(s) = &snap {
            s.restore_vm(&mut vm)?;
            rep = rep.resume_after(s.position);
        }
        log::debug!("ftvm: gdb: VM built in {t1:?}, restored in {:?}", t0.elapsed() - t1);
        let s = match &mut session {
            Some(s) => s,
            None => {
                let t = DbgTarget::new(vm.mem.clone());
                let c = ckpts.take().expect("the session is made once");
                let conn = conn::GdbConn::new(conn.try_clone().map_err(|e| GdbError::Stub(e.to_string()))?, t.hold.clone());
                let s = Session::new(conn, t, cfg.header(), log_last, c).map_err(GdbError::Stub)?;
                session.insert(s)
            }
        };
        let injected = snap.as_ref().and_then(|c| (c.vcpu.events.interrupt.injected != 0).then_some(c.vcpu.events.interrupt.nr));
        s.restart(vm.mem.clone(), injected);
        let start = snap.as_ref().map(|c| c.position);
        let res = {
            let mut inputs = DebugInputs { inner: &mut rep, live: None, s: &mut *s };
            engine::run_from(vm.guest(), &mut inputs, &RunOptions::default(), start)
        };
        if let Some(r) = s.take_rewind() {
            from = r;
            rewinds += 1;
            continue;
        }
        let (why, code, verdict) = match &res {
            Ok(out) => {
                let (what, code) = out.ending.describe();
                match &out.ending {
                    Ending::Stopped { code: REWIND, .. } => unreachable!("a rewind is taken above"),
                    Ending::Guest(_) if rep.end.is_some() => (what.clone(), 0, format!("replay verified: {name} ({}); {what}; {}", rep.summary(), out.summary())),
                    Ending::Interrupted if rep.end.is_some() => (what.clone(), 0, format!("replay verified: {name} ({}); the recording was interrupted there", rep.summary())),
                    Ending::LogIncomplete(w) => (w.clone(), 3, format!("ftvm: replay incomplete: {w}")),
                    Ending::Stopped { why, code } => (why.clone(), *code, format!("ftvm: {why}")),
                    _ => (what.clone(), code, format!("ftvm: replay {what}: {}", out.summary())),
                }
            }
            Err(e) => (e.to_string(), 1, format!("ftvm: replaying {name}: {e}")),
        };
        if s.quit.is_some() || s.is_free() {
            eprintln!("{verdict}");
            match &s.quit {
                Some(Quit::Killed) => eprintln!("ftvm: killed from gdb"),
                Some(Quit::Detached) => eprintln!("ftvm: gdb left (detached); the replay ran on to its end"),
                Some(Quit::Disconnected(why)) => eprintln!("ftvm: gdb left ({why}); the replay ran on to its end"),
                None => {}
            }
            report(s, rewinds, started);
            return Ok(code);
        }
        // The replay ended with gdb still attached: it stays at the end
        // (it can go backwards from there) until gdb goes.
        let (ordinal, kind) = match &res {
            Ok(out) => (out.exits, ExitKind::Stop),
            Err(_) => (vm.machine.ordinal.load(Ordering::Relaxed), ExitKind::Stop),
        };
        let flow = {
            let mut at = ExitPoint::new(ordinal, kind, &mut vm.vcpu, &vm.mem);
            s.at_end(&vm.machine, &mut at, why)?
        };
        if let Some(r) = s.take_rewind() {
            from = r;
            rewinds += 1;
            continue;
        }
        let _ = flow;
        eprintln!("{verdict}");
        match &s.quit {
            Some(Quit::Killed) => eprintln!("ftvm: killed from gdb"),
            Some(Quit::Detached) => eprintln!("ftvm: gdb left (detached) at the end of the replay"),
            Some(Quit::Disconnected(why)) => eprintln!("ftvm: gdb left ({why}) at the end of the replay"),
            None => {}
        }
        report(s, rewinds, started);
        return Ok(if matches!(s.quit, Some(Quit::Killed)) { 0 } else { code });
    }
}

fn checkpoint(s: &Session, ordinal: u64) -> Option<Snapshot> {
    s.ckpts.before(&position::Pos::exit(ordinal), false).filter(|c| c.0 == ordinal).map(|c| c.1.clone())
}

fn report(s: &Session, rewinds: u64, started: std::time::Instant) {
    eprintln!(
        "ftvm: gdb session: {:.2}s, {} single steps, {} rewinds, {} checkpoints ({} bytes, every {} exits)",
        started.elapsed().as_secs_f64(),
        s.steps,
        rewinds,
        s.ckpts.len(),
        s.ckpts.bytes(),
        s.ckpts.interval()
    );
}
