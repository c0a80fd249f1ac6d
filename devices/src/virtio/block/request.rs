//! Parsing and executing one virtio-blk request (one descriptor chain).
//!
//! Everything in a chain is guest-controlled. The rules enforced here:
//!
//! * The chain must end properly: virtio-queue stops a walk after as many
//!   descriptors as the table holds (loops), at a `next` index outside the
//!   table, at unreadable descriptor memory or at a bad indirect table. Such
//!   a truncated chain still has `NEXT` set on the last descriptor it
//!   yielded; it is returned with used length 0 and nothing is written.
//! * The last descriptor is the status byte: device-writable, at least one
//!   byte, inside guest memory; otherwise used length 0, nothing written.
//! * From here on every failure is reported as a status byte:
//!   more than [`MAX_DESCRIPTORS`] descriptors, a header that is not exactly
//!   16 device-readable bytes, data descriptors of the wrong direction or
//!   outside guest memory, a data descriptor longer than [`SIZE_MAX`]
//!   (the `size_max` the device advertises), more than [`MAX_DATA_LEN`] bytes, a read or write
//!   length that is zero or not a whole number of sectors, or a sector range beyond the capacity
//!   (all with checked arithmetic) give `IOERR`; unknown request types give
//!   `UNSUPP`. Ranges are checked before any I/O, so a failed write request
//!   leaves the disk untouched.
//! * Guest memory is only accessed through vm-memory, which bounds-checks
//!   every access.
//!
//! A read or write moves its data in bounce-buffer-sized chunks and may
//! stop between two of them once the device's per-event byte budget is
//! spent ([`Outcome::Suspended`]); the device then resumes it in a later
//! event. So the event loop's stall is bounded by the budget, not by the
//! largest request a guest can build.

use std::io;

use crate::{GuestMemoryMmap, GuestSlice};
use log::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions};

use super::disk::DiskImage;
use super::{
    ID_BYTES, MAX_DATA_LEN, MAX_DESCRIPTORS, MAX_ZEROES_SECTORS, MAX_ZEROES_SEGMENTS, SECTOR_SIZE,
    SIZE_MAX,
};

/// Size of the request header (`type`, `reserved`, `sector`).
const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment.
const SEGMENT_LEN: u64 = 16;

/// Status byte values.
pub(super) const S_OK: u8 = status_byte(VIRTIO_BLK_S_OK);
pub(super) const S_IOERR: u8 = status_byte(VIRTIO_BLK_S_IOERR);
const S_UNSUPP: u8 = status_byte(VIRTIO_BLK_S_UNSUPP);

/// A `VIRTIO_BLK_S_*` value as the status byte; evaluated at compile time.
#[expect(clippy::cast_possible_truncation, reason = "checked by the assert")]
const fn status_byte(v: u32) -> u8 {
    assert!(v <= u8::MAX as u32);
    v as u8
}

/// What a request needs from the device besides guest memory.
pub(super) struct Context<'a> {
    /// The backing image.
    pub disk: &'a mut dyn DiskImage,
    /// Capacity in sectors.
    pub capacity: u64,
    /// The GET_ID answer.
    pub id: &'a [u8; ID_BYTES],
    /// Whether DISCARD and WRITE_ZEROES are offered.
    pub zeroes: bool,
    /// Whether a FLUSH makes the image durable ([`DiskImage::flush`]) or
    /// completes at once ([`super::CacheMode::Unsafe`]).
    pub sync_on_flush: bool,
    /// Bounce buffer for data transfers (non-empty).
    pub buf: &'a mut [u8],
    /// Data bytes moved so far (read, written, zeroed, discarded): what the
    /// device's per-event budget counts.
    pub bytes: u64,
    /// A read or write stops between two chunks once [`Self::bytes`]
    /// reaches this (after moving at least one chunk).
    pub budget: u64,
    /// The request being processed was suspended in an earlier event
    /// this far in; it continues from there if it is still the same
    /// request (type, sector and length).
    pub resume: Option<Progress>,
}

/// How far a suspended read or write got, and what it was, so that a
/// chain found again at the same place is only resumed if it still
/// describes the same request (a guest that rewrites an in-flight request
/// gets it executed from the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Progress {
    /// The request type (`VIRTIO_BLK_T_IN` or `VIRTIO_BLK_T_OUT`).
    ty: u32,
    /// Its first sector.
    sector: u64,
    /// Its data length.
    total: u64,
    /// Data bytes already moved.
    pub done: u64,
}

/// What became of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Finished: the used length (bytes written into guest memory,
    /// status byte included), for the used ring.
    Done(u32),
    /// Stopped partway on the byte budget, status not written: the chain
    /// must be put back and continued from here in a later event.
    Suspended(Progress),
}

/// The data bytes of a request chain, for its rate limiter: every
/// descriptor but the 16-byte header and the status byte.
pub(super) fn data_len_of(chain: DescriptorChain<&GuestMemoryMmap>) -> u64 {
    chain
        .take(MAX_DESCRIPTORS)
        .fold(0u64, |a, d| a.saturating_add(u64::from(d.len())))
        .saturating_sub(u64::from(HEADER_LEN) + 1)
}

/// Handles one descriptor chain (up to the byte budget for reads and
/// writes). `ctx.resume` is consumed.
pub(super) fn process(
    ctx: &mut Context<'_>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Outcome {
    let resume = ctx.resume.take();
    let mut suspended = None;
    let used = process_chain(ctx, mem, chain, resume, &mut suspended);
    match suspended {
        Some(p) => Outcome::Suspended(p),
        None => Outcome::Done(used),
    }
}

/// A descriptor chain taken apart (see [`split_chain`]).
pub(super) enum Split {
    /// Unusable (cut short, no usable status descriptor): returned with
    /// used length 0, nothing written.
    Invalid,
    /// More than [`MAX_DESCRIPTORS`]: answered `IOERR` at this status
    /// address.
    TooMany(GuestAddress),
    /// The descriptors before the status byte (at least one), and the
    /// status byte's address.
    Request(Vec<Descriptor>, GuestAddress),
}

/// Walks a chain (at most [`MAX_DESCRIPTORS`] kept) and checks its end.
pub(super) fn split_chain(chain: DescriptorChain<&GuestMemoryMmap>) -> Split {
    let mut descs = Vec::new();
    let mut count = 0usize;
    let mut last = None;
    for d in chain {
        count += 1;
        if count <= MAX_DESCRIPTORS {
            descs.push(d);
        }
        last = Some(d);
    }
    let Some(status_desc) = last else {
        debug!("virtio-blk: empty descriptor chain");
        return Split::Invalid;
    };
    if status_desc.has_next() {
        debug!("virtio-blk: descriptor chain is cut short (loop, bad index or bad memory)");
        return Split::Invalid;
    }
    if count < 2 || !status_desc.is_write_only() || status_desc.len() == 0 {
        debug!("virtio-blk: request without a usable status descriptor");
        return Split::Invalid;
    }
    if count > MAX_DESCRIPTORS {
        debug!("virtio-blk: request with {count} descriptors");
        return Split::TooMany(status_desc.addr());
    }
    descs.truncate(count - 1);
    Split::Request(descs, status_desc.addr())
}

/// Writes the status byte; returns the used length (`written` data bytes
/// plus the status byte), 0 if the status byte cannot be written.
pub(super) fn finish(mem: &GuestMemoryMmap, at: GuestAddress, status: u8, written: u32) -> u32 {
    match mem.write_obj(status, at) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            debug!("virtio-blk: cannot write status byte: {e}");
            0
        }
    }
}

/// [`process`] proper: the used length, 0 when `suspended` was set.
fn process_chain(
    ctx: &mut Context<'_>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    resume: Option<Progress>,
    suspended: &mut Option<Progress>,
) -> u32 {
    let (descs, status_at) = match split_chain(chain) {
        Split::Invalid => return 0,
        Split::TooMany(at) => return finish(mem, at, S_IOERR, 0),
        Split::Request(descs, at) => (descs, at),
    };
    let mut run = Run {
        resume,
        suspended: None,
    };
    let r = execute(ctx, mem, &descs, &mut run);
    if run.suspended.is_some() {
        *suspended = run.suspended;
        return 0;
    }
    match r {
        Ok(n) => finish(mem, status_at, S_OK, n),
        Err(s) => finish(mem, status_at, s, 0),
    }
}

/// Runs a request to its end on this thread (the io_uring engine's
/// requests other than reads, writes and flushes): `descs` is what
/// [`split_chain`] kept. Returns the status and the data bytes written
/// to guest memory.
pub(super) fn execute_now(
    ctx: &mut Context<'_>,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> (u8, u32) {
    let mut run = Run {
        resume: None,
        suspended: None,
    };
    let saved = std::mem::replace(&mut ctx.budget, u64::MAX);
    let r = execute(ctx, mem, descs, &mut run);
    ctx.budget = saved;
    match r {
        Ok(n) => (S_OK, n),
        Err(s) => (s, 0),
    }
}

/// The type and sector of a request header descriptor.
pub(super) fn header(mem: &GuestMemoryMmap, hdr: &Descriptor) -> Result<(u32, u64), u8> {
    if hdr.is_write_only() || hdr.len() != HEADER_LEN {
        debug!("virtio-blk: bad request header descriptor");
        return Err(S_IOERR);
    }
    let mut h = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut h, hdr.addr()).map_err(|e| {
        debug!("virtio-blk: cannot read request header: {e}");
        S_IOERR
    })?;
    let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    Ok((ty, sector))
}

/// A read or write's resumption state, in and out.
struct Run {
    /// Where an earlier event left this request (if it did).
    resume: Option<Progress>,
    /// Set when the request stops on the budget.
    suspended: Option<Progress>,
}

/// Runs a request whose status descriptor is already split off; returns the
/// number of data bytes written to guest memory, or the status to report.
/// Meaningless when it sets `run.suspended`.
fn execute(
    ctx: &mut Context<'_>,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    run: &mut Run,
) -> Result<u32, u8> {
    let (hdr, data) = descs.split_first().ok_or(S_IOERR)?;
    let (ty, sector) = header(mem, hdr)?;

    let before = ctx.bytes;
    let m = &crate::metrics::BLOCK;
    let r = match ty {
        VIRTIO_BLK_T_IN => read(ctx, mem, sector, data, run),
        VIRTIO_BLK_T_OUT => write(ctx, mem, sector, data, run),
        VIRTIO_BLK_T_FLUSH if ctx.sync_on_flush => ctx.disk.flush().map(|()| 0).map_err(io_error),
        VIRTIO_BLK_T_FLUSH => Ok(0),
        VIRTIO_BLK_T_GET_ID => get_id(ctx, mem, data),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if ctx.zeroes => {
            zeroes(ctx, mem, data, ty == VIRTIO_BLK_T_DISCARD)
        }
        _ => {
            debug!("virtio-blk: unsupported request type {ty}");
            Err(S_UNSUPP)
        }
    };
    let moved = ctx.bytes.saturating_sub(before);
    if run.suspended.is_some() {
        // Counted once, when it finishes; its bytes as they move.
        match ty {
            VIRTIO_BLK_T_IN => m.read_bytes.add(moved),
            _ => m.write_bytes.add(moved),
        }
        return r;
    }
    match (&r, ty) {
        (Ok(_), VIRTIO_BLK_T_IN) => {
            m.read_count.inc();
            m.read_bytes.add(moved);
        }
        (Ok(_), VIRTIO_BLK_T_OUT) => {
            m.write_count.inc();
            m.write_bytes.add(moved);
        }
        (Ok(_), VIRTIO_BLK_T_FLUSH) => m.flush_count.inc(),
        (Ok(_), _) => {}
        (Err(S_IOERR), _) => m.execute_fails.inc(),
        (Err(_), _) => m.invalid_reqs_count.inc(),
    }
    r
}

pub(super) fn io_error(e: io::Error) -> u8 {
    crate::warn_ratelimited!("virtio-blk: I/O error: {e}");
    S_IOERR
}

/// Checks data descriptors: direction, guest memory, total size. Returns the
/// total length.
fn data_len(mem: &GuestMemoryMmap, data: &[Descriptor], device_writes: bool) -> Result<u64, u8> {
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() != device_writes {
            debug!("virtio-blk: data descriptor has the wrong direction");
            return Err(S_IOERR);
        }
        if d.len() > SIZE_MAX {
            debug!(
                "virtio-blk: data descriptor of {} bytes (size_max {SIZE_MAX})",
                d.len()
            );
            return Err(S_IOERR);
        }
        total = total
            .checked_add(u64::from(d.len()))
            .filter(|&t| t <= MAX_DATA_LEN)
            .ok_or_else(|| {
                debug!("virtio-blk: request too large");
                S_IOERR
            })?;
    }
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for d in data {
        if !GuestMemory::check_range(mem, d.addr(), d.len() as usize, access) {
            debug!("virtio-blk: data buffer outside guest memory");
            return Err(S_IOERR);
        }
    }
    Ok(total)
}

/// Byte offset of a sector range after checking it lies within the disk.
fn disk_offset(capacity: u64, sector: u64, len: u64) -> Result<u64, u8> {
    let in_range = len
        .checked_add(SECTOR_SIZE - 1)
        .map(|l| l / SECTOR_SIZE)
        .and_then(|sectors| sector.checked_add(sectors))
        .is_some_and(|end| end <= capacity);
    if !in_range {
        debug!("virtio-blk: sector {sector} + {len} bytes is beyond the disk");
        return Err(S_IOERR);
    }
    // Cannot overflow: sector < capacity = image length / SECTOR_SIZE.
    Ok(sector * SECTOR_SIZE)
}

/// Checks an IN/OUT request's data and position; returns (offset, length).
pub(super) fn rw_range(
    ctx: &Context<'_>,
    mem: &GuestMemoryMmap,
    sector: u64,
    data: &[Descriptor],
    device_writes: bool,
) -> Result<(u64, u64), u8> {
    let total = data_len(mem, data, device_writes)?;
    if total == 0 || total % SECTOR_SIZE != 0 {
        debug!("virtio-blk: transfer of {total} bytes is not whole sectors");
        return Err(S_IOERR);
    }
    Ok((disk_offset(ctx.capacity, sector, total)?, total))
}

/// Moves a checked read or write's data chunk by chunk (a chunk is at
/// most the bounce buffer, within one descriptor): `f(disk, bounce, guest
/// address, disk offset)` per chunk, in order, counting each into
/// `ctx.bytes`. Starts `skip` bytes in; stops before a chunk once
/// `ctx.bytes` has reached `ctx.budget` and at least one chunk moved here,
/// returning how far it got (`Some(done)`), or `None` when all is done.
fn transfer(
    ctx: &mut Context<'_>,
    data: &[Descriptor],
    pos: u64,
    skip: u64,
    mut f: impl FnMut(&mut dyn DiskImage, &mut [u8], GuestAddress, u64) -> Result<(), u8>,
) -> Result<Option<u64>, u8> {
    let chunk = ctx.buf.len() as u64;
    let mut start = 0u64; // data bytes before descriptor `d`
    let mut moved = false;
    for d in data {
        let len = u64::from(d.len());
        let mut done = skip.saturating_sub(start).min(len);
        while done < len {
            if moved && ctx.bytes >= ctx.budget {
                return Ok(Some(start + done));
            }
            let n = chunk.min(len - done);
            let addr = d.addr().checked_add(done).ok_or(S_IOERR)?;
            // n <= the bounce buffer's length, a usize.
            let buf = &mut ctx.buf[..crate::usize_from(n)];
            f(&mut *ctx.disk, buf, addr, pos + start + done)?;
            ctx.bytes = ctx.bytes.saturating_add(n);
            moved = true;
            done += n;
        }
        start += len;
    }
    Ok(None)
}

/// One chunk of a read or write on an image with direct I/O: `io(slice,
/// disk offset)` on each contiguous piece of the `len` guest bytes at
/// `addr` in turn, so the data moves between the file and guest memory
/// without a copy through the bounce buffer (which, under nested
/// virtualization, doubles a large transfer's cost).
fn direct(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    mut at: u64,
    mut io: impl FnMut(&GuestSlice<'_>, u64) -> io::Result<()>,
) -> Result<(), u8> {
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let slice = slice.map_err(|e| {
            debug!("virtio-blk: data buffer outside guest memory: {e}");
            S_IOERR
        })?;
        io(&slice, at).map_err(io_error)?;
        at += slice.len() as u64;
    }
    Ok(())
}

/// Where a read or write of `total` bytes at `sector` starts: past what
/// an earlier event did of the same request, else at 0.
fn skip_for(run: &Run, ty: u32, sector: u64, total: u64) -> u64 {
    match run.resume {
        Some(p) if p.ty == ty && p.sector == sector && p.total == total && p.done < total => p.done,
        _ => 0,
    }
}

fn read(
    ctx: &mut Context<'_>,
    mem: &GuestMemoryMmap,
    sector: u64,
    data: &[Descriptor],
    run: &mut Run,
) -> Result<u32, u8> {
    let (pos, total) = rw_range(ctx, mem, sector, data, true)?;
    let ty = VIRTIO_BLK_T_IN;
    let skip = skip_for(run, ty, sector, total);
    let stopped = transfer(ctx, data, pos, skip, |disk, buf, addr, at| {
        if disk.direct_io() {
            return direct(mem, addr, buf.len(), at, |s, at| disk.read_to_guest(s, at));
        }
        disk.read_at(buf, at).map_err(io_error)?;
        mem.write_slice(buf, addr).map_err(|_| S_IOERR)
    })?;
    if let Some(done) = stopped {
        run.suspended = Some(Progress {
            ty,
            sector,
            total,
            done,
        });
    }
    // total <= MAX_DATA_LEN, which fits in u32.
    Ok(u32::try_from(total).unwrap_or(u32::MAX))
}

fn write(
    ctx: &mut Context<'_>,
    mem: &GuestMemoryMmap,
    sector: u64,
    data: &[Descriptor],
    run: &mut Run,
) -> Result<u32, u8> {
    if ctx.disk.is_read_only() {
        debug!("virtio-blk: write to a read-only disk");
        return Err(S_IOERR);
    }
    let (pos, total) = rw_range(ctx, mem, sector, data, false)?;
    let ty = VIRTIO_BLK_T_OUT;
    let skip = skip_for(run, ty, sector, total);
    let stopped = transfer(ctx, data, pos, skip, |disk, buf, addr, at| {
        if disk.direct_io() {
            return direct(mem, addr, buf.len(), at, |s, at| {
                disk.write_from_guest(s, at)
            });
        }
        mem.read_slice(buf, addr).map_err(|_| S_IOERR)?;
        disk.write_at(buf, at).map_err(io_error)
    })?;
    if let Some(done) = stopped {
        run.suspended = Some(Progress {
            ty,
            sector,
            total,
            done,
        });
    }
    Ok(0)
}

fn get_id(ctx: &mut Context<'_>, mem: &GuestMemoryMmap, data: &[Descriptor]) -> Result<u32, u8> {
    if data.is_empty() {
        return Err(S_IOERR);
    }
    data_len(mem, data, true)?;
    let mut done = 0usize;
    for d in data {
        let n = (d.len() as usize).min(ID_BYTES - done);
        mem.write_slice(&ctx.id[done..done + n], d.addr())
            .map_err(|_| S_IOERR)?;
        done += n;
        if done == ID_BYTES {
            break;
        }
    }
    // At most ID_BYTES (20).
    u32::try_from(done).map_err(|_| S_IOERR)
}

fn zeroes(
    ctx: &mut Context<'_>,
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    discard: bool,
) -> Result<u32, u8> {
    if ctx.disk.is_read_only() {
        return Err(S_IOERR);
    }
    let total = data_len(mem, data, false)?;
    let segments = total / SEGMENT_LEN;
    if total == 0 || total % SEGMENT_LEN != 0 || segments > u64::from(MAX_ZEROES_SEGMENTS) {
        debug!("virtio-blk: bad discard/write-zeroes payload of {total} bytes");
        return Err(S_IOERR);
    }
    // At most MAX_ZEROES_SEGMENTS * 16 bytes.
    let mut raw = vec![0u8; crate::usize_from(total)];
    let mut done = 0usize;
    for d in data {
        let n = d.len() as usize;
        mem.read_slice(&mut raw[done..done + n], d.addr())
            .map_err(|_| S_IOERR)?;
        done += n;
    }

    let mut ranges = Vec::with_capacity(segments as usize);
    for seg in raw.chunks_exact(crate::usize_from(SEGMENT_LEN)) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
            debug!("virtio-blk: unsupported segment flags {flags:#x}");
            return Err(S_UNSUPP);
        }
        if num > MAX_ZEROES_SECTORS {
            return Err(S_IOERR);
        }
        let len = u64::from(num) * SECTOR_SIZE;
        let offset = disk_offset(ctx.capacity, sector, len)?;
        ranges.push((offset, len, unmap));
    }
    for (offset, len, unmap) in ranges {
        ctx.bytes = ctx.bytes.saturating_add(len);
        let res = if discard {
            ctx.disk.discard(offset, len)
        } else {
            ctx.disk.write_zeroes(offset, len, unmap)
        };
        res.map_err(io_error)?;
    }
    Ok(0)
}
