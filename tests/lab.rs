//! Linux under ftvm, tested in the lab: a standard kvm-amd inside QEMU's
//! emulator (scripts/lab.sh), since a stock Linux kernel cannot run on the
//! development machines' own /dev/kvm. One lab session runs every scenario
//! (tests/lab/scenarios.sh); each test checks its part.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

struct Section {
    rc: i32,
    text: String,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Runs the lab once (the first test to get here pays for it).
fn lab() -> &'static HashMap<String, Section> {
    static LAB: OnceLock<HashMap<String, Section>> = OnceLock::new();
    LAB.get_or_init(|| {
        let out = root().join("guest/linux/out");
        if !out.join("vmlinux").exists() {
            let st = Command::new(root().join("scripts/linux-guest.sh")).status().expect("running scripts/linux-guest.sh");
            assert!(st.success(), "scripts/linux-guest.sh failed");
        }
        let o = Command::new(root().join("scripts/lab.sh"))
            .current_dir(root())
            .args(["--timeout", "900", "--ftvm", env!("CARGO_BIN_EXE_ftvm")])
            .arg("--file")
            .arg(format!("{}:/g/vmlinux", out.join("vmlinux").display()))
            .arg("--file")
            .arg(format!("{}:/g/bzImage", out.join("bzImage").display()))
            .arg("--file")
            .arg(format!("{}:/g/initrd", out.join("initramfs.cpio.gz").display()))
            .arg("--file")
            .arg(format!("{}:/scenarios.sh", root().join("tests/lab/scenarios.sh").display()))
            .args(["--", "sh", "/scenarios.sh"])
            .output()
            .expect("running scripts/lab.sh");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "the lab failed ({:?}):\n{text}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        parse(&text)
    })
}

fn parse(text: &str) -> HashMap<String, Section> {
    let mut m = HashMap::new();
    let mut cur: Option<(String, i32, String)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("=== end ") {
            if let Some((name, rc, body)) = cur.take() {
                assert_eq!(rest.trim_end_matches(" ==="), name);
                m.insert(name, Section { rc, text: body });
            }
        } else if let Some(rest) = line.strip_prefix("=== ") {
            let rest = rest.trim_end_matches(" ===");
            let (name, rc) = rest.rsplit_once(" rc=").expect("section header");
            cur = Some((name.to_string(), rc.parse().unwrap(), String::new()));
        } else if let Some((_, _, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    m
}

fn sec(name: &str) -> &'static Section {
    lab().get(name).unwrap_or_else(|| panic!("the lab printed no section {name}"))
}

#[test]
fn linux_boots_runs_its_workload_and_powers_off() {
    let s = sec("linux-run");
    let err = &sec("linux-run.stderr").text;
    assert_eq!(s.rc, 0, "{}\n{err}", s.text);
    for want in ["FTVM-LINUX-UP", "FTVM-WORKLOAD-BEGIN", "pipe sum: 2001000", "ramfs: copy identical", "timers: 3 x sleep 0.2 done", "FTVM-WORKLOAD-END", "reboot: System halted"] {
        assert!(s.text.contains(want), "no {want:?} in:\n{}", s.text);
    }
    assert!(err.contains("guest powered off"), "{err}");
    // The kernel's rdtsc sites were found and patched, and some were hit.
    let line = err.lines().find(|l| l.contains("rdtsc/rdtscp:")).expect("trap summary");
    let sites: u64 = line.split("rdtsc/rdtscp: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(sites > 0, "{line}");
}

#[test]
fn linux_record_and_replay_verify_twice_with_different_recordings() {
    for n in 1..=2 {
        let rec = sec(&format!("linux-record-{n}"));
        let rep = sec(&format!("linux-replay-{n}"));
        assert_eq!(rec.rc, 0, "record {n}: {}", sec(&format!("linux-record-{n}.stderr")).text);
        let rep_err = &sec(&format!("linux-replay-{n}.stderr")).text;
        assert_eq!(rep.rc, 0, "replay {n}: {rep_err}");
        assert!(rep_err.contains("replay verified"), "{rep_err}");
        assert!(rec.text.contains("FTVM-WORKLOAD-END"), "{}", rec.text);
        assert_eq!(rec.text, rep.text, "replay {n} printed something else than its recording");
    }
    // Uptimes and interrupt counts come from the clock: two recordings differ.
    assert_ne!(sec("linux-record-1").text, sec("linux-record-2").text);
    let stats = &sec("linux-stats").text;
    assert!(stats.contains("complete: yes"), "{stats}");
}

#[test]
fn typed_console_input_replays_identically() {
    let rec = sec("linux-input-record");
    let rep = sec("linux-input-replay");
    assert_eq!(rec.rc, 0, "{}", sec("linux-input-record.stderr").text);
    assert!(rec.text.contains("typed-42"), "the typed command did not run:\n{}", rec.text);
    assert_eq!(rep.rc, 0, "{}", sec("linux-input-replay.stderr").text);
    assert_eq!(rec.text, rep.text);
}

#[test]
fn the_test_guest_runs_on_standard_kvm_too() {
    let rec = sec("guest-record");
    let rep = sec("guest-replay");
    assert_eq!(rec.rc, 0, "{}", sec("guest-record.stderr").text);
    assert!(rec.text.contains("[done] ticks=100"), "{}", rec.text);
    assert_eq!(rep.rc, 0, "{}", sec("guest-replay.stderr").text);
    assert_eq!(rec.text, rep.text);
}

#[test]
fn linux_fails_over_from_a_killed_primary_with_nothing_lost_or_repeated() {
    let c = sec("ft-console");
    let err = &sec("ft-console.stderr").text;
    assert_eq!(c.rc, 0, "{}\n{err}", c.text);
    assert!(err.contains("live at exit"), "the backup never went live:\n{err}");
    // Each of the workload's lines exactly once, in order.
    let want = [
        "FTVM-LINUX-UP",
        "FTVM-WORKLOAD-BEGIN",
        "pipe top3: 2000 1999 1998",
        "pipe sum: 2001000",
        "ramfs: copy identical",
        "ramfs: 328929 bytes in 4 files",
        "FTVM-WORKLOAD-END",
        "FTVM-LINUX-POWEROFF",
    ];
    let mut at = 0;
    for w in want {
        assert_eq!(c.text.matches(w).count(), 1, "{w:?} not exactly once:\n{}", c.text);
        let pos = c.text.find(w).unwrap();
        assert!(pos >= at, "{w:?} out of order:\n{}", c.text);
        at = pos;
    }
}

/// The reported freeze: a process computing without I/O starved the timer.
/// With resyncs the shell still answers, the recording replays verified,
/// and its log holds resync state.
#[test]
fn linux_stays_responsive_with_a_cpu_bound_process_and_replays() {
    let r = sec("linux-spin-record");
    assert_eq!(r.rc, 0, "record:\n{}\n{}", r.text, sec("linux-spin-record.stderr").text);
    assert!(r.text.contains("spin-42"), "the command typed after the spinner started was never answered:\n{}", r.text);
    let e = &sec("linux-spin-record.stderr").text;
    let resyncs: u64 = e
        .split(" resync)")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(resyncs > 0, "no resyncs in the summary:\n{e}");
    let p = sec("linux-spin-replay");
    assert_eq!(p.rc, 0, "replay:\n{}", sec("linux-spin-replay.stderr").text);
    assert!(sec("linux-spin-replay.stderr").text.contains("replay verified"));
    assert_eq!(p.text, r.text, "replayed console differs");
    assert!(sec("linux-spin-stats").text.contains("vcpu-state"), "{}", sec("linux-spin-stats").text);
}

/// Failover while a process computes without I/O: the backup applies the
/// primary's resyncs, goes live in the middle of the spin, and answers the
/// next command typed at the console (resent to it) exactly once.
#[test]
fn linux_fails_over_while_a_process_spins() {
    let s = sec("fs-console");
    let e = &sec("fs-console.stderr").text;
    assert_eq!(s.rc, 0, "console:\n{}\n{e}", s.text);
    assert_eq!(s.text.matches("before-42").count(), 1, "{}", s.text);
    assert_eq!(s.text.matches("after-42").count(), 1, "the new primary did not answer:\n{}\n{e}", s.text);
    assert!(e.contains("live at exit"), "{e}");
}
