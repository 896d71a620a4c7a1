//! Helpers shared by the tests that run the `ftvm` binary on guests
//! (e2e.rs, snapshot.rs): run it, make a scratch directory, check an exit,
//! record with input typed while the guest runs.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ftvm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn check(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
}

pub fn record(log: &Path, cmdline: &str, input: &[&[u8]]) -> Output {
    let mut child = ftvm()
        .args(["record", "--log"])
        .arg(log)
        .args(["--cmdline", cmdline])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let chunks: Vec<Vec<u8>> = input.iter().map(|c| c.to_vec()).collect();
    let feeder = std::thread::spawn(move || {
        for c in chunks {
            std::thread::sleep(Duration::from_millis(150));
            let _ = stdin.write_all(&c);
            let _ = stdin.flush();
        }
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

