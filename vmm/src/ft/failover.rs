//! The backup's inputs: replay the primary's log in lockstep, and at the
//! exact point where that log ends after a promotion, go live: from then on
//! inputs come from the host and are logged, continuing the same log.

use std::sync::{Arc, Mutex};

use replay_log::{EndReason, ExitKind};

use super::stream::ChannelSource;
use crate::console::ConsoleInput;
use crate::engine::{EngineError, Ending, ExitPoint, Flow, Inputs};
use crate::live::{Live, LogSink};
use crate::machine::Machine;
use crate::replay::Replayer;

/// What the backup needs to go live; handed over by whoever won the
/// promotion, before it closes the record channel.
pub struct Takeover {
    pub log: LogSink,
    pub input: ConsoleInput,
    pub progress: Arc<std::sync::atomic::AtomicU64>,
    pub output: Arc<super::gate::Gate>,
    /// Called once at the switch (e.g. to say so on stderr).
    pub on_live: Box<dyn FnOnce(u64) + Send>,
}

pub type TakeoverSlot = Arc<Mutex<Option<Takeover>>>;

pub struct Failover {
    replay: Replayer<ChannelSource>,
    live: Option<Live>,
    slot: TakeoverSlot,
}

impl Failover {
    pub fn new(replay: Replayer<ChannelSource>, slot: TakeoverSlot) -> Self {
        Failover { replay, live: None, slot }
    }

    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    pub fn replayed(&self) -> u64 {
        self.replay.consumed
    }

    fn go_live(&mut self, m: &Machine, ordinal: u64) -> Result<(), EngineError> {
        let Some(kit) = self.slot.lock().unwrap().take() else {
            return Err(EngineError::Diverged {
                ordinal,
                rip: 0,
                expected: "more log from the primary".into(),
                found: "the stream closed without a promotion".into(),
            });
        };
        m.clock.go_live();
        // Everything typed so far is in the log we replayed.
        kit.output.note_input(ordinal, m.uart.lock().unwrap().rx_total());
        (kit.on_live)(ordinal);
        self.live = Some(Live::new(Some(kit.log), kit.input).with_progress(kit.progress, kit.output));
        Ok(())
    }

    /// Goes live if the replayed log has ended. Blocks while the log may
    /// still grow: this is the lockstep wait.
    fn check(&mut self, m: &Machine, ordinal: u64) -> Result<(), EngineError> {
        if self.live.is_none() && self.replay.exhausted()? {
            self.go_live(m, ordinal)?;
        }
        Ok(())
    }
}

impl Inputs for Failover {
    fn boot(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        self.replay.boot(m, at)
    }

    fn before_dispatch(&mut self, m: &Machine, ordinal: u64, exit: ExitKind) -> Result<(), EngineError> {
        self.check(m, ordinal)?;
        match &mut self.live {
            Some(l) => l.before_dispatch(m, ordinal, exit),
            None => self.replay.before_dispatch(m, ordinal, exit),
        }
    }

    fn deliver(&mut self, m: &Machine, at: &mut ExitPoint, wait: bool) -> Result<Flow, EngineError> {
        self.check(m, at.ordinal)?;
        if self.live.is_none() {
            match self.replay.deliver(m, at, wait)? {
                Flow::Stop(Ending::LogIncomplete(_)) => self.go_live(m, at.ordinal)?,
                f => return Ok(f),
            }
        }
        self.live.as_mut().expect("live after the switch").deliver(m, at, wait)
    }

    fn injected(&mut self, m: &Machine, at: &mut ExitPoint, vector: u8) -> Result<(), EngineError> {
        // If the primary's record of this injection never arrived, it is
        // ours to log now.
        self.check(m, at.ordinal)?;
        match &mut self.live {
            Some(l) => l.injected(m, at, vector),
            None => self.replay.injected(m, at, vector),
        }
    }

    fn exit_done(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError> {
        self.check(m, at.ordinal)?;
        if let Some(l) = &mut self.live {
            return l.exit_done(m, at);
        }
        match self.replay.exit_done(m, at)? {
            Flow::Stop(Ending::LogIncomplete(_)) => {
                self.go_live(m, at.ordinal)?;
                Ok(Flow::Continue)
            }
            f => Ok(f),
        }
    }

    fn finish(&mut self, m: &Machine, at: &mut ExitPoint, reason: EndReason, mem_digest: &dyn Fn() -> u64) -> Result<(), EngineError> {
        self.check(m, at.ordinal)?;
        match &mut self.live {
            Some(l) => l.finish(m, at, reason, mem_digest),
            None => self.replay.finish(m, at, reason, mem_digest),
        }
    }

    fn summary(&self) -> String {
        match &self.live {
            Some(l) => format!("live after {} replayed records; {}", self.replay.consumed, l.summary()),
            None => format!("replaying: {}", self.replay.summary()),
        }
    }
}
