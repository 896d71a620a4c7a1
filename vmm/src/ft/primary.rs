//! The FT primary: runs the guest, streams its log to the backup of the
//! view, renews its lease with the witness, and releases output under the
//! output rule (`gate`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use replay_log::LogWriter;

use super::gate::{Gate, GateSink, Role};
use super::key::ClusterKey;
use super::listener::{bind, log_buf_writer, serve_listener, wind_down, Endpoints, RoleError};
use super::log_buf::LogBuf;
use super::stream::{self, Sending};
use super::xfer::Transfers;
use super::lease_clock::BootInstant;
use super::witness::{addr_of, new_member, random_id, View, WitnessAt, WitnessClient, WitnessError, LEASE_MARGIN, PING_INTERVAL};
use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::console_io::ConsoleInput;
use crate::engine::{self, Ending, Inputs, RunOptions};
use crate::recorder::{LogSink, Recorder};
use crate::stop::StopHandle;
use crate::vm::Vm;

/// The primary's duties towards the witness: renew the lease, follow view
/// changes (a backup joining or leaving), and stream the log to the
/// backup of the view.
pub(super) struct PrimaryDuty {
    /// This VMM as the witness knows it (`ADDR@ID`).
    pub(super) me: String,
    pub(super) key: ClusterKey,
    pub(super) witness: WitnessClient,
    pub(super) view: View,
    pub(super) gate: Arc<Gate>,
    pub(super) log: Arc<LogBuf>,
    /// Where the log sender asks the vCPU for a snapshot.
    pub(super) transfers: Arc<Transfers>,
    /// Ordinal of the last high-water mark (reported to the witness).
    pub(super) marked: Arc<AtomicU64>,
    pub(super) sender_stop: Option<Arc<AtomicBool>>,
    /// Ends this VMM's run when the witness fences it.
    pub(super) stop: StopHandle,
    /// When the size of the kept log was last said.
    pub(super) log_said: BootInstant,
    /// The backup's acknowledgement last seen, and since when.
    pub(super) acks: Option<(u64, BootInstant)>,
    /// The backup member streamed to, and the highest log offset any
    /// stream of ours sent it (what a resumption may claim at most).
    pub(super) streamed: Option<(String, Arc<AtomicUsize>)>,
}

/// A backup whose acknowledgements do not move for this long while marks
/// go out is given up (a silent partition between primary and backup: the
/// backup still pings the witness, so nobody else would ever notice, and
/// output would be held for good) ...
const ACK_STALL: Duration = Duration::from_secs(5);
/// ... or this long before its first acknowledgement (its state transfer).
const ACK_STALL_JOINING: Duration = Duration::from_secs(120);

/// How often the primary says how much log it keeps in memory.
const LOG_SIZE_EVERY: Duration = Duration::from_secs(1);

/// Until when this primary may release output, for a lease of length
/// `lease` requested at `asked`: the witness counts it from when it
/// answered (etcd: from when it received the keep-alive), later than
/// `asked`, and this VMM stops [`LEASE_MARGIN`] before even that.
pub(super) fn own_lease(asked: BootInstant, lease: Duration) -> BootInstant {
    asked + lease.saturating_sub(LEASE_MARGIN)
}

impl PrimaryDuty {
    /// `asked`: when the request that granted the first lease was sent.
    pub(super) fn start(mut self, asked: BootInstant) {
        self.gate.set_lease(own_lease(asked, self.witness.lease()));
        self.apply_view(self.view.clone(), true);
        let stop = self.stop.clone();
        if let Err(e) = std::thread::Builder::new().name("ftvm-primary-duty".into()).spawn(move || self.run()) {
            // Without lease renewals the gate releases nothing anyway.
            stop.stop(Ending::Stopped { why: format!("primary: cannot start the witness thread: {e}"), code: 1 });
        }
    }

    fn apply_view(&mut self, v: View, first: bool) {
        if !first && v.backup == self.view.backup {
            self.view = v;
            return;
        }
        if let Some(s) = self.sender_stop.take() {
            s.store(true, Ordering::Relaxed);
        }
        log::info!(
            "primary: view {}: primary {} backup {}",
            v.number,
            self.me,
            v.backup.as_deref().unwrap_or("none (output is not held)")
        );
        match &v.backup {
            Some(b) => {
                let streamed = match &self.streamed {
                    Some((m, high)) if m == b => high.clone(),
                    _ => {
                        let high = Arc::new(AtomicUsize::new(0));
                        self.streamed = Some((b.clone(), high.clone()));
                        high
                    }
                };
                // Before the gate waits for it: the lag throttle must not
                // hold the guest against a backup that has nothing yet. One
                // that acknowledged our log before (the stream is opened
                // again after our lease lapsed; it resumes) holds it that far.
                match self.gate.acked() {
                    acked if acked > 0 && streamed.load(Ordering::SeqCst) > 0 => self.transfers.taken_at(acked),
                    _ => self.transfers.joining(),
                }
                let generation = self.gate.reset_acks();
                self.gate.set_role(Role::Primary { need_ack: true });
                let stop = Arc::new(AtomicBool::new(false));
                self.sender_stop = Some(stop.clone());
                let to = Sending {
                    addr: addr_of(b).to_string(),
                    to: b.clone(),
                    view: v.number,
                    me: self.me.clone(),
                    key: self.key.clone(),
                    log: self.log.clone(),
                    gate: self.gate.clone(),
                    generation,
                    streamed,
                    stop,
                    transfers: self.transfers.clone(),
                };
                let send = move || stream::run_sender(to);
                if let Err(e) = std::thread::Builder::new().name("ftvm-log-sender".into()).spawn(send) {
                    log::error!("primary: cannot start streaming to the backup: {e}");
                }
            }
            None => self.gate.set_role(Role::Primary { need_ack: false }),
        }
        self.view = v;
    }

    fn run(mut self) {
        let mut warned = false;
        let mut last_ok = BootInstant::now();
        let mut cut_off = false;
        loop {
            std::thread::sleep(PING_INTERVAL);
            self.bound_log();
            let t0 = BootInstant::now();
            let sent = self.marked.load(Ordering::Relaxed);
            let released = self.gate.released_len();
            match self.witness.primary_ping(&self.me, self.view.number, sent, self.gate.acked(), released) {
                Ok(v) if v.primary.as_deref() == Some(self.me.as_str()) => {
                    warned = false;
                    last_ok = t0;
                    self.gate.set_lease(own_lease(t0, self.witness.lease()));
                    self.apply_view(v, cut_off);
                    cut_off = false;
                    self.check_acks();
                }
                Ok(v) => return self.fenced(&format!("view {} has primary {:?}", v.number, v.primary)),
                Err(WitnessError::Refused { msg, .. }) => return self.fenced(&msg),
                Err(e) => {
                    if !warned {
                        log::warn!("primary: {e}; output stops when the lease runs out");
                        warned = true;
                    }
                    // Rule 4: without a lease we release nothing (the gate
                    // checks it), and we let go of the backup so that it
                    // can ask the witness to take over.
                    if !cut_off && last_ok.elapsed() > self.witness.lease().saturating_sub(LEASE_MARGIN) {
                        cut_off = true;
                        log::info!("primary: lease expired; output held, log stream to the backup closed");
                        if let Some(s) = self.sender_stop.take() {
                            s.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// Gives up on a backup whose acknowledgements stopped (see
    /// [`ACK_STALL`]): asks the witness to drop it, which then never
    /// promotes it over output released from here on.
    fn check_acks(&mut self) {
        let Some(b) = self.view.backup.clone() else {
            self.acks = None;
            return;
        };
        let (acked, marked, now) = (self.gate.acked(), self.marked.load(Ordering::Relaxed), BootInstant::now());
        let since = match self.acks {
            Some((a, since)) if a == acked && marked > acked => since,
            _ => {
                self.acks = Some((acked, now));
                return;
            }
        };
        let bound = if acked == 0 { ACK_STALL_JOINING } else { ACK_STALL };
        if now.saturating_duration_since(since) < bound {
            return;
        }
        log::warn!("primary: backup {b} acknowledged nothing past exit #{acked} for {bound:?} while the log went on to #{marked}; giving it up");
        self.acks = None;
        match self.witness.drop_backup(&self.me, self.view.number, &b) {
            Ok(v) => self.apply_view(v, false),
            Err(e) => log::warn!("primary: could not give up backup {b}: {e}"),
        }
    }

    /// Without a backup no one will ever be sent the log kept so far (a
    /// backup that joins gets a snapshot): drop it. With one, the log is
    /// dropped as the backup acknowledges it (`stream::read_acks`). Says
    /// how much is kept, now and then.
    fn bound_log(&mut self) {
        if self.view.backup.is_none() {
            self.log.trim_before(self.log.len());
        }
        if self.log_said.elapsed() >= LOG_SIZE_EVERY {
            self.log_said = BootInstant::now();
            log::info!("primary: log kept in memory: {} bytes (offset {})", self.log.kept(), self.log.len());
        }
    }

    /// Rule 4 from the other side: a primary the witness no longer
    /// recognises never releases another byte, and stops (exit code 75).
    fn fenced(&self, why: &str) {
        self.gate.set_role(Role::Silent);
        if let Some(s) = &self.sender_stop {
            s.store(true, Ordering::Relaxed);
        }
        let why = format!("primary: no longer the primary ({why}); stopping");
        log::warn!("{why}");
        self.stop.stop(Ending::Stopped { why, code: 75 });
    }
}

pub struct PrimaryOpts {
    pub witness: WitnessAt,
    pub listen: String,
    pub key: ClusterKey,
    pub progress: bool,
    /// Boot a new VM even if the cluster's VM was lost (the operator
    /// abandons it).
    pub new_run: bool,
    /// The network card's tap (`--net`): frames out through the gate.
    pub net: Option<super::net::FtNet>,
}

/// Runs the guest as primary; returns how it ended (message, exit code).
pub fn run_primary(opts: PrimaryOpts, cfg: GuestConfig) -> Result<(String, i32), RoleError> {
    let listener = bind(&opts.listen)?;
    let mut witness = WitnessClient::new(&opts.witness, &opts.key);
    let me = new_member(&opts.listen);
    let run = random_id();
    let t0 = BootInstant::now();
    let view = witness.become_primary(&me, &run, opts.new_run)?;
    let gate = Gate::new(Role::Primary { need_ack: view.backup.is_some() });
    let log = LogBuf::new();
    let writer: LogSink = LogWriter::new(log_buf_writer(&log), &cfg.header())?;
    let transfers = Transfers::new(cfg.header());
    transfers.set_boot_records(log.len());
    let (in_tx, in_rx) = crossbeam_channel::unbounded();
    serve_listener(listener, opts.key.clone(), Endpoints { me: me.clone(), gate: gate.clone(), input: in_tx, logs: None });
    let ordinal = Arc::new(AtomicU64::new(0));
    let marked = Arc::new(AtomicU64::new(0));
    let sink = GateSink { gate: gate.clone(), ordinal: ordinal.clone() };
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::host()), Box::new(sink), ordinal)?;
    if let Some(n) = &opts.net {
        n.protect(&vm.machine, &gate, vm.machine.ordinal.clone());
    }
    transfers.set_mem(vm.mem.clone());
    log::info!("primary: {me} is primary of view {} (run {run}); console clients connect to {}", view.number, opts.listen);
    let stop = StopHandle::new();
    let me_at_end = me.clone();
    PrimaryDuty {
        me,
        key: opts.key.clone(),
        witness,
        view,
        gate: gate.clone(),
        log: log.clone(),
        transfers: transfers.clone(),
        marked: marked.clone(),
        sender_stop: None,
        stop: stop.clone(),
        log_said: BootInstant::now(),
        acks: None,
        streamed: None,
    }
    .start(t0);
    let mut rec = Recorder::new(Some(writer), ConsoleInput::from_channel(in_rx))
        .with_marks(marked, gate.clone())
        .with_mark_index(log)
        .with_transfers(transfers)
        .with_kicks(stop.clone(), vm.machine.clock.clone());
    if let Some(n) = &opts.net {
        rec = rec.with_net(n.input.clone());
    }
    let out = engine::run(vm.guest(), &mut rec, &RunOptions { progress: opts.progress, stop })
        .map_err(|err| RoleError::Engine { what: "primary", err })?;
    let (msg, code) = out.ending.describe();
    if matches!(out.ending, Ending::Stopped { .. }) {
        // Its reason was said when it was asked for.
        log::info!("{}; {}", out.summary(), rec.summary());
        return Ok((msg, code));
    }
    log::info!("primary: {msg}; {}; {}", out.summary(), rec.summary());
    wind_down(&gate, &msg, &mut WitnessClient::new(&opts.witness, &opts.key), &me_at_end);
    Ok((msg, code))
}
