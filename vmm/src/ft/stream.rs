//! The log stream from primary to backup: a one-line hello that names the
//! protocol version, the view and the backup's incarnation
//! (`FTVM-LOG/2 view=N to=ADDR@ID`, `hello.rs`), the backup's `OK` or `ERR ...`, then the log
//! header (replay-log format), then either a line `SNAPSHOT <len>` and
//! `len` bytes of a snapshot of the VM taken at the end of some exit N
//! (docs/SNAPSHOT.md; state transfer, `xfer.rs`), a line `TAIL <seq> <n>`
//! and the last n bytes of console output before it (numbered from seq:
//! what the primary still held, and a tail for consoles), a line
//! `FRAMES <exit> <n>` and the n network frames the primary still held
//! (`held_frames.rs`), followed by the log's
//! records from the first one after exit N on, or a line `BOOT` followed
//! by the records from boot (a backup in the view from the start; `BOOT <n>`:
//! output was released through exit n, so the backup can take over only
//! once it holds the log that far), then a line `FROM <offset> <primary>`
//! (where in the primary's log the records start: `resume.rs`), while the
//! backup sends `ACK <ordinal>` lines back each time it
//! has received the log through that ordinal (a high-water mark record).
//! A backup that lost a stream of this primary's answers a new hello with
//! `RESUME <offset> <primary>`: the header and the records from that
//! offset follow, nothing else (`resume.rs`).
//! The connection is authenticated and encrypted (`secure.rs`); its hello
//! binds it to one view, and a new view means a new connection.
//!
//! An acknowledgement is believed only up to the last mark actually sent
//! on this connection (`LogBuf` knows where marks end): a backup that
//! acknowledges more, or sends anything but `ACK <n>`, breaks the protocol
//! and its stream is closed. Output is never released on a lie.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use replay_log::{Event, ExitKind, LogError, LogReader, LogWriter, Record};

use super::gate::Gate;
use super::key::ClusterKey;
use super::log_buf::LogBuf;
use super::resume::{self, Resume};
use super::secure::{self, SecureReader, SecureWriter};
use super::xfer::{Taken, Transfers};
use super::witness::LEASE_MARGIN;
use super::{read_line, write_line, HEARTBEAT};
use crate::recorder::LogSink;
use crate::stop::StopHandle;
use crate::replay::RecordSource;

/// Between attempts to reach the backup.
const RETRY: Duration = Duration::from_millis(100);
/// For a connection, and for the backup's answer to the hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A backup that takes no bytes for this long is gone (its acks stop too).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who the log goes to, and what the acknowledgements are checked against.
#[derive(Clone)]
pub struct Sending {
    /// Where the backup listens.
    pub addr: String,
    /// The backup as the view names it (`ADDR@ID`): the stream is for
    /// that incarnation only.
    pub to: String,
    pub view: u64,
    /// This primary as the witness knows it: a backup resumes only the
    /// log of the primary that streamed it (`resume.rs`).
    pub me: String,
    /// The gate's acknowledgement generation for this backup (a late ack
    /// of a previous backup must not count).
    pub generation: u64,
    /// The highest log offset ever sent to this backup member, by any
    /// stream of ours: a resumption may ask for no more (what it claims
    /// to hold counts as acknowledged, `resume_at`).
    pub streamed: Arc<AtomicUsize>,
    pub key: ClusterKey,
    pub log: Arc<LogBuf>,
    pub gate: Arc<Gate>,
    pub stop: Arc<AtomicBool>,
    /// Where snapshots for the backup are asked for.
    pub transfers: Arc<Transfers>,
}

/// The longest a sender waits for its snapshot (the vCPU takes it at its
/// next exit; a guest that never exits is kicked by its timer anyway).
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);
/// The largest snapshot a backup accepts: 1 TiB of memory, incompressible,
/// plus its other sections.
pub const MAX_SNAPSHOT_BYTES: u64 = (1 << 40) + (1 << 30);

/// Waits for the snapshot asked for, while the stream is wanted.
fn snapshot(s: &Sending) -> Option<Taken> {
    let t0 = std::time::Instant::now();
    match s.transfers.precopy(&s.stop) {
        Ok(n) => log::info!(
            "primary: pre-copied guest memory for backup {} in {:.1} ms ({n} MiB chunks written meanwhile)",
            s.addr,
            t0.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => log::info!("primary: no pre-copy for backup {} ({e}): all of memory is copied in the pause", s.addr),
    }
    if s.stop.load(Ordering::Relaxed) {
        return None;
    }
    let rx = s.transfers.request();
    let t0 = std::time::Instant::now();
    while !s.stop.load(Ordering::Relaxed) && t0.elapsed() < SNAPSHOT_WAIT {
        match rx.recv_timeout(HEARTBEAT) {
            Ok(Ok(t)) => return Some(t),
            Ok(Err(e)) => {
                log::warn!("primary: cannot take a snapshot for backup {}: {e}", s.addr);
                return None;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
        }
    }
    if !s.stop.load(Ordering::Relaxed) {
        log::warn!("primary: no snapshot for backup {} after {SNAPSHOT_WAIT:?}", s.addr);
    }
    None
}

/// Sends the log header, before the snapshot is taken (a stream that is
/// not a log is refused by the backup at once).
fn send_header(conn: &mut SecureWriter, guest: &replay_log::Header) -> std::io::Result<()> {
    let header = LogWriter::new(Vec::new(), guest).and_then(|w| w.into_inner()).map_err(std::io::Error::other)?;
    conn.write_all(&header)?;
    conn.flush()
}

/// Sends the snapshot frame; the records after its exit follow. Returns
/// its length.
fn send_snapshot(conn: &mut SecureWriter, t: &Taken) -> std::io::Result<usize> {
    let mut bytes = Vec::new();
    t.snapshot.write_to(&mut bytes, "snapshot for the backup").map_err(std::io::Error::other)?;
    conn.write_all(format!("SNAPSHOT {}\n", bytes.len()).as_bytes())?;
    conn.write_all(&bytes)?;
    let (seq, tail) = &t.tail;
    conn.write_all(format!("TAIL {seq} {}\n", tail.len()).as_bytes())?;
    conn.write_all(tail)?;
    t.frames.write_to(conn)?;
    conn.flush()?;
    Ok(bytes.len())
}

/// Streams the log (after a snapshot, or from boot) to the backup until
/// `stop` is set (the backup left the view); acknowledgements go to the
/// gate. A stream that breaks, or that this primary closes because its
/// lease ran out, is opened again (with a new snapshot) while the backup
/// is in the view: a joining backup is never left waiting for good.
pub fn run_sender(s: Sending) {
    let mut streams = 0u64;
    while !s.stop.load(Ordering::Relaxed) {
        if !s.gate.lease_live() {
            std::thread::sleep(HEARTBEAT);
            continue;
        }
        if streams > 0 {
            log::info!("primary: streaming to backup {} again (stream #{})", s.to, streams + 1);
        }
        streams += 1;
        stream_once(&s);
        std::thread::sleep(RETRY);
    }
}

fn stream_once(s: &Sending) {
    let Some((reader, mut conn, answer)) = open(s) else { return };
    let addr = s.addr.clone();
    log::info!("primary: streaming the log to backup {addr} (view {})", s.view);
    // Bytes of the log handed to this connection so far.
    let sent = Arc::new(AtomicUsize::new(0));
    let acks = {
        let (log, gate, stop, sent, addr, generation) = (s.log.clone(), s.gate.clone(), s.stop.clone(), sent.clone(), addr.clone(), s.generation);
        std::thread::Builder::new()
            .name("ftvm-acks".into())
            .spawn(move || read_acks(reader, &addr, &log, &sent, &gate, generation, &stop))
    };
    let Ok(acks) = acks else {
        log::error!("primary: cannot start the acknowledgement reader for backup {addr}");
        return;
    };
    let _ = conn.tcp().set_write_timeout(Some(WRITE_TIMEOUT));
    let off = match answer {
        Answer::Fresh => start(&mut conn, s, &sent),
        Answer::Resume(at) => resume_at(&mut conn, s, &sent, at),
    };
    if let Some(off) = off {
        stream_records(&mut conn, s, &sent, off);
    }
    let _ = conn.tcp().shutdown(std::net::Shutdown::Both);
    let _ = acks.join();
}

/// Sends the log header, then `BOOT` or the snapshot: returns the offset
/// in the log from which the records follow, `None` if the stream is over.
fn start(conn: &mut SecureWriter, s: &Sending, sent: &AtomicUsize) -> Option<usize> {
    let addr = &s.addr;
    if let Err(e) = send_header(conn, &s.transfers.guest) {
        log::warn!("primary: sending the log header to backup {addr} failed: {e}");
        return None;
    }
    // The log from boot is all there (the backup was in the view from the
    // start): it replays from boot, nothing to snapshot.
    if let Some(off) = s.transfers.boot_records().filter(|&off| s.log.base() <= off) {
        note_sent(s, sent, off);
        // It has nothing yet: the throttle counts from boot.
        s.transfers.taken_at(0);
        // Output released before this backup was in the view (the gate
        // waits for its acks from now on): it can take over only once it
        // holds the log through that exit.
        let released = s.gate.released_ordinal();
        return match write_line(conn, &format!("BOOT {released}")).and_then(|()| write_line(conn, &resume::from_line(off, &s.me))) {
            Ok(()) => {
                log::info!("primary: backup {addr} replays the log from boot");
                Some(off)
            }
            Err(e) => {
                log::warn!("primary: log stream to backup {addr} broke: {e}");
                None
            }
        };
    }
    let taken = snapshot(s)?;
    let off = taken.offset;
    if !transfer(conn, s, taken, sent) {
        return None;
    }
    match write_line(conn, &resume::from_line(off, &s.me)) {
        Ok(()) => Some(off),
        Err(e) => {
            log::warn!("primary: log stream to backup {addr} broke: {e}");
            None
        }
    }
}

/// Bytes of the log through `off` are handed to this stream.
fn note_sent(s: &Sending, sent: &AtomicUsize, off: usize) {
    sent.store(off, Ordering::SeqCst);
    s.streamed.fetch_max(off, Ordering::SeqCst);
}

/// The backup lost a stream of ours and holds the log through offset
/// `at`: send the header and go on from there, with no state transfer,
/// if the log is still kept from there (it is kept from the last
/// acknowledged mark, and a backup has at least what it acknowledged).
fn resume_at(conn: &mut SecureWriter, s: &Sending, sent: &AtomicUsize, at: usize) -> Option<usize> {
    let addr = &s.addr;
    let (base, high) = (s.log.base(), s.streamed.load(Ordering::SeqCst));
    if at < base || at > high {
        let why = if at > high {
            format!("cannot resume at offset {at}: this primary sent this backup its log up to offset {high} only")
        } else {
            format!("cannot resume at offset {at}: this primary keeps its log from offset {base} on only")
        };
        log::warn!("primary: backup {addr} {why}");
        // Where the header belongs: the backup stops asking to resume.
        let _ = write_line(conn, &format!("ERR {why}"));
        return None;
    }
    if let Err(e) = send_header(conn, &s.transfers.guest) {
        log::warn!("primary: sending the log header to backup {addr} failed: {e}");
        return None;
    }
    note_sent(s, sent, at);
    let mark = s.log.last_mark_within(at).unwrap_or(0);
    // It holds the log that far (a mark ending before `at`, sent on an
    // earlier stream of ours): the lag throttle counts from there, and it
    // is acknowledged, as if it had said so again (output held since the
    // lease lapsed goes out; the stall bound is that of a backup that has
    // the state, not of one joining).
    s.transfers.taken_at(mark);
    s.gate.ack_from(s.generation, mark);
    log::info!("primary: backup {addr} resumes the log at offset {at} (after exit #{mark}): no state transfer");
    Some(at)
}

/// Sends the snapshot; drops the log before it. False if the stream broke.
fn transfer(conn: &mut SecureWriter, s: &Sending, taken: Taken, sent: &AtomicUsize) -> bool {
    let addr = &s.addr;
    // Nothing before the snapshot is ever needed again.
    s.log.trim_before(taken.offset);
    note_sent(s, sent, taken.offset);
    let t0 = std::time::Instant::now();
    let started = send_snapshot(conn, &taken);
    log::info!(
        "primary: state transfer to backup {addr}: snapshot at exit #{}, {} bytes, guest paused {:.1} ms ({} MiB chunks copied in the pause), encoded and sent in {:.1} ms",
        taken.snapshot.position.ordinal,
        started.as_ref().map_or(0, |n| *n),
        taken.pause.as_secs_f64() * 1e3,
        taken.chunks_in_pause,
        t0.elapsed().as_secs_f64() * 1e3
    );
    drop(taken);
    match started {
        Ok(_) => true,
        Err(e) => {
            log::warn!("primary: sending the snapshot to backup {addr} failed: {e}");
            false
        }
    }
}

/// Streams the log's records from `off` until `stop` or a broken stream.
fn stream_records(conn: &mut SecureWriter, s: &Sending, sent: &AtomicUsize, mut off: usize) {
    let addr = &s.addr;
    while !s.stop.load(Ordering::Relaxed) {
        if s.gate.lease_gone_for(LEASE_MARGIN) {
            // The witness may promote the backup from now on (this VMM's
            // own lease ends LEASE_MARGIN earlier): closing the stream lets
            // the backup ask at once, without waiting for a witness request
            // of ours that may hang for seconds. Not earlier: a renewal a
            // little late would break the stream for nothing (it is
            // resumed once we renew, but output waits meanwhile).
            log::warn!("primary: the lease ran out; closing the log stream to backup {addr}");
            break;
        }
        let b = match s.log.read_from(off, HEARTBEAT) {
            Ok(b) => b,
            Err(base) => {
                log::warn!("primary: the log before offset {base} is gone; backup {addr} must join again");
                break;
            }
        };
        if b.is_empty() || s.stop.load(Ordering::Relaxed) {
            continue;
        }
        // (The log is dropped as the backup acknowledges it, in
        // `read_acks`, not as it is sent: a backup whose stream breaks
        // resumes from what it received.)
        // Counted before the bytes leave, so an ack can never arrive for
        // a mark the ack reader does not yet count as sent.
        off += b.len();
        note_sent(s, sent, off);
        if let Err(e) = conn.write_all(&b) {
            if !s.stop.load(Ordering::Relaxed) {
                log::warn!("primary: log stream to backup {addr} broke: {e}");
            }
            break;
        }
    }
}

/// How the backup answered the hello.
enum Answer {
    /// `OK`: it has nothing from this primary; the header and the state follow.
    Fresh,
    /// `RESUME <offset> <primary>`: it lost a stream of ours and holds our
    /// log through that offset.
    Resume(usize),
}

/// Connects and says hello, retrying (a backup still starting, a listener
/// busy with strangers) until the backup answers or leaves the view.
fn open(s: &Sending) -> Option<(SecureReader, SecureWriter, Answer)> {
    // What was said last: each retry says nothing new, a new reason is said.
    let mut said = String::new();
    while !s.stop.load(Ordering::Relaxed) {
        let tried = secure::connect(&s.addr, &s.key, CONNECT_TIMEOUT).and_then(|(mut r, mut w)| {
            write_line(&mut w, &super::hello::hello(s.view, &s.to))?;
            r.tcp().set_read_timeout(Some(CONNECT_TIMEOUT))?;
            let answer = read_line(&mut r);
            r.tcp().set_read_timeout(None)?;
            Ok((r, w, answer?))
        });
        let why = match tried {
            Ok((r, w, Some(l))) if l == "OK" => return Some((r, w, Answer::Fresh)),
            Ok((r, mut w, Some(l))) if resume::parse_resume(&l).is_some() => {
                let (at, of) = resume::parse_resume(&l).unwrap_or_default();
                if of == s.me {
                    return Some((r, w, Answer::Resume(at)));
                }
                // Where the header belongs: it stops asking to resume.
                let _ = write_line(&mut w, &format!("ERR this is primary {}, not {of}", s.me));
                format!("backup {} asks to resume the log of {of}, not this primary's; retrying while it is in the view", s.to)
            }
            // Busy with a stream it may yet refuse, not yet the member the
            // view names (joining, rejoining), or anything else: ask again
            // while it is the view's backup (the duty thread stops us when
            // it leaves the view).
            Ok((_, _, Some(l))) => format!(
                "backup {} refused the log stream ({}); retrying while it is in the view",
                s.to,
                super::hello::explain_refusal(&l)
            ),
            Ok((_, _, None)) => format!("backup {} closed the connection during the hello; retrying", s.addr),
            Err(e) => format!("cannot stream to backup {}: {e}; retrying while it is in the view", s.addr),
        };
        if why != said {
            log::warn!("primary: {why}");
            said = why;
        }
        std::thread::sleep(RETRY);
    }
    None
}

/// Reads the backup's acknowledgements until the stream ends; a lie or
/// junk closes the stream.
fn read_acks(mut r: SecureReader, addr: &str, log: &LogBuf, sent: &AtomicUsize, gate: &Gate, generation: u64, stop: &AtomicBool) {
    let violation = |r: &SecureReader, what: String| {
        log::warn!("primary: backup {addr} broke the log stream protocol: {what}; closing its stream");
        let _ = r.tcp().shutdown(std::net::Shutdown::Both);
    };
    loop {
        let line = match read_line(&mut r) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData && !stop.load(Ordering::Relaxed) => {
                return violation(&r, e.to_string())
            }
            Err(_) => return,
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(n) = line.strip_prefix("ACK ").and_then(|n| n.parse::<u64>().ok()) else {
            return violation(&r, format!("{line:?} where an ACK belongs"));
        };
        let bound = log.last_mark_within(sent.load(Ordering::SeqCst)).unwrap_or(0);
        if n > bound {
            return violation(&r, format!("it acknowledged exit #{n}, but the last high-water mark sent to it is #{bound}"));
        }
        gate.ack_from(generation, n);
        // It holds the log through that mark: a stream of ours that breaks
        // resumes after it at the earliest.
        log.trim_through_mark(n);
    }
}

/// Why the stream from the primary stopped.
#[derive(Debug)]
pub enum StreamEnd {
    /// Nothing arrived for a while; the connection is still open.
    Silent,
    /// EOF or an error: the primary (or the link) is gone.
    Lost(String),
}

/// The backup's end: decodes records, keeps them in its own log (so that,
/// once promoted, it can bring a new backup up from boot), acknowledges
/// high-water marks, and hands records to the replaying vCPU.
pub struct LogReceiver {
    pub reader: LogReader<SecureReader>,
    pub ack: SecureWriter,
    pub log: LogSink,
    /// The in-memory log `log` writes to (its marks are noted there, for
    /// the day this VMM streams it to a backup of its own).
    pub buf: Arc<LogBuf>,
    pub to_vcpu: Sender<Record>,
    pub records: u64,
    /// Set once this backup holds the log through `ready_at`: the exit of
    /// the last output released before it joined (`BOOT <n>`).
    pub ready: Arc<AtomicBool>,
    pub ready_at: u64,
    /// This backup's gate: each mark says which of the guest's frames the
    /// primary has sent (not to be sent again after a takeover).
    pub gate: Arc<Gate>,
    /// A resync's pages, held until its vCPU state arrives (`ResyncUnit`).
    pub resync: ResyncUnit,
    /// Where this backup stands in the primary's log, while a lost stream
    /// may be resumed (`resume.rs`).
    pub resume: Option<Resume>,
}

/// A resync is one unit: its pages (one or more `Pages` records) and then
/// the vCPU's state, all at one position between exits. The primary's log
/// writer sends a large pages record as soon as it is written, so a primary
/// that dies right then leaves a stream with the pages and not the state.
/// Applied alone, they would put the guest's memory at the resync's point
/// and its registers at the exit before it, and a backup going live there
/// would run the guest on from that mix (kernel state changed twice: seen
/// once in CI as a lab failover that never finished). So the receiver
/// hands a resync's pages to the vCPU only with its state; pages whose
/// state never came are never applied, and the backup goes live from the
/// exit before the resync, which nothing released depended on (output is
/// released only through marks, and a mark follows a whole exit).
/// Holds one resync's pages at most: what the primary's dirty log had.
#[derive(Default)]
pub struct ResyncUnit {
    pages: Vec<Record>,
}

impl ResyncUnit {
    /// Hands `send` what of `rec` (and of the pages held before it) goes
    /// to the vCPU now, in order; false as soon as `send` fails.
    pub fn pass(&mut self, rec: Record, mut send: impl FnMut(Record) -> bool) -> bool {
        let resync_pages = matches!(rec.event, Event::Pages { .. }) && rec.pos.exit == ExitKind::Resync;
        if resync_pages && self.pages.last().is_none_or(|p| p.pos.ordinal == rec.pos.ordinal) {
            self.pages.push(rec);
            return true;
        }
        // The state (or anything else: the replay judges a log that is
        // not as a recorder writes it) releases what was held.
        let held = std::mem::take(&mut self.pages);
        if resync_pages {
            self.pages.push(rec);
            return held.into_iter().all(send);
        }
        held.into_iter().all(&mut send) && send(rec)
    }

    /// Pages held for a state that has not arrived.
    pub fn held(&self) -> usize {
        self.pages.len()
    }
}

impl LogReceiver {
    /// Pumps records until the stream stops.
    pub fn pump(&mut self) -> StreamEnd {
        loop {
            match self.reader.next_record() {
                Ok(Some(rec)) => {
                    self.records += 1;
                    let mark = matches!(rec.event, Event::Progress { .. });
                    if let Event::Progress { frames_out } = rec.event {
                        if frames_out > rec.pos.ordinal {
                            self.resume = None;
                            return StreamEnd::Lost(format!("a mark at exit {} says frames through exit {frames_out} were sent", rec.pos.ordinal));
                        }
                        self.buf.mark_follows(rec.pos.ordinal);
                        // Before the replay gets to any of those frames:
                        // records reach the vCPU after this.
                        self.gate.frames_sent_elsewhere(frames_out);
                    }
                    if let Err(e) = self.log.append(&rec) {
                        self.resume = None;
                        return StreamEnd::Lost(format!("keeping the log: {e}"));
                    }
                    if mark {
                        if rec.pos.ordinal >= self.ready_at {
                            self.ready.store(true, Ordering::SeqCst);
                        }
                        let _ = self.log.flush();
                        // Once promoted, this VMM brings a backup of its
                        // own up by state transfer: the log kept so far is
                        // never sent.
                        self.buf.trim_before(self.buf.len());
                        let _ = write_line(&mut self.ack, &format!("ACK {}", rec.pos.ordinal));
                    }
                    let to_vcpu = &self.to_vcpu;
                    if !self.resync.pass(rec, |r| to_vcpu.send(r).is_ok()) {
                        return StreamEnd::Lost("the replaying vCPU stopped".into());
                    }
                }
                Ok(None) => return StreamEnd::Lost("the primary closed the stream".into()),
                Err(LogError::Io { err, .. })
                    if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return StreamEnd::Silent
                }
                // A link that broke may be resumed; a stream that is not a
                // log (corrupt, a protocol violation) is not.
                Err(e @ (LogError::Io { .. } | LogError::Truncated { .. })) => return StreamEnd::Lost(e.to_string()),
                Err(e) => {
                    self.resume = None;
                    return StreamEnd::Lost(e.to_string());
                }
            }
        }
    }
}

/// Records handed over by the receiver; the stream ends when the receiver
/// drops its sender (after promotion), or when this VMM is stopping.
pub struct ChannelSource {
    rx: Receiver<Record>,
    taken: u64,
    stop: StopHandle,
}

impl ChannelSource {
    pub fn new(rx: Receiver<Record>, stop: StopHandle) -> Self {
        ChannelSource { rx, taken: 0, stop }
    }
}

impl RecordSource for ChannelSource {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        if self.stop.requested().is_some() {
            return Ok(None);
        }
        crossbeam_channel::select! {
            recv(self.rx) -> r => match r {
                Ok(r) => {
                    self.taken += 1;
                    Ok(Some(r))
                }
                Err(_) => Ok(None),
            },
            recv(self.stop.wakeup()) -> _ => Ok(None),
        }
    }

    fn end_text(&self) -> String {
        format!("the primary's log stream ended after {} records", self.taken)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ft::gate::Role;
    use crate::ft::read_line;
    use std::net::TcpListener;

    /// A real authenticated connection: (the connecting side's reader and
    /// writer, the accepting side's reader and writer).
    pub(crate) fn connection() -> ((SecureReader, SecureWriter), (SecureReader, SecureWriter)) {
        let key = ClusterKey::from_bytes([9; 32]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let k2 = key.clone();
        let srv = std::thread::spawn(move || secure::accept(l.accept().unwrap().0, &k2).unwrap());
        let connected = secure::connect(&addr, &key, CONNECT_TIMEOUT).unwrap();
        (connected, srv.join().unwrap())
    }

    /// `read_acks` over a real connection: (the backup's writer, the
    /// thread reading its acks, the log, the sent counter, the gate).
    fn rig() -> (SecureWriter, std::thread::JoinHandle<()>, Arc<LogBuf>, Arc<AtomicUsize>, Arc<Gate>) {
        let ((_r, w), (r, _w)) = connection();
        let (log, sent, gate) = (LogBuf::new(), Arc::new(AtomicUsize::new(0)), Gate::new(Role::Primary { need_ack: true }));
        let t = {
            let (log, sent, gate) = (log.clone(), sent.clone(), gate.clone());
            let generation = gate.reset_acks();
            std::thread::spawn(move || read_acks(r, "backup", &log, &sent, &gate, generation, &AtomicBool::new(false)))
        };
        (w, t, log, sent, gate)
    }

    #[test]
    fn acks_count_only_up_to_the_last_mark_sent() {
        let (mut w, t, log, sent, gate) = rig();
        log.append(b"header");
        log.mark_follows(10);
        log.append(b"records, mark 10");
        log.mark_follows(20);
        log.append(b"records, mark 20");
        // Only the bytes through mark 10 went out.
        sent.store(6 + 16, Ordering::SeqCst);
        write_line(&mut w, "ACK 10").unwrap();
        let t0 = std::time::Instant::now();
        while gate.acked() < 10 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(gate.acked(), 10);
        // Mark 20 is logged but not sent: acknowledging it is a lie.
        write_line(&mut w, "ACK 20").unwrap();
        t.join().unwrap();
        assert_eq!(gate.acked(), 10, "an ack of a mark never sent counted");
    }

    /// A mark's `frames_out` reaches the backup's gate before the records
    /// before it reach the replaying vCPU: a frame the replay sends is
    /// judged by the newest mark received, never an older one.
    #[test]
    fn a_mark_tells_the_gate_what_the_primary_sent_before_the_vcpu_sees_it() {
        let ((_pr, pw), (br, bw)) = connection();
        let mut w = LogWriter::new(pw, &header()).unwrap();
        let at = |ordinal| replay_log::Position { ordinal, rip: 0x1000, exit: replay_log::ExitKind::Hlt };
        w.append(&Record { pos: at(3), event: Event::Time { ns: 1 } }).unwrap();
        w.append(&Record { pos: at(4), event: Event::Progress { frames_out: 2 } }).unwrap();
        w.append(&Record { pos: at(9), event: Event::Progress { frames_out: 7 } }).unwrap();
        w.flush().unwrap();
        // The primary is gone: the stream ends after these.
        drop((w, _pr));
        let gate = Gate::new(Role::Silent);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut recv = receiver((br, bw), gate.clone(), tx);
        let got = std::thread::scope(|sc| {
            let pump = sc.spawn(|| recv.pump());
            // Records go to the vCPU after their mark reached the gate.
            let mut seen = vec![];
            while let Ok(r) = rx.recv_timeout(Duration::from_secs(10)) {
                seen.push((r.pos.ordinal, gate.frames_out()));
                if seen.len() == 3 {
                    break;
                }
            }
            assert!(matches!(pump.join().unwrap(), StreamEnd::Lost(_)));
            seen
        });
        // (The receiver may run ahead of the vCPU: a later mark may be
        // known already, never an earlier one missing.)
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![3, 4, 9]);
        assert!(got[1].1 >= 2 && got[2].1 == 7, "{got:?}");
        // The replay sends frames of exits 5, 7 and 8: the mark at 9 says
        // the primary sent those through 7; only 8's goes out once promoted.
        gate.send_frame(5, b"x");
        gate.send_frame(7, b"y");
        gate.send_frame(8, b"z");
        gate.set_role(Role::Primary { need_ack: false });
        gate.set_lease(crate::ft::lease_clock::BootInstant::now() + Duration::from_secs(5));
        assert_eq!(gate.frame_counts(), (1, 0, 0));
        assert_eq!(gate.frames_sent_before(), 2);
    }

    pub(crate) fn header() -> replay_log::Header {
        replay_log::Header { kernel_sha256: [1; 32], initrd_sha256: None, mem_bytes: 1 << 20, cmdline: String::new(), ftvm_version: "t".into(), kernel_name: "t".into(), net_mac: None }
    }

    /// A backup's receiver on the accepting side of `connection()`.
    pub(crate) fn receiver((br, bw): (SecureReader, SecureWriter), gate: Arc<Gate>, to_vcpu: Sender<Record>) -> LogReceiver {
        let buf = LogBuf::new();
        LogReceiver {
            reader: LogReader::new(br, "stream").unwrap(),
            ack: bw,
            log: LogWriter::new(crate::ft::listener::log_buf_writer(&buf), &header()).unwrap(),
            buf,
            to_vcpu,
            records: 0,
            ready: Arc::new(AtomicBool::new(false)),
            ready_at: 0,
            gate,
            resync: ResyncUnit::default(),
            resume: None,
        }
    }

    /// A backup's receiver fed `recs` by a primary that then dies: what
    /// reaches the replaying vCPU, and how many resync pages records it
    /// held back.
    fn received(recs: &[Record]) -> (Vec<Record>, usize) {
        let ((_pr, pw), (br, bw)) = connection();
        let mut w = LogWriter::new(pw, &header()).unwrap();
        for r in recs {
            w.append(r).unwrap();
        }
        w.flush().unwrap();
        drop((w, _pr));
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut recv = receiver((br, bw), Gate::new(Role::Silent), tx);
        let mut end = recv.pump();
        while matches!(end, StreamEnd::Silent) {
            end = recv.pump();
        }
        assert!(matches!(end, StreamEnd::Lost(_)));
        assert_eq!(recv.records as usize, recs.len(), "every record was received");
        (rx.try_iter().collect(), recv.resync.held())
    }

    fn at(ordinal: u64, exit: ExitKind) -> replay_log::Position {
        replay_log::Position { ordinal, rip: 0x1000, exit }
    }

    fn pages(ordinal: u64) -> Record {
        Record { pos: at(ordinal, ExitKind::Resync), event: Event::Pages { pages: vec![(0x2000, vec![7; 4096])] } }
    }

    /// The primary died after sending a resync's pages and before its
    /// vCPU state: the pages must not be applied (memory at the resync,
    /// registers at the exit before it), so a takeover goes live from
    /// the last whole exit. Fails if the receiver passes records one by one.
    #[test]
    fn a_resync_cut_before_its_vcpu_state_never_reaches_the_vcpu() {
        let before = [
            Record { pos: at(3, ExitKind::Hlt), event: Event::Time { ns: 1 } },
            Record { pos: at(3, ExitKind::Hlt), event: Event::Progress { frames_out: 0 } },
        ];
        let mut recs = before.to_vec();
        recs.extend([pages(4), pages(4)]);
        let (got, held) = received(&recs);
        assert_eq!(got, before.to_vec(), "a resync's pages reached the vCPU without its state");
        assert_eq!(held, 2);
    }

    /// With its state, a resync goes to the vCPU whole and in order, and
    /// so does what follows; a second resync right after is its own unit.
    #[test]
    fn a_whole_resync_reaches_the_vcpu_in_order() {
        let state = |o| Record { pos: at(o, ExitKind::Resync), event: Event::VcpuState { state: vec![1; 64] } };
        let time = |o| Record { pos: at(o, ExitKind::Resync), event: Event::Time { ns: o } };
        let recs = vec![pages(4), pages(4), state(4), time(4), pages(5), state(5), pages(6)];
        let (got, held) = received(&recs);
        assert_eq!(got, recs[..6].to_vec());
        assert_eq!(held, 1, "the last resync's pages wait for its state");
    }

    /// Pages at an ordinary exit (an idle clear of the dirty log) are not
    /// a resync: they pass at once.
    #[test]
    fn pages_at_an_exit_pass_at_once() {
        let recs = vec![Record { pos: at(2, ExitKind::Hlt), event: Event::Pages { pages: vec![(0x3000, vec![1; 4096])] } }];
        assert_eq!(received(&recs), (recs, 0));
    }

    /// The primary's side of a resumption: an offset it never sent, or no
    /// longer keeps, is refused with a line the backup reads where the
    /// header belongs; one it sent is taken up, counted as acknowledged
    /// through the last mark before it, and the throttle counts from there.
    #[test]
    fn a_resumption_is_taken_only_within_what_was_sent_and_kept() {
        let log = LogBuf::new();
        log.append(b"header");
        log.mark_follows(10);
        log.append(b"records, mark 10");
        log.mark_follows(20);
        log.append(b"records, mark 20");
        let e10 = 6 + 16;
        let gate = Gate::new(Role::Primary { need_ack: true });
        let s = Sending {
            addr: "backup".into(),
            to: "b@1".into(),
            view: 2,
            me: "p@1".into(),
            generation: gate.reset_acks(),
            streamed: Arc::new(AtomicUsize::new(e10 + 5)),
            key: ClusterKey::from_bytes([9; 32]),
            log: log.clone(),
            gate: gate.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            transfers: Transfers::new(header()),
        };
        let sent = AtomicUsize::new(0);
        let refused = |at: usize, why: &str| {
            let ((_pr, mut pw), (mut br, _bw)) = connection();
            assert_eq!(resume_at(&mut pw, &s, &sent, at), None, "{at}");
            let line = read_line(&mut br).unwrap().unwrap();
            assert!(line.starts_with("ERR ") && line.contains(why), "{line}");
        };
        // Mark 20 is kept but was never sent to this backup.
        refused(log.len(), "sent this backup its log up to offset 27 only");
        assert_eq!(gate.acked(), 0, "a claim past what was sent counted");

        let ((_pr, mut pw), (br, _bw)) = connection();
        assert_eq!(resume_at(&mut pw, &s, &sent, e10 + 3), Some(e10 + 3));
        assert_eq!(LogReader::new(br, "resumed").unwrap().header(), &header());
        assert_eq!(sent.load(Ordering::SeqCst), e10 + 3);
        assert_eq!((gate.acked(), s.transfers.floor()), (10, 10));

        log.trim_before(e10 + 1);
        refused(e10, "keeps its log from offset 23 on only");
    }

    #[test]
    fn anything_but_an_ack_ends_the_stream() {
        for junk in ["ACK", "ACK -1", "ACK 18446744073709551616", "NACK 1", "hello"] {
            let (mut w, t, _log, _sent, gate) = rig();
            write_line(&mut w, junk).unwrap();
            t.join().unwrap();
            assert_eq!(gate.acked(), 0, "{junk}");
        }
        let (mut w, t, _log, _sent, _gate) = rig();
        w.write_all(&vec![b'7'; 10_000]).unwrap();
        t.join().unwrap();
    }
}
