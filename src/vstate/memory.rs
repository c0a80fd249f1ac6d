//! Guest RAM, mapped for huge pages.
//!
//! KVM gives the guest 2 MiB nested page table entries (NPT/EPT) only where
//! the host backs guest memory with a transparent huge page *and* the host
//! address agrees with the guest physical address modulo 2 MiB. vm-memory's
//! own anonymous mappings are only page-aligned, and without
//! `MADV_HUGEPAGE` a host whose THP mode is `madvise` (Debian's default)
//! backs them with 4 KiB pages. So each RAM region here is an anonymous
//! private mapping placed on a 2 MiB boundary and marked `MADV_HUGEPAGE`:
//! one nested page fault maps 2 MiB instead of 4 KiB and the guest's TLB
//! misses walk one level less. QEMU and Cloud Hypervisor back guest RAM the
//! same way by default. Where the host has THP off, the advice is ignored
//! and the memory is ordinary 4 KiB pages. An inaccessible guard page on
//! either side of each region catches accesses that run off its ends.

use std::io;
use std::sync::Arc;

use arch::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress};

/// The huge page size RAM is aligned to.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;
/// The host page size (x86_64), the size of the guard pages.
const PAGE_SIZE: usize = 4096;

/// Errors of [`GuestRam::new`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// mmap failed (address space or overcommit limits).
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Map {
        /// Bytes asked for.
        size: usize,
        /// The mmap error.
        source: io::Error,
    },
    /// vm-memory refused a region's mapping: a layout bug.
    #[error("invalid guest RAM region at {base:#x}: {source}")]
    Region {
        /// Guest physical start of the region.
        base: u64,
        /// What vm-memory said.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A region ends past the guest physical address space: a layout bug.
    #[error("guest RAM region at {base:#x} ends past the address space")]
    RegionEnd {
        /// Guest physical start of the region.
        base: u64,
    },
    /// vm-memory refused the set of regions (none, unsorted, overlapping):
    /// a layout bug.
    #[error("invalid guest RAM layout: {0}")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
}

/// How a RAM region is backed.
#[derive(Clone, Copy)]
enum Backing<'a> {
    /// Private anonymous memory.
    Anonymous,
    /// A `MAP_SHARED` window of a file (the memfd a vhost-user backend
    /// maps too) at an offset.
    Shared(&'a std::fs::File, u64),
    /// A private, copy-on-write mapping of a file at an offset (a
    /// snapshot's memory, read from the page cache only where the guest
    /// touches it and shared by every VM restored from the same file
    /// until each writes its own copy).
    Private(&'a std::fs::File, u64),
}

/// Makes `[addr, addr + len)` guest RAM as `backing` says, readable and
/// writable. Returns 0 or -1 (errno set).
///
/// # Safety
///
/// The range must be part of a mapping the caller owns and nothing else
/// refers to.
unsafe fn map_ram(addr: usize, len: usize, backing: Backing<'_>) -> i32 {
    use std::os::unix::io::AsRawFd;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let (file, offset, kind) = match backing {
        Backing::Anonymous => {
            // SAFETY: the caller's range.
            return unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
        }
        Backing::Shared(file, offset) => (file, offset, libc::MAP_SHARED),
        Backing::Private(file, offset) => (file, offset, libc::MAP_PRIVATE),
    };
    let Ok(offset) = libc::off_t::try_from(offset) else {
        return -1;
    };
    // SAFETY: MAP_FIXED over the caller's range only.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            kind | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        -1
    } else {
        0
    }
}

/// One RAM region's host mapping, which this module owns (vm-memory does
/// not unmap memory it did not map itself): `len` bytes of RAM at `addr`
/// with an inaccessible guard page on either side.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of anonymous memory at a 2 MiB aligned address
    /// between two guard pages and advises huge pages for it.
    ///
    /// The guard pages turn a VMM bug that runs off either end of guest
    /// memory into a fault instead of a write into whatever is mapped next
    /// to it. They also keep the neighbours from inheriting RAM's 2 MiB
    /// alignment: the kernel places new mappings right below the lowest
    /// one, so without a guard a thread's 2 MiB stack would end exactly on
    /// RAM's 2 MiB boundary and, on a host whose THP mode is `always`, be
    /// backed by a 2 MiB huge page for the few KiB it uses.
    fn new(len: usize, backing: Backing<'_>) -> Result<Self, Error> {
        let map_err = |source| Error::Map { size: len, source };
        // Room for RAM at the first 2 MiB boundary at least a page into
        // the span, and for the guard page after it.
        let span = len
            .checked_add(HUGE_PAGE_SIZE + PAGE_SIZE)
            .ok_or_else(|| map_err(io::Error::from_raw_os_error(libc::ENOMEM)))?;
        // SAFETY: a new anonymous mapping at an address the kernel picks
        // (no MAP_FIXED): no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        let base = base as usize;
        let addr = (base + PAGE_SIZE).next_multiple_of(HUGE_PAGE_SIZE);
        let head = addr - PAGE_SIZE - base;
        let tail = span - head - len - 2 * PAGE_SIZE;
        // SAFETY: [addr, addr + len) lies inside the mapping made above,
        // which nothing else refers to yet; MAP_FIXED replaces only that.
        if unsafe { map_ram(addr, len, backing) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: the whole mapping made above, unused.
            unsafe { libc::munmap(base as *mut libc::c_void, span) };
            return Err(map_err(e));
        }
        // Give back the ends of the over-sized mapping beyond the guards.
        // SAFETY: both ranges lie inside the mapping made above, outside
        // RAM and its guard pages, and nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((addr + len + PAGE_SIZE) as *mut libc::c_void, tail);
            }
        }
        // SAFETY: madvise only changes how the kernel backs our own mapping.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
            // EINVAL: a kernel without transparent huge pages.
            log::debug!(
                "guest RAM: no transparent huge pages ({})",
                io::Error::last_os_error()
            );
        }
        // Keep the guest's memory out of capsule's core dumps: it is the
        // guest's data (keys, files), not capsule's, and can be huge.
        // SAFETY: madvise only changes how the kernel treats our own mapping.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTDUMP) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: RAM and its two guard pages, mapped above and unused.
            unsafe { libc::munmap((addr - PAGE_SIZE) as *mut libc::c_void, len + 2 * PAGE_SIZE) };
            return Err(map_err(e));
        }
        Ok(Self { addr, len })
    }

    /// Unmaps RAM and its guard pages.
    ///
    /// # Safety
    ///
    /// Nothing may use the memory afterwards.
    unsafe fn unmap(&self) {
        // SAFETY: the range Mapping::new mapped; the caller guarantees
        // that nothing uses it any more.
        unsafe {
            libc::munmap(
                (self.addr - PAGE_SIZE) as *mut libc::c_void,
                self.len + 2 * PAGE_SIZE,
            )
        };
    }
}

/// vm-memory's region over `map` at guest address `base`, mapped with
/// `flags` (and a window of `file_offset`'s file when shared).
fn region(
    base: GuestAddress,
    map: &Mapping,
    flags: i32,
    file_offset: Option<FileOffset>,
) -> Result<GuestRegionMmap, Error> {
    let mut builder = MmapRegionBuilder::new_with_bitmap(
        map.len,
        vm_memory::bitmap::AtomicBitmap::with_len(map.len),
    )
    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
    .with_mmap_flags(flags);
    if let Some(f) = file_offset {
        builder = builder.with_file_offset(f);
    }
    // SAFETY: `map` is a live mapping of exactly `map.len` bytes at
    // `map.addr` (of the file at the offset when shared), which the
    // caller keeps mapped until after every user of the region is gone
    // (see GuestRam's Drop).
    let mmap = unsafe { builder.with_raw_mmap_pointer(map.addr as *mut u8) }
        .build()
        .map_err(|source| Error::Region {
            base: base.0,
            source,
        })?;
    GuestRegionMmap::new(mmap, base).ok_or(Error::RegionEnd { base: base.0 })
}

/// Guest RAM: the regions as vm-memory's [`GuestMemoryMmap`], backed by
/// mappings this struct owns and unmaps when dropped.
#[derive(Debug)]
pub struct GuestRam {
    mem: Option<GuestMemoryMmap>,
    regions: Vec<(Arc<GuestRegionMmap>, Mapping)>,
    keep_mapped: bool,
    /// The file RAM is a private mapping of ([`Self::from_file`]): a page
    /// the guest has not touched holds the file's data, not zeroes.
    backing: Option<std::fs::File>,
}

impl GuestRam {
    /// Maps the RAM regions `ranges` (guest start, size; starts 2 MiB
    /// aligned for huge pages to be usable) as private anonymous memory.
    pub fn new(ranges: &[(GuestAddress, usize)]) -> Result<Self, Error> {
        Self::map(ranges, None)
    }

    /// Maps the RAM regions `ranges` copy-on-write from `file`, which
    /// holds them one after the other (a snapshot's memory file, whose
    /// size the caller has checked): nothing is read now, each page comes
    /// from the page cache when the guest first touches it.
    pub fn from_file(
        ranges: &[(GuestAddress, usize)],
        file: &std::fs::File,
    ) -> Result<Self, Error> {
        let mut ram = Self::map_private(ranges, file)?;
        ram.backing = Some(
            file.try_clone()
                .map_err(|e| Error::Map { size: 0, source: e })?,
        );
        Ok(ram)
    }

    /// [`Self::from_file`]'s mappings.
    fn map_private(ranges: &[(GuestAddress, usize)], file: &std::fs::File) -> Result<Self, Error> {
        let mut regions = Vec::with_capacity(ranges.len());
        let mut offset = 0u64;
        for &(base, len) in ranges {
            let map = Mapping::new(len, Backing::Private(file, offset))?;
            offset += len as u64;
            let region = region(base, &map, libc::MAP_PRIVATE | libc::MAP_NORESERVE, None)?;
            regions.push((Arc::new(region), map));
        }
        Self::assemble(regions)
    }

    /// Like [`Self::new`], but every region is a `MAP_SHARED` window of
    /// one memfd (each region at its own offset), and each vm-memory
    /// region knows its file and offset: for vhost-user backends
    /// (virtiofsd), which map guest RAM themselves from the descriptors
    /// `SET_MEM_TABLE` passes. Guard pages, 2 MiB alignment and
    /// `MADV_DONTDUMP` are as for private RAM; the memfd is sized to the
    /// total but fills lazily like anonymous memory.
    pub fn new_shared(ranges: &[(GuestAddress, usize)]) -> Result<Self, Error> {
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let map_err = |source| Error::Map {
            size: total,
            source,
        };
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let fd = unsafe { libc::memfd_create(c"capsule-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(map_err(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that nothing else owns.
        let file = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        file.set_len(total as u64).map_err(map_err)?;
        Self::map(ranges, Some(Arc::new(file)))
    }

    fn map(
        ranges: &[(GuestAddress, usize)],
        file: Option<Arc<std::fs::File>>,
    ) -> Result<Self, Error> {
        let mut regions = Vec::with_capacity(ranges.len());
        let mut offset = 0u64;
        for &(base, len) in ranges {
            let backing = match &file {
                Some(f) => Backing::Shared(f, offset),
                None => Backing::Anonymous,
            };
            let map = Mapping::new(len, backing)?;
            let flags = if file.is_some() {
                libc::MAP_SHARED | libc::MAP_NORESERVE
            } else {
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
            };
            let file_offset = file
                .as_ref()
                .map(|f| FileOffset::from_arc(f.clone(), offset));
            let region = region(base, &map, flags, file_offset)?;
            regions.push((Arc::new(region), map));
            offset += len as u64;
        }
        Self::assemble(regions)
    }

    /// The guest memory over `regions`.
    fn assemble(regions: Vec<(Arc<GuestRegionMmap>, Mapping)>) -> Result<Self, Error> {
        let mem =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|(r, _)| r.clone()).collect())?;
        Ok(Self {
            mem: Some(mem),
            regions,
            keep_mapped: false,
            backing: None,
        })
    }

    /// The guest memory, for loading, devices and KVM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.mem
            .as_ref()
            .expect("guest memory is present until drop")
    }

    /// The file RAM is a private mapping of (a restored snapshot's memory
    /// file, regions one after the other), if any: a page the guest never
    /// touched is the file's, not zero.
    pub fn backing_file(&self) -> Option<&std::fs::File> {
        self.backing.as_ref()
    }

    /// Leaves the memory mapped when this is dropped: for a vCPU that may
    /// still be inside KVM_RUN, which reaches guest memory through the host
    /// addresses without holding a reference.
    pub fn keep_mapped(&mut self) {
        self.keep_mapped = true;
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.mem = None;
        for (region, map) in &self.regions {
            // Another holder of the region (a device that outlived the VM)
            // could still read it: then the memory stays until exit.
            if self.keep_mapped || Arc::strong_count(region) > 1 {
                log::debug!("guest RAM at {:#x} left mapped", map.addr);
                continue;
            }
            // SAFETY: the only reference to the mapping (the region above)
            // is about to be dropped without touching it: vm-memory does
            // not unmap raw regions.
            unsafe { map.unmap() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

    fn host_addr(ram: &GuestRam, index: usize) -> usize {
        ram.memory()
            .iter()
            .nth(index)
            .unwrap()
            .get_host_address(MemoryRegionAddress(0))
            .unwrap() as usize
    }

    #[test]
    fn regions_are_huge_page_aligned_and_usable() {
        let ranges = [
            (GuestAddress(0), 5 << 20),
            (GuestAddress(1 << 32), (3 << 20) + 4096),
        ];
        let ram = GuestRam::new(&ranges).unwrap();
        for i in 0..2 {
            assert_eq!(host_addr(&ram, i) % HUGE_PAGE_SIZE, 0);
        }
        let mem = ram.memory();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let last = GuestAddress((1 << 32) + (3 << 20) + 4096 - 4);
        mem.write_obj(7u32, last).unwrap();
        assert_eq!(mem.read_obj::<u32>(last).unwrap(), 7);
        // Past the end and in the hole: errors, not faults.
        assert!(mem.read_obj::<u32>(GuestAddress(5 << 20)).is_err());
        assert!(mem.read_obj::<u32>(last.unchecked_add(4)).is_err());
    }

    #[test]
    fn memory_is_advised_for_huge_pages() {
        let ram = GuestRam::new(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let addr = host_addr(&ram, 0);
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let vma = vm_flags(addr);
        assert!(vma.split_whitespace().any(|f| f == "hg"), "{vma}");
    }

    /// The `VmFlags:` line of the mapping that starts at host address
    /// `addr`, from /proc/self/smaps (each VMA's block starts with its
    /// address range and ends with that line).
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{addr:x}-")))
            .find(|l| l.starts_with("VmFlags:"))
            .expect("the mapping is in smaps")
            .to_string()
    }

    /// Guest RAM is left out of core dumps (`dd` in its VmFlags).
    #[test]
    fn memory_is_excluded_from_core_dumps() {
        let ram = GuestRam::new(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let addr = host_addr(&ram, 0);
        let vma = vm_flags(addr);
        assert!(vma.split_whitespace().any(|f| f == "dd"), "{vma}");
    }

    /// The permissions of the mapping holding host address `addr`, from
    /// /proc/self/maps (e.g. "rw-p"), if it is mapped.
    fn perms_at(addr: usize) -> Option<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (start..end)
                .contains(&addr)
                .then(|| fields.next().unwrap().to_string())
        })
    }

    #[test]
    fn regions_sit_between_guard_pages() {
        let len = (2 << 20) + 8192;
        let ram = GuestRam::new(&[(GuestAddress(0), len)]).unwrap();
        let addr = host_addr(&ram, 0);
        assert_eq!(perms_at(addr).as_deref(), Some("rw-p"));
        assert_eq!(perms_at(addr + len - 1).as_deref(), Some("rw-p"));
        assert_eq!(perms_at(addr - 1).as_deref(), Some("---p"));
        assert_eq!(perms_at(addr + len).as_deref(), Some("---p"));
        // (What is mapped after the drop is not checked: other tests'
        // threads map and unmap concurrently.)
    }

    #[test]
    fn memory_shared_with_a_device_outlives_the_ram() {
        let ram = GuestRam::new(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let device_view = ram.memory().clone();
        drop(ram);
        // The clone still holds the region: it must still be mapped.
        device_view.write_obj(1u8, GuestAddress(4096)).unwrap();
        assert_eq!(device_view.read_obj::<u8>(GuestAddress(4096)).unwrap(), 1);
    }

    /// Shared RAM (for vhost-user): each region is a MAP_SHARED window of
    /// one memfd at its own offset, so a second mapping of that file (what
    /// virtiofsd makes from SET_MEM_TABLE) sees the guest's writes and
    /// the other way round; guard pages, alignment and MADV_DONTDUMP stay.
    #[test]
    fn shared_ram_is_one_memfd_another_mapping_sees() {
        use std::os::unix::io::AsRawFd;
        let ranges = [(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let ram = GuestRam::new_shared(&ranges).unwrap();
        let mem = ram.memory();
        let r1 = mem.iter().nth(1).unwrap();
        let fo = r1.file_offset().expect("shared regions know their file");
        assert_eq!(fo.start(), 4 << 20, "second region after the first");
        let addr = host_addr(&ram, 1);
        assert_eq!(addr % HUGE_PAGE_SIZE, 0);
        assert_eq!(perms_at(addr).as_deref(), Some("rw-s"));
        assert_eq!(perms_at(addr - 1).as_deref(), Some("---p"));
        assert_eq!(perms_at(addr + (2 << 20)).as_deref(), Some("---p"));
        assert!(vm_flags(addr).split_whitespace().any(|f| f == "dd"));
        // SAFETY: a new shared mapping of the memfd, unmapped below.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                6 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fo.file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(other, libc::MAP_FAILED);
        mem.write_obj(0x1234_5678u32, GuestAddress((1 << 32) + 8))
            .unwrap();
        // SAFETY: inside the 6 MiB mapping made above.
        let seen =
            unsafe { std::ptr::read_volatile((other as usize + (4 << 20) + 8) as *const u32) };
        assert_eq!(seen, 0x1234_5678);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile((other as usize + 16) as *mut u32, 42) };
        assert_eq!(mem.read_obj::<u32>(GuestAddress(16)).unwrap(), 42);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(other, 6 << 20) };
        // Private RAM has no file: it cannot be handed to a backend.
        let private = GuestRam::new(&ranges[..1]).unwrap();
        assert!(private
            .memory()
            .iter()
            .next()
            .unwrap()
            .file_offset()
            .is_none());
    }
}
