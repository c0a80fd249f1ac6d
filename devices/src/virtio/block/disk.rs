//! Disk image backends for virtio-blk: a raw file, and a copy-on-write
//! ephemeral overlay over a read-only raw file.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::BlockError;

/// Granularity of the ephemeral overlay's written-sector bitmap.
pub const SECTOR_SIZE: u64 = 512;

/// What a disk image backend can do. Offsets and lengths are in bytes;
/// callers keep accesses within [`DiskImage::len`].
pub trait DiskImage: Send {
    /// Size of the image in bytes.
    fn len(&self) -> u64;

    /// Whether the image is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes completed writes durable (fdatasync).
    fn flush(&mut self) -> io::Result<()>;

    /// Tells the backend the range is no longer needed. Afterwards the range
    /// reads either as before or as zeroes.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes the range read as zeroes; with `unmap` the space may be
    /// deallocated.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "disk image is read-only")
}

fn is_unsupported(e: &vmm_sys_util::errno::Error) -> bool {
    matches!(e.errno(), libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
}

/// Writes `len` zero bytes at `offset`, the slow way.
fn fill_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 64 * 1024;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Zeroes a range of `file` with fallocate, falling back to writing zeroes.
fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
    let mode = if unmap {
        FallocateMode::PunchHole
    } else {
        FallocateMode::ZeroRange
    };
    match fallocate(file, mode, true, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if is_unsupported(&e) => fill_zeroes(file, offset, len),
        Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
    }
}

/// Size of a regular file or block device.
fn file_len(file: &mut File) -> io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Opens an image file and checks it is a regular file or a block device.
/// The open is non-blocking, so a FIFO (whose read-only open would wait
/// for a writer) is refused at once; `O_NONBLOCK` is cleared afterwards.
fn open_image(path: &Path, writable: bool) -> Result<File, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(BlockError::NotAFile(path.to_path_buf()));
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; only O_NONBLOCK
    // changes.
    let cleared = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(BlockError::Open {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// Takes an advisory `flock` on `file` without blocking: exclusive for a
/// writable image, shared for one that is only read. The lock lasts as long
/// as the file stays open. Fails with [`BlockError::Locked`] naming `path`
/// when another open file description holds a conflicting lock.
pub fn lock_image(file: &File, exclusive: bool, path: &Path) -> Result<(), BlockError> {
    let res = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match res {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(BlockError::Locked {
            path: path.to_path_buf(),
            exclusive,
        }),
        Err(TryLockError::Error(source)) => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A raw image file used directly.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    len: u64,
    read_only: bool,
}

impl RawImage {
    /// Opens and locks `path` (exclusively unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let mut file = open_image(path, !read_only)?;
        lock_image(&file, !read_only, path)?;
        let len = file_len(&mut file).map_err(|source| BlockError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            len,
            read_only,
        })
    }
}

impl DiskImage for RawImage {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        match fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            Ok(()) => Ok(()),
            // Discard is only a hint.
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        zero_range(&self.file, offset, len, unmap)
    }
}

/// A read-only base image plus an anonymous, sparse overlay file that takes
/// every write. The base is never written; the overlay is unlinked from the
/// start, so it disappears when capsule exits.
#[derive(Debug)]
pub struct EphemeralImage {
    base: File,
    overlay: File,
    len: u64,
    /// Which sectors live in the overlay.
    written: SectorBitmap,
}

/// Sectors per second-level bitmap block (2 MiB of disk).
const BITMAP_BLOCK_SECTORS: u64 = 64 * 64;

/// A sparse bitmap with one bit per sector: second-level blocks are only
/// allocated once a sector in their range is written, so a large image that
/// the guest barely touches costs a few bytes per 2 MiB.
#[derive(Debug)]
struct SectorBitmap {
    blocks: Vec<Option<Box<[u64; 64]>>>,
}

impl SectorBitmap {
    fn new(sectors: u64) -> Option<Self> {
        let n = usize::try_from(sectors.div_ceil(BITMAP_BLOCK_SECTORS)).ok()?;
        Some(Self {
            blocks: std::iter::repeat_with(|| None).take(n).collect(),
        })
    }

    fn position(sector: u64) -> (usize, usize, u64) {
        let block = (sector / BITMAP_BLOCK_SECTORS) as usize;
        let bit = sector % BITMAP_BLOCK_SECTORS;
        (block, (bit / 64) as usize, 1 << (bit % 64))
    }

    fn get(&self, sector: u64) -> bool {
        let (b, w, mask) = Self::position(sector);
        matches!(self.blocks.get(b), Some(Some(words)) if words[w] & mask != 0)
    }

    fn set(&mut self, sector: u64) {
        let (b, w, mask) = Self::position(sector);
        if let Some(slot) = self.blocks.get_mut(b) {
            slot.get_or_insert_with(|| Box::new([0; 64]))[w] |= mask;
        }
    }
}

/// Creates an unnamed temporary file in the temporary directory.
fn anonymous_file() -> io::Result<File> {
    let dir = std::env::temp_dir();
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(&dir)
    {
        Ok(f) => Ok(f),
        Err(_) => {
            // The filesystem may not support O_TMPFILE: create and unlink.
            let mut tmp =
                vmm_sys_util::tempfile::TempFile::new_with_prefix(dir.join("capsule-overlay-"))
                    .map_err(io::Error::from)?;
            tmp.remove().map_err(io::Error::from)?;
            Ok(tmp.into_file())
        }
    }
}

impl EphemeralImage {
    /// Opens `path` read-only with a shared lock and creates the overlay.
    pub fn open(path: &Path) -> Result<Self, BlockError> {
        let mut base = open_image(path, false)?;
        lock_image(&base, false, path)?;
        let len = file_len(&mut base).map_err(|source| BlockError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let overlay = anonymous_file()
            .and_then(|f| f.set_len(len).map(|()| f))
            .map_err(|source| BlockError::Overlay {
                path: path.to_path_buf(),
                source,
            })?;
        let written =
            SectorBitmap::new(len.div_ceil(SECTOR_SIZE)).ok_or_else(|| BlockError::Size {
                path: PathBuf::from(path),
                source: io::Error::other("image too large"),
            })?;
        Ok(Self {
            base,
            overlay,
            len,
            written,
        })
    }

    fn is_written(&self, sector: u64) -> bool {
        self.written.get(sector)
    }

    fn mark_written(&mut self, sector: u64) {
        self.written.set(sector);
    }

    /// Copies the base sector into the overlay if it is not there yet
    /// (before a partial write to it).
    fn copy_up(&mut self, sector: u64) -> io::Result<()> {
        if self.is_written(sector) {
            return Ok(());
        }
        let start = sector * SECTOR_SIZE;
        let n = SECTOR_SIZE.min(self.len - start) as usize;
        let mut buf = [0u8; SECTOR_SIZE as usize];
        self.base.read_exact_at(&mut buf[..n], start)?;
        self.overlay.write_all_at(&buf[..n], start)?;
        self.mark_written(sector);
        Ok(())
    }

    /// Validates a range and returns its first and last sector (inclusive).
    fn sectors(&self, offset: u64, len: u64) -> io::Result<(u64, u64)> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "beyond end of disk"))?;
        Ok((offset / SECTOR_SIZE, (end - 1) / SECTOR_SIZE))
    }

    /// Prepares a write to `[offset, offset + len)`: copies up partially
    /// covered edge sectors.
    fn prepare_write(&mut self, offset: u64, len: u64) -> io::Result<(u64, u64)> {
        let (first, last) = self.sectors(offset, len)?;
        if !offset.is_multiple_of(SECTOR_SIZE) {
            self.copy_up(first)?;
        }
        let end = offset + len;
        if !end.is_multiple_of(SECTOR_SIZE) && end != self.len {
            self.copy_up(last)?;
        }
        Ok((first, last))
    }
}

impl DiskImage for EphemeralImage {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.sectors(offset, buf.len() as u64)?;
        // Split into runs of sectors that all come from the same file.
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let from_overlay = self.is_written(pos / SECTOR_SIZE);
            let mut run_end = (pos / SECTOR_SIZE + 1) * SECTOR_SIZE;
            let end = offset + buf.len() as u64;
            while run_end < end && self.is_written(run_end / SECTOR_SIZE) == from_overlay {
                run_end += SECTOR_SIZE;
            }
            let n = (run_end.min(end) - pos) as usize;
            let file = if from_overlay {
                &self.overlay
            } else {
                &self.base
            };
            file.read_exact_at(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (first, last) = self.prepare_write(offset, buf.len() as u64)?;
        self.overlay.write_all_at(buf, offset)?;
        for s in first..=last {
            self.mark_written(s);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Nothing outlives the process, so there is nothing to make durable.
        Ok(())
    }

    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        // Keeping the data is a valid outcome of a discard.
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, last) = self.prepare_write(offset, len)?;
        // Punching a hole in the overlay frees its space and reads as zeroes.
        zero_range(&self.overlay, offset, len, true)?;
        for s in first..=last {
            self.mark_written(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    pub(crate) fn image_with(data: &[u8]) -> TempFile {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().write_all(data).unwrap();
        tmp
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn raw_read_write_flush_zeroes() {
        let tmp = image_with(&pattern(4096));
        let mut img = RawImage::open(tmp.as_path(), false).unwrap();
        assert_eq!(img.len(), 4096);
        img.write_at(&[0xab; 100], 1000).unwrap();
        img.flush().unwrap();
        let mut buf = vec![0; 4096];
        img.read_at(&mut buf, 0).unwrap();
        let mut want = pattern(4096);
        want[1000..1100].fill(0xab);
        assert_eq!(buf, want);
        img.write_zeroes(512, 1024, false).unwrap();
        img.write_zeroes(2048, 512, true).unwrap();
        img.discard(3072, 512).unwrap();
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf[512..1536].iter().all(|&b| b == 0));
        assert!(buf[2048..2560].iter().all(|&b| b == 0));
        assert_eq!(img.len(), 4096, "zeroing keeps the size");
        assert!(img.read_at(&mut buf, 1).is_err(), "read past the end");
    }

    #[test]
    fn raw_read_only_refuses_writes() {
        let tmp = image_with(&pattern(1024));
        let mut img = RawImage::open(tmp.as_path(), true).unwrap();
        assert!(img.is_read_only());
        assert!(img.write_at(&[1], 0).is_err());
        assert!(img.write_zeroes(0, 512, false).is_err());
        assert!(img.discard(0, 512).is_err());
        img.flush().unwrap();
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), pattern(1024));
    }

    #[test]
    fn ephemeral_keeps_base_untouched() {
        // An odd size exercises the partial last sector.
        let base = pattern(5000);
        let tmp = image_with(&base);
        let mut img = EphemeralImage::open(tmp.as_path()).unwrap();
        assert_eq!(img.len(), 5000);
        let mut want = base.clone();

        img.write_at(&[0x11; 512], 512).unwrap();
        want[512..1024].fill(0x11);
        // Unaligned, spanning three sectors.
        img.write_at(&[0x22; 700], 1900).unwrap();
        want[1900..2600].fill(0x22);
        // The partial tail sector.
        img.write_at(&[0x33; 8], 4990).unwrap();
        want[4990..4998].fill(0x33);
        img.write_zeroes(3000, 1000, true).unwrap();
        want[3000..4000].fill(0);
        img.discard(0, 512).unwrap();
        img.flush().unwrap();

        let mut buf = vec![0; 5000];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, want);
        // Reads straddling overlay and base sectors.
        let mut small = vec![0; 300];
        img.read_at(&mut small, 1800).unwrap();
        assert_eq!(small, want[1800..2100]);
        assert!(img.read_at(&mut small, 4800).is_err());
        assert!(img.write_at(&[0; 2], 4999).is_err());

        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), base);
        drop(img);
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), base);
    }

    #[test]
    fn sector_bitmap_is_sparse() {
        let mut bm = SectorBitmap::new(1 << 31).unwrap(); // a 1 TiB image
        assert_eq!(bm.blocks.len(), (1 << 31) / BITMAP_BLOCK_SECTORS as usize);
        for s in [0, 63, 64, 4095, 4096, (1 << 31) - 1] {
            assert!(!bm.get(s));
            bm.set(s);
            assert!(bm.get(s));
        }
        assert!(!bm.get(1) && !bm.get(4097) && !bm.get(1 << 31));
        bm.set(1 << 31); // out of range: ignored
        assert_eq!(bm.blocks.iter().filter(|b| b.is_some()).count(), 3);
    }

    #[test]
    fn lock_conflicts() {
        let tmp = image_with(&pattern(1024));
        let p = tmp.as_path();

        let rw = RawImage::open(p, false).unwrap();
        for (ro, eph) in [(false, false), (true, false), (false, true)] {
            let err = if eph {
                EphemeralImage::open(p).unwrap_err()
            } else {
                RawImage::open(p, ro).unwrap_err()
            };
            assert!(matches!(err, BlockError::Locked { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&p.display().to_string()), "{msg}");
        }
        drop(rw);

        // Shared + shared is fine; exclusive then conflicts with both.
        let ro = RawImage::open(p, true).unwrap();
        let eph = EphemeralImage::open(p).unwrap();
        assert!(matches!(
            RawImage::open(p, false),
            Err(BlockError::Locked {
                exclusive: true,
                ..
            })
        ));
        drop(ro);
        assert!(RawImage::open(p, false).is_err());
        drop(eph);
        RawImage::open(p, false).unwrap();
    }

    #[test]
    fn open_errors_name_the_path() {
        let err = RawImage::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
        let dir = std::env::temp_dir();
        let err = RawImage::open(&dir, true).unwrap_err();
        assert!(matches!(err, BlockError::NotAFile(_)), "{err}");
    }
}
