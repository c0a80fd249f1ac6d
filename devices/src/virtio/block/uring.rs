//! The io_uring engine of virtio-blk (`engine=io_uring`, the API's
//! `io_engine: "Async"`).
//!
//! Reads and writes go straight between the image file and guest memory:
//! each request's data descriptors, checked like the synchronous engine's
//! (direction, bounds, sizes, sector range: [`request::rw_range`]), become
//! an iovec array of host addresses of guest RAM (vm-memory's slices, so
//! never outside it) for one `IORING_OP_READV` / `WRITEV`. A FLUSH is an
//! `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` and `IOSQE_IO_DRAIN`: it
//! starts only once every request submitted before it has completed, so
//! every write the guest saw completed (and more) is in the file before
//! the `fdatasync`; `cache=unsafe` answers flushes at once as the
//! synchronous engine does. Other requests (GET_ID, DISCARD,
//! WRITE_ZEROES, unsupported types, malformed chains) are answered at
//! once by the synchronous code.
//!
//! Completions come back through an eventfd registered with the ring
//! (`IORING_REGISTER_EVENTFD`), which the device watches on the event
//! loop: the completed requests go to the used ring with one interrupt
//! per batch, then the queue is served again (it stopped when the ring
//! was full). At most [`SLOTS`] requests (the queue size) are in flight.
//! A short read or write is resubmitted for the rest; an error, or a
//! read that meets the end of the file, answers `IOERR`. A failed
//! `fdatasync` is sticky, as in [`super::RawImage`]: every later write,
//! flush, discard and write-zeroes fails.
//!
//! In-flight requests write guest memory until they complete, so every
//! path that gives guest memory back waits for them first
//! ([`Block::finish_in_flight`]): device reset, a snapshot
//! ([`Block::quiesce`], before any state is saved), a media change, and
//! dropping the device (the VM's end). A request the guest was told
//! about (used ring) has completed in the kernel, so an acknowledged
//! write is in the file (and, after a flush, on stable storage).
//!
//! Ephemeral (copy-on-write) disks are refused with this engine; rate
//! limiting works as with the synchronous one (a request's tokens are
//! taken when it is popped).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{self, Context, Split, S_IOERR, S_OK};
use super::{Block, QUEUE_SIZE, REQUEST_QUEUE};
use crate::GuestMemoryMmap;

/// Which engine moves a disk's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// Requests are executed one after the other on the event loop
    /// (`pread64`/`pwrite64` straight to and from guest memory for a raw
    /// image, through a bounce buffer for an ephemeral one).
    #[default]
    Sync,
    /// Reads, writes and flushes are submitted to an io_uring and run
    /// concurrently, straight to and from guest memory.
    IoUring,
}

/// Requests in flight at most: one per descriptor of the largest queue.
const SLOTS: usize = QUEUE_SIZE as usize;

/// A request's iovecs: host addresses of guest RAM.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are addresses in guest memory mappings, which are
// not tied to a thread; the slot that owns them also owns a
// `GuestMemoryMmap` that keeps the mappings alive.
unsafe impl Send for IoVecs {}

/// What a slot's request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// One request in flight.
struct Slot {
    /// The chain's head, for the used ring.
    head: u16,
    op: Op,
    /// The image's descriptor.
    fd: RawFd,
    /// Where the status byte goes.
    status: GuestAddress,
    /// What is left to move (empty for a flush).
    iov: IoVecs,
    /// Where in the file what is left starts.
    offset: u64,
    /// Bytes moved so far, and in all.
    done: u64,
    total: u64,
    /// Keeps the guest memory the iovecs point into mapped until the
    /// request completes.
    mem: GuestMemoryMmap,
}

/// An io_uring, its completion eventfd and the requests in flight.
pub(super) struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<Slot>>,
    /// Indices of the empty slots.
    free: Vec<usize>,
    /// Entries pushed since the last submission.
    unsubmitted: usize,
    /// The first failed `fdatasync`'s errno.
    sync_failed: Option<i32>,
    /// Completions being handled (kept to reuse its allocation).
    cqes: Vec<(u64, i32)>,
    /// Answer the requests that completed inside their submission in the
    /// same event-loop round ([`Block::process_queue`]); off only in
    /// tests that need requests to stay in flight.
    pub(super) reap_after_submit: bool,
}

impl Uring {
    /// Sets up a ring of [`SLOTS`] entries and registers its eventfd.
    pub(super) fn new() -> io::Result<Self> {
        Self::with_slots(SLOTS)
    }

    /// A ring for at most `slots` requests in flight.
    pub(super) fn with_slots(slots: usize) -> io::Result<Self> {
        let entries = u32::try_from(slots).unwrap_or(u32::MAX);
        let ring = IoUring::new(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            unsubmitted: 0,
            sync_failed: None,
            cqes: Vec::with_capacity(slots),
            reap_after_submit: true,
        })
    }

    /// The eventfd that becomes readable when requests complete.
    pub(super) fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Whether one more request can be started.
    pub(super) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Requests submitted and not yet completed.
    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts the request `chain`: `None` if it went to the ring, else
    /// its used length (answered at once, status written). Call only
    /// with [`Self::has_room`].
    pub(super) fn start(
        &mut self,
        ctx: &mut Context<'_>,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<u32> {
        let head = chain.head_index();
        let (descs, status) = match request::split_chain(chain) {
            Split::Invalid => return Some(0),
            Split::TooMany(at) => return Some(request::finish(mem, at, S_IOERR, 0)),
            Split::Request(descs, at) => (descs, at),
        };
        let (op, offset, total, iov) = match self.prepare(ctx, mem, &descs) {
            Ok(Some(prepared)) => prepared,
            Ok(None) => {
                let (s, written) = request::execute_now(ctx, mem, &descs);
                return Some(request::finish(mem, status, s, written));
            }
            Err(s) => {
                crate::metrics::BLOCK.execute_fails.inc();
                return Some(request::finish(mem, status, s, 0));
            }
        };
        let (Some(fd), Some(i)) = (ctx.disk.raw_fd(), self.free.last().copied()) else {
            // Neither happens: ephemeral images are refused, and the
            // caller checked `has_room`.
            return Some(request::finish(mem, status, S_IOERR, 0));
        };
        let slot = Slot {
            head,
            op,
            fd,
            status,
            iov: IoVecs(iov),
            offset,
            done: 0,
            total,
            mem: mem.clone(),
        };
        match self.push(i, slot) {
            Ok(()) => {
                self.free.pop();
                None
            }
            Err(slot) => Some(request::finish(mem, slot.status, S_IOERR, 0)),
        }
    }

    /// What to submit for a request (`descs`: header and data): `Ok(None)`
    /// for requests answered on this thread, an error status for a bad
    /// read or write.
    #[expect(clippy::type_complexity, reason = "private, documented")]
    fn prepare(
        &self,
        ctx: &Context<'_>,
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
    ) -> Result<Option<(Op, u64, u64, Vec<libc::iovec>)>, u8> {
        let (hdr, data) = descs.split_first().ok_or(S_IOERR)?;
        let (ty, sector) = request::header(mem, hdr)?;
        let sync_failed = self.sync_failed.is_some();
        match ty {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = ty == VIRTIO_BLK_T_OUT;
                if write && (ctx.disk.is_read_only() || sync_failed) {
                    log::debug!("virtio-blk: write to a read-only or failed disk");
                    return Err(S_IOERR);
                }
                let (offset, total) = request::rw_range(ctx, mem, sector, data, !write)?;
                let iov = iovecs(mem, data, !write)?;
                let op = if write { Op::Write } else { Op::Read };
                Ok(Some((op, offset, total, iov)))
            }
            VIRTIO_BLK_T_FLUSH if ctx.sync_on_flush && !ctx.disk.is_read_only() => {
                if sync_failed {
                    return Err(S_IOERR);
                }
                Ok(Some((Op::Flush, 0, 0, Vec::new())))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if sync_failed => Err(S_IOERR),
            _ => Ok(None),
        }
    }

    /// Pushes a request (or what is left of it) to the submission queue
    /// and puts it in slot `i`; gives it back if the queue is full.
    fn push(&mut self, i: usize, s: Slot) -> Result<(), Slot> {
        let fd = types::Fd(s.fd);
        // At most 2 * SEG_MAX iovecs (a descriptor may span two regions).
        let n = u32::try_from(s.iov.0.len()).unwrap_or(u32::MAX);
        let entry = match s.op {
            Op::Read => opcode::Readv::new(fd, s.iov.0.as_ptr(), n)
                .offset(s.offset)
                .build(),
            Op::Write => opcode::Writev::new(fd, s.iov.0.as_ptr(), n)
                .offset(s.offset)
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(i as u64);
        // SAFETY: the entry's iovec array (`s.iov`, a heap buffer not
        // touched until the completion) and the guest memory it points
        // into stay valid until the request completes: the slot owns both
        // (the memory through its `GuestMemoryMmap`, whose mappings live
        // as long as any clone), and a slot is only emptied when its
        // completion is reaped; everything that would drop the slots or
        // give the memory back (reset, snapshot, media change, drop) first
        // waits for every completion (`finish_in_flight`, `Drop`). The
        // addresses are inside guest RAM: vm-memory's slices of ranges
        // checked by `rw_range`.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return Err(s);
        }
        self.unsubmitted += 1;
        self.slots[i] = Some(s);
        Ok(())
    }

    /// Submits what was pushed.
    pub(super) fn submit(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            // Still queued; the next submission (or wait) retries.
            Err(e) => crate::warn_ratelimited!("virtio-blk: io_uring submission failed: {e}"),
        }
    }

    /// Submits what was pushed and waits for at least one completion.
    fn wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Handles every completion: finished requests get their status byte
    /// and, with `queue`, a used-ring entry; short ones are resubmitted.
    /// Returns how many went to the used ring.
    pub(super) fn reap(&mut self, mut queue: Option<&mut crate::virtio::Queue>) -> usize {
        // Cleared before reading the queue: a completion posted meanwhile
        // signals it again.
        let _ = self.eventfd.read();
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut used = 0;
        for &(data, res) in &cqes {
            let i = usize::try_from(data).unwrap_or(usize::MAX);
            let Some(slot) = self.slots.get_mut(i).and_then(Option::take) else {
                crate::warn_ratelimited!("virtio-blk: io_uring completion for no request");
                continue;
            };
            let Some((head, len, mem)) = self.complete(i, slot, res) else {
                continue;
            };
            self.free.push(i);
            if let Some(q) = queue.as_deref_mut() {
                if let Err(e) = q.add_used(&mem, head, len) {
                    crate::warn_ratelimited!("virtio-blk: cannot return descriptor {head}: {e}");
                }
                used += 1;
            }
        }
        cqes.clear();
        self.cqes = cqes;
        self.submit();
        used
    }

    /// A completion `res` of slot `i`'s request: `None` if the rest of
    /// it was resubmitted, else its head and used length (status byte
    /// written) and its memory.
    fn complete(
        &mut self,
        i: usize,
        mut slot: Slot,
        res: i32,
    ) -> Option<(u16, u32, GuestMemoryMmap)> {
        let m = &crate::metrics::BLOCK;
        let status = match (slot.op, u64::try_from(res)) {
            (Op::Flush, Ok(_)) => {
                m.flush_count.inc();
                S_OK
            }
            (Op::Flush, Err(_)) => {
                self.sync_failed = Some(-res);
                request::io_error(io::Error::from_raw_os_error(-res))
            }
            (_, Err(_)) => request::io_error(io::Error::from_raw_os_error(-res)),
            (_, Ok(0)) => request::io_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended before the request (did it shrink?)",
            )),
            (op, Ok(n)) => {
                slot.done = slot.done.saturating_add(n);
                if slot.done < slot.total {
                    advance(&mut slot.iov.0, crate::usize_from(n));
                    slot.offset = slot.offset.saturating_add(n);
                    match self.push(i, slot) {
                        Ok(()) => return None,
                        Err(s) => slot = s,
                    }
                    S_IOERR
                } else if op == Op::Read {
                    m.read_count.inc();
                    m.read_bytes.add(slot.total);
                    S_OK
                } else {
                    m.write_count.inc();
                    m.write_bytes.add(slot.total);
                    S_OK
                }
            }
        };
        if status != S_OK {
            m.execute_fails.inc();
        }
        let written = if status == S_OK && slot.op == Op::Read {
            // At most MAX_DATA_LEN, which fits.
            u32::try_from(slot.total).unwrap_or(u32::MAX)
        } else {
            0
        };
        let len = request::finish(&slot.mem, slot.status, status, written);
        Some((slot.head, len, slot.mem))
    }
}

impl Drop for Uring {
    /// Waits for the requests still in flight: the kernel writes guest
    /// memory until they complete.
    fn drop(&mut self) {
        while self.in_flight() > 0 {
            if let Err(e) = self.wait() {
                log::error!("virtio-blk: cannot wait for in-flight io_uring requests: {e}");
                // Their slots (and so the guest memory) are leaked with
                // the ring rather than unmapped under the kernel.
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
            self.reap(None);
        }
    }
}

/// The iovecs of checked data descriptors (`rw_range` passed). Guest
/// pages a read will fill are marked dirty (for Diff snapshots) now.
fn iovecs(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    device_writes: bool,
) -> Result<Vec<libc::iovec>, u8> {
    let bad = |e: vm_memory::GuestMemoryError| {
        log::debug!("virtio-blk: data buffer outside guest memory: {e}");
        S_IOERR
    };
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut iov = Vec::with_capacity(data.len());
    for d in data {
        let len = d.len() as usize;
        let mut got = 0usize;
        for s in GuestMemory::get_slices(mem, d.addr(), len, access).map_err(bad)? {
            let s = s.map_err(bad)?;
            got += s.len();
            if device_writes {
                s.bitmap().mark_dirty(0, s.len());
            }
            iov.push(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            });
        }
        if got != len {
            log::debug!("virtio-blk: data buffer of {len} bytes maps to {got}");
            return Err(S_IOERR);
        }
    }
    Ok(iov)
}

/// Drops the first `n` bytes of `iov`.
pub(super) fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            whole += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
    }
    iov.drain(..whole);
}

impl Block {
    /// The io_uring's eventfd fired: completed requests go to the used
    /// ring (one interrupt), then the queue is served again.
    pub(super) fn uring_completions(&mut self) {
        let Some(u) = self.uring.as_deref_mut() else {
            return;
        };
        match self.common.activation_mut() {
            Some(active) => {
                if u.reap(Some(&mut active.queues[REQUEST_QUEUE])) > 0 {
                    active.signal_used_queue(REQUEST_QUEUE);
                }
            }
            None => {
                u.reap(None);
            }
        }
        self.process_queue();
    }

    /// Waits for every in-flight io_uring request and completes it to the
    /// used ring, without starting new ones; with `signal`, interrupts
    /// the driver if any completed. Nothing with the synchronous engine.
    pub(super) fn finish_in_flight(&mut self, signal: bool) {
        let Some(u) = self.uring.as_deref_mut() else {
            return;
        };
        let mut active = self.common.activation_mut();
        let mut used = 0;
        while u.in_flight() > 0 {
            if let Err(e) = u.wait() {
                log::error!("virtio-blk: cannot wait for in-flight io_uring requests: {e}");
                return;
            }
            used += u.reap(active.as_mut().map(|a| &mut a.queues[REQUEST_QUEUE]));
        }
        if let Some(a) = active.filter(|_| signal && used > 0) {
            a.signal_used_queue(REQUEST_QUEUE);
        }
    }

    /// Completes every request in flight (io_uring engine) before the
    /// device's state is saved: the queue then holds no request that was
    /// taken from the available ring and not yet put in the used ring.
    pub fn quiesce(&mut self) {
        self.finish_in_flight(true);
    }

    /// Which engine the disk uses.
    pub fn engine(&self) -> IoEngine {
        if self.uring.is_some() {
            IoEngine::IoUring
        } else {
            IoEngine::Sync
        }
    }

    /// Runs io_uring completions until nothing is in flight (tests).
    #[cfg(test)]
    pub(super) fn settle(&mut self) {
        while self.uring.as_ref().is_some_and(|u| u.in_flight() > 0) {
            if let Some(u) = self.uring.as_deref_mut() {
                u.wait().expect("io_uring wait");
            }
            self.uring_completions();
        }
    }
}
