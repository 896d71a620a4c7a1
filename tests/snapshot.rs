//! Snapshots end to end, on the real `/dev/kvm`: a replay takes a snapshot
//! at an exit, a fresh `ftvm` restores it and replays the rest of the log,
//! verified, and its console output is exactly the original's from there.
//! Runs with typed input (bytes waiting in the UART at the snapshot) and a
//! guest computing at CPL3 (resyncs: snapshots at a resync and right after).

use std::path::Path;
use std::process::{Output, Stdio};

#[path = "common/guest_cli.rs"]
mod guest_cli;
use guest_cli::*;

fn replay(log: &Path, extra: &[&str]) -> Output {
    ftvm().args(["replay", "--log"]).arg(log).args(extra).stdin(Stdio::null()).output().unwrap()
}

/// `log dump`'s lines as (ordinal, the rest).
fn dump(log: &Path) -> Vec<(u64, String)> {
    let o = ftvm().args(["log", "dump"]).arg(log).output().unwrap();
    check(&o, "log dump");
    text(&o.stdout)
        .lines()
        .filter_map(|l| {
            let at = l.split(' ').find(|w| w.starts_with('@'))?;
            Some((at[1..].parse().ok()?, l.to_string()))
        })
        .collect()
}

/// Reads `n` from the first "WORD n" after `key` in `s`.
fn number_after(s: &str, key: &str) -> Option<usize> {
    let i = s.find(key)? + key.len();
    s[i..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Takes a snapshot of `log`'s replay at exit `n`, resumes from it in a
/// fresh ftvm and checks the rest against the whole replay's output.
fn snapshot_and_resume(dir: &Path, log: &Path, n: u64, full: &[u8]) {
    let snap = dir.join(format!("at-{n}.snap"));
    let a = replay(log, &["--snapshot-at", &n.to_string(), "--snapshot-out", snap.to_str().unwrap()]);
    check(&a, &format!("replay with a snapshot at #{n}"));
    let err = text(&a.stderr);
    assert!(err.contains(&format!("snapshot at exit #{n} (")) && err.contains("replay verified"), "{err}");
    assert_eq!(a.stdout, full, "taking a snapshot changed the replay");
    let before = number_after(&err, "), after").expect("console bytes before the snapshot");

    let b = replay(log, &["--from", snap.to_str().unwrap()]);
    check(&b, &format!("replay from the snapshot at #{n}"));
    let err = text(&b.stderr);
    assert!(err.contains(&format!("resuming from {} at exit #{n}", snap.display())), "{err}");
    assert!(err.lines().last().unwrap_or("").starts_with("replay verified"), "{err}");
    assert!(before <= full.len(), "{before} > {}", full.len());
    assert_eq!(text(&b.stdout), text(&full[before..]), "output after #{n} differs ({before} bytes before it)");
}

#[test]
fn a_snapshot_resumes_a_replay_with_typed_input() {
    let dir = tmpdir("typed");
    let log = dir.join("t.ftlog");
    let rec = record(&log, "seconds=2 hz=100", &[b"hello snapshot\n", b"second line\n"]);
    check(&rec, "record");
    assert!(text(&rec.stdout).contains("[echo] \"hello snapshot\""), "{}", text(&rec.stdout));
    let full = replay(&log, &[]);
    check(&full, "replay");
    assert_eq!(full.stdout, rec.stdout);
    let lines = dump(&log);
    let last = lines.last().unwrap().0;
    let typed = lines.iter().find(|l| l.1.contains("serial-in")).expect("typed input in the log").0;
    let injected_at_hlt = lines.iter().find(|l| l.0 > 100 && l.1.contains(" hlt interrupt")).expect("an interrupt at a hlt").0;
    for n in [3, typed, injected_at_hlt, last / 2, last - 5] {
        snapshot_and_resume(&dir, &log, n, &full.stdout);
    }
}

#[test]
fn a_snapshot_resumes_a_replay_with_resyncs() {
    let dir = tmpdir("spin3");
    let log = dir.join("s.ftlog");
    let rec = record(&log, "spin3=40 seconds=1", &[]);
    check(&rec, "record");
    let full = replay(&log, &[]);
    check(&full, "replay");
    assert_eq!(full.stdout, rec.stdout);
    let lines = dump(&log);
    let resyncs: Vec<u64> = lines.iter().filter(|l| l.1.contains(" resync ")).map(|l| l.0).collect();
    assert!(resyncs.len() >= 10, "{} resyncs", resyncs.len());
    let r = resyncs[resyncs.len() / 2];
    // At a resync, right after one, and past the spinning.
    for n in [r, r + 1, resyncs.last().unwrap() + 20] {
        snapshot_and_resume(&dir, &log, n, &full.stdout);
    }
}

#[test]
fn a_snapshot_that_does_not_fit_is_refused_before_the_guest_runs() {
    let dir = tmpdir("refused");
    let log = dir.join("a.ftlog");
    check(&record(&log, "seconds=1 hz=100", &[]), "record");
    let snap = dir.join("a.snap");
    check(&replay(&log, &["--snapshot-at", "300", "--snapshot-out", snap.to_str().unwrap()]), "snapshot");
    let other = dir.join("b.ftlog");
    check(&record(&other, "seconds=1 hz=50", &[]), "record another guest");
    let o = replay(&other, &["--from", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("a.snap does not fit this guest") && err.contains("\"seconds=1 hz=100\""), "{err}");
    assert!(o.stdout.is_empty(), "the guest ran anyway");

    // Damage is named with its place, never replayed.
    let mut bytes = std::fs::read(&snap).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&snap, &bytes).unwrap();
    let o = replay(&log, &["--from", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("corrupt snapshot") && err.contains("byte offset"), "{err}");
    assert!(o.stdout.is_empty());
    std::fs::write(&snap, &bytes[..bytes.len() / 3]).unwrap();
    let err = text(&replay(&log, &["--from", snap.to_str().unwrap()]).stderr);
    assert!(err.contains("is cut short"), "{err}");

    // A snapshot past the end of the run is never written, and says so.
    let o = replay(&log, &["--snapshot-at", "99999999", "--snapshot-out", dir.join("never.snap").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("no snapshot written"), "{}", text(&o.stderr));
    assert!(!dir.join("never.snap").exists());
}
