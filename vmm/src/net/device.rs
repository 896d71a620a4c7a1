//! The virtio-net card: queue 0 receives, queue 1 transmits, no control
//! queue, no offloads (so every frame fits one buffer of Linux's, 1514
//! bytes plus the 12-byte header). It runs only at exits: a transmit
//! happens during the guest's write to the notification address; a
//! receive happens when the VMM applies a `NetRx` input (`apply.rs`). Both
//! raise INTA# through the ISR byte. Transmitted frames go to a
//! [`FrameSink`] and are noted (length, digest) for the log.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::transport::{self, Transport, TransportState};
use super::{frame_digest, FrameSink, MAX_FRAME};
use crate::devices::{BusDevice, DeviceError, IrqLine};
use crate::pci::config::{Bar, ConfigSpace};
use crate::pci::PciFunction;

/// virtio's PCI vendor; device 0x1040 + 1 (network), modern only.
const VENDOR: u16 = 0x1af4;
const DEVICE: u16 = 0x1041;
/// `struct virtio_net_hdr_v1`: what precedes every frame in a buffer.
pub const HDR_LEN: usize = 12;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;

/// What the card did, for the run summary (not state: the guest cannot
/// see these).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Received frames larger than the guest's buffer, dropped.
    pub rx_oversize: u64,
    /// Received frames that found no buffer (replay of a damaged log only:
    /// live, frames wait for a buffer).
    pub rx_no_buffer: u64,
    /// Transmit chains the card could not read or that were too long.
    pub tx_errors: u64,
}

/// The card's state as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetState {
    pub config: Vec<u8>,
    pub transport: TransportState,
}

pub struct VirtioNet {
    config: ConfigSpace,
    t: Transport,
    mac: [u8; 6],
    mem: GuestMemoryMmap,
    irq: Box<dyn IrqLine>,
    sink: Box<dyn FrameSink>,
    /// (length, digest) of each frame sent at the exit being handled.
    sent: Vec<(u32, u64)>,
    /// Guest pages this card wrote (see [`WrittenPages`]).
    written: WrittenPages,
    pub counters: NetCounters,
}

/// Guest pages the card wrote through ftvm's own mapping of guest memory
/// (received frames, used rings), which KVM's dirty log never sees. While
/// the recorder tracks dirty pages it turns this on and merges what it
/// drains into every call of the dirty log, so that a state transfer's
/// pre-copy (`ft/xfer.rs`) captures those pages again and resyncs log
/// them. Off (`None`): nothing is noted (no recorder tracking, replay).
/// Bounded by guest memory's page count, and drained at each dirty-log
/// call (resyncs, idle clears, snapshots).
#[derive(Default)]
struct WrittenPages(Option<BTreeSet<u64>>);

impl WrittenPages {
    const PAGE: u64 = 4096;

    /// Notes the pages of `[addr, addr + len)`.
    fn note(&mut self, addr: u64, len: u64) {
        let Some(set) = &mut self.0 else { return };
        if len == 0 {
            return;
        }
        let first = addr & !(Self::PAGE - 1);
        let last = addr.saturating_add(len - 1) & !(Self::PAGE - 1);
        set.extend((first..=last).step_by(Self::PAGE as usize));
    }

    /// Notes the used ring of `q` (its index and elements: `add_used`
    /// writes one element and the index).
    fn note_used(&mut self, q: &virtio_queue::Queue) {
        self.note(q.used_ring(), 4 + 8 * u64::from(q.size()) + 2);
    }

    fn is_on(&self) -> bool {
        self.0.is_some()
    }
}

impl VirtioNet {
    pub fn new(mac: [u8; 6], bar_addr: u32, irq_line: u8, mem: GuestMemoryMmap, irq: Box<dyn IrqLine>, sink: Box<dyn FrameSink>) -> Self {
        let mut config = ConfigSpace::new(VENDOR, DEVICE, 0x02_00_00, 1);
        config.set_subsystem(VENDOR, 1);
        config.set_interrupt(irq_line);
        config.set_bar(0, Bar { addr: bar_addr, size: transport::BAR_SIZE });
        transport::add_capabilities(&mut config, 2 * transport::NOTIFY_MULTIPLIER);
        let t = Transport::new(1 << VIRTIO_NET_F_MAC, &[QUEUE_SIZE, QUEUE_SIZE]);
        VirtioNet { config, t, mac, mem, irq, sink, sent: Vec::new(), written: WrittenPages::default(), counters: NetCounters::default() }
    }

    /// Starts (or stops) noting the guest pages the card writes: the
    /// recorder turns this on with KVM's dirty log, which does not see
    /// them (see [`WrittenPages`]).
    pub fn track_writes(&mut self, on: bool) {
        match (on, self.written.is_on()) {
            (true, false) => self.written.0 = Some(BTreeSet::new()),
            (false, true) => self.written.0 = None,
            _ => {}
        }
    }

    /// The guest pages (page-aligned addresses, ascending) the card wrote
    /// since the last call; empty when not tracking.
    pub fn take_written(&mut self) -> Vec<u64> {
        self.written.0.as_mut().map_or_else(Vec::new, |s| std::mem::take(s).into_iter().collect())
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Replaces where transmitted frames go (a backup going live).
    pub fn set_sink(&mut self, sink: Box<dyn FrameSink>) {
        self.sink = sink;
    }

    /// Whether a received frame can be handed to the guest now: the
    /// driver is up and has posted a buffer. Decided from guest memory at
    /// an exit, so the same in replay.
    pub fn can_receive(&self) -> bool {
        self.rx_buffers() > 0
    }

    /// How many receive buffers the driver has posted that the card has
    /// not used: an upper bound on the frames to hand over at this exit.
    pub fn rx_buffers(&self) -> u16 {
        let q = &self.t.queues[RX_QUEUE];
        if !self.t.driver_ok() || !q.ready() {
            return 0;
        }
        q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire).map_or(0, |idx| idx.0.wrapping_sub(q.next_avail()))
    }

    /// Hands one received frame to the guest (the `NetRx` input).
    pub fn receive(&mut self, frame: &[u8]) {
        if !self.can_receive() {
            self.counters.rx_no_buffer += 1;
            return;
        }
        let q = &mut self.t.queues[RX_QUEUE];
        let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
            self.counters.rx_no_buffer += 1;
            return;
        };
        let head = chain.head_index();
        // Where the frame will go, in order, for the written pages (only
        // while tracking: it walks the chain a second time).
        let bufs: Vec<(u64, u64)> =
            if self.written.is_on() { chain.clone().writable().map(|d| (d.addr().0, u64::from(d.len()))).collect() } else { Vec::new() };
        let mut w = match chain.writer(&self.mem) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("virtio-net: unusable receive buffer: {e}");
                self.counters.rx_no_buffer += 1;
                let _ = q.add_used(&self.mem, head, 0);
                self.written.note_used(q);
                return self.notify_used(RX_QUEUE);
            }
        };
        if w.available_bytes() < HDR_LEN + frame.len() {
            // Too big for the guest's buffer: dropped; the buffer stays
            // the guest's for the next frame.
            q.go_to_previous_position();
            self.counters.rx_oversize += 1;
            log::debug!("virtio-net: dropped a {}-byte frame (buffer {} bytes)", frame.len(), w.available_bytes());
            return;
        }
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1; // num_buffers
        let ok = w.write_all(&hdr).and_then(|_| w.write_all(frame)).is_ok();
        // The bytes written (all of them even if a write failed half way:
        // a superset is harmless), buffer by buffer.
        let mut left = (HDR_LEN + frame.len()) as u64;
        for (addr, len) in bufs {
            if left == 0 {
                break;
            }
            let n = len.min(left);
            self.written.note(addr, n);
            left -= n;
        }
        let _ = q.add_used(&self.mem, head, if ok { (HDR_LEN + frame.len()) as u32 } else { 0 });
        self.written.note_used(q);
        self.counters.rx_frames += 1;
        self.notify_used(RX_QUEUE);
    }

    /// Everything the guest queued for transmission.
    fn transmit(&mut self) {
        let q = &mut self.t.queues[TX_QUEUE];
        if !q.ready() {
            return;
        }
        let mut any = false;
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            any = true;
            let head = chain.head_index();
            let frame = chain.reader(&self.mem).map_err(|e| e.to_string()).and_then(|mut r| {
                let n = r.available_bytes();
                if !(HDR_LEN..=HDR_LEN + MAX_TX_FRAME).contains(&n) {
                    return Err(format!("a {n}-byte transmit chain"));
                }
                let mut b = vec![0; n];
                r.read_exact(&mut b).map_err(|e| e.to_string())?;
                Ok(b.split_off(HDR_LEN))
            });
            let _ = q.add_used(&self.mem, head, 0);
            self.written.note_used(q);
            match frame {
                Ok(f) => {
                    self.counters.tx_frames += 1;
                    self.sent.push((f.len() as u32, frame_digest(&f)));
                    self.sink.transmit(&f);
                }
                Err(e) => {
                    self.counters.tx_errors += 1;
                    log::warn!("virtio-net: dropped a transmit: {e}");
                }
            }
        }
        if any {
            self.notify_used(TX_QUEUE);
        }
    }

    fn notify_used(&mut self, queue: usize) {
        if self.t.queues[queue].needs_notification(&self.mem).unwrap_or(true) {
            self.t.s.isr |= 1;
            self.irq.set_level(true);
        }
    }

    /// The frames sent since the last call, as (length, digest).
    pub fn take_sent(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.sent)
    }

    /// Gives back frames taken but not accounted for (a replay whose log
    /// ended at this exit: whoever continues the log logs them).
    pub fn put_back_sent(&mut self, mut frames: Vec<(u32, u64)>) {
        frames.append(&mut self.sent);
        self.sent = frames;
    }

    pub fn state(&self) -> NetState {
        NetState { config: self.config.state(), transport: self.t.state() }
    }

    /// The interrupt line's level is the PIC's state, restored with it.
    pub fn restore(&mut self, s: &NetState) -> Result<(), DeviceError> {
        let mut config = self.config.clone();
        config.restore(&s.config)?;
        self.t.restore(&s.transport)?;
        self.config = config;
        self.sent.clear();
        Ok(())
    }
}

/// The longest frame the guest may transmit (no offloads are offered, so
/// a frame is at most the MTU plus the Ethernet header; a little slack).
const MAX_TX_FRAME: usize = MAX_FRAME;

impl PciFunction for VirtioNet {
    fn config_read(&mut self, reg: usize, data: &mut [u8]) {
        self.config.read(reg, data)
    }
    fn config_write(&mut self, reg: usize, data: &[u8]) {
        self.config.write(reg, data)
    }
}

/// BAR 0.
impl BusDevice for VirtioNet {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < transport::COMMON_LEN => self.t.read_common(o, data),
            transport::ISR_OFF => {
                data[0] = self.t.s.isr;
                self.t.s.isr = 0;
                self.irq.set_level(false);
            }
            o if (transport::DEVICE_OFF..transport::DEVICE_OFF + transport::DEVICE_LEN).contains(&o) => {
                let o = (o - transport::DEVICE_OFF) as usize;
                for (i, d) in data.iter_mut().enumerate() {
                    *d = self.mac.get(o + i).copied().unwrap_or(0);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < transport::COMMON_LEN => {
                self.t.write_common(o, data);
                if self.t.s.status == 0 {
                    self.irq.set_level(false);
                }
            }
            o if o >= transport::NOTIFY_OFF => match self.t.notified_queue(o - transport::NOTIFY_OFF) {
                Some(TX_QUEUE) => self.transmit(),
                // New receive buffers: the VMM looks at this exit's end.
                Some(_) => {}
                None => log::debug!("virtio-net: notification at {o:#x}"),
            },
            _ => {}
        }
    }
}
