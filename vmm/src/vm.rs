//! Creating the VM: KVM handles, guest memory, the vCPU in its entry state.

use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot;
use crate::clock::VmClock;
use crate::config::GuestConfig;
use crate::engine::Guest;
use crate::vcpu::{KvmVcpu, Slot, VmLink};
use crate::vcpu_state::msr_excluded;
use crate::cpuid;
use crate::devices::OutputSink;
use crate::linux;
use crate::machine::Machine;

/// Where the legacy PCI hole would start; guest RAM stays below it.
const MAX_MEM: u64 = 3 << 30;
const MIN_MEM: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}{hint}", hint = kvm_hint(.0))]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM {what} failed: {err}")]
    Kvm { what: &'static str, err: kvm_ioctls::Error },
    #[error("guest memory of {0} bytes is not supported: use between 4 MiB and 3 GiB")]
    MemSize(u64),
    #[error("allocating {bytes} bytes of guest memory: {err}")]
    Memory { bytes: u64, err: String },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    Linux(#[from] linux::LinuxError),
}

fn kvm_hint(e: &kvm_ioctls::Error) -> &'static str {
    match e.errno() {
        libc::ENOENT => " (no /dev/kvm: is KVM enabled on this host, kvm_intel/kvm_amd loaded?)",
        libc::EACCES | libc::EPERM => {
            " (permission denied: add yourself to the 'kvm' group or run as root)"
        }
        _ => "",
    }
}

pub struct Vm {
    pub kvm: Kvm,
    pub vm_fd: Arc<VmFd>,
    pub vcpu: KvmVcpu,
    pub mem: GuestMemoryMmap,
    pub machine: Machine,
    pub entry: u64,
    /// Patched `rdtsc`/`rdtscp` sites of a Linux guest.
    pub traps: Option<linux::Traps>,
}

impl Vm {
    pub fn new(
        cfg: &GuestConfig,
        clock: Arc<VmClock>,
        console: Box<dyn OutputSink>,
        ordinal: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<Vm, VmError> {
        if !(MIN_MEM..=MAX_MEM).contains(&cfg.mem_bytes) {
            return Err(VmError::MemSize(cfg.mem_bytes));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(|err| VmError::Kvm { what: "create VM", err })?;
        // Only VT-x needs the TSS region; other backends may refuse it,
        // which is harmless.
        let _ = vm.set_tss_address(0xfffb_d000);

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), cfg.mem_bytes as usize)])
            .map_err(|e| VmError::Memory { bytes: cfg.mem_bytes, err: e.to_string() })?;
        let mut slots = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Memory { bytes: cfg.mem_bytes, err: e.to_string() })?;
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()`
            // bytes owned by `mem`. `mem` is moved into the returned `Vm`
            // together with the VM fd and is never unmapped while the VM fd
            // exists (the process exits, or both are dropped together).
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|err| VmError::Kvm { what: "set user memory region", err })?;
            slots.push(Slot { region: r });
        }

        let is_linux = linux::is_linux_elf(&cfg.kernel.bytes);
        let cmdline = cfg.effective_cmdline();
        let mut traps = None;
        let entry = if is_linux {
            let mut image = cfg.kernel.bytes.clone();
            let t = linux::patch_rdtsc(&mut image, &cfg.kernel.name)?;
            let (entry, kernel_end) = cfg.kernel.load_bytes(&mem, &image)?;
            let initrd = match &cfg.initrd {
                Some((name, data)) => Some(linux::load_initrd(&mem, cfg.mem_bytes, name, data, kernel_end)?),
                None => None,
            };
            linux::write_zero_page(&mem, cfg.mem_bytes, cmdline.len(), initrd)?;
            enable_msr_traps(&kvm, &vm)?;
            traps = Some(t);
            entry
        } else {
            cfg.kernel.load(&mem)?
        };
        boot::write_gdt(&mem)?;
        boot::write_page_tables(&mem)?;
        boot::write_cmdline(&mem, &cmdline)?;

        let vcpu = vm.create_vcpu(0).map_err(|err| VmError::Kvm { what: "create vCPU", err })?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|err| VmError::Kvm { what: "get supported CPUID", err })?;
        vcpu.set_cpuid2(&cpuid::guest_cpuid(&supported))
            .map_err(|err| VmError::Kvm { what: "set CPUID", err })?;
        let sregs = vcpu.get_sregs().map_err(|err| VmError::Kvm { what: "get sregs", err })?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(|err| VmError::Kvm { what: "set sregs", err })?;
        let mut regs = boot::elf_entry_regs(entry, cfg.mem_bytes);
        if is_linux {
            // 64-bit boot protocol: RSI points at the zero page.
            regs.rsi = crate::layout::ZERO_PAGE_ADDR;
            regs.rdi = 0;
        }
        vcpu.set_regs(&regs)
            .map_err(|err| VmError::Kvm { what: "set regs", err })?;
        vcpu.set_fpu(&boot::initial_fpu())
            .map_err(|err| VmError::Kvm { what: "set FPU", err })?;

        let mut machine = Machine::new(clock, console, ordinal)?;
        if let Some(mac) = cfg.net_mac {
            // Frames are counted until the caller gives the card a backend
            // (`VirtioNet::set_sink`): replay, and a backup, send nothing.
            machine.add_net(mac, mem.clone(), Box::new(crate::net::CountingSink::default()))?;
        }
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|err| VmError::Kvm { what: "get MSR index list", err })?
            .as_slice()
            .iter()
            .copied()
            .filter(|&i| !msr_excluded(i))
            .collect();
        let xsave_size = (kvm.check_extension_int(kvm_ioctls::Cap::Xsave2).max(0) as usize).max(4096);
        let vm = Arc::new(vm);
        let link = VmLink { vm: vm.clone(), slots, msr_list, xsave_size };
        Ok(Vm { kvm, vm_fd: vm, vcpu: KvmVcpu::new(vcpu, link), mem, machine, entry, traps })
    }

    /// The guest as the exit loop sees it.
    pub fn guest(&mut self) -> Guest<'_> {
        Guest { vcpu: &mut self.vcpu, machine: &self.machine, mem: &self.mem, traps: self.traps.as_ref() }
    }
}

/// MSRs that carry time: reads and writes exit to ftvm, which answers
/// from the VM clock (and logs it) or refuses with #GP.
pub const TIME_MSRS: &[(u32, u32)] = &[
    (crate::engine::MSR_IA32_TSC, 1),
    (0x11, 2),          // KVM's old wall clock / system time
    (0x3b, 1),          // IA32_TSC_ADJUST
    (0x6e0, 1),         // IA32_TSC_DEADLINE
    (0x4b56_4d00, 8),   // KVM's paravirtual clock and friends
];

fn enable_msr_traps(kvm: &Kvm, vm: &VmFd) -> Result<(), VmError> {
    use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
    if kvm.check_extension_raw(kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR.into()) <= 0 {
        return Ok(());
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [kvm_bindings::KVM_MSR_EXIT_REASON_FILTER as u64, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|err| VmError::Kvm { what: "enable userspace MSR exits", err })?;
    let deny = [0u8; 1];
    let ranges: Vec<MsrFilterRange> = TIME_MSRS
        .iter()
        .map(|&(base, n)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count: n,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(|err| VmError::Kvm { what: "set MSR filter", err })
}
