//! Giving guest pages back to the host, and reading the page lists the
//! driver sends. Every address comes from the guest: each range is
//! checked to lie, page-aligned, inside one region of guest memory before
//! the host mapping of that region is touched, so no guest input reaches
//! memory outside guest RAM.

use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{BalloonError, PAGE_SHIFT, PAGE_SIZE};
use crate::GuestMemoryMmap;

/// Most bytes of page-frame numbers read from one inflate or deflate
/// chain (Linux sends at most 256 numbers, 1 KiB, at a time).
pub const MAX_PFN_BYTES: usize = 64 << 10;

/// A run of whole pages of guest memory: `[addr, addr + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// Guest physical address of the first page.
    pub addr: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// Releases `range` of guest RAM to the host: the pages' host memory is
/// freed (`MADV_DONTNEED`; a hole punched in the file for shared,
/// file-backed RAM), and the guest reads zeros there afterwards (or the
/// file's data, for RAM mapped privately from a snapshot file). The
/// range must be page-aligned and inside one region of guest memory.
pub fn release(mem: &GuestMemoryMmap, range: PageRange) -> Result<(), BalloonError> {
    let PageRange { addr, len } = range;
    if len == 0 {
        return Ok(());
    }
    check(mem, range)?;
    let outside = || BalloonError::OutsideMemory { addr, len };
    let region = mem.find_region(GuestAddress(addr)).ok_or_else(outside)?;
    let offset = addr - region.start_addr().0;
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| outside())?;
    let (offset_us, len_us) = (crate::usize_from(offset), crate::usize_from(len));
    // The pages change (to zeros): a Diff snapshot must carry them.
    region.bitmap().mark_dirty(offset_us, len_us);
    let shared = region.flags() & libc::MAP_SHARED != 0;
    match region.file_offset().filter(|_| shared) {
        Some(file) => punch_hole(file.file(), file.start() + offset, len),
        // SAFETY: `host..host + len` lies inside this region's mapping
        // (checked above), which lives as long as `mem`. MADV_DONTNEED
        // never unmaps: it only drops the pages' contents, so the mapping
        // stays valid for every user; nothing holds a Rust reference into
        // guest memory (vm-memory accesses it volatilely).
        None => match unsafe { libc::madvise(host.cast(), len_us, libc::MADV_DONTNEED) } {
            0 => Ok(()),
            _ => Err(BalloonError::Release(io::Error::last_os_error())),
        },
    }
}

/// Frees `[offset, offset + len)` of a shared RAM file (and so of every
/// mapping of it).
fn punch_hole(file: &std::fs::File, offset: u64, len: u64) -> Result<(), BalloonError> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(BalloonError::OutsideMemory { addr: offset, len });
    };
    // SAFETY: fallocate on a descriptor we own; it changes only the file.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(BalloonError::Release(io::Error::last_os_error()))
    }
}

/// Reads the little-endian 32-bit page-frame numbers in the
/// device-readable buffers of `chain` (at most [`MAX_PFN_BYTES`]).
/// A device-writable buffer, a length that is not a whole number of
/// entries, or too long a chain is an error; the numbers read before it
/// are returned with it.
pub fn read_pfns(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> (Vec<u32>, Option<BalloonError>) {
    let mut bytes = Vec::new();
    for d in chain {
        if d.is_write_only() {
            return (to_pfns(&bytes), Some(BalloonError::WriteOnly));
        }
        let len = d.len() as usize;
        if !len.is_multiple_of(4) {
            return (to_pfns(&bytes), Some(BalloonError::Length(d.len())));
        }
        if bytes.len() + len > MAX_PFN_BYTES {
            return (to_pfns(&bytes), Some(BalloonError::TooLong));
        }
        let start = bytes.len();
        bytes.resize(start + len, 0);
        if let Err(e) = mem.read_slice(&mut bytes[start..], d.addr()) {
            bytes.truncate(start);
            return (to_pfns(&bytes), Some(BalloonError::Memory(e)));
        }
    }
    (to_pfns(&bytes), None)
}

fn to_pfns(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The page ranges that `pfns` name, sorted, with duplicates dropped and
/// neighbours merged.
pub fn pfn_ranges(mut pfns: Vec<u32>) -> Vec<PageRange> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut out: Vec<PageRange> = Vec::new();
    for pfn in pfns {
        let addr = u64::from(pfn) << PAGE_SHIFT;
        match out.last_mut() {
            Some(r) if r.addr + r.len == addr => r.len += PAGE_SIZE,
            _ => out.push(PageRange {
                addr,
                len: PAGE_SIZE,
            }),
        }
    }
    out
}

/// Whether `range` is whole pages inside one region of guest memory
/// (what [`release`] would accept), without touching it.
pub fn check(mem: &GuestMemoryMmap, range: PageRange) -> Result<(), BalloonError> {
    let PageRange { addr, len } = range;
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(BalloonError::Unaligned { addr, len });
    }
    let inside = mem.find_region(GuestAddress(addr)).is_some_and(|r| {
        (addr - r.start_addr().0)
            .checked_add(len)
            .is_some_and(|end| end <= r.len())
    });
    if inside {
        Ok(())
    } else {
        Err(BalloonError::OutsideMemory { addr, len })
    }
}
