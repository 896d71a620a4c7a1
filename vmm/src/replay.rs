//! Inputs from a log: the guest gets, at each exit, exactly what the log
//! says it got there, and every record's position, injected vector and
//! digest is checked against what this run does. The first mismatch stops
//! the run with a report.

use std::io::Read;

use replay_log::{EndReason, Event, ExitKind, LogError, LogReader, Record};


use crate::engine::{EngineError, Ending, ExitPoint, Flow, Inputs};
use crate::machine::Machine;

/// Where replay gets its records: a log file, or the stream from a primary.
pub trait RecordSource {
    /// `Ok(None)` when the log ends cleanly (or the stream was closed).
    fn next_record(&mut self) -> Result<Option<Record>, LogError>;
    /// Where a log that ended without its end record stopped.
    fn end_text(&self) -> String;
}

impl<R: Read> RecordSource for LogReader<R> {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        LogReader::next_record(self)
    }

    fn end_text(&self) -> String {
        format!(
            "{} ends after record #{} (byte offset {}) without an end record",
            self.source_name(),
            self.records_read().saturating_sub(1),
            self.offset()
        )
    }
}

enum Tail {
    /// Input ended exactly at a record boundary.
    Clean,
    /// Input ended inside a record.
    Cut(LogError),
}

pub struct Replayer<S: RecordSource> {
    reader: S,
    next: Option<Record>,
    tail: Option<Tail>,
    /// RIP the record consumed before the device access expects; checked
    /// once the access is done (RIP can't be read while KVM's exit data is
    /// borrowed).
    pre_rip: Option<(u64, Record)>,
    pub consumed: u64,
    pub checks: u64,
    pub end: Option<EndReason>,
}

fn describe(rec: &Record) -> String {
    format!("{} at {} rip {:#x}", rec.event, rec.pos.exit, rec.pos.rip)
}

impl<S: RecordSource> Replayer<S> {
    pub fn new(reader: S) -> Self {
        Replayer { reader, next: None, tail: None, pre_rip: None, consumed: 0, checks: 0, end: None }
    }

    fn peek(&mut self) -> Result<Option<&Record>, EngineError> {
        while self.next.is_none() && self.tail.is_none() {
            match self.reader.next_record() {
                // High-water marks only matter to the transport.
                Ok(Some(Record { event: Event::Progress, .. })) => {}
                Ok(Some(r)) => self.next = Some(r),
                Ok(None) => self.tail = Some(Tail::Clean),
                Err(e @ LogError::Truncated { .. }) => self.tail = Some(Tail::Cut(e)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.next.as_ref())
    }

    /// Whether the log has nothing more (blocks on a stream until it knows).
    pub fn exhausted(&mut self) -> Result<bool, EngineError> {
        Ok(self.peek()?.is_none())
    }

    /// The next record if it belongs to this exit.
    fn peek_at(&mut self, ordinal: u64) -> Result<Option<&Record>, EngineError> {
        Ok(self.peek()?.filter(|r| r.pos.ordinal == ordinal))
    }

    fn take(&mut self) -> Record {
        self.consumed += 1;
        self.next.take().expect("take after a successful peek")
    }

    /// Takes the next record, which must be at this exit, and checks that
    /// the exit is the one it was recorded at.
    fn take_checked(&mut self, at: &mut ExitPoint) -> Result<Record, EngineError> {
        let rec = self.take();
        let rip = at.rip()?;
        if rec.pos.exit != at.exit || rec.pos.rip != rip {
            return Err(at.diverged(
                describe(&rec),
                format!("is at {} rip {rip:#x}", at.exit),
            ));
        }
        Ok(rec)
    }

    /// Why the log ran out, for a run that ends before its end record.
    fn incomplete(&self, ordinal: u64) -> Ending {
        let what = match &self.tail {
            Some(Tail::Cut(e)) => e.to_string(),
            _ => self.reader.end_text(),
        };
        Ending::LogIncomplete(format!("{what}; replayed through exit #{ordinal}"))
    }

    fn check_regs(&mut self, at: &mut ExitPoint, rec: &Record, want: u64) -> Result<(), EngineError> {
        let got = at.regs_digest()?;
        if got != want {
            return Err(at.diverged(describe(rec), format!("has register digest {got:#018x}")));
        }
        self.checks += 1;
        Ok(())
    }
}

impl<S: RecordSource> Inputs for Replayer<S> {
    fn boot(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<(), EngineError> {
        match self.peek_at(0)?.cloned() {
            Some(Record { event: Event::WallClock { epoch_secs }, .. }) => {
                self.take_checked(at)?;
                m.cmos.lock().unwrap().set_wall_base(epoch_secs);
                Ok(())
            }
            Some(rec) => Err(at.diverged(describe(&rec), "expected the wall clock first".into())),
            None => Err(at.diverged("no records".into(), "needs the wall clock at boot".into())),
        }
    }

    fn before_dispatch(&mut self, m: &Machine, ordinal: u64, exit: ExitKind) -> Result<(), EngineError> {
        if let Some(rec) = self.peek_at(ordinal)? {
            if let Event::Time { ns } = rec.event {
                if rec.pos.exit == exit {
                    m.clock.set(ns);
                    let rec = self.take();
                    self.pre_rip = Some((rec.pos.rip, rec));
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, m: &Machine, at: &mut ExitPoint, wait: bool) -> Result<Flow, EngineError> {
        if let Some((want, rec)) = self.pre_rip.take() {
            let rip = at.rip()?;
            if rip != want {
                return Err(at.diverged(describe(&rec), format!("is at rip {rip:#x}")));
            }
        }
        if m.clock.missing_read() {
            let _ = at.rip()?;
            let logged = match self.peek()? {
                Some(r) => format!("no time value here (next record: {})", describe(r)),
                None => "no time value here".into(),
            };
            return Err(at.diverged(logged, "read the time (PIT or CMOS)".into()));
        }
        while let Some(rec) = self.peek_at(at.ordinal)? {
            match rec.event {
                Event::Time { .. } | Event::SerialIn { .. } => {}
                _ => break,
            }
            match self.take_checked(at)?.event {
                Event::Time { ns } => {
                    m.clock.set(ns);
                    m.pit.lock().unwrap().update();
                }
                Event::SerialIn { bytes } => m.uart.lock().unwrap().push_input(&bytes),
                _ => unreachable!(),
            }
        }
        if !wait {
            return Ok(Flow::Continue);
        }
        // Halted with nothing pending, and the log has nothing more here.
        let _ = at.rip()?;
        match self.peek()?.cloned() {
            None => Ok(Flow::Stop(self.incomplete(at.ordinal))),
            Some(rec) => Err(at.diverged(
                format!("nothing to wake the guest here (next record: {})", describe(&rec)),
                "halted with no interrupt pending".into(),
            )),
        }
    }

    fn injected(&mut self, _: &Machine, at: &mut ExitPoint, vector: u8) -> Result<(), EngineError> {
        let _ = at.rip()?;
        match self.peek_at(at.ordinal)?.cloned() {
            Some(rec @ Record { event: Event::Interrupt { .. }, .. }) => {
                let rec2 = self.take_checked(at)?;
                if rec2.event != (Event::Interrupt { vector }) {
                    return Err(at.diverged(describe(&rec), format!("injected vector {vector:#x}")));
                }
                Ok(())
            }
            Some(rec) => Err(at.diverged(describe(&rec), format!("injected vector {vector:#x}"))),
            None => match self.peek()? {
                None => Ok(()), // the log was cut right here; exit_done stops
                Some(next) => {
                    let next = describe(next);
                    Err(at.diverged(format!("no interrupt here (next record: {next})"), format!("injected vector {vector:#x}")))
                }
            },
        }
    }

    fn exit_done(&mut self, _: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError> {
        while let Some(rec) = self.peek_at(at.ordinal)?.cloned() {
            match rec.event {
                Event::Check { regs_digest } => {
                    self.take_checked(at)?;
                    self.check_regs(at, &rec, regs_digest)?;
                }
                Event::End { reason: EndReason::Interrupted, regs_digest, .. } => {
                    self.take_checked(at)?;
                    self.check_regs(at, &rec, regs_digest)?;
                    self.end = Some(EndReason::Interrupted);
                    return Ok(Flow::Stop(Ending::Interrupted));
                }
                _ => {
                    let _ = at.rip()?;
                    return Err(at.diverged(describe(&rec), "did not produce it at this exit".into()));
                }
            }
        }
        if self.peek()?.is_none() {
            return Ok(Flow::Stop(self.incomplete(at.ordinal)));
        }
        Ok(Flow::Continue)
    }

    fn finish(&mut self, _: &Machine, at: &mut ExitPoint, reason: EndReason, mem_digest: &dyn Fn() -> u64) -> Result<(), EngineError> {
        let _ = at.rip()?;
        let found = format!("stopped ({reason:?})");
        let Some(rec) = self.peek_at(at.ordinal)?.cloned() else {
            return match self.peek()?.cloned() {
                Some(next) => Err(at.diverged(format!("more to replay (next record: {})", describe(&next)), found)),
                None => Err(at.diverged("no end record".into(), found)),
            };
        };
        match rec.event {
            Event::End { reason: r, regs_digest, mem_digest: m } if r == reason => {
                self.take_checked(at)?;
                self.check_regs(at, &rec, regs_digest)?;
                let mem_digest = mem_digest();
                if m != mem_digest {
                    return Err(at.diverged(describe(&rec), format!("has memory digest {mem_digest:#018x}")));
                }
                self.end = Some(reason);
                Ok(())
            }
            _ => Err(at.diverged(describe(&rec), found)),
        }
    }

    fn summary(&self) -> String {
        format!("{} records replayed, {} digests checked", self.consumed, self.checks)
    }
}
