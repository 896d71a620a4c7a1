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

use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("{name}: malformed ELF: {what}")]
    Elf { name: String, what: String },
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

/// (type, offset, vaddr, paddr, filesz, memsz)
type Phdr = (u32, u64, u64, u64, u64, u64);
/// (name, flags, addr, offset, size, type)
type Shdr = (String, u64, u64, u64, u64, u32);

struct Elf<'a> {
    b: &'a [u8],
    name: &'a str,
}

impl Elf<'_> {
    fn err(&self, what: &str) -> LinuxError {
        LinuxError::Elf { name: self.name.into(), what: what.into() }
    }
    fn u16(&self, o: usize) -> Result<u16, LinuxError> {
        self.b.get(o..o + 2).map(|s| u16::from_le_bytes(s.try_into().unwrap())).ok_or_else(|| self.err("short file"))
    }
    fn u32(&self, o: usize) -> Result<u32, LinuxError> {
        self.b.get(o..o + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap())).ok_or_else(|| self.err("short file"))
    }
    fn u64(&self, o: usize) -> Result<u64, LinuxError> {
        self.b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap())).ok_or_else(|| self.err("short file"))
    }
    /// (type, offset, vaddr, paddr, filesz, memsz) of each program header.
    fn phdrs(&self) -> Result<Vec<Phdr>, LinuxError> {
        let (off, n, sz) = (self.u64(0x20)? as usize, self.u16(0x38)? as usize, self.u16(0x36)? as usize);
        (0..n)
            .map(|i| {
                let p = off + i * sz;
                Ok((self.u32(p)?, self.u64(p + 8)?, self.u64(p + 16)?, self.u64(p + 24)?, self.u64(p + 32)?, self.u64(p + 40)?))
            })
            .collect()
    }
    /// (name, flags, addr, offset, size, type) of each section.
    fn sections(&self) -> Result<Vec<Shdr>, LinuxError> {
        let (off, n, sz, strndx) =
            (self.u64(0x28)? as usize, self.u16(0x3c)? as usize, self.u16(0x3a)? as usize, self.u16(0x3e)? as usize);
        if n == 0 {
            return Ok(vec![]);
        }
        let stroff = self.u64(off + strndx * sz + 0x18)? as usize;
        (0..n)
            .map(|i| {
                let s = off + i * sz;
                let name_off = stroff + self.u32(s)? as usize;
                let end = self.b[name_off..].iter().position(|&c| c == 0).ok_or_else(|| self.err("section name"))?;
                let name = String::from_utf8_lossy(&self.b[name_off..name_off + end]).into_owned();
                Ok((name, self.u64(s + 8)?, self.u64(s + 0x10)?, self.u64(s + 0x18)?, self.u64(s + 0x20)?, self.u32(s + 4)?))
            })
            .collect()
    }
}

/// Whether an ELF is a Linux kernel (it carries "Linux" or "Xen" notes),
/// rather than a bare guest like the built-in test guest.
pub fn is_linux_elf(b: &[u8]) -> bool {
    let e = Elf { b, name: "" };
    let Ok(ph) = e.phdrs() else { return false };
    for (ty, off, _, _, filesz, _) in ph {
        if ty != 4 {
            continue;
        }
        let (mut p, end) = (off as usize, (off + filesz) as usize);
        while p + 12 <= end.min(b.len()) {
            let (Ok(namesz), Ok(descsz)) = (e.u32(p), e.u32(p + 4)) else { break };
            let name = b.get(p + 12..p + 12 + namesz as usize).unwrap_or(&[]);
            if name.starts_with(b"Linux") || name.starts_with(b"Xen") {
                return true;
            }
            p += 12 + (namesz as usize).div_ceil(4) * 4 + (descsz as usize).div_ceil(4) * 4;
        }
    }
    false
}

/// Finds and patches every `rdtsc`/`rdtscp` in the kernel's executable
/// sections, in the file image before it is loaded.
pub fn patch_rdtsc(b: &mut [u8], name: &str) -> Result<Traps, LinuxError> {
    let e = Elf { b, name };
    let mut traps = Traps::default();
    for (ty, _, vaddr, paddr, _, memsz) in e.phdrs()? {
        if ty == 1 {
            traps.segments.push((vaddr, paddr, memsz));
        }
    }
    let mut patches = Vec::new();
    for (sname, flags, addr, offset, size, sh_type) in e.sections()? {
        const SHF_EXECINSTR: u64 = 4;
        const SHT_PROGBITS: u32 = 1;
        if flags & SHF_EXECINSTR == 0 || sh_type != SHT_PROGBITS || size == 0 {
            continue;
        }
        let data = b.get(offset as usize..(offset + size) as usize).ok_or_else(|| e.err("section past end of file"))?;
        let mut dec = Decoder::with_ip(64, data, addr, DecoderOptions::NONE);
        while dec.can_decode() {
            let ins = dec.decode();
            let kind = match ins.mnemonic() {
                Mnemonic::Rdtsc => TrapKind::Rdtsc,
                Mnemonic::Rdtscp => TrapKind::Rdtscp,
                _ => continue,
            };
            let file_off = (offset + ins.ip() - addr) as usize;
            patches.push((file_off, kind));
            traps.sites.insert(ins.ip(), kind);
            if sname.starts_with(".altinstr") {
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

    #[test]
    fn the_test_guest_is_not_linux() {
        assert!(!is_linux_elf(ftvm_guest::TEST_GUEST_ELF));
    }

    #[test]
    fn rdtsc_sites_are_found_and_patched() {
        // A tiny ELF built around the test guest, with rdtsc/rdtscp planted
        // in its executable section.
        let mut elf = ftvm_guest::TEST_GUEST_ELF.to_vec();
        let e = Elf { b: &elf, name: "t" };
        let text = e.sections().unwrap().into_iter().find(|s| s.0 == ".text").expect(".text");
        let off = text.3 as usize;
        // nop; rdtsc; nop; rdtscp; ret
        let code = [0x90, 0x0f, 0x31, 0x90, 0x0f, 0x01, 0xf9, 0xc3];
        elf[off..off + code.len()].copy_from_slice(&code);
        let traps = patch_rdtsc(&mut elf, "t").unwrap();
        assert_eq!(traps.sites.get(&(text.2 + 1)), Some(&TrapKind::Rdtsc));
        assert_eq!(traps.sites.get(&(text.2 + 4)), Some(&TrapKind::Rdtscp));
        assert_eq!(&elf[off..off + 8], &[0x90, 0xf4, 0xcc, 0x90, 0xf4, 0xcc, 0xcc, 0xc3]);
        assert!(traps.in_text >= 2);
    }
}
