//! KVM state: guest RAM, the VM (irqchip, memory slots) and its vCPUs.

pub mod halt;
pub mod memory;
pub mod vcpu;
pub mod vm;
