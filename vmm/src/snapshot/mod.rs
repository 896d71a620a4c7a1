//! Snapshots: the whole VM at one position, as plain data, and its file
//! (docs/SNAPSHOT.md). A snapshot is taken at the end of an exit, on the
//! vCPU thread, once everything that exit does is done (its inputs, the
//! interrupt injected, its checks): the vCPU's pending exit is completed
//! first (an `in` gets its value, RIP moves past the instruction, no guest
//! code runs), so its state is the state the next `KVM_RUN` starts from.
//! Restored into a fresh VM of the same guest, the run continues from the
//! next exit exactly as the original did: `engine::run_from` starts the
//! exit loop there and `Replayer::resume_after` skips the log up to it.
//!
//! This is what state transfer (a backup that starts from a snapshot
//! instead of replaying from boot) and checkpoints for reverse debugging
//! build on.

mod file;
mod machine_bytes;
mod memory;

use std::io::{BufReader, BufWriter};
use std::path::Path;

use replay_log::{Event, ExitKind, Header, Position};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::hex;
use crate::engine::{EngineError, Ending, ExitPoint, Flow, Inputs, Observed};
use crate::machine::{Machine, MachineState};
use crate::vcpu::Vcpu;
use crate::vcpu_state::VcpuState;
use crate::vm::Vm;

pub use file::{MAGIC, MAX_MEM_BYTES, VERSION};
pub use memory::{capture_chunk, chunk_count, Chunk, MemoryImage, CHUNK};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what} {path}: {err}")]
    Io { what: &'static str, path: String, err: std::io::Error },
    #[error("{name} is not an ftvm snapshot (bad magic at byte 0)")]
    NotASnapshot { name: String },
    #[error("{name} has snapshot format version {found}; this build of ftvm reads version {supported}")]
    Version { name: String, found: u16, supported: u16 },
    #[error("{name} is cut short: it ends inside {section}, which starts at byte offset {offset}")]
    Truncated { name: String, offset: u64, section: String },
    #[error("corrupt snapshot {name}: {section}, at byte offset {offset}: {what}")]
    Corrupt { name: String, offset: u64, section: String, what: String },
    #[error("{name} does not fit this guest: {what}")]
    WrongGuest { name: String, what: String },
    #[error("taking a snapshot at exit #{ordinal}: {what}")]
    Capture { ordinal: u64, what: String },
    #[error("restoring the snapshot of exit #{ordinal}: {what}")]
    Restore { ordinal: u64, what: String },
}

/// The whole VM at the end of one exit.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The guest it is a snapshot of (kernel, initrd, memory size, command
    /// line), as a log header names it.
    pub guest: Header,
    /// The exit it was taken at (ordinal, RIP and kind as the log has
    /// them). The run continues at the next ordinal.
    pub position: Position,
    /// The vCPU, with the exit completed.
    pub vcpu: VcpuState,
    /// Every device and the clock.
    pub machine: MachineState,
    /// Guest memory, compressed.
    pub memory: MemoryImage,
}

impl Snapshot {
    /// Takes a snapshot at the end of the exit `at` (after its
    /// `Observed::ExitDone`): completes the vCPU's pending exit, then
    /// captures the vCPU, the devices, the clock and memory. `guest` names
    /// the guest (`GuestConfig::header`). The run can go on afterwards:
    /// the next `KVM_RUN` simply has nothing left to complete.
    pub fn capture(guest: Header, m: &Machine, at: &mut ExitPoint) -> Result<Snapshot, SnapshotError> {
        let size = guest.mem_bytes;
        Self::capture_with(guest, m, at, |mem| MemoryImage::capture(mem, size))
    }

    /// [`Snapshot::capture`] with memory captured by `memory` (state
    /// transfer: most of it was copied while the guest ran, only the
    /// chunks written since are captured again here).
    pub fn capture_with(
        guest: Header,
        m: &Machine,
        at: &mut ExitPoint,
        memory: impl FnOnce(&GuestMemoryMmap) -> Result<MemoryImage, String>,
    ) -> Result<Snapshot, SnapshotError> {
        let ordinal = at.ordinal;
        let fail = |what: String| SnapshotError::Capture { ordinal, what };
        if at.exit == ExitKind::Boot || ordinal == 0 {
            return Err(fail("boot is not an exit: take a snapshot at exit #1 or later".into()));
        }
        if let Some(req) = m.stop.get() {
            return Err(fail(format!("the guest is stopping ({req:?})")));
        }
        // The position as the log has it: RIP before the exit completes.
        let position = at.position().map_err(|e| fail(e.to_string()))?;
        let vcpu = at.vcpu();
        vcpu.complete_pending().map_err(|e| fail(format!("KVM could not complete the exit: {e}")))?;
        let vcpu = vcpu.capture().map_err(|e| fail(format!("KVM could not capture the vCPU: {e}")))?;
        let machine = m.state();
        let memory = memory(at.mem()).map_err(fail)?;
        Ok(Snapshot { guest, position, vcpu, machine, memory })
    }

    /// Puts the VM in this snapshot's state: memory, the vCPU (its pending
    /// exit, if any, completed first: a fresh vCPU has none), every device
    /// and the clock. Check the guest first ([`Snapshot::check_guest`]);
    /// then start the exit loop with `engine::run_from(.., Some(position))`.
    pub fn restore(&self, vcpu: &mut dyn Vcpu, m: &Machine, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let fail = |what: String| SnapshotError::Restore { ordinal: self.position.ordinal, what };
        let have: u64 = mem.iter().map(|r| r.len()).sum();
        if have != self.memory.size() {
            return Err(fail(format!("the VM has {have} bytes of memory, the snapshot {}", self.memory.size())));
        }
        self.machine.check().map_err(|e| fail(e.to_string()))?;
        self.memory.restore(mem).map_err(fail)?;
        vcpu.complete_pending().map_err(|e| fail(format!("KVM could not complete a pending exit: {e}")))?;
        vcpu.restore(&self.vcpu).map_err(|e| {
            fail(format!("KVM refused the vCPU state ({e}); a snapshot from a host with another CPU (XSAVE size {})?", self.vcpu.xsave.len()))
        })?;
        m.restore(&self.machine).map_err(|e| fail(e.to_string()))
    }

    /// [`Snapshot::restore`] into a VM built by `Vm::new` for this guest.
    pub fn restore_vm(&self, vm: &mut Vm) -> Result<(), SnapshotError> {
        self.restore(&mut vm.vcpu, &vm.machine, &vm.mem)
    }

    /// Refuses a snapshot of another guest than `guest` (kernel, initrd,
    /// memory size, command line), naming both; `name` names the file.
    pub fn check_guest(&self, guest: &Header, name: &str) -> Result<(), SnapshotError> {
        check_guest(&self.guest, guest, name)
    }

    /// Bytes of guest output the console had sent when it was taken: the
    /// continued run's console output follows that many bytes of the
    /// original's.
    pub fn console_bytes(&self) -> u64 {
        self.machine.uart.tx_total
    }

    /// Writes the snapshot to `path` (through a temporary file renamed at
    /// the end, so a crash never leaves half a snapshot under its name);
    /// returns the bytes written.
    pub fn save(&self, path: &Path) -> Result<u64, SnapshotError> {
        let name = path.display().to_string();
        let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().map_or("snapshot".into(), |f| f.to_string_lossy())));
        let io = |what, err| SnapshotError::Io { what, path: name.clone(), err };
        let f = std::fs::File::create(&tmp).map_err(|e| io("cannot create snapshot", e))?;
        let mut w = BufWriter::new(f);
        let n = file::write(self, &mut w).map_err(|e| io("writing snapshot", std::io::Error::other(e)));
        let n = n.and_then(|n| {
            let f = w.into_inner().map_err(|e| io("writing snapshot", e.into_error()))?;
            f.sync_all().map_err(|e| io("writing snapshot", e))?;
            Ok(n)
        });
        match n {
            Ok(n) => std::fs::rename(&tmp, path).map(|()| n).map_err(|e| io("cannot create snapshot", e)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Reads and checks the snapshot at `path`; with `guest`, one of
    /// another guest is refused before its memory is read.
    pub fn load(path: &Path, guest: Option<&Header>) -> Result<Snapshot, SnapshotError> {
        let name = path.display().to_string();
        let f = std::fs::File::open(path).map_err(|err| SnapshotError::Io { what: "cannot open snapshot", path: name.clone(), err })?;
        file::read(BufReader::new(f), &name, guest)
    }

    /// Writes the snapshot to any `Write` (a socket, a buffer).
    pub fn write_to(&self, w: &mut dyn std::io::Write, name: &str) -> Result<u64, SnapshotError> {
        file::write(self, w).map_err(|e| SnapshotError::Io { what: "writing snapshot", path: name.to_string(), err: std::io::Error::other(e) })
    }

    /// Reads a snapshot from any `Read`; `name` names it in errors.
    pub fn read_from(r: impl std::io::Read, name: &str, guest: Option<&Header>) -> Result<Snapshot, SnapshotError> {
        file::read(r, name, guest)
    }
}

/// `snap` is the guest a snapshot was taken of, `guest` the one it is for.
fn check_guest(snap: &Header, guest: &Header, name: &str) -> Result<(), SnapshotError> {
    let wrong = |what: String| Err(SnapshotError::WrongGuest { name: name.to_string(), what });
    if snap.kernel_sha256 != guest.kernel_sha256 {
        return wrong(format!(
            "it was taken of kernel '{}' (sha256 {}), but the guest's kernel '{}' has sha256 {}: pass --kernel with the kernel it was taken of",
            snap.kernel_name, hex(&snap.kernel_sha256), guest.kernel_name, hex(&guest.kernel_sha256)
        ));
    }
    match (snap.initrd_sha256, guest.initrd_sha256) {
        (Some(a), Some(b)) if a != b => return wrong(format!("it was taken with initrd sha256 {}, the guest's has sha256 {}", hex(&a), hex(&b))),
        (Some(_), None) => return wrong("it was taken with an initrd, the guest has none: pass --initrd with the same file".into()),
        (None, Some(_)) => return wrong("it was taken without an initrd, but the guest has one".into()),
        _ => {}
    }
    if snap.mem_bytes != guest.mem_bytes {
        return wrong(format!("it has {} bytes of guest memory ({} MiB), the guest {} ({} MiB)", snap.mem_bytes, snap.mem_bytes >> 20, guest.mem_bytes, guest.mem_bytes >> 20));
    }
    if snap.cmdline != guest.cmdline {
        return wrong(format!("it was taken with command line {:?}, the guest's is {:?}", snap.cmdline, guest.cmdline));
    }
    Ok(())
}

/// The run's own inputs, plus a snapshot at the end of exit `ordinal`,
/// handed to `save` (which writes it somewhere). Everything else passes
/// through untouched, so the run is the run it would have been.
pub struct SnapshotAt<'a, I: Inputs + ?Sized> {
    inner: &'a mut I,
    ordinal: u64,
    guest: Header,
    save: Box<dyn FnMut(Snapshot) -> Result<(), String> + 'a>,
    /// Where the snapshot was taken, once it was.
    pub taken: Option<Position>,
}

impl<'a, I: Inputs + ?Sized> SnapshotAt<'a, I> {
    pub fn new(inner: &'a mut I, ordinal: u64, guest: Header, save: impl FnMut(Snapshot) -> Result<(), String> + 'a) -> Self {
        SnapshotAt { inner, ordinal, guest, save: Box::new(save), taken: None }
    }
}

impl<I: Inputs + ?Sized> Inputs for SnapshotAt<'_, I> {
    fn before_access(&mut self, m: &Machine, ordinal: u64, exit: ExitKind) -> Result<Option<Event>, EngineError> {
        self.inner.before_access(m, ordinal, exit)
    }

    fn arrivals(&mut self, m: &Machine, at: &mut ExitPoint, idle: bool, out: &mut Vec<Event>) -> Result<Flow, EngineError> {
        self.inner.arrivals(m, at, idle, out)
    }

    fn observe(&mut self, m: &Machine, at: &mut ExitPoint, what: Observed) -> Result<Flow, EngineError> {
        let done = matches!(what, Observed::ExitDone);
        let flow = self.inner.observe(m, at, what)?;
        if !done || at.ordinal != self.ordinal || self.taken.is_some() || matches!(flow, Flow::Stop(_)) {
            return Ok(flow);
        }
        let saved = Snapshot::capture(self.guest.clone(), m, at).map_err(|e| e.to_string()).and_then(|s| {
            let pos = s.position;
            (self.save)(s).map(|()| pos)
        });
        match saved {
            Ok(pos) => {
                self.taken = Some(pos);
                Ok(flow)
            }
            Err(why) => Ok(Flow::Stop(Ending::Stopped { why, code: 1 })),
        }
    }

    fn kicked(&mut self, m: &Machine) -> Result<bool, EngineError> {
        self.inner.kicked(m)
    }

    fn resync_next(&mut self, m: &Machine, ordinal: u64) -> Result<bool, EngineError> {
        self.inner.resync_next(m, ordinal)
    }

    fn summary(&self) -> String {
        self.inner.summary()
    }
}

#[cfg(test)]
mod tests;
