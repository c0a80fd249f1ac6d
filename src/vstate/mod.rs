//! KVM state: the VM (memory, irqchip) and its vCPUs.

pub mod vcpu;
pub mod vm;
