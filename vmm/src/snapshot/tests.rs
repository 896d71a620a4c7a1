//! The snapshot file: round trip, damage of every kind is an error (never
//! a panic or a huge allocation), and a snapshot of another guest is
//! refused with a clear message. No KVM: the vCPU state is made up.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use replay_log::{ExitKind, Header, Position};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::file::{MAGIC, VERSION};
use super::*;
use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::devices::{BusDevice, OutputSink};
use crate::digest::mem_digest;

/// 2.5 MiB: a chunk with data, a zero chunk, and a short last chunk.
const MEM: u64 = (5 << 20) / 2;

struct NullSink;
impl OutputSink for NullSink {
    fn emit(&mut self, _: &[u8]) {}
}

fn guest(cmdline: &str) -> Header {
    GuestConfig::load(None, None, MEM, cmdline).unwrap().header()
}

fn machine() -> Machine {
    Machine::new(Arc::new(VmClock::replay()), Box::new(NullSink), Arc::new(AtomicU64::new(0))).unwrap()
}

fn memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let text: Vec<u8> = (0..1024u32).flat_map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()).collect();
    mem.write_slice(&text, GuestAddress(0x1000)).unwrap();
    mem.write_slice(b"the last chunk", GuestAddress(MEM - 20)).unwrap();
    mem
}

/// A snapshot with something in every part: devices driven off their
/// power-on state, a made-up vCPU, memory with data and zeros.
fn sample() -> Snapshot {
    let m = machine();
    for (port, v) in [(0x20u64, 0x11u8), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xfe), (0x43, 0x34), (0x40, 0x9c), (0x40, 0x2e)] {
        m.pio.write(port, &[v]);
    }
    m.pio.write(0x3f9, &[0x01]);
    m.uart.lock().unwrap().push_input(b"ab");
    m.pio.write(0x3f8, b"x");
    m.pio.write(0x70, &[0x40]);
    m.pio.write(0x71, &[0x99]);
    m.i8042.lock().unwrap().write(4, &[0x20]);
    m.cmos.lock().unwrap().set_wall_base(1_700_000_000);
    m.clock.set(123_456_789);
    let mut vcpu = VcpuState::default();
    vcpu.regs.rip = 0x10_2bbe;
    vcpu.regs.rax = 0xdead_beef;
    vcpu.xsave = (0..4096u32).map(|i| (i * 7) as u8).collect();
    vcpu.msrs = vec![(0xc000_0080, 0xd01)];
    let g = guest("hz=100");
    let memory = MemoryImage::capture(&memory(), MEM).unwrap();
    Snapshot { guest: g, position: Position { ordinal: 4321, rip: 0x10_2bbe, exit: ExitKind::IoOut(0x3f8) }, vcpu, machine: m.state(), memory }
}

fn bytes(s: &Snapshot) -> Vec<u8> {
    let mut v = Vec::new();
    s.write_to(&mut v, "t.snap").unwrap();
    v
}

fn read(b: &[u8]) -> Result<Snapshot, SnapshotError> {
    Snapshot::read_from(b, "t.snap", None)
}

/// Offsets of the sections after magic and version: (start, tag, body length).
fn sections(b: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut out = Vec::new();
    let mut off = 10;
    while off < b.len() {
        let len = u32::from_le_bytes(b[off + 1..off + 5].try_into().unwrap()) as usize;
        out.push((off, b[off], len));
        off += 5 + len + 4;
    }
    out
}

/// Replaces the body of the section at `start` and fixes its checksum:
/// damage only the layout checks can catch.
fn rewrite(b: &[u8], start: usize, body: &[u8]) -> Vec<u8> {
    let len = u32::from_le_bytes(b[start + 1..start + 5].try_into().unwrap()) as usize;
    let mut out = b[..start].to_vec();
    let head = [&[b[start]][..], &(body.len() as u32).to_le_bytes()].concat();
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    out.extend_from_slice(&replay_log::crc32(&[&head, body]).to_le_bytes());
    out.extend_from_slice(&b[start + 5 + len + 4..]);
    out
}

#[test]
fn round_trip_keeps_everything_and_restores_the_same_machine_and_memory() {
    let s = sample();
    let b = bytes(&s);
    assert_eq!(&b[..8], &MAGIC);
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), VERSION);
    let t = read(&b).unwrap();
    assert_eq!(t, s);
    assert_eq!(t.console_bytes(), 1);
    // Zero chunks cost nothing, data is compressed.
    assert!(matches!(s.memory.chunks()[1], Chunk::Zero));
    assert!(b.len() < 1 << 20, "{} bytes", b.len());
    let tags: Vec<u8> = sections(&b).iter().map(|s| s.1).collect();
    assert_eq!(tags, [1, 2, 3, 4, 5, 5, 5, 6]);

    let m = machine();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    mem.write_slice(&[0xff; 4096], GuestAddress(1 << 20)).unwrap(); // a fresh VM's kernel, say
    let mut vcpu = crate::vcpu::fake::FakeVcpu::new(vec![]);
    t.restore(&mut vcpu, &m, &mem).unwrap();
    assert_eq!(m.state(), s.machine);
    assert_eq!(mem_digest(&mem), mem_digest(&memory()));
    assert_eq!(crate::vcpu::Vcpu::regs(&mut vcpu).unwrap().rax, 0xdead_beef);

    // A VM of another size is refused, and nothing is half-restored.
    let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let e = t.restore(&mut vcpu, &machine(), &small).unwrap_err().to_string();
    assert!(e.contains("exit #4321") && e.contains("2097152 bytes"), "{e}");
}

#[test]
fn every_truncation_is_a_truncated_snapshot() {
    let b = bytes(&sample());
    for cut in 0..b.len() {
        match read(&b[..cut]) {
            Err(SnapshotError::Truncated { name, offset, .. }) => {
                assert_eq!(name, "t.snap");
                assert!(offset as usize <= cut, "cut {cut}: offset {offset}");
            }
            other => panic!("cut at {cut} of {}: {other:?}", b.len()),
        }
    }
}

#[test]
fn every_flipped_byte_is_an_error() {
    let b = bytes(&sample());
    for i in 0..b.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut x = b.clone();
            x[i] ^= flip;
            let e = read(&x).err().unwrap_or_else(|| panic!("byte {i} ^ {flip:#x} read back fine"));
            let msg = e.to_string();
            assert!(msg.contains("t.snap"), "{msg}");
        }
    }
    // Some named: magic, version, a section's checksum, its length.
    let mut x = b.clone();
    x[0] = b'X';
    assert!(matches!(read(&x), Err(SnapshotError::NotASnapshot { .. })));
    let mut x = b.clone();
    x[8] = 3;
    assert!(read(&x).unwrap_err().to_string().contains("version 3; this build of ftvm reads version 2"));
    let secs = sections(&b);
    let (vcpu_at, _, _) = secs[2];
    let mut x = b.clone();
    x[vcpu_at + 40] ^= 1;
    let e = read(&x).unwrap_err().to_string();
    assert!(e.contains(&format!("the vcpu section, at byte offset {vcpu_at}: checksum mismatch")), "{e}");
    let mut x = b.clone();
    x[vcpu_at + 1..vcpu_at + 5].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = read(&x).unwrap_err().to_string();
    assert!(e.contains("over the section's limit"), "{e}");
}

/// Damage that keeps every checksum right (a buggy or hostile writer):
/// the layouts and device states are checked too.
#[test]
fn well_checksummed_nonsense_is_refused() {
    let b = bytes(&sample());
    let secs = sections(&b);
    let body = |i: usize| b[secs[i].0 + 5..secs[i].0 + 5 + secs[i].2].to_vec();
    let cases: Vec<(usize, Vec<u8>, &str)> = vec![
        (1, { let mut p = body(1); p[..8].copy_from_slice(&0u64.to_le_bytes()); p }, "not a place a snapshot is taken"),
        (1, { let mut p = body(1); p[16] = 99; p }, "unknown exit kind code 99"),
        (2, vec![9, 9, 9], "vCPU state"),
        (3, { let mut p = body(3); p.pop(); p }, "cut short"),
        (3, { let mut p = body(3); p.push(0); p }, "1 bytes after the last device"),
        (3, { let mut p = body(3); p[8 + 10] = 9; p }, "PIC state: master: priority rotation 9"),
        (3, { let mut p = body(3); p[8 + 6] = 2; p }, "is 2 (a flag: 0 or 1)"),
        (4, { let mut p = body(4); p[9..].fill(0x55); p }, "the chunk"),
        (4, { let mut p = body(4); p[0] = 1; p }, "where 0x0 comes next"),
        (5, { let mut p = body(5); p[8] = 7; p }, "unknown chunk encoding 7"),
        (5, { let mut p = body(5); p.push(1); p }, "a zero chunk with 1 bytes of data"),
        (0, { let mut p = body(0); p[32] = 5; p }, "initrd flag is 5"),
    ];
    for (i, new, want) in cases {
        let x = rewrite(&b, secs[i].0, &new);
        let e = read(&x).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(&format!("byte offset {}", secs[i].0)), "section {i}: {e}");
    }
    let mut x = b.clone();
    x.push(0);
    assert!(read(&x).unwrap_err().to_string().contains("data after the end section"));
    let (end_at, _, _) = *secs.last().unwrap();
    let e = read(&rewrite(&b, end_at, &[1])).unwrap_err().to_string();
    assert!(e.contains("over the section's limit of 0"), "{e}");
    // Sections out of order.
    let (m_at, _, _) = secs[3];
    let mut x = b.clone();
    x[m_at] = 5;
    let e = read(&rewrite(&x, m_at, &body(3))).unwrap_err().to_string();
    assert!(e.contains("expected the machine section (tag 4), found tag 5 (memory)"), "{e}");
}

#[test]
fn a_snapshot_of_another_guest_is_refused_naming_both() {
    let s = sample();
    let b = bytes(&s);
    let mine = s.guest.clone();
    let mut other = mine.clone();
    other.kernel_sha256[0] ^= 1;
    other.kernel_name = "/boot/vmlinux".into();
    let e = Snapshot::read_from(&b[..], "t.snap", Some(&other)).unwrap_err().to_string();
    assert!(e.contains("t.snap does not fit this guest") && e.contains("built-in test guest") && e.contains("/boot/vmlinux") && e.contains("pass --kernel"), "{e}");
    let e = s.check_guest(&guest("hz=5"), "t.snap").unwrap_err().to_string();
    assert!(e.contains("command line \"hz=100\"") && e.contains("\"hz=5\""), "{e}");
    let mut big = mine.clone();
    big.mem_bytes = 64 << 20;
    let e = s.check_guest(&big, "t.snap").unwrap_err().to_string();
    assert!(e.contains("(2 MiB), the guest 67108864 (64 MiB)"), "{e}");
    let mut rd = mine.clone();
    rd.initrd_sha256 = Some([1; 32]);
    assert!(s.check_guest(&rd, "t.snap").unwrap_err().to_string().contains("taken without an initrd"));
    s.check_guest(&mine, "t.snap").unwrap();
    // Refused from the guest section alone: its memory need not even be there.
    let secs = sections(&b);
    let e = Snapshot::read_from(&b[..secs[4].0 + 3], "t.snap", Some(&other)).unwrap_err();
    assert!(matches!(e, SnapshotError::WrongGuest { .. }), "{e}");
}

#[test]
fn save_and_load_name_the_file() {
    let dir = std::env::temp_dir().join(format!("ftvm-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("vm.snap");
    let s = sample();
    let n = s.save(&p).unwrap();
    assert_eq!(n, std::fs::metadata(&p).unwrap().len());
    assert_eq!(Snapshot::load(&p, Some(&s.guest)).unwrap(), s);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
    let e = Snapshot::load(&dir.join("none.snap"), None).unwrap_err().to_string();
    assert!(e.contains("cannot open snapshot") && e.contains("none.snap"), "{e}");
    let e = s.save(&dir.join("no/such/dir.snap")).unwrap_err().to_string();
    assert!(e.contains("cannot create snapshot") && e.contains("dir.snap"), "{e}");
    std::fs::write(&p, b"FTVMLOG\0 not a snapshot at all").unwrap();
    assert!(Snapshot::load(&p, None).unwrap_err().to_string().contains("is not an ftvm snapshot"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The sizes docs/SNAPSHOT.md ("Machine") documents: 285 bytes plus the
/// bytes in the UART's receive FIFO, plus 614 with a network card.
#[test]
fn machine_section_has_the_documented_size() {
    let s = sample();
    // No FIFO enabled: one byte held, the second one overran.
    assert_eq!(s.machine.uart.rx.len(), 1);
    assert!(s.machine.uart.overrun);
    assert_eq!(super::machine_bytes::encode(&s.machine).len(), 285 + 1);
    let b = bytes(&s);
    let secs = sections(&b);
    assert_eq!(secs[1].2, 25, "position");
    assert_eq!(secs[3].2, 286, "machine");
    assert_eq!(secs[5].2, 9, "a zero chunk");
    assert_eq!(secs[7].2, 0, "end");
}

fn machine_with_card(mem: &GuestMemoryMmap) -> Machine {
    let mut m = machine();
    m.add_net(crate::net::DEFAULT_MAC, mem.clone(), Box::new(crate::net::CountingSink::default())).unwrap();
    m
}

/// The network card's state (PCI root, configuration space, transport and
/// queues) is in the machine section and comes back into a machine with a
/// card; a machine without one refuses it, and the other way round.
#[test]
fn a_network_card_round_trips_and_a_machine_without_one_refuses_it() {
    let mem = memory();
    let m = machine_with_card(&mem);
    // The PCI address register, a changed config byte, the driver's status,
    // a queue set up.
    m.pio.write(0xcf8, &0x8000_083cu32.to_le_bytes());
    m.pio.write(0xcfc, &[10]);
    let bar = u64::from(crate::net::NET_BAR_ADDR);
    m.mmio.write(bar + 0x14, &[3]);
    m.mmio.write(bar + 0x16, &1u16.to_le_bytes());
    m.mmio.write(bar + 0x18, &64u16.to_le_bytes());
    m.mmio.write(bar + 0x20, &0x4000u32.to_le_bytes());
    let st = m.state();
    let n = st.net.as_ref().expect("a card");
    assert_eq!(n.pci.address, 0x8000_083c);
    assert_eq!(n.card.transport.status, 3);
    assert_eq!(n.card.transport.queues[1].size, 64);
    let b = super::machine_bytes::encode(&st);
    assert_eq!(b.len(), 285 + 614);
    let back = super::machine_bytes::decode(&b).unwrap();
    assert_eq!(back, st);
    let other = machine_with_card(&memory());
    other.restore(&back).unwrap();
    assert_eq!(other.state(), st);
    let e = machine().restore(&back).unwrap_err().to_string();
    assert!(e.contains("the state has a network card"), "{e}");
    let e = other.restore(&machine().state()).unwrap_err().to_string();
    assert!(e.contains("this machine has a network card"), "{e}");
    // A damaged card state is refused and leaves the card as it was.
    let mut bad = st.clone();
    bad.net.as_mut().unwrap().card.config[0] ^= 1;
    let fresh = machine_with_card(&memory());
    let before = fresh.state();
    assert!(fresh.restore(&bad).is_err());
    assert_eq!(fresh.state(), before);
}
