//! The witness on an etcd cluster (`--witness etcd://HOST:PORT,...`): the
//! same rules (`rules.rs`) applied to a view kept in etcd, so that the
//! view service has no single point of failure.
//!
//! Keys under the prefix (`--witness-prefix`, one per VM):
//!
//! ```text
//! PREFIX/cluster   "ftvm-witness 1 key=FP": whose view this is (FP: a
//!                  fingerprint of the cluster key), made by the first primary
//! PREFIX/state     the rules' state as one line (`State::stored_line`)
//! PREFIX/primary   the primary's name, attached to its primary lease
//! PREFIX/backup    the backup's name, attached to its backup lease
//! ```
//!
//! Every operation reads the prefix at one revision (a linearizable
//! range), applies the rule, and writes back only through a transaction
//! that compares the mod revisions of `state`, `primary` and `backup` with
//! what it read (rules 1 and 3: a decision is committed only if nothing it
//! was based on changed; otherwise it is taken again). Liveness is etcd's:
//! the primary's lease is alive while `PREFIX/primary` exists with its
//! name (etcd deletes it when the lease expires), the backup likewise.
//! A role process holds an etcd lease for the role it plays (the
//! primary's short, [`PRIMARY_TTL_SECS`]; the backup's as long as the
//! embedded witness's backup timeout, [`BACKUP_TTL_SECS`]), renewed
//! (keep-alive) at the start of every ping, join or promotion, after the
//! caller took the time its own lease is counted from; the safety argument is in
//! docs/DESIGN.md ("The witness on etcd").
//!
//! The etcd client is async; each process runs one small tokio runtime
//! and every call is bounded by a quarter of the primary's lease
//! ([`Session::call`]): a member that stalls (it does not refuse the
//! connection, it just does not answer) must not cost a whole lease.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use etcd_client::{Certificate, Client, Compare, Identity, TlsOptions, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use sha2::{Digest, Sha256};

use super::rules::State;
use super::{check_name, parse_kv, promotion_from, status_from, view_from, Promotion, Status, Timeouts, View, WitnessApi, WitnessError};
use crate::ft::key::ClusterKey;
use crate::ft::lease_clock::BootInstant;

/// Connecting (and authenticating) to the cluster.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds of one request's time limit (a quarter of the primary's lease).
const CALL_MIN: Duration = Duration::from_millis(200);
const CALL_MAX: Duration = Duration::from_secs(1);
/// The primary's lease asked for; etcd grants at least its minimum
/// (1.5 election timeouts, rounded up to whole seconds: 2 s with etcd's
/// defaults), and the granted length is what counts.
const PRIMARY_TTL_SECS: i64 = 1;
/// A backup silent this long drops out of the view (as
/// `BACKUP_TIMEOUT` with the embedded witness).
const BACKUP_TTL_SECS: i64 = 2;
/// Progress (ordinals, bytes released) is written at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// A transaction that lost a race is taken again this many times.
const TRIES: usize = 8;
const MARK: &str = "ftvm-witness 1";

/// How to reach an etcd cluster, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `--witness-prefix`.
    pub prefix: Option<String>,
    /// `--etcd-user` and `--etcd-password-file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `--etcd-ca`: speak TLS, trusting this CA (PEM).
    pub ca: Option<PathBuf>,
    /// `--etcd-cert`, `--etcd-key`: the client certificate and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdOptions {
    pub fn any(&self) -> bool {
        self.prefix.is_some() || self.user.is_some() || self.password_file.is_some() || self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// TLS to etcd: the CA to trust and, optionally, a client identity.
#[derive(Clone)]
struct Tls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// An etcd cluster and where in it this VM's view lives.
#[derive(Clone)]
pub struct EtcdTarget {
    endpoints: Vec<String>,
    prefix: String,
    /// etcd user and password (`--etcd-user`, `--etcd-password-file`).
    user: Option<(String, String)>,
    tls: Option<Tls>,
}

impl EtcdTarget {
    pub(super) fn new(endpoints: &str, o: &EtcdOptions) -> Result<EtcdTarget, WitnessError> {
        let (prefix, user, password_file) = (o.prefix.as_deref(), o.user.as_deref(), o.password_file.clone());
        let usage = |m: String| WitnessError::Usage(m);
        // etcd://ENDPOINTS/PREFIX names the prefix too.
        let (endpoints, path) = match endpoints.split_once('/') {
            Some((e, p)) => (e, Some(format!("/{p}"))),
            None => (endpoints, None),
        };
        let prefix = match (prefix, path.as_deref()) {
            (Some(a), Some(b)) if a.trim_end_matches('/') != b.trim_end_matches('/') => {
                return Err(usage(format!("--witness-prefix {a} and the witness URL's path {b} differ")))
            }
            (a, b) => a.or(b),
        };
        let endpoints: Vec<String> = endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect();
        if endpoints.is_empty() {
            return Err(usage("--witness etcd:// names no endpoint (etcd://HOST:PORT[,HOST:PORT...])".into()));
        }
        if let Some(e) = endpoints.iter().find(|e| e.contains('/') || !e.contains(':')) {
            return Err(usage(format!("etcd endpoint {e:?} is not HOST:PORT")));
        }
        let prefix = prefix.unwrap_or("/ftvm/default").trim_end_matches('/').to_string();
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(usage(format!("--witness-prefix {prefix:?} must be a non-empty path without spaces, e.g. /ftvm/web1")));
        }
        let user = match (user, password_file) {
            (None, None) => None,
            (Some(u), Some(f)) => {
                let pw = std::fs::read_to_string(&f).map_err(|e| usage(format!("--etcd-password-file {}: {e}", f.display())))?;
                let pw = pw.trim_end_matches(['\n', '\r']).to_string();
                if pw.is_empty() {
                    return Err(usage(format!("--etcd-password-file {} is empty", f.display())));
                }
                Some((u.to_string(), pw))
            }
            _ => return Err(usage("--etcd-user and --etcd-password-file go together".into())),
        };
        let read = |what: &str, f: &PathBuf| std::fs::read(f).map_err(|e| usage(format!("{what} {}: {e}", f.display())));
        let tls = match (&o.ca, &o.cert, &o.key) {
            (None, None, None) => None,
            (Some(ca), cert, key) => {
                let identity = match (cert, key) {
                    (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
                    (None, None) => None,
                    _ => return Err(usage("--etcd-cert and --etcd-key go together".into())),
                };
                Some(Tls { ca: read("--etcd-ca", ca)?, identity })
            }
            _ => return Err(usage("--etcd-cert/--etcd-key need --etcd-ca (the CA that signed etcd's certificate)".into())),
        };
        Ok(EtcdTarget { endpoints, prefix, user, tls })
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }
}

impl fmt::Display for EtcdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tls = if self.tls.is_some() { ", TLS" } else { "" };
        write!(f, "etcd://{} (prefix {}{tls})", self.endpoints.join(","), self.prefix)
    }
}

impl fmt::Debug for EtcdTarget {
    // Never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.user.as_ref().map(|(u, _)| u.as_str());
        write!(f, "EtcdTarget({self}, user {user:?})")
    }
}

fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ftvm-etcd")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the etcd client's runtime: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The role a lease is held for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Primary,
    Backup,
}

impl Role {
    fn ask_secs(self) -> i64 {
        match self {
            Role::Primary => PRIMARY_TTL_SECS,
            Role::Backup => BACKUP_TTL_SECS,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

/// The etcd lease of one member in one role (id 0: none yet, or etcd
/// said it expired). A lease belongs to a member, not to the process: a
/// backup that rejoins as a new member must not keep its old name alive.
#[derive(Default)]
struct Lease {
    member: String,
    id: i64,
    ttl: Duration,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// When it was granted or a request of its role last went through.
    ok_at: Option<BootInstant>,
}

fn call_limit(primary_ttl: Duration) -> Duration {
    (primary_ttl / 4).clamp(CALL_MIN, CALL_MAX)
}

fn not_found(e: &WitnessError) -> bool {
    matches!(e, WitnessError::EtcdUnreachable { msg, .. } if msg.to_lowercase().contains("lease not found"))
}

/// One connection and one lease per role per process and target, shared
/// by all of the process's witness clients: the role's name in the view
/// hangs on one lease, whichever thread renews it.
struct Session {
    target: EtcdTarget,
    fingerprint: String,
    client: Mutex<Option<Client>>,
    /// Leases for the primary role and the backup role.
    leases: [Mutex<Lease>; 2],
    /// A request's time limit in ms: a quarter of the primary's lease.
    call_ms: std::sync::atomic::AtomicU64,
    /// The prefix was found to be this cluster's (or empty).
    checked: Mutex<bool>,
}

fn session(target: &EtcdTarget, key: &ClusterKey) -> Arc<Session> {
    static SESSIONS: OnceLock<Mutex<HashMap<String, Arc<Session>>>> = OnceLock::new();
    let fingerprint = {
        let mut h = Sha256::new();
        h.update(b"ftvm witness cluster ");
        h.update(key.bytes());
        h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let id = format!("{target:?} {fingerprint}");
    let mut all = SESSIONS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    all.entry(id)
        .or_insert_with(|| {
            Arc::new(Session {
                target: target.clone(),
                fingerprint,
                client: Mutex::new(None),
                leases: Default::default(),
                call_ms: std::sync::atomic::AtomicU64::new(call_limit(Duration::from_secs(PRIMARY_TTL_SECS as u64)).as_millis() as u64),
                checked: Mutex::new(false),
            })
        })
        .clone()
}

/// A key as read: value, mod revision (0: absent), lease.
#[derive(Default, Clone, Debug)]
struct Entry {
    value: Option<String>,
    rev: i64,
    lease: i64,
}

impl Entry {
    fn holds(&self, name: &str) -> bool {
        self.value.as_deref() == Some(name)
    }
}

/// The prefix at one revision.
#[derive(Default, Debug)]
struct Snapshot {
    mark: Entry,
    state: Entry,
    primary: Entry,
    backup: Entry,
    others: usize,
}

impl Session {
    fn at(&self) -> String {
        self.target.to_string()
    }

    fn error(&self, e: etcd_client::Error) -> WitnessError {
        let msg = e.to_string();
        let low = msg.to_lowercase();
        if ["authentication failed", "permission denied", "user name", "unauthenticated", "invalid auth token"].iter().any(|s| low.contains(s)) {
            WitnessError::EtcdAuth { at: self.at(), msg }
        } else if ["certificate", "fatal alert", "handshake"].iter().any(|s| low.contains(s))
            // Over TLS, a connection that was made and then dropped is
            // etcd refusing our certificate (or its absence).
            || (self.target.tls.is_some() && !low.contains("tcp connect error") && ["broken pipe", "connection reset", "unexpected eof"].iter().any(|s| low.contains(s)))
        {
            WitnessError::EtcdTls { at: self.at(), msg }
        } else {
            WitnessError::EtcdUnreachable { at: self.at(), msg }
        }
    }

    /// Runs one request, bounded by a quarter of the primary's lease: a
    /// stalled member then costs a ping, not the lease (the next ping,
    /// 100 ms later, likely goes to another member).
    fn call<T>(&self, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, WitnessError> {
        // Not through the lease's lock: calls are made while holding it.
        let limit = Duration::from_millis(self.call_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.call_within(limit, f)
    }

    fn call_within<T>(&self, limit: Duration, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, WitnessError> {
        let rt = runtime().map_err(|msg| WitnessError::EtcdUnreachable { at: self.at(), msg })?;
        match rt.block_on(async { tokio::time::timeout(limit, f).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(WitnessError::EtcdUnreachable { at: self.at(), msg: format!("no answer within {limit:?}") }),
        }
    }

    fn client(&self) -> Result<Client, WitnessError> {
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(CALL_MAX)
            // HTTP/2 pings find a stalled member's connection dead.
            .with_keep_alive(Duration::from_millis(500), Duration::from_millis(500))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others answers nothing rather
            // than something stale.
            .with_require_leader(true)
            // Tokens expire (simple tokens after --auth-token-ttl, JWTs
            // after their ttl): get a new one rather than fail for good.
            .with_auto_token_refresh(true);
        if let Some((u, p)) = &self.target.user {
            opts = opts.with_user(u.clone(), p.clone());
        }
        let mut endpoints = self.target.endpoints.clone();
        if let Some(tls) = &self.target.tls {
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
            endpoints = endpoints.iter().map(|e| format!("https://{e}")).collect();
        }
        let client = self.call_within(CONNECT_TIMEOUT, Client::connect(endpoints, Some(opts)))?;
        *c = Some(client.clone());
        Ok(client)
    }

    /// Reads the whole prefix at one revision.
    fn read(&self) -> Result<Snapshot, WitnessError> {
        let mut client = self.client()?;
        let prefix = format!("{}/", self.target.prefix);
        let resp = self.call(client.get(prefix.clone(), Some(GetOptions::new().with_prefix())))?;
        let mut snap = Snapshot::default();
        for kv in resp.kvs() {
            let entry = Entry { value: Some(String::from_utf8_lossy(kv.value()).into_owned()), rev: kv.mod_revision(), lease: kv.lease() };
            match kv.key().strip_prefix(prefix.as_bytes()) {
                Some(b"cluster") => snap.mark = entry,
                Some(b"state") => snap.state = entry,
                Some(b"primary") => snap.primary = entry,
                Some(b"backup") => snap.backup = entry,
                _ => snap.others += 1,
            }
        }
        Ok(snap)
    }

    /// The prefix must be this cluster's: marked with our key's
    /// fingerprint, or empty (then marked, if `mark`).
    fn check_prefix(&self, snap: &Snapshot, mark: bool) -> Result<(), WitnessError> {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if *checked {
            return Ok(());
        }
        let want = format!("{MARK} key={}", self.fingerprint);
        let foreign = |msg: String| WitnessError::EtcdForeign { at: self.at(), msg };
        let prefix = &self.target.prefix;
        match snap.mark.value.as_deref() {
            Some(v) if v == want => {}
            Some(v) if v.starts_with(MARK) => {
                return Err(foreign(format!(
                    "prefix {prefix} holds the view of another ftvm cluster (made with a different cluster key); give each VM its own --witness-prefix"
                )))
            }
            Some(v) => return Err(foreign(format!("prefix {prefix} holds data that is not an ftvm witness's ({prefix}/cluster = {v:?})"))),
            None if snap.state.value.is_some() || snap.primary.value.is_some() || snap.backup.value.is_some() || snap.others > 0 => {
                return Err(foreign(format!("prefix {prefix} holds data that is not an ftvm witness's (keys without {prefix}/cluster)")))
            }
            None if !mark => return Ok(()), // nothing yet: an empty view
            None => {
                let key = self.target.key("cluster");
                let mut client = self.client()?;
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, want, None)]);
                if !self.call(client.txn(txn))?.succeeded() {
                    // Another role marked it meanwhile: check its mark.
                    drop(checked);
                    return self.check_prefix(&self.read()?, false);
                }
            }
        }
        *checked = true;
        Ok(())
    }

    fn lease(&self, role: Role) -> std::sync::MutexGuard<'_, Lease> {
        self.leases[role as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the lease of `me` in `role` alive (or takes a new one if
    /// etcd says it expired, or `me` is a new member); returns its id and
    /// length.
    fn renew(&self, role: Role, me: &str) -> Result<(i64, Duration), WitnessError> {
        let mut client = self.client()?;
        let mut l = self.lease(role);
        if l.member != me {
            // The old member's lease is left to lapse, and its name with it.
            *l = Lease { member: me.to_string(), ..Lease::default() };
        }
        if l.id != 0 {
            let quiet = l.ok_at.map_or(Duration::ZERO, |t| t.elapsed());
            if quiet > l.ttl {
                // The role's requests have failed for a whole lease while
                // keep-alives might still go through (an auth token that
                // expired, a stream opened before): the old lease is no
                // longer kept alive, so that the view never waits on a role
                // that cannot act. A new one is taken at once; the role's
                // key moves to it only through a transaction that goes
                // through, which proves the role can act again.
                log::warn!("witness: no request of {me} went through for {quiet:?}; its etcd lease {:x} is left to lapse", l.id);
                *l = Lease { member: me.to_string(), ..Lease::default() };
            } else {
                let mut tries = 0;
                loop {
                    tries += 1;
                    match self.keep_alive(&mut client, &mut l) {
                        Ok(Some(ttl)) => {
                            l.ttl = ttl;
                            self.note_ttl(role, ttl);
                            return Ok((l.id, ttl));
                        }
                        Ok(None) => {
                            log::warn!("witness: etcd lease {:x} of {me} expired; taking a new one", l.id);
                            *l = Lease { member: me.to_string(), ..Lease::default() };
                            break;
                        }
                        // Once more on a new stream: it may reach another member.
                        Err(_) if tries < 2 => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let r = self.call(client.lease_grant(role.ask_secs(), None))?;
        *l = Lease {
            member: me.to_string(),
            id: r.id(),
            ttl: Duration::from_secs(r.ttl().max(1) as u64),
            keeper: None,
            ok_at: Some(BootInstant::now()),
        };
        log::info!("witness: etcd {role:?} lease {:x} of {:?} for {me}", l.id, l.ttl);
        self.note_ttl(role, l.ttl);
        Ok((l.id, l.ttl))
    }

    fn note_ttl(&self, role: Role, ttl: Duration) {
        if role == Role::Primary {
            self.call_ms.store(call_limit(ttl).as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// One keep-alive: `Some(ttl)` renewed, `None` the lease is gone.
    fn keep_alive(&self, client: &mut Client, l: &mut Lease) -> Result<Option<Duration>, WitnessError> {
        if l.keeper.is_none() {
            match self.call(client.lease_keep_alive(l.id)) {
                Ok(k) => l.keeper = Some(k),
                Err(e) if not_found(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        let (keeper, stream) = l.keeper.as_mut().expect("set above");
        let answer = self.call(async {
            keeper.keep_alive().await?;
            stream.message().await
        });
        match answer {
            Ok(Some(r)) if r.ttl() > 0 => Ok(Some(Duration::from_secs(r.ttl() as u64))),
            Ok(Some(_)) => Ok(None),
            Ok(None) => {
                l.keeper = None;
                Err(WitnessError::EtcdUnreachable { at: self.at(), msg: "the lease keep-alive stream closed".into() })
            }
            Err(e) => {
                l.keeper = None;
                if not_found(&e) {
                    return Ok(None);
                }
                Err(e)
            }
        }
    }

    /// A request of `me` in `role` went through.
    fn went_through(&self, role: Role, me: &str) {
        let mut l = self.lease(role);
        if l.member == me {
            l.ok_at = Some(BootInstant::now());
        }
    }

    /// After an authentication error: connect (and authenticate) anew.
    fn reconnect(&self) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for role in [Role::Primary, Role::Backup] {
            self.lease(role).keeper = None;
        }
    }

    fn ttl(&self, role: Role) -> Option<Duration> {
        let l = self.lease(role);
        (l.id != 0).then_some(l.ttl)
    }

    /// What is left of a lease, as etcd says (None: gone). etcd counts in
    /// whole seconds, rounded down: this is the upper end of that second.
    fn left(&self, lease: i64) -> Result<Option<Duration>, WitnessError> {
        let mut client = self.client()?;
        let r = self.call(client.lease_time_to_live(lease, None))?;
        Ok((r.ttl() >= 0).then(|| Duration::from_secs(r.ttl() as u64 + 1)))
    }
}

/// One request of the witness protocol.
enum Op<'a> {
    BecomePrimary { me: &'a str, run: &'a str, new_run: bool },
    BackupPing { me: &'a str, view: u64, ready: bool, applied: u64 },
    PrimaryPing { me: &'a str, view: u64, sent: u64, acked: u64, released: u64 },
    Promote { me: &'a str, view: u64, lost: bool, ready: bool },
    DropBackup { me: &'a str, view: u64, backup: &'a str },
    Ended { me: &'a str },
    View,
    Status,
}

impl Op<'_> {
    /// The member asking and the role whose lease the request renews
    /// (a promotion renews the primary lease it is about to hold).
    fn holder(&self) -> Option<(&str, Role)> {
        match self {
            Op::BecomePrimary { me, .. } | Op::PrimaryPing { me, .. } | Op::Promote { me, .. } => Some((me, Role::Primary)),
            Op::BackupPing { me, .. } => Some((me, Role::Backup)),
            _ => None,
        }
    }

    fn apply(&self, st: &mut State, now: BootInstant) -> Result<String, String> {
        match *self {
            Op::BecomePrimary { me, run, new_run } => st.become_primary(me, run, new_run, now),
            Op::BackupPing { me, view, ready, applied } => st.backup_ping(me, view, ready, applied, now),
            Op::PrimaryPing { me, view, sent, acked, released } => st.primary_ping(me, view, sent, acked, released, now),
            Op::Promote { me, view, lost, ready } => st.promote(me, view, lost, ready, now),
            Op::DropBackup { me, view, backup } => st.drop_backup(me, view, backup, now),
            Op::Ended { me } => st.ended(me),
            Op::View => Ok(super::view_kv(&st.view)),
            Op::Status => Ok(st.status(now)),
        }
    }
}

pub(super) struct EtcdWitness {
    session: Arc<Session>,
    /// When this process's backup first asked to be promoted over a live
    /// primary, and in which view (the rules drop it after two leases).
    promote_asked: Option<(u64, BootInstant)>,
    progress_written: Option<BootInstant>,
}

impl EtcdWitness {
    pub(super) fn new(target: &EtcdTarget, key: &ClusterKey) -> EtcdWitness {
        EtcdWitness { session: session(target, key), promote_asked: None, progress_written: None }
    }

    fn refused(&self, msg: String) -> WitnessError {
        WitnessError::Refused { addr: self.session.at(), msg }
    }

    fn protocol(&self, line: &str) -> WitnessError {
        WitnessError::Protocol { addr: self.session.at(), line: line.to_string() }
    }

    /// Read, apply the rule, commit what changed if nothing it was based
    /// on moved meanwhile; the rule's answer as `key=value` tokens.
    fn run(&mut self, op: Op) -> Result<HashMap<String, String>, WitnessError> {
        let r = self.run_once(op);
        if let Err(WitnessError::EtcdAuth { .. }) = &r {
            self.session.reconnect();
        }
        r
    }

    fn run_once(&mut self, op: Op) -> Result<HashMap<String, String>, WitnessError> {
        let s = self.session.clone();
        let mut lease = match op.holder() {
            Some((me, role)) => {
                check_name(me).map_err(|m| self.refused(m))?;
                Some(s.renew(role, me)?)
            }
            None => None,
        };
        for _ in 0..TRIES {
            let snap = s.read()?;
            s.check_prefix(&snap, op.holder().is_some())?;
            let now = BootInstant::now();
            let stored = snap.state.value.as_deref();
            let view_of = |line: Option<&str>| line.and_then(parse_kv).and_then(|kv| view_from(&kv)).unwrap_or_default();
            let before = view_of(stored);
            let primary_alive = before.primary.as_deref().is_some_and(|p| snap.primary.holds(p));
            let lease_len = self.lease();
            let lease_left = match (&op, primary_alive) {
                (Op::Status, true) => s.left(snap.primary.lease)?,
                (_, true) => Some(lease_len),
                (_, false) => None,
            };
            let backup_alive = before.backup.as_deref().is_some_and(|b| snap.backup.holds(b));
            let t = Timeouts { lease: lease_len, ..Timeouts::default() };
            let mut st = State::from_stored(t, stored, lease_left, backup_alive, now).map_err(|m| self.protocol(&m))?;
            st.set_promote_asked(self.promote_asked.filter(|(v, _)| *v == before.number).map(|(_, t)| t));
            let (durable, progress) = (st.durable(), st.progress());
            let answer = op.apply(&mut st, now);
            self.promote_asked = st.promote_asked().map(|t| (before.number, t));

            let mut ops = Vec::new();
            if let (Some((me, role)), Some((id, _)), true) = (op.holder(), lease, answer.is_ok()) {
                // The role's key names it under the lease just renewed.
                let (entry, holds_role) = match role {
                    Role::Primary => (&snap.primary, st.view.primary.as_deref() == Some(me)),
                    Role::Backup => (&snap.backup, st.view.backup.as_deref() == Some(me)),
                };
                if holds_role && !(entry.holds(me) && entry.lease == id) {
                    ops.push(TxnOp::put(s.target.key(role.key()), me, Some(PutOptions::new().with_lease(id))));
                }
                if snap.backup.holds(me) && st.view.backup.as_deref() != Some(me) {
                    ops.push(TxnOp::delete(s.target.key("backup"), None));
                }
            }
            let progress_due = st.progress() != progress && self.progress_written.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            let must = st.durable() != durable || !ops.is_empty() || (stored.is_none() && st.view.number > 0);
            if must || progress_due {
                ops.push(TxnOp::put(s.target.key("state"), st.stored_line(), None));
                let when = [
                    Compare::mod_revision(s.target.key("state"), CompareOp::Equal, snap.state.rev),
                    Compare::mod_revision(s.target.key("primary"), CompareOp::Equal, snap.primary.rev),
                    Compare::mod_revision(s.target.key("backup"), CompareOp::Equal, snap.backup.rev),
                ];
                let mut client = s.client()?;
                match s.call(client.txn(Txn::new().when(when).and_then(ops))) {
                    Ok(r) if r.succeeded() => self.progress_written = Some(BootInstant::now()),
                    Ok(_) => continue, // something moved: decide again
                    Err(WitnessError::EtcdUnreachable { msg, .. }) if msg.contains("lease not found") => {
                        // Our lease expired between renewal and commit.
                        if let Some((me, role)) = op.holder() {
                            s.lease(role).id = 0;
                            lease = Some(s.renew(role, me)?);
                        }
                        continue;
                    }
                    // Only progress counters to write: they can wait.
                    Err(e) if !must => log::debug!("witness: progress not written: {e}"),
                    Err(e) => return Err(e),
                }
            }
            if let Some((me, role)) = op.holder() {
                s.went_through(role, me);
            }
            return match answer {
                Ok(line) => parse_kv(&line).ok_or_else(|| self.protocol(&line)),
                Err(msg) => Err(self.refused(msg)),
            };
        }
        Err(WitnessError::EtcdUnreachable { at: s.at(), msg: format!("the view kept changing under {TRIES} tries") })
    }

    fn view_op(&mut self, op: Op) -> Result<View, WitnessError> {
        let kv = self.run(op)?;
        view_from(&kv).ok_or_else(|| self.protocol(&format!("{kv:?}")))
    }
}

impl WitnessApi for EtcdWitness {
    fn become_primary(&mut self, me: &str, run: &str, new_run: bool) -> Result<View, WitnessError> {
        check_name(run).map_err(|m| self.refused(m))?;
        self.view_op(Op::BecomePrimary { me, run, new_run })
    }

    fn backup_ping(&mut self, me: &str, view: u64, ready: bool, applied: u64) -> Result<View, WitnessError> {
        self.view_op(Op::BackupPing { me, view, ready, applied })
    }

    fn primary_ping(&mut self, me: &str, view: u64, sent: u64, acked: u64, released: u64) -> Result<View, WitnessError> {
        self.view_op(Op::PrimaryPing { me, view, sent, acked, released })
    }

    fn promote(&mut self, me: &str, view: u64, lost: bool, ready: bool) -> Result<Promotion, WitnessError> {
        let kv = self.run(Op::Promote { me, view, lost, ready })?;
        promotion_from(&kv).ok_or_else(|| self.protocol(&format!("{kv:?}")))
    }

    fn drop_backup(&mut self, me: &str, view: u64, backup: &str) -> Result<View, WitnessError> {
        check_name(me).and_then(|_| check_name(backup)).map_err(|m| self.refused(m))?;
        self.view_op(Op::DropBackup { me, view, backup })
    }

    fn ended(&mut self, me: &str) -> Result<View, WitnessError> {
        check_name(me).map_err(|m| self.refused(m))?;
        self.view_op(Op::Ended { me })
    }

    fn view(&mut self) -> Result<View, WitnessError> {
        self.view_op(Op::View)
    }

    fn status(&mut self) -> Result<Status, WitnessError> {
        let kv = self.run(Op::Status)?;
        status_from(&kv).ok_or_else(|| self.protocol(&format!("{kv:?}")))
    }

    fn lease(&self) -> Duration {
        self.session.ttl(Role::Primary).unwrap_or(Duration::from_secs(PRIMARY_TTL_SECS as u64))
    }

    fn describe(&self) -> String {
        self.session.at()
    }
}
