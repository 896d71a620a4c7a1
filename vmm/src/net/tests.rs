//! The card driven the way Linux's virtio_pci and virtio_net drive it,
//! through its BAR and configuration space, with rings built by
//! virtio-queue's mock driver. No KVM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{VirtioNet, HDR_LEN};
use super::transport::{COMMON_OFF, DEVICE_OFF, ISR_OFF, NOTIFY_OFF};
use super::*;
use crate::devices::{BusDevice, IrqLine};
use crate::pci::PciFunction;

#[derive(Clone, Default)]
struct Line(Arc<AtomicBool>);
impl IrqLine for Line {
    fn set_level(&self, high: bool) {
        self.0.store(high, Ordering::SeqCst);
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);
impl FrameSink for Capture {
    fn transmit(&mut self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
const RXQ: u64 = 0x10_000;
const TXQ: u64 = 0x20_000;
const BUFS: u64 = 0x100_000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn w32(d: &mut VirtioNet, off: u64, v: u32) {
    BusDevice::write(d, off, &v.to_le_bytes());
}
fn w16(d: &mut VirtioNet, off: u64, v: u16) {
    BusDevice::write(d, off, &v.to_le_bytes());
}
fn r32(d: &mut VirtioNet, off: u64) -> u32 {
    let mut b = [0; 4];
    BusDevice::read(d, off, &mut b);
    u32::from_le_bytes(b)
}
fn r8(d: &mut VirtioNet, off: u64) -> u8 {
    let mut b = [0; 1];
    BusDevice::read(d, off, &mut b);
    b[0]
}

/// What Linux's virtio_pci_modern does at probe, for both queues.
fn bring_up(d: &mut VirtioNet, rx: &MockSplitQueue<GuestMemoryMmap>, tx: &MockSplitQueue<GuestMemoryMmap>) {
    let c = COMMON_OFF;
    w16(d, c + 0x14, 0);
    BusDevice::write(d, c + 0x14, &[(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) as u8]);
    w32(d, c, 1);
    assert_eq!(r32(d, c + 4) & 1, 1, "VERSION_1 offered");
    w32(d, c, 0);
    assert_ne!(r32(d, c + 4) & 1 << 5, 0, "MAC offered");
    w32(d, c + 8, 0);
    w32(d, c + 0xc, 1 << 5 | 1 << 6); // MAC, and a bit not offered
    w32(d, c + 8, 1);
    w32(d, c + 0xc, 1);
    BusDevice::write(d, c + 0x14, &[(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK) as u8]);
    assert_ne!(r8(d, c + 0x14) & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0);
    w32(d, c + 8, 0);
    assert_eq!(r32(d, c + 0xc), 1 << 5, "only offered bits stick");
    assert_eq!(r32(d, c + 0x10) >> 16, 2, "two queues");
    for (i, q) in [rx, tx].into_iter().enumerate() {
        w16(d, c + 0x16, i as u16);
        assert_eq!(r32(d, c + 0x18) & 0xffff, 256);
        w16(d, c + 0x18, 16);
        assert_eq!(r32(d, c + 0x1c) >> 16, i as u32, "notify offset");
        for (off, a) in [(0x20, q.desc_table_addr()), (0x28, q.avail_addr()), (0x30, q.used_addr())] {
            w32(d, c + off, a.0 as u32);
            w32(d, c + off + 4, (a.0 >> 32) as u32);
        }
        w16(d, c + 0x1c, 1);
    }
    BusDevice::write(d, c + 0x14, &[(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK) as u8]);
}

fn used(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> (u16, u32, u32) {
    let u = q.used_addr().0;
    let idx: u16 = m.read_obj(GuestAddress(u + 2)).unwrap();
    let id: u32 = m.read_obj(GuestAddress(u + 4 + 8 * i)).unwrap();
    let len: u32 = m.read_obj(GuestAddress(u + 8 + 8 * i)).unwrap();
    (idx, id, len)
}

fn card(m: &GuestMemoryMmap) -> (VirtioNet, Line, Capture) {
    let line = Line::default();
    let cap = Capture::default();
    (VirtioNet::new(MAC, NET_BAR_ADDR, NET_IRQ, m.clone(), Box::new(line.clone()), Box::new(cap.clone())), line, cap)
}

#[test]
fn config_space_announces_a_modern_virtio_net_with_its_capabilities() {
    let m = mem();
    let (mut d, _, _) = card(&m);
    let mut b = [0u8; 256];
    d.config_read(0, &mut b);
    assert_eq!(&b[0..4], &[0xf4, 0x1a, 0x41, 0x10]);
    assert_eq!(b[0x3c..0x3e], [NET_IRQ, 1], "INTA# on IRQ 11");
    assert_eq!(u32::from_le_bytes(b[0x10..0x14].try_into().unwrap()), NET_BAR_ADDR);
    // Walk the capability list: common, ISR, device, notify, all in BAR 0.
    let mut types = Vec::new();
    let mut p = b[0x34] as usize;
    while p != 0 {
        assert_eq!(b[p], 0x09);
        assert_eq!(b[p + 4], 0, "BAR 0");
        types.push(b[p + 3]);
        p = b[p + 1] as usize;
    }
    assert_eq!(types, [1, 3, 4, 2]);
    // The MAC is the device configuration.
    let mut mac = [0; 6];
    BusDevice::read(&mut d, DEVICE_OFF, &mut mac);
    assert_eq!(mac, MAC);
}

#[test]
fn transmits_what_the_driver_queues_and_interrupts() {
    let m = mem();
    let (mut d, line, cap) = card(&m);
    let rx = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
    bring_up(&mut d, &rx, &tx);
    // Header and frame in two descriptors, as Linux does without
    // any_header_sg; then a chain too short to hold a header.
    let frame: Vec<u8> = (0..60u8).collect();
    m.write_slice(&[0; HDR_LEN], GuestAddress(BUFS)).unwrap();
    m.write_slice(&frame, GuestAddress(BUFS + 0x100)).unwrap();
    let descs = [
        RawDescriptor::from(Descriptor::new(BUFS, HDR_LEN as u32, 1, 1)),
        RawDescriptor::from(Descriptor::new(BUFS + 0x100, 60, 0, 0)),
        RawDescriptor::from(Descriptor::new(BUFS + 0x200, 4, 0, 0)),
    ];
    tx.add_desc_chains(&descs, 0).unwrap();
    w16(&mut d, NOTIFY_OFF + 4, 1);
    assert_eq!(*cap.0.lock().unwrap(), vec![frame.clone()]);
    assert_eq!(d.take_sent(), vec![(60, frame_digest(&frame))]);
    assert_eq!(d.counters.tx_errors, 1);
    assert_eq!(used(&m, &tx, 1).0, 2, "both chains returned");
    assert!(line.0.load(Ordering::SeqCst));
    assert_eq!(r8(&mut d, ISR_OFF), 1);
    assert!(!line.0.load(Ordering::SeqCst), "reading the ISR lowers INTA#");
    assert_eq!(r8(&mut d, ISR_OFF), 0);
}

#[test]
fn receives_into_posted_buffers_and_drops_what_does_not_fit() {
    let m = mem();
    let (mut d, line, _) = card(&m);
    let rx = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
    assert!(!d.can_receive(), "no driver yet");
    bring_up(&mut d, &rx, &tx);
    assert!(!d.can_receive(), "no buffer yet");
    let w = VRING_DESC_F_WRITE as u16;
    rx.add_desc_chains(&[RawDescriptor::from(Descriptor::new(BUFS, 1526 + HDR_LEN as u32, w, 0))], 0).unwrap();
    assert!(d.can_receive());
    assert_eq!(d.rx_buffers(), 1);
    d.receive(&[7; 2000]);
    assert_eq!(d.counters.rx_oversize, 1);
    assert!(d.can_receive(), "the buffer is still the guest's");
    assert!(!line.0.load(Ordering::SeqCst));
    let frame: Vec<u8> = (0..1514).map(|i| i as u8).collect();
    d.receive(&frame);
    let (idx, id, len) = used(&m, &rx, 0);
    assert_eq!((idx, id, len), (1, 0, (HDR_LEN + 1514) as u32));
    let mut got = vec![0; HDR_LEN + 1514];
    m.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(got[10], 1, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &frame[..]);
    assert!(line.0.load(Ordering::SeqCst));
    assert!(!d.can_receive());
    d.receive(&frame);
    assert_eq!(d.counters.rx_no_buffer, 1);
    assert_eq!(d.counters.rx_frames, 1);
}

#[test]
fn state_round_trips_and_a_reset_forgets_the_queues() {
    let m = mem();
    let (mut d, _, _) = card(&m);
    let rx = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
    bring_up(&mut d, &rx, &tx);
    let s = d.state();
    let (mut e, _, _) = card(&m);
    e.restore(&s).unwrap();
    assert_eq!(e.state(), s);
    rx.add_desc_chains(&[RawDescriptor::from(Descriptor::new(BUFS, 2048, VRING_DESC_F_WRITE as u16, 0))], 0).unwrap();
    assert!(e.can_receive());
    BusDevice::write(&mut e, COMMON_OFF + 0x14, &[0]);
    assert!(!e.can_receive());
    assert_ne!(e.state(), s);
    let mut bad = s.clone();
    bad.transport.queues.pop();
    assert!(e.restore(&bad).is_err());
}

#[test]
fn macs_and_specs_parse_or_say_what_is_wrong() {
    assert_eq!(parse_mac("52:54:00:12:34:56").unwrap(), DEFAULT_MAC);
    assert_eq!(parse_mac("52-54-00-12-34-56").unwrap(), DEFAULT_MAC);
    for bad in ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:zz", "525:4:00:12:34:56"] {
        assert!(matches!(parse_mac(bad), Err(NetError::BadMac(_))), "{bad}");
    }
    assert!(matches!(parse_mac("01:00:5e:00:00:01"), Err(NetError::MulticastMac(_))));
    assert_eq!(format_mac(&DEFAULT_MAC), "52:54:00:12:34:56");
    assert_eq!("tap=ftvm0".parse::<NetSpec>().unwrap(), NetSpec { tap: "ftvm0".into() });
    assert!(matches!("ftvm0".parse::<NetSpec>(), Err(NetError::BadSpec(_))));
    assert!(matches!("tap=".parse::<NetSpec>(), Err(NetError::BadTapName(_))));
    assert!(matches!("tap=a-name-far-too-long".parse::<NetSpec>(), Err(NetError::BadTapName(_))));
    for (spec, what) in [("tap=a/b", "a '/'"), ("tap=a b", "whitespace"), ("tap=a\tb", "whitespace"), ("tap=a:1", "a ':'")] {
        let e = spec.parse::<NetSpec>().unwrap_err();
        assert!(matches!(e, NetError::TapNameChar { what: w, .. } if w == what), "{spec}: {e}");
        assert!(!e.to_string().contains("longer than"), "{e}");
    }
    assert!(matches!("tap=..".parse::<NetSpec>(), Err(NetError::TapNameDots(_))));
    for zero in ["00:00:00:00:00:00", "00-00-00-00-00-00"] {
        let e = parse_mac(zero).unwrap_err();
        assert!(matches!(e, NetError::ZeroMac(_)), "{zero}");
        assert!(e.to_string().contains("all zeros"), "{e}");
    }
    assert!(matches!(parse_mac("ff:ff:ff:ff:ff:ff"), Err(NetError::MulticastMac(_))), "broadcast is multicast");
    assert!(parse_mac("02:00:00:00:00:00").is_ok(), "locally administered, not zero");
    let arp = gratuitous_arp(MAC, [169, 254, 0, 2]);
    assert_eq!(arp.len(), 60);
    assert_eq!(&arp[6..12], &MAC);
    assert_eq!(&arp[12..14], &[8, 6]);
}

#[test]
fn frames_waiting_for_a_guest_without_buffers_are_bounded_and_counted() {
    use super::tap::{NetInput, QUEUE_FRAMES};
    // A guest that posts no receive buffers: every exit polls, nothing is
    // taken. Waiting frames stay at the bound, the oldest are dropped and
    // counted with the reader's drops (the summary's "queue was full").
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut input = NetInput::from_channel(rx);
    let extra = 100;
    for i in 0..QUEUE_FRAMES + extra {
        tx.send((i as u32).to_le_bytes().repeat(15)).unwrap();
        if i % 64 == 0 {
            input.poll();
        }
    }
    input.poll();
    assert_eq!(input.pending(), QUEUE_FRAMES);
    assert_eq!(input.dropped.load(Ordering::Relaxed), extra as u64);
    assert!(input.receiver().unwrap().is_empty(), "the channel is emptied, so the idle wait does not spin");
    // The newest are kept: the first waiting one is frame `extra`.
    assert_eq!(input.take().unwrap()[..4], (extra as u32).to_le_bytes());
}

/// A state transfer's pre-copy finds the pages written during it through
/// the dirty log, which never sees the card's writes (ftvm's own mapping):
/// the recorder merges the card's written pages into every call of the
/// dirty log (`merge_device_writes`), as `take_dirty` does, so a frame
/// received between the pre-copy and the pause is captured again.
#[test]
fn a_card_write_between_precopy_and_the_pause_is_captured_again() {
    use crate::ft::xfer::Transfers;
    use crate::recorder::merge_device_writes;
    use crate::snapshot::{MemoryImage, CHUNK};

    let size = 4u64 << 20;
    let m = mem();
    let header = |mem_bytes| replay_log::Header {
        kernel_sha256: [1; 32],
        initrd_sha256: None,
        mem_bytes,
        cmdline: String::new(),
        ftvm_version: "t".into(),
        kernel_name: "t".into(),
        net_mac: Some(MAC),
    };
    let image_bytes = |img: &MemoryImage| {
        let r = mem();
        img.restore(&r).unwrap();
        let mut v = vec![0u8; size as usize];
        r.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    };
    let now = |m: &GuestMemoryMmap| {
        let mut v = vec![0u8; size as usize];
        m.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    };
    let mut machine = crate::machine::Machine::new(
        std::sync::Arc::new(crate::clock::VmClock::host()),
        Box::new(super::record_tests::Shared::default()),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    )
    .unwrap();
    machine.add_net(MAC, m.clone(), Box::new(Capture::default())).unwrap();
    let card = machine.net.clone().unwrap();
    let rx = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
    bring_up(&mut card.lock().unwrap(), &rx, &tx);
    // Two buffers in one chain (chunks 1 and 2), the frame spilling into
    // the second; the used ring is in chunk 0.
    let w = VRING_DESC_F_WRITE as u16;
    let second = 2 * CHUNK + 0x3000;
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    rx.add_desc_chains(&[RawDescriptor::from(Descriptor::new(BUFS, 1000, w | next, 1)), RawDescriptor::from(Descriptor::new(second, 1000, w, 0))], 0)
        .unwrap();

    // Not tracking (no recorder tracks dirty pages): nothing is noted.
    assert!(card.lock().unwrap().take_written().is_empty());
    card.lock().unwrap().track_writes(true);

    let t = Transfers::new(header(size));
    t.set_mem(m.clone());
    t.tracking_on();
    assert_eq!(t.precopy(&AtomicBool::new(false)), Ok(0));
    // The guest is running: a frame arrives (KVM's dirty log: nothing).
    let frame: Vec<u8> = (0..1500).map(|i| (i % 251) as u8 + 1).collect();
    card.lock().unwrap().receive(&frame);
    assert_eq!(card.lock().unwrap().counters.rx_frames, 1);
    // The snapshot's exit: its call of the dirty log, as `take_dirty`.
    let mut dirty = Vec::new();
    merge_device_writes(&machine, &mut dirty);
    assert!(dirty.contains(&BUFS) && dirty.contains(&second), "{dirty:x?}");
    assert!(dirty.contains(&(rx.used_addr().0 & !0xfff)), "the used ring: {dirty:x?}");
    t.note_dirty(&dirty);
    let (img, n) = t.memory_now(&m).unwrap();
    assert_eq!(n, 3, "chunk 0 (the used ring), 1 (the first buffer), 2 (the rest of the frame)");
    assert!(image_bytes(&img) == now(&m), "the snapshot's memory is the primary's");
    // Drained: the next call reports nothing more.
    let mut again = vec![0x5000];
    merge_device_writes(&machine, &mut again);
    assert_eq!(again, vec![0x5000]);

    // Without the card's pages the same transfer would have missed them.
    let t = Transfers::new(header(size));
    t.set_mem(m.clone());
    t.tracking_on();
    t.precopy(&AtomicBool::new(false)).unwrap();
    rx.add_desc_chains(&[RawDescriptor::from(Descriptor::new(BUFS + 0x1000, 2048, w, 0))], 2).unwrap();
    card.lock().unwrap().receive(&[9; 100]);
    let (img, _) = t.memory_now(&m).unwrap();
    assert!(image_bytes(&img) != now(&m), "the dirty log alone misses the card's write");
}

#[test]
fn a_machine_without_a_card_reports_the_dirty_log_unchanged() {
    let machine = crate::machine::Machine::new(
        std::sync::Arc::new(crate::clock::VmClock::host()),
        Box::new(super::record_tests::Shared::default()),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    )
    .unwrap();
    let mut dirty = vec![0x3000, 0x1000, 0x3000];
    crate::recorder::merge_device_writes(&machine, &mut dirty);
    assert_eq!(dirty, vec![0x3000, 0x1000, 0x3000], "not even sorted or deduplicated");
}
