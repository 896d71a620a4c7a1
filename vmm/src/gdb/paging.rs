//! Guest-virtual to guest-physical addresses, by walking the guest's own
//! page tables (4-level, 4 KiB / 2 MiB / 1 GiB pages) in guest memory.
//! gdb speaks virtual addresses (symbols, `$rsp`); the walk is done here
//! rather than with `KVM_TRANSLATE` so that it needs no vCPU call, works
//! on a captured CR3 at any stop and can be unit-tested without KVM.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;

/// Where a virtual address lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Its guest-physical address.
    pub gpa: u64,
    /// Bytes from it to the end of its page (at least 1).
    pub page_left: u64,
    /// Whether CPL3 code may use it (U at every level): code there may run
    /// at CPL3, where this KVM neither stops at hardware breakpoints nor
    /// single-steps.
    pub user: bool,
}

/// The paging registers a walk needs (from `kvm_sregs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
}

impl Paging {
    /// Translates `va`; `None` if it is not mapped (or the page tables point
    /// outside guest memory, or 5-level paging is on, which no guest of
    /// ours uses).
    pub fn translate(&self, mem: &GuestMemoryMmap, va: u64) -> Option<Mapping> {
        if self.cr0 & CR0_PG == 0 {
            return Some(Mapping { gpa: va, page_left: 4096 - (va & 0xfff), user: true });
        }
        if self.cr4 & CR4_LA57 != 0 {
            return None;
        }
        // Non-canonical addresses are never mapped.
        let top = va >> 47;
        if top != 0 && top != 0x1ffff {
            return None;
        }
        let mut table = self.cr3 & ADDR_MASK;
        let mut user = true;
        for level in (0..4).rev() {
            let shift = 12 + 9 * level;
            let index = (va >> shift) & 0x1ff;
            let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
            if entry & PRESENT == 0 {
                return None;
            }
            user &= entry & USER != 0;
            let leaf = level == 0 || ((level == 1 || level == 2) && entry & HUGE != 0);
            if leaf {
                let size = 1u64 << shift;
                let base = entry & ADDR_MASK & !(size - 1);
                let off = va & (size - 1);
                return Some(Mapping { gpa: base + off, page_left: size - off, user });
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    /// Reads `buf.len()` bytes at `va`; returns how many could be read
    /// (fewer at the first unmapped page).
    pub fn read(&self, mem: &GuestMemoryMmap, va: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some(m) = self.translate(mem, va.wrapping_add(done as u64)) else { break };
            let n = (buf.len() - done).min(m.page_left as usize);
            if mem.read_slice(&mut buf[done..done + n], GuestAddress(m.gpa)).is_err() {
                break;
            }
            done += n;
        }
        done
    }

    /// Writes `data` at `va`; false (and nothing written) if any of it is
    /// not mapped.
    pub fn write(&self, mem: &GuestMemoryMmap, va: u64, data: &[u8]) -> bool {
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < data.len() {
            let Some(m) = self.translate(mem, va.wrapping_add(done as u64)) else { return false };
            let n = (data.len() - done).min(m.page_left as usize);
            pieces.push((m.gpa, done, n));
            done += n;
        }
        pieces.iter().all(|&(gpa, at, n)| mem.write_slice(&data[at..at + n], GuestAddress(gpa)).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, at: u64, v: u64) {
        mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    /// PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000: a 2 MiB page at va 0
    /// -> pa 0x400000, and a 4 KiB page (PT at 0x4000) at va 0x200000 ->
    /// pa 0x9000, with U only on the 4 KiB path.
    fn tables(mem: &GuestMemoryMmap) -> Paging {
        put(mem, 0x1000, 0x2000 | 0x7);
        put(mem, 0x2000, 0x3000 | 0x7);
        put(mem, 0x3000, 0x400000 | 0x3 | HUGE);
        put(mem, 0x3008, 0x4000 | 0x7);
        put(mem, 0x4000, 0x9000 | 0x7);
        Paging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: 0x20 }
    }

    #[test]
    fn walks_huge_and_small_pages() {
        let m = mem();
        let p = tables(&m);
        assert_eq!(p.translate(&m, 0x1234), Some(Mapping { gpa: 0x401234, page_left: 0x200000 - 0x1234, user: false }));
        assert_eq!(p.translate(&m, 0x200010), Some(Mapping { gpa: 0x9010, page_left: 0xff0, user: true }));
        // Next 4 KiB page of that PT is not present.
        assert_eq!(p.translate(&m, 0x201000), None);
        // Non-canonical and unmapped PML4 slots.
        assert_eq!(p.translate(&m, 0x0000_8000_0000_0000), None);
        assert_eq!(p.translate(&m, 0xffff_8000_0000_0000), None);
    }

    #[test]
    fn reads_stop_at_the_first_unmapped_page_and_writes_are_all_or_nothing() {
        let m = mem();
        let p = tables(&m);
        m.write_slice(&[1, 2, 3, 4], GuestAddress(0x9ffe)).unwrap();
        let mut buf = [0u8; 8];
        // 0x200ffe..0x201000 is mapped (2 bytes), 0x201000 is not.
        assert_eq!(p.read(&m, 0x200ffe, &mut buf), 2);
        assert_eq!(&buf[..2], &[1, 2]);
        assert!(!p.write(&m, 0x200ffe, &[9; 4]));
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x9ffe)).unwrap(), 0x0201);
        assert!(p.write(&m, 0x200ff0, &[7; 4]));
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x9ff0)).unwrap(), 0x07070707);
    }

    #[test]
    fn without_paging_addresses_are_physical() {
        let m = mem();
        let p = Paging::default();
        assert_eq!(p.translate(&m, 0x5123).map(|x| x.gpa), Some(0x5123));
    }
}
