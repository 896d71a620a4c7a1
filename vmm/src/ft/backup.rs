//! The FT backup: receives the primary's log, replays it in lockstep,
//! acknowledges it, and when the primary is gone asks the witness to be
//! promoted and goes live at the exact end of the log.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use replay_log::{LogError, LogReader, LogWriter};

use super::backup_inputs::{BackupInputs, TakeoverSlot};
use super::gate::{Gate, GateSink, Role, MAX_TAIL};
use super::held_frames::FramesHeld;
use super::key::ClusterKey;
use super::listener::{bind, log_buf_writer, serve_listener, wind_down, Endpoints, Incoming, LogStreams, RoleError, Route};
use super::log_buf::LogBuf;
use super::resume::{parse_from, Resume};
use super::promoter::{keep_place, spawn, standing, Membership, Promoter, Standing};
use super::secure::{SecureReader, SecureWriter};
use super::stream::{ChannelSource, LogReceiver, MAX_SNAPSHOT_BYTES};
use super::xfer::Transfers;
use super::witness::{new_member, View, WitnessAt, WitnessClient, WitnessError, PING_INTERVAL};
use super::{write_line, SILENCE};
use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::engine::{self, Ending, Inputs, RunOptions};
use crate::recorder::LogSink;
use crate::replay::Replayer;
use crate::snapshot::Snapshot;
use crate::vm::Vm;

pub struct BackupOpts {
    pub witness: WitnessAt,
    pub listen: String,
    /// The address the witness names it by, if not `listen`.
    pub advertise: Option<String>,
    pub key: ClusterKey,
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    pub progress: bool,
    /// The network card's tap (`--net`): silent while a backup, the
    /// guest's once it takes over.
    pub net: Option<super::net::FtNet>,
}

/// A log stream must bring its header this soon after the backup's `OK`.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The primary pre-copies memory while the guest runs, takes the snapshot
/// at its vCPU's next exit (it waits up to `stream::SNAPSHOT_WAIT`, 60 s)
/// and encodes it before the first byte: the first byte comes this soon,
/// and each later read waits no longer than this either. A stream that
/// breaks here is refused and the primary streams again.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(150);

/// Reads the `SNAPSHOT <len>` frame that starts a log stream (see
/// `stream.rs`): the VM as the primary had it at one exit.
/// `None` for `BOOT <n>`: the log from boot follows, and output was
/// released through exit `n` (returned second).
fn read_snapshot(reader: &mut SecureReader, name: &str) -> Result<(Option<Received>, Option<u64>), String> {
    use std::io::Read;
    let _ = reader.tcp().set_read_timeout(Some(SNAPSHOT_TIMEOUT));
    let line = super::read_line(reader).map_err(|e| e.to_string())?.ok_or("the stream ended before the snapshot")?;
    if let Some(n) = line.strip_prefix("BOOT ") {
        let n = n.parse::<u64>().map_err(|_| format!("{line:?} where `BOOT <exit>` belongs"))?;
        let _ = reader.tcp().set_read_timeout(Some(HEADER_TIMEOUT));
        return Ok((None, Some(n)));
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
    let line = super::read_line(reader).map_err(|e| e.to_string())?.ok_or("the stream ended before the output tail")?;
    let tail = line
        .strip_prefix("TAIL ")
        .and_then(|r| r.split_once(' '))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|&(seq, n)| n <= MAX_TAIL && seq + n as u64 == snap.console_bytes())
        .ok_or_else(|| format!("{line:?} where `TAIL <seq> <len>` ending at byte {} belongs", snap.console_bytes()))?;
    let mut bytes = vec![0u8; tail.1];
    reader.read_exact(&mut bytes).map_err(|e| format!("reading the output tail: {e}"))?;
    let line = super::read_line(reader).map_err(|e| e.to_string())?.ok_or("the stream ended before the held frames")?;
    let frames = FramesHeld::read_from(&line, reader, crate::net::MAX_FRAME, snap.position.ordinal)?;
    let _ = reader.tcp().set_read_timeout(Some(HEADER_TIMEOUT));
    Ok((Some(Received { snap, tail: (tail.0, bytes), frames }), None))
}

/// A snapshot from the primary, and the console output before it.
struct Received {
    snap: Snapshot,
    tail: (u64, Vec<u8>),
    /// The network frames the primary held then.
    frames: FramesHeld,
}

/// How one membership of the backup ended.
enum Ended {
    /// The process is done: (message, exit code).
    Done(String, i32),
    /// Dropped or refused: join the view again as a new member.
    Rejoin(String),
}

/// Runs a backup until its guest ends (replayed, or live after a
/// takeover) or it is stopped; returns (message, exit code). Dropped from
/// the view (paused too long, cut off) or refused a promotion it cannot
/// have, it joins again as a new member and gets the state anew: a backup
/// re-protects the VM by itself.
pub fn run_backup(opts: BackupOpts) -> Result<(String, i32), RoleError> {
    let kernel = crate::config::load_kernel(opts.kernel.as_deref())?;
    let listener = bind(&opts.listen)?;
    let (idle_tx, _) = crossbeam_channel::bounded(0);
    let route = serve_listener(listener, opts.key.clone(), Endpoints { me: "-".into(), gate: Gate::new(Role::Silent), input: idle_tx, logs: None });
    let mut rejoins = 0u64;
    loop {
        match membership(&opts, &kernel, &route, rejoins == 0)? {
            Ended::Done(msg, code) => return Ok((msg, code)),
            Ended::Rejoin(why) => {
                rejoins += 1;
                log::warn!("backup: joining the view again as a new member (rejoin #{rejoins}) after: {why}");
                std::thread::sleep(PING_INTERVAL);
            }
        }
    }
}

/// How often a backup that cannot join says why it waits.
const SAY_WAITING: Duration = Duration::from_secs(5);

/// Joins the view as `me`, retrying while the witness refuses (a backup
/// slot still held by a silent predecessor, no live primary to join), or,
/// on a rejoin, cannot be reached. A witness that does not take our key,
/// or that cannot be reached at the first join, is an error. (The FT roles
/// install no signal handlers: SIGINT/SIGTERM end them like a crash, which
/// is what the cluster is built to survive.)
fn join(w: &mut WitnessClient, me: &str, first: bool) -> Result<View, RoleError> {
    let mut said: Option<Instant> = None;
    loop {
        let why = match w.backup_ping(me, 0, false, 0) {
            Ok(v) => return Ok(v),
            Err(e @ (WitnessError::Unauthenticated { .. } | WitnessError::Protocol { .. })) => return Err(e.into()),
            Err(e @ WitnessError::Unreachable { .. }) if first => return Err(e.into()),
            Err(e) => e.to_string(),
        };
        if said.is_none_or(|t| t.elapsed() >= SAY_WAITING) {
            log::warn!("backup: {me} cannot join the view yet ({why}); retrying");
            said = Some(Instant::now());
        }
        std::thread::sleep(PING_INTERVAL);
    }
}

/// One membership: join, wait for the primary's stream, replay in
/// lockstep, take over or be dropped.
fn membership(opts: &BackupOpts, kernel: &crate::kernel::KernelImage, route: &Route, first: bool) -> Result<Ended, RoleError> {
    let me = new_member(opts.advertise.as_deref().unwrap_or(&opts.listen));
    let mut witness = WitnessClient::new(&opts.witness, &opts.key);
    // The listener serves this membership before the witness names it,
    // so that a primary's first stream finds it.
    let m = Membership::new(me.clone(), 0);
    let gate = Gate::new(Role::Silent);
    let (in_tx, in_rx) = crossbeam_channel::unbounded();
    let (log_tx, log_rx) = crossbeam_channel::bounded::<Incoming>(1);
    let taken = Arc::new(AtomicBool::new(false));
    let streams = LogStreams { tx: log_tx, view: m.view.clone(), me: me.clone(), taken: taken.clone() };
    *route.lock().unwrap_or_else(|e| e.into_inner()) = Endpoints { me: me.clone(), gate: gate.clone(), input: in_tx, logs: Some(streams) };
    let view = join(&mut witness, &me, first)?;
    m.view.store(view.number, Ordering::SeqCst);
    log::info!("backup: {me} is backup of view {}; waiting for the primary's log", view.number);
    keep_place(witness, m.clone())?;
    let ended = |m: &Membership| {
        m.over.store(true, Ordering::SeqCst);
        match m.rejoin_reason() {
            Some(why) => Ended::Rejoin(why),
            None => {
                let (why, code) = m.stop.requested().map_or(("backup: stopped".into(), 1), |e| e.describe());
                Ended::Done(why, code)
            }
        }
    };
    let Some(Opened { reader, write, stream_view, peer, silence, snap, ready_at, from }) = wait_for_stream(opts, kernel, &m, &log_rx, &taken)? else {
        return Ok(ended(&m));
    };
    let stream_name = format!("log stream from {peer}");
    let h = reader.header().clone();
    if let Some(r) = &snap {
        r.snap.check_guest(&h, &stream_name)?;
    }
    // From here on, silence means the primary may be gone.
    let _ = silence.set_read_timeout(Some(SILENCE));
    match &snap {
        Some(r) => log::info!(
            "backup: received a snapshot at exit #{} from {peer} ({} bytes of output before it); receiving the log of view {stream_view} after it, replaying in lockstep",
            r.snap.position.ordinal,
            r.tail.1.len()
        ),
        None => log::info!("backup: receiving the log of view {stream_view} from {peer} from boot; replaying in lockstep"),
    }

    let log = LogBuf::new();
    let own: LogSink = LogWriter::new(log_buf_writer(&log), &h)?;
    // Bounded: a receiver that runs ahead of the replay blocks, stops
    // acknowledging, and the primary's lag throttle holds its guest; an
    // acknowledged mark is at most this many records from applied.
    let (rec_tx, rec_rx) = crossbeam_channel::bounded(RECORDS_AHEAD);
    let slot: TakeoverSlot = Arc::new(Mutex::new(None));
    let ordinal = m.applied.clone();
    let marked = Arc::new(AtomicU64::new(0));
    let transfers = Transfers::new(h.clone());
    let backup_transfers = transfers.clone();
    let resume = Some(Resume::new(from.1, from.0, reader.offset()));
    let recv = LogReceiver {
        resume,
        reader,
        ack: write,
        log: own,
        buf: log.clone(),
        to_vcpu: rec_tx,
        records: 0,
        ready: m.ready.clone(),
        ready_at: ready_at.unwrap_or(u64::MAX),
        gate: gate.clone(),
        resync: Default::default(),
    };
    let promoter = Promoter {
        witness: WitnessClient::new(&opts.witness, &opts.key),
        key: opts.key.clone(),
        m: m.clone(),
        gate: gate.clone(),
        log,
        transfers,
        slot: slot.clone(),
        marked,
        input: in_rx,
        streams: log_rx.clone(),
        taken: taken.clone(),
    };

    let cfg = GuestConfig::for_log(&h, &stream_name, opts.kernel.as_deref(), opts.initrd.as_deref())?;
    let sink = GateSink { gate: gate.clone(), ordinal: ordinal.clone() };
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::replay()), Box::new(sink), ordinal)?;
    match (&opts.net, cfg.net_mac) {
        (Some(n), Some(_)) => n.protect(&vm.machine, &gate, vm.machine.ordinal.clone()),
        (None, Some(_)) => log::warn!("backup: the guest has a network card but this backup has no --net: after a takeover its frames go nowhere"),
        _ => {}
    }
    backup_transfers.set_mem(vm.mem.clone());
    let at = match snap {
        Some(Received { snap, tail: (seq, bytes), frames }) => {
            snap.restore_vm(&mut vm)?;
            // The output before the snapshot that the primary may not have
            // released yet (and a tail for consoles), numbered as before:
            // released if this backup takes over, deduplicated by number.
            gate.start_at(seq);
            gate.emit(snap.position.ordinal, &bytes);
            // Frames likewise: sent if it takes over before the primary's
            // marks say they went out.
            gate.hold_frames(frames);
            // It holds the state (a VM that failed to restore ends this
            // process above, never counted ready): whatever the primary
            // releases from now on waits for its acknowledgements, which
            // start only now, with the receiver.
            m.ready.store(true, Ordering::SeqCst);
            Some(snap.position)
        }
        None => None,
    };
    spawn("ftvm-log-receiver", move || promoter.run(recv))?;
    let source = ChannelSource::new(rec_rx, m.stop.clone());
    let replayer = match at {
        Some(p) => Replayer::new(source).resume_after(p),
        None => Replayer::new(source),
    };
    let mut inputs = BackupInputs::new(replayer, slot, m.stop.clone());
    if let Some(n) = &opts.net {
        inputs = inputs.with_net(n.input.clone(), cfg.cmdline.clone());
    }
    let out = engine::run_from(vm.guest(), &mut inputs, &RunOptions { progress: opts.progress, stop: m.stop.clone() }, at)
        .map_err(|err| RoleError::Engine { what: "backup replay", err })?;
    let (msg, code) = out.ending.describe();
    if matches!(out.ending, Ending::Stopped { .. }) {
        return Ok(ended(&m));
    }
    let mut w = WitnessClient::new(&opts.witness, &opts.key);
    if inputs.is_live() {
        m.over.store(true, Ordering::SeqCst);
        log::info!("primary: {msg}; {}; {}", out.summary(), inputs.summary());
        wind_down(&gate, &msg, &mut w, &m.me);
        return Ok(Ended::Done(msg, code));
    }
    log::info!("backup: replayed to the end in lockstep: {msg}; {}", inputs.summary());
    stay_for_the_end(&m, &mut w);
    m.over.store(true, Ordering::SeqCst);
    // A promotion in flight is whole by now (the promoter holds this
    // across its check of `over`, the request and the takeover).
    let promoted = {
        let _turn = m.promoting.lock().unwrap_or_else(|e| e.into_inner());
        m.promoted.load(Ordering::SeqCst)
    };
    if promoted {
        // The guest had ended; the primary died before its last output
        // was out. Ours is the same output (replayed): release it.
        log::info!("primary: the guest had ended under the previous primary ({msg}); releasing its last output");
        wind_down(&gate, &msg, &mut w, &m.me);
        return Ok(Ended::Done(msg, code));
    }
    Ok(Ended::Done(msg, 0))
}

/// How long a backup that replayed to the guest's end waits for the
/// primary to say the run ended: the primary's own wind-down gives up on
/// a backup after 3 s and on its last output after 10 s.
const END_WAIT: Duration = Duration::from_secs(15);

/// A backup that replayed to the guest's end stays in the view until the
/// run is said ended (the primary released its last output), so that a
/// primary dying between our acknowledgement of the end and its release
/// is taken over (by the promoter, as any takeover) instead of losing
/// that output. Returns once promoted, once the run ended, once this
/// membership ended, or after `END_WAIT` (twice that while the witness
/// names it primary: a grant whose answer is still on its way).
fn stay_for_the_end(m: &Membership, w: &mut WitnessClient) {
    let t0 = Instant::now();
    while !m.promoted.load(Ordering::SeqCst) && !m.over.load(Ordering::SeqCst) {
        let named_primary = match w.status() {
            Ok(st) if st.ended => return,
            Ok(st) if st.view.primary.as_deref() == Some(m.me.as_str()) => true,
            Ok(st) if st.view.backup.as_deref() != Some(m.me.as_str()) => return,
            _ => false,
        };
        if t0.elapsed() >= END_WAIT && (!named_primary || t0.elapsed() >= 2 * END_WAIT) {
            log::warn!("backup: the primary did not say within {} s that its guest's end is out; stopping", END_WAIT.as_secs());
            return;
        }
        std::thread::sleep(PING_INTERVAL);
    }
}

/// Records the receiver may hold ahead of the replaying vCPU.
const RECORDS_AHEAD: usize = 1024;

/// A log stream that brought its header and its start.
struct Opened {
    reader: LogReader<SecureReader>,
    write: SecureWriter,
    stream_view: u64,
    peer: String,
    silence: std::net::TcpStream,
    snap: Option<Received>,
    /// For a stream from boot: the exit through which the primary had
    /// released output before this backup joined.
    ready_at: Option<u64>,
    /// The primary's offset of the first record, and the primary.
    from: (u64, String),
}

/// Waits for the primary's log stream. While none comes, asks the witness
/// now and then whether it still may: a primary that died before sending
/// the state leaves this backup with nothing to take over (the witness
/// says the VM is lost) and it joins again. `None`: the membership ended.
fn wait_for_stream(
    opts: &BackupOpts,
    kernel: &crate::kernel::KernelImage,
    m: &Membership,
    log_rx: &Receiver<Incoming>,
    taken: &AtomicBool,
) -> Result<Option<Opened>, RoleError> {
    let mut witness = WitnessClient::new(&opts.witness, &opts.key);
    let mut lost_since: Option<Instant> = None;
    loop {
        let (reader, mut write, stream_view) = crossbeam_channel::select! {
            recv(log_rx) -> r => r.map_err(|_| RoleError::Stopped("backup: the listener stopped".into()))?,
            recv(m.stop.wakeup()) -> _ => return Ok(None),
            default(SILENCE) => {
                let now = standing(&mut witness, &m.me);
                if !matches!(now, Some(Standing::Lost(_))) {
                    lost_since = None;
                }
                match now {
                    // Lost for two leases running, not a late renewal.
                    Some(Standing::Lost(_)) if lost_since.get_or_insert_with(Instant::now).elapsed() < 2 * witness.lease() => continue,
                    Some(Standing::Lost(view)) => {
                        // Have the witness drop us and say why, then join again.
                        let why = match witness.promote(&m.me, view, true, false) {
                            Err(WitnessError::Refused { msg, .. }) => msg,
                            _ => "the primary died before sending the VM's state".into(),
                        };
                        m.rejoin(format!("while waiting for the primary's log: {why}"));
                        return Ok(None);
                    }
                    Some(Standing::Out(why)) => {
                        m.rejoin(format!("while waiting for the primary's log: {why}"));
                        return Ok(None);
                    }
                    Some(Standing::Waiting) | None => continue,
                }
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
                if r.version() != replay_log::FORMAT_VERSION {
                    // Marks and the transfer's lines changed between
                    // versions: a mixed pair would misjudge frames.
                    return Err(format!(
                        "it is in log format version {}; this backup takes version {} only (run the same ftvm release on both)",
                        r.version(),
                        replay_log::FORMAT_VERSION
                    ));
                }
                if r.header().kernel_sha256 != kernel.sha256 {
                    // Not a stream to refuse and forget: the cluster runs another kernel.
                    return Ok((r, None));
                }
                let start = read_snapshot(r.get_mut(), &name)?;
                let from = super::read_line(r.get_mut())
                    .map_err(|e| e.to_string())?
                    .ok_or("the stream ended before the `FROM` line")?;
                let from = parse_from(&from)
                    .ok_or_else(|| format!("{from:?} where `FROM <offset> <primary>` belongs (a primary of another ftvm release?)"))?;
                Ok((r, Some((start, from))))
            });
        match (opened, silence) {
            (Ok((reader, Some(((snap, ready_at), from)))), Ok(silence)) => {
                return Ok(Some(Opened { reader, write, stream_view, peer, silence, snap, ready_at, from }))
            }
            (Ok((reader, None)), _) => {
                let h = reader.header();
                return Err(RoleError::WrongKernel { primary: h.kernel_name.clone(), backup: kernel.name.clone() });
            }
            (Err(e), _) => log::warn!("backup: refused the log stream from {peer}: {e}"),
            (_, Err(e)) => log::warn!("backup: refused the log stream from {peer}: {e}"),
        }
        taken.store(false, Ordering::SeqCst);
    }
}
