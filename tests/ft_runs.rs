//! Runs: one VM's life. When a VM is lost (its primary died and no backup
//! held its state) the cluster says so, never quietly boots another VM in
//! its place, and no console shows two runs' output as one stream. The
//! seed's scenario "no backup, and the primary fails".

use super::*;

/// `ftvm status`'s `state:` line.
fn state(w: &str) -> String {
    status(w).lines().find_map(|l| l.strip_prefix("state: ").map(String::from)).unwrap_or_default()
}

#[test]
fn no_backup_and_the_primary_fails_the_vm_is_said_lost_and_only_new_run_replaces_it() {
    let (_witness, w) = start_witness();
    let (mut primary, p) = start_primary(&w, "seconds=30");
    let mut console = Proc::spawn(&["console", "--witness", &w, "--give-up", "30"]);
    wait_for("output", Duration::from_secs(10), || console.out().contains("[0005]"));
    assert!(state(&w).starts_with("running: primary"), "{}", state(&w));
    primary.kill9();
    // The console does not wait out its 30 s: the witness says the VM is lost.
    let t0 = Instant::now();
    let code = console.wait(Duration::from_secs(10));
    assert_eq!(code, Some(1), "console: {}", console.err());
    assert!(console.err().contains("is lost"), "{}", console.err());
    eprintln!("the console said the VM is lost {:?} after the kill", t0.elapsed());
    check_chain(&console.out()).unwrap();
    let s = state(&w);
    assert!(s.starts_with("lost: the VM of run") && s.contains("--new-run"), "{s}");
    // The same command again (a restart at the same address) is refused...
    let o = ft(&["primary", "--witness", &w, "--listen", &p, "--no-stdin", "--cmdline", "seconds=2"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is lost") && err.contains("--new-run"), "{err}");
    // A backup started now waits (there is nothing to protect), and says why.
    let mut waiting = Proc::spawn(&["backup", "--witness", &w, "--listen", &addr()]);
    wait_for("the backup to say why it waits", Duration::from_secs(5), || waiting.err().contains("no live primary to join"));
    // --new-run boots a new VM, a new run; a new console shows it whole.
    let (_p2, _) = listening(&["primary", "--witness", &w, "--new-run", "--no-stdin", "--cmdline", "seconds=2"], "is primary of view");
    let mut console2 = Proc::spawn(&["console", "--witness", &w, "--give-up", "15"]);
    assert_eq!(console2.wait(Duration::from_secs(30)), Some(0), "{}", console2.err());
    check_console(&console2.out(), 20).unwrap();
    // The waiting backup joined the new run and replayed it to its end.
    assert_eq!(waiting.wait(Duration::from_secs(20)), Some(0), "{}", waiting.err());
    assert!(waiting.err().contains("replayed to the end in lockstep"), "{}", waiting.err());
}

#[test]
fn a_console_never_shows_another_runs_output() {
    let (_witness, w) = start_witness();
    let (primary, _p) = start_primary(&w, "seconds=30");
    let mut console = Proc::spawn(&["console", "--witness", &w, "--give-up", "30"]);
    wait_for("output", Duration::from_secs(10), || console.out().contains("[0005]"));
    // Frozen, not dead: the console stays connected to it.
    primary.signal("STOP");
    wait_for("the VM to be lost", Duration::from_secs(5), || state(&w).starts_with("lost:"));
    let (_p2, _) = listening(&["primary", "--witness", &w, "--new-run", "--no-stdin", "--cmdline", "seconds=5"], "is primary of view");
    let code = console.wait(Duration::from_secs(10));
    assert_eq!(code, Some(3), "console: {}", console.err());
    assert!(console.err().contains("is gone"), "{}", console.err());
    check_chain(&console.out()).unwrap();
    // The frozen primary, woken, finds another primary and stops (fenced).
    let mut primary = primary;
    primary.signal("CONT");
    assert_eq!(primary.wait(Duration::from_secs(10)), Some(75), "{}", primary.err());
}
