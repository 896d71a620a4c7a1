//! Booting a Linux kernel: the uncompressed `vmlinux` ELF, entered through
//! the 64-bit boot protocol with a zero page, and made deterministic by
//! turning every `rdtsc`/`rdtscp` in the kernel's code into a trap ftvm
//! answers with a logged value.
//!
//! KVM cannot make `rdtsc` exit (it never sets RDTSC exiting), and Linux
//! executes it even with the TSC hidden from CPUID (`get_cycles()` for the
//! entropy pool, among others). So before boot, ftvm decodes every
//! executable section of the kernel with iced-x86 and overwrites each
//! `rdtsc` (0f 31) with `hlt; int3` (f4 cc) and each `rdtscp` (0f 01 f9)
//! with `hlt; int3; int3`. With no in-kernel irqchip a `hlt` always exits
//! to the VMM, which recognises the site, puts the time in EDX:EAX and
//! steps over it. The alternative replacements (`.altinstr_replacement`)
//! are patched too, so code the kernel copies in at boot traps as well; a
//! site the kernel copied somewhere we didn't see is recognised by its
//! byte pattern.

use std::collections::BTreeMap;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::elf::{Elf, ElfError, Segment};
use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("initrd {name} ({size} bytes) does not fit in guest memory of {mem} bytes")]
    InitrdTooBig { name: String, size: usize, mem: u64 },
    #[error("writing the zero page: {0}")]
    ZeroPage(vm_memory::GuestMemoryError),
    #[error("loading the initrd: {0}")]
    Initrd(vm_memory::GuestMemoryError),
}

/// The time-stamp counter the guest sees ticks at 1 GHz: TSC = guest ns.
pub const TSC_HZ: u64 = 1_000_000_000;

/// Command-line words ftvm adds for Linux: the machine has no APIC and no
/// usable TSC; `lpj` skips the delay-loop calibration that busy-waits for
/// a timer tick (interrupts arrive only at exits, so it would never see one).
pub const LINUX_CMDLINE: &str = "console=ttyS0 noapic nolapic nokaslr lpj=2000000 tsc=unstable pci=off reboot=k panic=-1 i8042.noaux";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    Rdtsc,
    Rdtscp,
}

impl TrapKind {
    pub fn insn_len(self) -> u64 {
        match self {
            TrapKind::Rdtsc => 2,
            TrapKind::Rdtscp => 3,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Traps {
    /// Patched sites by virtual address.
    pub sites: BTreeMap<u64, TrapKind>,
    /// (vaddr, paddr, size) of the loaded segments, to read guest code.
    segments: Vec<(u64, u64, u64)>,
    pub in_text: usize,
    pub in_alternatives: usize,
}

/// Whether an ELF is a Linux kernel (it carries "Linux" or "Xen" notes),
/// rather than a bare guest like the built-in test guest. A file that is
/// not a valid x86-64 ELF is not one; damaged notes are skipped.
pub fn is_linux_elf(b: &[u8]) -> bool {
    let Ok(e) = Elf::parse("", b) else { return false };
    let is_linux = e
        .notes()
        .filter_map(Result::ok)
        .any(|n| n.name.starts_with(b"Linux") || n.name.starts_with(b"Xen"));
    is_linux
}

/// Finds and patches every `rdtsc`/`rdtscp` in the kernel's executable
/// sections, in the file image before it is loaded.
pub fn patch_rdtsc(b: &mut [u8], name: &str) -> Result<Traps, LinuxError> {
    let e = Elf::parse(name, b)?;
    let segments = e.segments().filter(Segment::is_load).map(|s| (s.vaddr, s.paddr, s.memsz)).collect();
    let mut traps = Traps { segments, ..Traps::default() };
    let mut patches = Vec::new();
    for s in e.sections()? {
        if !s.is_executable() || !s.is_progbits() || s.size == 0 {
            continue;
        }
        let range = e.section_range(&s)?;
        let mut dec = Decoder::with_ip(64, &b[range.clone()], s.addr, DecoderOptions::NONE);
        while dec.can_decode() {
            let ins = dec.decode();
            let kind = match ins.mnemonic() {
                Mnemonic::Rdtsc => TrapKind::Rdtsc,
                Mnemonic::Rdtscp => TrapKind::Rdtscp,
                _ => continue,
            };
            // The instruction's offset in the section (the decoder's IP
            // is `s.addr` plus it, wrapping), so the patch lands in the
            // section's bytes.
            let file_off = range.start + ins.ip().wrapping_sub(s.addr) as usize;
            patches.push((file_off, kind));
            traps.sites.insert(ins.ip(), kind);
            if s.name.starts_with(".altinstr") {
                traps.in_alternatives += 1;
            } else {
                traps.in_text += 1;
            }
        }
    }
    for (off, kind) in patches {
        let pat: &[u8] = match kind {
            TrapKind::Rdtsc => &[0xf4, 0xcc],
            TrapKind::Rdtscp => &[0xf4, 0xcc, 0xcc],
        };
        b[off..off + pat.len()].copy_from_slice(pat);
    }
    Ok(traps)
}

impl Traps {
    fn paddr(&self, v: u64) -> Option<u64> {
        self.segments.iter().find(|(va, _, sz)| v >= *va && v < va + sz).map(|(va, pa, _)| pa + (v - va))
    }

    /// The trap a `hlt` that exited with RIP `rip` stands for, if any.
    pub fn lookup(&self, mem: &GuestMemoryMmap, rip: u64) -> Option<(u64, TrapKind)> {
        let site = rip.wrapping_sub(1);
        if let Some(k) = self.sites.get(&site) {
            return Some((site, *k));
        }
        // Copied in by the kernel (alternatives): recognise the pattern.
        let mut buf = [0u8; 3];
        mem.read_slice(&mut buf, GuestAddress(self.paddr(site)?)).ok()?;
        match buf {
            [0xf4, 0xcc, 0xcc] => Some((site, TrapKind::Rdtscp)),
            [0xf4, 0xcc, _] => Some((site, TrapKind::Rdtsc)),
            _ => None,
        }
    }
}

/// The zero page of the 64-bit boot protocol: command line, initrd, e820.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), LinuxError> {
    let mut p = boot_params::default();
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448; // "HdrS"
    p.hdr.version = 0x020f;
    p.hdr.kernel_alignment = 0x0100_0000;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let e820 = [
        boot_e820_entry { addr: 0, size: EBDA_START, r#type: 1 },
        boot_e820_entry { addr: HIMEM_START, size: mem_bytes - HIMEM_START, r#type: 1 },
    ];
    p.e820_table[..e820.len()].copy_from_slice(&e820);
    p.e820_entries = e820.len() as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_ADDR)).map_err(LinuxError::ZeroPage)
}

/// Puts the initrd at the top of memory (page aligned); returns (addr, size).
pub fn load_initrd(mem: &GuestMemoryMmap, mem_bytes: u64, name: &str, data: &[u8], kernel_end: u64) -> Result<(u64, u64), LinuxError> {
    let size = data.len() as u64;
    let top = mem_bytes.min(0xC000_0000);
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end);
    let Some(addr) = addr else {
        return Err(LinuxError::InitrdTooBig { name: name.into(), size: data.len(), mem: mem_bytes });
    };
    mem.write_slice(data, GuestAddress(addr)).map_err(LinuxError::Initrd)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::elf::tests::{hot_spots, with_linux_notes, Rng};

    #[test]
    fn the_test_guest_is_not_linux() {
        assert!(!is_linux_elf(ftvm_guest::TEST_GUEST_ELF));
    }

    #[test]
    fn linux_notes_make_a_linux_elf() {
        let b = with_linux_notes();
        assert!(is_linux_elf(&b));
        // Either owner is enough: rename the other one away.
        let at = |b: &[u8], pat: &[u8]| b.windows(pat.len()).rposition(|w| w == pat).unwrap();
        let mut xen_only = b.clone();
        let i = at(&xen_only, b"Linux\0");
        xen_only[i] = b'l';
        assert!(is_linux_elf(&xen_only));
        let mut linux_only = b.clone();
        let i = at(&linux_only, b"Xen\0");
        linux_only[i] = b'x';
        assert!(is_linux_elf(&linux_only));
        let mut neither = xen_only;
        neither[i] = b'x';
        assert!(!is_linux_elf(&neither));
        // Not an ELF file, or not an x86-64 one: not Linux.
        assert!(!is_linux_elf(b""));
        assert!(!is_linux_elf(b"Linux"));
        let mut elf32 = b;
        elf32[4] = 1;
        assert!(!is_linux_elf(&elf32));
    }

    #[test]
    fn patch_rdtsc_reports_elf_errors_by_name() {
        let mut short = ftvm_guest::TEST_GUEST_ELF[..ftvm_guest::TEST_GUEST_ELF.len() - 1].to_vec();
        let e = patch_rdtsc(&mut short, "vmlinux").unwrap_err().to_string();
        assert!(e.starts_with("vmlinux: truncated section header table at offset 0x"), "{e}");
        let mut garbage = b"not an elf".to_vec();
        let e = patch_rdtsc(&mut garbage, "vmlinux").unwrap_err().to_string();
        assert!(e.starts_with("vmlinux: not an ELF file"), "{e}");
    }

    /// Truncated and damaged images: errors, never a panic.
    #[test]
    fn no_panic_on_truncated_or_damaged_kernels() {
        for base in [ftvm_guest::TEST_GUEST_ELF.to_vec(), with_linux_notes()] {
            for len in 0..=base.len() {
                let mut b = base[..len].to_vec();
                let _ = is_linux_elf(&b);
                let _ = patch_rdtsc(&mut b, "t");
            }
            let spots = hot_spots(&base);
            let mut rng = Rng(0x0dd_ba11_cafe_f00d);
            for _ in 0..3000 {
                let mut b = base.clone();
                for _ in 0..1 + rng.below(4) {
                    let r = &spots[rng.below(spots.len())];
                    let at = (r.start + rng.below(r.len().max(1))).min(b.len() - 1);
                    b[at] = rng.next() as u8;
                }
                let _ = is_linux_elf(&b);
                let _ = patch_rdtsc(&mut b, "t");
            }
        }
    }

    /// The Debian kernel scripts/linux-guest.sh fetches: a Linux ELF whose
    /// rdtsc sites, in .text and in the alternatives, all get patched.
    #[test]
    fn real_vmlinux_is_patched() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest/linux/out/vmlinux");
        let mut b = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; run scripts/linux-guest.sh to fetch the guest kernel", path.display())
        });
        assert!(is_linux_elf(&b));
        let orig = b.clone();
        let t = patch_rdtsc(&mut b, "vmlinux").unwrap();
        assert!(t.in_text > 0 && t.in_alternatives > 0, "{t:?}");
        assert_eq!(t.sites.len(), t.in_text + t.in_alternatives);
        // Every site reads as a trap now, and only the sites changed.
        let e = Elf::parse("vmlinux", &orig).unwrap();
        e.check_load_segments().unwrap();
        let sections = e.sections().unwrap();
        let mut changed = 0;
        for (&site, &kind) in &t.sites {
            let s = sections.iter().find(|s| s.is_executable() && (s.addr..s.addr + s.size).contains(&site)).unwrap();
            let off = (s.offset + site - s.addr) as usize;
            let len = kind.insn_len() as usize;
            assert_eq!(&b[off..off + 2], &[0xf4, 0xcc]);
            changed += len;
        }
        let diff = orig.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(diff <= changed && diff > 0);
    }

    #[test]
    fn rdtsc_sites_are_found_and_patched() {
        // A tiny ELF built around the test guest, with rdtsc/rdtscp planted
        // in its executable section.
        let mut elf = ftvm_guest::TEST_GUEST_ELF.to_vec();
        let text = Elf::parse("t", &elf).unwrap().section_by_name(".text").unwrap().expect(".text");
        let off = text.offset as usize;
        // nop; rdtsc; nop; rdtscp; ret
        let code = [0x90, 0x0f, 0x31, 0x90, 0x0f, 0x01, 0xf9, 0xc3];
        elf[off..off + code.len()].copy_from_slice(&code);
        let traps = patch_rdtsc(&mut elf, "t").unwrap();
        assert_eq!(traps.sites.get(&(text.addr + 1)), Some(&TrapKind::Rdtsc));
        assert_eq!(traps.sites.get(&(text.addr + 4)), Some(&TrapKind::Rdtscp));
        assert_eq!(&elf[off..off + 8], &[0x90, 0xf4, 0xcc, 0x90, 0xf4, 0xcc, 0xcc, 0xc3]);
        assert!(traps.in_text >= 2);
    }
}
