//! FT scenarios run against any witness: the embedded one (`tests/ft.rs`)
//! and an etcd cluster (`tests/ft_etcd.rs`). Each takes a [`Fresh`] that
//! makes a new place for one cluster's view.

use std::io::{BufRead, Read, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvm::ft::secure;

use super::cluster::*;

/// One kill-the-primary trial; returns the failover time (0: none seen).
pub fn primary_kill_trial(fresh: Fresh, kill_after: Duration) -> Result<u128, String> {
    let mut c = start_on(fresh(), 3);
    std::thread::sleep(kill_after);
    let killed = unix_ms();
    c.primary.kill9();
    let code = c.console.wait(Duration::from_secs(30));
    let out = c.console.out();
    let err = c.console.err();
    if code != Some(0) {
        return Err(format!("console exited {code:?}\n{err}\nbackup:\n{}", c.backup.err()));
    }
    check_console(&out, 30).map_err(|e| format!("{e}\nconsole:\n{err}\nbackup:\n{}", c.backup.err()))?;
    // The primary may have finished before the kill landed, or the
    // console may have been behind: then there is no "new primary" output.
    Ok(first_new_output(&err).map_or(0, |f| f.saturating_sub(killed)))
}

/// `n` kill trials, `parallel` at a time, kill points spread over the
/// whole run (boot, steady state, near the end); the failover times.
pub fn primary_killed_at_random_moments(fresh: Fresh, n: usize, parallel: usize) -> Vec<u128> {
    let failures = Mutex::new(Vec::new());
    let times = Mutex::new(Vec::new());
    let mut seed = (unix_ms() as u64) | 1;
    eprintln!("kill-point seed {seed}");
    let mut delays = Vec::new();
    for _ in 0..n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        delays.push(Duration::from_millis(200 + seed % 2800));
    }
    for batch in delays.chunks(parallel) {
        std::thread::scope(|s| {
            for &d in batch {
                let (failures, times) = (&failures, &times);
                s.spawn(move || match primary_kill_trial(fresh, d) {
                    Ok(ms) => times.lock().unwrap().push(ms),
                    Err(e) => failures.lock().unwrap().push(format!("kill after {d:?}: {e}")),
                });
            }
        });
    }
    let f = failures.into_inner().unwrap();
    assert!(f.is_empty(), "{} of {n} trials failed:\n{}", f.len(), f.join("\n-----\n"));
    let mut t = times.into_inner().unwrap();
    t.sort();
    eprintln!("failover ms over {n} trials: {t:?}");
    t
}

/// The backup killed at random moments: the primary carries on alone.
pub fn backup_killed_at_random_moments(fresh: Fresh, n: u64) {
    let mut seed = (unix_ms() as u64) | 3;
    eprintln!("kill-point seed {seed}");
    let errs = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..n {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let d = Duration::from_millis(200 + (seed >> 33) % 2500);
            let errs = &errs;
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(300 * (i % 4)));
                let mut c = start_on(fresh(), 3);
                std::thread::sleep(d);
                c.backup.kill9();
                let code = c.console.wait(Duration::from_secs(30));
                let out = c.console.out();
                let r = if code != Some(0) {
                    Err(format!("kill after {d:?}: console exited {code:?}: {}", c.console.err()))
                } else {
                    check_console(&out, 30).map_err(|e| format!("kill after {d:?}: {e}\nprimary:\n{}", c.primary.err())).and_then(|_| {
                        match c.primary.wait(Duration::from_secs(10)) {
                            Some(0) => Ok(()),
                            other => Err(format!("primary exited {other:?}: {}", c.primary.err())),
                        }
                    })
                };
                if let Err(e) = r {
                    errs.lock().unwrap().push(e);
                }
            });
        }
    });
    let errs = errs.into_inner().unwrap();
    assert!(errs.is_empty(), "{}", errs.join("\n-----\n"));
}

/// A second primary for a running VM is refused, and one on a port in
/// use is a clear error.
pub fn a_second_primary_is_refused(fresh: Fresh) {
    let c = start_on(fresh(), 3);
    let other = addr();
    let o = ft(&["primary", "--witness", &c.w, "--listen", &other, "--no-stdin", "--cmdline", "seconds=1"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("a primary is already running"), "{err}");
    let o = ft(&["primary", "--witness", &c.w, "--listen", &c.p, "--no-stdin"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("port is in use"));
}

/// Failover, then a fresh backup joins the running VM by state transfer,
/// then a second failover: the console is one run's output throughout.
pub fn reprotected_vm_survives_a_second_failover(fresh: Fresh) {
    let mut c = start_on(fresh(), 6);
    wait_for("output", Duration::from_secs(10), || c.console.out().contains("[0005]"));
    c.primary.kill9();
    wait_for("the first takeover", Duration::from_secs(10), || c.backup.err().contains("live at exit"));
    let (mut backup2, b2) = start_backup(&c.w);
    wait_for("re-protection", Duration::from_secs(10), || backup2.err().contains("replaying in lockstep"));
    wait_for("the backup to catch up", Duration::from_secs(10), || {
        let s = status(&c.w);
        s.contains(&format!("backup: {b2}")) && (s.contains("(lag 0 exits)") || s.contains("(lag 1 exits)"))
    });
    std::thread::sleep(Duration::from_millis(500));
    c.backup.kill9();
    assert_eq!(c.console.wait(Duration::from_secs(30)), Some(0), "{}\n{}", c.console.err(), backup2.err());
    check_console(&c.console.out(), 60).unwrap();
    assert!(backup2.err().contains("live at exit"), "{}", backup2.err());
    assert_eq!(backup2.wait(Duration::from_secs(10)), Some(0));
}

/// Typed input is neither lost nor repeated across a failover.
pub fn typed_input_across_a_failover(fresh: Fresh) {
    let (_witness, w) = fresh();
    let (backup, _b) = start_backup(&w);
    let (mut primary, _p) = start_primary(&w, "seconds=5");
    let mut console = Proc::spawn_with(&["console", "--witness", &w, "--give-up", "15"], Stdio::piped());
    let mut typing = console.child.stdin.take().unwrap();
    wait_for("output", Duration::from_secs(10), || console.out().contains("[0005]"));
    typing.write_all(b"before-kill\n").unwrap();
    wait_for("the echo", Duration::from_secs(10), || console.out().contains("before-kill"));
    primary.kill9();
    // Typed while there is no primary: held by the client, sent to the next.
    typing.write_all(b"during-failover\n").unwrap();
    assert_eq!(console.wait(Duration::from_secs(30)), Some(0), "{}\n{}", console.err(), backup.err());
    let out = console.out();
    assert_eq!(out.matches("[echo] \"before-kill\"").count(), 1, "{out}");
    assert_eq!(out.matches("[echo] \"during-failover\"").count(), 1, "{out}");
    assert!(out.contains("rx=28 "), "the guest did not count 28 typed bytes:\n{out}");
    check_console(&out, 50).unwrap();
}

/// A primary that reaches the view only through `wp` (cut by `cut`), its
/// backup and console through `w`: once cut, the primary releases nothing
/// more before the backup's first output (read straight off the old
/// primary, timestamped), and the console is one run's output.
pub fn primary_cut_off_goes_quiet_before_the_backup_goes_live(w: &str, wp: &str, cut: &AtomicBool) {
    let (backup, _b) = start_backup(w);
    let (primary, p) = start_primary(wp, "seconds=5");
    let (mut r, mut direct) = secure::connect(&p, &key(), Duration::from_secs(2)).unwrap();
    direct.write_all(b"CONSOLE from=0\n").unwrap();
    let last_old = Arc::new(Mutex::new(0u128));
    {
        let last_old = last_old.clone();
        std::thread::spawn(move || {
            let _keep = direct;
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if let Some(rest) = line.strip_prefix("DATA ") {
                    let len: usize = rest.split(' ').nth(1).unwrap().trim().parse().unwrap();
                    let mut b = vec![0u8; len];
                    r.read_exact(&mut b).unwrap();
                    *last_old.lock().unwrap() = unix_ms();
                }
                line.clear();
            }
        });
    }
    let mut console = Proc::spawn(&["console", "--witness", w, "--give-up", "15"]);
    wait_for("output", Duration::from_secs(10), || console.out().contains("[0005]"));
    cut.store(true, Ordering::SeqCst);
    let cut_at = unix_ms();
    // Reconnected once the backup is live (its guest still running), the
    // old primary learns it was replaced and stops (75), releasing nothing.
    wait_for("the backup to go live", Duration::from_secs(20), || first_new_output(&console.err()).is_some());
    cut.store(false, Ordering::SeqCst);
    assert_eq!(console.wait(Duration::from_secs(30)), Some(0), "{}\n{}", console.err(), backup.err());
    check_console(&console.out(), 50).map_err(|e| format!("{e}\nconsole:\n{}\nbackup:\n{}\nprimary:\n{}", console.err(), backup.err(), primary.err())).unwrap();
    let first_new = first_new_output(&console.err()).expect("the backup never went live");
    let last_old = *last_old.lock().unwrap();
    assert!(last_old < first_new, "the old primary released output at {last_old}, after the new one started at {first_new} (cut at {cut_at})");
    eprintln!("cut at {cut_at}: old primary's last output +{} ms, new primary's first +{} ms", last_old.saturating_sub(cut_at), first_new - cut_at);
    assert!(primary.err().contains("lease expired"), "{}", primary.err());
    let mut primary = primary;
    assert_eq!(primary.wait(Duration::from_secs(15)), Some(75), "{}", primary.err());
}

/// A primary killed while its guest computes without exiting (CPL3, the
/// log full of resyncs): the backup applies the resyncs it holds, takes
/// over in the middle of the spin, and the console stays one run's output.
pub fn primary_killed_while_its_guest_spins(fresh: Fresh) {
    let (_witness, w) = fresh();
    let (backup, _b) = start_backup(&w);
    let (mut primary, _p) = start_primary(&w, "spin3=150 spinkb=512 hz=100 seconds=1 lines=10");
    let mut console = Proc::spawn(&["console", "--witness", &w, "--give-up", "15"]);
    wait_for("the spin to start", Duration::from_secs(20), || console.out().contains("[spin] cpl=3 start"));
    std::thread::sleep(Duration::from_millis(600));
    assert!(!console.out().contains("[spin] cpl=3 ticks="), "the spin ended before the kill:\n{}", console.out());
    primary.kill9();
    let code = console.wait(Duration::from_secs(60));
    let out = console.out();
    assert_eq!(code, Some(0), "console: {}\nbackup:\n{}", console.err(), backup.err());
    assert_eq!(out.matches("[spin] cpl=3 ticks=").count(), 1, "{out}");
    let ticks: u64 = out
        .split("[spin] cpl=3 ticks=")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(ticks >= 150, "{out}");
    check_console(&out, 10).unwrap();
    let mut backup = backup;
    assert_eq!(backup.wait(Duration::from_secs(30)), Some(0), "{}", backup.err());
    let b = backup.err();
    assert!(b.contains("live at exit"), "{b}");
    // Its summary counts the resyncs it replayed and the ones it made live.
    let resyncs: u64 = b
        .split(" resync)")
        .next()
        .and_then(|s| s.rsplit(", ").next()?.parse().ok())
        .unwrap_or(0);
    assert!(resyncs >= 100, "{resyncs} resyncs for 150 ticks of spinning:\n{b}");
}

/// A stopped backup holds the output while the guest runs on.
pub fn stopped_backup_holds_output(fresh: Fresh) {
    let mut c = start_on(fresh(), 4);
    wait_for("console output", Duration::from_secs(10), || c.console.out().contains("[0005]"));
    c.backup.signal("STOP");
    std::thread::sleep(Duration::from_millis(300));
    let held = c.console.out().len();
    let exit_before = primary_exit(&c.w);
    std::thread::sleep(Duration::from_millis(900));
    let exit_after = primary_exit(&c.w);
    assert_eq!(c.console.out().len(), held, "output advanced while the backup could not acknowledge it");
    assert!(exit_after > exit_before + 50, "the guest did not keep running: exit #{exit_before} -> #{exit_after}");
    c.backup.signal("CONT");
    assert_eq!(c.console.wait(Duration::from_secs(30)), Some(0), "{}", c.console.err());
    check_console(&c.console.out(), 40).unwrap();
    assert!(c.console.out().len() > held);
}

/// A cut switch for [`proxy`].
pub fn new_cut() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
