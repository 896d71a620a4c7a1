//! Boot setup for a 64-bit guest entered directly in long mode: small
//! functions over guest memory and the vCPU's registers. Addresses come from
//! `layout`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing boot data at guest address {addr:#x}: {err}")]
    Memory { addr: u64, err: vm_memory::GuestMemoryError },
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
}

fn write_u64s(mem: &GuestMemoryMmap, addr: u64, vals: &[u64]) -> Result<(), BootError> {
    for (i, v) in vals.iter().enumerate() {
        let a = addr + 8 * i as u64;
        mem.write_obj(*v, GuestAddress(a))
            .map_err(|err| BootError::Memory { addr: a, err })?;
    }
    Ok(())
}

/// GDT with a flat 64-bit code segment and a flat data segment; the entry
/// state needs it because segment registers are loaded from it on the first
/// reload the guest does.
const GDT: [u64; 3] = [
    0,                     // null
    0x00af_9a00_0000_ffff, // code: present, DPL0, exec/read, L=1, G=1
    0x00cf_9200_0000_ffff, // data: present, DPL0, read/write, D/B=1, G=1
];

pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    write_u64s(mem, GDT_ADDR, &GDT)?;
    // An empty IDT: the guest installs its own.
    write_u64s(mem, IDT_ADDR, &[0])
}

/// Identity map of the first 4 GiB with 2 MiB pages, so that an ELF guest
/// linked at its physical address can run without building page tables.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write_u64s(mem, PML4_ADDR, &[PDPT_ADDR | PRESENT_RW])?;
    let pdpt: Vec<u64> = (0..PD_COUNT)
        .map(|i| (PD_ADDR + i * 0x1000) | PRESENT_RW)
        .collect();
    write_u64s(mem, PDPT_ADDR, &pdpt)?;
    for i in 0..PD_COUNT {
        let pd: Vec<u64> = (0..512u64)
            .map(|j| ((i * 512 + j) << 21) | PRESENT_RW | HUGE)
            .collect();
        write_u64s(mem, PD_ADDR + i * 0x1000, &pd)?;
    }
    Ok(())
}

pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX - 1 });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|err| BootError::Memory { addr: CMDLINE_ADDR, err })
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode with paging on, flat segments from our GDT.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;

    sregs.cs = segment(CODE_SEL, 0xb, true);
    let data = segment(DATA_SEL, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Entry registers of the ELF boot contract: RDI = command line, RSI =
/// memory size, interrupts off.
pub fn elf_entry_regs(entry: u64, mem_bytes: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rdi: CMDLINE_ADDR,
        rsi: mem_bytes,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87/SSE state after reset, as the SDM gives it.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem();
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PD_ADDR + 0x3000);
        // Last 2 MiB page of the 4th GiB maps to itself.
        let e: u64 = m.read_obj(GuestAddress(PD_ADDR + 0x3000 + 511 * 8)).unwrap();
        assert_eq!(e & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(e & 0x83, 0x83);
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let m = mem();
        write_cmdline(&m, "seconds=2").unwrap();
        let mut b = [0u8; 10];
        m.read_slice(&mut b, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&b, b"seconds=2\0");
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(CMDLINE_MAX)),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(write_cmdline(&m, "a\0b"), Err(BootError::CmdlineNul)));
    }
}
