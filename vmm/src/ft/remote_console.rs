//! The guest console over TCP, for fault tolerance. A client connects to
//! whichever VMM is primary, says where it is in the stream
//! (`CONSOLE from=<seq>`), and gets `DATA <seq> <len>` frames, then `END
//! <message>` when the guest is gone. Bytes it sends are typed input.
//! After a failover the client reconnects to the new primary and drops
//! bytes it already has, by sequence number. The connection is
//! authenticated and encrypted with the cluster key (`secure.rs`).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;

use super::gate::{Gate, Next, Role};
use super::key::ClusterKey;
use super::read_line;
use super::secure::{self, SecureReader, SecureWriter};
use super::witness::{addr_of, WitnessAt, WitnessClient};

/// Most bytes in one `DATA` frame: the server sends a backlog in pieces,
/// and the client refuses a larger length rather than allocate it.
pub const MAX_DATA: usize = 64 * 1024;
/// A client that takes no output for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one console client (server side, on any VMM: a backup's gate
/// releases nothing until it is promoted). Returns when the client leaves
/// or the guest has ended; the input thread ends with it.
pub fn serve(mut conn: SecureWriter, reader: SecureReader, from: u64, gate: Arc<Gate>, input: Sender<Vec<u8>>) {
    let gone = Arc::new(AtomicBool::new(false));
    let tcp = conn.tcp().try_clone();
    let _ = conn.tcp().set_write_timeout(Some(WRITE_TIMEOUT));
    {
        let (gate, gone) = (gate.clone(), gone.clone());
        let mut reader = reader;
        let spawned = std::thread::Builder::new().name("ftvm-console-input".into()).spawn(move || {
            let mut buf = [0u8; 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        // Rule 4: only a primary with a live lease takes input.
                        if matches!(gate.role(), Role::Primary { .. }) && gate.lease_live() {
                            let _ = input.send(buf[..n].to_vec());
                        }
                    }
                }
            }
            gone.store(true, Ordering::Relaxed);
        });
        if spawned.is_err() {
            return;
        }
    }
    serve_output(&mut conn, from, &gate, &gone);
    // Ends the input thread's read, however the client behaves.
    if let Ok(t) = tcp {
        let _ = t.shutdown(std::net::Shutdown::Both);
    }
}

fn serve_output(conn: &mut SecureWriter, from: u64, gate: &Gate, gone: &AtomicBool) {
    let mut from = from;
    // Where the client must resume its typing: input past this point is not
    // in the log, and the client sends it again.
    let mut inacked = gate.input_acked();
    if conn.write_all(format!("INPUT {inacked}\n").as_bytes()).is_err() {
        return;
    }
    while !gone.load(Ordering::Relaxed) {
        let n = gate.input_acked();
        if n != inacked {
            inacked = n;
            if conn.write_all(format!("INACK {n}\n").as_bytes()).is_err() {
                return;
            }
        }
        match gate.next(from, MAX_DATA, Duration::from_millis(50)) {
            Next::Data { seq, bytes } => {
                let mut frame = format!("DATA {seq} {}\n", bytes.len()).into_bytes();
                frame.extend_from_slice(&bytes);
                if conn.write_all(&frame).is_err() {
                    return;
                }
                from = seq + bytes.len() as u64;
            }
            Next::End(msg) => {
                let _ = conn.write_all(format!("END {msg}\n").as_bytes());
                return;
            }
            Next::HangUp => return,
            Next::Nothing => {}
        }
    }
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// `ftvm console`: follows the primary through failovers. Returns when the
/// guest has ended, or errors after `give_up` without a primary, or when a
/// primary breaks the protocol.
pub fn run_client(witness: &WitnessAt, key: &ClusterKey, give_up: Duration) -> anyhow::Result<i32> {
    let mut w = WitnessClient::new(witness, key);
    let typed = Arc::new(Mutex::new(Typed::default()));
    {
        let typed = typed.clone();
        let _ = std::thread::Builder::new().name("ftvm-console-stdin".into()).spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 1024];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                typed.lock().unwrap().send(&buf[..n]);
            }
        });
    }
    let mut next_seq = 0u64;
    let mut last_primary: Option<String> = None;
    // The run (one VM's life) this console shows; never another's.
    let mut my_run: Option<String> = None;
    let mut said_lost = false;
    let mut lost_at = Instant::now();
    let mut out = std::io::stdout();
    // The address last warned about for refusing our key.
    let mut warned_key: Option<String> = None;
    loop {
        let view = match w.view() {
            Ok(v) => v,
            Err(e) => {
                if lost_at.elapsed() > give_up {
                    anyhow::bail!("{e}");
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let (Some(mine), Some(now)) = (&my_run, &view.run) {
            if mine != now {
                log::error!(
                    "console: the VM this console followed (run {mine}) is gone; the cluster now runs another VM (run {now}): not showing its output"
                );
                return Ok(3);
            }
        }
        if view.primary.is_some() && my_run.is_none() {
            my_run = view.run.clone();
        }
        let Some(member) = view.primary.clone() else {
            if lost_at.elapsed() > give_up {
                anyhow::bail!("the witness at {witness} names no primary (view {})", view.number);
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let addr = addr_of(&member).to_string();
        let (mut r, conn) = match secure::connect(&addr, key, Duration::from_secs(1)) {
            Ok(c) => c,
            Err(e) => {
                // A primary that cannot be reached may be gone for good:
                // the witness says whether its VM is lost.
                // "Lost" is the witness's view of now, not a verdict: a
                // paused primary may come back and renew. Say it, and
                // give up only at --give-up, with it as the reason.
                let lost = match w.status() {
                    Ok(st) if st.lost && st.view.run == my_run => Some(st.state()),
                    _ => None,
                };
                if let Some(state) = &lost {
                    if !said_lost {
                        log::warn!("console: the witness says {state}; waiting up to {give_up:?} in case its primary comes back");
                        said_lost = true;
                    }
                }
                if lost_at.elapsed() > give_up {
                    match lost {
                        Some(state) => anyhow::bail!("{state}"),
                        None => anyhow::bail!("cannot reach the primary {addr} of view {}: {e}", view.number),
                    }
                }
                if e.kind() == std::io::ErrorKind::PermissionDenied && warned_key.as_deref() != Some(addr.as_str()) {
                    log::warn!("console: the primary {addr} of view {}: {e}", view.number);
                    warned_key = Some(addr.clone());
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut conn = Some(conn);
        if conn.as_mut().is_some_and(|c| c.write_all(format!("CONSOLE from={next_seq} to={member}\n").as_bytes()).is_err()) {
            continue;
        }
        // A primary that lost its lease goes quiet without hanging up; if
        // the witness names another primary, drop this one.
        let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
        {
            let (watching, waddr, member, key) = (watching.clone(), witness.clone(), member.clone(), key.clone());
            let conn = r.tcp().try_clone()?;
            let _ = std::thread::Builder::new().name("ftvm-console-watch".into()).spawn(move || {
                let mut w = WitnessClient::new(&waddr, &key);
                while watching.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    if let Ok(v) = w.view() {
                        if v.primary.is_some() && v.primary.as_deref() != Some(member.as_str()) {
                            let _ = conn.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                }
            });
        }
        let changed = last_primary.as_deref() != Some(member.as_str());
        log::info!("console: connected to primary {member} (view {})", view.number);
        let mut first = changed;
        let mut lines = 0u64;
        while let Ok(Some(line)) = read_line(&mut r) {
            lines += 1;
            if let Some(rest) = line.strip_prefix("DATA ") {
                let mut it = rest.split(' ').filter_map(|x| x.parse::<u64>().ok());
                let (Some(seq), Some(len)) = (it.next(), it.next()) else { break };
                if len > MAX_DATA as u64 {
                    anyhow::bail!(
                        "the primary {addr} sent a DATA frame of {len} bytes; the console protocol allows at most {MAX_DATA}: refusing it"
                    );
                }
                let mut bytes = vec![0u8; len as usize];
                if r.read_exact(&mut bytes).is_err() {
                    break;
                }
                if first && last_primary.is_some() {
                    log::info!("console: first output from new primary {addr} (view {}) at unix_ms={}", view.number, unix_ms());
                }
                first = false;
                let end = seq + len;
                if seq > next_seq {
                    log::warn!(
                        "console: output bytes {next_seq}..{seq} are gone (the primary keeps only the last {} KiB of released output); continuing from byte {seq}",
                        super::gate::KEEP_RELEASED >> 10
                    );
                }
                if end > next_seq {
                    let skip = next_seq.saturating_sub(seq) as usize;
                    out.write_all(&bytes[skip..])?;
                    out.flush()?;
                    next_seq = end;
                }
            } else if let Some(n) = line.strip_prefix("INPUT ").and_then(|n| n.parse().ok()) {
                // This primary's log holds our typing up to byte n: send the
                // rest (again), then keep typing into this connection.
                typed.lock().unwrap().resume(n, conn.take());
            } else if let Some(n) = line.strip_prefix("INACK ").and_then(|n| n.parse().ok()) {
                typed.lock().unwrap().acked(n);
            } else if let Some(msg) = line.strip_prefix("END ") {
                log::info!("console: {msg}");
                return Ok(0);
            } else {
                break;
            }
        }
        typed.lock().unwrap().conn = None;
        watching.store(false, std::sync::atomic::Ordering::Relaxed);
        log::info!("console: lost the primary {addr} at unix_ms={}; following the primary", unix_ms());
        last_primary = Some(member);
        lost_at = Instant::now();
        let _ = r.tcp().shutdown(std::net::Shutdown::Both);
        // A listener that refused us at once (another process now at the
        // primary's address, e.g. a restarted one) is not asked again in a
        // tight loop.
        std::thread::sleep(Duration::from_millis(if lines <= 1 { 200 } else { 20 }));
    }
}

/// What the console client has typed that the primary's log may not hold
/// yet: kept until acknowledged, and sent again to a new primary.
#[derive(Default)]
struct Typed {
    /// Input bytes acknowledged so far (the offset of `pending[0]`).
    base: u64,
    pending: Vec<u8>,
    conn: Option<SecureWriter>,
}

impl Typed {
    fn send(&mut self, b: &[u8]) {
        self.pending.extend_from_slice(b);
        if let Some(c) = self.conn.as_mut() {
            if c.write_all(b).is_err() {
                self.conn = None;
            }
        }
    }

    fn acked(&mut self, n: u64) {
        let drop = n.saturating_sub(self.base).min(self.pending.len() as u64) as usize;
        self.pending.drain(..drop);
        self.base += drop as u64;
    }

    fn resume(&mut self, n: u64, conn: Option<SecureWriter>) {
        if n < self.base {
            log::warn!("console: the primary's log holds less of our input ({n} bytes) than was acknowledged ({})", self.base);
        }
        self.acked(n);
        self.conn = conn;
        if let Some(c) = self.conn.as_mut() {
            if !self.pending.is_empty() && c.write_all(&self.pending).is_err() {
                self.conn = None;
            }
        }
    }
}
