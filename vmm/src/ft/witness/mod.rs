//! The witness: holds the current view (number, primary, backup, run) and
//! grants the primary a lease (see docs/DESIGN.md, "Fault tolerance").
//!
//! Wire protocol (TCP, one request line -> one response line, many pairs per
//! connection). Tokens are space-separated `key=value`; "-" means none.
//! `VIEW` stands for `view=N primary=P backup=B run=R`.
//!
//! ```text
//! op=become_primary me=M run=R new_run=0|1                  -> ok VIEW
//! op=backup_ping    me=M view=N|0 ready=0|1 applied=A       -> ok VIEW   (0: join)
//! op=primary_ping   me=M view=N sent=S acked=A released=B   -> ok VIEW
//! op=promote        me=M view=N lost=0|1 ready=0|1          -> ok result=granted|wait VIEW
//! op=drop_backup    me=M view=N backup=B                    -> ok VIEW
//! op=ended          me=M                                    -> ok VIEW   (the primary's guest ended)
//! op=view                                                   -> ok VIEW
//! op=status -> ok VIEW lease_left_ms=MS|- sent=S acked=A backup_alive=0|1
//!              ready=0|1 applied=A released=B lost=0|1 ended=0|1
//! any refusal or malformed request                          -> err <free text to end of line>
//! ```
//!
//! A member `M` is `ADDR@ID`: the address it listens on and an id drawn at
//! random when the process starts (or a backup rejoins), so that a process
//! restarted at the same address is a new member, never taken for the old
//! one. A run `R` is the id of one guest's life: drawn when a primary boots
//! a VM, kept by the backup that takes it over.
//!
//! Every connection is authenticated and encrypted with the cluster key
//! (`secure.rs`): without it nothing is accepted and nothing is answered.
//! A view number in a request is checked (rule 3): a primary's pings must
//! name a view of its own reign, a backup's no view past the current one,
//! a promotion exactly the current one. The rules themselves are in
//! `rules.rs`, without sockets.
//!
//! Two implementations hold the view behind one interface
//! ([`WitnessApi`]): the embedded witness (`ftvm witness`, `server.rs`,
//! reached through `tcp.rs`) and an etcd cluster (`etcd.rs`), which
//! applies the same rules to a view kept in etcd. [`WitnessClient`] is
//! whichever [`WitnessAt`] names.

mod etcd;
mod rules;
mod server;
mod tcp;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::time::Duration;

pub use etcd::{EtcdOptions, EtcdTarget};
pub use server::Witness;

use crate::ft::key::ClusterKey;

/// What every role asks of the witness, whichever implementation holds
/// the view. A refusal is [`WitnessError::Refused`]; any other error means
/// no answer (retry).
pub trait WitnessApi: Send {
    /// A VMM asks to become primary of the VM of run `run`, as member
    /// `me` (`ADDR@ID`). `new_run`: the operator allows it to replace a
    /// lost VM with a new one.
    fn become_primary(&mut self, me: &str, run: &str, new_run: bool) -> Result<View, WitnessError>;
    /// A backup announces itself (`view` 0: join) or keeps itself alive.
    /// `ready`: it holds the VM's state; `applied`: the exit it replayed to.
    fn backup_ping(&mut self, me: &str, view: u64, ready: bool, applied: u64) -> Result<View, WitnessError>;
    /// The primary renews its lease and reports progress (`released`:
    /// console bytes released so far). The caller checks it is still primary.
    fn primary_ping(&mut self, me: &str, view: u64, sent: u64, acked: u64, released: u64) -> Result<View, WitnessError>;
    /// The backup of view `view` asks to take over. `lost_connection`: its
    /// log stream broke rather than went quiet; `ready`: it holds the state.
    fn promote(&mut self, me: &str, view: u64, lost_connection: bool, ready: bool) -> Result<Promotion, WitnessError>;
    /// The primary `me` gives up on `backup`, whose acknowledgements stopped.
    fn drop_backup(&mut self, me: &str, view: u64, backup: &str) -> Result<View, WitnessError>;
    /// The primary `me` says its guest ended.
    fn ended(&mut self, me: &str) -> Result<View, WitnessError>;
    fn view(&mut self) -> Result<View, WitnessError>;
    fn status(&mut self) -> Result<Status, WitnessError>;
    /// How long a lease lasts at the witness, counted from no earlier than
    /// when the request that granted or renewed it was sent.
    fn lease(&self) -> Duration;
    /// Where the witness is, for messages.
    fn describe(&self) -> String;
}

/// Where the view is kept: an embedded witness or an etcd cluster.
#[derive(Debug, Clone)]
pub enum WitnessAt {
    /// `ftvm witness` at HOST:PORT.
    Embedded(String),
    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    Etcd(EtcdTarget),
}

impl WitnessAt {
    /// `spec` is HOST:PORT or etcd://ENDPOINTS; `etcd` only means
    /// something for etcd.
    pub fn parse(spec: &str, etcd: &EtcdOptions) -> Result<WitnessAt, WitnessError> {
        match spec.strip_prefix("etcd://") {
            Some(endpoints) => Ok(WitnessAt::Etcd(EtcdTarget::new(endpoints, etcd)?)),
            None => {
                if etcd.any() {
                    return Err(WitnessError::Usage(format!(
                        "--witness-prefix and the --etcd-* options are for an etcd witness (--witness etcd://HOST:PORT,...), not {spec}"
                    )));
                }
                Ok(WitnessAt::Embedded(spec.to_string()))
            }
        }
    }
}

impl fmt::Display for WitnessAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WitnessAt::Embedded(a) => f.write_str(a),
            WitnessAt::Etcd(t) => t.fmt(f),
        }
    }
}

/// A client of the witness named by a [`WitnessAt`]: the roles hold one
/// of these and call [`WitnessApi`] on it.
pub struct WitnessClient(Box<dyn WitnessApi>);

impl WitnessClient {
    pub fn new(at: &WitnessAt, key: &ClusterKey) -> WitnessClient {
        match at {
            WitnessAt::Embedded(addr) => WitnessClient(Box::new(tcp::TcpWitness::new(addr, key))),
            WitnessAt::Etcd(t) => WitnessClient(Box::new(etcd::EtcdWitness::new(t, key))),
        }
    }
}

impl std::ops::Deref for WitnessClient {
    type Target = dyn WitnessApi;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::ops::DerefMut for WitnessClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut *self.0
    }
}

/// A member, run or backup name must be one token of the protocol.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "-" || name.contains(char::is_whitespace) || name.contains('=') {
        return Err(format!("{name:?} is not a usable address (empty, \"-\", whitespace or '=')"));
    }
    Ok(())
}

/// `key=value` tokens (after `ok`); `None` if one is not.
fn parse_kv(s: &str) -> Option<HashMap<String, String>> {
    s.split_whitespace().map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
}

fn view_from(kv: &HashMap<String, String>) -> Option<View> {
    let opt = |k: &str| kv.get(k).map(|v| if v == "-" { None } else { Some(v.clone()) });
    Some(View { number: kv.get("view")?.parse().ok()?, primary: opt("primary")?, backup: opt("backup")?, run: opt("run")? })
}

fn promotion_from(kv: &HashMap<String, String>) -> Option<Promotion> {
    match kv.get("result").map(String::as_str) {
        Some("granted") => Some(Promotion::Granted(view_from(kv)?)),
        Some("wait") => Some(Promotion::Wait),
        _ => None,
    }
}

fn status_from(kv: &HashMap<String, String>) -> Option<Status> {
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(Status {
        view: view_from(kv)?,
        lease_left_ms: if kv.get("lease_left_ms")? == "-" { None } else { Some(num("lease_left_ms")?) },
        primary_sent: num("sent")?,
        primary_acked: num("acked")?,
        backup_alive: num("backup_alive")? == 1,
        backup_ready: num("ready")? == 1,
        backup_applied: num("applied")?,
        released: num("released")?,
        lost: num("lost")? == 1,
        ended: num("ended")? == 1,
    })
}

/// Primary lease length, as the witness counts it (from when it answered).
pub const LEASE: Duration = Duration::from_millis(500);
/// The primary stops releasing output this long before its lease can run
/// out at the witness (counted from before its request was sent): room for
/// clock rate differences (NTP keeps them under 0.05%, 0.25 ms of a lease)
/// and for a pause between the gate's lease check and the bytes leaving.
pub const LEASE_MARGIN: Duration = Duration::from_millis(100);
/// How often roles ping the witness.
pub const PING_INTERVAL: Duration = Duration::from_millis(100);
/// A backup silent this long is dropped from the view.
pub const BACKUP_TIMEOUT: Duration = Duration::from_millis(2000);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    pub number: u64,
    pub primary: Option<String>,
    pub backup: Option<String>,
    /// The guest's run: one VM's life, across failovers.
    pub run: Option<String>,
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, b, r) = (or_dash(&self.primary), or_dash(&self.backup), or_dash(&self.run));
        write!(f, "view {}: primary={p} backup={b} run={r}", self.number)
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
    /// The backup holds the VM's state (its snapshot or the log from boot).
    pub backup_ready: bool,
    /// The exit the backup had replayed to at its last ping.
    pub backup_applied: u64,
    /// Console bytes of this run released so far (as last reported).
    pub released: u64,
    /// The run's primary is gone and no backup holds its state.
    pub lost: bool,
    /// The run's guest ended (its primary said so).
    pub ended: bool,
}

impl Status {
    /// One line on where the cluster stands and what it waits for.
    pub fn state(&self) -> String {
        let v = &self.view;
        let (p, b, r) = (or_dash(&v.primary), or_dash(&v.backup), or_dash(&v.run));
        if self.ended {
            return format!("ended: the guest of run {r} ended; a new primary starts a new run");
        }
        if self.lost {
            return format!(
                "lost: the VM of run {r} is lost: its primary {p} is gone and no backup holds its state ({} bytes of its output or more were released); start a primary with --new-run to boot a new VM",
                self.released
            );
        }
        match (&v.primary, self.lease_left_ms, &v.backup) {
            (None, _, None) => "waiting: no primary yet".into(),
            (None, _, Some(_)) => format!("waiting: backup {b} waits for a primary"),
            (Some(_), Some(_), None) => format!("running: primary {p}, no backup (output is released unprotected)"),
            (Some(_), Some(_), Some(_)) if !self.backup_ready => {
                format!("running: primary {p}; backup {b} is joining (state transfer); output is held until it has the state")
            }
            (Some(_), Some(_), Some(_)) if !self.backup_alive => format!("running: primary {p}; backup {b} is silent (output held; dropped after {BACKUP_TIMEOUT:?})"),
            (Some(_), Some(_), Some(_)) => format!("running: primary {p}, backup {b} protecting"),
            (Some(_), None, _) if self.backup_alive => format!("failing over: the lease of primary {p} ran out; backup {b} takes over"),
            (Some(_), None, _) => format!("waiting: the lease of primary {p} ran out; backup {b} is silent and may still take over"),
        }
    }
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
    #[error("witness state file {path}: {msg}")]
    State { path: String, msg: String },
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the etcd cluster {at}: {msg}")]
    EtcdUnreachable { at: String, msg: String },
    #[error("the etcd cluster {at} did not accept the credentials given (--etcd-user, --etcd-password-file): {msg}")]
    EtcdAuth { at: String, msg: String },
    #[error("etcd cluster {at}: {msg}")]
    EtcdForeign { at: String, msg: String },
    #[error("the etcd cluster {at} and this client did not agree on TLS (check --etcd-ca, --etcd-cert, --etcd-key): {msg}")]
    EtcdTls { at: String, msg: String },
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
    format!("view={} primary={} backup={} run={}", v.number, or_dash(&v.primary), or_dash(&v.backup), or_dash(&v.run))
}

/// 64 random bits in hex: member and run ids.
pub fn random_id() -> String {
    let mut b = [0u8; 8];
    // Only uniqueness matters here (the cluster key is what keeps strangers out).
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)).to_le_bytes();
    }
    format!("{:016x}", u64::from_le_bytes(b))
}

/// A new member name for a process listening on `addr`.
pub fn new_member(addr: &str) -> String {
    format!("{addr}@{}", random_id())
}

/// The address a member listens on (`ADDR@ID` -> `ADDR`).
pub fn addr_of(member: &str) -> &str {
    member.rsplit_once('@').map_or(member, |(a, _)| a)
}
