//! The witness over real sockets: rules, protocol, keys.

use super::*;
use crate::ft::key::ClusterKey;
use crate::ft::secure;
use std::io::{BufRead, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

const IO_TIMEOUT: Duration = Duration::from_secs(1);

// Long enough that a loaded host (a pinger thread delayed by hundreds of ms)
// does not lapse a lease the test keeps alive.
const T: Timeouts = Timeouts { lease: Duration::from_millis(500), backup_timeout: Duration::from_millis(1200) };
const P: &str = "127.0.0.1:7101";
const B: &str = "127.0.0.1:7102";
const S: &str = "127.0.0.1:7103";
const RUN: &str = "00000000000000aa";

fn key() -> ClusterKey {
    ClusterKey::from_bytes([7; 32])
}

fn client(addr: &str) -> WitnessClient {
    WitnessClient::new(&super::WitnessAt::Embedded(addr.to_string()), &key())
}

fn start() -> (String, WitnessClient) {
    let w = Witness::bind_with("127.0.0.1:0", T, key()).unwrap();
    let addr = w.local_addr().to_string();
    thread::spawn(move || w.serve());
    let c = client(&addr);
    (addr, c)
}

/// Serves `w` on a thread; a client of it.
fn serve(w: Witness) -> WitnessClient {
    let addr = w.local_addr().to_string();
    thread::spawn(move || w.serve());
    client(&addr)
}

/// An empty scratch directory for a state-file test.
fn fresh_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvm-witness-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A witness in view 2: primary P, backup B.
fn start_pair() -> (String, WitnessClient) {
    let (addr, mut c) = start();
    assert_eq!(c.become_primary(P, RUN, false).unwrap(), v(1, Some(P), None));
    assert_eq!(c.backup_ping(B, 0, true, 0).unwrap(), v(2, Some(P), Some(B)));
    // Joining, it has nothing whatever it says; its next ping says it
    // holds the state.
    assert!(!c.status().unwrap().backup_ready);
    c.backup_ping(B, 2, true, 0).unwrap();
    assert!(c.status().unwrap().backup_ready);
    (addr, c)
}

fn v(number: u64, p: Option<&str>, b: Option<&str>) -> View {
    View { number, primary: p.map(String::from), backup: b.map(String::from), run: p.map(|_| RUN.to_string()) }
}

/// Waits `d` while asking the witness for its view every 30 ms: a witness
/// that hears nothing for a lease counts itself stalled and forgives the
/// backup's silence (`rules.rs note_request`); this one stays busy.
fn watched(c: &mut WitnessClient, d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        c.view().unwrap();
        thread::sleep(Duration::from_millis(30));
    }
}

fn refused(r: Result<impl fmt::Debug, WitnessError>, needle: &str) {
    match r {
        Err(WitnessError::Refused { msg, .. }) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
        other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
    }
}

/// Keeps `me` pinging as primary every 30 ms until the flag is set.
fn pinger(addr: &str, me: &'static str, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let mut c = client(addr);
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            c.primary_ping(me, 1, 1, 1, 0).unwrap();
            thread::sleep(Duration::from_millis(30));
        }
    })
}

#[test]
fn first_primary_and_second_refused() {
    let (addr, mut c) = start();
    assert_eq!(c.view().unwrap(), v(0, None, None));
    assert_eq!(c.become_primary(P, RUN, false).unwrap(), v(1, Some(P), None));
    assert_eq!(c.become_primary(P, RUN, false).unwrap(), v(1, Some(P), None), "idempotent");
    refused(client(&addr).become_primary(S, RUN, false), "a primary is already running: 127.0.0.1:7101 in view 1");
    assert_eq!(c.view().unwrap(), v(1, Some(P), None));
}

#[test]
fn backup_joins_and_slot_is_held() {
    let (_, mut c) = start();
    c.become_primary(P, RUN, false).unwrap();
    assert_eq!(c.backup_ping(B, 0, true, 0).unwrap(), v(2, Some(P), Some(B)));
    assert_eq!(c.backup_ping(B, 2, true, 0).unwrap(), v(2, Some(P), Some(B)));
    refused(c.backup_ping(S, 0, true, 0), "view 2 already has backup 127.0.0.1:7102");
    refused(c.backup_ping(P, 2, true, 0), "is the primary");
}

#[test]
fn promote_waits_then_granted() {
    let (addr, mut c) = start_pair();
    let stop = Arc::new(AtomicBool::new(false));
    let h = pinger(&addr, P, stop.clone());
    let t0 = Instant::now();
    while t0.elapsed() < 3 * T.lease {
        assert_eq!(c.promote(B, 2, false, true).unwrap(), Promotion::Wait);
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
    let stopped = Instant::now();
    let granted = loop {
        match c.promote(B, 2, false, true).unwrap() {
            Promotion::Granted(view) => break view,
            Promotion::Wait => thread::sleep(Duration::from_millis(10)),
        }
    };
    assert!(stopped.elapsed() >= T.lease - Duration::from_millis(40));
    assert_eq!(granted, v(3, Some(B), None));
    assert_eq!(c.promote(B, 2, false, true).unwrap(), Promotion::Granted(granted.clone()), "retry is idempotent");
    refused(c.promote(S, 3, false, true), "not the backup");
    refused(c.primary_ping(P, 2, 5, 5, 0), "not the primary of view 3 (primary is 127.0.0.1:7102)");
    let st = c.status().unwrap();
    assert!(st.lease_left_ms.is_some() && st.view == granted);
}

#[test]
fn rule1_only_the_backup_takes_over() {
    let (_, mut c) = start_pair();
    thread::sleep(T.lease + Duration::from_millis(50));
    refused(c.become_primary(S, RUN, false), "primary 127.0.0.1:7101 of view 2 is silent; its backup 127.0.0.1:7102 takes over");
    refused(c.become_primary(P, RUN, false), "takes over");
    refused(c.become_primary(B, RUN, false), "ask for promotion");
    watched(&mut c, T.backup_timeout);
    refused(c.become_primary(S, RUN, false), "takes over if it comes back; --new-run abandons that VM");
    let mut fresh = v(3, Some(S), None);
    fresh.run = Some("00000000000000bb".into());
    assert_eq!(c.become_primary(S, "00000000000000bb", true).unwrap(), fresh, "the operator abandons the VM");
}

#[test]
fn non_primary_ping_refused() {
    let (_, mut c) = start();
    refused(c.primary_ping(S, 0, 1, 1, 0), "not the primary of view 0 (primary is -)");
    c.become_primary(P, RUN, false).unwrap();
    refused(c.primary_ping(S, 1, 1, 1, 0), "not the primary of view 1");
    let st = c.status().unwrap();
    assert_eq!((st.primary_sent, st.primary_acked), (0, 0));
}

#[test]
fn silent_backup_dropped_on_primary_ping() {
    let (_, mut c) = start_pair();
    let t0 = Instant::now();
    let mut view = c.primary_ping(P, 2, 0, 0, 0).unwrap();
    while view.backup.is_some() && t0.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(50));
        view = c.primary_ping(P, view.number, 0, 0, 0).unwrap();
    }
    assert!(t0.elapsed() > T.backup_timeout);
    assert_eq!(view, v(3, Some(P), None));
    refused(c.backup_ping(B, 2, true, 0), "127.0.0.1:7102 is not in view 3: it was dropped");
    assert_eq!(c.backup_ping(S, 0, true, 0).unwrap(), v(4, Some(P), Some(S)), "a new backup may join");
}

#[test]
fn lost_link_to_live_primary_drops_backup() {
    let (addr, mut c) = start_pair();
    let stop = Arc::new(AtomicBool::new(false));
    let h = pinger(&addr, P, stop.clone());
    let t0 = Instant::now();
    let err = loop {
        match c.promote(B, 2, true, true) {
            Ok(Promotion::Wait) => thread::sleep(Duration::from_millis(20)),
            other => break other,
        }
        assert!(t0.elapsed() < Duration::from_secs(2));
    };
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
    assert!(t0.elapsed() > 2 * T.lease);
    refused(err, "dropped from view 2: the primary is alive");
    assert_eq!(c.view().unwrap(), v(3, Some(P), None));
}

#[test]
fn status_fields() {
    let (_, mut c) = start();
    let st = c.status().unwrap();
    assert_eq!((st.view, st.lease_left_ms, st.backup_alive), (v(0, None, None), None, false));
    c.become_primary(P, RUN, false).unwrap();
    c.primary_ping(P, 1, 10, 7, 0).unwrap();
    c.backup_ping(B, 0, true, 0).unwrap();
    let st = c.status().unwrap();
    assert_eq!(st.view, v(2, Some(P), Some(B)));
    assert!(st.lease_left_ms.is_some_and(|ms| ms <= T.lease.as_millis() as u64), "{:?}", st.lease_left_ms);
    assert_eq!((st.primary_sent, st.primary_acked, st.backup_alive), (10, 7, true));
    thread::sleep(T.lease + Duration::from_millis(30));
    let st = c.status().unwrap();
    assert_eq!((st.lease_left_ms, st.backup_alive), (None, true));
    watched(&mut c, T.backup_timeout);
    assert!(!c.status().unwrap().backup_alive);
}

#[test]
fn client_reconnects_after_server_closes() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let srv = thread::spawn(move || {
        for n in [5u64, 6] {
            let (mut r, mut w) = secure::accept(l.accept().unwrap().0, &key()).unwrap();
            assert_eq!(crate::ft::read_line(&mut r).unwrap().as_deref(), Some("op=view"));
            w.write_all(format!("ok view={n} primary=a:1 backup=- run={RUN}\n").as_bytes()).unwrap();
            // dropping `r` and `w` closes the connection
        }
    });
    let mut c = client(&addr);
    assert_eq!(c.view().unwrap(), v(5, Some("a:1"), None));
    thread::sleep(Duration::from_millis(50));
    assert_eq!(c.view().unwrap(), v(6, Some("a:1"), None));
    srv.join().unwrap();
    // A client per request against a real witness works too.
    let (addr, _) = start();
    assert_eq!(client(&addr).become_primary(P, RUN, false).unwrap().number, 1);
    assert_eq!(client(&addr).view().unwrap().number, 1);
}

#[test]
fn malformed_requests_get_err_and_connection_survives() {
    let (addr, _) = start();
    let (mut r, mut w) = secure::connect(&addr, &key(), IO_TIMEOUT).unwrap();
    let mut ask = |req: &str| {
        w.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line
    };
    for bad in ["garbage", "", "op=nope", "op=become_primary", "op=become_primary me=-",
                "op=primary_ping me=a:1 view=x sent=1 acked=1", "op=promote me=a:1 view=0 lost=maybe",
                "op=view junk"] {
        let reply = ask(bad);
        assert!(reply.starts_with("err ") && reply.ends_with('\n'), "{bad:?} -> {reply:?}");
    }
    assert_eq!(ask("op=view"), "ok view=0 primary=- backup=- run=-\n");
    refused(client(&addr).become_primary("a b", RUN, false), "not a usable address");
}

#[test]
fn view_numbers_are_checked_on_every_request() {
    let (_, mut c) = start_pair();
    // The primary P was installed in view 1; the view is now 2.
    refused(c.primary_ping(P, 3, 1, 1, 0), "view 3 is not one of this primary's views (1 to 2)");
    refused(c.primary_ping(P, 0, 1, 1, 0), "view 0 is not one of this primary's views");
    assert_eq!(c.primary_ping(P, 1, 1, 1, 0).unwrap(), v(2, Some(P), Some(B)), "one view behind is normal");
    refused(c.backup_ping(B, 9, true, 0), "view 9 does not exist yet: the current view is 2");
    refused(c.promote(B, 1, true, true), "stale view 1");
    refused(c.promote(B, 3, true, true), "stale view 3");
    let st = c.status().unwrap();
    assert_eq!((st.view, st.primary_sent), (v(2, Some(P), Some(B)), 1), "a refused request changed the state");
}

#[test]
fn without_the_key_nothing_is_accepted_or_answered() {
    let (addr, mut c) = start();
    // A client with another key.
    let mut other = WitnessClient::new(&super::WitnessAt::Embedded(addr.to_string()), &ClusterKey::from_bytes([8; 32]));
    let e = other.become_primary(S, RUN, false).unwrap_err();
    assert!(matches!(e, WitnessError::Unauthenticated { .. }), "{e}");
    assert!(e.to_string().contains("did not accept this cluster key"), "{e}");
    // A plain TCP client speaking the protocol in clear.
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.write_all(b"op=become_primary me=127.0.0.1:9\nop=status\n").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let _ = raw.read_to_end(&mut got);
    assert!(got.is_empty(), "the witness answered a stranger: {:?}", String::from_utf8_lossy(&got));
    assert_eq!(c.view().unwrap(), v(0, None, None), "a stranger changed the view");
}

#[test]
fn bind_and_connect_errors() {
    let w = Witness::bind("127.0.0.1:0", key()).unwrap();
    let taken = w.local_addr().to_string();
    assert!(matches!(Witness::bind(&taken, key()), Err(WitnessError::Listen { .. })));
    drop(w);
    let err = client(&taken).view().unwrap_err();
    assert!(matches!(err, WitnessError::Unreachable { .. }), "{err:?}");
}

// ---- issue 8: identity, readiness, lost VMs

const P2: &str = "127.0.0.1:7101@restarted";

#[test]
fn a_restarted_primary_is_a_new_member_not_the_old_one() {
    let (_, mut c) = start_pair();
    // Restarted at once, while its old lease still runs.
    refused(c.become_primary(P2, "00000000000000cc", false), "a primary is already running: 127.0.0.1:7101 in view 2");
    thread::sleep(T.lease + Duration::from_millis(50));
    // The old one is dead; its backup holds the state and takes over.
    refused(c.become_primary(P2, "00000000000000cc", false), "its backup 127.0.0.1:7102 takes over");
    refused(c.become_primary(P2, "00000000000000cc", true), "takes over");
    assert_eq!(c.promote(B, 2, true, true).unwrap(), Promotion::Granted(View { run: Some(RUN.into()), ..v(3, Some(B), None) }));
    refused(c.become_primary(P2, "00000000000000cc", false), "a primary is already running: 127.0.0.1:7102 in view 3");
}

#[test]
fn a_backup_without_the_state_never_takes_over_and_the_vm_is_said_lost() {
    let (_, mut c) = start();
    c.become_primary(P, RUN, false).unwrap();
    c.backup_ping(B, 0, false, 0).unwrap();
    c.primary_ping(P, 2, 10, 0, 1234).unwrap();
    let st = c.status().unwrap();
    assert!(!st.backup_ready && !st.lost && st.state().contains("is joining"), "{}", st.state());
    thread::sleep(T.lease + Duration::from_millis(50));
    // While joining it keeps pinging, not ready; the primary is gone.
    c.backup_ping(B, 2, false, 0).unwrap();
    let st = c.status().unwrap();
    assert!(st.lost, "{}", st.state());
    assert!(st.state().contains("lost: the VM of run 00000000000000aa is lost") && st.state().contains("1234 bytes"), "{}", st.state());
    refused(c.promote(B, 2, true, false), "cannot take over: primary 127.0.0.1:7101 died before this backup had the VM's state");
    assert_eq!(c.view().unwrap(), View { run: Some(RUN.into()), ..v(3, Some(P), None) }, "dropped, the primary's name kept");
    // Nobody can join a dead primary; nobody replaces it without saying so.
    refused(c.backup_ping(B, 0, false, 0), "no live primary to join");
    refused(c.become_primary(S, "00000000000000dd", false), "is lost");
    refused(c.become_primary(S, "00000000000000dd", false), "--new-run");
    let v4 = c.become_primary(S, "00000000000000dd", true).unwrap();
    assert_eq!((v4.number, v4.primary.as_deref(), v4.run.as_deref()), (4, Some(S), Some("00000000000000dd")));
    assert_eq!(c.status().unwrap().released, 0, "a new run has released nothing");
    // Now the backup can join the new run.
    assert_eq!(c.backup_ping(B, 0, false, 0).unwrap().backup.as_deref(), Some(B));
}

#[test]
fn a_backup_waiting_before_the_first_primary_protects_it() {
    let (_, mut c) = start();
    assert_eq!(c.backup_ping(B, 0, false, 0).unwrap(), View { number: 1, primary: None, backup: Some(B.into()), run: None });
    let v2 = c.become_primary(P, RUN, false).unwrap();
    assert_eq!(v2, v(2, Some(P), Some(B)));
    assert!(c.status().unwrap().state().contains("is joining"));
}

#[test]
fn a_promotion_needs_the_state_even_when_the_backup_says_so_late() {
    // A backup that got its state between two pings says so in its
    // promotion request: it is believed (it is a key holder in the view).
    let (_, mut c) = start();
    c.become_primary(P, RUN, false).unwrap();
    c.backup_ping(B, 0, false, 0).unwrap();
    thread::sleep(T.lease + Duration::from_millis(50));
    assert!(matches!(c.promote(B, 2, true, true).unwrap(), Promotion::Granted(_)));
}

#[test]
fn a_restarted_witness_takes_up_its_saved_view_and_the_vm_goes_on() {
    let dir = fresh_dir("state");
    let file = dir.join("witness.state");
    let mut c = serve(Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&file).unwrap());
    c.become_primary(P, RUN, false).unwrap();
    c.backup_ping(B, 0, false, 0).unwrap();
    c.backup_ping(B, 2, true, 0).unwrap();
    c.primary_ping(P, 2, 100, 90, 777).unwrap();
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.starts_with("ftvm-witness-state 1\nview=2 primary=127.0.0.1:7101 backup=127.0.0.1:7102 run=00000000000000aa ready=1 promoted_from=0 promoted=-"), "{saved}");
    // The file is locked: a second witness on it is refused.
    let e = Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&file).err().unwrap();
    assert!(e.to_string().contains("another witness holds"), "{e}");
    // "Restart": another witness on a copy of the file (the first one is
    // as good as dead: nobody talks to it again, but it holds its lock).
    let file2 = dir.join("restarted.state");
    std::fs::copy(&file, &file2).unwrap();
    let file = file2;
    let mut c = serve(Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&file).unwrap());
    assert_eq!(c.view().unwrap(), v(2, Some(P), Some(B)));
    let st = c.status().unwrap();
    assert!(st.lease_left_ms.is_some() && st.backup_alive && st.backup_ready && !st.lost, "{}", st.state());
    // The primary's lease may be alive: nobody else gets in meanwhile; its
    // renewals keep it.
    refused(c.become_primary(S, "00000000000000ee", true), "a primary is already running");
    assert_eq!(c.primary_ping(P, 2, 120, 110, 800).unwrap(), v(2, Some(P), Some(B)));
    // Without renewals the backup takes over, as before the restart.
    thread::sleep(T.lease + Duration::from_millis(50));
    assert!(matches!(c.promote(B, 2, true, true).unwrap(), Promotion::Granted(_)));
    // A damaged file is a clear error that names it.
    let file = dir.join("damaged.state");
    std::fs::write(&file, "ftvm-witness-state 1\nview=x\n").unwrap();
    let e = Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&file).err().unwrap();
    assert!(e.to_string().contains(&file.display().to_string()) && e.to_string().contains("not a witness state line"), "{e}");
    std::fs::write(&file, "hello\n").unwrap();
    let e = Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&file).err().unwrap();
    assert!(e.to_string().contains("not a witness state file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_promotion_granted_before_a_restart_is_found_by_its_retry() {
    let dir = fresh_dir("promo");
    let (a, b) = (dir.join("a.state"), dir.join("b.state"));
    let mut c = serve(Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&a).unwrap());
    c.become_primary(P, RUN, false).unwrap();
    c.backup_ping(B, 0, true, 0).unwrap();
    c.backup_ping(B, 2, true, 0).unwrap();
    thread::sleep(T.lease + Duration::from_millis(50));
    let granted = c.promote(B, 2, true, true).unwrap();
    // The answer "was lost"; the witness restarts from its file.
    std::fs::copy(&a, &b).unwrap();
    let mut c = serve(Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&b).unwrap());
    assert_eq!(c.promote(B, 2, true, true).unwrap(), granted, "the retry finds its promotion");
    assert!(c.status().unwrap().lease_left_ms.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_change_the_witness_cannot_save_is_refused_and_taken_back() {
    let dir = fresh_dir("ro");
    let file = dir.join("w.state");
    let mut c = serve(Witness::bind_with("127.0.0.1:0", T, key()).unwrap().with_state_file(&file).unwrap());
    // Saving goes through a temporary file beside it: a directory in its
    // way makes every save fail, as a full disk would.
    std::fs::create_dir_all(file.with_extension("tmp")).unwrap();
    refused(c.become_primary(P, RUN, false), "cannot save its state");
    assert_eq!(c.view().unwrap(), View::default(), "a change that was not saved was kept");
    std::fs::remove_dir_all(file.with_extension("tmp")).unwrap();
    assert_eq!(c.become_primary(P, RUN, false).unwrap(), v(1, Some(P), None));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_primary_can_give_up_a_backup_that_stopped_acknowledging() {
    let (_, mut c) = start_pair();
    refused(c.drop_backup(S, 2, B), "is not the primary of view 2");
    refused(c.drop_backup(P, 1, B), "stale view 1");
    refused(c.drop_backup(P, 2, S), "with backup 127.0.0.1:7102");
    assert_eq!(c.drop_backup(P, 2, B).unwrap(), v(3, Some(P), None));
    // The backup given up is out: its keepalive is refused, it joins anew.
    refused(c.backup_ping(B, 2, true, 0), "it was dropped");
    refused(c.promote(B, 2, true, true), "stale view 2");
    assert_eq!(c.backup_ping("127.0.0.1:7102@new", 0, false, 0).unwrap().backup.as_deref(), Some("127.0.0.1:7102@new"));
}

#[test]
fn a_stalled_witness_does_not_count_its_own_silence_against_the_backup() {
    let (_, mut c) = start_pair();
    // Nobody reaches the witness for longer than the backup's timeout (it
    // was stopped); the first request after is the primary's late ping.
    thread::sleep(T.backup_timeout + Duration::from_millis(100));
    assert_eq!(c.primary_ping(P, 2, 10, 10, 0).unwrap(), v(2, Some(P), Some(B)), "the backup was dropped for the witness's own stall");
    // Its timeout runs again from there.
    watched(&mut c, T.backup_timeout + Duration::from_millis(100));
    assert_eq!(c.primary_ping(P, 2, 10, 10, 0).unwrap(), v(3, Some(P), None));
}

/// A backup that replayed to the guest's end stays until the run is said
/// ended (the primary's last output out) and asks for promotion if the
/// primary dies first; once the run ended there is nothing to take over.
#[test]
fn a_backup_is_not_promoted_over_a_run_that_ended() {
    let (_, mut c) = start_pair();
    c.ended(P).unwrap();
    watched(&mut c, T.lease + Duration::from_millis(50));
    refused(c.promote(B, 2, true, true), "ended: nothing to take over");
    assert_eq!(c.status().unwrap().view.primary.as_deref(), Some(P), "the view is left as it was");
}

#[test]
fn a_run_whose_guest_ended_is_not_lost_and_a_new_one_needs_no_new_run() {
    let (_, mut c) = start();
    c.become_primary(P, RUN, false).unwrap();
    c.primary_ping(P, 1, 10, 0, 55).unwrap();
    refused(c.ended(S), "is not the primary of view 1");
    c.ended(P).unwrap();
    watched(&mut c, T.lease + Duration::from_millis(50));
    let st = c.status().unwrap();
    assert!(st.ended && !st.lost && st.state().starts_with("ended: the guest of run 00000000000000aa ended"), "{}", st.state());
    let v2 = c.become_primary(S, "00000000000000ff", false).unwrap();
    assert_eq!((v2.primary.as_deref(), v2.run.as_deref()), (Some(S), Some("00000000000000ff")));
    assert!(!c.status().unwrap().ended, "the new run has not ended");
}
