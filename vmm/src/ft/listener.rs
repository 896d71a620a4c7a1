//! What every FT role shares: its error type, its listening socket (console
//! clients on any role, log streams on a backup) and its wind-down.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::gate::Gate;
use super::key::ClusterKey;
use super::log_buf::{LogBuf, LogBufWriter};
use super::remote_console;
use super::secure::{self, Conn, SecureReader, SecureWriter};
use super::hello;
use super::witness::WitnessError;
use super::{read_line, write_line};

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("cannot listen on {addr}: the port is in use (another ftvm, or pick another --listen)")]
    AddrInUse { addr: String },
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error(transparent)]
    Witness(#[from] WitnessError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("state transfer: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error("{what}: {err}")]
    Engine { what: &'static str, err: crate::engine::EngineError },
    #[error(transparent)]
    Log(#[from] replay_log::LogError),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("the primary runs kernel '{primary}' but this backup has '{backup}' (different sha256): start the backup with --kernel for the same guest")]
    WrongKernel { primary: String, backup: String },
    #[error("{0}")]
    Stopped(String),
}

/// A log stream offered to a backup: the connection's halves (the reader
/// may already hold the first bytes of the log) and the stream's view.
pub type Incoming = (SecureReader, SecureWriter, u64);

/// A key holder must say what it wants this soon after its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn log_buf_writer(log: &Arc<LogBuf>) -> Box<dyn std::io::Write + Send> {
    Box::new(LogBufWriter(log.clone()))
}

pub fn bind(listen: &str) -> Result<TcpListener, RoleError> {
    TcpListener::bind(listen).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AddrInUse {
            RoleError::AddrInUse { addr: listen.to_string() }
        } else {
            RoleError::Listen { addr: listen.to_string(), err }
        }
    })
}

/// Where a backup's listener hands log streams.
#[derive(Clone)]
pub struct LogStreams {
    pub tx: Sender<Incoming>,
    /// The backup's view (rule 3: older streams are refused).
    pub view: Arc<AtomicU64>,
    /// The backup's member name (`ADDR@ID`): a stream sent to another
    /// incarnation at this address is refused.
    pub me: String,
    /// A stream was handed over; the backup clears it if that stream
    /// turns out not to be a log, to take the next one.
    pub taken: Arc<AtomicBool>,
}

/// What the listener serves now. A backup that rejoins the view swaps in
/// a new membership's endpoints; the socket stays.
#[derive(Clone)]
pub struct Endpoints {
    /// This VMM's member name (`ADDR@ID`); `-` before it has one.
    pub me: String,
    pub gate: Arc<Gate>,
    pub input: Sender<Vec<u8>>,
    /// On a backup: where log streams go.
    pub logs: Option<LogStreams>,
}

pub type Route = Arc<Mutex<Endpoints>>;

/// Accepts console clients (any role) and, on a backup, log streams: key
/// holders only, at most `secure::MAX_CONNS` at once. Returns the route,
/// to swap the endpoints later.
pub fn serve_listener(l: TcpListener, key: ClusterKey, ends: Endpoints) -> Route {
    let route = Arc::new(Mutex::new(ends));
    let r = route.clone();
    let handle = move |c: Conn| {
        let ends = r.lock().unwrap_or_else(|e| e.into_inner()).clone();
        serve_conn(c, &ends.me, &ends.gate, &ends.input, ends.logs.as_ref())
    };
    let accept = move || {
        if let Err(e) = secure::serve(l, key, "ftvm", "ftvm-conn", handle) {
            log::error!("ftvm: the listener failed: {e}; no more consoles or log streams are accepted");
        }
    };
    if let Err(e) = std::thread::Builder::new().name("ftvm-listen".into()).spawn(accept) {
        log::error!("cannot start the listener thread: {e}");
    }
    route
}

/// Serves one authenticated connection by its hello line.
fn serve_conn(c: Conn, me: &str, gate: &Arc<Gate>, input: &Sender<Vec<u8>>, logs: Option<&LogStreams>) {
    let Conn { mut reader, mut writer, peer, slot: _slot } = c;
    if reader.tcp().set_read_timeout(Some(HELLO_TIMEOUT)).is_err() {
        return;
    }
    let hello = match read_line(&mut reader) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => {
            log::warn!("ftvm: no usable hello from {peer}: {e}");
            return;
        }
    };
    if reader.tcp().set_read_timeout(None).is_err() {
        return;
    }
    if let Some(rest) = hello.strip_prefix("CONSOLE from=") {
        // `to=`: the member the client found in the view; another
        // process at this address (restarted, another run) is not it.
        let (from, to) = rest.split_once(" to=").map_or((rest, None), |(f, t)| (f, Some(t)));
        let Ok(from) = from.parse() else {
            let _ = write_line(&mut writer, "ERR malformed hello");
            return;
        };
        if to.is_some_and(|t| t != me) {
            let _ = write_line(&mut writer, &format!("ERR this is {me}, not {}", to.unwrap_or("-")));
            return;
        }
        remote_console::serve(writer, reader, from, gate.clone(), input.clone());
    } else if hello::is_hello(&hello) {
        let (view, to) = match hello::parse(&hello) {
            Ok(p) => p,
            Err(why) => {
                // A primary retries every 100 ms: a reason is said again
                // only after a while.
                static SAID: Mutex<Option<(String, Instant)>> = Mutex::new(None);
                let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
                if said.as_ref().is_none_or(|(w, t)| *w != why || t.elapsed() >= Duration::from_secs(10)) {
                    *said = Some((why.clone(), Instant::now()));
                    log::warn!("backup: refused a log stream from {peer}: {why}");
                }
                drop(said);
                let _ = write_line(&mut writer, &format!("ERR {why}"));
                return;
            }
        };
        let Some(LogStreams { tx, view: my_view, me, taken }) = logs else {
            let _ = write_line(&mut writer, "ERR this VMM is not a backup");
            return;
        };
        if to != me {
            // A primary that still sees an earlier incarnation of this
            // backup (restarted, or rejoined) in its view.
            log::warn!("backup: refused a log stream for {to}: this backup is {me}");
            let _ = write_line(&mut writer, &format!("ERR this is {me}, not {to}"));
            return;
        }
        let mine = my_view.load(Ordering::Relaxed);
        if view < mine {
            // Rule 3: records of an older view are refused.
            log::warn!("backup: refused a log stream for view {view}: this backup is in view {mine}");
            let _ = write_line(&mut writer, &format!("ERR stale view {view}: the backup is in view {mine}"));
            return;
        }
        if taken.swap(true, Ordering::SeqCst) {
            let _ = write_line(&mut writer, "ERR this backup already receives a log stream");
            return;
        }
        let _ = tx.send((reader, writer, view));
    } else {
        let _ = write_line(&mut writer, "ERR unknown hello");
    }
}

/// After the guest stops: let the backup acknowledge the end, release the
/// last output, tell console clients, and tell the witness that the run
/// ended (so that it is not taken for a lost VM).
pub fn wind_down(gate: &Gate, msg: &str, witness: &mut super::witness::WitnessClient, me: &str) {
    if !gate.drain(Duration::from_secs(3)) {
        // A backup that cannot acknowledge the end (still joining, or its
        // stream broke): with the guest stopped, no exit will ever take the
        // snapshot it waits for. Give it up, as the duty thread does with a
        // backup whose acknowledgements stall, so the last output goes out.
        if let Ok(v) = witness.view() {
            if let (true, Some(b)) = (v.primary.as_deref() == Some(me), v.backup.as_deref()) {
                log::warn!("ftvm: backup {b} acknowledges nothing of the guest's end; giving it up to release the last output");
                if let Err(e) = witness.drop_backup(me, v.number, b) {
                    log::warn!("ftvm: could not give up backup {b}: {e}");
                }
            }
        }
        if !gate.drain(Duration::from_secs(7)) {
            let (_, _, frames) = gate.frame_counts();
            log::warn!("ftvm: {} bytes of output and {frames} frames were never acknowledged by the backup", gate.pending_len());
        }
    }
    let (sent, dropped, held) = gate.frame_counts();
    let before = gate.frames_sent_before();
    if sent + dropped + before > 0 || held > 0 {
        log::info!("network: {sent} frames sent, {before} replayed ones not sent again (the previous primary had), {dropped} dropped over the bound, {held} held at the end");
    }
    gate.end(msg.to_string());
    // Ended, not lost: only once everything it printed is out.
    if gate.lease_live() && gate.pending_len() == 0 {
        if let Err(e) = witness.ended(me) {
            log::warn!("ftvm: could not tell the witness that the guest ended: {e}");
        }
    }
    // Give connected consoles a moment to receive the end.
    std::thread::sleep(Duration::from_millis(300));
}
