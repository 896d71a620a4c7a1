//! The backup's inputs: replay the primary's log in lockstep, and at the
//! exact point where that log ends after a promotion, go live: from then on
//! inputs come from the host and are logged, continuing the same log.

use std::sync::{Arc, Mutex};

use replay_log::{Event, ExitKind};

use super::stream::ChannelSource;
use crate::console_io::ConsoleInput;
use crate::engine::{EngineError, Ending, ExitPoint, Flow, Inputs, Observed};
use crate::machine::Machine;
use crate::net::tap::NetInput;
use crate::recorder::{LogSink, Recorder};
use crate::replay::Replayer;
use crate::stop::StopHandle;

/// What the backup needs to go live; handed over by whoever won the
/// promotion, before it closes the record channel.
pub struct Takeover {
    pub log: LogSink,
    pub input: ConsoleInput,
    /// Ordinal of the last high-water mark (for status reports).
    pub marked: Arc<std::sync::atomic::AtomicU64>,
    pub gate: Arc<super::gate::Gate>,
    /// The in-memory log `log` writes to (its marks are noted there).
    pub buf: Arc<super::log_buf::LogBuf>,
    /// Snapshots for a backup of its own (state transfer).
    pub transfers: Arc<super::xfer::Transfers>,
    /// Called once at the switch (e.g. to say so on stderr).
    pub on_live: Box<dyn FnOnce(u64) + Send>,
}

pub type TakeoverSlot = Arc<Mutex<Option<Takeover>>>;

pub struct BackupInputs {
    replay: Replayer<ChannelSource>,
    live: Option<Recorder>,
    slot: TakeoverSlot,
    stop: StopHandle,
    /// The tap's frames and the guest's command line (for its address),
    /// for going live with the network card.
    net: Option<(NetInput, String)>,
}

impl BackupInputs {
    pub fn new(replay: Replayer<ChannelSource>, slot: TakeoverSlot, stop: StopHandle) -> Self {
        BackupInputs { replay, live: None, slot, stop, net: None }
    }

    /// Frames from this backup's tap once it is live (`ft::net::go_live`).
    pub fn with_net(mut self, input: NetInput, cmdline: String) -> Self {
        self.net = Some((input, cmdline));
        self
    }

    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// Switches to live inputs at `ordinal`; `Stop` if the stream ended
    /// because this VMM is stopping rather than because of a promotion.
    fn go_live(&mut self, m: &Machine, ordinal: u64) -> Result<Flow, EngineError> {
        let Some(kit) = self.slot.lock().unwrap().take() else {
            if let Some(e) = self.stop.requested() {
                return Ok(Flow::Stop(e));
            }
            return Err(EngineError::Diverged {
                ordinal,
                rip: 0,
                expected: "more log from the primary".into(),
                found: "the stream closed without a promotion".into(),
            });
        };
        m.clock.go_live();
        kit.gate.frames_live();
        // Everything typed so far is in the log we replayed.
        kit.gate.note_input(ordinal, m.uart.lock().unwrap().rx_total());
        (kit.on_live)(ordinal);
        let net = self.net.take().map(|(mut input, cmdline)| {
            super::net::go_live(&mut input, m, &kit.gate, ordinal, &cmdline);
            input
        });
        let mut live = Recorder::new(Some(kit.log), kit.input)
            .with_marks(kit.marked, kit.gate)
            .with_mark_index(kit.buf)
            .with_transfers(kit.transfers)
            .with_kicks(self.stop.clone(), m.clock.clone());
        if let Some(input) = net {
            live = live.with_net(input);
        }
        live.arm_timer_kick(m);
        self.live = Some(live);
        Ok(Flow::Continue)
    }

    /// Goes live if the replayed log has ended. Blocks while the log may
    /// still grow: this is the lockstep wait.
    fn check(&mut self, m: &Machine, ordinal: u64) -> Result<Flow, EngineError> {
        if self.live.is_none() && self.replay.exhausted()? {
            return self.go_live(m, ordinal);
        }
        Ok(Flow::Continue)
    }
}

impl Inputs for BackupInputs {
    fn before_access(&mut self, m: &Machine, ordinal: u64, exit: ExitKind) -> Result<Option<Event>, EngineError> {
        if let Flow::Stop(_) = self.check(m, ordinal)? {
            return Ok(None); // arrivals reports the stop
        }
        match &mut self.live {
            Some(l) => l.before_access(m, ordinal, exit),
            None => self.replay.before_access(m, ordinal, exit),
        }
    }

    fn arrivals(&mut self, m: &Machine, at: &mut ExitPoint, idle: bool, out: &mut Vec<Event>) -> Result<Flow, EngineError> {
        if let Flow::Stop(e) = self.check(m, at.ordinal)? {
            return Ok(Flow::Stop(e));
        }
        if self.live.is_none() {
            match self.replay.arrivals(m, at, idle, out)? {
                Flow::Stop(Ending::LogIncomplete(_)) => {
                    if let Flow::Stop(e) = self.go_live(m, at.ordinal)? {
                        return Ok(Flow::Stop(e));
                    }
                }
                f => return Ok(f),
            }
        }
        self.live.as_mut().expect("live after the switch").arrivals(m, at, idle, out)
    }

    fn observe(&mut self, m: &Machine, at: &mut ExitPoint, what: Observed) -> Result<Flow, EngineError> {
        // If the primary's record of what happened here never arrived
        // (an injection, the end), it is ours to log now.
        if let Flow::Stop(e) = self.check(m, at.ordinal)? {
            return Ok(Flow::Stop(e));
        }
        if let Some(l) = &mut self.live {
            return l.observe(m, at, what);
        }
        let done = matches!(what, Observed::ExitDone);
        match self.replay.observe(m, at, what)? {
            Flow::Stop(Ending::LogIncomplete(_)) if done => {
                let flow = self.go_live(m, at.ordinal)?;
                // Frames sent at this exit that the primary's log did not
                // bring: ours to log now.
                if let Some(l) = &mut self.live {
                    l.log_sent(m, at)?;
                }
                Ok(flow)
            }
            f => Ok(f),
        }
    }

    fn kicked(&mut self, m: &Machine) -> Result<bool, EngineError> {
        self.live.as_mut().map_or(Ok(false), |l| l.kicked(m))
    }

    fn resync_next(&mut self, m: &Machine, ordinal: u64) -> Result<bool, EngineError> {
        // Blocks until the primary's log says what comes next (lockstep).
        // At its end, go live before the guest runs on: a guest that then
        // computes without exiting must already have the live kicker.
        if let Flow::Stop(_) = self.check(m, ordinal - 1)? {
            return Ok(false); // the stop request ends the loop
        }
        match &mut self.live {
            Some(_) => Ok(false),
            None => self.replay.resync_next(m, ordinal),
        }
    }

    fn summary(&self) -> String {
        match &self.live {
            Some(l) => format!("live after {} replayed records; {}", self.replay.consumed, l.summary()),
            None => format!("replaying: {}", self.replay.summary()),
        }
    }
}
