//! The `ftvm` command line: parses arguments, runs one command, and turns
//! how it ended into a message on stderr and an exit code (see
//! `Ending::describe`). Everything else lives in the library.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use replay_log::{LogReader, LogWriter};

use ftvm::clock::VmClock;
use ftvm::config::{hex, GuestConfig};
use ftvm::console_io::{ConsoleInput, StdoutSink};
use ftvm::engine::{self, Ending, Inputs, Outcome, RunOptions};
use ftvm::ft::backup::{run_backup, BackupOpts};
use ftvm::ft::key::ClusterKey;
use ftvm::ft::primary::{run_primary, PrimaryOpts};
use ftvm::ft::witness::{EtcdOptions, Witness, WitnessAt, WitnessClient};
use ftvm::recorder::Recorder;
use ftvm::replay::Replayer;
use ftvm::snapshot::{Snapshot, SnapshotAt};
use ftvm::stop::install_interrupt_handlers;
use ftvm::vm::Vm;

#[derive(Parser)]
#[command(name = "ftvm", version, about = "Record/replay fault-tolerant VMM for x86-64 KVM")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest; its console is stdout, stdin goes to its serial port.
    Run(GuestArgs),
    /// Like run, and write every nondeterministic input to a log.
    Record {
        /// Log file to write.
        #[arg(long)]
        log: PathBuf,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Re-run a recording from its log alone and verify it.
    Replay {
        /// Log file to replay.
        #[arg(long)]
        log: PathBuf,
        #[command(flatten)]
        snapshots: SnapshotArgs,
        #[command(flatten)]
        debug: GdbArgs,
        #[command(flatten)]
        guest: RecordedGuest,
    },
    /// Write the built-in test guest's ELF, with its symbols, for gdb.
    GuestElf {
        /// File to write (e.g. guest.elf; then `gdb guest.elf`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a cluster key: every FT role and client needs the same one (--key).
    Keygen {
        /// File to create (mode 0600); an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Hold the view (primary, backup) and the primary's lease.
    Witness {
        /// Address to listen on, e.g. 127.0.0.1:7000.
        #[arg(long)]
        listen: String,
        /// Keep the view in this file across restarts of the witness
        /// (taken up if it exists). Without it, a restarted witness knows
        /// no view and fences the running VM's roles.
        #[arg(long)]
        state: Option<PathBuf>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Run the guest as the fault-tolerant primary.
    Primary {
        #[command(flatten)]
        witness: WitnessArg,
        /// Where console clients connect (and how the witness names us).
        #[arg(long, default_value = "127.0.0.1:7100")]
        listen: String,
        /// Boot a new VM even though the cluster's VM was lost (its
        /// primary died with no backup holding its state): that VM is
        /// abandoned, and consoles following it stop.
        #[arg(long)]
        new_run: bool,
        #[command(flatten)]
        key: KeyArg,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Stand by as the backup: replay the primary's log, take over if it dies.
    Backup {
        #[command(flatten)]
        witness: WitnessArg,
        /// Where the primary streams its log (and, after a takeover, consoles connect).
        #[arg(long)]
        listen: String,
        /// The address the witness names this backup by, for the primary
        /// and consoles to connect to, when it is not --listen's (a NAT or
        /// a relay in front of this backup).
        #[arg(long, value_name = "HOST:PORT", value_parser = parse_advertise)]
        advertise: Option<String>,
        #[command(flatten)]
        key: KeyArg,
        #[command(flatten)]
        guest: RecordedGuest,
        /// The tap the guest's network card uses once this backup takes
        /// over (tap=NAME, on the same bridge as the primary's).
        #[arg(long, value_name = "tap=NAME")]
        net: Option<ftvm::net::NetSpec>,
    },
    /// The guest's console, wherever the primary is.
    Console {
        #[command(flatten)]
        witness: WitnessArg,
        /// Give up after this many seconds without a primary.
        #[arg(long, default_value_t = 30)]
        give_up: u64,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Show the view: number, primary, backup, lease, lag.
    Status {
        #[command(flatten)]
        witness: WitnessArg,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Inspect a log.
    Log {
        #[command(subcommand)]
        cmd: LogCmd,
    },
}

#[derive(Subcommand)]
enum LogCmd {
    /// One record a line, with its position.
    Dump { file: PathBuf },
    /// Counts by kind, bytes, bytes per second of guest time.
    Stats { file: PathBuf },
}

/// Where the view is kept: an embedded witness or an etcd cluster.
#[derive(Args)]
struct WitnessArg {
    /// The witness: HOST:PORT of `ftvm witness`, or an etcd cluster as
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX].
    #[arg(long)]
    witness: String,
    /// etcd: the key prefix this VM's view lives under, one per VM
    /// (default /ftvm/default; or the path of the etcd:// URL).
    #[arg(long, value_name = "PREFIX")]
    witness_prefix: Option<String>,
    /// etcd: authenticate as this etcd user (with --etcd-password-file).
    #[arg(long, value_name = "USER")]
    etcd_user: Option<String>,
    /// etcd: a file holding the user's password (one line).
    #[arg(long, value_name = "FILE")]
    etcd_password_file: Option<PathBuf>,
    /// etcd: speak TLS to etcd, trusting this CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// etcd: the client certificate to present (PEM; with --etcd-key).
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// etcd: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
}

impl WitnessArg {
    fn at(self) -> Result<WitnessAt> {
        let etcd = EtcdOptions {
            prefix: self.witness_prefix,
            user: self.etcd_user,
            password_file: self.etcd_password_file,
            ca: self.etcd_ca,
            cert: self.etcd_cert,
            key: self.etcd_key,
        };
        Ok(WitnessAt::parse(&self.witness, &etcd)?)
    }
}

/// The cluster key of an FT command. Optional for clap, so that a missing
/// key gets ftvm's own message (which says how to make one).
#[derive(Args)]
struct KeyArg {
    /// The cluster key (from `ftvm keygen`), the same file for every role and client.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

impl KeyArg {
    fn load(&self) -> Result<ClusterKey> {
        Ok(ClusterKey::from_arg(self.key.as_deref())?)
    }
}

/// The guest of a log (replay) or of a primary's stream (backup): its
/// memory and command line come from the log's header.
#[derive(Args)]
struct RecordedGuest {
    /// Kernel the log was recorded with (default: the built-in test guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd the log was recorded with, if any.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Progress every second and details on stderr.
    #[arg(long, short)]
    verbose: bool,
}

/// Snapshots during a replay (docs/SNAPSHOT.md).
#[derive(Args)]
struct SnapshotArgs {
    /// Take a snapshot at the end of this exit (an ordinal, as `log dump`
    /// shows them: `@N`) and go on replaying.
    #[arg(long, value_name = "ORDINAL", requires = "snapshot_out")]
    snapshot_at: Option<u64>,
    /// Where --snapshot-at writes the snapshot.
    #[arg(long, value_name = "FILE", requires = "snapshot_at")]
    snapshot_out: Option<PathBuf>,
    /// Start from this snapshot (taken while replaying the same log) and
    /// replay the rest of the log from there.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
}

/// Debugging a recording with gdb (docs/DESIGN.md, "Debugging a recording").
#[derive(Args)]
struct GdbArgs {
    /// Wait for gdb on this address (e.g. 127.0.0.1:1234) before the first
    /// instruction, and replay under it: breakpoints, steps, reverse
    /// execution, `monitor when` / `monitor goto N`.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["snapshot_at", "from"])]
    gdb: Option<String>,
    /// With --gdb: a checkpoint every N exits for reverse execution (at
    /// most 64 and 256 MiB of them: the interval doubles as they thin out).
    #[arg(long, value_name = "N", default_value_t = 1000, requires = "gdb")]
    checkpoint_every: u64,
}

#[derive(Args)]
struct GuestArgs {
    /// Guest kernel: an x86-64 ELF (default: the built-in test guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (Linux guests).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory, e.g. 128M or 1G.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    mem: u64,
    /// Guest command line (the test guest takes seconds=N hz=N lines=N quiet=1).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Don't feed stdin to the guest.
    #[arg(long)]
    no_stdin: bool,
    /// Progress every second and details (unmapped ports) on stderr.
    #[arg(long, short)]
    verbose: bool,
    /// A virtio-net card on the host's tap NAME (opened, or created).
    #[arg(long, value_name = "tap=NAME")]
    net: Option<ftvm::net::NetSpec>,
    /// The card's MAC address (default 52:54:00:12:34:56).
    #[arg(long, requires = "net", value_parser = |s: &str| ftvm::net::parse_mac(s).map_err(|e| e.to_string()))]
    mac: Option<[u8; 6]>,
}

/// An address others connect to: HOST:PORT, nothing a member name or the
/// witness's protocol would split on.
fn parse_advertise(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("{s:?} is not HOST:PORT ({why})"));
    let Some((host, port)) = s.rsplit_once(':') else { return bad("no port") };
    if host.is_empty() {
        return bad("no host");
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return bad("the port is not 1-65535");
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '=' | ',')) {
        return bad("spaces, '@', '=' and ',' are not allowed");
    }
    Ok(s.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1 << 20),
    };
    num.parse::<u64>()
        .map_err(|_| format!("'{s}' is not a size (e.g. 128M)"))?
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// The stdin reader must not take SIGINT/SIGTERM away from the vCPU thread
/// (which needs the signal to leave KVM_RUN), so it starts with them blocked.
fn spawn_stdin() -> ConsoleInput {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGUSR1);
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    let input = ConsoleInput::spawn(std::io::stdin());
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
    input
}

impl GuestArgs {
    fn config(&self) -> Result<GuestConfig> {
        let mut cfg = GuestConfig::load(self.kernel.as_deref(), self.initrd.as_deref(), self.mem, &self.cmdline)?;
        if self.net.is_some() {
            cfg.net_mac = Some(self.mac.unwrap_or(ftvm::net::DEFAULT_MAC));
        }
        Ok(cfg)
    }

    /// The tap of `--net`, opened (before the VM is built, so that a bad
    /// one is said at once).
    fn tap(&self) -> Result<Option<ftvm::net::tap::Tap>> {
        Ok(self.net.as_ref().map(|n| ftvm::net::tap::Tap::open(&n.tap)).transpose()?)
    }
}

/// The card's counters on stderr.
fn report_net(vm: &Vm, rec: &Recorder) {
    let Some(card) = &vm.machine.net else { return };
    let c = card.lock().unwrap().counters.clone();
    let (queue_full, oversize) = rec.net_dropped().unwrap_or_default();
    eprintln!(
        "ftvm: network: {} frames received, {} sent; dropped: {} oversize, {} with no buffer, {} bad transmits, {} while the queue was full",
        c.rx_frames, c.tx_frames, c.rx_oversize + oversize, c.rx_no_buffer, c.tx_errors, queue_full
    );
}

/// The run's summary lines on stderr (the guest's console is stdout).
fn report(vm: &Vm, out: &Outcome, what: &str) {
    eprintln!("ftvm: {what}: {}", out.summary());
    if let Some(t) = &vm.traps {
        eprintln!(
            "ftvm: rdtsc/rdtscp: {} sites patched ({} in kernel code, {} in boot-time alternatives), {} traps taken",
            t.in_text + t.in_alternatives, t.in_text, t.in_alternatives, out.stats.traps
        );
    }
}

fn run_live(guest: GuestArgs, log: Option<&Path>) -> Result<i32> {
    let cfg = guest.config()?;
    let tap = guest.tap()?;
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::host()), Box::new(StdoutSink), Default::default())?;
    let writer = match log {
        Some(p) => {
            let f = File::create(p).with_context(|| format!("cannot create log {}", p.display()))?;
            let w: Box<dyn Write + Send> = Box::new(BufWriter::new(f));
            Some(LogWriter::with_name(w, &cfg.header(), &p.display().to_string()).with_context(|| format!("writing log {}", p.display()))?)
        }
        None => None,
    };
    install_interrupt_handlers();
    let input = if guest.no_stdin { ConsoleInput::none() } else { spawn_stdin() };
    let stop = ftvm::stop::StopHandle::new();
    let mut rec = Recorder::new(writer, input).with_kicks(stop.clone(), vm.machine.clock.clone());
    if let (Some(tap), Some(card)) = (&tap, &vm.machine.net) {
        // Outside FT a frame leaves as soon as the guest sends it.
        card.lock().unwrap().set_sink(Box::new(tap.writer()));
        rec = rec.with_net(tap.spawn_reader());
    }
    log::debug!(
        "ftvm: booting {} ({} MiB, entry {:#x}, cmdline {:?})",
        cfg.kernel.name, cfg.mem_bytes >> 20, vm.entry, cfg.cmdline
    );
    let out = engine::run(vm.guest(), &mut rec, &RunOptions { progress: guest.verbose, stop })?;
    let _ = std::io::stdout().flush();
    let (what, code) = out.ending.describe();
    report(&vm, &out, &what);
    match log {
        Some(p) => eprintln!("ftvm: {} -> {}", rec.summary(), p.display()),
        None if guest.verbose => eprintln!("ftvm: {}", rec.summary()),
        None => {}
    }
    report_net(&vm, &rec);
    Ok(code)
}

fn replay(log: &Path, snaps: &SnapshotArgs, kernel: Option<&Path>, initrd: Option<&Path>, verbose: bool) -> Result<i32> {
    let reader = LogReader::open(log)?.end_is_final();
    let h = reader.header().clone();
    let name = log.display().to_string();
    let cfg = GuestConfig::for_log(&h, &name, kernel, initrd)?;
    log::debug!("ftvm: replaying {name} (recorded by ftvm {}, {} MiB, cmdline {:?})", h.ftvm_version, h.mem_bytes >> 20, h.cmdline);
    // A snapshot of another guest is refused before the VM is built.
    let from = snaps.from.as_deref().map(|p| Snapshot::load(p, Some(&cfg.header()))).transpose()?;
    let start = from.as_ref().map(|s| s.position);
    if let (Some(at), Some(p)) = (snaps.snapshot_at, start) {
        anyhow::ensure!(at > p.ordinal, "--snapshot-at {at} is not after exit #{}, where the run resumes", p.ordinal);
    }
    anyhow::ensure!(snaps.snapshot_at != Some(0), "--snapshot-at 0 is boot, not an exit: take a snapshot at exit 1 or later");
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::replay()), Box::new(StdoutSink), Default::default())?;
    let mut rep = Replayer::new(reader);
    if let (Some(s), Some(path)) = (&from, &snaps.from) {
        s.restore_vm(&mut vm)?;
        rep = rep.resume_after(s.position);
        eprintln!(
            "ftvm: resuming from {} at exit #{} ({} rip {:#x}), after {} bytes of console output",
            path.display(), s.position.ordinal, s.position.exit, s.position.rip, s.console_bytes()
        );
    }
    install_interrupt_handlers();
    let opts = RunOptions { progress: verbose, ..Default::default() };
    let (res, taken) = match (snaps.snapshot_at, &snaps.snapshot_out) {
        (Some(at), Some(out)) => {
            let save = |s: Snapshot| {
                let n = s.save(out).map_err(|e| e.to_string())?;
                eprintln!(
                    "ftvm: snapshot at exit #{} ({} rip {:#x}), after {} bytes of console output -> {} ({n} bytes)",
                    s.position.ordinal, s.position.exit, s.position.rip, s.console_bytes(), out.display()
                );
                Ok(())
            };
            let mut inputs = SnapshotAt::new(&mut rep, at, cfg.header(), save);
            let res = engine::run_from(vm.guest(), &mut inputs, &opts, start);
            (res, inputs.taken)
        }
        _ => (engine::run_from(vm.guest(), &mut rep, &opts, start), None),
    };
    let _ = std::io::stdout().flush();
    let out = res.with_context(|| format!("replaying {name}"))?;
    let (what, mut code) = out.ending.describe();
    let whence = match &snaps.from {
        Some(p) => format!(" from {}", p.display()),
        None => String::new(),
    };
    match &out.ending {
        Ending::Guest(_) => {
            eprintln!("replay verified: {name}{whence} ({}); {what}; {}", rep.summary(), out.summary());
            code = 0;
        }
        Ending::Interrupted if rep.end.is_some() => {
            eprintln!("replay verified: {name}{whence} ({}); the recording was interrupted there; {}", rep.summary(), out.summary());
            code = 0;
        }
        Ending::LogIncomplete(why) => {
            eprintln!("ftvm: replay incomplete: {why}; everything up to there matched ({}); {}", rep.summary(), out.summary());
        }
        _ => eprintln!("ftvm: replay {what}: {}", out.summary()),
    }
    if let (Some(at), None) = (snaps.snapshot_at, taken) {
        eprintln!("ftvm: no snapshot written: the replay did not complete exit #{at} (it ended at exit #{})", out.exits);
        if code == 0 {
            code = 1;
        }
    }
    Ok(code)
}

/// Exit codes of `log dump` and `log stats`, as for `replay`: 0 a whole
/// log, 1 a damaged one, 3 one that stops early.
fn log_error_code(e: &replay_log::LogError) -> i32 {
    if e.is_truncated() { 3 } else { 1 }
}

fn log_dump(path: &Path) -> Result<i32> {
    let mut r = LogReader::open(path)?.end_is_final();
    let h = r.header().clone();
    let mut out = std::io::stdout().lock();
    let net = h.net_mac.map(|m| format!(" net {}", ftvm::net::format_mac(&m))).unwrap_or_default();
    writeln!(
        out,
        "# {}: ftvm {} kernel '{}' sha256 {} mem {} MiB cmdline {:?}{net}",
        path.display(), h.ftvm_version, h.kernel_name, hex(&h.kernel_sha256), h.mem_bytes >> 20, h.cmdline
    )?;
    loop {
        let n = r.records_read();
        match r.next_record() {
            Ok(Some(rec)) => writeln!(out, "#{n} {rec}")?,
            Ok(None) => return Ok(0),
            Err(e) => {
                out.flush()?;
                eprintln!("ftvm: {e}");
                return Ok(log_error_code(&e));
            }
        }
    }
}

fn log_stats(path: &Path) -> Result<i32> {
    let r = LogReader::open(path)?.end_is_final();
    let (s, tail) = replay_log::stats(r);
    println!("log: {}", path.display());
    println!("records: {}  bytes: {} (header {})", s.records, s.bytes, s.header_bytes);
    for (kind, (n, b)) in &s.by_kind {
        println!("  {kind:<10} {n:>9} records {b:>11} bytes");
    }
    println!("exits: {}", s.last_ordinal);
    match s.guest_ns {
        Some(ns) if ns > 0 => {
            let secs = ns as f64 / 1e9;
            println!(
                "guest time: {secs:.3} s  log rate: {:.0} bytes/s ({:.4} Mbit/s)  events/s: {:.0}",
                s.bytes as f64 / secs,
                s.bytes as f64 * 8.0 / secs / 1e6,
                s.records as f64 / secs
            );
        }
        _ => println!("guest time: unknown (no time records)"),
    }
    println!("complete: {}", if s.ended { "yes (end record present)" } else { "no end record" });
    if let Some(e) = tail {
        eprintln!("ftvm: {e}");
        return Ok(log_error_code(&e));
    }
    Ok(0)
}

/// Diagnostics through the `log` facade: ftvm's own messages at `info`
/// (as before: one line each, no decoration), details with `-v` or
/// `RUST_LOG=debug`.
fn init_logging(verbose: bool) {
    use std::io::Write as _;
    let level = if verbose { log::LevelFilter::Debug } else { log::LevelFilter::Info };
    let mut b = env_logger::Builder::new();
    // gdbstub logs every packet it does not handle at info level.
    b.filter_level(level).filter_module("gdbstub", log::LevelFilter::Warn).parse_env("RUST_LOG").format(|f, r| match r.level() {
        log::Level::Info => writeln!(f, "{}", r.args()),
        log::Level::Warn | log::Level::Error => writeln!(f, "{}", r.args()),
        l => writeln!(f, "[{}] {}", l.as_str().to_lowercase(), r.args()),
    });
    let _ = b.try_init();
}

/// A role's exit code; its ending was already reported on stderr.
fn ended((_msg, code): (String, i32)) -> i32 {
    code
}

pub fn main() -> Result<i32> {
    let cli = Cli::parse();
    let verbose = match &cli.cmd {
        Cmd::Run(g) | Cmd::Record { guest: g, .. } | Cmd::Primary { guest: g, .. } => g.verbose,
        Cmd::Replay { guest, .. } | Cmd::Backup { guest, .. } => guest.verbose,
        _ => false,
    };
    init_logging(verbose);
    match cli.cmd {
        Cmd::Run(g) => run_live(g, None),
        Cmd::Record { log, guest } => run_live(guest, Some(&log)),
        Cmd::Replay { log, debug: GdbArgs { gdb: Some(listen), checkpoint_every }, guest: g, .. } => {
            let reader = LogReader::open(&log)?;
            let cfg = GuestConfig::for_log(reader.header(), &log.display().to_string(), g.kernel.as_deref(), g.initrd.as_deref())?;
            drop(reader);
            let opts = ftvm::gdb::GdbOptions { listen, checkpoint_every: checkpoint_every.max(1), ..Default::default() };
            Ok(ftvm::gdb::replay_under_gdb(&log, &cfg, &opts)?)
        }
        Cmd::Replay { log, snapshots, guest: g, .. } => replay(&log, &snapshots, g.kernel.as_deref(), g.initrd.as_deref(), g.verbose),
        Cmd::GuestElf { out } => {
            std::fs::write(&out, ftvm_guest::TEST_GUEST_ELF).with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("ftvm: wrote the test guest's ELF ({} bytes, with symbols) to {}; load it with `gdb {}`", ftvm_guest::TEST_GUEST_ELF.len(), out.display(), out.display());
            Ok(0)
        }
        Cmd::Keygen { out } => {
            ClusterKey::generate()?.write_new(&out)?;
            eprintln!("ftvm: wrote a new cluster key to {} (mode 0600); give it to every role and client with --key", out.display());
            Ok(0)
        }
        Cmd::Witness { listen, state, key } => {
            let mut w = Witness::bind(&listen, key.load()?)?;
            if let Some(path) = &state {
                w = w.with_state_file(path)?;
            }
            eprintln!("witness: listening on {}", w.local_addr());
            w.serve()?;
            Ok(0)
        }
        Cmd::Primary { witness, listen, new_run, key, guest } => {
            let key = key.load()?;
            let cfg = guest.config()?;
            let net = guest.net.as_ref().map(|n| ftvm::ft::net::FtNet::open(&n.tap)).transpose()?;
            Ok(ended(run_primary(PrimaryOpts { witness: witness.at()?, listen, key, progress: guest.verbose, new_run, net }, cfg)?))
        }
        Cmd::Backup { witness, listen, advertise, key, guest: g, net } => {
            let key = key.load()?;
            let net = net.as_ref().map(|n| ftvm::ft::net::FtNet::open(&n.tap)).transpose()?;
            let opts = BackupOpts { witness: witness.at()?, listen, advertise, key, kernel: g.kernel, initrd: g.initrd, progress: g.verbose, net };
            Ok(ended(run_backup(opts)?))
        }
        Cmd::Console { witness, give_up, key } => {
            ftvm::ft::remote_console::run_client(&witness.at()?, &key.load()?, std::time::Duration::from_secs(give_up))
        }
        Cmd::Status { witness, key } => {
            let s = WitnessClient::new(&witness.at()?, &key.load()?).status()?;
            let ready = if s.backup_ready { format!("holds the state, replayed to exit #{}", s.backup_applied) } else { "joining".into() };
            let backup = match &s.view.backup {
                Some(b) => format!("{b} ({}, {ready})", if s.backup_alive { "alive" } else { "silent" }),
                None => "none".into(),
            };
            let lease = s.lease_left_ms.map_or("none".into(), |ms| format!("{ms} ms left"));
            let text = format!(
                "state: {}\nview: {}\nrun: {}\nprimary: {}\nbackup: {backup}\nlease: {lease}\nlog: primary at exit #{}, backup acknowledged #{} (lag {} exits)\noutput: {} bytes released\n",
                s.state(),
                s.view.number,
                s.view.run.as_deref().unwrap_or("none"),
                s.view.primary.as_deref().unwrap_or("none"),
                s.primary_sent,
                s.primary_acked,
                s.primary_sent.saturating_sub(s.primary_acked),
                s.released
            );
            // A reader that stops early (`| head -1`) is not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            Ok(0)
        }
        Cmd::Log { cmd: LogCmd::Dump { file } } => log_dump(&file),
        Cmd::Log { cmd: LogCmd::Stats { file } } => log_stats(&file),
    }
}
