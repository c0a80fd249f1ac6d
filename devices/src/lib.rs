//! Device models for capsule.
//!
//! Devices here know nothing about the command line, the API or how the
//! VMM assembles a VM. Each model exposes register reads and writes through
//! [`bus::BusDevice`] and signals the outside world through event file
//! descriptors, so the same model can sit behind any transport.

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
/// dirty-page bitmap per region (the same type as `arch::GuestMemoryMmap`). Every write the VMM's own
/// threads make through it (device DMA, used rings) marks its pages, so
/// a Diff snapshot can add them to the pages KVM's dirty log names for
/// the vCPUs' writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
/// A contiguous piece of [`GuestMemoryMmap`], with its region's dirty
/// bitmap (what `get_slices` yields).
pub type GuestSlice<'a> =
    vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;

pub mod acpi_pm;
pub mod boot_marker;
pub mod bus;
pub mod child;
pub mod exit;
pub mod legacy;
pub mod metrics;
pub mod pci;
pub mod pvpanic;
pub mod rate_limiter;
pub mod ratelimit;
#[cfg(test)]
pub(crate) mod test_fd;
pub mod virtio;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A new non-blocking eventfd, closed on exec: every eventfd capsule uses
/// (interrupts, queue notifications, wake-ups) is made here or the same
/// way, so no child process (passt) inherits another device's.
pub fn eventfd() -> std::io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
}
