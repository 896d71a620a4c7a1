//! Resuming a log stream within one membership. A primary that loses its
//! lease (the witness restarted, or cut off for longer than a lease)
//! closes its stream to the backup, so that the backup may ask to take
//! over. If the witness then says the primary lives (it renewed its lease
//! after all), the primary streams again to the same backup. That backup
//! already holds the state and the log through some offset: it answers
//! the hello with `RESUME <offset> <primary>` instead of `OK`, and the
//! primary sends the log header and its records from that offset on, with
//! no state transfer. Before this, the backup refused a second stream, was
//! dropped two leases later and joined again with a state transfer; a
//! primary dying meanwhile lost the VM although the backup had held its
//! state all along (seen in CI: a witness restart, then a primary kill).
//!
//! Offsets are the primary's (bytes since its log began): the first stream
//! says where its records start (`FROM <offset> <primary>`, after the
//! snapshot or `BOOT`), and the backup counts the record bytes it took
//! from each stream. The primary keeps its log from the last mark the
//! backup acknowledged (`LogBuf::trim_through_mark`), and a backup always
//! holds at least that much, so a resumption from a live primary of the
//! same incarnation finds its offset. A backup that can no longer resume
//! (the stream ended in a protocol violation, a resumption failed) waits
//! for the witness as before.

use std::time::Duration;

use replay_log::{LogError, LogReader, FORMAT_VERSION};

use super::listener::Incoming;
use super::stream::LogReceiver;
use super::{write_line, SILENCE};

/// A resumed stream must bring its header this soon after `RESUME`: the
/// primary sends it at once, and the backup's promotion waits meanwhile.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a backup stands in its primary's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The primary whose log this is (`ADDR@ID`).
    pub primary: String,
    /// The primary's offset of the stream's first record ...
    at: u64,
    /// ... and the stream reader's offset there.
    base: u64,
}

impl Resume {
    /// The records of a stream read from `reader_offset` on are the
    /// primary's log from `at` on.
    pub fn new(primary: String, at: u64, reader_offset: u64) -> Resume {
        Resume { primary, at, base: reader_offset }
    }

    /// The primary's offset just past the last whole record, for a reader
    /// now at `reader_offset`.
    pub fn offset(&self, reader_offset: u64) -> u64 {
        self.at + reader_offset.saturating_sub(self.base)
    }
}

/// The line that says where a stream's records start in the primary's log.
pub fn from_line(at: usize, primary: &str) -> String {
    format!("FROM {at} {primary}")
}

/// `FROM <offset> <primary>`.
pub fn parse_from(line: &str) -> Option<(u64, String)> {
    parse(line, "FROM ")
}

/// `RESUME <offset> <primary>`.
pub fn parse_resume(line: &str) -> Option<(usize, String)> {
    parse(line, "RESUME ").and_then(|(at, p)| Some((usize::try_from(at).ok()?, p)))
}

fn parse(line: &str, word: &str) -> Option<(u64, String)> {
    let (at, primary) = line.strip_prefix(word)?.split_once(' ')?;
    let at = at.parse().ok()?;
    (!primary.is_empty() && !primary.contains(char::is_whitespace)).then(|| (at, primary.to_string()))
}

impl LogReceiver {
    /// Whether a new stream could take up where the last one stopped.
    pub fn can_resume(&self) -> bool {
        self.resume.is_some()
    }

    /// Takes `incoming`, a new stream's hello from the primary, in place of
    /// the lost stream: answers `RESUME`, checks the header (the same guest
    /// as before) and reads on from there. Returns the offset it resumed at.
    /// A stream that breaks first leaves it as it was (the primary tries
    /// again); a refusal, or another guest's header, ends its resumptions.
    pub fn resume(&mut self, incoming: Incoming) -> Result<u64, String> {
        let (reader, mut writer, _view) = incoming;
        let Some(r) = self.resume.clone() else {
            let _ = write_line(&mut writer, "ERR this backup cannot resume the log stream: it waits for the witness");
            return Err("nothing to resume from".into());
        };
        let at = r.offset(self.reader.offset());
        let peer = reader.tcp().peer_addr().map_or_else(|_| "primary".into(), |a| a.to_string());
        let name = format!("log stream from {peer} (resumed at offset {at})");
        write_line(&mut writer, &format!("RESUME {at} {}", r.primary)).map_err(|e| format!("{name}: {e}"))?;
        reader.tcp().set_read_timeout(Some(HEADER_TIMEOUT)).map_err(|e| format!("{name}: {e}"))?;
        let mut new = match LogReader::new(reader, &name) {
            Ok(r) => r,
            // Not a log where the header belongs: the primary's `ERR`,
            // refusing (it no longer keeps our offset). Stop asking.
            Err(e @ LogError::NotALog { .. }) => {
                self.resume = None;
                return Err(format!("the primary refused to resume ({e})"));
            }
            Err(e) => return Err(e.to_string()),
        };
        if new.version() != FORMAT_VERSION || new.header() != self.reader.header() {
            self.resume = None;
            return Err(format!("{name}: its header is not the one of the stream it resumes"));
        }
        new.get_mut().tcp().set_read_timeout(Some(SILENCE)).map_err(|e| format!("{name}: {e}"))?;
        self.resume = Some(Resume::new(r.primary, at, new.offset()));
        self.reader = new;
        self.ack = writer;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ft::gate::{Gate, Role};
    use crate::ft::listener::log_buf_writer;
    use crate::ft::log_buf::LogBuf;
    use crate::ft::read_line;
    use crate::ft::stream::tests::{connection, header, receiver};
    use crate::ft::stream::StreamEnd;
    use replay_log::{Event, ExitKind, LogWriter, Position, Record};
    use std::io::Write;

    fn pump_to_the_end(recv: &mut LogReceiver) {
        while matches!(recv.pump(), StreamEnd::Silent) {}
    }

    /// The primary's first stream breaks inside a record; its second
    /// starts where the backup asks. The replaying vCPU gets every record
    /// once, in order, and the offset asked for is a record boundary of
    /// the primary's own log.
    #[test]
    fn a_stream_cut_inside_a_record_resumes_after_the_last_whole_one() {
        let log = LogBuf::new();
        let mut w = LogWriter::new(log_buf_writer(&log), &header()).unwrap();
        let rec = |o: u64| Record { pos: Position { ordinal: o, rip: 0x1000 + o, exit: ExitKind::Hlt }, event: Event::Time { ns: o * 1000 } };
        // The log before the backup's snapshot: its stream starts after it,
        // so the primary's offsets are not the stream's.
        for o in 1..=25 {
            w.append(&rec(o)).unwrap();
        }
        w.flush().unwrap();
        let start = log.len();
        let recs: Vec<Record> = (26..=65u64).map(rec).collect();
        let mut ends = vec![];
        for r in &recs {
            w.append(r).unwrap();
            w.flush().unwrap();
            ends.push(log.len());
        }
        let bytes = log.read_from(start, Duration::ZERO).unwrap();
        let head = LogWriter::new(Vec::new(), &header()).unwrap().into_inner().unwrap();
        // Three bytes into the 18th record.
        let cut = ends[16] + 3 - start;

        let ((_pr, mut pw), (br, bw)) = connection();
        pw.write_all(&head).unwrap();
        pw.write_all(&bytes[..cut]).unwrap();
        pw.flush().unwrap();
        drop((pw, _pr));
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut recv = receiver((br, bw), Gate::new(Role::Silent), tx);
        recv.resume = Some(Resume::new("p@1".into(), start as u64, recv.reader.offset()));
        pump_to_the_end(&mut recv);
        assert!(recv.can_resume(), "a broken link can be resumed");

        // A primary that goes away before its header (killed, or it gave
        // up waiting for our answer): the next one may still resume.
        let ((mut pr1, pw1), incoming) = connection();
        let gone = std::thread::spawn(move || {
            read_line(&mut pr1).unwrap().unwrap();
            drop((pr1, pw1));
        });
        assert!(recv.resume((incoming.0, incoming.1, 2)).is_err());
        gone.join().unwrap();
        assert!(recv.can_resume(), "a primary gone before its header ended the resumptions");

        let ((mut pr2, mut pw2), incoming) = connection();
        let primary = std::thread::spawn(move || {
            let line = read_line(&mut pr2).unwrap().unwrap();
            let (at, who) = parse_resume(&line).unwrap();
            assert_eq!(who, "p@1");
            pw2.write_all(&head).unwrap();
            pw2.write_all(&log.read_from(at, Duration::ZERO).unwrap()).unwrap();
            pw2.flush().unwrap();
            at
        });
        let at = recv.resume((incoming.0, incoming.1, 2)).unwrap();
        assert_eq!(primary.join().unwrap() as u64, at);
        assert_eq!(at, ends[16] as u64, "not the end of the last whole record received");
        pump_to_the_end(&mut recv);
        let got: Vec<Record> = rx.try_iter().collect();
        assert_eq!(got, recs, "records lost or repeated across the resumption");

        // The primary refuses a later resumption (it no longer keeps the
        // offset): the backup stops asking.
        let ((mut pr3, mut pw3), incoming) = connection();
        let refuse = std::thread::spawn(move || {
            read_line(&mut pr3).unwrap().unwrap();
            write_line(&mut pw3, "ERR cannot resume at offset 1: this primary keeps its log from 9 to 10 only").unwrap();
            pw3.flush().unwrap();
        });
        assert!(recv.resume((incoming.0, incoming.1, 2)).is_err());
        refuse.join().unwrap();
        assert!(!recv.can_resume(), "a refused backup asks again");
    }

    /// A stream that ended in something that is not a log is not resumed:
    /// the backup says so and waits for the witness.
    #[test]
    fn a_receiver_that_cannot_resume_refuses_the_new_stream() {
        let ((_pr, pw), (br, bw)) = connection();
        let mut w = LogWriter::new(pw, &header()).unwrap();
        w.flush().unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let mut recv = receiver((br, bw), Gate::new(Role::Silent), tx);
        let ((mut pr2, _pw2), incoming) = connection();
        assert!(recv.resume((incoming.0, incoming.1, 2)).is_err());
        assert!(read_line(&mut pr2).unwrap().unwrap().starts_with("ERR "));
    }

    #[test]
    fn offsets_count_the_record_bytes_of_each_stream() {
        let r = Resume::new("p@1".into(), 5000, 300);
        assert_eq!(r.offset(300), 5000);
        assert_eq!(r.offset(1300), 6000);
    }

    #[test]
    fn lines_parse_strictly() {
        assert_eq!(parse_from(&from_line(42, "127.0.0.1:1@ab")), Some((42, "127.0.0.1:1@ab".into())));
        assert_eq!(parse_resume("RESUME 7 a@b"), Some((7, "a@b".into())));
        for bad in ["RESUME", "RESUME 7", "RESUME 7 ", "RESUME -1 a", "RESUME x a", "RESUME 7 a b", "OK", "FROM 7 a"] {
            assert_eq!(parse_resume(bad), None, "{bad}");
        }
    }
}
