//! A backup with a network card going live (no KVM): its replay of the
//! primary's log ends just before the log says what the guest sent at
//! that exit; the backup logs those frames itself, announces the guest's
//! MAC, and its log continued from there replays verified.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use replay_log::Event;

use super::record_tests::{encode, machine, program, record, records, replay, writer, Sent, Shared};
use super::tap::NetInput;
use crate::clock::VmClock;
use crate::console_io::ConsoleInput;
use crate::devices::StopRequest;
use crate::engine::{run, Ending, Guest, RunOptions};
use crate::ft::backup_inputs::{BackupInputs, Takeover};
use crate::ft::gate::{Gate, GateFrames, Role};
use crate::ft::lease_clock::BootInstant;
use crate::ft::stream::ChannelSource;
use crate::replay::Replayer;
use crate::stop::StopHandle;

#[test]
fn a_backup_going_live_logs_the_frames_the_primary_did_not_and_announces_the_guest() {
    let (log, _, _) = record();
    let recs = records(&log);
    // Cut just before the exit's NetTx: the primary died after the exit's
    // inputs reached the backup, before its frames' records did.
    let cut = recs.iter().position(|r| matches!(r.event, Event::NetTx { .. })).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    for r in &recs[..cut] {
        tx.send(r.clone()).unwrap();
    }
    drop(tx);

    let mem = super::record_tests::memory();
    let m = machine(VmClock::replay(), &mem, Box::new(super::CountingSink::default()));
    // The backup's gate: silent while replaying, primary once promoted.
    let gate = Gate::new(Role::Silent);
    let wire = Sent::default();
    gate.set_frame_out(Box::new(wire.clone()));
    m.net.as_ref().unwrap().lock().unwrap().set_sink(Box::new(GateFrames { gate: gate.clone(), ordinal: m.ordinal.clone() }));
    let live_log = Shared::default();
    let g = gate.clone();
    let went_live = Arc::new(AtomicU64::new(0));
    let wl = went_live.clone();
    let kit = Takeover {
        log: writer(&live_log),
        input: ConsoleInput::none(),
        marked: Arc::new(AtomicU64::new(0)),
        gate: gate.clone(),
        buf: crate::ft::log_buf::LogBuf::new(),
        transfers: crate::ft::xfer::Transfers::new(replay_log::LogReader::new(&log[..], "mem").unwrap().header().clone()),
        on_live: Box::new(move |ord| {
            wl.store(ord, Ordering::SeqCst);
            g.set_role(Role::Primary { need_ack: false });
            g.set_lease(BootInstant::now() + std::time::Duration::from_secs(60));
        }),
    };
    let stop = StopHandle::new();
    let (_frames_tx, frames_rx) = crossbeam_channel::unbounded();
    let mut inputs = BackupInputs::new(Replayer::new(ChannelSource::new(rx, stop.clone())), Arc::new(Mutex::new(Some(kit))), stop)
        .with_net(NetInput::from_channel(frames_rx), "quiet ftvm.ip=169.254.0.2/16".into());
    let out = run(Guest { vcpu: &mut program(20), machine: &m, mem: &mem, traps: None }, &mut inputs, &RunOptions::default()).unwrap();
    assert!(inputs.is_live());
    assert_eq!(out.ending, Ending::Guest(StopRequest::Exit(7)));
    assert_eq!(went_live.load(Ordering::SeqCst), recs[cut].pos.ordinal, "live at the exit whose frames were missing");

    // The frame the replay sent just before going live went out once:
    // no mark said the primary had sent it (it could not have: its log
    // stopped before that exit's frames); then the gratuitous ARP, from
    // the guest's MAC for its address.
    let sent = wire.0.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let Event::NetTx { len, digest } = recs[cut].event else { unreachable!() };
    assert_eq!((sent[0].len() as u32, super::frame_digest(&sent[0])), (len, digest), "the primary's frame, as its log will say");
    assert_eq!(&sent[1][6..12], &super::DEFAULT_MAC);
    assert_eq!(&sent[1][12..14], &[8, 6]);
    assert_eq!(&sent[1][28..32], &[169, 254, 0, 2]);

    // The backup's log continues the primary's: together, one recording
    // that replays verified, the frame logged once, at its exit.
    drop(inputs);
    let tail = records(&live_log.0.lock().unwrap());
    assert_eq!(tail.first().map(|r| &r.event), Some(&recs[cut].event), "the live log starts with the missing NetTx");
    // (Marks are for a stream, not a file.)
    let whole: Vec<_> = recs[..cut].iter().cloned().chain(tail).filter(|r| !matches!(r.event, Event::Progress { .. })).collect();
    let (res, _, compared) = replay(&encode(&whole));
    assert_eq!(res.unwrap().ending, Ending::Guest(StopRequest::Exit(7)));
    assert_eq!(compared, 1);
}
