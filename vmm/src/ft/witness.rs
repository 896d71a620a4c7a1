//! The witness: holds the current view (number, primary, backup) and grants the
//! primary a lease (see docs/DESIGN.md, "Fault tolerance").
//!
//! Wire protocol (TCP, one request line -> one response line, many pairs per
//! connection). Tokens are space-separated `key=value`; "-" means none.
//!
//! ```text
//! op=become_primary me=ADDR                          -> ok view=N primary=P backup=B
//! op=backup_ping    me=ADDR view=N                   -> ok view=N primary=P backup=B
//! op=primary_ping   me=ADDR view=N sent=S acked=A    -> ok view=N primary=P backup=B
//! op=promote        me=ADDR view=N lost=0|1          -> ok result=granted|wait view=N primary=P backup=B
//! op=view                                            -> ok view=N primary=P backup=B
//! op=status -> ok view=N primary=P backup=B lease_left_ms=MS|- sent=S acked=A backup_alive=0|1
//! any refusal or malformed request                   -> err <free text to end of line>
//! ```
//!
//! Every connection is authenticated and encrypted with the cluster key
//! (`secure.rs`): without it nothing is accepted and nothing is answered.
//! A view number in a request is checked (rule 3): a primary's pings must
//! name a view of its own reign, a backup's no view past the current one,
//! a promotion exactly the current one.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::key::ClusterKey;
use super::secure::{self, Conn, SecureReader, SecureWriter};

/// Primary lease length.
pub const LEASE: Duration = Duration::from_millis(500);
/// How often roles ping the witness.
pub const PING_INTERVAL: Duration = Duration::from_millis(100);
/// A backup silent this long is dropped from the view.
pub const BACKUP_TIMEOUT: Duration = Duration::from_millis(2000);

const IO_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_LINE: u64 = 4096;
/// A connection with no request for this long is closed (its client
/// reconnects on its next call): a peer that vanished keeps no slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    pub number: u64,
    pub primary: Option<String>,
    pub backup: Option<String>,
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "view {}: primary={} backup={}", self.number, or_dash(&self.primary), or_dash(&self.backup))
    }
}

#[derive(Debug, Clone)]
pub struct Status {
    pub view: View,
    /// None if there is no live lease.
    pub lease_left_ms: Option<u64>,
    /// Ordinals last reported by the primary (reset to 0 when the primary changes).
    pub primary_sent: u64,
    pub primary_acked: u64,
    pub backup_alive: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot reach the witness at {addr}: {err}")]
    Unreachable { addr: String, err: io::Error },
    #[error("the witness at {addr} did not accept this cluster key (is --key the file the witness was given?): {err}")]
    Unauthenticated { addr: String, err: io::Error },
    #[error("witness at {addr} refused: {msg}")]
    Refused { addr: String, msg: String },
    #[error("witness at {addr} sent a malformed reply: {line:?}")]
    Protocol { addr: String, line: String },
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: io::Error },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    Granted(View),
    /// The primary's lease is still alive: retry.
    Wait,
}

/// Server time limits; `Timeouts::default()` uses [`LEASE`] and [`BACKUP_TIMEOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub lease: Duration,
    pub backup_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { lease: LEASE, backup_timeout: BACKUP_TIMEOUT }
    }
}

fn or_dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

fn view_kv(v: &View) -> String {
    format!("view={} primary={} backup={}", v.number, or_dash(&v.primary), or_dash(&v.backup))
}

// ---------------------------------------------------------------- server state

#[derive(Default)]
struct State {
    t: Timeouts,
    view: View,
    lease_until: Option<Instant>,
    /// The view in which the current primary was installed.
    primary_since: u64,
    backup_seen: Option<Instant>,
    sent: u64,
    acked: u64,
    /// When the backup of the current view first asked for promotion.
    promote_asked: Option<Instant>,
    /// (view promoted from, new primary): makes a retried promote idempotent.
    last_promotion: Option<(u64, String)>,
}

impl State {
    fn lease_alive(&self, now: Instant) -> bool {
        self.view.primary.is_some() && self.lease_until.is_some_and(|u| now < u)
    }

    fn backup_alive(&self, now: Instant) -> bool {
        self.view.backup.is_some()
            && self.backup_seen.is_some_and(|s| now.saturating_duration_since(s) <= self.t.backup_timeout)
    }

    /// Install view N+1. The caller grants a lease if it installs a primary.
    fn change(&mut self, primary: Option<String>, backup: Option<String>, now: Instant, reason: &str) {
        let number = self.view.number + 1;
        if primary != self.view.primary {
            self.lease_until = None;
            self.sent = 0;
            self.acked = 0;
            self.primary_since = number;
        }
        if backup != self.view.backup {
            self.backup_seen = backup.as_ref().map(|_| now);
        }
        self.view = View { number, primary, backup };
        self.promote_asked = None;
        log::info!("witness: {} ({reason})", self.view);
    }

    fn become_primary(&mut self, me: &str, now: Instant) -> Result<String, String> {
        let n = self.view.number;
        if let Some(p) = self.view.primary.clone() {
            if self.lease_alive(now) {
                return if p == me {
                    Ok(view_kv(&self.view))
                } else {
                    Err(format!("a primary is already running: {p} in view {n}"))
                };
            }
            if self.backup_alive(now) {
                let b = or_dash(&self.view.backup);
                if b == me {
                    return Err(format!("{me} is the backup of view {n}: ask for promotion"));
                }
                return Err(format!("primary {p} of view {n} is silent; its backup {b} takes over"));
            }
        }
        let alive = self.backup_alive(now);
        let backup = self.view.backup.clone().filter(|b| alive && b != me);
        let reason = if self.view.primary.is_some() { "previous primary silent, no live backup" } else { "first primary" };
        self.change(Some(me.to_string()), backup, now, reason);
        self.lease_until = Some(now + self.t.lease);
        Ok(view_kv(&self.view))
    }

    fn backup_ping(&mut self, me: &str, view: u64, now: Instant) -> Result<String, String> {
        let n = self.view.number;
        if view > n {
            return Err(format!("view {view} does not exist yet: the current view is {n}"));
        }
        if self.view.backup.as_deref() == Some(me) {
            self.backup_seen = Some(now);
            return Ok(view_kv(&self.view));
        }
        if self.view.primary.as_deref() == Some(me) {
            return Err(format!("{me} is the primary of view {n}, not a backup"));
        }
        if self.backup_alive(now) {
            return Err(format!("view {n} already has backup {}", or_dash(&self.view.backup)));
        }
        let reason = if self.view.backup.is_some() { "backup replaces a silent one" } else { "backup joined" };
        self.change(self.view.primary.clone(), Some(me.to_string()), now, reason);
        Ok(view_kv(&self.view))
    }

    fn primary_ping(&mut self, me: &str, view: u64, sent: u64, acked: u64, now: Instant) -> Result<String, String> {
        let (n, since) = (self.view.number, self.primary_since);
        if self.view.primary.as_deref() != Some(me) {
            let p = or_dash(&self.view.primary);
            return Err(format!("not the primary of view {n} (primary is {p})"));
        }
        if view < since || view > n {
            return Err(format!("view {view} is not one of this primary's views ({since} to {n})"));
        }
        self.lease_until = Some(now + self.t.lease);
        self.sent = sent;
        self.acked = acked;
        if self.view.backup.is_some() && !self.backup_alive(now) {
            self.change(self.view.primary.clone(), None, now, "backup silent");
        }
        Ok(view_kv(&self.view))
    }

    fn promote(&mut self, me: &str, view: u64, lost: bool, now: Instant) -> Result<String, String> {
        let n = self.view.number;
        if self.last_promotion.as_ref().is_some_and(|(v, p)| *v == view && p == me)
            && self.view.primary.as_deref() == Some(me)
        {
            return Ok(format!("result=granted {}", view_kv(&self.view))); // retried request
        }
        if view != n {
            return Err(format!("stale view {view}: the current view is {n}"));
        }
        if self.view.backup.as_deref() != Some(me) {
            return Err(format!("{me} is not the backup of view {n} (backup is {})", or_dash(&self.view.backup)));
        }
        self.backup_seen = Some(now); // asking proves it is alive
        if !self.lease_alive(now) {
            self.change(Some(me.to_string()), None, now, "primary lease expired, backup promoted");
            self.lease_until = Some(now + self.t.lease);
            self.last_promotion = Some((view, me.to_string()));
            return Ok(format!("result=granted {}", view_kv(&self.view)));
        }
        // Only a broken link starts the clock: a backup that merely heard
        // nothing for a while (a slow primary) asks with lost=0 and must not
        // be dropped for it later.
        if !lost {
            return Ok(format!("result=wait {}", view_kv(&self.view)));
        }
        let first = *self.promote_asked.get_or_insert(now);
        // The lease is alive, so the primary renewed it after `first` once this much time passed.
        if now.saturating_duration_since(first) > 2 * self.t.lease {
            self.change(self.view.primary.clone(), None, now, "backup lost its link to a live primary");
            return Err(format!("dropped from view {n}: the primary is alive"));
        }
        Ok(format!("result=wait {}", view_kv(&self.view)))
    }

    fn status(&self, now: Instant) -> String {
        let left = match self.lease_until {
            Some(u) if self.lease_alive(now) => u.saturating_duration_since(now).as_millis().to_string(),
            _ => "-".to_string(),
        };
        let (kv, alive) = (view_kv(&self.view), self.backup_alive(now) as u8);
        format!("{kv} lease_left_ms={left} sent={} acked={} backup_alive={alive}", self.sent, self.acked)
    }
}

fn handle(state: &Mutex<State>, line: &str) -> String {
    match handle_inner(state, line) {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("err {}", e.replace(['\n', '\r'], " ")),
    }
}

fn handle_inner(state: &Mutex<State>, line: &str) -> Result<String, String> {
    let mut toks = line.split_whitespace();
    let op = toks.next().and_then(|t| t.strip_prefix("op=")).ok_or("a request must start with op=")?;
    let args = toks
        .map(|t| t.split_once('=').ok_or_else(|| format!("bad token {t:?}: expected key=value")))
        .collect::<Result<HashMap<&str, &str>, String>>()?;
    let get = |k: &str| args.get(k).copied().ok_or_else(|| format!("op={op} needs {k}="));
    let num = |k: &str| get(k)?.parse::<u64>().map_err(|_| format!("{k}= must be a number"));
    let me = || match get("me")? {
        "-" => Err("me= must be an address, not -".to_string()),
        a => Ok(a),
    };
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    match op {
        "become_primary" => st.become_primary(me()?, now),
        "backup_ping" => st.backup_ping(me()?, num("view")?, now),
        "primary_ping" => {
            let (me, view, sent, acked) = (me()?, num("view")?, num("sent")?, num("acked")?);
            st.primary_ping(me, view, sent, acked, now)
        }
        "promote" => {
            let lost = match get("lost")? { "1" | "true" => true, "0" | "false" => false, _ => return Err("lost= must be 0 or 1".into()) };
            st.promote(me()?, num("view")?, lost, now)
        }
        "view" => Ok(view_kv(&st.view)),
        "status" => Ok(st.status(now)),
        _ => Err(format!("unknown op {op:?}")),
    }
}

fn serve_conn(conn: Conn, state: &Mutex<State>) {
    let Conn { mut reader, mut writer, .. } = conn;
    if reader.tcp().set_read_timeout(Some(IDLE_TIMEOUT)).is_err() || writer.tcp().set_write_timeout(Some(IO_TIMEOUT)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if matches!((&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf), Ok(0) | Err(_)) {
            return;
        }
        if buf.last() != Some(&b'\n') && buf.len() as u64 >= MAX_LINE {
            let _ = writer.write_all(b"err request line too long\n");
            return;
        }
        let line = String::from_utf8_lossy(&buf);
        let reply = handle(state, line.trim());
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// The witness server.
pub struct Witness {
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    key: ClusterKey,
}

impl Witness {
    pub fn bind(addr: &str, key: ClusterKey) -> Result<Witness, WitnessError> {
        Self::bind_with(addr, Timeouts::default(), key)
    }

    pub fn bind_with(addr: &str, timeouts: Timeouts, key: ClusterKey) -> Result<Witness, WitnessError> {
        let listener =
            TcpListener::bind(addr).map_err(|err| WitnessError::Listen { addr: addr.to_string(), err })?;
        Ok(Witness { listener, state: Arc::new(Mutex::new(State { t: timeouts, ..State::default() })), key })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Accept connections forever, one thread each (at most
    /// `secure::MAX_CONNS`), key holders only. Returns only if the
    /// listener fails.
    pub fn serve(self) -> io::Result<()> {
        let state = self.state;
        secure::serve(self.listener, self.key, "witness", "witness-conn", move |c| serve_conn(c, &state))
    }
}

// ---------------------------------------------------------------- client

/// Client: connects lazily, reconnects on error once per call, 1 s connect/read/write timeouts.
pub struct WitnessClient {
    addr: String,
    key: ClusterKey,
    conn: Option<(SecureReader, SecureWriter)>,
}

impl WitnessClient {
    pub fn new(addr: &str, key: &ClusterKey) -> Self {
        WitnessClient { addr: addr.to_string(), key: key.clone(), conn: None }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A VMM asks to become primary, announcing the address it listens on.
    pub fn become_primary(&mut self, me: &str) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.view_call(&format!("op=become_primary me={me}"))
    }

    /// A backup announces itself / keeps itself alive. Returns the current view.
    pub fn backup_ping(&mut self, me: &str, view: u64) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.view_call(&format!("op=backup_ping me={me} view={view}"))
    }

    /// The primary renews its lease and reports progress. Returns the current view
    /// (the caller checks whether it is still primary).
    pub fn primary_ping(&mut self, me: &str, view: u64, sent: u64, acked: u64) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.view_call(&format!("op=primary_ping me={me} view={view} sent={sent} acked={acked}"))
    }

    /// The backup of view `view` asks to take over. `lost_connection` = its log
    /// stream broke (EOF/error) rather than just went quiet.
    pub fn promote(&mut self, me: &str, view: u64, lost_connection: bool) -> Result<Promotion, WitnessError> {
        self.check_addr(me)?;
        let line = self.call(&format!("op=promote me={me} view={view} lost={}", lost_connection as u8))?;
        let kv = self.parse_ok(&line)?;
        match kv.get("result").map(String::as_str) {
            Some("granted") => Ok(Promotion::Granted(self.parse_view(&kv, &line)?)),
            Some("wait") => Ok(Promotion::Wait),
            _ => Err(self.protocol(&line)),
        }
    }

    pub fn view(&mut self) -> Result<View, WitnessError> {
        self.view_call("op=view")
    }

    pub fn status(&mut self) -> Result<Status, WitnessError> {
        let line = self.call("op=status")?;
        let kv = self.parse_ok(&line)?;
        let bad = || self.protocol(&line);
        let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
        Ok(Status {
            view: self.parse_view(&kv, &line)?,
            lease_left_ms: if kv.get("lease_left_ms").is_some_and(|v| v == "-") { None } else { Some(num("lease_left_ms")?) },
            primary_sent: num("sent")?,
            primary_acked: num("acked")?,
            backup_alive: num("backup_alive")? == 1,
        })
    }

    fn check_addr(&self, me: &str) -> Result<(), WitnessError> {
        if me.is_empty() || me == "-" || me.contains(char::is_whitespace) || me.contains('=') {
            return Err(WitnessError::Refused {
                addr: self.addr.clone(),
                msg: format!("{me:?} is not a usable address (empty, \"-\", whitespace or '=')"),
            });
        }
        Ok(())
    }

    fn view_call(&mut self, req: &str) -> Result<View, WitnessError> {
        let line = self.call(req)?;
        let kv = self.parse_ok(&line)?;
        self.parse_view(&kv, &line)
    }

    fn protocol(&self, line: &str) -> WitnessError {
        WitnessError::Protocol { addr: self.addr.clone(), line: line.to_string() }
    }

    fn parse_ok(&self, line: &str) -> Result<HashMap<String, String>, WitnessError> {
        if let Some(rest) = line.strip_prefix("err") {
            if rest.is_empty() || rest.starts_with(' ') {
                return Err(WitnessError::Refused { addr: self.addr.clone(), msg: rest.trim().to_string() });
            }
        }
        let mut toks = line.split_whitespace();
        if toks.next() != Some("ok") {
            return Err(self.protocol(line));
        }
        toks.map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| self.protocol(line)))
            .collect()
    }

    fn parse_view(&self, kv: &HashMap<String, String>, line: &str) -> Result<View, WitnessError> {
        let opt = |k: &str| kv.get(k).map(|v| if v == "-" { None } else { Some(v.clone()) });
        match (kv.get("view").and_then(|v| v.parse::<u64>().ok()), opt("primary"), opt("backup")) {
            (Some(number), Some(primary), Some(backup)) => Ok(View { number, primary, backup }),
            _ => Err(self.protocol(line)),
        }
    }

    /// Send one request line, return the reply line (without newline). A failure on
    /// an already-open connection (e.g. the witness closed it) is retried once on a new one.
    fn call(&mut self, req: &str) -> Result<String, WitnessError> {
        let had_conn = self.conn.is_some();
        let mut result = self.try_call(req);
        if result.is_err() && had_conn {
            self.conn = None;
            result = self.try_call(req);
        }
        result.map_err(|err| {
            self.conn = None;
            let addr = self.addr.clone();
            if err.kind() == io::ErrorKind::PermissionDenied {
                WitnessError::Unauthenticated { addr, err }
            } else {
                WitnessError::Unreachable { addr, err }
            }
        })
    }

    fn try_call(&mut self, req: &str) -> io::Result<String> {
        if self.conn.is_none() {
            let (r, w) = secure::connect(&self.addr, &self.key, IO_TIMEOUT)?;
            r.tcp().set_read_timeout(Some(IO_TIMEOUT))?;
            w.tcp().set_write_timeout(Some(IO_TIMEOUT))?;
            self.conn = Some((r, w));
        }
        let (r, w) = self.conn.as_mut().expect("connected above");
        super::write_line(w, req)?;
        super::read_line(r)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the witness closed the connection"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    const T: Timeouts = Timeouts { lease: Duration::from_millis(250), backup_timeout: Duration::from_millis(600) };
    const P: &str = "127.0.0.1:7101";
    const B: &str = "127.0.0.1:7102";
    const S: &str = "127.0.0.1:7103";

    fn key() -> ClusterKey {
        ClusterKey::from_bytes([7; 32])
    }

    fn client(addr: &str) -> WitnessClient {
        WitnessClient::new(addr, &key())
    }

    fn start() -> (String, WitnessClient) {
        let w = Witness::bind_with("127.0.0.1:0", T, key()).unwrap();
        let addr = w.local_addr().to_string();
        thread::spawn(move || w.serve());
        let c = client(&addr);
        (addr, c)
    }

    /// A witness in view 2: primary P, backup B.
    fn start_pair() -> (String, WitnessClient) {
        let (addr, mut c) = start();
        assert_eq!(c.become_primary(P).unwrap(), v(1, Some(P), None));
        assert_eq!(c.backup_ping(B, 1).unwrap(), v(2, Some(P), Some(B)));
        (addr, c)
    }

    fn v(number: u64, p: Option<&str>, b: Option<&str>) -> View {
        View { number, primary: p.map(String::from), backup: b.map(String::from) }
    }

    fn refused(r: Result<impl fmt::Debug, WitnessError>, needle: &str) {
        match r {
            Err(WitnessError::Refused { msg, .. }) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
            other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
        }
    }

    /// Keeps `me` pinging as primary every 30 ms until the flag is set.
    fn pinger(addr: &str, me: &'static str, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
        let mut c = client(addr);
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                c.primary_ping(me, 1, 1, 1).unwrap();
                thread::sleep(Duration::from_millis(30));
            }
        })
    }

    #[test]
    fn first_primary_and_second_refused() {
        let (addr, mut c) = start();
        assert_eq!(c.view().unwrap(), v(0, None, None));
        assert_eq!(c.become_primary(P).unwrap(), v(1, Some(P), None));
        assert_eq!(c.become_primary(P).unwrap(), v(1, Some(P), None), "idempotent");
        refused(client(&addr).become_primary(S), "a primary is already running: 127.0.0.1:7101 in view 1");
        assert_eq!(c.view().unwrap(), v(1, Some(P), None));
    }

    #[test]
    fn backup_joins_and_slot_is_held() {
        let (_, mut c) = start();
        c.become_primary(P).unwrap();
        assert_eq!(c.backup_ping(B, 1).unwrap(), v(2, Some(P), Some(B)));
        assert_eq!(c.backup_ping(B, 2).unwrap(), v(2, Some(P), Some(B)));
        refused(c.backup_ping(S, 2), "view 2 already has backup 127.0.0.1:7102");
        refused(c.backup_ping(P, 2), "is the primary");
    }

    #[test]
    fn promote_waits_then_granted() {
        let (addr, mut c) = start_pair();
        let stop = Arc::new(AtomicBool::new(false));
        let h = pinger(&addr, P, stop.clone());
        let t0 = Instant::now();
        while t0.elapsed() < 3 * T.lease {
            assert_eq!(c.promote(B, 2, false).unwrap(), Promotion::Wait);
            thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
        let stopped = Instant::now();
        let granted = loop {
            match c.promote(B, 2, false).unwrap() {
                Promotion::Granted(view) => break view,
                Promotion::Wait => thread::sleep(Duration::from_millis(10)),
            }
        };
        assert!(stopped.elapsed() >= T.lease - Duration::from_millis(40));
        assert_eq!(granted, v(3, Some(B), None));
        assert_eq!(c.promote(B, 2, false).unwrap(), Promotion::Granted(granted.clone()), "retry is idempotent");
        refused(c.promote(S, 3, false), "not the backup");
        refused(c.primary_ping(P, 2, 5, 5), "not the primary of view 3 (primary is 127.0.0.1:7102)");
        let st = c.status().unwrap();
        assert!(st.lease_left_ms.is_some() && st.view == granted);
    }

    #[test]
    fn rule1_only_the_backup_takes_over() {
        let (_, mut c) = start_pair();
        thread::sleep(T.lease + Duration::from_millis(50));
        refused(c.become_primary(S), "primary 127.0.0.1:7101 of view 2 is silent; its backup 127.0.0.1:7102 takes over");
        refused(c.become_primary(P), "takes over");
        refused(c.become_primary(B), "ask for promotion");
        thread::sleep(T.backup_timeout);
        assert_eq!(c.become_primary(S).unwrap(), v(3, Some(S), None), "no live backup: anyone may start");
    }

    #[test]
    fn non_primary_ping_refused() {
        let (_, mut c) = start();
        refused(c.primary_ping(S, 0, 1, 1), "not the primary of view 0 (primary is -)");
        c.become_primary(P).unwrap();
        refused(c.primary_ping(S, 1, 1, 1), "not the primary of view 1");
        let st = c.status().unwrap();
        assert_eq!((st.primary_sent, st.primary_acked), (0, 0));
    }

    #[test]
    fn silent_backup_dropped_on_primary_ping() {
        let (_, mut c) = start_pair();
        let t0 = Instant::now();
        let mut view = c.primary_ping(P, 2, 0, 0).unwrap();
        while view.backup.is_some() && t0.elapsed() < Duration::from_secs(2) {
            thread::sleep(Duration::from_millis(50));
            view = c.primary_ping(P, view.number, 0, 0).unwrap();
        }
        assert!(t0.elapsed() > T.backup_timeout);
        assert_eq!(view, v(3, Some(P), None));
        assert_eq!(c.backup_ping(S, 3).unwrap(), v(4, Some(P), Some(S)), "a new backup may join");
    }

    #[test]
    fn lost_link_to_live_primary_drops_backup() {
        let (addr, mut c) = start_pair();
        let stop = Arc::new(AtomicBool::new(false));
        let h = pinger(&addr, P, stop.clone());
        let t0 = Instant::now();
        let err = loop {
            match c.promote(B, 2, true) {
                Ok(Promotion::Wait) => thread::sleep(Duration::from_millis(20)),
                other => break other,
            }
            assert!(t0.elapsed() < Duration::from_secs(2));
        };
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
        assert!(t0.elapsed() > 2 * T.lease);
        refused(err, "dropped from view 2: the primary is alive");
        assert_eq!(c.view().unwrap(), v(3, Some(P), None));
    }

    #[test]
    fn status_fields() {
        let (_, mut c) = start();
        let st = c.status().unwrap();
        assert_eq!((st.view, st.lease_left_ms, st.backup_alive), (v(0, None, None), None, false));
        c.become_primary(P).unwrap();
        c.primary_ping(P, 1, 10, 7).unwrap();
        c.backup_ping(B, 1).unwrap();
        let st = c.status().unwrap();
        assert_eq!(st.view, v(2, Some(P), Some(B)));
        assert!(st.lease_left_ms.is_some_and(|ms| ms <= T.lease.as_millis() as u64), "{:?}", st.lease_left_ms);
        assert_eq!((st.primary_sent, st.primary_acked, st.backup_alive), (10, 7, true));
        thread::sleep(T.lease + Duration::from_millis(30));
        let st = c.status().unwrap();
        assert_eq!((st.lease_left_ms, st.backup_alive), (None, true));
        thread::sleep(T.backup_timeout);
        assert!(!c.status().unwrap().backup_alive);
    }

    #[test]
    fn client_reconnects_after_server_closes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let srv = thread::spawn(move || {
            for n in [5u64, 6] {
                let (mut r, mut w) = secure::accept(l.accept().unwrap().0, &key()).unwrap();
                assert_eq!(crate::ft::read_line(&mut r).unwrap().as_deref(), Some("op=view"));
                w.write_all(format!("ok view={n} primary=a:1 backup=-\n").as_bytes()).unwrap();
                // dropping `r` and `w` closes the connection
            }
        });
        let mut c = client(&addr);
        assert_eq!(c.view().unwrap(), v(5, Some("a:1"), None));
        thread::sleep(Duration::from_millis(50));
        assert_eq!(c.view().unwrap(), v(6, Some("a:1"), None));
        srv.join().unwrap();
        // A client per request against a real witness works too.
        let (addr, _) = start();
        assert_eq!(client(&addr).become_primary(P).unwrap().number, 1);
        assert_eq!(client(&addr).view().unwrap().number, 1);
    }

    #[test]
    fn malformed_requests_get_err_and_connection_survives() {
        let (addr, _) = start();
        let (mut r, mut w) = secure::connect(&addr, &key(), IO_TIMEOUT).unwrap();
        let mut ask = |req: &str| {
            w.write_all(format!("{req}\n").as_bytes()).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            line
        };
        for bad in ["garbage", "", "op=nope", "op=become_primary", "op=become_primary me=-",
                    "op=primary_ping me=a:1 view=x sent=1 acked=1", "op=promote me=a:1 view=0 lost=maybe",
                    "op=view junk"] {
            let reply = ask(bad);
            assert!(reply.starts_with("err ") && reply.ends_with('\n'), "{bad:?} -> {reply:?}");
        }
        assert_eq!(ask("op=view"), "ok view=0 primary=- backup=-\n");
        refused(client(&addr).become_primary("a b"), "not a usable address");
    }

    #[test]
    fn view_numbers_are_checked_on_every_request() {
        let (_, mut c) = start_pair();
        // The primary P was installed in view 1; the view is now 2.
        refused(c.primary_ping(P, 3, 1, 1), "view 3 is not one of this primary's views (1 to 2)");
        refused(c.primary_ping(P, 0, 1, 1), "view 0 is not one of this primary's views");
        assert_eq!(c.primary_ping(P, 1, 1, 1).unwrap(), v(2, Some(P), Some(B)), "one view behind is normal");
        refused(c.backup_ping(B, 9), "view 9 does not exist yet: the current view is 2");
        refused(c.promote(B, 1, true), "stale view 1");
        refused(c.promote(B, 3, true), "stale view 3");
        let st = c.status().unwrap();
        assert_eq!((st.view, st.primary_sent), (v(2, Some(P), Some(B)), 1), "a refused request changed the state");
    }

    #[test]
    fn without_the_key_nothing_is_accepted_or_answered() {
        let (addr, mut c) = start();
        // A client with another key.
        let mut other = WitnessClient::new(&addr, &ClusterKey::from_bytes([8; 32]));
        let e = other.become_primary(S).unwrap_err();
        assert!(matches!(e, WitnessError::Unauthenticated { .. }), "{e}");
        assert!(e.to_string().contains("did not accept this cluster key"), "{e}");
        // A plain TCP client speaking the protocol in clear.
        let mut raw = std::net::TcpStream::connect(&addr).unwrap();
        raw.write_all(b"op=become_primary me=127.0.0.1:9\nop=status\n").unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        assert!(got.is_empty(), "the witness answered a stranger: {:?}", String::from_utf8_lossy(&got));
        assert_eq!(c.view().unwrap(), v(0, None, None), "a stranger changed the view");
    }

    #[test]
    fn bind_and_connect_errors() {
        let w = Witness::bind("127.0.0.1:0", key()).unwrap();
        let taken = w.local_addr().to_string();
        assert!(matches!(Witness::bind(&taken, key()), Err(WitnessError::Listen { .. })));
        drop(w);
        let err = client(&taken).view().unwrap_err();
        assert!(matches!(err, WitnessError::Unreachable { .. }), "{err:?}");
    }
}
