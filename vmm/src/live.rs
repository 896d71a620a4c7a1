//! Inputs from the host: a plain run, or a recording when a log writer is
//! attached. Every value handed to the guest is logged at the exit where it
//! was handed over.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replay_log::{EndReason, Event, LogWriter, Record};

use crate::console::ConsoleInput;
use crate::devices::Clock;
use crate::engine::{EngineError, ExitPoint, Flow, Inputs};
use crate::ft::gate::{Gate, Role};
use crate::ft::HEARTBEAT;
use crate::machine::Machine;

/// Register digests go into the log every this many exits.
pub const CHECK_INTERVAL: u64 = 256;
/// How far (in exits) the backup may fall behind before the guest is slowed.
pub const MAX_LAG_EXITS: u64 = 50_000;
/// Longest single wait in `hlt`, so SIGINT is noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);

pub type LogSink = LogWriter<Box<dyn Write + Send>>;

/// Streaming to a backup: high-water marks tell it (and through its
/// acknowledgements, the output gate) how far the log is complete.
struct Streaming {
    /// Ordinal of the last high-water mark, for status reports.
    sent: Arc<AtomicU64>,
    gate: Arc<Gate>,
    emitted: u64,
    dirty: bool,
    last: Instant,
}

pub struct Live {
    log: Option<LogSink>,
    input: ConsoleInput,
    pub by_kind: BTreeMap<&'static str, u64>,
    since_flush: u64,
    streaming: Option<Streaming>,
}

impl Live {
    pub fn new(log: Option<LogSink>, input: ConsoleInput) -> Self {
        Live { log, input, by_kind: BTreeMap::new(), since_flush: 0, streaming: None }
    }

    /// Marks each exit that logged something or produced output with a
    /// high-water mark, and flushes, so the backup can acknowledge it.
    pub fn with_progress(mut self, sent: Arc<AtomicU64>, gate: Arc<Gate>) -> Self {
        let emitted = gate.emitted();
        self.streaming = Some(Streaming { sent, gate, emitted, dirty: true, last: Instant::now() });
        self
    }

    fn progress(&mut self, at: &mut ExitPoint, heartbeat: bool) -> Result<(), EngineError> {
        let Some(st) = &mut self.streaming else { return Ok(()) };
        let emitted = st.gate.emitted();
        let due = st.dirty || emitted != st.emitted || (heartbeat && st.last.elapsed() >= HEARTBEAT);
        if !due {
            return Ok(());
        }
        st.emitted = emitted;
        st.last = Instant::now();
        st.sent.store(at.ordinal, Ordering::Relaxed);
        self.log(at, Event::Progress)?;
        if let Some(st) = &mut self.streaming {
            st.dirty = false;
        }
        self.flush()?;
        self.throttle(at.ordinal);
        Ok(())
    }

    /// A backup that falls too far behind slows the guest down rather than
    /// letting the unacknowledged log (and held output) grow without bound,
    /// as VMware FT does. If the backup is gone, the witness drops it from
    /// the view and the gate stops waiting for it, which ends the wait.
    fn throttle(&self, ordinal: u64) {
        let Some(st) = &self.streaming else { return };
        let mut slept = Duration::ZERO;
        while matches!(st.gate.role(), Role::Primary { need_ack: true })
            && ordinal.saturating_sub(st.gate.acked()) > MAX_LAG_EXITS
            && slept < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
            slept += Duration::from_millis(1);
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

    fn log(&mut self, at: &mut ExitPoint, event: Event) -> Result<(), EngineError> {
        if let Some(st) = &mut self.streaming {
            st.dirty = true;
        }
        *self.by_kind.entry(event.kind_name()).or_default() += 1;
        if let Some(w) = &mut self.log {
            let rec = Record { pos: at.position()?, event };
            w.append(&rec).map_err(EngineError::LogWrite)?;
            self.since_flush += 1;
            if self.since_flush >= 256 {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        self.since_flush = 0;
        match &mut self.log {
            Some(w) => w.flush().map_err(EngineError::LogWrite),
            None => Ok(()),
        }
    }

    /// Typed bytes go in only while the guest listens (receive interrupt
    /// enabled) and as far as the receive FIFO has room; the rest waits.
    fn push_input(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        if self.input.pending() == 0 {
            return Ok(());
        }
        let bytes = {
            let mut uart = m.uart.lock().unwrap();
            if !uart.accepting_input() {
                return Ok(());
            }
            let bytes = self.input.take(uart.rx_room());
            if bytes.is_empty() {
                return Ok(());
            }
            uart.push_input(&bytes);
            if let Some(st) = &self.streaming {
                st.gate.note_input(at.ordinal, uart.rx_total());
            }
            bytes
        };
        self.log(at, Event::SerialIn { bytes })
    }

    /// Advances the timer if its deadline has passed on the host clock.
    fn poll_timer(&mut self, m: &Machine, at: &mut ExitPoint, fresh: bool) -> Result<(), EngineError> {
        let Some(deadline) = m.pit.lock().unwrap().next_deadline_ns() else {
            return Ok(());
        };
        if (!fresh && m.clock.has_value()) || m.clock.peek_host() < deadline {
            return Ok(());
        }
        let ns = if fresh { m.clock.resample() } else { m.clock.now_ns() };
        let _ = m.clock.take_unlogged();
        self.log(at, Event::Time { ns })?;
        m.pit.lock().unwrap().update();
        Ok(())
    }
}

impl Inputs for Live {
    fn boot(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        let epoch_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        m.cmos.lock().unwrap().set_wall_base(epoch_secs);
        self.log(at, Event::WallClock { epoch_secs })
    }

    fn before_dispatch(&mut self, _: &Machine, _: u64, _: replay_log::ExitKind) -> Result<(), EngineError> {
        Ok(())
    }

    fn deliver(&mut self, m: &Machine, at: &mut ExitPoint, wait: bool) -> Result<Flow, EngineError> {
        if let Some(ns) = m.clock.take_unlogged() {
            self.log(at, Event::Time { ns })?;
        }
        if !wait {
            self.poll_timer(m, at, false)?;
            self.input.poll(None);
            self.push_input(m, at)?;
            return Ok(Flow::Continue);
        }
        // The guest is idle: a good moment to push the log out.
        self.progress(at, true)?;
        self.flush()?;
        let deadline = m.pit.lock().unwrap().next_deadline_ns();
        if deadline.is_none() && !self.input.open() && self.input.pending() == 0 {
            return Err(EngineError::Stuck { ordinal: at.ordinal, rip: at.rip()? });
        }
        let now = m.clock.peek_host();
        let max_wait = if self.streaming.is_some() { HEARTBEAT } else { MAX_WAIT };
        let timeout = deadline.map_or(max_wait, |d| Duration::from_nanos(d.saturating_sub(now)).min(max_wait));
        if self.input.pending() == 0 || !m.uart.lock().unwrap().accepting_input() {
            self.input.poll(Some(timeout));
        }
        self.poll_timer(m, at, true)?;
        self.push_input(m, at)?;
        Ok(Flow::Continue)
    }

    fn injected(&mut self, _: &Machine, at: &mut ExitPoint, vector: u8) -> Result<(), EngineError> {
        self.log(at, Event::Interrupt { vector })
    }

    fn exit_done(&mut self, _: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError> {
        if self.log.is_some() && at.ordinal.is_multiple_of(CHECK_INTERVAL) {
            let regs_digest = at.regs_digest()?;
            self.log(at, Event::Check { regs_digest })?;
        }
        self.progress(at, false)?;
        Ok(Flow::Continue)
    }

    fn finish(&mut self, _: &Machine, at: &mut ExitPoint, reason: EndReason, mem_digest: &dyn Fn() -> u64) -> Result<(), EngineError> {
        if self.log.is_none() {
            return Ok(());
        }
        let regs_digest = at.regs_digest()?;
        let mem_digest = mem_digest();
        self.log(at, Event::End { reason, regs_digest, mem_digest })?;
        self.progress(at, false)?;
        self.flush()
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
