//! The backup's receive side and its standing with the witness: keeps its
//! place in the view (pings saying whether it holds the VM's state), pumps
//! the primary's log to the replaying vCPU, and when the primary is gone
//! asks to be promoted and hands the VM over to live execution.
//!
//! Whatever ends a membership without ending the process (dropped from the
//! view, refused promotion) goes through [`Membership::rejoin`]: the backup
//! then joins again as a new member (`backup.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::backup_inputs::{Takeover, TakeoverSlot};
use super::gate::Gate;
use super::key::ClusterKey;
use super::lease_clock::BootInstant;
use super::listener::{Incoming, RoleError};
use super::log_buf::LogBuf;
use super::primary::PrimaryDuty;
use super::stream::{LogReceiver, StreamEnd};
use super::witness::{Promotion, View, WitnessClient, WitnessError, PING_INTERVAL};
use super::xfer::Transfers;
use crate::console_io::ConsoleInput;
use crate::engine::Ending;
use crate::stop::StopHandle;

/// One membership of a backup in the view: what its threads share.
#[derive(Clone)]
pub(super) struct Membership {
    /// This backup as the witness knows it (`ADDR@ID`).
    pub me: String,
    pub view: Arc<AtomicU64>,
    /// It holds the VM's state: a snapshot restored, or the log from boot
    /// through the last output released before it joined.
    pub ready: Arc<AtomicBool>,
    /// The exit the replay is at.
    pub applied: Arc<AtomicU64>,
    pub promoted: Arc<AtomicBool>,
    /// Set when the membership is over: its threads stop.
    pub over: Arc<AtomicBool>,
    /// Held by the promoter from its check of `over` through a takeover.
    pub promoting: Arc<Mutex<()>>,
    /// Why to join again, if this membership ends that way.
    pub rejoin_why: Arc<Mutex<Option<String>>>,
    pub stop: StopHandle,
}

impl Membership {
    pub fn new(me: String, view: u64) -> Membership {
        Membership {
            me,
            view: Arc::new(AtomicU64::new(view)),
            ready: Arc::new(AtomicBool::new(false)),
            applied: Arc::new(AtomicU64::new(0)),
            promoted: Arc::new(AtomicBool::new(false)),
            over: Arc::new(AtomicBool::new(false)),
            promoting: Arc::new(Mutex::new(())),
            rejoin_why: Arc::new(Mutex::new(None)),
            stop: StopHandle::new(),
        }
    }

    /// Ends this membership; the backup joins the view again.
    pub fn rejoin(&self, why: String) {
        log::warn!("backup: {why}");
        // At once: its pinger must not keep the old member in the view
        // (with its old word that it holds the state) while it winds down.
        self.over.store(true, Ordering::SeqCst);
        self.rejoin_why.lock().unwrap().get_or_insert(why.clone());
        self.stop.stop(Ending::Stopped { why, code: 1 });
    }

    /// Why it ended so, if it did.
    pub fn rejoin_reason(&self) -> Option<String> {
        self.rejoin_why.lock().unwrap().clone()
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Where a backup without the state stands, by the witness's status.
pub(super) enum Standing {
    /// Still the view's backup; the primary lives (or there is none yet).
    Waiting,
    /// Still the view's backup, but the primary is gone and this backup
    /// has no state: the VM is lost.
    Lost(u64),
    /// No longer the view's backup.
    Out(String),
}

/// Asks the witness where `me` stands (`None`: no answer).
pub(super) fn standing(w: &mut WitnessClient, me: &str) -> Option<Standing> {
    let st = w.status().ok()?;
    Some(if st.view.backup.as_deref() != Some(me) {
        Standing::Out(format!("the witness's view {} no longer has this backup", st.view.number))
    } else if st.lost {
        Standing::Lost(st.view.number)
    } else {
        Standing::Waiting
    })
}

pub(super) fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), RoleError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|err| RoleError::Io { what: format!("starting thread {name}"), err })
}

/// Keeps our place in the view until promoted or the membership is over,
/// saying whether we hold the state; a backup the witness drops joins
/// again.
pub(super) fn keep_place(mut w: WitnessClient, m: Membership) -> Result<(), RoleError> {
    spawn("ftvm-backup-ping", move || {
        while !m.promoted.load(Ordering::Relaxed) && !m.over.load(Ordering::Relaxed) {
            std::thread::sleep(PING_INTERVAL);
            if m.promoted.load(Ordering::Relaxed) || m.over.load(Ordering::Relaxed) {
                break;
            }
            match w.backup_ping(&m.me, m.view.load(Ordering::Relaxed), m.ready(), m.applied.load(Ordering::Relaxed)) {
                Ok(v) => m.view.store(v.number, Ordering::Relaxed),
                // A refusal while the promotion is being granted is not a
                // drop: the witness names us primary. A view that cannot be
                // read says nothing either way: the next ping asks again
                // (rejoining then would stop a just-promoted primary).
                Err(WitnessError::Refused { msg, .. })
                    if !m.promoted.load(Ordering::Relaxed)
                        && w.view().is_ok_and(|v| v.primary.as_deref() != Some(m.me.as_str())) =>
                {
                    return m.rejoin(format!("the witness dropped this backup: {msg}"));
                }
                Err(_) => {}
            }
        }
    })
}

/// The receive side; when the primary is gone, asks the witness for
/// promotion and hands the VM over to live execution.
pub(super) struct Promoter {
    pub witness: WitnessClient,
    pub key: ClusterKey,
    pub m: Membership,
    pub gate: Arc<Gate>,
    pub log: Arc<LogBuf>,
    pub transfers: Arc<Transfers>,
    pub slot: TakeoverSlot,
    pub marked: Arc<AtomicU64>,
    pub input: Receiver<Vec<u8>>,
    /// New log streams from the listener, once the first was lost ...
    pub streams: Receiver<Incoming>,
    /// ... which it hands over only while this is false.
    pub taken: Arc<AtomicBool>,
}

impl Promoter {
    pub fn run(mut self, mut recv: LogReceiver) {
        let mut lost = None;
        let mut said = None;
        loop {
            match recv.pump() {
                StreamEnd::Silent => {}
                StreamEnd::Lost(why) => {
                    if lost.is_none() && !self.m.over.load(Ordering::Relaxed) {
                        log::warn!("backup: lost the primary's log stream ({why}) after {} records", recv.records);
                        // Its next stream, if it lives, resumes this one.
                        self.taken.store(!recv.can_resume(), Ordering::SeqCst);
                    }
                    lost = Some(why);
                }
            }
            // Resumed: the request below (not lost) tells the witness that
            // the link works again, so that a later loss counts anew.
            if lost.is_some() && self.resumed(&mut recv) {
                lost = None;
            }
            // Held across the check, the request and the takeover: a
            // membership that ends meanwhile (`over`) sees either no
            // promotion or a whole one.
            let turn = self.m.promoting.clone();
            let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
            if self.m.over.load(Ordering::Relaxed) {
                return;
            }
            let view = self.m.view.load(Ordering::Relaxed);
            // The lease a promotion grants runs from the witness's answer,
            // later than this: ours ends first.
            let asked = BootInstant::now();
            match self.witness.promote(&self.m.me, view, lost.is_some(), self.m.ready()) {
                Ok(Promotion::Granted(v)) => return self.take_over(recv, v, asked),
                Err(WitnessError::Refused { .. }) if lost.is_some() && self.run_ended() => {
                    // The primary put the guest's end out and said so: there
                    // is nothing to take over. Returning drops `recv`: the
                    // replay runs on through the records already received
                    // (the end among them) and then sees the channel close.
                    return;
                }
                Ok(Promotion::Wait) => {
                    if lost.is_some() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Err(WitnessError::Refused { msg, .. }) => {
                    // A view that moved on since our last ping is not a
                    // reason to give up while the primary still streams.
                    let out = lost.is_some() || matches!(standing(&mut self.witness, &self.m.me), Some(Standing::Out(_) | Standing::Lost(_)));
                    if out {
                        // Dropping `recv` closes the record channel; the
                        // replay sees the stop request.
                        return self.m.rejoin(format!("not promoted: {msg}"));
                    }
                }
                Err(e) => {
                    // The witness is down or cut off: nobody can be promoted
                    // (the seed's view-server failure); keep asking.
                    if said.is_none_or(|t: BootInstant| t.elapsed() >= Duration::from_secs(5)) {
                        log::warn!("backup: {e}; still asking");
                        said = Some(BootInstant::now());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Takes a new stream from the primary in place of the lost one, if
    /// one came (see `resume.rs`): true if the log goes on.
    fn resumed(&mut self, recv: &mut LogReceiver) -> bool {
        if self.m.over.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(incoming) = self.streams.try_recv() else { return false };
        match recv.resume(incoming) {
            Ok(at) => {
                log::info!("backup: the primary streams again: resumed its log at offset {at}, after {} records, with no state transfer", recv.records);
                true
            }
            Err(e) => {
                log::warn!("backup: could not resume the primary's log stream: {e}; waiting for the witness");
                self.taken.store(!recv.can_resume(), Ordering::SeqCst);
                false
            }
        }
    }

    /// Whether the witness says the run's guest ended (its end is out). If
    /// this backup is no longer in the view (the primary gave it up to put
    /// the end out), its replay will not get there: it stops.
    fn run_ended(&mut self) -> bool {
        let Ok(st) = self.witness.status() else { return false };
        if !st.ended {
            return false;
        }
        if st.view.backup.as_deref() == Some(self.m.me.as_str()) {
            log::info!("backup: the primary said its guest's end is out; finishing the replay");
        } else {
            self.m.over.store(true, Ordering::SeqCst);
            self.m.stop.stop(Ending::Stopped { why: "backup: the run ended without this backup (the primary gave it up to put the end out); nothing to take over".into(), code: 0 });
        }
        true
    }

    fn take_over(self, recv: LogReceiver, view: View, asked: BootInstant) {
        self.m.view.store(view.number, Ordering::Relaxed);
        log::info!("backup: promoted to primary of view {}; finishing the log, then going live", view.number);
        let LogReceiver { log, to_vcpu, records, resync, .. } = recv;
        if resync.held() > 0 {
            log::info!("backup: the log ends inside a resync ({} pages records without the vCPU state): going live from the exit before it", resync.held());
        }
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
        let promoted = self.m.promoted.clone();
        PrimaryDuty {
            me: self.m.me.clone(),
            key: self.key,
            witness: self.witness,
            view,
            gate: self.gate,
            log: self.log,
            transfers: self.transfers,
            marked: self.marked,
            sender_stop: None,
            stop: self.m.stop.clone(),
            log_said: BootInstant::now(),
            acks: None,
            streamed: None,
        }
        .start(asked);
        // Only now: whoever acts on it (a backup at the guest's end winding
        // down) finds the gate with its lease and role set.
        promoted.store(true, Ordering::SeqCst);
        drop(to_vcpu);
    }
}
