//! The log stream from primary to backup over TCP: a one-line hello that
//! names the view (`FTVM-LOG view=N`), the backup's `OK` or `ERR ...`, then
//! the log itself in the replay-log format (header and records, exactly as
//! in a file), while the backup sends `ACK <ordinal>` lines back each time
//! it has received the log through that ordinal (a high-water mark record).

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use replay_log::{Event, LogError, LogReader, Record};

use super::gate::Gate;
use super::log_buf::LogBuf;
use super::{read_line, write_line, HEARTBEAT};
use crate::recorder::LogSink;
use crate::stop::StopHandle;
use crate::replay::RecordSource;

pub const HELLO: &str = "FTVM-LOG";

/// Streams `log` from byte 0 to the backup at `addr` until `stop` is set or
/// the connection fails; acknowledgements go to `gate`.
pub fn run_sender(addr: String, view: u64, log: Arc<LogBuf>, gate: Arc<Gate>, generation: u64, stop: Arc<AtomicBool>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match TcpStream::connect(&addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline || stop.load(Ordering::Relaxed) => {
                log::warn!("primary: cannot reach backup {addr}: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let _ = conn.set_nodelay(true);
    let mut reader = BufReader::new(conn.try_clone().expect("cloning a TCP stream"));
    if let Err(e) = write_line(&mut conn, &format!("{HELLO} view={view}")) {
        log::warn!("primary: backup {addr}: {e}");
        return;
    }
    match read_line(&mut reader) {
        Ok(Some(l)) if l == "OK" => {}
        Ok(Some(l)) => {
            log::warn!("primary: backup {addr} refused the log stream: {l}");
            return;
        }
        Ok(None) | Err(_) => {
            log::warn!("primary: backup {addr} closed the connection during the hello");
            return;
        }
    }
    log::info!("primary: streaming the log to backup {addr} (view {view})");
    let acks = {
        let gate = gate.clone();
        let stop = stop.clone();
        std::thread::Builder::new().name("ftvm-acks".into()).spawn(move || {
            while let Ok(Some(line)) = read_line(&mut reader) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(n) = line.strip_prefix("ACK ").and_then(|n| n.parse().ok()) {
                    gate.ack_from(generation, n);
                }
            }
        })
    };
    let Ok(acks) = acks else {
        log::error!("primary: cannot start the acknowledgement reader for backup {addr}");
        return;
    };
    let mut off = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let b = log.read_from(off, HEARTBEAT);
        if b.is_empty() {
            continue;
        }
        if let Err(e) = conn.write_all(&b) {
            log::warn!("primary: log stream to backup {addr} broke: {e}");
            break;
        }
        off += b.len();
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let _ = acks.join();
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
    pub reader: LogReader<BufReader<TcpStream>>,
    pub ack: TcpStream,
    pub log: LogSink,
    pub to_vcpu: Sender<Record>,
    pub records: u64,
}

impl LogReceiver {
    /// Pumps records until the stream stops.
    pub fn pump(&mut self) -> StreamEnd {
        loop {
            match self.reader.next_record() {
                Ok(Some(rec)) => {
                    self.records += 1;
                    if let Err(e) = self.log.append(&rec) {
                        return StreamEnd::Lost(format!("keeping the log: {e}"));
                    }
                    if let Event::Progress = rec.event {
                        let _ = self.log.flush();
                        let _ = write_line(&mut self.ack, &format!("ACK {}", rec.pos.ordinal));
                    }
                    if self.to_vcpu.send(rec).is_err() {
                        return StreamEnd::Lost("the replaying vCPU stopped".into());
                    }
                }
                Ok(None) => return StreamEnd::Lost("the primary closed the stream".into()),
                Err(LogError::Io { err, .. })
                    if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return StreamEnd::Silent
                }
                Err(e) => return StreamEnd::Lost(e.to_string()),
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
