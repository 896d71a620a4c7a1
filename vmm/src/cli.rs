use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use replay_log::{Header, LogReader, LogWriter};

use ftvm::clock::VmClock;
use ftvm::console::{ConsoleInput, StdoutSink};
use ftvm::devices::StopRequest;
use ftvm::ft::roles::{run_backup, run_primary, BackupOpts, PrimaryOpts};
use ftvm::ft::witness::{Witness, WitnessClient};
use ftvm::engine::{self, Ending, Inputs, Outcome, RunOptions, INTERRUPTED};
use ftvm::kernel::KernelImage;
use ftvm::live::Live;
use ftvm::replay::Replayer;
use ftvm::vm::{GuestConfig, Vm};

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
        /// Kernel the log was recorded with (default: the built-in test guest).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd the log was recorded with, if any.
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, short)]
        verbose: bool,
    },
    /// Hold the view (primary, backup) and the primary's lease.
    Witness {
        /// Address to listen on, e.g. 127.0.0.1:7000.
        #[arg(long)]
        listen: String,
    },
    /// Run the guest as the fault-tolerant primary.
    Primary {
        /// The witness, e.g. 127.0.0.1:7000.
        #[arg(long)]
        witness: String,
        /// Where console clients connect (and how the witness names us).
        #[arg(long, default_value = "127.0.0.1:7100")]
        listen: String,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Stand by as the backup: replay the primary's log, take over if it dies.
    Backup {
        /// The witness, e.g. 127.0.0.1:7000.
        #[arg(long)]
        witness: String,
        /// Where the primary streams its log (and, after a takeover, consoles connect).
        #[arg(long)]
        listen: String,
        /// Kernel of the guest (default: the built-in test guest).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd of the guest, if it has one.
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, short)]
        verbose: bool,
    },
    /// The guest's console, wherever the primary is.
    Console {
        #[arg(long)]
        witness: String,
        /// Give up after this many seconds without a primary.
        #[arg(long, default_value_t = 30)]
        give_up: u64,
    },
    /// Show the view: number, primary, backup, lease, lag.
    Status {
        #[arg(long)]
        witness: String,
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
    /// Progress and details on stderr.
    #[arg(long, short)]
    verbose: bool,
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

fn load_kernel(path: Option<&Path>) -> Result<KernelImage> {
    Ok(match path {
        Some(p) => KernelImage::from_file(p)?,
        None => KernelImage::from_bytes(
            ftvm_guest::TEST_GUEST_NAME.to_string(),
            ftvm_guest::TEST_GUEST_ELF.to_vec(),
        ),
    })
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// SIGINT/SIGTERM end the run cleanly: the log gets its end record. No
/// SA_RESTART, so a blocked `KVM_RUN` returns to the loop.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler
        // only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The stdin reader must not take SIGINT/SIGTERM away from the vCPU thread
/// (which needs the signal to leave KVM_RUN), so it starts with them blocked.
fn spawn_stdin() -> ConsoleInput {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    let input = ConsoleInput::spawn(std::io::stdin());
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
    input
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn exits_summary(o: &Outcome) -> String {
    let s = &o.stats;
    format!(
        "{} exits ({} in, {} out, {} mmio, {} hlt, {} trap, {} msr), {} interrupts injected, {:.2}s",
        o.exits, s.io_in, s.io_out, s.mmio, s.hlt, s.traps, s.msr, s.interrupts,
        o.wall.as_secs_f64()
    )
}

fn guest_config(guest: &GuestArgs) -> Result<(GuestConfig, Header)> {
    let kernel = load_kernel(guest.kernel.as_deref())?;
    let initrd = match &guest.initrd {
        Some(p) => {
            let data = std::fs::read(p).with_context(|| format!("cannot read initrd {}", p.display()))?;
            Some((p.display().to_string(), data))
        }
        None => None,
    };
    let header = Header {
        kernel_sha256: kernel.sha256,
        initrd_sha256: initrd.as_ref().map(|(_, d)| ftvm::kernel::sha256(d)),
        mem_bytes: guest.mem,
        cmdline: guest.cmdline.clone(),
        ftvm_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_name: kernel.name.clone(),
    };
    Ok((GuestConfig { kernel, mem_bytes: guest.mem, cmdline: guest.cmdline.clone(), initrd }, header))
}

fn traps_summary(t: &ftvm::linux::Traps, o: &Outcome) -> String {
    format!(
        "rdtsc/rdtscp: {} sites patched ({} in kernel code, {} in boot-time alternatives), {} traps taken",
        t.in_text + t.in_alternatives, t.in_text, t.in_alternatives, o.stats.traps
    )
}

fn run_live(guest: GuestArgs, log: Option<&Path>) -> Result<i32> {
    let (cfg, header) = guest_config(&guest)?;
    let clock = Arc::new(VmClock::host());
    let mut vm = Vm::new(&cfg, clock, Box::new(StdoutSink), Default::default())?;
    let writer = match log {
        Some(p) => {
            let f = File::create(p).with_context(|| format!("cannot create log {}", p.display()))?;
            let w: Box<dyn Write + Send> = Box::new(BufWriter::new(f));
            Some(LogWriter::new(w, &header).with_context(|| format!("writing log {}", p.display()))?)
        }
        None => None,
    };
    install_signal_handlers();
    let input = if guest.no_stdin { ConsoleInput::none() } else { spawn_stdin() };
    let mut live = Live::new(writer, input);
    if guest.verbose {
        eprintln!(
            "ftvm: booting {} ({} MiB, entry {:#x}, cmdline {:?})",
            cfg.kernel.name, cfg.mem_bytes >> 20, vm.entry, cfg.cmdline
        );
    }
    let out = engine::run(&mut vm, &mut live, &RunOptions { verbose: guest.verbose })?;
    let _ = std::io::stdout().flush();
    let (what, code) = match out.ending.clone() {
        Ending::Guest(StopRequest::Exit(s)) => (format!("guest exited with status {s}"), s as i32),
        Ending::Guest(StopRequest::Reset) => ("guest reset the machine".to_string(), 0),
        Ending::Guest(StopRequest::Halt) => ("guest powered off (halted with interrupts disabled)".to_string(), 0),
        Ending::Interrupted => ("interrupted".to_string(), 130),
        Ending::LogIncomplete(w) => (w, 3),
    };
    eprintln!("ftvm: {what}: {}", exits_summary(&out));
    if let Some(t) = &vm.traps {
        eprintln!("ftvm: {}", traps_summary(t, &out));
    }
    match log {
        Some(p) => eprintln!("ftvm: {} -> {}", live.summary(), p.display()),
        None if guest.verbose => eprintln!("ftvm: {}", live.summary()),
        None => {}
    }
    Ok(code)
}

fn replay(log: &Path, kernel: Option<&Path>, initrd: Option<&Path>, verbose: bool) -> Result<i32> {
    let reader = LogReader::open(log)?;
    let h = reader.header().clone();
    let kernel = load_kernel(kernel)?;
    if kernel.sha256 != h.kernel_sha256 {
        bail!(
            "{} was recorded with kernel '{}' (sha256 {}), but '{}' has sha256 {}: pass --kernel with the kernel it was recorded with",
            log.display(), h.kernel_name, hex(&h.kernel_sha256), kernel.name, hex(&kernel.sha256)
        );
    }
    if verbose {
        eprintln!(
            "ftvm: replaying {} (recorded by ftvm {}, {} MiB, cmdline {:?})",
            log.display(), h.ftvm_version, h.mem_bytes >> 20, h.cmdline
        );
    }
    let initrd = ftvm::ft::roles::load_initrd(initrd, h.initrd_sha256)?;
    let cfg = GuestConfig { kernel, mem_bytes: h.mem_bytes, cmdline: h.cmdline.clone(), initrd };
    let mut vm = Vm::new(&cfg, Arc::new(VmClock::replay()), Box::new(StdoutSink), Default::default())?;
    install_signal_handlers();
    let mut rep = Replayer::new(reader);
    let res = engine::run(&mut vm, &mut rep, &RunOptions { verbose });
    let _ = std::io::stdout().flush();
    let out = res.with_context(|| format!("replaying {}", log.display()))?;
    match out.ending.clone() {
        Ending::Guest(req) => {
            eprintln!(
                "replay verified: {} ({}); guest {}; {}",
                log.display(),
                rep.summary(),
                match req {
                    StopRequest::Exit(s) => format!("exited with status {s}"),
                    StopRequest::Reset => "reset the machine".into(),
                    StopRequest::Halt => "powered off".into(),
                },
                exits_summary(&out)
            );
            Ok(0)
        }
        Ending::Interrupted if rep.end.is_some() => {
            eprintln!(
                "replay verified: {} ({}); the recording was interrupted there; {}",
                log.display(), rep.summary(), exits_summary(&out)
            );
            Ok(0)
        }
        Ending::Interrupted => {
            eprintln!("ftvm: replay interrupted: {}", exits_summary(&out));
            Ok(130)
        }
        Ending::LogIncomplete(why) => {
            eprintln!(
                "ftvm: replay incomplete: {why}; everything up to there matched ({}); {}",
                rep.summary(), exits_summary(&out)
            );
            Ok(3)
        }
    }
}

fn log_dump(path: &Path) -> Result<i32> {
    let mut r = LogReader::open(path)?;
    let h = r.header().clone();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# {}: ftvm {} kernel '{}' sha256 {} mem {} MiB cmdline {:?}",
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
                return Ok(if matches!(e, replay_log::LogError::Truncated { .. }) { 3 } else { 1 });
            }
        }
    }
}

fn log_stats(path: &Path) -> Result<i32> {
    let r = LogReader::open(path)?;
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
        return Ok(3);
    }
    Ok(0)
}

pub fn main() -> Result<i32> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(g) => run_live(g, None),
        Cmd::Record { log, guest } => run_live(guest, Some(&log)),
        Cmd::Replay { log, kernel, initrd, verbose } => replay(&log, kernel.as_deref(), initrd.as_deref(), verbose),
        Cmd::Witness { listen } => {
            let w = Witness::bind(&listen)?;
            eprintln!("witness: listening on {}", w.local_addr());
            w.serve()?;
            Ok(0)
        }
        Cmd::Primary { witness, listen, guest } => {
            let (cfg, header) = guest_config(&guest)?;
            run_primary(PrimaryOpts { witness, listen, verbose: guest.verbose }, cfg, header)
        }
        Cmd::Backup { witness, listen, kernel, initrd, verbose } => {
            run_backup(BackupOpts { witness, listen, kernel, initrd, verbose })
        }
        Cmd::Console { witness, give_up } => ftvm::ft::console::run_client(&witness, std::time::Duration::from_secs(give_up)),
        Cmd::Status { witness } => {
            let s = WitnessClient::new(&witness).status()?;
            println!("view: {}", s.view.number);
            println!("primary: {}", s.view.primary.as_deref().unwrap_or("none"));
            println!("backup: {} ({})", s.view.backup.as_deref().unwrap_or("none"), if s.backup_alive { "alive" } else { "silent" });
            match s.lease_left_ms {
                Some(ms) => println!("lease: {ms} ms left"),
                None => println!("lease: none"),
            }
            println!("log: primary at exit #{}, backup acknowledged #{} (lag {} exits)", s.primary_sent, s.primary_acked, s.primary_sent.saturating_sub(s.primary_acked));
            Ok(0)
        }
        Cmd::Log { cmd: LogCmd::Dump { file } } => log_dump(&file),
        Cmd::Log { cmd: LogCmd::Stats { file } } => log_stats(&file),
    }
}
