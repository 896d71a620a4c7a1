//! gdb on a recording, end to end: `ftvm replay --gdb` on the real
//! `/dev/kvm`, driven by the real gdb in batch mode (`gdb -batch -nx -ex
//! ...`), with the test guest's symbols from `ftvm guest-elf`. Breakpoints
//! on the timer handler, reverse-continue, stepi and reverse-stepi,
//! `monitor goto` against `ftvm log dump`, identical transcripts of two
//! sessions, and bad input (an unmapped or a fifth breakpoint, a goto past
//! the log, writes that diverge, gdb going away).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/guest_cli.rs"]
mod guest_cli;
use guest_cli::*;

/// About 680 exits, 100 timer ticks: checkpoints every 100 exits are
/// exercised, and the whole session stays short.
const CMDLINE: &str = "seconds=1 hz=100 lines=5";

struct Setup {
    log: PathBuf,
    elf: PathBuf,
}

fn setup(name: &str) -> Setup {
    setup_with(name, CMDLINE)
}

fn setup_with(name: &str, cmdline: &str) -> Setup {
    assert!(
        Command::new("gdb").arg("--version").output().is_ok_and(|o| o.status.success()),
        "these tests need gdb (Debian package `gdb`; scripts/setup.sh installs it)"
    );
    let dir = tmpdir(name);
    let log = dir.join("run.ftlog");
    let o = ftvm().args(["record", "--no-stdin", "--log"]).arg(&log).args(["--cmdline", cmdline]).stdin(Stdio::null()).output().unwrap();
    check(&o, "record");
    let elf = dir.join("guest.elf");
    check(&ftvm().args(["guest-elf", "--out"]).arg(&elf).output().unwrap(), "guest-elf");
    Setup { log, elf }
}

/// Waits for `child` at most `secs`, then kills it (a hung session fails
/// the test instead of hanging it).
fn wait_for(mut child: Child, secs: u64, what: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("{what} did not finish in {secs} s\nstdout:\n{}\nstderr:\n{}", text(&o.stdout), text(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A replay waiting for gdb, and the address it listens on.
struct Replay {
    child: Child,
    addr: String,
    stderr: std::thread::JoinHandle<String>,
}

fn start_replay(s: &Setup) -> Replay {
    start_replay_env(s, &[])
}

fn start_replay_env(s: &Setup, env: &[(&str, &str)]) -> Replay {
    let mut child = ftvm()
        .envs(env.iter().copied())
        .args(["replay", "--log"])
        .arg(&s.log)
        .args(["--gdb", "127.0.0.1:0", "--checkpoint-every", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    let addr = first
        .split("waiting for gdb on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    let stderr = std::thread::spawn(move || {
        let mut rest = first;
        let _ = err.read_to_string(&mut rest);
        rest
    });
    Replay { child, addr, stderr }
}

struct Session {
    /// gdb's output (stdout and stderr), as a user sees it.
    gdb: String,
    ftvm_err: String,
    ftvm_out: String,
    code: Option<i32>,
}

/// One gdb session over the log with these commands, then the replay's end.
fn debug(s: &Setup, commands: &[&str]) -> Session {
    debug_env(s, &[], commands)
}

fn debug_env(s: &Setup, env: &[(&str, &str)], commands: &[&str]) -> Session {
    let r = start_replay_env(s, env);
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off", "-ex", "set width 0"]);
    cmd.args(["-ex", &format!("target remote {}", r.addr)]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    cmd.arg(&s.elf).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let g = wait_for(cmd.spawn().unwrap(), 120, "gdb");
    let f = wait_for(r.child, 120, "ftvm replay --gdb");
    let gdb = format!("{}{}", text(&g.stdout), text(&g.stderr));
    Session { gdb, ftvm_err: r.stderr.join().unwrap(), ftvm_out: text(&f.stdout), code: f.status.code() }
}

impl Session {
    /// Values of `x/gd &ticks`, in order.
    fn ticks(&self) -> Vec<u64> {
        self.gdb.lines().filter(|l| l.contains("<ticks>:")).map(|l| l.rsplit('\t').next().unwrap().trim().parse().unwrap()).collect()
    }

    /// The blocks `info registers` printed (rip .. gs), in order.
    fn registers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur: Option<String> = None;
        for l in self.gdb.lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if name == "rax" {
                cur = Some(String::new());
            }
            if let Some(c) = &mut cur {
                c.push_str(l);
                c.push('\n');
                if name == "gs" {
                    out.push(cur.take().unwrap());
                }
            }
        }
        out
    }

    fn context(&self) -> String {
        format!("gdb:\n{}\nftvm stderr:\n{}", self.gdb, self.ftvm_err)
    }

    /// The replay ended cleanly with its verdict: verified.
    fn verified(&self) {
        assert_eq!(self.code, Some(0), "{}", self.context());
        assert!(self.ftvm_err.contains("replay verified"), "{}", self.context());
    }
}

/// `log dump`'s records as (ordinal, rip, line).
fn dump(log: &Path) -> Vec<(u64, u64, String)> {
    let o = ftvm().args(["log", "dump"]).arg(log).output().unwrap();
    check(&o, "log dump");
    text(&o.stdout)
        .lines()
        .filter_map(|l| {
            let at = l.split(' ').find(|w| w.starts_with('@'))?;
            let rip = l.split(' ').find_map(|w| w.strip_prefix("rip=0x"))?;
            Some((at[1..].parse().ok()?, u64::from_str_radix(rip, 16).ok()?, l.to_string()))
        })
        .collect()
}

#[test]
fn breakpoint_on_the_timer_handler_continue_and_reverse_continue() {
    let s = setup("gdb-break");
    let d = debug(
        &s,
        &[
            "break pit_irq",
            "continue",
            "x/gd &ticks",
            "continue",
            "x/gd &ticks",
            "continue",
            "x/gd &ticks",
            "reverse-continue",
            "x/gd &ticks",
            "p/x $pc",
            "monitor when",
            // To the end of the log, then back across all of it (every
            // checkpoint) to the one call of pit_init at boot.
            "delete",
            "break pit_init",
            "continue",
            "reverse-continue",
            "monitor when",
            "detach",
        ],
    );
    let t = d.ticks();
    assert_eq!(t.len(), 4, "{}", d.context());
    assert!(d.gdb.contains("No more reverse-execution history"), "continue ran to the end: {}", d.context());
    assert!(d.gdb.contains("Breakpoint 2, 0x") && d.gdb.contains("in pit_init ()"), "{}", d.context());
    assert!(t[0] < t[1] && t[1] < t[2], "the tick counter grows at each hit: {t:?}\n{}", d.context());
    assert_eq!(t[3], t[1], "reverse-continue stops at the previous hit: {t:?}\n{}", d.context());
    assert_eq!(d.gdb.matches("Breakpoint 1, ").count(), 4, "{}", d.context());
    assert!(d.gdb.contains("pit_irq"), "{}", d.context());
    assert!(d.gdb.contains("at exit #") && d.gdb.contains("guest time: "), "monitor when: {}", d.context());
    d.verified();
    // The console output is the recording's, once, although the replay
    // was rewound.
    let plain = ftvm().args(["replay", "--log"]).arg(&s.log).output().unwrap();
    check(&plain, "plain replay");
    assert_eq!(d.ftvm_out, text(&plain.stdout));
}

/// Breakpoints as patched `hlt` instructions (the lab's mechanism, where
/// the debug registers do not work), forced here: the same stops as with
/// the debug registers, gdb never sees the patch, and the replay stays
/// verified (its memory digests never see it either).
#[test]
fn patched_hlt_breakpoints_stop_like_debug_registers() {
    let s = setup("gdb-patched");
    let commands = [
        "break pit_irq",
        "continue",
        "x/gd &ticks",
        "x/2xb pit_irq",
        "continue",
        "x/gd &ticks",
        "continue",
        "x/gd &ticks",
        "reverse-continue",
        "x/gd &ticks",
        "p/x $pc",
        "stepi",
        "reverse-stepi",
        "p/x $pc",
        "monitor when",
        "detach",
    ];
    let d = debug_env(&s, &[("FTVM_GDB_PATCHED_BREAKPOINTS", "1")], &commands);
    let hw = debug(&s, &commands);
    assert!(d.ftvm_err.contains("patched hlt"), "{}", d.context());
    let t = d.ticks();
    assert_eq!(t.len(), 4, "{}", d.context());
    assert!(t[0] < t[1] && t[1] < t[2], "{t:?}\n{}", d.context());
    assert_eq!(t[3], t[1], "{t:?}\n{}", d.context());
    // Four stops at the breakpoint, and reverse-stepi back onto it.
    assert_eq!(d.gdb.matches("Breakpoint 1, ").count(), 5, "{}", d.context());
    // gdb reads the instruction, never the patch.
    let b = d.gdb.lines().find(|l| l.contains("<pit_irq>:")).unwrap_or_else(|| panic!("{}", d.context()));
    assert!(!b.contains("0xf4"), "{b}\n{}", d.context());
    // The same transcript as with the debug registers, but for how
    // `monitor when` names the moment: a seek to a hit runs to the patched
    // breakpoint (arrival n at it) rather than stepping the interval
    // (instructions since the exit).
    let same = |g: &str| g.lines().filter(|l| !l.starts_with("at exit #")).collect::<Vec<_>>().join("\n");
    assert_eq!(same(&d.gdb), same(&hw.gdb), "patched vs debug registers");
    d.verified();
    hw.verified();
}

#[test]
fn stepi_then_reverse_stepi_returns_to_the_same_registers() {
    let s = setup("gdb-step");
    // An `out` exit well after the first checkpoint: reverse-stepi from the
    // end of an exit goes back into the interval before it.
    let rec = dump(&s.log);
    let (n, _, _) = rec.iter().find(|(n, _, l)| *n > 250 && l.contains("io-out")).expect("an io-out record").clone();
    let goto = format!("monitor goto {n}");
    let d = debug(
        &s,
        &[
            "break pit_irq",
            "continue",
            "continue",
            "info registers",
            "stepi",
            "stepi",
            "stepi",
            "reverse-stepi",
            "reverse-stepi",
            "reverse-stepi",
            "info registers",
            "delete",
            &goto,
            "maintenance flush register-cache",
            "info registers",
            "stepi",
            "reverse-stepi",
            "maintenance flush register-cache",
            "info registers",
            "reverse-stepi",
            "stepi",
            "info registers",
            "detach",
        ],
    );
    let regs = d.registers();
    assert_eq!(regs.len(), 5, "{}", d.context());
    assert_eq!(regs[0], regs[1], "three steps back from three steps forward\n{}", d.context());
    assert_eq!(regs[2], regs[3], "a step back after a step at the end of exit #{n}\n{}", d.context());
    assert_eq!(regs[2], regs[4], "a step forward after a step back across exit #{n}\n{}", d.context());
    assert!(!d.gdb.contains("cannot") && !d.gdb.contains("could not"), "{}", d.context());
    d.verified();
}

#[test]
fn monitor_goto_shows_the_rip_that_log_dump_printed() {
    let s = setup("gdb-goto");
    let rec = dump(&s.log);
    // `out` exits: their RIP is the same before and after the exit is
    // completed, so gdb's $pc is the dump's RIP. One before the first
    // checkpoint, two after (going back, then forward).
    let outs: Vec<&(u64, u64, String)> = rec.iter().filter(|(_, _, l)| l.contains("io-out")).collect();
    let picks = [outs[outs.len() * 3 / 4], outs[1], outs[outs.len() / 2]];
    let mut cmds = Vec::new();
    for (n, _, _) in &picks {
        cmds.push(format!("monitor goto {n}"));
        cmds.push("maintenance flush register-cache".into());
        cmds.push("p/x $pc".into());
        cmds.push("monitor when".into());
    }
    cmds.push("detach".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let d = debug(&s, &cmds);
    let pcs: Vec<u64> = d
        .gdb
        .lines()
        .filter_map(|l| l.strip_prefix('$').and_then(|r| r.split("= 0x").nth(1)))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .collect();
    assert_eq!(pcs, picks.iter().map(|p| p.1).collect::<Vec<_>>(), "{}", d.context());
    for (n, rip, _) in &picks {
        assert!(d.gdb.contains(&format!("at exit #{n}\n")), "{}", d.context());
        assert!(d.gdb.contains(&format!("exit: @{n} rip={rip:#x} io-out")), "{}", d.context());
    }
    d.verified();
}

#[test]
fn a_breakpoint_added_between_two_exits_is_counted_from_the_exit() {
    let s = setup("gdb-mid");
    // pic_eoi runs after pit_irq in the same interval (the timer's
    // handler acknowledges the interrupt): added while stopped in pit_irq,
    // it must be found forwards and backwards at the same place.
    let d = debug(
        &s,
        &[
            "break pit_irq",
            "continue",
            "continue",
            "break pic_eoi",
            "continue",
            "monitor when",
            "continue",
            "reverse-continue",
            "monitor when",
            "reverse-continue",
            "detach",
        ],
    );
    let hits: Vec<&str> = d
        .gdb
        .lines()
        .filter(|l| l.starts_with("Breakpoint ") && l.contains(" in "))
        .map(|l| l.split(" in ").nth(1).unwrap().trim_end_matches(" ()"))
        .collect();
    assert_eq!(hits, ["pit_irq", "pit_irq", "pic_eoi", "pit_irq", "pic_eoi", "pit_irq"], "{}", d.context());
    let whens: Vec<&str> = d.gdb.lines().filter(|l| l.starts_with("at exit #")).collect();
    assert_eq!(whens.len(), 2, "{}", d.context());
    let exit_of = |w: &str| w.split(',').next().unwrap().to_string();
    assert_eq!(exit_of(whens[0]), exit_of(whens[1]), "the same pic_eoi call, forwards and backwards: {}", d.context());
    d.verified();
}

#[test]
fn two_sessions_of_one_log_give_identical_transcripts() {
    let s = setup("gdb-twice");
    let cmds = [
        "break pit_irq",
        "continue",
        "continue",
        "x/4gx $rsp",
        "stepi",
        "info registers",
        "continue",
        "x/gd &ticks",
        "reverse-continue",
        "reverse-stepi",
        "info registers",
        "monitor when",
        "x/gd &ticks",
        "detach",
    ];
    let a = debug(&s, &cmds);
    let b = debug(&s, &cmds);
    // gdb names the port it connected to; nothing else may differ.
    let clean = |t: &str| t.lines().filter(|l| !l.contains("127.0.0.1")).collect::<Vec<_>>().join("\n");
    assert_eq!(clean(&a.gdb), clean(&b.gdb));
    assert_eq!(a.ftvm_out, b.ftvm_out);
    assert!(a.gdb.matches("Breakpoint 1, ").count() >= 3, "{}", a.context());
    a.verified();
    b.verified();
}

#[test]
fn bad_breakpoints_and_gotos_are_refused_clearly() {
    let s = setup("gdb-bad");
    let d = debug(
        &s,
        &[
            "break *0xdead00000000",
            "continue",
            "delete",
            "break pit_irq",
            "break pit_read",
            "break pit_init",
            "break kmain",
            "break idt_init",
            "continue",
            "delete",
            "monitor goto 1000000000",
            "monitor goto",
            "monitor frobnicate",
            "monitor when",
            "detach",
        ],
    );
    assert!(d.gdb.contains("Cannot insert breakpoint 1"), "{}", d.context());
    assert!(d.ftvm_err.contains("breakpoint at 0xdead00000000 refused: the address is not mapped"), "{}", d.context());
    // gdb inserts them in address order: pit_read (0x102700, #3) is the
    // fifth; gdb says it cannot insert it, ftvm says why.
    assert_eq!(d.gdb.matches("Cannot insert breakpoint").count(), 2, "the fifth breakpoint: {}", d.context());
    assert!(d.ftvm_err.contains("refused: all 4 debug registers are in use"), "{}", d.context());
    assert!(d.gdb.contains("cannot go to exit #1000000000: the log ends at exit #"), "{}", d.context());
    assert!(d.gdb.contains("usage: monitor goto N"), "{}", d.context());
    assert!(d.gdb.contains("unknown monitor command 'frobnicate'"), "{}", d.context());
    assert!(d.gdb.contains("at exit #0"), "nothing moved: {}", d.context());
    d.verified();
}

#[test]
fn writing_memory_diverges_and_goto_returns_to_the_recording() {
    let s = setup("gdb-diverge");
    let rec = dump(&s.log);
    let (n, _, _) = rec.iter().find(|(n, _, l)| *n > 150 && l.contains("io-out")).unwrap().clone();
    let goto = format!("monitor goto {n}");
    let d = debug(
        &s,
        &[
            "break pit_irq",
            "continue",
            "set var *(long *)&ticks = 1000",
            "continue",
            "x/gd &ticks",
            "monitor when",
            "reverse-continue",
            &goto,
            "maintenance flush register-cache",
            "x/gd &ticks",
            "monitor when",
            "delete",
            "continue",
            "detach",
        ],
    );
    let t = d.ticks();
    assert_eq!(t.len(), 2, "{}", d.context());
    assert!(t[0] > 1000, "the diverged run counts on from the value written: {t:?}\n{}", d.context());
    assert!(t[1] < 100, "back in the recorded run: {t:?}\n{}", d.context());
    assert!(d.gdb.contains("from here the run diverges from the recording"), "{}", d.context());
    assert!(d.gdb.contains("diverged: registers or memory were changed from gdb"), "{}", d.context());
    assert!(d.gdb.contains("it cannot run backwards"), "{}", d.context());
    assert_eq!(d.gdb.matches("diverged: registers").count(), 1, "the goto returned to the recording: {}", d.context());
    assert!(d.gdb.contains("No more reverse-execution history"), "ran to the end of the log: {}", d.context());
    d.verified();
}

#[test]
fn gdb_going_away_mid_session_ends_the_replay_cleanly() {
    let s = setup("gdb-gone");
    // A client that asks why the target stopped, then closes the socket.
    let r = start_replay(&s);
    let mut c = TcpStream::connect(&r.addr).unwrap();
    c.write_all(b"$?#3f").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The ack ('+') and the reply may come in separate reads.
    let mut got = Vec::new();
    while !got.contains(&b'#') {
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before a stop reply: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.contains(&b'$'), "a stop reply: {:?}", String::from_utf8_lossy(&got));
    drop(c);
    let f = wait_for(r.child, 120, "ftvm replay --gdb");
    let err = r.stderr.join().unwrap();
    assert_eq!(f.status.code(), Some(0), "{err}");
    assert!(err.contains("gdb left") && err.contains("replay verified"), "{err}");

    // gdb killed while the guest is stopped at a breakpoint.
    let r = start_replay(&s);
    let mut g = Command::new("gdb")
        .args(["-batch", "-nx", "-ex", &format!("target remote {}", r.addr), "-ex", "break pit_irq", "-ex", "continue", "-ex", "shell sleep 60"])
        .arg(&s.elf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(g.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("Breakpoint 1, ") {
        line.clear();
    }
    g.kill().unwrap();
    let _ = g.wait();
    let f = wait_for(r.child, 120, "ftvm replay --gdb");
    let err = r.stderr.join().unwrap();
    assert_eq!(f.status.code(), Some(0), "{err}");
    assert!(err.contains("gdb left") && err.contains("replay verified"), "{err}");
}

/// One packet of the remote protocol, with its checksum.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Reads until a whole packet (`$...#xx`) arrived; returns its body.
fn read_packet(c: &mut TcpStream, got: &mut Vec<u8>) -> String {
    loop {
        if let Some(start) = got.iter().position(|&b| b == b'$') {
            if let Some(end) = got[start..].iter().position(|&b| b == b'#').map(|e| start + e) {
                if got.len() >= end + 3 {
                    // gdbstub run-length encodes: "x*n" is x and n-29 more.
                    let mut body = Vec::new();
                    let mut raw = got[start + 1..end].iter();
                    while let Some(&b) = raw.next() {
                        if b == b'*' {
                            let n = raw.next().map_or(0, |&n| n - 29);
                            let last = *body.last().unwrap();
                            body.extend(std::iter::repeat_n(last, usize::from(n)));
                        } else {
                            body.push(b);
                        }
                    }
                    got.drain(..end + 3);
                    return String::from_utf8_lossy(&body).into_owned();
                }
            }
        }
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed: {:?}", String::from_utf8_lossy(got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn ctrl_c_stops_a_running_replay() {
    // Two seconds at 1000 Hz: the replay runs long enough (about 15,000
    // exits) to be interrupted.
    let s = setup_with("gdb-ctrlc", "seconds=2 hz=1000 lines=5");
    let r = start_replay(&s);
    let mut c = TcpStream::connect(&r.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    c.write_all(&packet("QStartNoAckMode")).unwrap();
    assert_eq!(read_packet(&mut c, &mut got), "OK");
    c.write_all(&packet("c")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    c.write_all(&[0x03]).unwrap();
    let reply = read_packet(&mut c, &mut got);
    assert!(reply.starts_with("S02") || reply.starts_with("T02"), "a SIGINT stop: {reply:?}");
    // It stopped somewhere in the middle, at a position.
    c.write_all(&packet(&format!("qRcmd,{}", "when".bytes().map(|b| format!("{b:02x}")).collect::<String>()))).unwrap();
    let mut when = String::new();
    loop {
        let p = read_packet(&mut c, &mut got);
        if p == "OK" {
            break;
        }
        let hex = p.trim_start_matches('O');
        when.extend((0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap() as char));
    }
    assert!(when.starts_with("at exit #") && !when.contains("the replay ended"), "{when}");
    c.write_all(&packet("D")).unwrap();
    assert_eq!(read_packet(&mut c, &mut got), "OK");
    drop(c);
    let f = wait_for(r.child, 120, "ftvm replay --gdb");
    let err = r.stderr.join().unwrap();
    assert_eq!(f.status.code(), Some(0), "{err}");
    assert!(err.contains("replay verified"), "{err}");
}
