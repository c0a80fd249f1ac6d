//! A raw image file used directly: reads and writes go between the file
//! and guest memory with one vectored call per request's pieces, and a
//! failed `fdatasync` is sticky.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::disk::{file_len, is_unsupported, open_image, read_only_error, zero_range, DiskImage};
use super::lock::lock_image;
use super::BlockError;
use crate::GuestSlice;
use vm_memory::bitmap::Bitmap;

/// The most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Runs `io(iovecs, their count, file offset)` (a `preadv64` or
/// `pwritev64`) until
/// every byte `iov` describes has moved, starting at `offset`, retrying on
/// `EINTR` and going on after a short transfer from where it stopped. One
/// call moves a whole request's pieces, where a call per piece costs a
/// system call each (a guest's 1 MiB request is often 256 pages apart).
/// A call that moves nothing is an error: the file ended (a read) or took
/// no more (a write).
fn vectored_loop(
    iov: &mut [libc::iovec],
    offset: u64,
    mut io: impl FnMut(&[libc::iovec], libc::c_int, libc::off64_t) -> libc::ssize_t,
) -> io::Result<()> {
    let mut first = 0usize;
    let mut at = offset;
    loop {
        while iov.get(first).is_some_and(|v| v.iov_len == 0) {
            first += 1;
        }
        if first == iov.len() {
            return Ok(());
        }
        let pos = libc::off64_t::try_from(at)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let batch = &iov[first..iov.len().min(first + IOV_MAX)];
        // At most IOV_MAX: fits a c_int (0, never reached, reads as the end).
        let count = libc::c_int::try_from(batch.len()).unwrap_or(0);
        let n = io(batch, count, pos);
        let mut n = match usize::try_from(n) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                continue;
            }
        };
        at = at
            .checked_add(n as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Past the pieces the call filled, into the one it stopped in.
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
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

    fn read_to_guest(&mut self, dst: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
        // The guards keep the pieces mapped while the kernel writes them.
        let guards: Vec<_> = dst.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(dst)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let res = vectored_loop(&mut iov, offset, |v, count, at| {
            // SAFETY: `v` is `count` iovecs, each pointing at its piece's
            // `len` bytes of mapped guest memory (the VolatileSlice's
            // invariant), mapped while `guards` live; the kernel writes
            // only within them.
            unsafe { libc::preadv64(fd, v.as_ptr(), count, at) }
        });
        drop(guards);
        // Even a failed read may have changed some of it.
        for s in dst {
            s.bitmap().mark_dirty(0, s.len());
        }
        res
    }

    fn write_from_guest(&mut self, src: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.check_synced()?;
        let guards: Vec<_> = src.iter().map(|s| s.ptr_guard()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(src)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast(),
                iov_len: s.len(),
            })
            .collect();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        vectored_loop(&mut iov, offset, |v, count, at| {
            // SAFETY: `v` is `count` iovecs, each pointing at its piece's
            // `len` bytes of mapped guest memory (the VolatileSlice's
            // invariant), mapped while `guards` live; the kernel only
            // reads them.
            unsafe { libc::pwritev64(fd, v.as_ptr(), count, at) }
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
mod tests {
    use super::*;
    use crate::virtio::block::disk::tests::{image_with, pattern};

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

        img.read_to_guest(&[slice(&mem, 0x2100, 1000)], 3000)
            .unwrap();
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x2100)).unwrap();
        assert_eq!(got, pattern(8192)[3000..4000]);
        assert!(dirty(&mem, 2), "the page read into is dirty");
        assert!(!dirty(&mem, 1) && !dirty(&mem, 3), "only that page");

        mem.write_slice(&[0x5a; 700], GuestAddress(0x100)).unwrap();
        img.write_from_guest(&[slice(&mem, 0x100, 700)], 100)
            .unwrap();
        let mut want = pattern(8192);
        want[100..800].fill(0x5a);
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), want);

        // Several pieces, out of order in guest memory, in one call: the
        // file's bytes land piece after piece; and back.
        let before = std::fs::read(tmp.as_path()).unwrap();
        let len = 4096 - 0x200;
        let pieces = [slice(&mem, 0x3000, 100), slice(&mem, 0x0200, len)];
        img.read_to_guest(&pieces, 10).unwrap();
        let mut got = vec![0u8; len];
        mem.read_slice(&mut got[..100], GuestAddress(0x3000))
            .unwrap();
        assert_eq!(got[..100], before[10..110]);
        mem.read_slice(&mut got, GuestAddress(0x200)).unwrap();
        assert_eq!(got, before[110..110 + len]);
        assert!(dirty(&mem, 0) && dirty(&mem, 3), "both pieces' pages");
        img.write_from_guest(&pieces, 1000).unwrap();
        let file = std::fs::read(tmp.as_path()).unwrap();
        assert_eq!(file[1000..1000 + 100 + len], before[10..110 + len]);

        let e = img.read_to_guest(&[slice(&mem, 0, 512)], 8000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "read past the end");

        img.sync = |_| Err(io::Error::from_raw_os_error(libc::EIO));
        assert!(img.flush().is_err());
        assert!(
            img.write_from_guest(&[slice(&mem, 0, 512)], 0).is_err(),
            "after a failed sync"
        );
        let mut ro = RawImage::open(image_with(&pattern(1024)).as_path(), true).unwrap();
        assert!(
            ro.write_from_guest(&[slice(&mem, 0, 512)], 0).is_err(),
            "read-only"
        );
    }

    /// A vectored transfer goes on where a short call stopped (inside a
    /// piece or at its end, past empty pieces) at the right file offset,
    /// and a call that moves nothing is the end of the file.
    #[test]
    fn vectored_loop_resumes_short_transfers() {
        let mut bufs = [vec![0u8; 4], vec![0u8; 4], vec![0u8; 6]];
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: if i == 1 { 0 } else { b.len() },
            })
            .collect();
        let mut calls = Vec::new();
        let mut moves = [3isize, 4, 100].into_iter();
        vectored_loop(&mut iov, 1000, |v, count, at| {
            assert_eq!(count as usize, v.len());
            calls.push((at, v.iter().map(|x| x.iov_len).collect::<Vec<_>>()));
            moves
                .next()
                .unwrap()
                .min(v.iter().map(|x| x.iov_len as isize).sum())
        })
        .unwrap();
        assert_eq!(
            calls,
            vec![
                (1000, vec![4, 0, 6]),
                (1003, vec![1, 0, 6]),
                (1007, vec![3])
            ]
        );
        let mut buf = [0u8; 8];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let mut moves = [5isize, 0].into_iter();
        let e = vectored_loop(&mut iov, 0, |_, _, _| moves.next().unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(vectored_loop(&mut [], 0, |_, _, _| unreachable!()).is_ok());
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
}
