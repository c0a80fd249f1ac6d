//! x86_64 platform support for capsule: memory layout, the Linux 64-bit
//! boot protocol, firmware tables (MP table, ACPI) and vCPU register, MSR
//! and CPUID setup.
//!
//! This crate knows nothing about the command line, the API or device
//! emulation; it only lays out guest memory and programs vCPUs.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod msr;
pub mod regs;
