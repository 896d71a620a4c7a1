//! The CPUID table the guest sees. It hides features whose results come
//! from outside the VM (random numbers, paravirtual clocks, the TSC-deadline
//! timer, the local APIC we don't emulate), so a guest that probes CPUID
//! doesn't reach for a nondeterministic source. Standard KVM honours it; the
//! PVM backend on the project's machines ignores it (see kvm-notes.md).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_XSAVE_OSXSAVE: u32 = (1 << 26) | (1 << 27);
const LEAF1_ECX_RDRAND: u32 = 1 << 30;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_APIC: u32 = 1 << 9;
const LEAF1_EDX_TSC: u32 = 1 << 4;
const LEAF_80000001_EDX_RDTSCP: u32 = 1 << 27;
const LEAF7_EBX_RDSEED: u32 = 1 << 18;
const LEAF7_EBX_TSC_ADJUST: u32 = 1 << 1;
const LEAF7_ECX_WAITPKG: u32 = 1 << 5;
const LEAF7_EDX_HYBRID: u32 = 1 << 15;
const LEAF_80000007_EDX_INVTSC: u32 = 1 << 8;

pub fn filter_entry(e: &mut kvm_cpuid_entry2) {
    match e.function {
        1 => {
            e.ecx &= !(LEAF1_ECX_X2APIC
                | LEAF1_ECX_TSC_DEADLINE
                | LEAF1_ECX_RDRAND
                | LEAF1_ECX_HYPERVISOR
                | LEAF1_ECX_XSAVE_OSXSAVE);
            // No local APIC (the PIC is ours) and no TSC (it can't be
            // made to exit; Linux's remaining uses are patched to traps).
            e.edx &= !(LEAF1_EDX_APIC | LEAF1_EDX_TSC);
            // One logical processor, APIC ID 0.
            e.ebx &= 0x0000_ffff;
            e.ebx |= 1 << 16;
        }
        7 if e.index == 0 => {
            e.ebx &= !(LEAF7_EBX_RDSEED | LEAF7_EBX_TSC_ADJUST);
            e.ecx &= !LEAF7_ECX_WAITPKG;
            e.edx &= !LEAF7_EDX_HYBRID;
        }
        0x8000_0001 => e.edx &= !LEAF_80000001_EDX_RDTSCP,
        0x8000_0007 => e.edx &= !LEAF_80000007_EDX_INVTSC,
        _ => {}
    }
}

/// Whether a leaf goes to the guest at all: the hypervisor range (KVM's
/// paravirtual features, kvmclock among them) and XSAVE state leaves are
/// dropped.
pub fn keep_leaf(e: &kvm_cpuid_entry2) -> bool {
    !(0x4000_0000..0x5000_0000).contains(&e.function) && e.function != 0xd
}

pub fn guest_cpuid(supported: &CpuId) -> CpuId {
    let entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| keep_leaf(e))
        .map(|e| {
            let mut e = *e;
            filter_entry(&mut e);
            e
        })
        .collect();
    CpuId::from_entries(&entries).expect("fewer entries than KVM supplied")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_nondeterministic_features() {
        let mut l1 = kvm_cpuid_entry2 { function: 1, ecx: u32::MAX, edx: u32::MAX, ebx: 0x0302_0800, ..Default::default() };
        filter_entry(&mut l1);
        assert_eq!(l1.ecx & LEAF1_ECX_RDRAND, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.edx & LEAF1_EDX_APIC, 0);
        assert_eq!(l1.ebx >> 16, 1);
        let mut l7 = kvm_cpuid_entry2 { function: 7, ebx: u32::MAX, ..Default::default() };
        filter_entry(&mut l7);
        assert_eq!(l7.ebx & LEAF7_EBX_RDSEED, 0);
        let kvm = kvm_cpuid_entry2 { function: 0x4000_0001, ..Default::default() };
        assert!(!keep_leaf(&kvm));
        let cpuid = CpuId::from_entries(&[l1, kvm]).unwrap();
        assert_eq!(guest_cpuid(&cpuid).as_slice().len(), 1);
    }
}
