//! x86_64 platform support for capsule: memory layout, the Linux 64-bit
//! boot protocol, firmware tables (MP table, ACPI) and vCPU register, MSR
//! and CPUID setup.
//!
//! This crate knows nothing about the command line, the API or device
//! emulation; it only lays out guest memory and programs vCPUs.

#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        reason = "test fixtures cast small, known values"
    )
)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("capsule runs on 64-bit x86 hosts only");

/// `v` as a `usize`. Lossless: the crate builds only for 64-bit targets
/// (see the `compile_error!` above), where `usize` is 64 bits.
#[expect(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits on every target this crate builds for"
)]
pub const fn usize_from(v: u64) -> usize {
    v as usize
}

/// Guest memory as capsule maps it: vm-memory's mmap backend with a
/// dirty-page bitmap per region. Every write the VMM's own
/// threads make through it (device DMA, used rings) marks its pages, so
/// a Diff snapshot can add them to the pages KVM's dirty log names for
/// the vCPUs' writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

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
