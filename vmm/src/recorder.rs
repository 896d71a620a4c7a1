//! Inputs sampled from the host: a plain run (no log), a recording (a log
//! file) and an FT primary (a log streamed to the backup). The recorder
//! only samples: the time devices read, the timer's deadline passing,
//! bytes typed; it hands each value to the engine, which applies it, and
//! appends it to the log at the exit where it was handed over.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replay_log::{Event, LogWriter, Record};

use crate::console_io::ConsoleInput;
use crate::engine::{EngineError, ExitPoint, Flow, Inputs, Observed};
use crate::ft::commit::{self, GroupCommit};
use crate::ft::gate::Gate;
use crate::ft::log_buf::LogBuf;
use crate::ft::HEARTBEAT;
use crate::machine::Machine;

/// Register digests go into the log every this many exits.
pub const CHECK_INTERVAL: u64 = 256;
/// Longest single wait in `hlt`, so SIGINT is noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);

pub type LogSink = LogWriter<Box<dyn Write + Send>>;

/// An FT primary's link to its backup: high-water marks (group commit)
/// and the output gate whose acknowledgements they earn.
struct Marks {
    /// Ordinal of the last mark, for status reports.
    marked: Arc<AtomicU64>,
    gate: Arc<Gate>,
    commit: GroupCommit,
    /// The in-memory log the sink writes to, told where each mark ends so
    /// that a backup's acknowledgements can be checked against what it was
    /// sent.
    index: Option<Arc<LogBuf>>,
}

pub struct Recorder {
    log: Option<LogSink>,
    input: ConsoleInput,
    pub by_kind: BTreeMap<&'static str, u64>,
    marks: Option<Marks>,
}

impl Recorder {
    pub fn new(log: Option<LogSink>, input: ConsoleInput) -> Self {
        Recorder { log, input, by_kind: BTreeMap::new(), marks: None }
    }

    /// Streams to a backup: marks high-water points (group commit, see
    /// `ft::commit`) so the backup can acknowledge them and `gate` can
    /// release output.
    pub fn with_marks(mut self, marked: Arc<AtomicU64>, gate: Arc<Gate>) -> Self {
        self.marks = Some(Marks { marked, gate, commit: GroupCommit::new(Instant::now()), index: None });
        self
    }

    /// With `with_marks`: the log sink writes to `log`; note each mark there.
    pub fn with_mark_index(mut self, log: Arc<LogBuf>) -> Self {
        if let Some(mk) = &mut self.marks {
            mk.index = Some(log);
        }
        self
    }

    /// Marks and flushes if group commit says so (always with `force`).
    fn maybe_mark(&mut self, at: &mut ExitPoint, idle: bool, force: bool) -> Result<(), EngineError> {
        let Some(mk) = &mut self.marks else { return Ok(()) };
        let now = Instant::now();
        let look = mk.gate.look(mk.commit.last_mark());
        if !force && !mk.commit.due(now, look, idle) {
            return Ok(());
        }
        if let Some(log) = &mk.index {
            log.mark_follows(at.ordinal);
        }
        self.append(at, Event::Progress)?;
        self.flush()?;
        let Some(mk) = &mut self.marks else { return Ok(()) };
        mk.commit.marked(now, at.ordinal);
        mk.marked.store(at.ordinal, Ordering::Relaxed);
        self.throttle(at.ordinal);
        Ok(())
    }

    /// A backup that falls too far behind slows the guest down rather than
    /// letting the unacknowledged log (and held output) grow without bound,
    /// as VMware FT does. If the backup is gone, the witness drops it from
    /// the view and the gate stops waiting for it, which ends the wait.
    fn throttle(&self, ordinal: u64) {
        let Some(mk) = &self.marks else { return };
        let t0 = Instant::now();
        while commit::too_far_behind(ordinal, mk.gate.look(ordinal)) && t0.elapsed() < commit::MAX_LAG_WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn log_bytes(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.bytes_written())
    }

    pub fn events(&self) -> u64 {
        self.by_kind.values().sum()
    }

    /// Hands the writer back (flushed), e.g. to close a socket.
    pub fn into_log(self) -> Option<LogSink> {
        self.log
    }

    fn append(&mut self, at: &mut ExitPoint, event: Event) -> Result<(), EngineError> {
        *self.by_kind.entry(event.kind_name()).or_default() += 1;
        if let Some(mk) = &mut self.marks {
            mk.commit.logged();
        }
        if let Some(w) = &mut self.log {
            let rec = Record { pos: at.position()?, event };
            w.append(&rec).map_err(EngineError::LogWrite)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        match &mut self.log {
            Some(w) => w.flush().map_err(EngineError::LogWrite),
            None => Ok(()),
        }
    }

    /// Hands over `ev` (the engine applies it right after) and logs it.
    fn hand_over(&mut self, at: &mut ExitPoint, ev: Event, out: &mut Vec<Event>) -> Result<(), EngineError> {
        self.append(at, ev.clone())?;
        out.push(ev);
        Ok(())
    }

    /// Typed bytes go in only while the guest listens (receive interrupt
    /// enabled) and as far as the receive FIFO has room; the rest waits.
    fn typed(&mut self, m: &Machine, at: &mut ExitPoint, out: &mut Vec<Event>) -> Result<(), EngineError> {
        if self.input.pending() == 0 {
            return Ok(());
        }
        let (room, total) = {
            let uart = m.uart.lock().unwrap();
            if !uart.accepting_input() {
                return Ok(());
            }
            (uart.rx_room(), uart.rx_total())
        };
        let bytes = self.input.take(room);
        if bytes.is_empty() {
            return Ok(());
        }
        if let Some(mk) = &self.marks {
            // Acknowledged to the typist once the backup has this exit.
            mk.gate.note_input(at.ordinal, total + bytes.len() as u64);
        }
        self.hand_over(at, Event::SerialIn { bytes }, out)
    }

    /// The timer's deadline passed on the host clock: sample the time so
    /// the timer fires. `fresh`: sample again even if this exit has a value.
    fn timer(&mut self, m: &Machine, at: &mut ExitPoint, fresh: bool, out: &mut Vec<Event>) -> Result<(), EngineError> {
        let Some(deadline) = m.pit.lock().unwrap().next_deadline_ns() else {
            return Ok(());
        };
        if (!fresh && m.clock.has_value()) || m.clock.peek_host() < deadline {
            return Ok(());
        }
        let ns = m.clock.sample_again();
        let _ = m.clock.take_sample();
        self.hand_over(at, Event::Time { ns }, out)
    }
}

impl Inputs for Recorder {
    fn before_access(&mut self, _: &Machine, _: u64, _: replay_log::ExitKind) -> Result<Option<Event>, EngineError> {
        // Devices sample the host clock themselves, lazily, during the access.
        Ok(None)
    }

    fn arrivals(&mut self, m: &Machine, at: &mut ExitPoint, idle: bool, out: &mut Vec<Event>) -> Result<Flow, EngineError> {
        if at.ordinal == 0 {
            let epoch_secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            self.hand_over(at, Event::WallClock { epoch_secs }, out)?;
        }
        // The time devices read during the access.
        if let Some(ns) = m.clock.take_sample() {
            self.hand_over(at, Event::Time { ns }, out)?;
        }
        if !idle {
            self.timer(m, at, false, out)?;
            self.input.poll(None);
            return self.typed(m, at, out).map(|_| Flow::Continue);
        }
        // The guest is idle: a good moment to push the log out.
        self.maybe_mark(at, true, false)?;
        self.flush()?;
        let deadline = m.pit.lock().unwrap().next_deadline_ns();
        if deadline.is_none() && !self.input.open() && self.input.pending() == 0 {
            return Err(EngineError::Stuck { ordinal: at.ordinal, rip: at.rip()? });
        }
        let now = m.clock.peek_host();
        let max_wait = if self.marks.is_some() { HEARTBEAT } else { MAX_WAIT };
        let timeout = deadline.map_or(max_wait, |d| Duration::from_nanos(d.saturating_sub(now)).min(max_wait));
        if self.input.pending() == 0 || !m.uart.lock().unwrap().accepting_input() {
            self.input.poll(Some(timeout));
        }
        self.timer(m, at, true, out)?;
        self.typed(m, at, out)?;
        Ok(Flow::Continue)
    }

    fn observe(&mut self, _: &Machine, at: &mut ExitPoint, what: Observed) -> Result<Flow, EngineError> {
        match what {
            Observed::Injected(vector) => self.append(at, Event::Interrupt { vector })?,
            Observed::ExitDone => {
                if self.log.is_some() && at.ordinal.is_multiple_of(CHECK_INTERVAL) {
                    let regs_digest = at.regs_digest()?;
                    self.append(at, Event::Check { regs_digest })?;
                }
                self.maybe_mark(at, false, false)?;
            }
            Observed::End { reason, mem_digest } => {
                if self.log.is_some() {
                    let regs_digest = at.regs_digest()?;
                    let mem_digest = mem_digest();
                    self.append(at, Event::End { reason, regs_digest, mem_digest })?;
                    self.maybe_mark(at, false, true)?;
                    self.flush()?;
                }
            }
        }
        Ok(Flow::Continue)
    }

    fn summary(&self) -> String {
        let kinds: Vec<String> = self.by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
        if self.log.is_some() {
            format!("logged {} events ({}), {} bytes", self.events(), kinds.join(", "), self.log_bytes())
        } else {
            format!("{} inputs ({})", self.events(), kinds.join(", "))
        }
    }
}
