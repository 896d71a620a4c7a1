//! The FT backup: receives the primary's log, replays it in lockstep,
//! acknowledges it, and when the primary is gone asks the witness to be
//! promoted and goes live at the exact end of the log.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use replay_log::{LogError, LogReader, LogWriter};

use super::backup_inputs::{BackupInputs, Takeover, TakeoverSlot};
use super::gate::{Gate, GateSink, Role};
use super::key::ClusterKey;
use super::listener::{bind, log_buf_writer, serve_listener, wind_down, Incoming, LogStreams, RoleError};
use super::log_buf::LogBuf;
use super::primary::PrimaryDuty;
use super::secure::SecureReader;
use super::stream::{ChannelSource, LogReceiver, StreamEnd, MAX_SNAPSHOT_BYTES};
use super::xfer::Transfers;
use super::witness::{Promotion, View, WitnessClient, WitnessError, PING_INTERVAL};
use super::{write_line, SILENCE};
use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::console_io::ConsoleInput;
use crate::engine::{self, Ending, Inputs, RunOptions};
use crate::recorder::LogSink;
use crate::replay::Replayer;
use crate::snapshot::Snapshot;
use crate::stop::StopHandle;
use crate::vm::Vm;

pub struct BackupOpts {
    pub witness: String,
    pub listen: String,
    pub key: ClusterKey,
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    pub progress: bool,
}

/// A log stream must bring its header this soon after the backup's `OK`.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The primary takes the snapshot at its vCPU's next exit and encodes it
/// (a second or so for a few hundred MiB): its first byte comes this soon,
/// and each later read waits no longer than this either.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the `SNAPSHOT <len>` frame that starts a log stream (see
/// `stream.rs`): the VM as the primary had it at one exit.
/// `None` for `BOOT`: the log from boot follows.
fn read_snapshot(reader: &mut SecureReader, name: &str) -> Result<Option<Snapshot>, String> {
    use std::io::Read;
    let _ = reader.tcp().set_read_timeout(Some(SNAPSHOT_TIMEOUT));
    let line = super::read_line(reader).map_err(|e| e.to_string())?.ok_or("the stream ended before the snapshot")?;
    if line == "BOOT" {
        let _ = reader.tcp().set_read_timeout(Some(HEADER_TIMEOUT));
        return Ok(None);
    }
    let len = line
        .strip_prefix("SNAPSHOT ")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n <= MAX_SNAPSHOT_BYTES)
        .ok_or_else(|| format!("{line:?} where `SNAPSHOT <len>` (at most {MAX_SNAPSHOT_BYTES}) belongs"))?;
    let mut body = reader.by_ref().take(len);
    let snap = Snapshot::read_from(&mut body, name, None).map_err(|e| e.to_string())?;
    if body.limit() != 0 {
        return Err(format!("the snapshot is {} bytes shorter than its frame says", body.limit()));
    }
    let _ = reader.tcp().set_read_timeout(Some(HEADER_TIMEOUT));
    Ok(Some(snap))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), RoleError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|err| RoleError::Io { what: format!("starting thread {name}"), err })
}

/// Keeps our place in the view until promoted; a backup the witness drops
/// ends its run (exit code 1).
fn keep_place(mut w: WitnessClient, me: String, my_view: Arc<AtomicU64>, promoted: Arc<AtomicBool>, stop: StopHandle) -> Result<(), RoleError> {
    spawn("ftvm-backup-ping", move || {
        while !promoted.load(Ordering::Relaxed) {
            std::thread::sleep(PING_INTERVAL);
            if promoted.load(Ordering::Relaxed) {
                break;
            }
            match w.backup_ping(&me, my_view.load(Ordering::Relaxed)) {
                Ok(v) => my_view.store(v.number, Ordering::Relaxed),
                // A refusal while the promotion is being granted is not a
                // drop: the witness names us primary.
                Err(WitnessError::Refused { msg, .. })
                    if !promoted.load(Ordering::Relaxed) && w.view().map_or(true, |v| v.primary.as_deref() != Some(me.as_str())) =>
                {
                    let why = format!("backup: the witness dropped this backup: {msg}");
                    log::warn!("{why}");
                    stop.stop(Ending::Stopped { why, code: 1 });
                    return;
                }
                Err(_) => {}
            }
        }
    })
}

/// Runs a backup until its guest ends (replayed, or live after a
/// takeover) or it is stopped; returns (message, exit code).
pub fn run_backup(opts: BackupOpts) -> Result<(String, i32), RoleError> {
    let kernel = crate::config::load_kernel(opts.kernel.as_deref())?;
    let listener = bind(&opts.listen)?;
    let me = opts.listen.clone();
    let mut witness = WitnessClient::new(&opts.witness, &opts.key);
    let view = witness.backup_ping(&me, 0)?;
    let my_view = Arc::new(AtomicU64::new(view.number));
    let promoted = Arc::new(AtomicBool::new(false));
    log::info!("backup: {me} is backup of view {}; waiting for the primary's log", view.number);

    let gate = Gate::new(Role::Silent);
    let (in_tx, in_rx) = crossbeam_channel::unbounded();
    let (log_tx, log_rx) = crossbeam_channel::bounded::<Incoming>(1);
    let taken = Arc::new(AtomicBool::new(false));
    let streams = LogStreams { tx: log_tx, view: my_view.clone(), taken: taken.clone() };
    serve_listener(listener, opts.key.clone(), gate.clone(), in_tx, Some(streams));
    let stop = StopHandle::new();
    keep_place(witness, me.clone(), my_view.clone(), promoted.clone(), stop.clone())?;

    let (reader, write, stream_view, peer, silence, snap) = loop {
        let (reader, mut write, stream_view) = crossbeam_channel::select! {
            recv(log_rx) -> r => r.map_err(|_| RoleError::Stopped("backup: the listener stopped".into()))?,
            recv(stop.wakeup()) -> _ => {
                let (why, code) = stop.requested().map_or(("backup: stopped".into(), 1), |e| e.describe());
                return Ok((why, code));
            }
        };
        let peer = reader.tcp().peer_addr().map_or_else(|_| "primary".into(), |a| a.to_string());
        // A stream that is not a log (or no header in time) is refused,
        // and the backup waits for the next: it is not a reason to die.
        let _ = reader.tcp().set_read_timeout(Some(HEADER_TIMEOUT));
        let silence = reader.tcp().try_clone();
        let name = format!("log stream from {peer}");
        let opened = write_line(&mut write, "OK")
            .map_err(|err| LogError::Io { source_name: name.clone(), offset: 0, err }.to_string())
            .and_then(|()| LogReader::new(reader, &name).map_err(|e| e.to_string()))
            .and_then(|mut r| {
                if r.header().kernel_sha256 != kernel.sha256 {
                    // Not a stream to refuse and forget: the cluster runs another kernel.
                    return Ok((r, None));
                }
                read_snapshot(r.get_mut(), &name).map(|s| (r, Some(s)))
            });
        match (opened, silence) {
            (Ok((reader, snap)), Ok(silence)) => break (reader, write, stream_view, peer, silence, snap),
            (Err(e), _) => log::warn!("backup: refused the log stream from {peer}: {e}"),
            (_, Err(e)) => log::warn!("backup: refused the log stream from {peer}: {e}"),
        }
        taken.store(false, Ordering::SeqCst);
    };
    let stream_name = format!("log stream from {peer}");
    let h = reader.header().clone();
    let Some(snap) = snap.filter(|_| h.kernel_sha256 == kernel.sha256) else {
        return Err(RoleError::WrongKernel { primary: h.kernel_name.clone(), backup: kernel.name.clone() });
    };
    if let Some(snap) = &snap {
        snap.check_guest(&h, &stream_name)?;
    }
    // From here on, silence means the primary may be gone.
    let _ = silence.set_read_timeout(Some(SILENCE));
    match &snap {
        Some(s) => log::info!(
            "backup: received a snapshot at exit #{} from {peer}; receiving the log of view {stream_view} after it, replaying in lockstep",
            s.position.ordinal
        ),
        None => log::info!("backup: receiving the log of view {stream_view} from {peer} from boot; replaying in lockstep"),
    }

    let log = LogBuf::new();
    let own: LogSink = LogWriter::new(log_buf_writer(&log), &h)?;
    let (rec_tx, rec_rx) = crossbeam_channel::unbounded();
    let slot: TakeoverSlot = Arc::new(Mutex::new(None));
    let ordinal = Arc::new(AtomicU64::new(0));
    let marked = Arc::new(AtomicU64::new(0));
    let transfers = Transfers::new(h.clone());
    let backup_transfers = transfers.clone();
    let recv = LogReceiver { reader, ack: write, log: own, buf: log.clone(), to_vcpu: rec_tx, records: 0 };
    let promoter = Promoter {
        witness: WitnessClient::new(&opts.witness, &opts.key),
        key: opts.key.clone(),
        me: me.clone(),
        my_view: my_view.clone(),
        promoted: promoted.clone(),
        gate: gate.clone(),
        log,
        transfers,
        slot: slot.clone(),
        marked,
        input: in_rx,
        stop: stop.clone(),
    };
    spawn("ftvm-log-receiver", move || promoter.run(recv))?;

    let cfg = GuestConfig::for_log(&h, &stream_name, opts.kernel.as_deref(), opts.initrd.as_deref())?;
    let sink = GateSink { gate: gate.clone(), ordinal: ordinal.clone() };
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::replay()), Box::new(sink), ordinal)?;
    backup_transfers.set_mem(vm.mem.clone());
    let at = match snap {
        Some(snap) => {
            snap.restore_vm(&mut vm)?;
            gate.start_at(snap.console_bytes());
            Some(snap.position)
        }
        None => None,
    };
    let source = ChannelSource::new(rec_rx, stop.clone());
    let replayer = match at {
        Some(p) => Replayer::new(source).resume_after(p),
        None => Replayer::new(source),
    };
    let mut inputs = BackupInputs::new(replayer, slot, stop.clone());
    let out = engine::run_from(vm.guest(), &mut inputs, &RunOptions { progress: opts.progress, stop }, at)
        .map_err(|err| RoleError::Engine { what: "backup replay", err })?;
    let (msg, code) = out.ending.describe();
    if matches!(out.ending, Ending::Stopped { .. }) {
        return Ok((msg, code));
    }
    if inputs.is_live() {
        log::info!("primary: {msg}; {}; {}", out.summary(), inputs.summary());
        wind_down(&gate, &msg);
        Ok((msg, code))
    } else {
        log::info!("backup: replayed to the end in lockstep: {msg}; {}", inputs.summary());
        Ok((msg, 0))
    }
}

/// Runs the backup's receive side; when the primary is gone, asks the
/// witness for promotion and hands the VM over to live execution.
struct Promoter {
    witness: WitnessClient,
    key: ClusterKey,
    me: String,
    my_view: Arc<AtomicU64>,
    promoted: Arc<AtomicBool>,
    gate: Arc<Gate>,
    log: Arc<LogBuf>,
    transfers: Arc<Transfers>,
    slot: TakeoverSlot,
    marked: Arc<AtomicU64>,
    input: Receiver<Vec<u8>>,
    stop: StopHandle,
}

impl Promoter {
    fn run(mut self, mut recv: LogReceiver) {
        let mut lost = None;
        loop {
            match recv.pump() {
                StreamEnd::Silent => {}
                StreamEnd::Lost(why) => {
                    if lost.is_none() {
                        log::warn!("backup: lost the primary's log stream ({why}) after {} records", recv.records);
                    }
                    lost = Some(why);
                }
            }
            let view = self.my_view.load(Ordering::Relaxed);
            match self.witness.promote(&self.me, view, lost.is_some()) {
                Ok(Promotion::Granted(v)) => return self.take_over(recv, v),
                Ok(Promotion::Wait) => {
                    if lost.is_some() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Err(WitnessError::Refused { msg, .. }) => {
                    if lost.is_some() {
                        let why = format!("backup: not promoted: {msg}");
                        log::warn!("{why}");
                        // Dropping `recv` closes the record channel; the
                        // replay sees the stop request.
                        self.stop.stop(Ending::Stopped { why, code: 1 });
                        return;
                    }
                }
                Err(e) => {
                    log::warn!("backup: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn take_over(self, recv: LogReceiver, view: View) {
        let t0 = Instant::now();
        self.promoted.store(true, Ordering::Relaxed);
        self.my_view.store(view.number, Ordering::Relaxed);
        log::info!("backup: promoted to primary of view {}; finishing the log, then going live", view.number);
        let LogReceiver { log, to_vcpu, records, .. } = recv;
        let kit = Takeover {
            log,
            buf: self.log.clone(),
            transfers: self.transfers.clone(),
            input: ConsoleInput::from_channel(self.input),
            marked: self.marked.clone(),
            gate: self.gate.clone(),
            on_live: Box::new(move |ord| {
                log::info!("primary: live at exit #{ord} after replaying {records} records");
            }),
        };
        *self.slot.lock().unwrap() = Some(kit);
        PrimaryDuty {
            me: self.me,
            key: self.key,
            witness: self.witness,
            view,
            gate: self.gate,
            log: self.log,
            transfers: self.transfers,
            marked: self.marked,
            sender_stop: None,
            stop: self.stop,
            log_said: Instant::now(),
        }
        .start(t0);
        drop(to_vcpu);
    }
}
