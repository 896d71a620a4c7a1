//! Digests replay compares: of the vCPU registers (at intervals and at the
//! end) and of guest memory (at the end). FNV-1a over 64-bit words: fast,
//! stable across builds and hosts, and not a security boundary.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

pub fn fnv_words(mut h: u64, words: impl IntoIterator<Item = u64>) -> u64 {
    for w in words {
        h = (h ^ w).wrapping_mul(PRIME);
    }
    h
}

pub fn regs_digest(r: &kvm_regs, s: &kvm_sregs) -> u64 {
    fnv_words(
        OFFSET,
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags, s.cr0, s.cr3, s.cr4, s.efer,
            s.cs.selector as u64, s.idt.base, s.gdt.base,
        ],
    )
}

pub fn mem_digest(mem: &GuestMemoryMmap) -> u64 {
    let mut h = OFFSET;
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start + off))
                .expect("reading guest memory inside its own region");
            h = fnv_words(
                h,
                buf[..n].chunks(8).map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(w)
                }),
            );
            off += n as u64;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_see_every_register_and_byte() {
        let r = kvm_regs::default();
        let s = kvm_sregs::default();
        let mut r2 = r;
        r2.r15 = 1;
        assert_ne!(regs_digest(&r, &s), regs_digest(&r2, &s));
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let a = mem_digest(&m);
        m.write_obj(1u8, GuestAddress((2 << 20) - 1)).unwrap();
        assert_ne!(a, mem_digest(&m));
    }
}
