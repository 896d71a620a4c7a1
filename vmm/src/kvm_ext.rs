//! KVM ioctls that kvm-ioctls does not wrap.

use kvm_bindings::{kvm_interrupt, KVMIO};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// Queues an external interrupt for the vCPU (userspace irqchip only).
pub fn interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let irq = kvm_interrupt { irq: vector.into() };
    // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer we
    // pass; `irq` outlives the call, and `vcpu` is a valid vCPU fd.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if ret == 0 {
        Ok(())
    } else {
        Err(errno::Error::last())
    }
}
