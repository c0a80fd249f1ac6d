//! An ELF guest kernel mapped from its file instead of copied into guest
//! RAM.
//!
//! Copying a vmlinux into fresh guest RAM costs the host a zeroed page and
//! a copy for each of its ~2,600 pages before the guest runs its first
//! instruction; under a nested, emulated host that is most of capsule's own
//! start-up (docs/performance.md). Here each `PT_LOAD` segment's pages are
//! instead mapped privately from the file over their part of guest RAM:
//! the guest reads the host's page cache, and only a page it writes is
//! copied (copy-on-write).
//!
//! A private file mapping still reads the file for every page the guest
//! has not written, so the file must not change while the mapping
//! lives. capsule holds a read lease on it (`F_SETLEASE`): a process that
//! opens the file for writing or truncates it waits while the kernel sends
//! capsule `SIGIO`. Capsule then *settles* the map ([`KernelMap::settle`]):
//! with the vCPUs parked and block I/O quiesced it copies the current
//! contents into ordinary anonymous memory that replaces the file mapping,
//! and only then releases the lease and lets the writer go on. A snapshot
//! settles first too: its memory file skips pages never faulted in, which
//! in a file mapping are not zero.
//!
//! Opt-in (`CAPSULE_KERNEL_MAP=1`): in the nested harness the copy costs
//! the guest less. Each mapped page faults in L1 on first read and again
//! on first write and stays mapped at 4 KiB, where the copied image sits
//! in 2 MiB pages: a boot took 5,918 exits in L1 with the map against
//! 2,166 with the copy (medians of 10, docs/performance.md). Boot times
//! were too noisy to decide it (three A/Bs: the map's median 1.14, 1.28
//! and 0.94 times the copy's). It stays for hosts where the copy is the
//! larger cost.
//!
//! Only where nothing but the vCPUs and the event loop writes guest RAM
//! (see [`allowed`]): not with a vhost-net back-end, a balloon (its
//! discards would bring the file back instead of zeroes) or a shared memfd
//! (virtio-fs). Where the lease cannot be had (another process has the
//! file open for writing, a file capsule does not own, a filesystem
//! without leases) or the segments cannot be mapped page for page, the
//! kernel is copied as before.
//!
//! The initrd is copied, not mapped: mapping it the same way was tried and
//! booted slower in the nested harness (1.21x the copying build's median,
//! 8 rounds of 10 slower; docs/performance.md), while it saved only the
//! ~9 ms copy of a 1 MiB archive. Likely because its file pages are
//! 4 KiB each where the copy lands in one huge page at the top of guest
//! RAM, memory the guest reuses as soon as it has unpacked the archive.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use arch::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::kernel_probe::{read_at, u16_at, u32_at, u64_at};

const PAGE: u64 = 4096;
/// `PT_LOAD`.
const PT_LOAD: u32 = 1;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;
/// More program headers than any kernel has: a bound on what is read.
const MAX_PHDRS: u16 = 64;

/// One `PT_LOAD` segment with bytes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Guest physical address of its first byte.
    pub paddr: u64,
    /// Bytes in the file (the rest of its memory size is zero).
    pub filesz: u64,
}

impl Segment {
    /// The guest pages its file bytes touch: `[start, end)`.
    fn pages(&self) -> (u64, u64) {
        let start = self.paddr - self.paddr % PAGE;
        (start, (self.paddr + self.filesz).next_multiple_of(PAGE))
    }
}

/// The entry point and segments of an x86-64 ELF kernel, read from its
/// headers (`ehdr`: the first 64 bytes; `phdrs(off, len)`: bytes of the
/// file), if they can be mapped page for page: each segment's file offset
/// and address agree modulo the page size, no two segments share a page,
/// nothing lies below `himem` or past the file's `file_len` bytes.
/// `None` for anything else; the copying loader then has its say.
pub(crate) fn segments(
    ehdr: &[u8; 64],
    mut phdrs: impl FnMut(u64, u64) -> Option<Vec<u8>>,
    file_len: u64,
    himem: u64,
) -> Option<(u64, Vec<Segment>)> {
    // 64-bit, little-endian, x86-64.
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 || u16_at(ehdr, 18) != EM_X86_64 {
        return None;
    }
    let entry = u64_at(ehdr, 24);
    let phoff = u64_at(ehdr, 32);
    let (phentsize, phnum) = (u16_at(ehdr, 54), u16_at(ehdr, 56));
    if entry < himem || phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
        return None;
    }
    let table = phdrs(phoff, u64::from(phnum) * 56)?;
    let mut segs = Vec::new();
    for ph in table.chunks_exact(56) {
        let kind = u32_at(ph, 0);
        let (offset, paddr) = (u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        if kind != PT_LOAD || filesz == 0 {
            continue;
        }
        let fits = offset
            .checked_add(filesz)
            .is_some_and(|end| end <= file_len)
            && paddr
                .checked_add(memsz.max(filesz))
                .is_some_and(|end| end < u64::MAX - PAGE);
        if !fits || filesz > memsz || paddr < himem || offset % PAGE != paddr % PAGE {
            return None;
        }
        segs.push(Segment {
            offset,
            paddr,
            filesz,
        });
    }
    segs.sort_by_key(|s| s.paddr);
    let apart = segs.windows(2).all(|w| w[0].pages().1 <= w[1].pages().0);
    (apart && !segs.is_empty()).then_some((entry, segs))
}

/// Whether a VM with `config` may have its kernel mapped: asked for
/// (`CAPSULE_KERNEL_MAP=1` in the environment), and nothing but its vCPUs
/// and capsule's event loop writes its RAM, so parking the one and being
/// the other stops every writer while the map settles.
pub(crate) fn allowed(config: &VmConfig) -> bool {
    std::env::var_os("CAPSULE_KERNEL_MAP").is_some_and(|v| v == "1")
        && !config.nets.iter().any(|n| n.vhost)
        && config.balloon.is_none()
        && config.fs.is_empty()
}

/// Eventfds to wake when `SIGIO` arrives (a lease break): a slot per live
/// [`KernelMap`], -1 until first used. A slot's eventfd is never closed,
/// so the handler can never write to a descriptor number that was closed
/// and reused meanwhile; a map watches a duplicate of it. A fixed array:
/// the handler may only do async-signal-safe things.
static WAKE: [AtomicI32; 8] = [const { AtomicI32::new(-1) }; 8];
/// Which slots a live map holds.
static TAKEN: [AtomicBool; 8] = [const { AtomicBool::new(false) }; 8];

extern "C" fn on_sigio(_: libc::c_int) {
    for slot in &WAKE {
        let fd = slot.load(Ordering::SeqCst);
        if fd >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; `fd` is an eventfd
            // that stays open for the life of the process.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }
}

/// Takes a free wake slot; returns it and a duplicate of its eventfd
/// (drained of wake-ups meant for an earlier map).
fn take_slot() -> std::io::Result<(usize, EventFd)> {
    let slot = TAKEN
        .iter()
        .position(|t| {
            t.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY))?;
    let dup = || -> std::io::Result<EventFd> {
        let mut fd = WAKE[slot].load(Ordering::SeqCst);
        if fd < 0 {
            fd = EventFd::new(EFD_NONBLOCK)?.into_raw_fd();
            WAKE[slot].store(fd, Ordering::SeqCst);
        }
        // SAFETY: dup of the slot's eventfd, which stays open.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `copy` is a new descriptor this function owns.
        let wake = unsafe { EventFd::from_raw_fd(copy) };
        let _ = wake.read();
        Ok(wake)
    };
    dup().map(|wake| (slot, wake)).inspect_err(|_| {
        TAKEN[slot].store(false, Ordering::SeqCst);
    })
}

/// Installs the `SIGIO` handler (once): without one, a lease break's
/// signal would kill capsule.
fn install_handler() -> bool {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut done = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        // SAFETY: a zeroed sigaction is valid; the handler only writes
        // to eventfds; SA_RESTART keeps interrupted system calls going.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigio as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            *done = libc::sigaction(libc::SIGIO, &sa, std::ptr::null_mut()) == 0;
        }
    }
    *done
}

/// A host range of guest RAM that maps the kernel file.
#[derive(Debug)]
struct Piece {
    addr: usize,
    len: usize,
}

/// A kernel mapped from its file into guest RAM, and the read lease that
/// keeps the file as it was. Dropping it releases the lease (the VM is
/// gone or the map settled).
#[derive(Debug)]
pub struct KernelMap {
    file: File,
    pieces: Vec<Piece>,
    slot: usize,
    wake: EventFd,
    woken: Arc<AtomicBool>,
}

/// Why a kernel was not mapped (logged; the kernel is then copied).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotMapped {
    #[error("not an x86-64 ELF kernel whose segments map page for page")]
    Layout,
    #[error("its segments are not all in private guest RAM")]
    Memory,
    #[error("no read lease on the file: {0}")]
    Lease(std::io::Error),
    #[error("{0}")]
    Os(std::io::Error),
}

impl KernelMap {
    /// Maps the ELF kernel in `file` into `mem` (fresh, zeroed guest
    /// RAM: nothing is written there before the kernel) under a read
    /// lease; returns the map and the kernel's entry point.
    pub(crate) fn new(
        mem: &GuestMemoryMmap,
        file: &File,
        himem: u64,
    ) -> Result<(Self, u64), NotMapped> {
        let (file, slot, wake) = Self::lease(file)?;
        let mut map = KernelMap {
            file,
            pieces: Vec::new(),
            slot,
            wake,
            woken: Arc::new(AtomicBool::new(false)),
        };
        // Read the headers under the lease: what is mapped is what was
        // checked.
        let f = &map.file;
        let file_len = f.metadata().map_err(NotMapped::Os)?.len();
        let mut ehdr = [0u8; 64];
        f.read_exact_at(&mut ehdr, 0).map_err(NotMapped::Os)?;
        let read = |off, len| read_at(f, off, len);
        let (entry, segs) = segments(&ehdr, read, file_len, himem).ok_or(NotMapped::Layout)?;
        let mut targets = Vec::with_capacity(segs.len());
        for s in &segs {
            targets.push(host_range(mem, s).ok_or(NotMapped::Memory)?);
        }
        for (s, &(addr, len)) in segs.iter().zip(&targets) {
            if let Err(e) = map.map_segment(mem, s, addr, len) {
                // Fresh anonymous memory again where the file was mapped:
                // the copying loader writes into zeroed RAM.
                map.release_pieces();
                return Err(NotMapped::Os(e));
            }
        }
        Ok((map, entry))
    }

    /// A duplicate of `file` with a read lease on it, a wake slot and its
    /// eventfd.
    fn lease(file: &File) -> Result<(File, usize, EventFd), NotMapped> {
        let file = file.try_clone().map_err(NotMapped::Os)?;
        if !install_handler() {
            return Err(NotMapped::Os(std::io::Error::last_os_error()));
        }
        let (slot, wake) = take_slot().map_err(NotMapped::Os)?;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) } != 0 {
            let e = std::io::Error::last_os_error();
            TAKEN[slot].store(false, Ordering::SeqCst);
            return Err(NotMapped::Lease(e));
        }
        Ok((file, slot, wake))
    }

    /// Maps segment `s`'s pages, at host `addr` (`len` bytes), from the
    /// file, and zeroes what the mapping brought in around its bytes.
    fn map_segment(
        &mut self,
        mem: &GuestMemoryMmap,
        s: &Segment,
        addr: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let off = libc::off_t::try_from(s.offset - s.offset % PAGE)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: [addr, addr + len) lies in one private anonymous guest
        // RAM region (host_range); nothing refers into it yet (the vCPUs
        // have not run), and MAP_FIXED replaces only that range.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.pieces.push(Piece { addr, len });
        // Like the rest of guest RAM, out of core dumps.
        // SAFETY: madvise on the range just mapped.
        unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTDUMP) };
        let (start, end) = s.pages();
        // Both less than a page.
        let head = s.paddr - start;
        let tail = end - s.paddr - s.filesz;
        let zeroes = [0u8; 4096];
        let zero = |at: u64, n: u64| {
            let n = usize::try_from(n).unwrap_or(0).min(zeroes.len());
            mem.write_slice(&zeroes[..n], GuestAddress(at))
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        if head > 0 {
            zero(start, head)?;
        }
        if tail > 0 {
            zero(s.paddr + s.filesz, tail)?;
        }
        Ok(())
    }

    /// Replaces every piece with fresh anonymous memory (contents lost).
    fn release_pieces(&mut self) {
        for p in self.pieces.drain(..) {
            // SAFETY: the piece is guest RAM this map replaced; the VM has
            // not run (only called while mapping fails).
            unsafe { anonymous_over(p.addr, p.len) };
        }
    }

    /// An event-loop subscriber that notes a lease break for
    /// [`Self::wants_settle`].
    pub(crate) fn watcher(&self) -> std::io::Result<LeaseWatcher> {
        Ok(LeaseWatcher {
            wake: self.wake.try_clone()?,
            woken: self.woken.clone(),
        })
    }

    /// Whether another process is waiting to write or truncate the file
    /// (the lease is being broken): time to [`Self::settle`].
    pub(crate) fn wants_settle(&self) -> bool {
        if !self.woken.load(Ordering::SeqCst) {
            return false;
        }
        // SAFETY: fcntl on a descriptor we own. While a break is pending
        // F_GETLEASE reports the type the lease is being broken to.
        let ours = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLEASE) != libc::F_RDLCK };
        if !ours {
            // Another map's lease broke (every map is woken).
            self.woken.store(false, Ordering::SeqCst);
        }
        ours
    }

    /// Copies the kernel's pages as they are now into anonymous memory
    /// that replaces the file mapping, then releases the lease (drops the
    /// map).
    ///
    /// Nothing else may write guest RAM meanwhile: the caller has parked
    /// every vCPU and quiesced the devices that write from other threads
    /// (a write in between could be lost).
    pub(crate) fn settle(mut self) -> std::io::Result<()> {
        for p in std::mem::take(&mut self.pieces) {
            // SAFETY: the piece is guest RAM (owned by the VM's GuestRam,
            // alive as long as the VM) and nothing writes it meanwhile (the
            // caller's guarantee).
            unsafe { settle_piece(p.addr, p.len)? };
        }
        log::info!("kernel: mapped pages copied into guest RAM; file lease released");
        Ok(())
    }

    /// Host bytes of guest RAM mapped from the file.
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.len).sum()
    }
}

impl Drop for KernelMap {
    fn drop(&mut self) {
        // SAFETY: fcntl on a descriptor we own (closing it would drop the
        // lease as well; this says so explicitly).
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        TAKEN[self.slot].store(false, Ordering::SeqCst);
    }
}

/// The host range of segment `s`'s pages, if it lies in one region of
/// `mem` that is private anonymous memory.
fn host_range(mem: &GuestMemoryMmap, s: &Segment) -> Option<(usize, usize)> {
    let (start, end) = s.pages();
    let region = mem.find_region(GuestAddress(start))?;
    let last = GuestAddress(end - 1);
    if region.file_offset().is_some() || region.to_region_addr(last).is_none() {
        return None;
    }
    let host = mem.get_host_address(GuestAddress(start)).ok()?;
    Some((host as usize, usize::try_from(end - start).ok()?))
}

/// Maps fresh anonymous memory over `[addr, addr + len)`.
///
/// # Safety
///
/// The range must be guest RAM no one holds references into.
unsafe fn anonymous_over(addr: usize, len: usize) {
    // SAFETY: the caller's range; MAP_FIXED replaces only it.
    unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        );
        advise_as_guest_ram(addr, len);
    }
}

/// Gives anonymous memory put back into guest RAM the advice the rest of
/// it has (`vstate::memory`: huge pages, out of core dumps), so the kernel
/// may merge the range back into its neighbours. Best effort.
///
/// # Safety
///
/// The range must be guest RAM.
unsafe fn advise_as_guest_ram(addr: usize, len: usize) {
    // SAFETY: madvise only changes how the kernel treats the caller's range.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTDUMP);
    }
}

/// Moves the current contents of `[addr, addr + len)` into anonymous
/// memory mapped in its place: a copy made elsewhere, then moved over the
/// range with `mremap`, so the range is never unmapped.
///
/// # Safety
///
/// The range must be mapped guest RAM that nothing writes meanwhile.
unsafe fn settle_piece(addr: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: a new mapping where the kernel likes.
    let tmp = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if tmp == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both ranges are `len` bytes, mapped, and disjoint; nothing
    // writes the source meanwhile (the caller's guarantee).
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, tmp.cast::<u8>(), len) };
    // SAFETY: moves the copy over the range (MREMAP_FIXED unmaps what was
    // there); the range stays guest RAM at the same address.
    let moved = unsafe {
        libc::mremap(
            tmp,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            addr as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: the copy, still ours.
        unsafe { libc::munmap(tmp, len) };
        return Err(e);
    }
    // SAFETY: the range just moved in, guest RAM.
    unsafe { advise_as_guest_ram(addr, len) };
    Ok(())
}

/// Wakes the event loop on a lease break (see [`KernelMap::watcher`]).
pub(crate) struct LeaseWatcher {
    wake: EventFd,
    woken: Arc<AtomicBool>,
}

impl MutEventSubscriber for LeaseWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("kernel map: cannot watch for lease breaks: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        self.woken.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests;
