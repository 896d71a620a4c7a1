//! ftvm: a record/replay fault-tolerant VMM for x86-64 KVM.
//!
//! The VMM owns every source of nondeterminism the guest can see (the
//! interrupt controller, the timer, the clock, console input) and hands
//! their values to the guest only at deterministic VM exits. `engine` is
//! the exit loop; `recorder` supplies inputs from the host (and logs them),
//! `replay` supplies them from a log and checks the run against it; `apply`
//! is where either reaches the guest. docs/DESIGN.md has the architecture.

pub mod apply;
pub mod boot;
pub mod bus;
pub mod bzimage;
pub mod clock;
pub mod config;
pub mod console_io;
pub mod cpuid;
pub mod devices;
pub mod digest;
pub mod elf;
pub mod engine;
pub mod ft;
pub mod gdb;
pub mod kernel;
pub mod kick;
pub mod kvm_ext;
pub mod layout;
pub mod linux;
pub mod machine;
pub mod net;
pub mod recorder;
pub mod pci;
pub mod replay;
pub mod snapshot;
pub mod stop;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
