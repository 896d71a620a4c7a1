//! The card through the exit loop: a scripted guest (`vcpu::fake`) brings
//! it up over MMIO, sends a frame and takes received ones on interrupt
//! 11; the recording logs each received frame (`NetRx`) and each sent
//! one (`NetTx`), and its replay hands the same frames to the guest at
//! the same exits and checks what the guest sends. No KVM.

use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use replay_log::{Event, LogReader, LogWriter, Record};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::HDR_LEN;
use super::tap::NetInput;
use super::transport::{COMMON_OFF, ISR_OFF, NOTIFY_OFF};
use super::{frame_digest, CountingSink, FrameSink, NET_BAR_ADDR};
use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::console_io::ConsoleInput;
use crate::devices::{OutputSink, StopRequest};
use crate::engine::{run, EngineError, Ending, Guest, Outcome, RunOptions};
use crate::machine::Machine;
use crate::recorder::{LogSink, Recorder};
use crate::replay::Replayer;
use crate::vcpu::fake::{FakeVcpu, Step};

#[derive(Clone, Default)]
pub(super) struct Shared(pub(super) Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl OutputSink for Shared {
    fn emit(&mut self, b: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(b);
    }
}

#[derive(Clone, Default)]
pub(super) struct Sent(pub(super) Arc<Mutex<Vec<Vec<u8>>>>);
impl FrameSink for Sent {
    fn transmit(&mut self, f: &[u8]) {
        self.0.lock().unwrap().push(f.to_vec());
    }
}

const RXQ: u64 = 0x10_000;
const TXQ: u64 = 0x20_000;
const RX_BUFS: u64 = 0x40_000;
const TX_BUF: u64 = 0x80_000;
const BAR: u64 = NET_BAR_ADDR as u64;

/// Guest memory as the driver left it before the run: four receive
/// buffers posted, one frame queued for transmission.
pub(super) fn memory() -> GuestMemoryMmap {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let rx = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
    let bufs: Vec<RawDescriptor> =
        (0..4).map(|i| RawDescriptor::from(Descriptor::new(RX_BUFS + i * 0x1000, 2048, VRING_DESC_F_WRITE as u16, 0))).collect();
    rx.add_desc_chains(&bufs, 0).unwrap();
    let tx = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
    m.write_slice(&[0; HDR_LEN], GuestAddress(TX_BUF)).unwrap();
    m.write_slice(&tx_frame(), GuestAddress(TX_BUF + HDR_LEN as u64)).unwrap();
    tx.add_desc_chains(&[RawDescriptor::from(Descriptor::new(TX_BUF, (HDR_LEN + 60) as u32, 0, 0))], 0).unwrap();
    m
}

pub(super) fn tx_frame() -> Vec<u8> {
    (0..60).map(|i| (i * 3) as u8).collect()
}

fn w(addr: u64, v: u32, n: usize) -> Step {
    Step::MmioWrite(BAR + addr, v.to_le_bytes()[..n].to_vec())
}

/// PIC with IRQ 0 and 11 open, a 1 kHz PIT, the card brought up as
/// Linux does it; then: send, halt, forever. The handler reads the ISR
/// (lowering INTA#) and acknowledges both PICs.
pub(super) fn program(ticks: usize) -> FakeVcpu {
    let c = COMMON_OFF;
    let mut p = vec![
        Step::Out(0x20, vec![0x11]),
        Step::Out(0x21, vec![0x20]),
        Step::Out(0x21, vec![0x04]),
        Step::Out(0x21, vec![0x01]),
        Step::Out(0xa0, vec![0x11]),
        Step::Out(0xa1, vec![0x28]),
        Step::Out(0xa1, vec![0x02]),
        Step::Out(0xa1, vec![0x01]),
        Step::Out(0x21, vec![0xfa]), // IRQ0, cascade
        Step::Out(0xa1, vec![0xf7]), // IRQ11
        Step::Out(0x43, vec![0x34]),
        Step::Out(0x40, vec![0xa9]),
        Step::Out(0x40, vec![0x04]),
        w(c + 0x14, 3, 1),
        w(c + 0x08, 1, 4),
        w(c + 0x0c, 1, 4), // VERSION_1
        w(c + 0x14, 11, 1),
    ];
    let mem = memory();
    for (i, base) in [(0u32, RXQ), (1, TXQ)] {
        let q = MockSplitQueue::create(&mem, GuestAddress(base), 16);
        p.push(w(c + 0x16, i, 2));
        p.push(w(c + 0x18, 16, 2));
        p.push(w(c + 0x20, q.desc_table_addr().0 as u32, 4));
        p.push(w(c + 0x28, q.avail_addr().0 as u32, 4));
        p.push(w(c + 0x30, q.used_addr().0 as u32, 4));
        p.push(w(c + 0x1c, 1, 2));
    }
    p.push(w(c + 0x14, 15, 1)); // DRIVER_OK
    p.push(Step::If(true));
    let loop_from = p.len();
    p.extend([w(NOTIFY_OFF + 4, 1, 2), Step::Hlt]);
    let mut f = FakeVcpu::new(p);
    f.handler = vec![Step::MmioRead(BAR + ISR_OFF, 1), Step::Out(0xa0, vec![0x20]), Step::Out(0x20, vec![0x20])];
    f.loop_from = loop_from;
    f.exit_after = Some((ticks, 7));
    f
}

pub(super) fn machine(clock: VmClock, mem: &GuestMemoryMmap, sink: Box<dyn FrameSink>) -> Machine {
    let mut m = Machine::new(Arc::new(clock), Box::new(Shared::default()), Arc::new(AtomicU64::new(0))).unwrap();
    m.add_net(super::DEFAULT_MAC, mem.clone(), sink).unwrap();
    m
}

pub(super) fn writer(buf: &Shared) -> LogSink {
    let mut cfg = GuestConfig::load(None, None, 1 << 20, "net").unwrap();
    cfg.net_mac = Some(super::DEFAULT_MAC);
    LogWriter::new(Box::new(buf.clone()) as Box<dyn Write + Send>, &cfg.header()).unwrap()
}

pub(super) fn frames() -> Vec<Vec<u8>> {
    vec![vec![0xaa; 60], (0..1514).map(|i| i as u8).collect(), vec![0x55; 3000], vec![0x11; 100]]
}

/// Records 20 interrupts with four frames arriving (one oversize).
pub(super) fn record() -> (Vec<u8>, Vec<Vec<u8>>, GuestMemoryMmap) {
    let mem = memory();
    let sent = Sent::default();
    let m = machine(VmClock::host(), &mem, Box::new(sent.clone()));
    let (tx, rx) = crossbeam_channel::unbounded();
    for f in frames() {
        tx.send(f).unwrap();
    }
    let buf = Shared::default();
    let mut rec = Recorder::new(Some(writer(&buf)), ConsoleInput::none()).with_net(NetInput::from_channel(rx));
    let mut vcpu = program(20);
    let out = run(Guest { vcpu: &mut vcpu, machine: &m, mem: &mem, traps: None }, &mut rec, &RunOptions::default()).unwrap();
    assert_eq!(out.ending, Ending::Guest(StopRequest::Exit(7)));
    assert_eq!(rec.net_dropped(), Some((0, 1)), "the 3000-byte frame never reached the log");
    drop(tx);
    let log = buf.0.lock().unwrap().clone();
    let s = sent.0.lock().unwrap().clone();
    (log, s, mem)
}

pub(super) fn records(log: &[u8]) -> Vec<Record> {
    let mut r = LogReader::new(log, "mem").unwrap();
    std::iter::from_fn(|| r.next_record().unwrap()).collect()
}

pub(super) fn replay(log: &[u8]) -> (Result<Outcome, EngineError>, GuestMemoryMmap, u64) {
    let mem = memory();
    let m = machine(VmClock::replay(), &mem, Box::new(CountingSink::default()));
    let mut rep = Replayer::new(LogReader::new(log, "mem").unwrap().end_is_final());
    let res = run(Guest { vcpu: &mut program(20), machine: &m, mem: &mem, traps: None }, &mut rep, &RunOptions::default());
    (res, mem, rep.frames)
}

fn divergence(log: &[u8]) -> String {
    match replay(log).0 {
        Err(e) => e.to_string(),
        Ok(out) => panic!("replay verified: {:?}", out.ending),
    }
}

pub(super) fn encode(recs: &[Record]) -> Vec<u8> {
    let buf = Shared::default();
    let mut w = writer(&buf);
    for r in recs {
        w.append(r).unwrap();
    }
    w.flush().unwrap();
    let b = buf.0.lock().unwrap().clone();
    b
}

#[test]
fn received_frames_are_logged_and_replayed_and_sent_frames_compared() {
    let (log, sent, mem) = record();
    assert_eq!(sent, vec![tx_frame()], "the guest's frame went out once");
    let recs = records(&log);
    let rx: Vec<&Vec<u8>> = recs.iter().filter_map(|r| match &r.event { Event::NetRx { frame } => Some(frame), _ => None }).collect();
    assert_eq!(rx, [&frames()[0], &frames()[1], &frames()[3]]);
    let tx: Vec<&Record> = recs.iter().filter(|r| matches!(r.event, Event::NetTx { .. })).collect();
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].event, Event::NetTx { len: 60, digest: frame_digest(&tx_frame()) });
    // The frames are in the guest's buffers, after their headers.
    let mut got = vec![0; 1514];
    mem.read_slice(&mut got, GuestAddress(RX_BUFS + 0x1000 + HDR_LEN as u64)).unwrap();
    assert_eq!(got, frames()[1]);

    let (res, rmem, compared) = replay(&log);
    assert_eq!(res.unwrap().ending, Ending::Guest(StopRequest::Exit(7)));
    assert_eq!(compared, 1);
    let mut a = vec![0; 0x4000];
    let mut b = vec![0; 0x4000];
    mem.read_slice(&mut a, GuestAddress(RX_BUFS)).unwrap();
    rmem.read_slice(&mut b, GuestAddress(RX_BUFS)).unwrap();
    assert_eq!(a, b, "replay put the same frames in the same buffers");
}

#[test]
fn a_sent_frame_that_differs_from_the_log_or_is_missing_from_it_is_a_divergence() {
    let (log, _, _) = record();
    let recs = records(&log);
    let i = recs.iter().position(|r| matches!(r.event, Event::NetTx { .. })).unwrap();
    let mut changed = recs.clone();
    changed[i].event = Event::NetTx { len: 60, digest: 1 };
    let err = divergence(&encode(&changed));
    assert!(err.contains("net-tx len=60 digest=0x0000000000000001") && err.contains("transmitted a 60-byte frame"), "{err}");
    let mut missing = recs.clone();
    missing.remove(i);
    let err = divergence(&encode(&missing));
    assert!(err.contains("no (more) frames transmitted here"), "{err}");
    // Other bytes received: the guest's memory differs at the end.
    let j = recs.iter().position(|r| matches!(r.event, Event::NetRx { .. })).unwrap();
    let mut other = recs.clone();
    other[j].event = Event::NetRx { frame: vec![0xbb; 60] };
    let err = divergence(&encode(&other));
    assert!(err.contains("memory digest"), "{err}");
}
