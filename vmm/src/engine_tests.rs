//! The exit loop, recording, replay and failover, run against a scripted
//! fake vCPU (`vcpu::fake`) and logs held in memory: no `/dev/kvm`.

use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use replay_log::{Event, LogReader, LogWriter, Record};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::console_io::ConsoleInput;
use crate::devices::{OutputSink, StopRequest};
use crate::engine::{run, EngineError, Ending, Guest, Outcome, RunOptions};
use crate::ft::backup_inputs::{BackupInputs, Takeover};
use crate::ft::gate::{Gate, Role};
use crate::ft::stream::ChannelSource;
use crate::machine::Machine;
use crate::recorder::{LogSink, Recorder};
use crate::replay::Replayer;
use crate::stop::StopHandle;
use crate::vcpu::fake::{FakeVcpu, Step};
use crate::vcpu::Vcpu;

/// Bytes written by a `LogWriter` or the console, kept for the test.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

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
    fn emit(&mut self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

impl Shared {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// A guest that sets up the PIC and a 1 kHz PIT, listens on the serial
/// port, then loops: print a byte, read the PIT counter (a time read), read
/// the serial port, halt. It ends after `ticks` interrupts with status 7.
fn program(ticks: usize) -> FakeVcpu {
    let mut p = vec![
        Step::Out(0x20, vec![0x11]),
        Step::Out(0x21, vec![0x20]),
        Step::Out(0x21, vec![0x04]),
        Step::Out(0x21, vec![0x01]),
        Step::Out(0x21, vec![0xee]), // IRQ0 (timer) and IRQ4 (serial)
        Step::Out(0x43, vec![0x34]),
        Step::Out(0x40, vec![0xa9]),
        Step::Out(0x40, vec![0x04]), // 1193: 1 kHz
        Step::Out(0x3f9, vec![0x01]), // receive interrupt on
        Step::If(true),
    ];
    let loop_from = p.len();
    p.extend([
        Step::Out(0x3f8, b"x".to_vec()),
        Step::Out(0x43, vec![0x00]),
        Step::In(0x40, 1),
        Step::In(0x40, 1),
        Step::In(0x3f8, 1),
        Step::Hlt,
    ]);
    let mut f = FakeVcpu::new(p);
    f.loop_from = loop_from;
    f.exit_after = Some((ticks, 7));
    f
}

struct Rig {
    machine: Machine,
    mem: GuestMemoryMmap,
    console: Shared,
}

fn rig(clock: VmClock) -> Rig {
    let console = Shared::default();
    let machine = Machine::new(Arc::new(clock), Box::new(console.clone()), Arc::new(AtomicU64::new(0))).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    Rig { machine, mem, console }
}

fn go<I: crate::engine::Inputs>(r: &Rig, vcpu: &mut FakeVcpu, inputs: &mut I) -> Result<Outcome, EngineError> {
    let g = Guest { vcpu, machine: &r.machine, mem: &r.mem, traps: None };
    run(g, inputs, &RunOptions::default())
}

fn header() -> replay_log::Header {
    GuestConfig::load(None, None, 1 << 20, "fake").unwrap().header()
}

fn writer(buf: &Shared) -> LogSink {
    LogWriter::new(Box::new(buf.clone()) as Box<dyn Write + Send>, &header()).unwrap()
}

struct Recording {
    log: Vec<u8>,
    console: Vec<u8>,
    injected: Vec<(usize, u8)>,
    read: Vec<u8>,
    exits: u64,
}

/// Records `ticks` timer interrupts, with `typed` typed meanwhile.
fn record(ticks: usize, typed: &[u8]) -> Recording {
    let r = rig(VmClock::host());
    let buf = Shared::default();
    let (tx, rx) = crossbeam_channel::unbounded();
    if !typed.is_empty() {
        tx.send(typed.to_vec()).unwrap();
    }
    drop(tx);
    let mut rec = Recorder::new(Some(writer(&buf)), ConsoleInput::from_channel(rx));
    let mut vcpu = program(ticks);
    let out = go(&r, &mut vcpu, &mut rec).unwrap();
    assert_eq!(out.ending, Ending::Guest(StopRequest::Exit(7)));
    drop(rec);
    Recording { log: buf.bytes(), console: r.console.bytes(), injected: vcpu.injected, read: vcpu.read, exits: out.exits }
}

fn records(log: &[u8]) -> Vec<Record> {
    let mut r = LogReader::new(log, "mem").unwrap();
    let mut v = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        v.push(rec);
    }
    v
}

fn encode(recs: &[Record]) -> Vec<u8> {
    let buf = Shared::default();
    let mut w = writer(&buf);
    for r in recs {
        w.append(r).unwrap();
    }
    w.flush().unwrap();
    buf.bytes()
}

fn replay(log: &[u8], vcpu: &mut FakeVcpu) -> (Result<Outcome, EngineError>, Vec<u8>) {
    let r = rig(VmClock::replay());
    let mut rep = Replayer::new(LogReader::new(log, "mem").unwrap().end_is_final());
    let res = go(&r, vcpu, &mut rep);
    (res, r.console.bytes())
}

#[test]
fn a_recording_replays_verified_with_events_at_their_ordinals() {
    let rec = record(25, b"hi\n");
    let recs = records(&rec.log);
    let count = |k: &str| recs.iter().filter(|r| r.event.kind_name() == k).count();
    assert!(count("interrupt") >= 25, "{recs:?}");
    assert!(count("time") >= 25);
    let typed: usize = recs.iter().map(|r| match &r.event { Event::SerialIn { bytes } => bytes.len(), _ => 0 }).sum();
    assert_eq!(typed, 3, "every typed byte logged once");
    assert_eq!(count("end"), 1);

    let mut vcpu = program(25);
    let (res, console) = replay(&rec.log, &mut vcpu);
    let out = res.unwrap();
    assert_eq!(out.ending, Ending::Guest(StopRequest::Exit(7)));
    assert_eq!(out.exits, rec.exits);
    // Same interrupts after the same steps, same bytes read, same output.
    assert_eq!(vcpu.injected, rec.injected);
    assert_eq!(vcpu.read, rec.read);
    // Each loop reads the PIT's two bytes, then the serial port.
    let serial: Vec<u8> = rec.read.iter().skip(2).step_by(3).copied().collect();
    assert!(serial.starts_with(b"hi\n"), "typed bytes reached the guest: {serial:?}");
    assert_eq!(console, rec.console);
}

#[test]
fn two_recordings_differ_but_each_replays() {
    let a = record(10, b"");
    let b = record(10, b"");
    // Host time differs between runs; the logs say so.
    assert_ne!(records(&a.log), records(&b.log));
    for rec in [a, b] {
        let (res, _) = replay(&rec.log, &mut program(10));
        assert_eq!(res.unwrap().ending, Ending::Guest(StopRequest::Exit(7)));
    }
}

fn divergence(res: Result<Outcome, EngineError>) -> String {
    match res {
        Err(e @ EngineError::Diverged { .. }) => e.to_string(),
        Err(e) => panic!("expected a divergence, got {e}"),
        Ok(o) => panic!("expected a divergence, got {:?}", o.ending),
    }
}

#[test]
fn a_different_exit_kind_is_a_divergence_naming_both() {
    let rec = record(10, b"");
    // The guest writes the PIT's reload to another port: the log has the
    // time read at `out 0x40` there.
    let mut vcpu = program(10);
    let mut p: Vec<Step> = (0..16).map(vcpu_step).collect();
    p[7] = Step::Out(0x80, vec![0x04]);
    let mut other = FakeVcpu::new(p);
    other.loop_from = vcpu.loop_from;
    other.exit_after = vcpu.exit_after;
    vcpu = other;
    let e = divergence(replay(&rec.log, &mut vcpu).0);
    assert!(e.contains("0x40") && e.contains("0x80") && e.contains("exit #8"), "{e}");
}

/// Step `i` of `program`.
fn vcpu_step(i: usize) -> Step {
    program(1).step(i)
}

#[test]
fn a_wrong_rip_is_a_divergence_naming_both() {
    let rec = record(10, b"");
    let mut recs = records(&rec.log);
    let i = recs.iter().position(|r| matches!(r.event, Event::Interrupt { .. })).unwrap();
    recs[i].pos.rip += 4;
    let want = format!("{:#x}", recs[i].pos.rip);
    let e = divergence(replay(&encode(&recs), &mut program(10)).0);
    assert!(e.contains(&want) && e.contains(&format!("{:#x}", recs[i].pos.rip - 4)), "{e}");
    assert!(e.contains(&format!("exit #{}", recs[i].pos.ordinal)), "{e}");
}

#[test]
fn a_wrong_register_digest_is_a_divergence() {
    let rec = record(10, b"");
    let mut recs = records(&rec.log);
    let i = recs.iter().position(|r| matches!(r.event, Event::End { .. })).unwrap();
    if let Event::End { regs_digest, .. } = &mut recs[i].event {
        *regs_digest ^= 1;
    }
    let e = divergence(replay(&encode(&recs), &mut program(10)).0);
    assert!(e.contains("register digest"), "{e}");
}

#[test]
fn an_interrupt_missing_from_the_log_is_a_divergence() {
    let rec = record(10, b"");
    let mut recs = records(&rec.log);
    let i = recs.iter().position(|r| matches!(r.event, Event::Interrupt { .. })).unwrap();
    recs.remove(i);
    let e = divergence(replay(&encode(&recs), &mut program(10)).0);
    assert!(e.contains("injected vector 0x20"), "{e}");
}

#[test]
fn a_truncated_log_ends_as_incomplete_after_replaying_what_it_has() {
    let rec = record(20, b"");
    let recs = records(&rec.log);
    let cut = recs.len() / 2;
    let (res, console) = replay(&encode(&recs[..cut]), &mut program(20));
    match res.unwrap().ending {
        Ending::LogIncomplete(w) => assert!(w.contains("without an end record"), "{w}"),
        other => panic!("{other:?}"),
    }
    assert!(rec.console.starts_with(&console) && !console.is_empty());
    // Cut inside a record: incomplete too, never "verified".
    let bytes = encode(&recs);
    let (res, _) = replay(&bytes[..bytes.len() - 3], &mut program(20));
    assert!(matches!(res.unwrap().ending, Ending::LogIncomplete(_)));
}

#[test]
fn data_after_the_end_record_fails_replay() {
    let rec = record(5, b"");
    let mut bytes = rec.log.clone();
    bytes.push(0);
    let err = replay(&bytes, &mut program(5)).0.err().expect("refused");
    assert!(err.to_string().contains("data after the end record"), "{err}");
}

/// The backup's inputs: replay the first part of a recording from a
/// channel, then, with the stream closed after a promotion, go live at the
/// exact end and finish the run logging from there.
#[test]
fn failover_goes_live_at_the_end_of_the_log() {
    let rec = record(30, b"");
    let recs = records(&rec.log);
    let cut = recs.len() / 2;
    let last_replayed = recs[cut - 1].pos.ordinal;

    let r = rig(VmClock::replay());
    let (tx, rx) = crossbeam_channel::unbounded();
    for x in &recs[..cut] {
        tx.send(x.clone()).unwrap();
    }
    drop(tx);
    let live_log = Shared::default();
    let gate = Gate::new(Role::Primary { need_ack: false });
    let went_live = Arc::new(Mutex::new(None));
    let wl = went_live.clone();
    let kit = Takeover {
        log: writer(&live_log),
        input: ConsoleInput::none(),
        marked: Arc::new(AtomicU64::new(0)),
        gate,
        // Not the sink's buffer: marks noted here are never consumed.
        buf: crate::ft::log_buf::LogBuf::new(),
        transfers: crate::ft::xfer::Transfers::new(header()),
        on_live: Box::new(move |ord| *wl.lock().unwrap() = Some(ord)),
    };
    let stop = StopHandle::new();
    let slot = Arc::new(Mutex::new(Some(kit)));
    let mut inputs = BackupInputs::new(Replayer::new(ChannelSource::new(rx, stop.clone())), slot, stop);
    let mut vcpu = program(30);
    let out = go(&r, &mut vcpu, &mut inputs).unwrap();
    assert!(inputs.is_live());
    assert_eq!(out.ending, Ending::Guest(StopRequest::Exit(7)));
    let live_at = went_live.lock().unwrap().expect("went live");
    assert!(live_at >= last_replayed, "live at #{live_at}, log through #{last_replayed}");
    // Everything before the switch happened exactly as recorded.
    let same = rec.injected.iter().zip(&vcpu.injected).take_while(|(a, b)| a == b).count();
    let recorded_before: usize = recs[..cut].iter().filter(|r| matches!(r.event, Event::Interrupt { .. })).count();
    assert!(same >= recorded_before, "{same} < {recorded_before}");
    // The live part logs on from there, at later ordinals only.
    drop(inputs);
    let tail = records(&live_log.bytes());
    assert!(!tail.is_empty() && tail.iter().all(|x| x.pos.ordinal >= live_at), "{tail:?}");
    assert!(tail.iter().any(|x| matches!(x.event, Event::End { .. })), "{tail:?}");
}

/// A backup whose stream closes without a promotion, because its VMM is
/// stopping, ends with that stop, not with an error.
#[test]
fn a_stopped_backup_ends_with_its_reason() {
    let rec = record(5, b"");
    let recs = records(&rec.log);
    let r = rig(VmClock::replay());
    let (tx, rx) = crossbeam_channel::unbounded();
    for x in &recs[..recs.len() / 2] {
        tx.send(x.clone()).unwrap();
    }
    let stop = StopHandle::new();
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        s2.stop(Ending::Stopped { why: "dropped".into(), code: 1 });
        drop(tx);
    });
    let mut inputs = BackupInputs::new(Replayer::new(ChannelSource::new(rx, stop.clone())), Arc::new(Mutex::new(None)), stop);
    let out = go(&r, &mut program(5), &mut inputs).unwrap();
    t.join().unwrap();
    assert_eq!(out.ending, Ending::Stopped { why: "dropped".into(), code: 1 });
}

/// Group commit through the real recorder: a burst of output marks far
/// fewer high-water points than it writes bytes, and every byte is still
/// released only after its ordinal is acknowledged.
#[test]
fn group_commit_marks_a_burst_once_per_acknowledgement() {
    let r = rig(VmClock::host());
    let gate = Gate::new(Role::Primary { need_ack: true });
    gate.set_lease(crate::ft::lease_clock::BootInstant::now() + Duration::from_secs(60));
    let buf = Shared::default();
    let marked = Arc::new(AtomicU64::new(0));
    let mut rec = Recorder::new(Some(writer(&buf)), ConsoleInput::none()).with_marks(marked.clone(), gate.clone());
    // A backup that acknowledges each mark 200 µs after it is made.
    let acker = Acker::start(&gate, &marked, Duration::from_micros(200));
    // The sink of the rig is not the gate; feed output through the gate by
    // hand at each exit instead: every exit prints one byte.
    let mut p = vec![Step::Out(0x21, vec![0xff])];
    p.extend(std::iter::repeat_n(Step::Out(0x80, vec![1]), 4));
    let mut vcpu = FakeVcpu::new(p);
    vcpu.loop_from = 1;
    vcpu.max_exits = 20_000;
    // About as fast as a PIO exit on a real host.
    vcpu.exit_cost = Duration::from_micros(10);
    // Run in slices so the test can emit output tagged with the ordinal.
    let machine = &r.machine;
    let emitter = GateEmitter { gate: gate.clone(), machine_ordinal: machine.ordinal.clone() };
    let mut inputs = EmitEachExit { inner: &mut rec, emitter };
    let g = Guest { vcpu: &mut vcpu, machine, mem: &r.mem, traps: None };
    let err = run(g, &mut inputs, &RunOptions::default()).err().expect("stops at max_exits");
    assert!(err.to_string().contains("max_exits"), "{err}");
    acker.stop();
    drop(rec);
    let marks = records(&buf.bytes()).iter().filter(|x| matches!(x.event, Event::Progress { .. })).count();
    // 20,000 exits of 10 µs, acknowledgements 200 µs after each mark:
    // one mark per round trip, a few hundred in all.
    assert!(marks > 50, "{marks} marks");
    assert!(marks < 20_000 / 4, "{marks} marks for 20000 output exits: no batching");
    // One byte per exit, plus one at boot.
    assert_eq!(gate.emitted(), 20_001);
}

/// A backup stand-in: acknowledges the last mark `delay` after seeing it,
/// over and over, until stopped.
struct Acker {
    done: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Acker {
    fn start(gate: &Arc<Gate>, marked: &Arc<AtomicU64>, delay: Duration) -> Acker {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (gate, marked, d) = (gate.clone(), marked.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(std::sync::atomic::Ordering::Relaxed) {
                let m = marked.load(std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(delay);
                gate.ack(m);
            }
        });
        Acker { done, thread }
    }

    fn stop(self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// Emits one output byte per exit through the gate, tagged with the exit's
/// ordinal, like `GateSink` does for the UART.
struct GateEmitter {
    gate: Arc<Gate>,
    machine_ordinal: Arc<AtomicU64>,
}

struct EmitEachExit<'a> {
    inner: &'a mut Recorder,
    emitter: GateEmitter,
}

impl crate::engine::Inputs for EmitEachExit<'_> {
    fn before_access(&mut self, m: &Machine, o: u64, e: replay_log::ExitKind) -> Result<Option<Event>, EngineError> {
        self.inner.before_access(m, o, e)
    }
    fn arrivals(&mut self, m: &Machine, at: &mut crate::engine::ExitPoint, idle: bool, out: &mut Vec<Event>) -> Result<crate::engine::Flow, EngineError> {
        self.emitter.gate.emit(self.emitter.machine_ordinal.load(std::sync::atomic::Ordering::Relaxed), b"y");
        self.inner.arrivals(m, at, idle, out)
    }
    fn observe(&mut self, m: &Machine, at: &mut crate::engine::ExitPoint, what: crate::engine::Observed) -> Result<crate::engine::Flow, EngineError> {
        self.inner.observe(m, at, what)
    }
    fn kicked(&mut self, m: &Machine) -> Result<bool, EngineError> {
        self.inner.kicked(m)
    }
    fn summary(&self) -> String {
        self.inner.summary()
    }
}

/// Output produced while a mark is in flight, after which the guest only
/// computes (every `run` ends in a kick, never an exit): the kick marks it,
/// so it is released once acknowledged instead of being held forever.
#[test]
fn output_is_not_held_behind_a_guest_that_stops_exiting() {
    let r = rig(VmClock::host());
    let gate = Gate::new(Role::Primary { need_ack: true });
    gate.set_lease(crate::ft::lease_clock::BootInstant::now() + Duration::from_secs(60));
    let marked = Arc::new(AtomicU64::new(0));
    let stop = StopHandle::new();
    let mut rec = Recorder::new(Some(writer(&Shared::default())), ConsoleInput::none())
        .with_marks(marked.clone(), gate.clone())
        .with_kicks(stop.clone(), r.machine.clock.clone());
    let acker = Acker::start(&gate, &marked, Duration::from_millis(2));
    let mut vcpu = FakeVcpu::new(vec![Step::Out(0x21, vec![0xff]), Step::Out(0x80, vec![1]), Step::Out(0x80, vec![1]), Step::Spin]);
    vcpu.loop_from = 3;
    // Exits back to back: the second output comes while the first mark is
    // still in flight, and then the guest only computes.
    vcpu.max_exits = 400;
    let emitter = GateEmitter { gate: gate.clone(), machine_ordinal: r.machine.ordinal.clone() };
    let mut inputs = EmitEachExit { inner: &mut rec, emitter };
    let g = Guest { vcpu: &mut vcpu, machine: &r.machine, mem: &r.mem, traps: None };
    let err = run(g, &mut inputs, &RunOptions { stop, ..Default::default() }).err().expect("stops at max_exits");
    assert!(err.to_string().contains("max_exits"), "{err}");
    // Give the last acknowledgement time to arrive.
    std::thread::sleep(Duration::from_millis(20));
    acker.stop();
    assert_eq!(gate.released_len(), gate.emitted(), "output held behind a guest that computes");
}

#[test]
fn a_stop_request_ends_the_run_with_its_reason() {
    let r = rig(VmClock::host());
    let mut vcpu = FakeVcpu::new(vec![Step::Out(0x80, vec![0])]);
    vcpu.max_exits = u64::MAX;
    let stop = StopHandle::new();
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        s2.stop(Ending::Stopped { why: "fenced".into(), code: 75 });
    });
    let mut rec = Recorder::new(None, ConsoleInput::none());
    let g = Guest { vcpu: &mut vcpu, machine: &r.machine, mem: &r.mem, traps: None };
    let out = run(g, &mut rec, &RunOptions { stop, ..Default::default() }).unwrap();
    t.join().unwrap();
    assert_eq!(out.ending.describe(), ("fenced".to_string(), 75));
}

#[test]
fn cli_halt_powers_off_and_a_halt_with_nothing_armed_is_stuck() {
    let r = rig(VmClock::host());
    let mut vcpu = FakeVcpu::new(vec![Step::HaltForever]);
    let mut rec = Recorder::new(None, ConsoleInput::none());
    let out = go(&r, &mut vcpu, &mut rec).unwrap();
    assert_eq!(out.ending, Ending::Guest(StopRequest::Halt));

    let r = rig(VmClock::host());
    let mut vcpu = FakeVcpu::new(vec![Step::If(true), Step::Hlt]);
    let mut rec = Recorder::new(None, ConsoleInput::none());
    let err = go(&r, &mut vcpu, &mut rec).err().expect("stuck");
    assert!(matches!(err, EngineError::Stuck { .. }), "{err}");
}

/// A guest that computes without ever exiting: each kick where the timer
/// is due becomes a resync position (state + pages logged), the interrupt
/// is injected there, and replay applies the logged state instead of
/// running the guest to that point.
#[test]
fn a_guest_that_never_exits_gets_its_timer_through_resyncs() {
    fn spinner() -> FakeVcpu {
        let mut f = program(8);
        let init: Vec<Step> = (0..10).map(|i| f.step(i)).collect();
        let mut p = init.clone();
        p.push(Step::Spin);
        let mut g = FakeVcpu::new(p);
        g.loop_from = init.len();
        g.exit_after = f.exit_after.take();
        g.exit_cost = Duration::from_micros(50);
        g
    }
    let r = rig(VmClock::host());
    let buf = Shared::default();
    let mut rec = Recorder::new(Some(writer(&buf)), ConsoleInput::none());
    let mut vcpu = spinner();
    let out = go(&r, &mut vcpu, &mut rec).unwrap();
    assert_eq!(out.ending, Ending::Guest(StopRequest::Exit(7)));
    assert!(out.stats.resyncs >= 8, "{} resyncs", out.stats.resyncs);
    drop(rec);
    let log = buf.bytes();
    let recs = records(&log);
    let states = recs.iter().filter(|x| matches!(x.event, Event::VcpuState { .. })).count();
    let pages = recs.iter().filter(|x| matches!(x.event, Event::Pages { .. })).count();
    assert_eq!(states as u64, out.stats.resyncs);
    assert!(pages > 0);
    assert!(recs.iter().filter(|x| x.pos.exit == replay_log::ExitKind::Resync).all(|x| !matches!(x.event, Event::Check { .. }) || x.pos.ordinal % 256 == 0));

    let mut again = spinner();
    let (res, _) = replay(&log, &mut again);
    let o2 = res.unwrap();
    assert_eq!(o2.ending, Ending::Guest(StopRequest::Exit(7)));
    assert_eq!(o2.stats.resyncs, out.stats.resyncs);
    assert_eq!(again.injected.len(), vcpu.injected.len());
    // Replay never ran the spins: it applied their end states.
    assert_eq!(again.regs().unwrap().rdx, vcpu.regs().unwrap().rdx);

    // A damaged state record is a clear error, not a crash.
    let mut bad = recs.clone();
    let i = bad.iter().position(|x| matches!(x.event, Event::VcpuState { .. })).unwrap();
    bad[i].event = Event::VcpuState { state: vec![9, 9, 9] };
    let e = divergence(replay(&encode(&bad), &mut spinner()).0);
    assert!(e.contains("vCPU state"), "{e}");
}

/// Snapshots through the real exit loop, on the fake vCPU: a replay takes
/// a snapshot at exit N and goes on (verified); a fresh VMM restored from
/// it and fed the log after N runs to the same end, with the same console
/// output from there and the same interrupts.
#[test]
fn a_snapshot_resumes_replay_where_it_was_taken() {
    use crate::snapshot::{Snapshot, SnapshotAt};
    let rec = record(30, b"hi\n");
    let recs = records(&rec.log);
    let injected_at = |o: u64| recs.iter().any(|r| r.pos.ordinal == o && matches!(r.event, Event::Interrupt { .. }));
    // Exits where the fake's state is all in its registers: a program
    // step (not the interrupt handler) with no interrupt injected there.
    let candidates: Vec<u64> = recs
        .iter()
        .filter(|r| matches!(r.event, Event::Time { .. }) && r.pos.rip < 0x8000 && !injected_at(r.pos.ordinal))
        .map(|r| r.pos.ordinal)
        .collect();
    assert!(candidates.len() > 10, "{candidates:?}");
    for &n in [candidates[1], candidates[candidates.len() / 2], candidates[candidates.len() - 2]].iter() {
        let r = rig(VmClock::replay());
        let mut rep = Replayer::new(LogReader::new(&rec.log[..], "mem").unwrap().end_is_final());
        let mut snap = None;
        let mut inputs = SnapshotAt::new(&mut rep, n, header(), |s| {
            snap = Some(s);
            Ok(())
        });
        let out = go(&r, &mut program(30), &mut inputs).unwrap();
        assert_eq!(inputs.taken.map(|p| p.ordinal), Some(n));
        drop(inputs);
        assert_eq!(out.ending, Ending::Guest(StopRequest::Exit(7)), "the replay taking it goes on, verified");
        let full = r.console.bytes();
        assert_eq!(full, rec.console);
        let snap = snap.unwrap();
        assert_eq!(snap.position.ordinal, n);
        // Through the file format and back.
        let mut file = Vec::new();
        snap.write_to(&mut file, "mem").unwrap();
        let snap = Snapshot::read_from(&file[..], "mem", Some(&header())).unwrap();

        let r2 = rig(VmClock::replay());
        let mut vcpu = program(30);
        let before = recs.iter().filter(|x| x.pos.ordinal <= n && matches!(x.event, Event::Interrupt { .. })).count();
        vcpu.injected = rec.injected[..before].to_vec();
        snap.restore(&mut vcpu, &r2.machine, &r2.mem).unwrap();
        let mut rep = Replayer::new(LogReader::new(&rec.log[..], "mem").unwrap().end_is_final()).resume_after(snap.position);
        let g = Guest { vcpu: &mut vcpu, machine: &r2.machine, mem: &r2.mem, traps: None };
        let out2 = crate::engine::run_from(g, &mut rep, &RunOptions::default(), Some(snap.position)).unwrap();
        assert_eq!(out2.ending, Ending::Guest(StopRequest::Exit(7)), "resumed at #{n}");
        assert_eq!(out2.exits, out.exits);
        let skip = snap.console_bytes() as usize;
        assert!(skip > 0 && skip < full.len());
        assert_eq!(r2.console.bytes(), full[skip..], "console after #{n}");
        let vectors = |v: &[(usize, u8)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
        assert_eq!(vectors(&vcpu.injected), vectors(&rec.injected));

        // A log whose records at the snapshot's exit are elsewhere is not
        // the log it was taken from.
        let mut wrong = snap.position;
        wrong.rip += 4;
        let mut vcpu = program(30);
        let r3 = rig(VmClock::replay());
        snap.restore(&mut vcpu, &r3.machine, &r3.mem).unwrap();
        let mut rep = Replayer::new(LogReader::new(&rec.log[..], "mem").unwrap()).resume_after(wrong);
        let g = Guest { vcpu: &mut vcpu, machine: &r3.machine, mem: &r3.mem, traps: None };
        let e = divergence(crate::engine::run_from(g, &mut rep, &RunOptions::default(), Some(wrong)));
        assert!(e.contains("resumes from a snapshot taken at") && e.contains(&format!("exit #{n}")), "{e}");
    }
    // A log that ends before the snapshot's exit is refused too.
    let short: Vec<Record> = recs.iter().filter(|x| x.pos.ordinal < 40).cloned().collect();
    let pos = replay_log::Position { ordinal: 200, rip: 0x1000, exit: replay_log::ExitKind::Hlt };
    let r = rig(VmClock::replay());
    let bytes = encode(&short);
    let mut rep = Replayer::new(LogReader::new(&bytes[..], "mem").unwrap()).resume_after(pos);
    let g = Guest { vcpu: &mut program(30), machine: &r.machine, mem: &r.mem, traps: None };
    let e = divergence(crate::engine::run_from(g, &mut rep, &RunOptions::default(), Some(pos)));
    let last = short.last().unwrap().pos.ordinal;
    assert!(e.contains(&format!("last record at exit #{last}")) && e.contains("exit #200"), "{e}");
}
