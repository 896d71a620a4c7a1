//! Inputs from a log: the guest gets, at each exit, exactly what the log
//! says it got there, and every record's position, injected vector and
//! digest is checked against what this run does. The first mismatch stops
//! the run with a report.

use std::io::Read;

use replay_log::{EndReason, Event, ExitKind, LogError, LogReader, Position, Record};

use crate::engine::{EngineError, Ending, ExitPoint, Flow, Inputs, Observed};
use crate::machine::Machine;

/// Where replay gets its records: a log file, or the stream from a primary.
pub trait RecordSource {
    /// `Ok(None)` when the log ends cleanly (or the stream was closed).
    fn next_record(&mut self) -> Result<Option<Record>, LogError>;
    /// Where a log that ended without its end record stopped.
    fn end_text(&self) -> String;
    /// The end record was replayed: a file must stop there.
    fn after_end(&mut self) -> Result<(), LogError> {
        Ok(())
    }
}

impl<R: Read> RecordSource for LogReader<R> {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        LogReader::next_record(self)
    }

    fn after_end(&mut self) -> Result<(), LogError> {
        // With `end_is_final` (how `ftvm replay` opens logs), anything
        // after the end record is an error here.
        LogReader::next_record(self).map(|_| ())
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
    /// Resuming from a snapshot taken at this position: records up to it
    /// are skipped (those at it must match it).
    skip: Option<Position>,
    /// The last record skipped, for a log that ends before the snapshot.
    skipped_to: Option<u64>,
    next: Option<Record>,
    tail: Option<Tail>,
    /// RIP the record consumed before the device access expects; checked
    /// once the access is done (RIP can't be read while KVM's exit data is
    /// borrowed).
    pre_rip: Option<(u64, Record)>,
    pub consumed: u64,
    pub checks: u64,
    /// Transmitted frames compared with the log's `NetTx` records.
    pub frames: u64,
    pub end: Option<EndReason>,
}

fn describe(rec: &Record) -> String {
    format!("{} at {} rip {:#x}", rec.event, rec.pos.exit, rec.pos.rip)
}

impl<S: RecordSource> Replayer<S> {
    pub fn new(reader: S) -> Self {
        Replayer { reader, skip: None, skipped_to: None, next: None, tail: None, pre_rip: None, consumed: 0, checks: 0, frames: 0, end: None }
    }

    /// Replays the part of the log after `pos`, for a VM restored from a
    /// snapshot taken there (`engine::run_from`): the records before it are
    /// skipped; those at it must be at the snapshot's exit kind and RIP, or
    /// the log is not the one the snapshot was taken from (a divergence).
    /// A log that ends before `pos` is a divergence too.
    pub fn resume_after(mut self, pos: Position) -> Self {
        self.skip = Some(pos);
        self
    }

    fn peek(&mut self) -> Result<Option<&Record>, EngineError> {
        while self.next.is_none() && self.tail.is_none() {
            match self.reader.next_record() {
                // High-water marks only matter to the transport.
                Ok(Some(Record { event: Event::Progress { .. }, .. })) => {}
                Ok(Some(r)) if self.skip.is_some_and(|p| r.pos.ordinal <= p.ordinal) => self.skip_one(&r)?,
                Ok(Some(r)) => {
                    self.skip = None;
                    self.next = Some(r);
                }
                Ok(None) => self.tail = Some(Tail::Clean),
                Err(e @ LogError::Truncated { .. }) => self.tail = Some(Tail::Cut(e)),
                Err(e) => return Err(e.into()),
            }
        }
        // A log that provably ends before the snapshot's exit is not the
        // one it was taken from. (One that reaches it and stops there, or a
        // stream that closes before sending anything, just ends.)
        if let (Some(p), None, Some(last)) = (self.skip, &self.next, self.skipped_to) {
            if last < p.ordinal {
                return Err(EngineError::Diverged {
                    ordinal: p.ordinal,
                    rip: p.rip,
                    expected: format!("its last record at exit #{last}"),
                    found: format!("resumes from a snapshot taken at exit #{}", p.ordinal),
                });
            }
        }
        Ok(self.next.as_ref())
    }

    /// A record at or before the snapshot's position: not replayed, but
    /// one at the snapshot's exit must have been logged there.
    fn skip_one(&mut self, r: &Record) -> Result<(), EngineError> {
        let Some(p) = self.skip else { return Ok(()) };
        if r.pos.ordinal == p.ordinal && (r.pos.exit != p.exit || r.pos.rip != p.rip) {
            return Err(EngineError::Diverged {
                ordinal: p.ordinal,
                rip: p.rip,
                expected: describe(r),
                found: format!("resumes from a snapshot taken at {} rip {:#x}", p.exit, p.rip),
            });
        }
        self.skipped_to = Some(r.pos.ordinal);
        Ok(())
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
        if at.exit == ExitKind::Resync && rec.pos.exit == ExitKind::Resync {
            // The vCPU is still where the last exit left it until the
            // logged state is applied; RIP is checked from then on (the
            // interrupt and digest records here).
            return Ok(rec);
        }
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

impl<S: RecordSource> Replayer<S> {
    /// Takes the input records logged at this exit, checking each.
    fn inputs_here(&mut self, at: &mut ExitPoint, out: &mut Vec<Event>) -> Result<(), EngineError> {
        while let Some(rec) = self.peek_at(at.ordinal)? {
            if !rec.event.is_input() {
                break;
            }
            if matches!(rec.event, Event::WallClock { .. }) && at.ordinal != 0 {
                let rec = rec.clone();
                return Err(at.diverged(describe(&rec), "takes the wall clock only at boot".into()));
            }
            out.push(self.take_checked(at)?.event);
        }
        Ok(())
    }

    fn check_injection(&mut self, at: &mut ExitPoint, vector: u8) -> Result<Flow, EngineError> {
        let found = format!("injected vector {vector:#x}");
        match self.peek_at(at.ordinal)?.cloned() {
            Some(rec @ Record { event: Event::Interrupt { .. }, .. }) => {
                if self.take_checked(at)?.event != (Event::Interrupt { vector }) {
                    return Err(at.diverged(describe(&rec), found));
                }
                Ok(Flow::Continue)
            }
            Some(rec) => Err(at.diverged(describe(&rec), found)),
            None => match self.peek()?.map(describe) {
                None => Ok(Flow::Continue), // the log was cut right here; ExitDone stops
                Some(next) => Err(at.diverged(format!("no interrupt here (next record: {next})"), found)),
            },
        }
    }

    fn exit_done(&mut self, m: &Machine, at: &mut ExitPoint) -> Result<Flow, EngineError> {
        // Frames the guest sent at this exit, compared with those logged.
        let mut sent: std::collections::VecDeque<(u32, u64)> = m.net.as_ref().map(|c| c.lock().unwrap().take_sent().into()).unwrap_or_default();
        while let Some(rec) = self.peek_at(at.ordinal)?.cloned() {
            match rec.event {
                Event::NetTx { len, digest } => {
                    self.take_checked(at)?;
                    match sent.pop_front() {
                        Some(f) if f == (len, digest) => self.frames += 1,
                        Some((l, d)) => return Err(at.diverged(describe(&rec), format!("transmitted a {l}-byte frame with digest {d:#018x}"))),
                        None => return Err(at.diverged(describe(&rec), "transmitted no (more) frames here".into())),
                    }
                }
                Event::Check { regs_digest } => {
                    self.take_checked(at)?;
                    self.check_regs(at, &rec, regs_digest)?;
                }
                Event::End { reason: EndReason::Interrupted, regs_digest, .. } => {
                    self.take_checked(at)?;
                    self.check_regs(at, &rec, regs_digest)?;
                    self.reader.after_end()?;
                    self.end = Some(EndReason::Interrupted);
                    return Ok(Flow::Stop(Ending::Interrupted));
                }
                _ => return Err(at.diverged(describe(&rec), "did not produce it at this exit".into())),
            }
        }
        if let Some(&(l, d)) = sent.front() {
            if self.peek()?.is_none() {
                // The log ends here: the frames are for whoever continues
                // it (a backup going live) to log.
                if let Some(card) = &m.net {
                    card.lock().unwrap().put_back_sent(sent.into());
                }
            } else {
                return Err(at.diverged("no (more) frames transmitted here".into(), format!("transmitted a {l}-byte frame with digest {d:#018x}")));
            }
        }
        if self.peek()?.is_none() {
            return Ok(Flow::Stop(self.incomplete(at.ordinal)));
        }
        Ok(Flow::Continue)
    }

    fn check_end(&mut self, at: &mut ExitPoint, reason: EndReason, mem_digest: &dyn Fn() -> u64) -> Result<Flow, EngineError> {
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
                self.reader.after_end()?;
                Ok(Flow::Continue)
            }
            _ => Err(at.diverged(describe(&rec), found)),
        }
    }
}

impl<S: RecordSource> Inputs for Replayer<S> {
    fn before_access(&mut self, _: &Machine, ordinal: u64, exit: ExitKind) -> Result<Option<Event>, EngineError> {
        // The time a device reads during this access; its RIP is checked
        // once the access is done.
        if let Some(rec) = self.peek_at(ordinal)? {
            if matches!(rec.event, Event::Time { .. }) && rec.pos.exit == exit {
                let rec = self.take();
                self.pre_rip = Some((rec.pos.rip, rec.clone()));
                return Ok(Some(rec.event));
            }
        }
        Ok(None)
    }

    fn arrivals(&mut self, m: &Machine, at: &mut ExitPoint, idle: bool, out: &mut Vec<Event>) -> Result<Flow, EngineError> {
        if at.ordinal == 0 {
            match self.peek_at(0)?.cloned() {
                Some(Record { event: Event::WallClock { .. }, .. }) => {}
                Some(rec) => return Err(at.diverged(describe(&rec), "expected the wall clock first".into())),
                None => return Err(at.diverged("no records".into(), "needs the wall clock at boot".into())),
            }
        }
        if let Some((want, rec)) = self.pre_rip.take() {
            let rip = at.rip()?;
            if rip != want {
                return Err(at.diverged(describe(&rec), format!("is at rip {rip:#x}")));
            }
        }
        if m.clock.missing_read() {
            let logged = match self.peek()? {
                Some(r) => format!("no time value here (next record: {})", describe(r)),
                None => "no time value here".into(),
            };
            return Err(at.diverged(logged, "read the time (PIT or CMOS)".into()));
        }
        self.inputs_here(at, out)?;
        if !idle || !out.is_empty() {
            return Ok(Flow::Continue);
        }
        // Halted with nothing pending, and the log has nothing more here.
        match self.peek()?.cloned() {
            None => Ok(Flow::Stop(self.incomplete(at.ordinal))),
            Some(rec) => Err(at.diverged(
                format!("nothing to wake the guest here (next record: {})", describe(&rec)),
                "halted with no interrupt pending".into(),
            )),
        }
    }

    fn observe(&mut self, m: &Machine, at: &mut ExitPoint, what: Observed) -> Result<Flow, EngineError> {
        match what {
            Observed::Injected(vector) => self.check_injection(at, vector),
            Observed::ExitDone => self.exit_done(m, at),
            // SIGINT while replaying: nothing to check.
            Observed::End { reason: EndReason::Interrupted, .. } => Ok(Flow::Continue),
            Observed::End { reason, mem_digest } => self.check_end(at, reason, mem_digest),
        }
    }

    fn resync_next(&mut self, _: &Machine, ordinal: u64) -> Result<bool, EngineError> {
        Ok(self.peek()?.is_some_and(|r| r.pos.ordinal == ordinal && r.pos.exit == ExitKind::Resync))
    }

    fn summary(&self) -> String {
        let frames = if self.frames > 0 { format!(", {} transmitted frames compared", self.frames) } else { String::new() };
        format!("{} records replayed, {} digests checked{frames}", self.consumed, self.checks)
    }
}
