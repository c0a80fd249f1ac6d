//! KVM state: guest RAM, the VM (irqchip, memory slots) and its vCPUs,
//! and their snapshot state (`vcpu_state`, `vm_state`).

pub mod dirty;
pub mod halt;
pub mod memory;
pub mod msi;
pub mod pause;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
