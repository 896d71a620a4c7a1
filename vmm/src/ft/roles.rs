//! The primary and backup processes: wiring the VM, the log stream, the
//! output gate, the console service and the witness together.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use replay_log::{Header, LogReader, LogWriter};

use super::console;
use super::failover::{Failover, Takeover, TakeoverSlot};
use super::gate::{Gate, GateSink, Role};
use super::log_buf::{LogBuf, LogBufWriter};
use super::stream::{self, LogReceiver, StreamEnd, HELLO};
use super::witness::{Promotion, View, WitnessClient, WitnessError, LEASE, PING_INTERVAL};
use super::{read_line, write_line, SILENCE};
use crate::clock::VmClock;
use crate::console::ConsoleInput;
use crate::devices::StopRequest;
use crate::engine::{self, Ending, Inputs, RunOptions};
use crate::kernel::KernelImage;
use crate::live::{Live, LogSink};
use crate::replay::Replayer;
use crate::vm::{GuestConfig, Vm};

/// A log stream offered to a backup: the connection and its reader, which
/// may already hold the first bytes of the log.
type Incoming = (TcpStream, BufReader<TcpStream>, u64);

fn log_buf_writer(log: &Arc<LogBuf>) -> Box<dyn std::io::Write + Send> {
    Box::new(LogBufWriter(log.clone()))
}

fn bind(listen: &str) -> Result<TcpListener> {
    TcpListener::bind(listen).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {listen}: the port is in use (another ftvm, or pick another --listen)")
        } else {
            anyhow::anyhow!("cannot listen on {listen}: {e}")
        }
    })
}

/// Accepts console clients (any role) and, on a backup, log streams.
fn serve_listener(
    l: TcpListener,
    gate: Arc<Gate>,
    input: Sender<Vec<u8>>,
    logs: Option<(Sender<Incoming>, Arc<AtomicU64>)>,
) {
    std::thread::spawn(move || {
        let taken = Arc::new(AtomicBool::new(false));
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            let gate = gate.clone();
            let input = input.clone();
            let logs = logs.clone();
            let taken = taken.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().expect("cloning a TCP stream"));
                let Ok(Some(hello)) = read_line(&mut r) else { return };
                if let Some(from) = hello.strip_prefix("CONSOLE from=") {
                    let from = from.parse().unwrap_or(0);
                    console::serve(conn, r, from, gate, input);
                } else if let Some(v) = hello.strip_prefix(&format!("{HELLO} view=")) {
                    let view: u64 = v.parse().unwrap_or(0);
                    let Some((tx, my_view)) = logs else {
                        let _ = write_line(&mut conn, "ERR this VMM is not a backup");
                        return;
                    };
                    let mine = my_view.load(Ordering::Relaxed);
                    if view < mine {
                        // Rule 3: records of an older view are refused.
                        eprintln!("backup: refused a log stream for view {view}: this backup is in view {mine}");
                        let _ = write_line(&mut conn, &format!("ERR stale view {view}: the backup is in view {mine}"));
                        return;
                    }
                    if taken.swap(true, Ordering::SeqCst) {
                        let _ = write_line(&mut conn, "ERR this backup already receives a log stream");
                        return;
                    }
                    let _ = tx.send((conn, r, view));
                } else {
                    let _ = write_line(&mut conn, "ERR unknown hello");
                }
            });
        }
    });
}

/// The primary's duties towards the witness: renew the lease, follow view
/// changes (a backup joining or leaving), and stream the log to the
/// backup of the view.
struct PrimaryDuty {
    me: String,
    witness: WitnessClient,
    view: View,
    gate: Arc<Gate>,
    log: Arc<LogBuf>,
    sent: Arc<AtomicU64>,
    sender_stop: Option<Arc<AtomicBool>>,
}

impl PrimaryDuty {
    fn start(mut self, first_lease_at: Instant) {
        self.gate.set_lease(first_lease_at + LEASE);
        self.apply_view(self.view.clone(), true);
        std::thread::Builder::new()
            .name("ftvm-primary-duty".into())
            .spawn(move || self.run())
            .expect("spawning the primary's witness thread");
    }

    fn apply_view(&mut self, v: View, first: bool) {
        if !first && v.backup == self.view.backup {
            self.view = v;
            return;
        }
        if let Some(s) = self.sender_stop.take() {
            s.store(true, Ordering::Relaxed);
        }
        eprintln!(
            "primary: view {}: primary {} backup {}",
            v.number,
            self.me,
            v.backup.as_deref().unwrap_or("none (output is not held)")
        );
        match &v.backup {
            Some(b) => {
                self.gate.reset_acks();
                self.gate.set_role(Role::Primary { need_ack: true });
                let stop = Arc::new(AtomicBool::new(false));
                self.sender_stop = Some(stop.clone());
                let (b, n, log, gate) = (b.clone(), v.number, self.log.clone(), self.gate.clone());
                std::thread::spawn(move || stream::run_sender(b, n, log, gate, stop));
            }
            None => self.gate.set_role(Role::Primary { need_ack: false }),
        }
        self.view = v;
    }

    fn run(mut self) {
        let mut warned = false;
        let mut last_ok = Instant::now();
        let mut cut_off = false;
        loop {
            std::thread::sleep(PING_INTERVAL);
            let t0 = Instant::now();
            let sent = self.sent.load(Ordering::Relaxed);
            match self.witness.primary_ping(&self.me, self.view.number, sent, self.gate.acked()) {
                Ok(v) if v.primary.as_deref() == Some(self.me.as_str()) => {
                    warned = false;
                    last_ok = t0;
                    self.gate.set_lease(t0 + LEASE);
                    self.apply_view(v, cut_off);
                    cut_off = false;
                }
                Ok(v) => self.fenced(&format!("view {} has primary {:?}", v.number, v.primary)),
                Err(WitnessError::Refused { msg, .. }) => self.fenced(&msg),
                Err(e) => {
                    if !warned {
                        eprintln!("primary: {e}; output stops when the lease runs out");
                        warned = true;
                    }
                    // Rule 4: without a lease we release nothing (the gate
                    // checks it), and we let go of the backup so that it
                    // can ask the witness to take over.
                    if !cut_off && last_ok.elapsed() > LEASE {
                        cut_off = true;
                        eprintln!("primary: lease expired; output held, log stream to the backup closed");
                        if let Some(s) = self.sender_stop.take() {
                            s.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// Rule 4 from the other side: a primary the witness no longer
    /// recognises never releases another byte, and stops.
    fn fenced(&self, why: &str) -> ! {
        self.gate.set_role(Role::Silent);
        eprintln!("primary: no longer the primary ({why}); stopping");
        std::process::exit(75);
    }
}

fn end_message(ending: &Ending) -> (String, i32) {
    match ending {
        Ending::Guest(StopRequest::Exit(s)) => (format!("guest exited with status {s}"), *s as i32),
        Ending::Guest(StopRequest::Reset) => ("guest reset the machine".into(), 0),
        Ending::Guest(StopRequest::Halt) => ("guest powered off (halted)".into(), 0),
        Ending::Interrupted => ("the VMM was interrupted".into(), 130),
        Ending::LogIncomplete(w) => (w.clone(), 3),
    }
}

/// After the guest stops: let the backup acknowledge the end, release the
/// last output, and tell console clients.
fn wind_down(gate: &Gate, msg: &str) {
    if !gate.drain(Duration::from_secs(10)) {
        eprintln!("ftvm: {} bytes of output were never acknowledged by the backup", gate.pending_len());
    }
    gate.end(msg.to_string());
    // Give connected consoles a moment to receive the end.
    std::thread::sleep(Duration::from_millis(300));
}

pub struct PrimaryOpts {
    pub witness: String,
    pub listen: String,
    pub verbose: bool,
}

pub fn run_primary(opts: PrimaryOpts, cfg: GuestConfig, header: Header) -> Result<i32> {
    let listener = bind(&opts.listen)?;
    let mut witness = WitnessClient::new(&opts.witness);
    let t0 = Instant::now();
    let view = witness.become_primary(&opts.listen)?;
    let gate = Gate::new(Role::Primary { need_ack: view.backup.is_some() });
    let log = LogBuf::new();
    let writer: LogSink = LogWriter::new(log_buf_writer(&log), &header)?;
    let (in_tx, in_rx) = crossbeam_channel::unbounded();
    serve_listener(listener, gate.clone(), in_tx, None);
    let ordinal = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let sink = GateSink { gate: gate.clone(), ordinal: ordinal.clone() };
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::host()), Box::new(sink), ordinal)?;
    eprintln!("primary: {} is primary of view {}; console clients connect here", opts.listen, view.number);
    PrimaryDuty { me: opts.listen.clone(), witness, view, gate: gate.clone(), log, sent: sent.clone(), sender_stop: None }
        .start(t0);
    let mut live = Live::new(Some(writer), ConsoleInput::from_channel(in_rx)).with_progress(sent, gate.clone());
    let out = engine::run(&mut vm, &mut live, &RunOptions { verbose: opts.verbose })?;
    let (msg, code) = end_message(&out.ending);
    eprintln!("primary: {msg}; {} exits; {}", out.exits, live.summary());
    wind_down(&gate, &msg);
    Ok(code)
}

pub struct BackupOpts {
    pub witness: String,
    pub listen: String,
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    pub verbose: bool,
}

fn load_kernel(path: Option<&std::path::Path>) -> Result<KernelImage> {
    Ok(match path {
        Some(p) => KernelImage::from_file(p)?,
        None => KernelImage::from_bytes(ftvm_guest::TEST_GUEST_NAME.into(), ftvm_guest::TEST_GUEST_ELF.to_vec()),
    })
}

/// Reads the initrd a log names, checking it is the one recorded.
pub fn load_initrd(path: Option<&std::path::Path>, want: Option<[u8; 32]>) -> Result<Option<(String, Vec<u8>)>> {
    match (path, want) {
        (None, None) => Ok(None),
        (Some(p), Some(sum)) => {
            let data = std::fs::read(p).with_context(|| format!("cannot read initrd {}", p.display()))?;
            if crate::kernel::sha256(&data) != sum {
                bail!("initrd {} is not the one the log was recorded with (sha256 differs)", p.display());
            }
            Ok(Some((p.display().to_string(), data)))
        }
        (None, Some(_)) => bail!("the log was recorded with an initrd: pass --initrd with the same file"),
        (Some(p), None) => bail!("the log was recorded without an initrd, but --initrd {} was given", p.display()),
    }
}

pub fn run_backup(opts: BackupOpts) -> Result<i32> {
    let kernel = load_kernel(opts.kernel.as_deref())?;
    let listener = bind(&opts.listen)?;
    let me = opts.listen.clone();
    let mut witness = WitnessClient::new(&opts.witness);
    let view = witness.backup_ping(&me, 0)?;
    let my_view = Arc::new(AtomicU64::new(view.number));
    let promoted = Arc::new(AtomicBool::new(false));
    eprintln!("backup: {me} is backup of view {}; waiting for the primary's log", view.number);

    let gate = Gate::new(Role::Silent);
    let (in_tx, in_rx) = crossbeam_channel::unbounded();
    let (log_tx, log_rx) = crossbeam_channel::bounded::<Incoming>(1);
    serve_listener(listener, gate.clone(), in_tx, Some((log_tx, my_view.clone())));

    // Keep our place in the view until promoted.
    {
        let (me, my_view, promoted, waddr) = (me.clone(), my_view.clone(), promoted.clone(), opts.witness.clone());
        std::thread::spawn(move || {
            let mut w = WitnessClient::new(&waddr);
            while !promoted.load(Ordering::Relaxed) {
                std::thread::sleep(PING_INTERVAL);
                if promoted.load(Ordering::Relaxed) {
                    break;
                }
                match w.backup_ping(&me, my_view.load(Ordering::Relaxed)) {
                    Ok(v) => my_view.store(v.number, Ordering::Relaxed),
                    Err(WitnessError::Refused { msg, .. }) if !promoted.load(Ordering::Relaxed) => {
                        eprintln!("backup: the witness dropped this backup: {msg}");
                        std::process::exit(1);
                    }
                    Err(_) => {}
                }
            }
        });
    }

    let (conn, reader, stream_view) = log_rx.recv().context("listener stopped")?;
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "primary".into());
    let mut write = conn.try_clone()?;
    write_line(&mut write, "OK").with_context(|| format!("answering the primary at {peer}"))?;
    let reader = LogReader::new(reader, &format!("log stream from {peer}"))?;
    let h = reader.header().clone();
    if h.kernel_sha256 != kernel.sha256 {
        bail!(
            "the primary runs kernel '{}' but this backup has '{}' (different sha256): start the backup with --kernel for the same guest",
            h.kernel_name, kernel.name
        );
    }
    // From here on, silence means the primary may be gone.
    let _ = conn.set_read_timeout(Some(SILENCE));
    eprintln!("backup: receiving the log of view {stream_view} from {peer}; replaying in lockstep");

    let log = LogBuf::new();
    let own: LogSink = LogWriter::new(log_buf_writer(&log), &h)?;
    let (rec_tx, rec_rx) = crossbeam_channel::unbounded();
    let slot: TakeoverSlot = Arc::new(Mutex::new(None));
    let ordinal = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    {
        let recv = LogReceiver { reader, ack: write, log: own, to_vcpu: rec_tx, records: 0 };
        let ctx = Promoter {
            witness: WitnessClient::new(&opts.witness),
            me: me.clone(),
            my_view: my_view.clone(),
            promoted: promoted.clone(),
            gate: gate.clone(),
            log,
            slot: slot.clone(),
            sent: sent.clone(),
            input: in_rx,
        };
        std::thread::spawn(move || ctx.run(recv));
    }

    let cfg = GuestConfig { kernel, mem_bytes: h.mem_bytes, cmdline: h.cmdline.clone(), initrd: load_initrd(opts.initrd.as_deref(), h.initrd_sha256)? };
    let sink = GateSink { gate: gate.clone(), ordinal: ordinal.clone() };
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::replay()), Box::new(sink), ordinal)?;
    let mut inputs = Failover::new(Replayer::new(stream::ChannelSource { rx: rec_rx, taken: 0 }), slot);
    let out = engine::run(&mut vm, &mut inputs, &RunOptions { verbose: opts.verbose })
        .context("backup replay")?;
    let (msg, code) = end_message(&out.ending);
    if inputs.is_live() {
        eprintln!("primary: {msg}; {} exits; {}", out.exits, inputs.summary());
        wind_down(&gate, &msg);
        Ok(code)
    } else {
        eprintln!("backup: replayed to the end in lockstep: {msg}; {}", inputs.summary());
        Ok(0)
    }
}

/// Runs the backup's receive side; when the primary is gone, asks the
/// witness for promotion and hands the VM over to live execution.
struct Promoter {
    witness: WitnessClient,
    me: String,
    my_view: Arc<AtomicU64>,
    promoted: Arc<AtomicBool>,
    gate: Arc<Gate>,
    log: Arc<LogBuf>,
    slot: TakeoverSlot,
    sent: Arc<AtomicU64>,
    input: Receiver<Vec<u8>>,
}

impl Promoter {
    fn run(mut self, mut recv: LogReceiver) {
        let mut lost = None;
        loop {
            match recv.pump() {
                StreamEnd::Silent => {}
                StreamEnd::Lost(why) => {
                    if lost.is_none() {
                        eprintln!("backup: lost the primary's log stream ({why}) after {} records", recv.records);
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
                        eprintln!("backup: not promoted: {msg}");
                        std::process::exit(1);
                    }
                }
                Err(e) => {
                    eprintln!("backup: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn take_over(self, recv: LogReceiver, view: View) {
        let t0 = Instant::now();
        self.promoted.store(true, Ordering::Relaxed);
        self.my_view.store(view.number, Ordering::Relaxed);
        eprintln!("backup: promoted to primary of view {}; finishing the log, then going live", view.number);
        let LogReceiver { log, to_vcpu, records, .. } = recv;
        let kit = Takeover {
            log,
            input: ConsoleInput::from_channel(self.input),
            progress: self.sent.clone(),
            output: self.gate.clone(),
            on_live: Box::new(move |ord| {
                eprintln!("primary: live at exit #{ord} after replaying {records} records");
            }),
        };
        *self.slot.lock().unwrap() = Some(kit);
        PrimaryDuty {
            me: self.me,
            witness: self.witness,
            view,
            gate: self.gate,
            log: self.log,
            sent: self.sent,
            sender_stop: None,
        }
        .start(t0);
        drop(to_vcpu);
    }
}
