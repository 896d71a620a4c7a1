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

use replay_log::{Event, ExitKind, LogWriter, Record};
use vm_memory::Bytes;

use crate::clock::VmClock;
use crate::console_io::ConsoleInput;
use crate::engine::{EngineError, ExitPoint, Flow, Inputs, Observed};
use crate::ft::commit::{self, GroupCommit};
use crate::ft::gate::{Gate, KEEP_RELEASED};
use crate::ft::log_buf::LogBuf;
use crate::ft::xfer::{Taken, Transfers};
use crate::snapshot::Snapshot;
use crate::ft::HEARTBEAT;
use crate::kick::Kicker;
use crate::machine::Machine;
use crate::net::tap::NetInput;
use crate::stop::StopHandle;

/// The timer's next deadline (guest ns).
fn at_deadline(m: &Machine) -> Option<u64> {
    m.pit.lock().unwrap().next_deadline_ns()
}

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
    kicker: Option<Kicker>,
    /// Dirty-page tracking is on (recording: resyncs need the pages).
    tracking: bool,
    /// When the dirty log was last cleared.
    cleared: Instant,
    /// Pages logged by resyncs.
    pub resync_pages: u64,
    /// The last exit, when output produced there waits for a mark that
    /// group commit deferred: a kick marks it if the guest does not exit.
    unmarked_at: Option<replay_log::Position>,
    /// Snapshots asked for by a joining backup's log sender.
    transfers: Option<Arc<Transfers>>,
    /// Frames received by the network card's host side, waiting for the
    /// guest (`with_net`).
    net: Option<NetInput>,
}

/// Received frames handed to the guest at one exit, at most: the rest wait
/// for the next exit (the guest's interrupt handler makes plenty).
const FRAMES_PER_EXIT: usize = 64;

/// Adds to `dirty` (KVM's dirty log) the guest pages devices wrote through
/// ftvm's own mapping since the last call: the network card's received
/// frames and used rings. A machine without a card: `dirty` is untouched.
pub(crate) fn merge_device_writes(m: &Machine, dirty: &mut Vec<u64>) {
    let Some(card) = &m.net else { return };
    let written = card.lock().unwrap().take_written();
    if written.is_empty() {
        return;
    }
    dirty.extend(written);
    dirty.sort_unstable();
    dirty.dedup();
}

/// Pages per `Pages` record: 4 MiB of a delta, well under the format's
/// 16 MiB record limit.
const PAGES_PER_RECORD: usize = 1024;
/// While the guest idles in `hlt`, the dirty log is cleared this often,
/// which bounds a later resync's delta to what was written since (the
/// delta may be any superset of what changed since the last exit). Each
/// clear makes the next write to every page fault once more, which costs
/// a spinning user process about 23.5 µs a page on the PVM host.
const CLEAR_EVERY: Duration = Duration::from_millis(50);

impl Recorder {
    pub fn new(log: Option<LogSink>, input: ConsoleInput) -> Self {
        Recorder {
            log,
            input,
            by_kind: BTreeMap::new(),
            marks: None,
            kicker: None,
            tracking: false,
            cleared: Instant::now(),
            resync_pages: 0,
            unmarked_at: None,
            transfers: None,
            net: None,
        }
    }

    /// Received frames for the network card: handed to the guest (and
    /// logged as `NetRx`) at exits where the card has buffers for them.
    pub fn with_net(mut self, input: NetInput) -> Self {
        self.net = Some(input);
        self
    }

    /// Frames dropped before they reached the guest: (queue full,
    /// oversize), for the summary.
    pub fn net_dropped(&self) -> Option<(u64, u64)> {
        self.net.as_ref().map(|n| (n.dropped.load(Ordering::Relaxed), n.oversize))
    }

    /// Answers requests for snapshots (state transfer to a joining
    /// backup, `ft::xfer`); needs `with_mark_index`.
    pub fn with_transfers(mut self, t: Arc<Transfers>) -> Self {
        self.transfers = Some(t);
        self
    }

    /// Takes the snapshot a joining backup asked for, at the end of this
    /// exit: flushes the log first, so its end is exactly the offset from
    /// which the backup needs it. A failure is answered to the sender (it
    /// drops the backup's stream); the run goes on.
    fn transfer(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        let Some(reply) = self.transfers.as_ref().and_then(|t| t.take()) else { return Ok(()) };
        let t0 = Instant::now();
        self.flush()?;
        let (Some(t), Some(index)) = (self.transfers.clone(), self.marks.as_ref().and_then(|mk| mk.index.clone())) else {
            let _ = reply.send(Err("this VMM keeps no log to stream".into()));
            return Ok(());
        };
        let offset = index.len();
        // Everything written up to this exit, for the chunks to capture
        // again (a new dirty interval starts here: harmless to resyncs,
        // which need only what is written after the last exit).
        if self.tracking {
            self.take_dirty(m, at, "get the dirty log")?;
        }
        let mut in_pause = 0;
        let taken = Snapshot::capture_with(t.guest.clone(), m, at, |mem| {
            let (image, n) = t.memory_now(mem)?;
            in_pause = n;
            Ok(image)
        })
        .map(|snapshot| {
            let tail = self.marks.as_ref().map_or((snapshot.console_bytes(), Vec::new()), |mk| mk.gate.emitted_tail(KEEP_RELEASED));
            let frames = self.marks.as_ref().map(|mk| mk.gate.frames_held()).unwrap_or_default();
            Taken { snapshot, chunks_in_pause: in_pause, offset, pause: t0.elapsed(), tail, frames }
        })
        .map_err(|e| e.to_string());
        if let Ok(tk) = &taken {
            t.taken_at(tk.snapshot.position.ordinal);
        }
        let _ = reply.send(taken);
        Ok(())
    }

    /// Kicks a guest that computes past a timer deadline without exiting
    /// (see `kick`); `stop` must be the run's `RunOptions::stop`.
    pub fn with_kicks(mut self, stop: StopHandle, clock: Arc<VmClock>) -> Self {
        self.kicker = Some(Kicker::start(stop, clock));
        self
    }

    /// Logs the state at a resync position: the pages written since the
    /// dirty log was last cleared (a superset of those written since the
    /// last exit), then the vCPU. Replay applies them in that order.
    fn resync(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        let state = at.capture()?;
        let ordinal = at.ordinal;
        let dirty = self.take_dirty(m, at, "get the dirty log")?;
        for chunk in dirty.chunks(PAGES_PER_RECORD) {
            let mut pages = Vec::with_capacity(chunk.len());
            for &gpa in chunk {
                let mut data = vec![0u8; 4096];
                at.mem()
                    .read_slice(&mut data, vm_memory::GuestAddress(gpa))
                    .map_err(|_| EngineError::Guest { ordinal, rip: 0, what: format!("dirty page {gpa:#x} outside guest memory") })?;
                pages.push((gpa, data));
            }
            self.resync_pages += pages.len() as u64;
            self.append(at, Event::Pages { pages })?;
        }
        // Logged, not handed over: the vCPU and memory already are in
        // this state, applying it here would change nothing.
        self.append(at, Event::VcpuState { state: state.to_bytes() })
    }

    /// The pages written since the last call (a new dirty interval
    /// starts), reported to a state transfer's pre-copy too: KVM's dirty
    /// log, and the pages the network card wrote (which KVM cannot see).
    fn take_dirty(&mut self, m: &Machine, at: &mut ExitPoint, what: &'static str) -> Result<Vec<u64>, EngineError> {
        let ordinal = at.ordinal;
        let mut dirty = at.vcpu().take_dirty().map_err(|err| EngineError::Kvm { what, ordinal, err })?;
        merge_device_writes(m, &mut dirty);
        self.cleared = Instant::now();
        if let Some(t) = &self.transfers {
            t.note_dirty(&dirty);
        }
        Ok(dirty)
    }

    fn tracking(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        if self.log.is_some() && !self.tracking {
            let ordinal = at.ordinal;
            at.vcpu().set_dirty_tracking(true).map_err(|err| EngineError::Kvm { what: "start dirty-page tracking", ordinal, err })?;
            // The card writes guest memory behind KVM's back: it notes
            // those pages from now on, for `take_dirty`.
            if let Some(card) = &m.net {
                card.lock().unwrap().track_writes(true);
            }
            self.tracking = true;
            self.cleared = Instant::now();
            if let Some(t) = &self.transfers {
                t.tracking_on();
            }
        }
        Ok(())
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

    /// Tells the kicker the timer's next deadline (after every exit). Also
    /// for a backup going live: its new kicker knows no deadline until
    /// then, and a guest that computes on without exiting from where the
    /// log ended would never be kicked for its timer.
    pub fn arm_timer_kick(&self, m: &Machine) {
        if let Some(k) = &self.kicker {
            let pit = m.pit.lock().unwrap();
            k.set_due(pit.next_deadline_ns(), pit.tick_ns());
        }
    }

    /// Marks and flushes if group commit says so (always with `force`).
    fn maybe_mark(&mut self, at: &mut ExitPoint, idle: bool, force: bool) -> Result<(), EngineError> {
        let Some(mk) = &mut self.marks else { return Ok(()) };
        let now = Instant::now();
        let look = mk.gate.look(mk.commit.last_mark());
        if !force && !mk.commit.due(now, look, idle) {
            return Ok(());
        }
        let pos = at.position()?;
        self.mark_at(pos, now)?;
        self.throttle(at.ordinal);
        Ok(())
    }

    fn mark_at(&mut self, pos: replay_log::Position, now: Instant) -> Result<(), EngineError> {
        if let Some(log) = self.marks.as_ref().and_then(|mk| mk.index.as_ref()) {
            // Where the mark ends in the streamed bytes: what acks are
            // checked against (an ack beyond what was sent is refused).
            log.mark_follows(pos.ordinal);
        }
        // What the primary has put on the wire: a backup that takes over
        // sends its frames from there (`ft/held_frames.rs`).
        let frames_out = self.marks.as_ref().map_or(0, |mk| mk.gate.frames_out());
        self.append_at(pos, Event::Progress { frames_out })?;
        self.flush()?;
        self.unmarked_at = None;
        if let Some(k) = &self.kicker {
            k.set_mark_due(None);
        }
        let Some(mk) = &mut self.marks else { return Ok(()) };
        mk.commit.marked(now, pos.ordinal);
        mk.marked.store(pos.ordinal, Ordering::Relaxed);
        Ok(())
    }

    /// After an exit that left output unmarked (a mark in flight): if the
    /// guest then computes without exiting, a kick marks it after the
    /// bound, so held output is never stuck behind a busy guest.
    fn arm_mark_kick(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        let (Some(mk), Some(k)) = (&self.marks, &self.kicker) else { return Ok(()) };
        if !mk.gate.look(mk.commit.last_mark()).unmarked_output {
            return Ok(());
        }
        let due = m.clock.peek_host().saturating_add(commit::OUTPUT_BOUND.as_nanos() as u64);
        k.set_mark_due(Some(due));
        self.unmarked_at = Some(at.position()?);
        Ok(())
    }

    /// A backup that falls too far behind slows the guest down rather than
    /// letting the unacknowledged log (and held output) grow without bound,
    /// as VMware FT does. If the backup is gone, the witness drops it from
    /// the view and the gate stops waiting for it, which ends the wait.
    fn throttle(&self, ordinal: u64) {
        let Some(mk) = &self.marks else { return };
        let t0 = Instant::now();
        // A backup that joined by state transfer has everything up to the
        // snapshot; while the snapshot is still to be taken there is
        // nothing to wait for.
        let floor = self.transfers.as_ref().map_or(0, |t| t.floor());
        let look = |g: &Gate| {
            let mut l = g.look(ordinal);
            l.acked = l.acked.max(floor);
            l
        };
        while commit::too_far_behind(ordinal, look(&mk.gate)) && t0.elapsed() < commit::MAX_LAG_WAIT {
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
        let pos = if self.log.is_some() { at.position()? } else { replay_log::Position { ordinal: at.ordinal, rip: 0, exit: at.exit } };
        self.append_at(pos, event)
    }

    fn append_at(&mut self, pos: replay_log::Position, event: Event) -> Result<(), EngineError> {
        *self.by_kind.entry(event.kind_name()).or_default() += 1;
        if let Some(mk) = &mut self.marks {
            mk.commit.logged();
        }
        if let Some(w) = &mut self.log {
            w.append(&Record { pos, event }).map_err(EngineError::LogWrite)?;
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
            // Acknowledged to the typist once the backup acknowledges a
            // mark after this record: one at a later exit. (This exit may
            // already be marked and acknowledged: the guest was idle.)
            mk.gate.note_input(at.ordinal + 1, total + bytes.len() as u64);
        }
        self.hand_over(at, Event::SerialIn { bytes }, out)
    }

    /// Received frames go in as far as the card has buffers posted; the
    /// rest wait in the queue (the decision is the guest's state at this
    /// exit, and the log says which frames went in).
    fn frames(&mut self, m: &Machine, at: &mut ExitPoint, out: &mut Vec<Event>) -> Result<(), EngineError> {
        let (Some(input), Some(card)) = (&mut self.net, &m.net) else { return Ok(()) };
        input.poll();
        if input.pending() == 0 {
            return Ok(());
        }
        let room = usize::from(card.lock().unwrap().rx_buffers()).min(FRAMES_PER_EXIT);
        let frames: Vec<Vec<u8>> = std::iter::from_fn(|| input.take()).take(room).collect();
        for frame in frames {
            self.hand_over(at, Event::NetRx { frame }, out)?;
        }
        Ok(())
    }

    /// Logs the frames the guest sent at this exit (`NetTx`), before the
    /// exit's check. Also for a backup that goes live at the end of an
    /// exit whose frames the primary's log did not bring.
    pub fn log_sent(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        if let Some(card) = &m.net {
            let sent = card.lock().unwrap().take_sent();
            if self.log.is_some() {
                for (len, digest) in sent {
                    self.append(at, Event::NetTx { len, digest })?;
                }
            }
        }
        Ok(())
    }

    /// Whether a received frame could go in now.
    fn frame_ready(&self, m: &Machine) -> bool {
        match (&self.net, &m.net) {
            (Some(input), Some(card)) => input.pending() > 0 && card.lock().unwrap().can_receive(),
            _ => false,
        }
    }

    /// The idle wait: until typed bytes or a received frame arrive, or
    /// `timeout`.
    fn wait_input(&mut self, timeout: Duration) {
        let Some(net_rx) = self.net.as_ref().and_then(|n| n.receiver()).cloned() else {
            self.input.poll(Some(timeout));
            return;
        };
        let console_rx = self.input.receiver().cloned();
        let mut sel = crossbeam_channel::Select::new();
        sel.recv(&net_rx);
        if let Some(c) = &console_rx {
            sel.recv(c);
        }
        let _ = sel.ready_timeout(timeout);
        self.input.poll(None);
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
        self.tracking(m, at)?;
        if at.exit == ExitKind::Resync && self.log.is_some() && !idle {
            self.resync(m, at)?;
        }
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
            self.typed(m, at, out)?;
            return self.frames(m, at, out).map(|_| Flow::Continue);
        }
        // The guest is idle: a good moment to push the log out, and to
        // start a new dirty-page interval.
        self.maybe_mark(at, true, false)?;
        self.flush()?;
        if self.tracking && self.cleared.elapsed() >= CLEAR_EVERY {
            self.take_dirty(m, at, "clear the dirty log")?;
        }
        let deadline = m.pit.lock().unwrap().next_deadline_ns();
        let net_open = self.net.as_ref().is_some_and(|n| n.receiver().is_some() || n.pending() > 0);
        if deadline.is_none() && !self.input.open() && self.input.pending() == 0 && !net_open {
            return Err(EngineError::Stuck { ordinal: at.ordinal, rip: at.rip()? });
        }
        let now = m.clock.peek_host();
        let max_wait = if self.marks.is_some() { HEARTBEAT } else { MAX_WAIT };
        let timeout = deadline.map_or(max_wait, |d| Duration::from_nanos(d.saturating_sub(now)).min(max_wait));
        if (self.input.pending() == 0 || !m.uart.lock().unwrap().accepting_input()) && !self.frame_ready(m) {
            self.wait_input(timeout);
        }
        self.timer(m, at, true, out)?;
        self.typed(m, at, out)?;
        self.frames(m, at, out)?;
        Ok(Flow::Continue)
    }

    fn kicked(&mut self, m: &Machine) -> Result<bool, EngineError> {
        if let Some(pos) = self.unmarked_at {
            // Everything of that exit is logged: mark it now.
            self.mark_at(pos, Instant::now())?;
        }
        let due = at_deadline(m).is_some_and(|d| m.clock.peek_host() >= d);
        Ok(due || m.pic.lock().unwrap().has_interrupt())
    }

    fn observe(&mut self, m: &Machine, at: &mut ExitPoint, what: Observed) -> Result<Flow, EngineError> {
        match what {
            Observed::Injected(vector) => self.append(at, Event::Interrupt { vector })?,
            Observed::ExitDone => {
                self.log_sent(m, at)?;
                if self.log.is_some() && at.ordinal.is_multiple_of(CHECK_INTERVAL) {
                    let regs_digest = at.regs_digest()?;
                    self.append(at, Event::Check { regs_digest })?;
                }
                self.maybe_mark(at, false, false)?;
                self.arm_mark_kick(m, at)?;
                self.arm_timer_kick(m);
                if self.transfers.as_ref().is_some_and(|t| t.pending()) && m.stop.get().is_none() {
                    self.transfer(m, at)?;
                }
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
        let kicks = match &self.kicker {
            Some(k) if k.kicks() > 0 => format!(", {} kicks, {} resync pages", k.kicks(), self.resync_pages),
            _ => String::new(),
        };
        let kinds: Vec<String> = self.by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
        if self.log.is_some() {
            format!("logged {} events ({}), {} bytes{kicks}", self.events(), kinds.join(", "), self.log_bytes())
        } else {
            format!("{} inputs ({}){kicks}", self.events(), kinds.join(", "))
        }
    }
}
