//! Fault injection against real ftvm roles (issue 8, "Tests"): a
//! randomized schedule of mixed faults, the named scenarios of the issue,
//! and failover measurements.
//!
//! Every role is a real `ftvm` process on /dev/kvm running the test guest;
//! faults are real: `kill -9`, `SIGSTOP`/`SIGCONT`, restarts at the same
//! address, links cut or slowed. Each role runs in a network namespace of
//! its own (loopback only; `cluster.rs`, `Netns`), reached through
//! forwarders we control, so its link to the witness and the log stream to
//! it can be cut or slowed (20 ms per receive). Without namespaces (not
//! root) the roles share the test's namespace and only the witness links
//! are ours.
//!
//! A schedule (`Plan::from_seed`): the test guest for 6 s at hz=100 or
//! 1000, a backup there from the start (or joining at a random moment),
//! and 1-4 faults at random moments in the first 3.5 s: kill -9 of the
//! primary or of the backup (whichever processes the witness names then),
//! SIGSTOP/SIGCONT of the primary, the backup or the witness for 0.1-3 s,
//! a restart of the role killed last at the same address (as `ftvm backup`,
//! or as `ftvm primary`, which must be refused), the primary's witness link
//! cut for 0.3-3 s, every witness link or the log stream to the backup
//! slowed to 20 ms per receive for 0.5-3 s, a new backup; in some
//! schedules the witness is killed and restarted 0.1-2 s later with its
//! state file (`--state`). One `ftvm
//! console` is the outside world.
//!
//! The checker, for every schedule: (a) safety: what the console printed
//! is one run's output, every line once and in order with the test
//! guest's checksum chain unbroken (`check_chain`; a VM lost in the middle
//! of a line may leave that line unfinished), nothing printed after the
//! cluster said the VM was lost, no restarted `ftvm primary` accepted;
//! (b) progress: within `PROGRESS_BOUND` (20 s) after the last fault ends,
//! one of
//! - `Completed`: `[done]`, console exit 0, every line once;
//! - `Lost`: `ftvm status` says `state: lost` and the primary's process is
//!   dead; the console stops by itself saying the VM "is lost" (exit 1), or
//!   a `--new-run` primary must make it stop with "is gone" (exit 3)
//!   without a byte of the new run;
//! - `Orphaned`: a double failure within the backup timeout: the primary
//!   died while the view's backup, which holds the state, was silent, and
//!   that backup's process is dead too; the witness waits for it ("may
//!   still take over"); `--new-run` must then stop the console as above.
//!
//! A failure prints the seed, the schedule, what happened when (journal),
//! the console's output and every role's stderr (tails) and the witness's
//! status. At the end a summary on stderr: outcomes, failovers, failover
//! time after kill -9 (to the console's first output from the new primary)
//! p50/p99/worst, over all kills and over kills with no other fault near.
//!
//! `FTVM_CHAOS_SCHEDULES=N` sets the number of schedules (default 50),
//! `FTVM_CHAOS_SEED=S` reruns exactly one, `FTVM_CHAOS_PARALLEL=K` runs K at
//! a time (default 2), `FTVM_CHAOS_BASE=B` fixes the seeds of the whole set,
//! `FTVM_CHAOS_BUDGET_S=T` starts no schedule after T s (default 540),
//! `FTVM_CHAOS_VERBOSE=1` prints every schedule's journal and stderr tails,
//! `FTVM_TEST_NO_NETNS=1` runs without network namespaces.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/cluster.rs"]
mod cluster;
use cluster::*;

/// Guest time of a schedule's run, and its lines (10 a second).
const GUEST_SECONDS: u64 = 6;
const LINES: usize = 60;
/// Once the last fault has ended, the run completes or the cluster says
/// the VM is lost within this long.
const PROGRESS_BOUND: Duration = Duration::from_secs(20);
/// A kill -9 of the primary with no other fault near it (100 ms before to
/// 2 s after) fails over within this long (the console's first output
/// from the new primary); the 500 ms lease is most of it.
const FAILOVER_BOUND: Duration = Duration::from_secs(3);
/// A slow link holds each receive this long.
const SLOW_MS: u64 = 20;

// ------------------------------------------------------------------ randomness

/// splitmix64: one seed, one schedule, on any machine.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
}

// ------------------------------------------------------------------ the fabric

/// One role's slot: an address (127.0.0.1:port, the same in its namespace
/// and, through a forwarder, here), its namespace, its links, and the
/// processes that ran there (the last one current).
struct Member {
    name: String,
    addr: String,
    port: u16,
    ns: Option<Arc<Netns>>,
    /// Into the role: the log stream to it, consoles to it.
    inbound: Option<Link>,
    /// Its link to the witness.
    wlink: Link,
    /// Inside its namespace: to the other roles.
    outs: Vec<Link>,
    procs: Vec<(String, Proc)>,
    killed: bool,
}

impl Member {
    fn cur(&mut self) -> Option<&mut Proc> {
        self.procs.last_mut().map(|(_, p)| p)
    }
    fn alive(&mut self) -> bool {
        self.cur().is_some_and(|p| p.child.try_wait().ok().flatten().is_none())
    }
    fn witness_addr(&self, w_port: u16) -> String {
        match self.ns {
            Some(_) => format!("127.0.0.1:{w_port}"),
            None => format!("127.0.0.1:{}", self.wlink.port),
        }
    }
}

/// A cluster under test: the witness (here), its members, the console.
struct Fabric {
    w: String,
    w_port: u16,
    witness: Proc,
    /// Its state file (`--state`): a restarted witness reads its view there.
    w_state: String,
    /// Witness processes that ran before the current one.
    old_witnesses: Vec<Proc>,
    use_ns: bool,
    members: Vec<Member>,
    /// What happened, with times since the start, for reports.
    journal: Vec<String>,
    t0: Instant,
    /// The (primary, backup) ports the witness named last, kept fresh by a
    /// poller: a fault aimed at "the primary" while the witness is stopped
    /// hits the last one it named.
    seen: Arc<Mutex<(Option<u16>, Option<u16>)>>,
    /// The backup member (`ADDR@ID`) the witness last named alive and
    /// holding the state.
    ready_seen: Arc<Mutex<Option<String>>>,
    /// Processes this test stopped or killed.
    disturbed: std::collections::HashSet<u32>,
    polling: Arc<std::sync::atomic::AtomicBool>,
    /// Primaries `ftvm status` called lost while their process ran.
    false_lost: Vec<String>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.polling.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Fabric {
    fn new() -> Fabric {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let w_state = scratch().join(format!("chaos-witness-{n}.state")).to_str().unwrap().to_string();
        let (witness, w) = listening(&["witness", "--state", &w_state], "witness: listening on");
        let w_port = w.rsplit(':').next().unwrap().parse().unwrap();
        let seen = Arc::new(Mutex::new((None, None)));
        let ready_seen = Arc::new(Mutex::new(None));
        let polling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        {
            let (w, seen, polling, ready_seen) = (w.clone(), seen.clone(), polling.clone(), ready_seen.clone());
            std::thread::spawn(move || {
                while polling.load(std::sync::atomic::Ordering::SeqCst) {
                    let s = status(&w);
                    if s.contains("primary:") {
                        *seen.lock().unwrap() =
                            (status_field(&s, "primary").and_then(member_port), status_field(&s, "backup").and_then(member_port));
                        if status_field(&s, "backup").is_some_and(|b| b.contains("(alive, holds the state")) {
                            *ready_seen.lock().unwrap() = Some(member_in(&s, "backup"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        Fabric {
            w,
            w_port,
            witness,
            w_state,
            old_witnesses: Vec::new(),
            use_ns: Netns::available(),
            members: Vec::new(),
            journal: Vec::new(),
            t0: Instant::now(),
            seen,
            ready_seen,
            disturbed: Default::default(),
            polling,
            false_lost: Vec::new(),
        }
    }

    fn note(&mut self, what: String) {
        self.journal.push(format!("{:>6} ms  {what}", self.t0.elapsed().as_millis()));
    }

    /// A new slot with a fresh address.
    fn add(&mut self, name: &str) -> usize {
        let wl = format!("127.0.0.1:{}", self.w_port);
        let m = if self.use_ns {
            let ns = Netns::new().expect("a network namespace");
            // Here: the forwarder into the role takes a fresh port; the role
            // listens on the same port inside.
            let inbound = {
                let ns2 = ns.clone();
                let mut tries = 0;
                loop {
                    // The port must be free here; inside, the role will bind it.
                    let to = format!("127.0.0.1:{}", free_port());
                    match link(&to, None, &to, Some(ns2.clone()), LinkCtl::new()) {
                        Ok(l) => break l,
                        Err(e) => {
                            tries += 1;
                            assert!(tries < 10, "no port for a member: {e}");
                        }
                    }
                }
            };
            let port = inbound.port;
            let wlink = link(&wl, Some(&ns), &wl, None, LinkCtl::new()).expect("the witness link");
            let mut outs = Vec::new();
            for o in &self.members {
                let a = format!("127.0.0.1:{}", o.port);
                if let Ok(l) = link(&a, Some(&ns), &a, None, LinkCtl::new()) {
                    outs.push(l);
                }
            }
            let a = format!("127.0.0.1:{port}");
            for o in &mut self.members {
                if let Some(ons) = &o.ns {
                    if let Ok(l) = link(&a, Some(ons), &a, None, LinkCtl::new()) {
                        o.outs.push(l);
                    }
                }
            }
            Member { name: name.into(), addr: a, port, ns: Some(ns), inbound: Some(inbound), wlink, outs, procs: Vec::new(), killed: false }
        } else {
            let wlink = link("127.0.0.1:0", None, &wl, None, LinkCtl::new()).expect("the witness link");
            let port = free_port();
            Member { name: name.into(), addr: format!("127.0.0.1:{port}"), port, ns: None, inbound: None, wlink, outs: Vec::new(), procs: Vec::new(), killed: false }
        };
        self.members.push(m);
        self.members.len() - 1
    }

    /// Starts `ftvm primary` (with `extra` options) or `ftvm backup` in slot `i`.
    fn start(&mut self, i: usize, role: &str, cmdline: &str, extra: &[&str]) {
        let w_port = self.w_port;
        let m = &mut self.members[i];
        let wa = m.witness_addr(w_port);
        let mut args = vec![role, "--witness", &wa, "--listen", &m.addr];
        if role == "primary" {
            args.extend(["--no-stdin", "--cmdline", cmdline]);
        }
        args.extend(extra);
        let p = spawn_in(m.ns.as_deref(), &args);
        let label = format!("{} ({role}{}{}, pid {})", m.name, if extra.is_empty() { "" } else { " " }, extra.join(" "), p.child.id());
        m.procs.push((label.clone(), p));
        m.killed = false;
        self.note(format!("started {label} at {}", self.members[i].addr));
    }

    /// Waits until slot `i`'s process says `what` on stderr (or ends).
    fn wait_says(&mut self, i: usize, what: &str, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        loop {
            let m = &mut self.members[i];
            let Some(p) = m.cur() else { return false };
            if p.err().contains(what) {
                return true;
            }
            if p.child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process that was view member `member` (`ADDR@ID`, as it named
    /// itself on stderr): (pid, still running).
    fn holder(&mut self, member: &str) -> Option<(u32, bool)> {
        let own = [format!("{member} is backup of view"), format!("{member} is primary of view")];
        for m in &mut self.members {
            for (_, p) in &mut m.procs {
                if own.iter().any(|o| p.err().contains(o.as_str())) {
                    return Some((p.child.id(), p.child.try_wait().ok().flatten().is_none()));
                }
            }
        }
        None
    }

    /// Whether the process that was view member `member` (`ADDR@ID`, as
    /// it named itself on stderr) still runs; None if none named itself so.
    fn holder_alive(&mut self, member: &str) -> Option<bool> {
        let own = [format!("{member} is backup of view"), format!("{member} is primary of view")];
        for m in &mut self.members {
            for (_, p) in &mut m.procs {
                let e = p.err();
                if own.iter().any(|o| e.contains(o.as_str())) {
                    return Some(p.child.try_wait().ok().flatten().is_none());
                }
            }
        }
        None
    }

    fn by_port(&mut self, port: Option<u16>) -> Option<usize> {
        let port = port?;
        self.members.iter().position(|m| m.port == port)
    }

    /// (primary, backup) slots as the witness named them last.
    fn view(&mut self) -> (Option<usize>, Option<usize>, String) {
        let (p, b) = *self.seen.lock().unwrap();
        (self.by_port(p), self.by_port(b), format!("primary port {p:?}, backup port {b:?}"))
    }

    /// kill -9 of the witness.
    fn kill_witness(&mut self) {
        self.witness.kill9();
        self.note("kill -9 witness".into());
    }

    /// A new witness at the same address with the same state file.
    fn restart_witness(&mut self) {
        let p = Proc::spawn(&["witness", "--listen", &self.w, "--state", &self.w_state]);
        let old = std::mem::replace(&mut self.witness, p);
        self.old_witnesses.push(old);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) && !self.witness.err().contains("listening on") {
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = self.witness.child.id();
        self.note(format!("witness restarted (pid {pid}) with its state file"));
    }

    fn kill(&mut self, i: usize) -> Option<u128> {
        let m = &mut self.members[i];
        if !m.alive() {
            return None;
        }
        let at = unix_ms();
        let pid = m.cur().unwrap().child.id();
        m.cur().unwrap().kill9();
        self.disturbed.insert(pid);
        m.killed = true;
        let n = m.name.clone();
        self.note(format!("kill -9 {n}"));
        Some(at)
    }

    /// Stderr tails of every process that ran, and the witness's.
    fn tails(&mut self) -> String {
        let mut s = String::new();
        for p in self.old_witnesses.iter().chain([&self.witness]) {
            s += &format!("--- witness {} (pid {}):\n{}", self.w, p.child.id(), tail(&p.err(), 30));
        }
        for m in &self.members {
            for (label, p) in &m.procs {
                s += &format!("--- {label} at {}:\n{}", m.addr, tail(&p.err(), 40));
            }
        }
        s
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    let from = v.len().saturating_sub(lines);
    let mut out = v[from..].join("\n");
    out.push('\n');
    out
}

fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: a plain kill(2).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

// ------------------------------------------------------------------ schedules

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Primary,
    Backup,
    Witness,
}

#[derive(Debug, Clone, PartialEq)]
enum Fault {
    KillPrimary,
    KillBackup,
    Pause { who: Who, ms: u64 },
    /// The slot killed last gets a new process at its address: `ftvm
    /// backup`, or `ftvm primary` as it was started first.
    Restart { as_backup: bool },
    CutPrimaryWitness { ms: u64 },
    SlowWitness { ms: u64 },
    SlowLog { ms: u64 },
    NewBackup,
    /// kill -9 of the witness, restarted `ms` later at its address with its
    /// state file.
    RestartWitness { ms: u64 },
}

impl Fault {
    fn lasts(&self) -> u64 {
        match *self {
            Fault::Pause { ms, .. }
            | Fault::CutPrimaryWitness { ms }
            | Fault::SlowWitness { ms }
            | Fault::SlowLog { ms }
            | Fault::RestartWitness { ms } => ms,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    hz: u32,
    /// The first backup joins this long after the primary started (else it
    /// is there first).
    late_backup_ms: Option<u64>,
    /// (ms after the primary started, fault)
    faults: Vec<(u64, Fault)>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={} guest seconds={GUEST_SECONDS} hz={}", self.seed, self.hz)?;
        match self.late_backup_ms {
            Some(ms) => write!(f, "; backup joins at {ms} ms")?,
            None => write!(f, "; backup from the start")?,
        }
        for (at, x) in &self.faults {
            write!(f, "; {at} ms: {x:?}")?;
        }
        Ok(())
    }
}

impl Plan {
    /// Whether fault `i` is alone: no other fault acts from 100 ms before
    /// it to 2 s after it.
    fn alone(&self, i: usize) -> bool {
        let t = self.faults[i].0;
        let (lo, hi) = (t.saturating_sub(100), t + 2000);
        let late = self.late_backup_ms.is_some_and(|b| b + 2000 > t);
        !late && self.faults.iter().enumerate().all(|(j, (a, f))| j == i || a + f.lasts() < lo || *a > hi)
    }

    fn from_seed(seed: u64) -> Plan {
        let mut r = Rng(seed);
        let hz = if r.chance(50) { 100 } else { 1000 };
        let late_backup_ms = r.chance(25).then(|| r.range(300, 2500));
        let n = r.range(1, 4);
        let mut faults: Vec<(u64, Fault)> = (0..n)
            .map(|_| {
                let at = r.range(200, 3500);
                let f = match r.range(0, 13) {
                    0..=2 => Fault::KillPrimary,
                    3 => Fault::KillBackup,
                    4 => Fault::Pause { who: Who::Primary, ms: r.range(100, 3000) },
                    5 => Fault::Pause { who: Who::Backup, ms: r.range(100, 3000) },
                    6 => Fault::Pause { who: Who::Witness, ms: r.range(100, 3000) },
                    7 | 8 => Fault::Restart { as_backup: r.chance(50) },
                    9 => Fault::CutPrimaryWitness { ms: r.range(300, 3000) },
                    10 => Fault::SlowWitness { ms: r.range(500, 3000) },
                    11 => Fault::SlowLog { ms: r.range(500, 3000) },
                    _ => Fault::NewBackup,
                };
                (at, f)
            })
            .collect();
        // A witness killed and restarted with its state file, in some
        // schedules (drawn apart, so that the other faults of a seed stay
        // as they were before this fault existed).
        let mut w = Rng(seed ^ 0x5749_544e_4553_5321);
        if w.chance(15) {
            faults.push((w.range(200, 3500), Fault::RestartWitness { ms: w.range(100, 2000) }));
        }
        faults.sort_by_key(|(at, _)| *at);
        // A restart needs a kill before it.
        let mut killed = false;
        for (_, f) in faults.iter_mut() {
            match f {
                Fault::KillPrimary | Fault::KillBackup => killed = true,
                Fault::Restart { .. } if !killed => {
                    *f = Fault::KillBackup;
                    killed = true;
                }
                _ => {}
            }
        }
        Plan { seed, hz, late_backup_ms, faults }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// `[done]`, every line once.
    Completed,
    /// `state: lost`, and a `--new-run` primary stopped the console ("is gone").
    Lost,
    /// The primary died while the view's backup, which holds the state, was
    /// silent, and that backup's process is dead too (a double failure
    /// within the backup timeout): the witness waits for it ("may still
    /// take over"); a `--new-run` primary then stopped the console.
    Orphaned,
    /// Before the coming semantics: no lease for 5 s and no `state:` line.
    LostInferred,
    Failed(String),
}

struct Result1 {
    plan: Plan,
    outcome: Outcome,
    failovers: usize,
    /// kill -9 of a primary -> the console's first output from the next one.
    failover_ms: Vec<u128>,
    /// The same, for kills with no other fault from 100 ms before to 2 s after.
    clean_failover_ms: Vec<u128>,
    /// The last fault's end -> the outcome.
    settle_ms: u128,
    /// A restarted `ftvm primary` that the witness accepted.
    restarted_primary_accepted: bool,
    /// `state: lost` said while the primary's process ran (cut or stopped).
    false_lost: usize,
}

/// The console's output without an unterminated last line (a VM lost in
/// the middle of a line released that much of it), and that tail.
fn split_torn(out: &str) -> (&str, &str) {
    match out.rfind('\n') {
        Some(i) => (&out[..=i], &out[i + 1..]),
        None => ("", out),
    }
}

/// "first output from new primary ... unix_ms=T" lines of a console.
fn new_primary_times(err: &str) -> Vec<u128> {
    err.lines()
        .filter_map(|l| l.split("first output from new primary").nth(1)?.split("unix_ms=").nth(1)?.trim().parse().ok())
        .collect()
}

enum Ev {
    Start(usize),
    End(usize),
    LateBackup,
}

fn run_plan(plan: &Plan) -> Result1 {
    let mut fab = Fabric::new();
    let cmdline = format!("seconds={GUEST_SECONDS} hz={}", plan.hz);
    let b0 = fab.add("b0");
    if plan.late_backup_ms.is_none() {
        fab.start(b0, "backup", "", &[]);
        fab.wait_says(b0, "waiting for the primary", Duration::from_secs(20));
    }
    let p0 = fab.add("p0");
    fab.start(p0, "primary", &cmdline, &[]);
    let mut result = Result1 {
        plan: plan.clone(),
        outcome: Outcome::Completed,
        failovers: 0,
        failover_ms: Vec::new(),
        clean_failover_ms: Vec::new(),
        settle_ms: 0,
        restarted_primary_accepted: false,
        false_lost: 0,
    };
    if !fab.wait_says(p0, "is primary of view", Duration::from_secs(30)) {
        result.outcome = Outcome::Failed(format!("the first primary did not start\n{}", fab.tails()));
        return result;
    }
    let mut console = Proc::spawn(&["console", "--witness", &fab.w, "--give-up", "60"]);
    let t0 = Instant::now();
    fab.t0 = t0;

    let mut evs: Vec<(u64, Ev)> = Vec::new();
    if let Some(ms) = plan.late_backup_ms {
        evs.push((ms, Ev::LateBackup));
    }
    for (i, (at, f)) in plan.faults.iter().enumerate() {
        evs.push((*at, Ev::Start(i)));
        if f.lasts() > 0 {
            evs.push((at + f.lasts(), Ev::End(i)));
        }
    }
    evs.sort_by_key(|(at, _)| *at);

    // (unix ms, no other fault near it)
    let mut kills: Vec<(u128, bool)> = Vec::new();
    let mut stopped: HashMap<usize, u32> = HashMap::new();
    let mut witness_down: std::collections::HashSet<usize> = std::collections::HashSet::new();
    let mut links: HashMap<usize, Vec<Arc<LinkCtl>>> = HashMap::new();
    let mut last_killed: Option<usize> = None;
    let mut new_backups = 0;
    let mut primary_restarts: Vec<usize> = Vec::new();
    for (at, ev) in evs {
        let when = t0 + Duration::from_millis(at);
        if let Some(d) = when.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        match ev {
            Ev::LateBackup => fab.start(b0, "backup", "", &[]),
            Ev::Start(i) => {
                let f = plan.faults[i].1.clone();
                fab.note(format!("fault {i}: {f:?}"));
                match f {
                    Fault::KillPrimary | Fault::KillBackup => {
                        let (p, b, s) = fab.view();
                        let target = if f == Fault::KillPrimary { p } else { b };
                        match target {
                            Some(t) => {
                                if let Some(ms) = fab.kill(t) {
                                    if f == Fault::KillPrimary {
                                        kills.push((ms, plan.alone(i)));
                                    }
                                    last_killed = Some(t);
                                }
                            }
                            None => fab.note(format!("  nothing to kill: {}", s.replace('\n', "; "))),
                        }
                    }
                    Fault::Pause { who, .. } => {
                        let pid = match who {
                            Who::Witness => Some(fab.witness.child.id()),
                            _ => {
                                let (p, b, _) = fab.view();
                                let t = if who == Who::Primary { p } else { b };
                                t.and_then(|t| {
                                    let m = &mut fab.members[t];
                                    m.alive().then(|| m.cur().unwrap().child.id())
                                })
                            }
                        };
                        if let Some(pid) = pid {
                            signal_pid(pid, libc::SIGSTOP);
                            fab.disturbed.insert(pid);
                            fab.note(format!("  SIGSTOP pid {pid}"));
                            stopped.insert(i, pid);
                        }
                    }
                    Fault::Restart { as_backup } => {
                        if let Some(t) = last_killed.take() {
                            if as_backup {
                                fab.start(t, "backup", "", &[]);
                            } else {
                                fab.start(t, "primary", &cmdline, &[]);
                                primary_restarts.push(t);
                            }
                        }
                    }
                    Fault::CutPrimaryWitness { .. } => {
                        let (p, _, _) = fab.view();
                        if let Some(p) = p {
                            let ctl = fab.members[p].wlink.ctl.clone();
                            ctl.set_cut(true);
                            links.insert(i, vec![ctl]);
                        }
                    }
                    Fault::SlowWitness { .. } => {
                        let ctls: Vec<_> = fab.members.iter().map(|m| m.wlink.ctl.clone()).collect();
                        for c in &ctls {
                            c.set_delay(SLOW_MS);
                        }
                        links.insert(i, ctls);
                    }
                    Fault::SlowLog { .. } => {
                        let (_, b, _) = fab.view();
                        if let Some(ctl) = b.and_then(|b| fab.members[b].inbound.as_ref().map(|l| l.ctl.clone())) {
                            ctl.set_delay(SLOW_MS);
                            links.insert(i, vec![ctl]);
                        }
                    }
                    Fault::RestartWitness { .. } => {
                        fab.kill_witness();
                        witness_down.insert(i);
                    }
                    Fault::NewBackup => {
                        new_backups += 1;
                        let n = fab.add(&format!("b{new_backups}"));
                        fab.start(n, "backup", "", &[]);
                    }
                }
            }
            Ev::End(i) => {
                if witness_down.remove(&i) {
                    fab.restart_witness();
                }
                if let Some(pid) = stopped.remove(&i) {
                    signal_pid(pid, libc::SIGCONT);
                    fab.note(format!("fault {i} ends: SIGCONT pid {pid}"));
                }
                for c in links.remove(&i).unwrap_or_default() {
                    c.set_cut(false);
                    c.set_delay(0);
                    fab.note(format!("fault {i} ends: link healed"));
                }
            }
        }
    }
    // Quiet from here on.
    let quiet = Instant::now();
    fab.note("faults over".into());
    let outcome = settle(&mut fab, &mut console, LINES, PROGRESS_BOUND);
    result.settle_ms = quiet.elapsed().as_millis();
    let err = console.err();
    for t in primary_restarts {
        let m = &mut fab.members[t];
        let e = m.procs.last().map(|(_, p)| p.err()).unwrap_or_default();
        if e.contains("is primary of view") {
            result.restarted_primary_accepted = true;
        }
    }
    // A restarted `ftvm primary` (no --new-run) joins a cluster whose VM
    // is running, taken over or lost: it must be refused in every case.
    let outcome = match outcome {
        Outcome::Completed | Outcome::Lost | Outcome::Orphaned if result.restarted_primary_accepted => {
            Outcome::Failed("a restarted `ftvm primary` (without --new-run) was accepted".into())
        }
        o => o,
    };
    result.false_lost = fab.false_lost.len();
    let firsts = new_primary_times(&err);
    result.failovers = firsts.len();
    for (k, alone) in &kills {
        if let Some(f) = firsts.iter().find(|&&f| f > *k) {
            result.failover_ms.push(f - k);
            if *alone {
                result.clean_failover_ms.push(f - k);
            }
        }
    }
    let outcome = match outcome {
        Outcome::Completed if result.clean_failover_ms.iter().any(|&ms| ms > FAILOVER_BOUND.as_millis()) => Outcome::Failed(format!(
            "a failover after a kill alone took {:?} ms, over {FAILOVER_BOUND:?}",
            result.clean_failover_ms
        )),
        o => o,
    };
    if std::env::var_os("FTVM_CHAOS_VERBOSE").is_some() {
        eprintln!("journal of seed={}:\n  {}\n{}", plan.seed, fab.journal.join("\n  "), fab.tails());
    }
    if let Outcome::Failed(why) = &outcome {
        let why = format!("{why}\nschedule: {plan}\nrerun: FTVM_CHAOS_SEED={}", plan.seed);
        result.outcome = Outcome::Failed(report(&mut fab, &console, &why));
    } else {
        result.outcome = outcome;
    }
    // Nothing may stay stopped or alive.
    for pid in stopped.values() {
        signal_pid(*pid, libc::SIGCONT);
    }
    result
}

/// Waits, once faults are over, for the outcome: the run completes (every
/// line of `lines` once, `[done]`), or the cluster says the VM is lost and
/// a `--new-run` primary then stops the console ("is gone") — within
/// `bound` (and 15 s more for the new run). The console's output must be
/// one run's in every case.
fn settle(fab: &mut Fabric, console: &mut Proc, lines: usize, bound: Duration) -> Outcome {
    let quiet = Instant::now();
    let mut lease_none_since: Option<Instant> = None;
    let mut new_run: Option<Instant> = None;
    let mut orphaned = false;
    let mut printed_at_loss: Option<usize> = None;
    // The backup last named holding the state, as it was when the VM was
    // found lost (before any new run).
    let mut ready_at_loss: Option<Option<String>> = None;
    let mut waits_for_dead: Option<Instant> = None;
    let outcome = loop {
        if let Some(st) = console.child.try_wait().unwrap() {
            let code = st.code();
            if ready_at_loss.is_none() {
                ready_at_loss = Some(fab.ready_seen.lock().unwrap().clone());
            }
            std::thread::sleep(Duration::from_millis(100));
            let (out, err) = (console.out(), console.err());
            break match (code, new_run) {
                (Some(0), _) => match check_console(&out, lines) {
                    Ok(()) => Outcome::Completed,
                    Err(e) => Outcome::Failed(format!("completed, but: {}", e.lines().next().unwrap_or(""))),
                },
                (Some(3), Some(_)) if err.contains("is gone") => if orphaned { Outcome::Orphaned } else { Outcome::Lost },
                // The console itself stops when the witness says its VM is
                // lost: right only if the primary is really gone.
                (Some(1), _) if err.contains("is lost") => {
                    // The primary it names ("its primary ADDR@ID is gone").
                    let p = err
                        .rsplit("its primary ")
                        .next()
                        .and_then(|r| r.split_whitespace().next())
                        .unwrap_or("")
                        .to_string();
                    match fab.holder_alive(&p) {
                        Some(true) => Outcome::Failed(format!("the console gave up (\"is lost\") while the process of primary {p} runs")),
                        _ => if orphaned { Outcome::Orphaned } else { Outcome::Lost },
                    }
                }
                _ => match std::os::unix::process::ExitStatusExt::signal(&st) {
                    Some(sig) => Outcome::Failed(format!(
                        "the console was killed by signal {sig}, not by this test (is something else killing ftvm processes?)"
                    )),
                    None => Outcome::Failed(format!("the console exited {code:?}")),
                },
            };
        }
        let s = status(&fab.w);
        let says_lost = s.lines().any(|l| l.starts_with("state: lost"));
        // The witness says lost when the lease ran out and no backup holds
        // the state; a primary only cut off or stopped may still come back
        // (and does). Only a dead one makes the VM lost for good.
        let p = member_in(&s, "primary");
        if new_run.is_none() && says_lost && fab.holder_alive(&p) == Some(true) {
            if !fab.false_lost.contains(&p) {
                fab.note(format!("status says lost while the process of primary {p} runs: {}", s.replace('\n', "; ")));
                fab.false_lost.push(p);
            }
        } else if new_run.is_none() && says_lost {
            // The cluster says so: a new run in its place must not reach
            // this console.
            fab.note(format!("status says lost: {}", s.replace('\n', "; ")));
            printed_at_loss = Some(console.out().len());
            ready_at_loss = Some(fab.ready_seen.lock().unwrap().clone());
            let n = fab.add("new-run");
            fab.start(n, "primary", "seconds=3", &["--new-run"]);
            new_run = Some(Instant::now());
        }
        // Waiting for a backup that holds the state: fine while it may come
        // back; if its process is dead, nothing will come back.
        let waits_for = status_field(&s, "state")
            .filter(|st| st.starts_with("waiting: the lease of primary") && st.contains("may still take over"))
            .map(|_| member_in(&s, "backup"));
        match waits_for.as_deref().map(|b| (b.to_string(), fab.holder_alive(b))) {
            Some((b, Some(true))) if new_run.is_none() => {
                if waits_for_dead.get_or_insert(Instant::now()).elapsed() > Duration::from_secs(5) {
                    break Outcome::Failed(format!(
                        "the witness waits for backup {b}, which holds the state, while the process that was {b} runs on under another name (it left its place in the view)"
                    ));
                }
            }
            Some((b, Some(false))) if new_run.is_none() => {
                if waits_for_dead.get_or_insert(Instant::now()).elapsed() > Duration::from_secs(2) {
                    fab.note(format!("the witness waits for backup {b}, whose process is dead: {}", s.replace('\n', "; ")));
                    printed_at_loss = Some(console.out().len());
                    ready_at_loss = Some(fab.ready_seen.lock().unwrap().clone());
                    let n = fab.add("new-run");
                    fab.start(n, "primary", "seconds=3", &["--new-run"]);
                    new_run = Some(Instant::now());
                    orphaned = true;
                }
            }
            _ => waits_for_dead = None,
        }
        if !s.is_empty() && !s.contains("state:") && s.contains("lease: none") {
            let since = *lease_none_since.get_or_insert(Instant::now());
            if since.elapsed() > Duration::from_secs(5) {
                fab.note(format!("no lease for 5 s: {}", s.replace('\n', "; ")));
                break Outcome::LostInferred;
            }
        } else {
            lease_none_since = None;
        }
        if new_run.is_some_and(|t| t.elapsed() > Duration::from_secs(15)) {
            break Outcome::Failed("a --new-run primary started 15 s ago and the console did not stop".into());
        }
        if quiet.elapsed() > bound + Duration::from_secs(if new_run.is_some() { 15 } else { 0 }) {
            break Outcome::Failed(format!("no progress within {bound:?} after the last fault; status:\n{s}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // A VM is lost only if no backup had its state: a backup the witness
    // last named holding it, whose process runs and was never stopped or
    // killed here, could have taken over.
    let outcome = match outcome {
        Outcome::Lost | Outcome::Orphaned => {
            let b = ready_at_loss.flatten();
            match b.as_deref().and_then(|b| fab.holder(b).map(|h| (b.to_string(), h))) {
                Some((b, (pid, true))) if !fab.disturbed.contains(&pid) => Outcome::Failed(format!(
                    "the VM was called lost ({outcome:?}) though backup {b}, last named holding its state, runs (pid {pid}) and was never stopped or killed"
                )),
                _ => outcome,
            }
        }
        o => o,
    };
    let out = console.out();
    // Safety whatever the outcome: one run's output.
    let (whole, torn) = split_torn(&out);
    let mut problems = Vec::new();
    if let Some(n) = printed_at_loss.filter(|&n| n != out.len()) {
        problems.push(format!("the console printed {} more bytes after the cluster said the VM was lost", out.len() - n));
    }
    if let Err(e) = check_chain(whole) {
        let e = e.lines().next().unwrap_or("").to_string();
        if !matches!(&outcome, Outcome::Failed(why) if why.contains(&e)) {
            problems.push(format!("the console's output is not one run's: {e}"));
        }
    }
    if matches!(outcome, Outcome::Lost | Outcome::Orphaned | Outcome::LostInferred) && whole.contains("[done]") {
        problems.push("a [done] line, yet the run did not complete".into());
    }
    if !torn.is_empty() && outcome == Outcome::Completed {
        problems.push(format!("torn last line {torn:?}"));
    }
    if problems.is_empty() {
        return outcome;
    }
    if let Outcome::Failed(why) = outcome {
        problems.insert(0, why);
    }
    Outcome::Failed(problems.join("; "))
}

/// A failure report: why, the journal, the console's output and every
/// role's stderr (tails), the witness's view now.
fn report(fab: &mut Fabric, console: &Proc, why: &str) -> String {
    let mut r = format!("{why}\njournal:\n");
    for j in &fab.journal {
        r += &format!("  {j}\n");
    }
    r += &format!("--- console stdout (tail):\n{}--- console stderr (tail):\n{}", tail(&console.out(), 25), tail(&console.err(), 25));
    r += &fab.tails();
    r += &format!("--- status now:\n{}", status(&fab.w));
    r
}

fn pct(sorted: &[u128], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok()?.trim().parse().ok()
}

#[test]
fn mixed_fault_schedules() {
    let seeds: Vec<u64> = match env_u64("FTVM_CHAOS_SEED") {
        Some(s) => vec![s],
        None => {
            let n = env_u64("FTVM_CHAOS_SCHEDULES").unwrap_or(50);
            let base = env_u64("FTVM_CHAOS_BASE").unwrap_or(unix_ms() as u64);
            eprintln!("chaos: {n} schedules from FTVM_CHAOS_BASE={base}");
            let mut r = Rng(base);
            (0..n).map(|_| r.next() >> 16).collect()
        }
    };
    let parallel = env_u64("FTVM_CHAOS_PARALLEL").unwrap_or(2).max(1) as usize;
    // No schedule starts after this long (each one is bounded too).
    let budget = Duration::from_secs(env_u64("FTVM_CHAOS_BUDGET_S").unwrap_or(540));
    let total = seeds.len();
    let queue = Arc::new(Mutex::new(seeds.into_iter().enumerate().collect::<Vec<_>>()));
    queue.lock().unwrap().reverse();
    let results = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (queue, results) = (queue.clone(), results.clone());
            std::thread::spawn(move || loop {
                if started.elapsed() > budget {
                    return;
                }
                let Some((i, seed)) = queue.lock().unwrap().pop() else { return };
                let plan = Plan::from_seed(seed);
                eprintln!("schedule {}/{total} FTVM_CHAOS_SEED={seed}: {plan}", i + 1);
                let t = Instant::now();
                let r = run_plan(&plan);
                let verdict = match &r.outcome {
                    Outcome::Failed(_) => "FAILED".to_string(),
                    o => format!("{o:?}"),
                };
                eprintln!(
                    "schedule {}/{total} seed={seed}: {verdict} in {:.1} s (failovers {}, failover ms {:?}, settled {} ms after the last fault{}{})",
                    i + 1,
                    t.elapsed().as_secs_f64(),
                    r.failovers,
                    r.failover_ms,
                    r.settle_ms,
                    if r.restarted_primary_accepted { ", a restarted primary was accepted" } else { "" },
                    if r.false_lost > 0 { ", `state: lost` said while the primary ran" } else { "" }
                );
                if let Outcome::Failed(rep) = &r.outcome {
                    eprintln!("=== schedule seed={seed} FAILED:\n{rep}\n===");
                }
                results.lock().unwrap().push(r);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let results = results.lock().unwrap();
    if results.len() < total {
        eprintln!("chaos: the time budget ({budget:?}, FTVM_CHAOS_BUDGET_S) ran out: {} of {total} schedules ran", results.len());
    }
    let count = |f: &dyn Fn(&Outcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
    let mut fo: Vec<u128> = results.iter().flat_map(|r| r.failover_ms.iter().copied()).collect();
    fo.sort();
    let mut clean: Vec<u128> = results.iter().flat_map(|r| r.clean_failover_ms.iter().copied()).collect();
    clean.sort();
    let mut settle: Vec<u128> = results.iter().filter(|r| !matches!(r.outcome, Outcome::Failed(_))).map(|r| r.settle_ms).collect();
    settle.sort();
    let failed: Vec<&Result1> = results.iter().filter(|r| matches!(r.outcome, Outcome::Failed(_))).collect();
    eprintln!(
        "chaos summary: {} schedules in {:.0} s: completed {}, lost {} (+{} inferred without `state:`), failed {}; failovers {}; \
         orphaned (double failure) {}; failover after kill -9 (n={}) p50 {} ms, p99 {} ms, worst {} ms (a kill alone, n={}: p50 {} ms, p99 {} ms, worst {} ms); settled after the last fault: worst {} ms (bound {} ms); \
         restarted primaries accepted in {} schedules; `state: lost` said of a primary whose process ran in {} schedules",
        results.len(),
        started.elapsed().as_secs_f64(),
        count(&|o| *o == Outcome::Completed),
        count(&|o| *o == Outcome::Lost),
        count(&|o| *o == Outcome::LostInferred),
        failed.len(),
        results.iter().map(|r| r.failovers).sum::<usize>(),
        count(&|o| *o == Outcome::Orphaned),
        fo.len(),
        pct(&fo, 0.5),
        pct(&fo, 0.99),
        fo.last().copied().unwrap_or(0),
        clean.len(),
        pct(&clean, 0.5),
        pct(&clean, 0.99),
        clean.last().copied().unwrap_or(0),
        settle.last().copied().unwrap_or(0),
        PROGRESS_BOUND.as_millis(),
        results.iter().filter(|r| r.restarted_primary_accepted).count(),
        results.iter().filter(|r| r.false_lost > 0).count(),
    );
    let seeds: Vec<String> = failed.iter().map(|r| format!("FTVM_CHAOS_SEED={}", r.plan.seed)).collect();
    assert!(failed.is_empty(), "{} of {} schedules failed (reports above): {}", failed.len(), results.len(), seeds.join(" "));
}

// ------------------------------------------------------------------ named scenarios

/// A cluster to script by hand: the witness, then slots as asked.
/// A backup from the start, a primary running the test guest with
/// `cmdline`, and a console that has printed `line`: (fabric, backup,
/// primary, console).
fn protected(cmdline: &str, line: &str) -> (Fabric, usize, usize, Proc) {
    let mut fab = Fabric::new();
    let b0 = fab.add("b0");
    fab.start(b0, "backup", "", &[]);
    assert!(fab.wait_says(b0, "waiting for the primary", Duration::from_secs(20)), "{}", fab.tails());
    let p0 = fab.add("p0");
    fab.start(p0, "primary", cmdline, &[]);
    assert!(fab.wait_says(p0, "is primary of view", Duration::from_secs(30)), "{}", fab.tails());
    let console = console_of(&fab);
    wait_for("output", Duration::from_secs(10), || console.out().contains(line));
    (fab, b0, p0, console)
}

fn console_of(fab: &Fabric) -> Proc {
    Proc::spawn(&["console", "--witness", &fab.w, "--give-up", "60"])
}

fn must(fab: &mut Fabric, console: &Proc, ok: bool, why: &str) {
    if !ok {
        panic!("{}", report(fab, console, why));
    }
}

/// `ftvm primary ARGS` at `addr` of slot `i`, run to its end: (exit code, stderr).
fn primary_once(fab: &mut Fabric, i: usize, extra: &[&str]) -> (Option<i32>, String) {
    fab.start(i, "primary", "seconds=3", extra);
    let p = fab.members[i].cur().unwrap();
    let code = p.wait(Duration::from_secs(10));
    (code, p.err())
}

/// The views members as `ftvm status` names them (`ADDR` or `ADDR@ID`).
fn member_in(s: &str, what: &str) -> String {
    status_field(s, what).and_then(|v| v.split_whitespace().next()).unwrap_or("none").to_string()
}

/// Issue 8, scenario 1 (the seed's "primary fails before completing state
/// transfer"): the primary runs alone a while, a backup joins over a slow
/// link (20 ms per receive on the log stream), the primary is killed
/// shortly after. Whether the transfer was done by then or not, the
/// console stays one run's output: either the backup takes over with every
/// line once, or the cluster says the VM is lost.
#[test]
fn late_join_over_a_slow_link_then_the_primary_dies() {
    let mut fab = Fabric::new();
    let p0 = fab.add("p0");
    // hz=5000: many exits, as in the issue; on a busy 2-core host the guest
    // runs slower than real time, hence the longer bound below.
    fab.start(p0, "primary", "seconds=10 hz=5000", &[]);
    assert!(fab.wait_says(p0, "is primary of view", Duration::from_secs(30)), "{}", fab.tails());
    let mut console = console_of(&fab);
    std::thread::sleep(Duration::from_secs(5));
    let b0 = fab.add("b0");
    if let Some(l) = &fab.members[b0].inbound {
        l.ctl.set_delay(SLOW_MS);
    }
    fab.start(b0, "backup", "", &[]);
    fab.wait_says(b0, "waiting for the primary", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    let printed = console.out().len();
    fab.kill(p0);
    let outcome = settle(&mut fab, &mut console, 100, PROGRESS_BOUND * 2);
    eprintln!("late join over a slow link, primary killed 1.5 s later: {outcome:?} ({printed} bytes printed before the kill)");
    let perr = fab.members[p0].procs[0].1.err();
    for l in perr.lines().filter(|l| l.contains("transfer") || l.contains("pre-copied")) {
        eprintln!("  primary: {l}");
    }
    let ok = matches!(outcome, Outcome::Completed | Outcome::Lost);
    must(&mut fab, &console, ok, &format!("outcome {outcome:?}"));
}

/// Issue 8, scenario 2: a primary killed and restarted at the same address
/// at once is a new member, not the old one: refused while its backup
/// takes over, and the console gets the old run whole from the backup.
#[test]
fn a_restarted_primary_at_the_same_address_is_not_taken_for_the_old_one() {
    let mut fab = Fabric::new();
    let b0 = fab.add("b0");
    fab.start(b0, "backup", "", &[]);
    assert!(fab.wait_says(b0, "waiting for the primary", Duration::from_secs(20)), "{}", fab.tails());
    let p0 = fab.add("p0");
    fab.start(p0, "primary", "seconds=6", &[]);
    assert!(fab.wait_says(p0, "is primary of view", Duration::from_secs(30)), "{}", fab.tails());
    let before = member_in(&status(&fab.w), "primary");
    let mut console = console_of(&fab);
    wait_for("output", Duration::from_secs(10), || console.out().contains("[0005]"));
    fab.kill(p0);
    let (code, err) = primary_once(&mut fab, p0, &[]);
    let refused = code.is_some_and(|c| c != 0) && (err.contains("takes over") || err.contains("already running"));
    must(&mut fab, &console, refused, &format!("the restarted primary at the old address was not refused (exit {code:?})"));
    // Again once its lease has run out and the backup took over.
    let taken = fab.wait_says(b0, "live at exit", Duration::from_secs(10));
    must(&mut fab, &console, taken, "the backup never went live");
    let (code2, err2) = primary_once(&mut fab, p0, &[]);
    let refused = code2.is_some_and(|c| c != 0) && err2.contains("already running");
    must(&mut fab, &console, refused, &format!("the primary restarted after the takeover was not refused (exit {code2:?})"));
    let outcome = settle(&mut fab, &mut console, 60, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Completed, &format!("outcome {outcome:?}"));
    eprintln!(
        "old primary {before}; restarted at once and refused: {}; restarted after the takeover and refused: {}",
        err.lines().last().unwrap_or(""),
        err2.lines().last().unwrap_or("")
    );
}

/// The other half of scenario 2 and the seed's "no backup and primary
/// fails": the VM is lost; the cluster says so, a restarted `ftvm primary`
/// is refused ("is lost", naming --new-run), a `--new-run` primary boots a
/// new VM, and the console of the old run stops ("is lost", exit 1, or "is
/// gone", exit 3) without printing a byte of the new one.
#[test]
fn a_lost_vm_is_said_so_and_a_new_run_does_not_reach_the_old_console() {
    let mut fab = Fabric::new();
    let p0 = fab.add("p0");
    fab.start(p0, "primary", "seconds=6", &[]);
    assert!(fab.wait_says(p0, "is primary of view", Duration::from_secs(30)), "{}", fab.tails());
    let mut console = console_of(&fab);
    wait_for("output", Duration::from_secs(10), || console.out().contains("[0005]"));
    fab.kill(p0);
    std::thread::sleep(Duration::from_millis(1000));
    let s = status(&fab.w);
    must(&mut fab, &console, s.lines().any(|l| l.starts_with("state: lost")), &format!("status does not say lost:\n{s}"));
    let (code, err) = primary_once(&mut fab, p0, &[]);
    let refused = code.is_some_and(|c| c != 0) && err.contains("is lost") && err.contains("--new-run");
    must(&mut fab, &console, refused, &format!("a plain primary after the loss was not refused as it should (exit {code:?})"));
    let printed = console.out();
    let outcome = settle(&mut fab, &mut console, 60, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Lost, &format!("outcome {outcome:?}"));
    must(&mut fab, &console, console.out() == printed, "the console printed more after the loss");
}

/// Issue 8, scenario 3: the primary dies while a backup is still joining
/// (its state transfer slowed by a 20 ms-per-receive link): the cluster
/// does not hang. Either the transfer was done and the backup takes over
/// whole, or the backup says it cannot be promoted, `ftvm status` says the
/// VM is lost, a `--new-run` primary is accepted, the old console stops,
/// and the waiting backup joins the new run by itself.
#[test]
fn the_primary_dies_while_a_backup_is_joining_the_cluster_does_not_hang() {
    let mut fab = Fabric::new();
    let p0 = fab.add("p0");
    fab.start(p0, "primary", "seconds=20 hz=1000", &[]);
    assert!(fab.wait_says(p0, "is primary of view", Duration::from_secs(30)), "{}", fab.tails());
    let mut console = console_of(&fab);
    std::thread::sleep(Duration::from_secs(3));
    let b0 = fab.add("b0");
    if let Some(l) = &fab.members[b0].inbound {
        l.ctl.set_delay(SLOW_MS);
    }
    fab.start(b0, "backup", "", &[]);
    fab.wait_says(b0, "waiting for the primary", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));
    fab.kill(p0);
    let t = Instant::now();
    // The log stream to the backup stays slow: so would a real one.
    let mut lost = false;
    while t.elapsed() < Duration::from_secs(10) {
        let s = status(&fab.w);
        if s.lines().any(|l| l.starts_with("state: lost")) {
            lost = true;
            break;
        }
        if fab.members[b0].cur().unwrap().err().contains("live at exit") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("primary killed while a backup joined: {} after {:?}", if lost { "lost" } else { "not lost" }, t.elapsed());
    if !lost {
        let outcome = settle(&mut fab, &mut console, 200, PROGRESS_BOUND);
        must(&mut fab, &console, outcome == Outcome::Completed, &format!("neither lost nor taken over: {outcome:?}"));
        return;
    }
    let alive = fab.members[b0].alive();
    must(&mut fab, &console, alive, "the joining backup died instead of waiting");
    let n = fab.add("p-other");
    let (code, err) = primary_once(&mut fab, n, &[]);
    let refused = code.is_some_and(|c| c != 0) && err.contains("is lost") && err.contains("--new-run");
    must(&mut fab, &console, refused, &format!("a plain primary after the loss was not refused (exit {code:?})"));
    let nr = fab.add("new-run");
    fab.start(nr, "primary", "seconds=6", &["--new-run"]);
    let accepted = fab.wait_says(nr, "is primary of view", Duration::from_secs(20));
    must(&mut fab, &console, accepted, "the --new-run primary was not accepted");
    let code = console.wait(Duration::from_secs(15));
    let e = console.err();
    let stopped = (code == Some(3) && e.contains("is gone")) || (code == Some(1) && e.contains("is lost"));
    must(&mut fab, &console, stopped, &format!("the old console did not stop (exit {code:?})"));
    check_chain(split_torn(&console.out()).0).map_err(|e| report(&mut fab, &console, &e)).unwrap();
    // The backup that waited joins the new run by itself.
    let b_port = fab.members[b0].port;
    let t = Instant::now();
    let mut joined = false;
    while t.elapsed() < Duration::from_secs(15) && !joined {
        let s = status(&fab.w);
        joined = status_field(&s, "backup").and_then(member_port) == Some(b_port) && s.contains("(alive");
        std::thread::sleep(Duration::from_millis(200));
    }
    must(&mut fab, &console, joined, "the waiting backup did not join the new run");
}

/// Issue 8, scenario 4: a backup stopped for more than 2 s (dropped by
/// the witness) rejoins by itself as a new member, and the VM survives a
/// later primary failure whole.
#[test]
fn a_backup_paused_for_more_than_2_s_rejoins_by_itself_and_the_vm_survives_a_later_primary_failure() {
    let (mut fab, b0, p0, mut console) = protected("seconds=12", "[0010]");
    let first = member_in(&status(&fab.w), "backup");
    let pid = fab.members[b0].cur().unwrap().child.id();
    signal_pid(pid, libc::SIGSTOP);
    fab.note("SIGSTOP b0 for 3 s".into());
    std::thread::sleep(Duration::from_secs(3));
    let during = status(&fab.w);
    signal_pid(pid, libc::SIGCONT);
    fab.note("SIGCONT b0".into());
    must(&mut fab, &console, !during.contains(&format!("backup: {first} (alive")), &format!("the witness kept a backup stopped for 3 s:\n{during}"));
    // Back in the view, caught up.
    let b_port = fab.members[b0].port;
    let t = Instant::now();
    let mut back = false;
    while t.elapsed() < Duration::from_secs(10) && !back {
        let s = status(&fab.w);
        let lag: Option<u64> = s.split("(lag ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok());
        back = status_field(&s, "backup").and_then(member_port) == Some(b_port)
            && s.contains("(alive, holds the state")
            && lag.is_some_and(|l| l < 50);
        std::thread::sleep(Duration::from_millis(100));
    }
    let back = back && fab.members[b0].alive();
    must(&mut fab, &console, back, "the paused backup did not rejoin by itself within 10 s");
    let again = member_in(&status(&fab.w), "backup");
    eprintln!("backup {first} paused 3 s, rejoined as {again} after {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    fab.kill(p0);
    let outcome = settle(&mut fab, &mut console, 120, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Completed, &format!("outcome {outcome:?}"));
    let b = fab.members[b0].cur().unwrap().err();
    must(&mut fab, &console, b.contains("live at exit"), "the rejoined backup never went live");
}

/// Watches the console's output length while `f` runs a fault of `hold`:
/// returns (bytes printed from 800 ms into the fault to its end, total
/// before the fault).
fn output_during(console: &Proc, hold: Duration, start: impl FnOnce(), end: impl FnOnce()) -> (usize, usize) {
    let before = console.out().len();
    start();
    std::thread::sleep(Duration::from_millis(800));
    let at = console.out().len();
    std::thread::sleep(hold.saturating_sub(Duration::from_millis(850)));
    let grew = console.out().len() - at;
    end();
    (grew, before)
}

/// The seed's "view-server failure": the witness stopped for 2 s. No
/// primary can renew its lease, so output pauses (within the lease), then
/// resumes from one primary; every line once.
#[test]
fn witness_paused_output_pauses_and_resumes_without_duplicates() {
    let (mut fab, _b0, _p0, mut console) = protected("seconds=8", "[0010]");
    let pid = fab.witness.child.id();
    let (grew, _) = output_during(&console, Duration::from_secs(2), || signal_pid(pid, libc::SIGSTOP), || signal_pid(pid, libc::SIGCONT));
    fab.note(format!("witness stopped 2 s; {grew} bytes printed from 800 ms in"));
    must(&mut fab, &console, grew == 0, &format!("{grew} bytes of output released while the witness was stopped"));
    let outcome = settle(&mut fab, &mut console, 80, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Completed, &format!("outcome {outcome:?}"));
}

/// A witness outage longer than the lease (killed, restarted 1.6 s later
/// with its state file, as in the CI schedule below; the log link slowed
/// to 20 ms per receive): the primary loses its lease and closes its log
/// stream, so that the backup may ask to take over. Once the witness is
/// back and says the primary lives, the primary streams again and the
/// backup resumes the log it holds: same member, no second state transfer,
/// output flows again. So a primary dying right after is taken over.
/// Before, the backup refused the second stream, was dropped two leases
/// later and joined again with a state transfer, and a kill within it lost
/// the VM (CI: FTVM_CHAOS_SEED=164246554516675).
#[test]
fn after_a_witness_outage_the_backup_resumes_its_stream_and_takes_over_a_primary_dying_right_after() {
    let (mut fab, b0, p0, mut console) = protected("seconds=8", "[0010]");
    if let Some(l) = &fab.members[b0].inbound {
        l.ctl.set_delay(20);
    }
    let first = member_in(&status(&fab.w), "backup");
    fab.kill_witness();
    std::thread::sleep(Duration::from_millis(1600));
    fab.restart_witness();
    // Three leases: a backup refused a new stream is dropped after two.
    std::thread::sleep(Duration::from_millis(1500));
    let st = status(&fab.w);
    let kept = member_in(&st, "backup") == first && st.contains("holds the state");
    must(&mut fab, &console, kept, &format!("1.5 s after the witness's return, the backup {first} holding the state is no longer the view's:\n{st}"));
    let resumed = fab.members[p0].cur().is_some_and(|p| p.err().contains("resumes the log at offset"));
    must(&mut fab, &console, resumed, "the primary did not stream again to the backup it had (a resumed stream)");
    // Output released again: the backup acknowledges the resumed stream.
    let (before, t) = (console.out().len(), Instant::now());
    while console.out().len() <= before && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let flows = console.out().len() > before;
    must(&mut fab, &console, flows, "no output released within 5 s of the resumption");
    let perr = fab.members[p0].cur().unwrap().err();
    // The backup's start: from boot (in the view from the start) or by state transfer.
    let starts = perr.matches("state transfer to backup").count() + perr.matches("replays the log from boot").count();
    fab.note("stream resumed, output flows; kill -9 p0".into());
    fab.kill(p0);
    let outcome = settle(&mut fab, &mut console, 80, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Completed, &format!("outcome {outcome:?}"));
    must(&mut fab, &console, starts == 1, &format!("the backup was brought up {starts} times: the outage cost it its state"));
    let now = member_in(&status(&fab.w), "primary");
    must(&mut fab, &console, now == first, &format!("the VM went on under {now}, not under the backup {first} that held its state"));
    let b = fab.members[b0].cur().unwrap().err();
    must(&mut fab, &console, b.contains("with no state transfer") && b.contains("live at exit"), "the backup did not resume its stream and go live");
}

/// The seed's "view-server isolation": the primary and the backup both cut
/// from the witness for 2 s (the console still reaches it). Output pauses,
/// then resumes; every line once.
#[test]
fn witness_isolated_output_pauses_and_resumes_without_duplicates() {
    let (mut fab, _b0, _p0, mut console) = protected("seconds=8", "[0010]");
    let ctls: Vec<_> = fab.members.iter().map(|m| m.wlink.ctl.clone()).collect();
    let (grew, _) = output_during(
        &console,
        Duration::from_secs(2),
        || ctls.iter().for_each(|c| c.set_cut(true)),
        || ctls.iter().for_each(|c| c.set_cut(false)),
    );
    fab.note(format!("witness links cut 2 s; {grew} bytes printed from 800 ms in"));
    must(&mut fab, &console, grew == 0, &format!("{grew} bytes of output released while the roles were cut from the witness"));
    let outcome = settle(&mut fab, &mut console, 80, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Completed, &format!("outcome {outcome:?}"));
}

/// The seed's "view-server failure" with a primary failure inside it: the
/// witness is stopped for 2.5 s, the primary is killed 1 s into it.
/// The backup holds the state and is alive: once the witness is back it
/// must take over, every line once (it must not be left waiting, nor leave
/// its place in the view and the state with it).
#[test]
fn the_primary_dies_while_the_witness_is_stopped_and_the_backup_takes_over() {
    let (mut fab, _b0, p0, mut console) = protected("seconds=6", "[0005]");
    let pid = fab.witness.child.id();
    signal_pid(pid, libc::SIGSTOP);
    fab.note("SIGSTOP witness".into());
    std::thread::sleep(Duration::from_millis(1000));
    fab.kill(p0);
    // Past the backup timeout (2 s) in all.
    std::thread::sleep(Duration::from_millis(1500));
    signal_pid(pid, libc::SIGCONT);
    fab.note("SIGCONT witness".into());
    let outcome = settle(&mut fab, &mut console, 60, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Completed, &format!("outcome {outcome:?}"));
}

// ------------------------------------------------------------------ measurements

/// One failover: backup (its log stream slowed by `slow_ms` per receive
/// from the start), primary `seconds=5`, console; the primary killed after
/// `kill_after`. Returns kill -9 -> first output of the new primary.
fn failover_trial(slow_ms: u64, kill_after: Duration) -> Result<u128, String> {
    let mut fab = Fabric::new();
    let b0 = fab.add("b0");
    if let Some(l) = &fab.members[b0].inbound {
        l.ctl.set_delay(slow_ms);
    }
    fab.start(b0, "backup", "", &[]);
    fab.wait_says(b0, "waiting for the primary", Duration::from_secs(20));
    let p0 = fab.add("p0");
    fab.start(p0, "primary", "seconds=5", &[]);
    if !fab.wait_says(p0, "is primary of view", Duration::from_secs(30)) {
        return Err(fab.tails());
    }
    let mut console = console_of(&fab);
    std::thread::sleep(kill_after);
    let killed = fab.kill(p0).ok_or("the primary ended before the kill")?;
    let outcome = settle(&mut fab, &mut console, 50, PROGRESS_BOUND);
    if outcome != Outcome::Completed {
        return Err(report(&mut fab, &console, &format!("outcome {outcome:?}")));
    }
    let first = new_primary_times(&console.err()).into_iter().find(|&f| f > killed);
    first.map(|f| f - killed).ok_or_else(|| report(&mut fab, &console, "no output from a new primary"))
}

/// Failover time after kill -9 of the primary, p50/p99/max over
/// `FTVM_BENCH_KILLS` kills (default 20) each, with the log stream to the
/// backup as it is and slowed to 20 ms per receive. Prints one summary
/// line per case (`scripts/bench-failover.sh`).
#[test]
#[ignore = "a measurement: scripts/bench-failover.sh"]
fn bench_failover() {
    let kills = env_u64("FTVM_BENCH_KILLS").unwrap_or(20) as usize;
    let mut rng = Rng(env_u64("FTVM_CHAOS_BASE").unwrap_or(unix_ms() as u64));
    if !Netns::available() {
        eprintln!("failover bench: no network namespaces here; the slow case runs with a plain link");
    }
    for (label, slow) in [("log stream as is", 0), ("log stream 20 ms per receive", SLOW_MS)] {
        let delays: Vec<Duration> = (0..kills).map(|_| Duration::from_millis(rng.range(1000, 3000))).collect();
        let times = Arc::new(Mutex::new(Vec::new()));
        let errs = Arc::new(Mutex::new(Vec::new()));
        for pair in delays.chunks(2) {
            let hs: Vec<_> = pair
                .iter()
                .map(|&d| {
                    let (times, errs) = (times.clone(), errs.clone());
                    std::thread::spawn(move || match failover_trial(slow, d) {
                        Ok(ms) => times.lock().unwrap().push(ms),
                        Err(e) => errs.lock().unwrap().push(format!("kill after {d:?}: {e}")),
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        }
        let mut t = times.lock().unwrap().clone();
        t.sort();
        let errs = errs.lock().unwrap();
        for e in errs.iter() {
            eprintln!("failover bench, {label}: a trial failed: {e}");
        }
        let line = format!(
            "failover_ms ({label}): n={} p50={} p99={} max={} failed={} all={t:?}",
            t.len(),
            pct(&t, 0.5),
            pct(&t, 0.99),
            t.last().copied().unwrap_or(0),
            errs.len()
        );
        eprintln!("{line}");
    }
}

/// The harness's own links: a forwarder into a namespace carries bytes,
/// holds each receive as long as it is told, and a cut closes it.
#[test]
fn links_forward_delay_and_cut() {
    use std::io::{Read, Write};
    let ns = if Netns::available() { Some(Netns::new().unwrap()) } else { None };
    // An echo server on 127.0.0.1:P inside the namespace (or here).
    let port = free_port();
    let a = format!("127.0.0.1:{port}");
    let l = {
        let a = a.clone();
        match &ns {
            Some(ns) => ns.run(move || std::net::TcpListener::bind(a)).unwrap().unwrap(),
            None => std::net::TcpListener::bind(&a).unwrap(),
        }
    };
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut b = [0u8; 256];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (listen, to) = if ns.is_some() { (a.clone(), a.clone()) } else { ("127.0.0.1:0".to_string(), a.clone()) };
    let link = link(&listen, None, &to, ns.clone(), LinkCtl::new()).unwrap();
    let via = format!("127.0.0.1:{}", link.port);
    let mut c = std::net::TcpStream::connect(&via).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let rtt = |c: &mut std::net::TcpStream| {
        let t = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).map(|_| t.elapsed())
    };
    let fast = rtt(&mut c).unwrap();
    link.ctl.set_delay(100);
    let slow = rtt(&mut c).unwrap();
    assert!(fast < Duration::from_millis(50), "{fast:?}");
    assert!(slow >= Duration::from_millis(200), "a delay of 100 ms per receive each way gave a round trip of {slow:?}");
    link.ctl.set_cut(true);
    std::thread::sleep(Duration::from_millis(200));
    assert!(rtt(&mut c).is_err(), "a cut link still carried bytes");
    eprintln!("link round trip {fast:?}, with 100 ms per receive {slow:?}; cut: closed");
}

/// Found by the schedules (seed 83244890541587): a backup stopped past
/// the backup timeout is dropped, and the primary releases output without
/// it; then the primary is cut from the witness, and the backup comes
/// back. It never had the log behind the output released meanwhile, so it
/// must not take over (rule 2 and 5): the console stays one run's output,
/// and the run completes (the primary, back in touch, goes on; or the
/// backup, transferred anew, takes over).
#[test]
fn a_dropped_backup_that_comes_back_is_not_promoted_over_output_it_never_had() {
    let (mut fab, b0, p0, mut console) = protected("seconds=6 hz=1000", "[0002]");
    let pid = fab.members[b0].cur().unwrap().child.id();
    signal_pid(pid, libc::SIGSTOP);
    fab.note("SIGSTOP b0".into());
    // Dropped after 2 s; the primary releases output alone meanwhile.
    std::thread::sleep(Duration::from_millis(2600));
    let cut = fab.members[p0].wlink.ctl.clone();
    cut.set_cut(true);
    fab.note("p0 cut from the witness".into());
    std::thread::sleep(Duration::from_millis(350));
    signal_pid(pid, libc::SIGCONT);
    fab.note("SIGCONT b0".into());
    std::thread::sleep(Duration::from_millis(900));
    cut.set_cut(false);
    fab.note("p0's witness link healed".into());
    let outcome = settle(&mut fab, &mut console, 60, PROGRESS_BOUND);
    must(&mut fab, &console, outcome == Outcome::Completed, &format!("outcome {outcome:?}"));
}
