//! What every FT role shares: its error type, its listening socket (console
//! clients on any role, log streams on a backup) and its wind-down.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::gate::Gate;
use super::log_buf::{LogBuf, LogBufWriter};
use super::remote_console;
use super::stream::HELLO;
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

/// A log stream offered to a backup: the connection and its reader, which
/// may already hold the first bytes of the log, and the stream's view.
pub type Incoming = (TcpStream, BufReader<TcpStream>, u64);

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

/// Accepts console clients (any role) and, on a backup, log streams.
pub fn serve_listener(
    l: TcpListener,
    gate: Arc<Gate>,
    input: Sender<Vec<u8>>,
    logs: Option<(Sender<Incoming>, Arc<AtomicU64>)>,
) {
    let accept = move || {
        let taken = Arc::new(AtomicBool::new(false));
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            let gate = gate.clone();
            let input = input.clone();
            let logs = logs.clone();
            let taken = taken.clone();
            let serve = move || {
                let Ok(clone) = conn.try_clone() else { return };
                let mut r = BufReader::new(clone);
                let Ok(Some(hello)) = read_line(&mut r) else { return };
                if let Some(from) = hello.strip_prefix("CONSOLE from=") {
                    let from = from.parse().unwrap_or(0);
                    remote_console::serve(conn, r, from, gate, input);
                } else if let Some(v) = hello.strip_prefix(&format!("{HELLO} view=")) {
                    let view: u64 = v.parse().unwrap_or(0);
                    let Some((tx, my_view)) = logs else {
                        let _ = write_line(&mut conn, "ERR this VMM is not a backup");
                        return;
                    };
                    let mine = my_view.load(Ordering::Relaxed);
                    if view < mine {
                        // Rule 3: records of an older view are refused.
                        log::warn!("backup: refused a log stream for view {view}: this backup is in view {mine}");
                        let _ = write_line(&mut conn, &format!("ERR stale view {view}: the backup is in view {mine}"));
                        return;
                    }
                    if taken.swap(true, Ordering::SeqCst) {
                        let _ = write_line(&mut conn, "ERR this backup already receives a log stream");
                        return;
                    }
                    let _ = tx.send((conn, r, view));
                } else {
                    let _ = write_line(&mut conn, "ERR unknown hello");
                }
            };
            if let Err(e) = std::thread::Builder::new().name("ftvm-conn".into()).spawn(serve) {
                log::warn!("cannot serve a connection: {e}");
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("ftvm-listen".into()).spawn(accept) {
        log::error!("cannot start the listener thread: {e}");
    }
}

/// After the guest stops: let the backup acknowledge the end, release the
/// last output, and tell console clients.
pub fn wind_down(gate: &Gate, msg: &str) {
    if !gate.drain(Duration::from_secs(10)) {
        log::warn!("ftvm: {} bytes of output were never acknowledged by the backup", gate.pending_len());
    }
    gate.end(msg.to_string());
    // Give connected consoles a moment to receive the end.
    std::thread::sleep(Duration::from_millis(300));
}
