//! The network card's host side on this machine's real tap devices
//! (`/dev/net/tun`; needs CAP_NET_ADMIN, as ftvm does), and the `--net`
//! arguments of the real binary. The guest side (Linux's virtio-net) is in
//! the lab (tests/lab.rs).

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use ftvm::net::tap::Tap;
use ftvm::net::FrameSink;

#[path = "common/guest_cli.rs"]
mod guest_cli;
use guest_cli::*;

fn tap_name(what: &str) -> String {
    format!("ftvm{what}{}", std::process::id() % 100_000)
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("running ip");
    assert!(o.status.success(), "ip {args:?}: {}", text(&o.stderr));
}

fn mac_of(name: &str) -> [u8; 6] {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap();
    ftvm::net::parse_mac(s.trim()).unwrap()
}

/// The host sends a datagram to an address behind the tap: its ARP request
/// comes out of the tap (read by the reader thread); the ARP reply written
/// with `TapWriter` goes in, and the datagram follows to the replying MAC.
#[test]
fn a_tap_passes_frames_both_ways_and_a_taken_one_is_refused_clearly() {
    let name = tap_name("t");
    let tap = Tap::open(&name).unwrap();
    // A tap ftvm made never becomes a bridge's address (fe: first).
    assert_eq!(mac_of(&name), ftvm::net::tap::host_side_mac(&name));
    assert_eq!(mac_of(&name)[0], 0xfe);
    let again = Tap::open(&name).err().expect("a second attach").to_string();
    assert!(again.contains(&format!("cannot attach to tap '{name}'")) && again.contains("another process has it open"), "{again}");
    ip(&["addr", "add", "169.254.123.1/24", "dev", &name]);
    ip(&["link", "set", &name, "up"]);
    let mut input = tap.spawn_reader();
    let sock = UdpSocket::bind("169.254.123.1:0").unwrap();
    sock.send_to(b"hello guest", "169.254.123.2:9").unwrap();

    let wait_for = |input: &mut ftvm::net::tap::NetInput, want: &dyn Fn(&[u8]) -> bool| -> Vec<u8> {
        let t0 = Instant::now();
        loop {
            input.poll();
            while let Some(f) = input.take() {
                if want(&f) {
                    return f;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no such frame from the tap");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let arp = wait_for(&mut input, &|f| f.len() >= 42 && f[12..14] == [8, 6] && f[38..42] == [169, 254, 123, 2]);
    let host_mac = mac_of(&name);
    assert_eq!(arp[6..12], host_mac);

    // The reply, from the "guest".
    let guest = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
    let mut reply = Vec::new();
    reply.extend_from_slice(&host_mac);
    reply.extend_from_slice(&guest);
    reply.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&guest);
    reply.extend_from_slice(&[169, 254, 123, 2]);
    reply.extend_from_slice(&host_mac);
    reply.extend_from_slice(&[169, 254, 123, 1]);
    reply.resize(60, 0);
    tap.writer().transmit(&reply);
    let udp = wait_for(&mut input, &|f| f.len() > 42 && f[12..14] == [8, 0] && f[0..6] == guest);
    assert!(udp.ends_with(b"hello guest"));
}

#[test]
fn net_arguments_get_clear_errors() {
    let run = |args: &[&str]| {
        let o = ftvm().args(["run", "--no-stdin", "--cmdline", "seconds=1"]).args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} accepted");
        text(&o.stderr)
    };
    let e = run(&["--net", "tap=x", "--mac", "52:54:00:zz:34:56"]);
    assert!(e.contains("malformed MAC address '52:54:00:zz:34:56'"), "{e}");
    let e = run(&["--net", "tap=x", "--mac", "01:00:5e:00:00:01"]);
    assert!(e.contains("multicast"), "{e}");
    let e = run(&["--net", "ftvm0"]);
    assert!(e.contains("expected tap=NAME"), "{e}");
    let e = run(&["--net", "tap=a-name-too-long-for-linux"]);
    assert!(e.contains("longer than 15 bytes"), "{e}");
    let e = run(&["--mac", "52:54:00:12:34:56"]);
    assert!(e.contains("--net"), "{e}");
    // A tap another process holds.
    let name = tap_name("b");
    let _held = Tap::open(&name).unwrap();
    let e = run(&["--net", &format!("tap={name}")]);
    assert!(e.contains("another process has it open"), "{e}");
}

/// The card is in the machine (and in the log's header) even when the
/// guest has no driver for it; replay builds it from the header alone.
#[test]
fn a_recording_with_a_card_replays_without_a_network() {
    let dir = tmpdir("netrr");
    let log = dir.join("net.ftlog");
    let name = tap_name("r");
    let o = ftvm()
        .args(["record", "--no-stdin", "--net", &format!("tap={name}"), "--mac", "52:54:00:00:00:07", "--cmdline", "seconds=1 lines=3", "--log"])
        .arg(&log)
        .output()
        .unwrap();
    check(&o, "record --net");
    let o2 = ftvm().args(["replay", "--log"]).arg(&log).output().unwrap();
    check(&o2, "replay");
    assert_eq!(text(&o.stdout), text(&o2.stdout));
    assert!(text(&o2.stderr).contains("replay verified"), "{}", text(&o2.stderr));
    let dump = ftvm().args(["log", "dump"]).arg(&log).output().unwrap();
    assert!(text(&dump.stdout).contains("net 52:54:00:00:00:07"), "{}", text(&dump.stdout));
    // A snapshot holds the card; a replay resumed from it verifies.
    let snap = dir.join("net.snap");
    let o3 = ftvm().args(["replay", "--snapshot-at", "200", "--snapshot-out"]).arg(&snap).arg("--log").arg(&log).output().unwrap();
    check(&o3, "replay --snapshot-at");
    let o4 = ftvm().args(["replay", "--from"]).arg(&snap).arg("--log").arg(&log).output().unwrap();
    check(&o4, "replay --from");
    assert!(text(&o4.stderr).contains("replay verified"), "{}", text(&o4.stderr));
}
