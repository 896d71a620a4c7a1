//! Summaries for `ftvm log stats`.

use std::collections::BTreeMap;
use std::io::Read;

use crate::{Event, LogError, LogReader, Record};

/// `bytes` counts record frames only; `header_bytes` the header; their sum
/// ([`LogStats::total_bytes`]) is the length of the readable log.
#[derive(Debug, Default, Clone)]
pub struct LogStats {
    pub records: u64,
    pub bytes: u64,
    pub header_bytes: u64,
    /// Keyed by [`Event::kind_name`]: (record count, encoded bytes).
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Ordinal of the last record seen.
    pub last_ordinal: u64,
    /// Largest `Event::Time` ns seen: how much guest time the log covers.
    pub guest_ns: Option<u64>,
    /// An `End` record was seen, so the run finished rather than being cut.
    pub ended: bool,
}

impl LogStats {
    pub fn add(&mut self, rec: &Record, encoded_len: u64) {
        self.records += 1;
        self.bytes += encoded_len;
        let entry = self.by_kind.entry(rec.event.kind_name()).or_default();
        entry.0 += 1;
        entry.1 += encoded_len;
        self.last_ordinal = rec.pos.ordinal;
        match rec.event {
            Event::Time { ns } => {
                self.guest_ns = Some(self.guest_ns.map_or(ns, |old| old.max(ns)));
            }
            Event::End { .. } => self.ended = true,
            _ => {}
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.header_bytes + self.bytes
    }
}

/// Reads to the end. A damaged or cut tail doesn't discard what was
/// readable before it: the stats cover the good prefix and the error that
/// stopped reading comes back beside them.
pub fn stats<R: Read>(mut reader: LogReader<R>) -> (LogStats, Option<LogError>) {
    let mut s = LogStats {
        header_bytes: reader.offset(),
        ..LogStats::default()
    };
    loop {
        let before = reader.offset();
        match reader.next_record() {
            Ok(Some(rec)) => s.add(&rec, reader.offset() - before),
            Ok(None) => return (s, None),
            Err(e) => return (s, Some(e)),
        }
    }
}
