//! The vCPU's complete architectural state as plain data, and its byte
//! layout in logs (`Event::VcpuState`, see replay-log/FORMAT.md, "vCPU
//! state") and snapshots.
//!
//! What has to be copied was measured (shared kvm-notes, "resync"): general
//! and segment/control registers, the XSAVE area (not `KVM_SET_FPU`, which
//! lost x87 and AVX state), XCRs, MSRs from KVM's index list, vCPU events
//! (pending exceptions, interrupt shadow, NMI), MP state and debug
//! registers. Time MSRs are left out: the guest's clock is the VMM's.
//!
//! Layout: a sequence of sections `tag u8, len u32 LE, bytes`, each the
//! Linux KVM API struct as the x86-64 kernel defines it (little-endian).
//! Unknown tags are an error; a section may not repeat.

use kvm_bindings::{kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs};
use zerocopy::{FromBytes, IntoBytes};

const TAG_REGS: u8 = 1;
const TAG_SREGS: u8 = 2;
const TAG_XSAVE: u8 = 3;
const TAG_XCRS: u8 = 4;
const TAG_MSRS: u8 = 5;
const TAG_EVENTS: u8 = 6;
const TAG_MP_STATE: u8 = 7;
const TAG_DEBUGREGS: u8 = 8;

/// Largest XSAVE area accepted from a log (AMX-sized areas are 11 KiB).
const MAX_XSAVE: usize = 64 << 10;
/// Most MSRs accepted from a log.
const MAX_MSRS: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("vCPU state: section {tag} at byte {offset} is cut short")]
    Short { tag: u8, offset: usize },
    #[error("vCPU state: section {tag} has {len} bytes, expected {want}")]
    Size { tag: u8, len: usize, want: String },
    #[error("vCPU state: unknown section {tag} at byte {offset}")]
    Unknown { tag: u8, offset: usize },
    #[error("vCPU state: section {tag} appears twice")]
    Repeated { tag: u8 },
    #[error("vCPU state: section {tag} is missing")]
    Missing { tag: u8 },
}

/// Everything KVM holds for one vCPU, as plain data.
#[derive(Clone, Default, PartialEq)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as `KVM_GET_XSAVE2` returns it.
    pub xsave: Vec<u8>,
    pub xcrs: kvm_xcrs,
    /// (index, value), in the order read.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VcpuState {{ rip: {:#x}, rflags: {:#x}, {} msrs }}", self.regs.rip, self.regs.rflags, self.msrs.len())
    }
}

fn section(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn read_pod<T: FromBytes>(tag: u8, b: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(b).map_err(|_| StateError::Size { tag, len: b.len(), want: std::mem::size_of::<T>().to_string() })
}

impl VcpuState {
    /// Whether an external interrupt can be injected in this state: IF
    /// set, no interrupt shadow (after `sti`/`mov ss`), nothing already
    /// being injected. Decided from the state, not from `kvm_run`, so a
    /// recording and its replay decide alike.
    pub fn can_take_interrupt(&self) -> bool {
        self.regs.rflags & 0x200 != 0
            && self.events.interrupt.shadow == 0
            && self.events.interrupt.injected == 0
            && self.events.exception.injected == 0
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 << 10);
        section(&mut out, TAG_REGS, self.regs.as_bytes());
        section(&mut out, TAG_SREGS, self.sregs.as_bytes());
        section(&mut out, TAG_XSAVE, &self.xsave);
        section(&mut out, TAG_XCRS, self.xcrs.as_bytes());
        let mut msrs = Vec::with_capacity(self.msrs.len() * 12);
        for (i, v) in &self.msrs {
            msrs.extend_from_slice(&i.to_le_bytes());
            msrs.extend_from_slice(&v.to_le_bytes());
        }
        section(&mut out, TAG_MSRS, &msrs);
        section(&mut out, TAG_EVENTS, self.events.as_bytes());
        section(&mut out, TAG_MP_STATE, self.mp_state.as_bytes());
        section(&mut out, TAG_DEBUGREGS, self.debugregs.as_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, StateError> {
        let mut s = VcpuState::default();
        let mut seen = 0u32;
        let mut off = 0;
        while off < b.len() {
            let tag = b[off];
            let Some(len) = b.get(off + 1..off + 5).map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize) else {
                return Err(StateError::Short { tag, offset: off });
            };
            let start = off + 5;
            let Some(body) = start.checked_add(len).and_then(|end| b.get(start..end)) else {
                return Err(StateError::Short { tag, offset: off });
            };
            if !(1..=8).contains(&tag) {
                return Err(StateError::Unknown { tag, offset: off });
            }
            if seen & (1 << tag) != 0 {
                return Err(StateError::Repeated { tag });
            }
            seen |= 1 << tag;
            match tag {
                TAG_REGS => s.regs = read_pod(tag, body)?,
                TAG_SREGS => s.sregs = read_pod(tag, body)?,
                TAG_XSAVE => {
                    if body.len() > MAX_XSAVE || body.len() % 4 != 0 {
                        return Err(StateError::Size { tag, len: body.len(), want: format!("a multiple of 4 up to {MAX_XSAVE}") });
                    }
                    s.xsave = body.to_vec();
                }
                TAG_XCRS => s.xcrs = read_pod(tag, body)?,
                TAG_MSRS => {
                    if body.len() % 12 != 0 || body.len() / 12 > MAX_MSRS {
                        return Err(StateError::Size { tag, len: body.len(), want: format!("12 per MSR, at most {MAX_MSRS}") });
                    }
                    s.msrs = body
                        .chunks_exact(12)
                        .map(|c| (u32::from_le_bytes(c[..4].try_into().expect("4")), u64::from_le_bytes(c[4..].try_into().expect("8"))))
                        .collect();
                }
                TAG_EVENTS => s.events = read_pod(tag, body)?,
                TAG_MP_STATE => s.mp_state = read_pod(tag, body)?,
                TAG_DEBUGREGS => s.debugregs = read_pod(tag, body)?,
                _ => unreachable!("checked above"),
            }
            off = start + len;
        }
        for tag in 1..=8u8 {
            if seen & (1 << tag) == 0 {
                return Err(StateError::Missing { tag });
            }
        }
        Ok(s)
    }
}

/// MSRs that carry time or host-side bookkeeping: not part of the state a
/// resync copies (the VMM owns guest time; KVM refuses some on write).
pub fn msr_excluded(index: u32) -> bool {
    matches!(index, 0x10 | 0x11 | 0x12 | 0x3b | 0x6e0) || (0x4b56_4d00..=0x4b56_4dff).contains(&index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState::default();
        s.regs.rip = 0x1234;
        s.regs.rflags = 0x202;
        s.sregs.cr0 = 0x8000_0011;
        s.xsave = (0..4096u32).map(|i| i as u8).collect();
        s.xcrs.nr_xcrs = 1;
        s.msrs = vec![(0xc000_0080, 0xd01), (0x174, 8)];
        s.events.interrupt.shadow = 0;
        s.mp_state.mp_state = 0;
        s.debugregs.dr7 = 0x400;
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(VcpuState::from_bytes(&s.to_bytes()).unwrap(), s);
        assert!(s.can_take_interrupt());
        let mut t = s.clone();
        t.events.interrupt.shadow = 1;
        assert!(!t.can_take_interrupt());
        t.events.interrupt.shadow = 0;
        t.regs.rflags = 0x2;
        assert!(!t.can_take_interrupt());
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        let b = sample().to_bytes();
        for cut in 0..b.len() {
            assert!(VcpuState::from_bytes(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut x = b.clone();
        x[0] = 42;
        assert!(matches!(VcpuState::from_bytes(&x), Err(StateError::Unknown { tag: 42, .. })));
        let mut x = b.clone();
        x[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(VcpuState::from_bytes(&x), Err(StateError::Short { .. })));
        let twice = [b.clone(), b.clone()].concat();
        assert!(matches!(VcpuState::from_bytes(&twice), Err(StateError::Repeated { tag: 1 })));
        // Flip every byte of the framing: errors or a valid state, no panic.
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0xa5;
            let _ = VcpuState::from_bytes(&x);
        }
    }

    /// The sizes FORMAT.md ("vCPU state") documents.
    #[test]
    fn section_sizes_are_the_documented_ones() {
        use std::mem::size_of;
        assert_eq!(size_of::<kvm_regs>(), 144);
        assert_eq!(size_of::<kvm_sregs>(), 312);
        assert_eq!(size_of::<kvm_xcrs>(), 392);
        assert_eq!(size_of::<kvm_vcpu_events>(), 64);
        assert_eq!(size_of::<kvm_mp_state>(), 4);
        assert_eq!(size_of::<kvm_debugregs>(), 128);
    }

    #[test]
    fn time_msrs_are_excluded() {
        assert!(msr_excluded(0x10) && msr_excluded(0x4b56_4d06) && msr_excluded(0x6e0));
        assert!(!msr_excluded(0xc000_0080) && !msr_excluded(0x174));
    }
}
