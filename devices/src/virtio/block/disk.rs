//! Disk image backends for virtio-blk: the [`DiskImage`] interface and a raw
//! file used directly (the copy-on-write ephemeral image is in
//! `ephemeral.rs`).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::lock::lock_image;
use super::BlockError;
use crate::GuestSlice;
use vm_memory::bitmap::Bitmap;

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

    /// The descriptor the io_uring engine reads and writes at the same
    /// offsets: only an image whose data is all in one file has one.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Whether [`Self::read_to_guest`] and [`Self::write_from_guest`]
    /// work: the image moves data between its file and guest memory
    /// directly. Otherwise the device copies through a buffer of its own
    /// with [`Self::read_at`] and [`Self::write_at`].
    fn direct_io(&self) -> bool {
        false
    }

    /// Fills `dst` (guest memory; its pages are marked dirty) from
    /// `offset`, with no copy in between.
    fn read_to_guest(&mut self, _dst: &GuestSlice<'_>, _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Writes all of `src` (guest memory) at `offset`, with no copy in
    /// between.
    fn write_from_guest(&mut self, _src: &GuestSlice<'_>, _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Makes completed writes durable (fdatasync).
    fn flush(&mut self) -> io::Result<()>;

    /// Tells the backend the range is no longer needed. Afterwards the range
    /// reads either as before or as zeroes.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes the range read as zeroes; with `unmap` the space may be
    /// deallocated.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;

    /// For a snapshot: writes the data the image holds apart from its file
    /// (an ephemeral overlay's sectors) into `out` at the same offsets and
    /// returns where it is, as (first sector, sector count) runs. Images
    /// whose whole state is their file have nothing to save.
    fn save_overlay(&self, _out: &File) -> io::Result<Vec<(u64, u64)>> {
        Ok(Vec::new())
    }

    /// Restores what [`Self::save_overlay`] saved. Only an image with an
    /// overlay can take any runs.
    fn restore_overlay(&mut self, _from: &File, runs: &[(u64, u64)]) -> io::Result<()> {
        if runs.is_empty() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the snapshot has overlay data for a disk that is not ephemeral",
            ))
        }
    }
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "disk image is read-only")
}

fn is_unsupported(e: &vmm_sys_util::errno::Error) -> bool {
    matches!(e.errno(), libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
}

/// Runs `io(done, file offset)` (a `pread64` or `pwrite64` of the bytes
/// from `done` on) until `len` bytes have moved, retrying on `EINTR`. A
/// call that moves nothing is an error: the file ended (a read) or took
/// no more (a write).
fn positional_loop(
    len: usize,
    offset: u64,
    mut io: impl FnMut(usize, libc::off64_t) -> libc::ssize_t,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|a| libc::off64_t::try_from(a).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let n = io(done, at);
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Writes `len` zero bytes at `offset`, the slow way.
fn fill_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 64 * 1024;
    let zeroes = vec![0u8; crate::usize_from(CHUNK.min(len))];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeroes[..crate::usize_from(n)], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Zeroes a range of `file` with fallocate, falling back to writing zeroes.
pub(super) fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
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
pub(super) fn file_len(file: &mut File) -> io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Opens an image file and checks it is a regular file or a block device.
/// The open is non-blocking, so a FIFO (whose read-only open would wait
/// for a writer) is refused at once; `O_NONBLOCK` is cleared afterwards.
pub(super) fn open_image(path: &Path, writable: bool) -> Result<File, BlockError> {
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

/// A raw image file used directly.
///
/// A failed `fdatasync` is sticky: Linux may mark the pages that failed
/// to reach the disk clean, so a later `fdatasync` can succeed without the
/// data being there. After one failure every later flush and write fails
/// (the guest sees `IOERR`), as QEMU does; reads go on.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    len: u64,
    read_only: bool,
    /// The first `fdatasync` failure, if any.
    sync_failed: Option<i32>,
    /// `File::sync_data`; a test double in tests.
    sync: fn(&File) -> io::Result<()>,
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
            sync_failed: None,
            sync: File::sync_data,
        })
    }

    /// The error every write and flush returns after a failed sync.
    fn check_synced(&self) -> io::Result<()> {
        match self.sync_failed {
            None => Ok(()),
            Some(errno) => Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                format!(
                    "an earlier fdatasync failed ({}); the image may be missing written data",
                    io::Error::from_raw_os_error(errno)
                ),
            )),
        }
    }
}

impl DiskImage for RawImage {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.file))
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.check_synced()?;
        self.file.write_all_at(buf, offset)
    }

    fn direct_io(&self) -> bool {
        true
    }

    fn read_to_guest(&mut self, dst: &GuestSlice<'_>, offset: u64) -> io::Result<()> {
        let guard = dst.ptr_guard_mut();
        let res = positional_loop(dst.len(), offset, |done, at| {
            // SAFETY: `guard` points at `dst.len()` bytes of mapped guest
            // memory (the VolatileSlice's invariant), mapped while `dst`
            // lives; the kernel writes at most the `dst.len() - done`
            // bytes from `done` on.
            unsafe {
                libc::pread64(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    guard.as_ptr().add(done).cast(),
                    dst.len() - done,
                    at,
                )
            }
        });
        // Even a failed read may have changed some of it.
        dst.bitmap().mark_dirty(0, dst.len());
        res
    }

    fn write_from_guest(&mut self, src: &GuestSlice<'_>, offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.check_synced()?;
        let guard = src.ptr_guard();
        positional_loop(src.len(), offset, |done, at| {
            // SAFETY: `guard` points at `src.len()` bytes of mapped guest
            // memory (the VolatileSlice's invariant), mapped while `src`
            // lives; the kernel reads at most the `src.len() - done` bytes
            // from `done` on.
            unsafe {
                libc::pwrite64(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    guard.as_ptr().add(done).cast(),
                    src.len() - done,
                    at,
                )
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_synced()?;
        (self.sync)(&self.file).inspect_err(|e| {
            self.sync_failed = Some(e.raw_os_error().unwrap_or(libc::EIO));
        })
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.check_synced()?;
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
        self.check_synced()?;
        zero_range(&self.file, offset, len, unmap)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::virtio::block::EphemeralImage;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    pub(crate) fn image_with(data: &[u8]) -> TempFile {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().write_all(data).unwrap();
        tmp
    }

    pub(crate) fn pattern(len: usize) -> Vec<u8> {
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

    /// Reads and writes straight between the file and guest memory: the
    /// bytes land where asked, the pages read into are marked dirty (a
    /// Diff snapshot must carry them), and a read past the end, a write
    /// to a read-only image or after a failed sync are errors.
    #[test]
    fn raw_direct_io_moves_guest_memory() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
        let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let dirty = |mem: &crate::GuestMemoryMmap, page: u64| {
            mem.find_region(GuestAddress(page * 4096))
                .unwrap()
                .bitmap()
                .dirty_at(crate::usize_from(page * 4096))
        };
        fn slice(mem: &crate::GuestMemoryMmap, addr: u64, len: usize) -> crate::GuestSlice<'_> {
            mem.get_slice(GuestAddress(addr), len).unwrap()
        }
        let tmp = image_with(&pattern(8192));
        let mut img = RawImage::open(tmp.as_path(), false).unwrap();
        assert!(img.direct_io());

        img.read_to_guest(&slice(&mem, 0x2100, 1000), 3000).unwrap();
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x2100)).unwrap();
        assert_eq!(got, pattern(8192)[3000..4000]);
        assert!(dirty(&mem, 2), "the page read into is dirty");
        assert!(!dirty(&mem, 1) && !dirty(&mem, 3), "only that page");

        mem.write_slice(&[0x5a; 700], GuestAddress(0x100)).unwrap();
        img.write_from_guest(&slice(&mem, 0x100, 700), 100).unwrap();
        let mut want = pattern(8192);
        want[100..800].fill(0x5a);
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), want);

        let e = img.read_to_guest(&slice(&mem, 0, 512), 8000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "read past the end");

        img.sync = |_| Err(io::Error::from_raw_os_error(libc::EIO));
        assert!(img.flush().is_err());
        assert!(
            img.write_from_guest(&slice(&mem, 0, 512), 0).is_err(),
            "after a failed sync"
        );
        let mut ro = RawImage::open(image_with(&pattern(1024)).as_path(), true).unwrap();
        assert!(
            ro.write_from_guest(&slice(&mem, 0, 512), 0).is_err(),
            "read-only"
        );
    }

    /// A failed fdatasync stays failed: Linux may have marked the lost
    /// pages clean, so the next fdatasync would succeed with the data gone.
    #[test]
    fn failed_sync_is_sticky() {
        fn failing(_: &File) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn succeeding(_: &File) -> io::Result<()> {
            Ok(())
        }
        let tmp = image_with(&pattern(4096));
        let mut img = RawImage::open(tmp.as_path(), false).unwrap();
        img.write_at(&[1; 512], 0).unwrap();
        img.flush().unwrap();
        img.sync = failing;
        assert_eq!(img.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        // The kernel would now report success: the image must not.
        img.sync = succeeding;
        for _ in 0..2 {
            let e = img.flush().unwrap_err();
            assert!(e.to_string().contains("earlier fdatasync failed"), "{e}");
        }
        assert!(img.write_at(&[2; 512], 512).is_err());
        assert!(img.write_zeroes(0, 512, false).is_err());
        assert!(img.discard(0, 512).is_err());
        let mut buf = [0u8; 512];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1; 512], "reads go on");
        let on_disk = std::fs::read(tmp.as_path()).unwrap();
        assert_eq!(
            on_disk[512..1024],
            pattern(4096)[512..1024],
            "nothing written"
        );
    }

    /// The locks' QEMU side without QEMU: another open file description
    /// takes the bytes a QEMU writer or reader takes.
    #[test]
    fn locks_conflict_with_qemu_style_byte_locks() {
        fn hold(path: &Path, bytes: &[i64]) -> File {
            let f = File::open(path).unwrap();
            for &b in bytes {
                // SAFETY: flock is a plain C struct; all-zero is valid.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = libc::F_RDLCK as libc::c_short;
                fl.l_start = b;
                fl.l_len = 1;
                assert_eq!(
                    // SAFETY: F_OFD_SETLK with a struct we own, on our descriptor.
                    unsafe {
                        libc::fcntl(
                            std::os::unix::io::AsRawFd::as_raw_fd(&f),
                            libc::F_OFD_SETLK,
                            &fl,
                        )
                    },
                    0
                );
            }
            f
        }
        let tmp = image_with(&pattern(1024));
        let p = tmp.as_path();
        let writer = hold(p, &[100, 101, 201]);
        assert!(RawImage::open(p, false).is_err());
        assert!(RawImage::open(p, true).is_err());
        assert!(EphemeralImage::open(p).is_err());
        drop(writer);
        let reader = hold(p, &[100, 201]);
        assert!(RawImage::open(p, false).is_err());
        RawImage::open(p, true).unwrap();
        EphemeralImage::open(p).unwrap();
        drop(reader);
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
