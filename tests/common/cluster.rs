//! What the FT tests share: the real `ftvm` roles as child processes
//! (witness, primary, backup, console) on loopback ports, the cluster key,
//! a cuttable TCP proxy, and the console checkers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm::ft::key::ClusterKey;

pub fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

/// A scratch directory for this test process.
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ftvm-ft-tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// A new key file made by `ftvm keygen`.
pub fn keygen(name: &str) -> String {
    let p = scratch().join(name);
    let o = ftvm().args(["keygen", "--out"]).arg(&p).output().unwrap();
    assert!(o.status.success(), "ftvm keygen: {}", String::from_utf8_lossy(&o.stderr));
    p.to_str().unwrap().to_string()
}

/// The cluster key file every role and client of these tests holds.
pub fn key_file() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| keygen("cluster.key"))
}

/// The cluster key, for tests that speak the protocols themselves.
pub fn key() -> ClusterKey {
    ClusterKey::load(key_file().as_ref()).unwrap()
}

/// `args` with the cluster key added after an FT subcommand.
pub fn with_key<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if matches!(args.first(), Some(&("witness" | "primary" | "backup" | "console" | "status"))) && !args.contains(&"--key") {
        v.splice(1..1, ["--key", key_file()]);
    }
    v
}

/// `ftvm ARGS` (with the cluster key), to run to completion.
pub fn ft(args: &[&str]) -> Command {
    let mut c = ftvm();
    c.args(with_key(args));
    c
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

pub fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// A child process whose output is collected; killed on drop.
pub struct Proc {
    pub child: Child,
    pub out: Arc<Mutex<Vec<u8>>>,
    pub err: Arc<Mutex<Vec<u8>>>,
}

pub fn collect<R: Read + Send + 'static>(mut r: R) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_with(args, Stdio::null())
    }

    pub fn spawn_with(args: &[&str], stdin: Stdio) -> Proc {
        let mut child = ft(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Proc { child, out, err }
    }
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(st.success());
    }
    /// Waits for exit (up to `t`), then a moment for the output threads.
    pub fn wait(&mut self, t: Duration) -> Option<i32> {
        let deadline = Instant::now() + t;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(what: &str, t: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + t;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Cluster {
    pub w: String,
    /// The embedded witness's process (None: the view is in etcd).
    pub witness: Option<Proc>,
    pub backup: Proc,
    pub b: String,
    pub primary: Proc,
    pub p: String,
    pub console: Proc,
}

/// Starts `ftvm ARGS --listen ADDR` on a fresh port and waits for `ready`
/// on its stderr. A port found free can be taken (by another test's
/// connection) before the role binds it: then it tries another.
pub fn listening(args: &[&str], ready: &str) -> (Proc, String) {
    for _ in 0..5 {
        let a = addr();
        let mut p = Proc::spawn(&[args, &["--listen", &a]].concat());
        let t0 = Instant::now();
        loop {
            if p.err().contains(ready) {
                return (p, a);
            }
            if let Some(st) = p.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                assert!(p.err().contains("in use"), "{args:?} exited ({st}):\n{}", p.err());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {args:?}:\n{}", p.err());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("no free port for {args:?}");
}

pub fn start_witness() -> (Proc, String) {
    listening(&["witness"], "witness: listening on")
}

pub fn start_backup(w: &str) -> (Proc, String) {
    listening(&["backup", "--witness", w], "waiting for the primary")
}

pub fn start_primary(w: &str, cmdline: &str) -> (Proc, String) {
    listening(&["primary", "--witness", w, "--no-stdin", "--cmdline", cmdline], "is primary of view")
}

pub fn start(seconds: u32) -> Cluster {
    start_on(fresh_embedded(), seconds)
}

/// A fresh place for one test's view: (the witness's process if it has
/// one, the --witness argument).
pub type Fresh<'a> = &'a (dyn Fn() -> (Option<Proc>, String) + Sync);

/// A new embedded witness.
pub fn fresh_embedded() -> (Option<Proc>, String) {
    let (p, w) = start_witness();
    (Some(p), w)
}

/// Backup, primary running the test guest for `seconds`, and a console,
/// on the witness `at`.
pub fn start_on((witness, w): (Option<Proc>, String), seconds: u32) -> Cluster {
    let (backup, b) = start_backup(&w);
    let (primary, p) = start_primary(&w, &format!("seconds={seconds}"));
    let console = Proc::spawn(&["console", "--witness", &w, "--give-up", "15"]);
    Cluster { w, witness, backup, b, primary, p, console }
}

/// When the console first printed output of a new primary (unix ms).
pub fn first_new_output(console_err: &str) -> Option<u128> {
    console_err
        .lines()
        .find_map(|l| l.split("first output from new primary").nth(1)?.split("unix_ms=").nth(1)?.trim().parse::<u128>().ok())
}

/// Lines [0001]..[n] each exactly once, in order, then [done].
pub fn check_console(out: &str, n: usize) -> Result<(), String> {
    let nums: Vec<usize> = out
        .lines()
        .filter(|l| l.starts_with("[0") || l.starts_with("[1"))
        .filter_map(|l| l.get(1..5)?.parse().ok())
        .collect();
    let want: Vec<usize> = (1..=n).collect();
    if nums != want {
        let missing: Vec<_> = want.iter().filter(|i| !nums.contains(i)).collect();
        let mut seen = std::collections::HashSet::new();
        let dups: Vec<_> = nums.iter().filter(|i| !seen.insert(**i)).collect();
        return Err(format!("lines wrong: missing {missing:?}, duplicated {dups:?}\n{out}"));
    }
    if !out.lines().last().unwrap_or("").starts_with("[done]") {
        return Err(format!("no [done] line at the end:\n{out}"));
    }
    if !out.contains("[echo]") {
        check_chain(out)?;
    }
    Ok(())
}

pub fn status(w: &str) -> String {
    let o = ft(&["status", "--witness", w]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn primary_exit(w: &str) -> u64 {
    let s = status(w);
    s.lines()
        .find_map(|l| l.strip_prefix("log: primary at exit #"))
        .and_then(|r| r.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// A TCP proxy that can be cut: the primary talks to the witness through it.
pub fn proxy(listen: &str, to: String, cut: Arc<AtomicBool>) {
    let l = TcpListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            if cut.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(s) = TcpStream::connect(&to) else { continue };
            for (mut a, mut b) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                let cut = cut.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = a.set_read_timeout(Some(Duration::from_millis(50)));
                    loop {
                        if cut.load(Ordering::SeqCst) {
                            let _ = a.shutdown(std::net::Shutdown::Both);
                            let _ = b.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        match a.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                if b.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        }
    });
}

/// The test guest's running checksum (FNV-1a over each status line's
/// number, ticks, PIT count and read-back; see guest/testguest/main.c),
/// recomputed from what a console printed: a console stream spliced from
/// two runs, or with a line lost, repeated or torn, breaks the chain.
/// Returns the number of status lines. For runs without typed input (the
/// guest sums typed bytes into the chain too).
pub fn check_chain(out: &str) -> Result<u64, String> {
    fn sum_u64(s: &mut u32, mut v: u64) {
        for _ in 0..8 {
            *s = (*s ^ (v as u8 as u32)).wrapping_mul(0x0100_0193);
            v >>= 8;
        }
    }
    let mut sum: u32 = 0x811c_9dc5;
    let mut n = 0u64;
    for (i, l) in out.lines().enumerate() {
        let bad = |what: &str| Err(format!("console line {} {what}: {l:?}\n{out}", i + 1));
        if let Some(rest) = l.strip_prefix("[done] ") {
            let s = rest.split("sum=").nth(1).and_then(|h| u32::from_str_radix(h.get(..8)?, 16).ok());
            if !rest.contains(&format!("lines={n} ")) || s != Some(sum) {
                return bad(&format!("ends the run with another chain (after {n} lines, sum {sum:08x})"));
            }
            continue;
        }
        if !l.contains("ticks=") || l.starts_with("[spin]") {
            continue;
        }
        let field = |k: &str| l.split(&format!(" {k}=")).nth(1).map(|r| r.split(' ').next().unwrap_or(""));
        let num = l.get(1..5).and_then(|d| d.parse::<u64>().ok()).filter(|_| l.get(5..13) == Some("] ticks="));
        let (Some(num), Some(t), Some(p), Some(s)) = (
            num,
            l.get(13..).and_then(|r| r.split(' ').next()?.parse::<u64>().ok()),
            field("pit").and_then(|v| v.parse::<u64>().ok()),
            field("sum").and_then(|v| (v.len() == 8).then(|| u32::from_str_radix(v, 16).ok()).flatten()),
        ) else {
            return bad("is torn or garbled");
        };
        if num != n + 1 {
            return bad(&format!("is line {num} where line {} belongs", n + 1));
        }
        sum_u64(&mut sum, num);
        sum_u64(&mut sum, t);
        sum_u64(&mut sum, p);
        if num % 10 == 0 {
            let Some((st, c)) = field("rb").and_then(|v| v.split_once('/')) else { return bad("lacks its read-back") };
            let (Ok(st), Ok(c)) = (u64::from_str_radix(st, 16), c.parse::<u64>()) else { return bad("has a garbled read-back") };
            sum_u64(&mut sum, st);
            sum_u64(&mut sum, c);
        }
        if s != sum {
            return bad(&format!("breaks the checksum chain (expected sum={sum:08x})"));
        }
        n = num;
    }
    Ok(n)
}

/// The member (`ADDR@ID`) `ftvm status` names for `role` ("primary" or
/// "backup"); empty if none.
pub fn member_of(w: &str, role: &str) -> String {
    status(w)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{role}: "))?.split(' ').next().map(String::from))
        .filter(|m| m != "none")
        .unwrap_or_default()
}

/// `ftvm status` says `addr`'s member is the view's live backup.
pub fn backup_alive_at(w: &str, addr: &str) -> bool {
    let s = status(w);
    s.lines().any(|l| l.starts_with(&format!("backup: {addr}@")) && l.contains("(alive,"))
}

// ------------------------------------------------ fault injection: links and network namespaces
//
// The log stream goes to the address a backup announces, which is the one
// it listens on: to put a link of our own in it, a role runs in a network
// namespace of its own (loopback only) and listens there on 127.0.0.1:P,
// while here, in the test's namespace, a forwarder listens on the same
// 127.0.0.1:P and carries each connection into the role's namespace; inside
// it, forwarders on 127.0.0.1:Q carry the role's own connections (to the
// witness, to other roles) out. Every forwarder has a `LinkCtl`: cut, or a
// delay per receive. No address but loopback is used.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

/// The controls of one link: cut (its connections closed, new ones closed
/// at once) or slow (each receive held `delay_ms` before it is passed on).
#[derive(Default, Debug)]
pub struct LinkCtl {
    pub cut: AtomicBool,
    pub delay_ms: AtomicU64,
}

impl LinkCtl {
    pub fn new() -> Arc<LinkCtl> {
        Arc::new(LinkCtl::default())
    }
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
}

/// A network namespace of our own with only its loopback, up; it lives as
/// long as this handle (and any process in it).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
}

impl Netns {
    /// Needs CAP_SYS_ADMIN (root); an error otherwise.
    pub fn new() -> std::io::Result<Arc<Netns>> {
        let fd = std::thread::spawn(|| -> std::io::Result<OwnedFd> {
            // SAFETY: unshare affects only this thread, which ends here.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net")?))
        })
        .join()
        .unwrap()?;
        let ns = Arc::new(Netns { fd });
        let mut up = Command::new("ip");
        up.args(["link", "set", "lo", "up"]).stdout(Stdio::null()).stderr(Stdio::piped());
        ns.command(&mut up);
        let o = up.output()?;
        if !o.status.success() {
            return Err(std::io::Error::other(format!("ip link set lo up: {}", String::from_utf8_lossy(&o.stderr))));
        }
        Ok(ns)
    }

    /// Whether this host lets the tests make namespaces (checked once);
    /// `FTVM_TEST_NO_NETNS=1` says no.
    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            let why = if std::env::var_os("FTVM_TEST_NO_NETNS").is_some() {
                "FTVM_TEST_NO_NETNS is set".to_string()
            } else {
                match Netns::new() {
                    Ok(_) => return true,
                    Err(e) => e.to_string(),
                }
            };
            eprintln!("network namespaces unavailable ({why}): the log stream cannot be slowed");
            false
        })
    }

    /// Moves the calling thread into this namespace (for its new sockets).
    pub fn enter(&self) -> std::io::Result<()> {
        // SAFETY: a plain syscall on a valid fd.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `c` will run inside this namespace.
    pub fn command(&self, c: &mut Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.fd.as_raw_fd();
        // SAFETY: only a syscall between fork and exec.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// `f` on a thread inside this namespace.
    pub fn run<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
        let ns = self.clone();
        std::thread::spawn(move || -> std::io::Result<T> {
            ns.enter()?;
            Ok(f())
        })
        .join()
        .unwrap()
    }
}

/// A forwarder: a listener that carries each connection to `to` through a
/// `LinkCtl`. It stops (listener closed, connections shut) when dropped.
pub struct Link {
    pub ctl: Arc<LinkCtl>,
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Carries bytes from `a` to `b` until either side ends, the link is cut or
/// stopped; holds each receive `delay_ms` first.
fn pump(mut a: TcpStream, mut b: TcpStream, ctl: Arc<LinkCtl>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    let _ = a.set_read_timeout(Some(Duration::from_millis(50)));
    let end = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    };
    loop {
        if ctl.cut.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
            return end(&a, &b);
        }
        match a.read(&mut buf) {
            Ok(0) => return end(&a, &b),
            Ok(n) => {
                let d = ctl.delay_ms.load(Ordering::SeqCst);
                if d > 0 {
                    std::thread::sleep(Duration::from_millis(d));
                }
                if ctl.cut.load(Ordering::SeqCst) || b.write_all(&buf[..n]).is_err() {
                    return end(&a, &b);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return end(&a, &b),
        }
    }
}

/// A link listening on `listen` (inside `lns`, or in the test's namespace)
/// to `to` (connected from inside `cns`, or from the test's namespace).
/// `listen` may name port 0: `Link::port` says which one it got.
pub fn link(listen: &str, lns: Option<&Arc<Netns>>, to: &str, cns: Option<Arc<Netns>>, ctl: Arc<LinkCtl>) -> std::io::Result<Link> {
    let l = {
        let listen = listen.to_string();
        match lns {
            Some(ns) => ns.run(move || TcpListener::bind(listen))??,
            None => TcpListener::bind(listen)?,
        }
    };
    l.set_nonblocking(true)?;
    let port = l.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let (to, c2, s2) = (to.to_string(), ctl.clone(), stop.clone());
    std::thread::spawn(move || {
        while !s2.load(Ordering::SeqCst) {
            let c = match l.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(_) => continue,
            };
            if c2.cut.load(Ordering::SeqCst) {
                continue;
            }
            let (to, ctl, stop, cns) = (to.clone(), c2.clone(), s2.clone(), cns.clone());
            std::thread::spawn(move || {
                let _ = c.set_nonblocking(false);
                if let Some(ns) = &cns {
                    if ns.enter().is_err() {
                        return;
                    }
                }
                let Ok(s) = TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_secs(1)) else { return };
                let _ = (c.set_nodelay(true), s.set_nodelay(true));
                let (Ok(c2), Ok(s2)) = (c.try_clone(), s.try_clone()) else { return };
                let (ctl2, stop2) = (ctl.clone(), stop.clone());
                std::thread::spawn(move || pump(s2, c2, ctl2, stop2));
                pump(c, s, ctl, stop);
            });
        }
    });
    Ok(Link { ctl, port, stop })
}

/// `ftvm ARGS` (with the cluster key) as a child whose output is collected,
/// inside `ns` if given.
pub fn spawn_in(ns: Option<&Netns>, args: &[&str]) -> Proc {
    let mut c = ft(args);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(ns) = ns {
        ns.command(&mut c);
    }
    let mut child = c.spawn().unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    Proc { child, out, err }
}

/// The port of a view member as `ftvm status` prints it (`ADDR` or
/// `ADDR@ID`, maybe followed by more words), or None for `none`.
pub fn member_port(s: &str) -> Option<u16> {
    let a = s.split_whitespace().next()?;
    let a = a.split('@').next()?;
    a.rsplit(':').next()?.parse().ok()
}

/// The line of `ftvm status` output that starts with `what: `, without it.
pub fn status_field<'a>(status: &'a str, what: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(what)?.strip_prefix(": "))
}
