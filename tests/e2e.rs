//! End-to-end tests: the real `ftvm` binary running guests on the real
//! `/dev/kvm`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

#[path = "common/guest_cli.rs"]
mod guest_cli;
use guest_cli::*;

fn replay(log: &Path) -> Output {
    ftvm().args(["replay", "--log"]).arg(log).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn test_guest_boots_and_exits_zero() {
    let o = ftvm()
        .args(["run", "--no-stdin", "--cmdline", "seconds=1 lines=10"])
        .output()
        .unwrap();
    check(&o, "ftvm run");
    let out = text(&o.stdout);
    assert!(out.starts_with("ftvm test guest: hz=100 lines=10 seconds=1"), "{out}");
    assert!(out.contains("[boot] rtc 20"), "{out}");
    // One line per 100 ms of guest time, numbered from 1, then the summary.
    for n in 1..=9 {
        assert!(out.contains(&format!("[{n:04}] ticks={}", n * 10)), "line {n} missing:\n{out}");
    }
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("[done] ticks=100 lines=10 rx=0 sum="), "{out}");
    assert!(text(&o.stderr).contains("guest exited with status 0"), "{}", text(&o.stderr));
}

#[test]
fn record_then_replay_is_identical_and_recordings_differ() {
    let dir = tmpdir("rr");
    let mut outputs = Vec::new();
    for i in 0..3 {
        let log = dir.join(format!("run{i}.ftlog"));
        let rec = record(&log, "seconds=1", &[]);
        check(&rec, "record");
        let rep = replay(&log);
        check(&rep, "replay");
        assert_eq!(text(&rec.stdout), text(&rep.stdout), "replay {i} differs from its recording");
        assert!(text(&rep.stderr).contains("replay verified"), "{}", text(&rep.stderr));
        outputs.push(text(&rec.stdout));
    }
    // The timer values the guest prints come from the host clock, so
    // recordings differ from each other while each replay matches its own.
    assert!(
        outputs[0] != outputs[1] || outputs[1] != outputs[2],
        "three recordings printed identical output: time is not reaching the guest"
    );
}

#[test]
fn typed_input_is_echoed_and_replayed() {
    let dir = tmpdir("input");
    let log = dir.join("in.ftlog");
    let rec = record(&log, "seconds=2", &[b"hello ftvm\n", b"second line\n", b"tail"]);
    check(&rec, "record");
    let out = text(&rec.stdout);
    assert!(out.contains("[echo] \"hello ftvm\""), "{out}");
    assert!(out.contains("[echo] \"second line\""), "{out}");
    assert!(out.contains("[echo] \"tail\""), "{out}");
    assert!(out.contains("rx=27 "), "{out}");
    let rep = replay(&log);
    check(&rep, "replay");
    assert_eq!(out, text(&rep.stdout));
    let dump = ftvm().args(["log", "dump"]).arg(&log).output().unwrap();
    check(&dump, "log dump");
    assert!(text(&dump.stdout).contains("serial-in"), "{}", text(&dump.stdout));
}

#[test]
fn corrupt_log_is_refused_with_offset_and_record() {
    let dir = tmpdir("corrupt");
    let log = dir.join("c.ftlog");
    check(&record(&log, "seconds=1", &[]), "record");
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&log, &bytes).unwrap();
    let rep = replay(&log);
    assert!(!rep.status.success());
    let err = text(&rep.stderr);
    assert!(err.contains("corrupt record #") && err.contains("byte offset"), "{err}");
    assert!(!err.contains("replay verified"), "{err}");
}

#[test]
fn truncated_log_replays_to_the_cut() {
    let dir = tmpdir("trunc");
    let log = dir.join("t.ftlog");
    let rec = record(&log, "seconds=1", &[]);
    check(&rec, "record");
    let bytes = std::fs::read(&log).unwrap();
    std::fs::write(&log, &bytes[..bytes.len() * 6 / 10 + 3]).unwrap();
    let rep = replay(&log);
    assert_eq!(rep.status.code(), Some(3), "{}", text(&rep.stderr));
    let err = text(&rep.stderr);
    assert!(err.contains("replay incomplete") && err.contains("truncated"), "{err}");
    let full = text(&rec.stdout);
    let part = text(&rep.stdout);
    assert!(part.len() > 100 && part.len() < full.len(), "replayed {} of {} bytes", part.len(), full.len());
    assert!(full.starts_with(&part), "replayed output is not a prefix of the recording");
}

#[test]
fn log_for_another_kernel_is_refused_before_boot() {
    let dir = tmpdir("kernel");
    let log = dir.join("k.ftlog");
    check(&record(&log, "seconds=1", &[]), "record");
    let other = dir.join("other.elf");
    let mut elf = ftvm_guest_bytes();
    elf.push(0);
    std::fs::write(&other, &elf).unwrap();
    let rep = ftvm().args(["replay", "--log"]).arg(&log).arg("--kernel").arg(&other).output().unwrap();
    assert!(!rep.status.success());
    let err = text(&rep.stderr);
    assert!(err.contains("was recorded with kernel"), "{err}");
    assert!(rep.stdout.is_empty(), "the guest ran anyway");
}

fn ftvm_guest_bytes() -> Vec<u8> {
    ftvm_guest::TEST_GUEST_ELF.to_vec()
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tmpdir("bad");
    let notlog = dir.join("notes.txt");
    std::fs::write(&notlog, "just some text, long enough to hold a header and more").unwrap();
    let o = ftvm().args(["replay", "--log"]).arg(&notlog).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("not an ftvm log"), "{}", text(&o.stderr));

    let o = ftvm().args(["run", "--no-stdin", "--kernel"]).arg(&notlog).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("is not a guest kernel"), "{}", text(&o.stderr));

    let o = ftvm().args(["run", "--no-stdin", "--kernel", "/nonexistent/vmlinux"]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("cannot read kernel /nonexistent/vmlinux"), "{}", text(&o.stderr));

    let o = ftvm().args(["replay", "--log", "/nonexistent/x.ftlog"]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("/nonexistent/x.ftlog"), "{}", text(&o.stderr));
}

#[test]
fn interrupted_recording_still_replays() {
    let dir = tmpdir("sigint");
    let log = dir.join("i.ftlog");
    let child = ftvm()
        .args(["record", "--no-stdin", "--cmdline", "seconds=0", "--log"])
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    nix_kill(child.id(), libc_sigint());
    let rec = child.wait_with_output().unwrap();
    assert_eq!(rec.status.code(), Some(130), "{}", text(&rec.stderr));
    assert!(text(&rec.stdout).contains("[0002]"), "{}", text(&rec.stdout));
    let rep = replay(&log);
    check(&rep, "replay of an interrupted recording");
    assert_eq!(text(&rec.stdout), text(&rep.stdout));
    let stats = ftvm().args(["log", "stats"]).arg(&log).output().unwrap();
    check(&stats, "log stats");
    let s = text(&stats.stdout);
    assert!(s.contains("interrupt") && s.contains("bytes/s"), "{s}");
}

fn libc_sigint() -> i32 {
    2
}

fn nix_kill(pid: u32, sig: i32) {
    let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(st.success());
}

#[test]
fn linux_argument_errors_are_clear() {
    let dir = tmpdir("linuxargs");
    // A missing initrd is refused before anything runs.
    let o = ftvm()
        .args(["run", "--no-stdin", "--initrd", "/nonexistent/initrd.gz"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("cannot read initrd /nonexistent/initrd.gz"), "{}", text(&o.stderr));
    // A broken bzImage is named as such, with what is wrong with it.
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let f = dir.join("bzImage");
    std::fs::write(&f, &bz).unwrap();
    let o = ftvm().args(["run", "--no-stdin", "--kernel"]).arg(&f).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("cannot extract the kernel from this bzImage"), "{}", text(&o.stderr));
    // Replaying a log with the wrong initrd situation is refused.
    let log = dir.join("g.ftlog");
    check(&record(&log, "seconds=1", &[]), "record");
    let o = ftvm().args(["replay", "--log"]).arg(&log).args(["--initrd", "/etc/hostname"]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("recorded without an initrd"), "{}", text(&o.stderr));
}

/// Reads `n` from the first `key=n` in `s`.
fn field(s: &str, key: &str) -> Option<u64> {
    let i = s.find(key)? + key.len();
    s[i..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The reported freeze: a guest that computes without any VM exit, at CPL0
/// (emulated on this KVM) and at CPL3 (native), writing memory hard. Its
/// timer must keep ticking (the spin ends only after N ticks), the
/// recording must replay byte for byte, and it must have needed resyncs.
#[test]
fn a_guest_computing_without_exits_keeps_its_timer_and_replays() {
    let dir = tmpdir("spin");
    for (what, cmdline) in [("cpl0", "spin=20 seconds=1 hz=100 lines=2"), ("cpl3", "spin3=30 spinkb=1024 seconds=1 hz=200 lines=2")] {
        let log = dir.join(format!("{what}.ftlog"));
        let r = record_within(&log, cmdline, Duration::from_secs(60));
        check(&r, &format!("record {what}"));
        let out = text(&r.stdout);
        let line = out.lines().find(|l| l.starts_with("[spin] cpl=") && l.contains("ticks=")).unwrap_or_else(|| panic!("{what}: no spin result:\n{out}"));
        let want = if what == "cpl0" { 20 } else { 30 };
        assert!(field(line, "ticks=").unwrap() >= want, "{line}");
        let err = text(&r.stderr);
        let resyncs = field(&err, "msr, ").unwrap_or(0);
        assert!(resyncs >= want / 2, "{what}: {resyncs} resyncs for {want} ticks of spinning:\n{err}");
        assert!(err.contains("resync pages"), "{err}");
        let p = replay(&log);
        check(&p, &format!("replay {what}"));
        assert_eq!(text(&p.stdout), out, "{what}: replayed console differs");
        assert!(text(&p.stderr).contains("replay verified"));
        let stats = ftvm().args(["log", "stats"]).arg(&log).output().unwrap();
        let st = text(&stats.stdout);
        assert!(st.contains("vcpu-state") && st.contains("pages"), "{st}");

        // A flipped byte inside a resync's pages is a clear error naming
        // the record and its offset, never a crash or a "verified".
        let mut bytes = std::fs::read(&log).unwrap();
        let dump = text(&ftvm().args(["log", "dump"]).arg(&log).output().unwrap().stdout);
        let n: usize = dump.lines().find(|l| l.contains(" pages count=")).and_then(|l| l[1..].split(' ').next()?.parse().ok()).expect("a pages record");
        let off = record_offset(&bytes, n) + 40;
        bytes[off] ^= 0x5a;
        let bad = dir.join(format!("{what}-bad.ftlog"));
        std::fs::write(&bad, &bytes).unwrap();
        let p = replay(&bad);
        assert_eq!(p.status.code(), Some(1), "{}", text(&p.stderr));
        let e = text(&p.stderr);
        assert!(e.contains(&format!("record #{n}")) && e.contains("corrupt"), "{e}");
    }
}

/// Records without input, failing (not hanging) if the guest does not end
/// within `limit`: without resyncs a spinning guest never would.
fn record_within(log: &Path, cmdline: &str, limit: Duration) -> Output {
    let child = ftvm()
        .args(["record", "--no-stdin", "--log"])
        .arg(log)
        .args(["--cmdline", cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            nix_kill(pid, 9);
            panic!("`ftvm record --cmdline '{cmdline}'` did not end within {limit:?}: the spinning guest got no timer interrupt");
        }
    }
}

/// Byte offset of record `n` (records counted from 0 after the header).
fn record_offset(log: &[u8], n: usize) -> usize {
    // Header: magic (8), version (2), payload length (4), payload, crc (4).
    let hlen = u32::from_le_bytes(log[10..14].try_into().unwrap()) as usize;
    let mut off = 14 + hlen + 4;
    for _ in 0..n {
        let word = u32::from_le_bytes(log[off..off + 4].try_into().unwrap());
        off += 4 + (word & 0x00ff_ffff) as usize + 4;
    }
    off
}
