//! Breakpoints where the debug registers do not work (the lab's nested
//! KVM ignores them; `int3` exits on none of our KVMs): the first byte of
//! the instruction becomes `hlt`, which makes a HLT exit at CPL0 on every
//! KVM with a userspace irqchip, as ftvm's rdtsc traps do. The patch is in
//! guest memory only while the guest runs with breakpoints armed: the
//! engine calls `left_guest` as soon as the vCPU comes back, for any exit,
//! before anything reads guest memory (the log's memory digests,
//! checkpoints, gdb's memory reads), and the original byte goes back. A
//! HLT exit just after a patched address is the breakpoint: the engine
//! moves RIP back to it and reports a debug exit, which counts no exit
//! ordinal. Stepping past it runs with nothing patched, as with the debug
//! registers; the next free run patches again.

use vm_memory::{Bytes, GuestAddress};

use super::*;

/// The byte of `hlt`.
pub const HLT: u8 = 0xf4;

impl Session {
    /// Patches `hlt` over `bps` for the run about to start.
    pub(super) fn patch(
        &mut self,
        at: &mut ExitPoint,
        bps: &[Option<u64>],
    ) -> Result<(), EngineError> {
        let s = at.vcpu().sregs().map_err(kvm("get sregs", at.ordinal))?;
        let p = crate::gdb::paging::Paging {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
        };
        for va in bps.iter().flatten() {
            let Some(m) = p.translate(&self.t.mem, *va) else {
                log::warn!("ftvm: gdb: breakpoint at {va:#x} not armed: not mapped in the guest's page tables here");
                continue;
            };
            if self.patched.iter().any(|&(_, gpa, _)| gpa == m.gpa) {
                continue;
            }
            let mut b = [0u8; 1];
            if self.t.mem.read_slice(&mut b, GuestAddress(m.gpa)).is_err() || b[0] == HLT {
                log::warn!("ftvm: gdb: breakpoint at {va:#x} not armed: a hlt is there already");
                continue;
            }
            if self.t.mem.write_slice(&[HLT], GuestAddress(m.gpa)).is_ok() {
                self.patched.push((*va, m.gpa, b[0]));
            }
        }
        Ok(())
    }

    /// The guest left KVM: the original bytes go back. `hlt_rip`: RIP at
    /// a HLT exit; returns the breakpoint it stopped at, if it did.
    pub fn left_guest(&mut self, hlt_rip: Option<u64>) -> Option<u64> {
        if self.patched.is_empty() {
            return None;
        }
        let mut hit = None;
        for (va, gpa, orig) in std::mem::take(&mut self.patched) {
            let mut b = [0u8; 1];
            // A byte the guest (or a resync's pages) changed since is
            // left as it is.
            if self.t.mem.read_slice(&mut b, GuestAddress(gpa)).is_ok() && b[0] == HLT {
                let _ = self.t.mem.write_slice(&[orig], GuestAddress(gpa));
                if hlt_rip == Some(va.wrapping_add(1)) {
                    hit = Some(va);
                }
            }
        }
        hit
    }
}
