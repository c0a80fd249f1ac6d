//! Dirty-page tracking for Diff snapshots.
//!
//! Two writers change guest memory and each has its own record:
//! * the vCPUs, whose writes go straight through the nested page tables:
//!   KVM logs them in a per-slot bitmap once the slot is registered with
//!   `KVM_MEM_LOG_DIRTY_PAGES`, read (and cleared) by `KVM_GET_DIRTY_LOG`;
//! * capsule's own threads (device DMA, used rings), which write through
//!   vm-memory: each region's [`AtomicBitmap`](vm_memory::bitmap::AtomicBitmap)
//!   marks the pages ([`arch::GuestMemoryMmap`]).
//!
//! [`DirtyLog`] ORs the two into its own bitmap, one bit per 4 KiB page
//! of each region, and keeps adding to it until [`DirtyLog::reset`]: a
//! Diff snapshot holds every page written since the last Full snapshot
//! (or since the VM was restored), so each Diff applies to that Full one
//! on its own, without the Diffs before it.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemoryMmap;

/// The page size of the logs.
pub const PAGE: u64 = 4096;

/// Why dirty-page tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM refused to log a slot's writes.
    #[error("cannot enable dirty-page logging on memory slot {slot}: {source}")]
    Enable {
        /// The slot.
        slot: u32,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_DIRTY_LOG failed.
    #[error("cannot read the dirty-page log of memory slot {slot}: {source}")]
    Read {
        /// The slot.
        slot: u32,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

/// The pages written since tracking started or was last reset, per
/// memory region (the regions in order, slot `i` is region `i`).
#[derive(Debug)]
pub struct DirtyLog {
    /// One bitmap per region, 64 pages a word.
    bits: Vec<Vec<u64>>,
    /// The id of the Full snapshot whose memory this VM's equals but for
    /// the pages logged (the one it was restored from, or the last one
    /// taken of it); `None` until there is one, and a Diff needs one.
    pub base: Option<u64>,
}

impl DirtyLog {
    /// Registers every region of `mem` again (same slot, address and
    /// mapping) with `KVM_MEM_LOG_DIRTY_PAGES`, and clears vm-memory's
    /// bitmaps: from here on every write is recorded. The regions must
    /// be the ones `Vm::new` registered, in the same order.
    pub fn enable(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let mut bits = Vec::new();
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("region has a host mapping") as u64;
            let r = kvm_userspace_memory_region {
                slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the same live mapping `Vm::new` registered for this
            // slot (owned by `mem`'s regions, which outlive the VM); only
            // the flags change.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|source| Error::Enable { slot, source })?;
            own_bitmap(region).reset();
            bits.push(vec![0u64; words(region.len())]);
        }
        Ok(Self { bits, base: None })
    }

    /// Adds the pages written since the last call to the log: KVM's log
    /// of each slot (which the read clears) and vm-memory's bitmaps
    /// (cleared too).
    pub fn collect(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
        for ((slot, region), acc) in (0u32..).zip(mem.iter()).zip(&mut self.bits) {
            let kvm = vm
                .get_dirty_log(slot, arch::usize_from(region.len()))
                .map_err(|source| Error::Read { slot, source })?;
            let own = own_bitmap(region).get_and_reset();
            for (i, word) in acc.iter_mut().enumerate() {
                *word |= kvm.get(i).copied().unwrap_or(0) | own.get(i).copied().unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Collects, then returns the pages written since the last reset as
    /// runs `(offset, length)` in bytes over the regions laid one after
    /// the other (the memory file's offsets).
    pub fn runs(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<(u64, u64)>, Error> {
        self.collect(vm, mem)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut base = 0u64;
        for (region, bits) in mem.iter().zip(&self.bits) {
            let pages = region.len() / PAGE;
            for page in 0..pages {
                let i = arch::usize_from(page);
                if bits[i / 64] & (1 << (i % 64)) == 0 {
                    continue;
                }
                let at = base + page * PAGE;
                match runs.last_mut() {
                    Some((start, len)) if *start + *len == at => *len += PAGE,
                    _ => runs.push((at, PAGE)),
                }
            }
            base += region.len();
        }
        Ok(runs)
    }

    /// Forgets every page written so far (after a Full snapshot, the new
    /// base of later Diffs).
    pub fn reset(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
        self.collect(vm, mem)?;
        for b in &mut self.bits {
            b.fill(0);
        }
        Ok(())
    }
}

/// vm-memory's bitmap of the whole region (the trait's `bitmap()` is a
/// slice view without the reset methods).
fn own_bitmap(region: &arch::GuestRegionMmap) -> &vm_memory::bitmap::AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// Words of a bitmap of `len` bytes of pages.
fn words(len: u64) -> usize {
    arch::usize_from(len.div_ceil(PAGE).div_ceil(64))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::memory::GuestRam;
    use crate::vstate::vm::Vm;

    /// The VMM's own writes (a device's DMA) count, from enable on, and
    /// stay logged until a reset.
    #[test]
    fn device_writes_are_logged_until_reset() {
        let ram = GuestRam::new(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let kvm = Vm::open_kvm(std::path::Path::new("/dev/kvm")).expect("/dev/kvm");
        let vm = Vm::new(kvm, ram.memory()).unwrap();
        let mem = ram.memory();
        mem.write_slice(&[1], GuestAddress(0x1000)).unwrap();
        let mut log = DirtyLog::enable(vm.fd(), mem).unwrap();
        assert_eq!(log.runs(vm.fd(), mem).unwrap(), vec![]);
        mem.write_slice(&[1; 5000], GuestAddress(0x5ff0)).unwrap();
        mem.write_obj(7u32, GuestAddress(0x20_0000)).unwrap();
        let want = vec![(0x5000, 0x3000), (0x20_0000, 0x1000)];
        assert_eq!(log.runs(vm.fd(), mem).unwrap(), want);
        // Cumulative: a second read still names them.
        assert_eq!(log.runs(vm.fd(), mem).unwrap(), want);
        log.reset(vm.fd(), mem).unwrap();
        assert_eq!(log.runs(vm.fd(), mem).unwrap(), vec![]);
    }
}
