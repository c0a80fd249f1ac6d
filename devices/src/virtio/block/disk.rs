//! Disk image backends for virtio-blk: the [`DiskImage`] interface and
//! what the images share (opening, sizing, zeroing a range); the raw file
//! used directly is in `raw.rs`, the copy-on-write ephemeral image in
//! `ephemeral.rs`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::BlockError;
use crate::GuestSlice;

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

    /// Fills the pieces of guest memory `dst`, in order, from the file's
    /// bytes at `offset` on (their pages are marked dirty), with no copy
    /// in between.
    fn read_to_guest(&mut self, _dst: &[GuestSlice<'_>], _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Writes all of the pieces of guest memory `src`, in order, at
    /// `offset` on, with no copy in between.
    fn write_from_guest(&mut self, _src: &[GuestSlice<'_>], _offset: u64) -> io::Result<()> {
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

pub(super) fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "disk image is read-only")
}

pub(super) fn is_unsupported(e: &vmm_sys_util::errno::Error) -> bool {
    matches!(e.errno(), libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::virtio::block::{EphemeralImage, RawImage};
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
