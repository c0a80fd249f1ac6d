//! Disk image locks that other VMMs see.
//!
//! capsule locks an image with open file description locks (`F_OFD_SETLK`),
//! the kind QEMU and Cloud Hypervisor take; a `flock` would not conflict
//! with theirs. The lock lasts as long as the file stays open (also across
//! other descriptors of this process: two `--disk` of one file conflict).
//!
//! QEMU's `file` driver locks single bytes: a shared (read) lock on byte
//! `100 + n` while it uses permission `n` (0 = consistent read, 1 = write,
//! 2 = write-unchanged, 3 = resize), and one on byte `200 + n` while it
//! does not let others have permission `n`; before taking a permission it
//! checks, with a test for a write lock, that nobody holds the matching
//! byte of the other kind. A read-only QEMU disk holds bytes 100 and 201
//! (it reads and lets nobody write); a writable one also 101. Cloud
//! Hypervisor takes a whole-file read or write lock.
//!
//! capsule, in those terms:
//!
//! * A writable disk takes a write lock on the whole file: it conflicts
//!   with any lock anyone holds anywhere in it, and anyone's later lock on
//!   any byte (or QEMU's test of one) conflicts with it.
//! * A read-only or ephemeral disk takes read locks on bytes 100 and 201,
//!   as a read-only QEMU disk does, then checks that nobody holds byte 101
//!   (a writer) or byte 200 (someone who lets nobody read). Two readers of
//!   either kind coexist; a writer of either kind is refused while a reader
//!   holds the image, and the other way round. Cloud Hypervisor's
//!   whole-file read lock covers byte 101, so a read-only capsule disk is
//!   refused next to a read-only Cloud Hypervisor disk too (safe, if
//!   stricter than needed).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::BlockError;

/// QEMU's byte for permission `n` held: `PERM_BASE + n`.
const PERM_BASE: i64 = 100;
/// QEMU's byte for permission `n` not shared: `SHARED_BASE + n`.
const SHARED_BASE: i64 = 200;
/// QEMU's permission numbers.
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;

#[expect(
    clippy::cast_possible_truncation,
    reason = "the lock kinds (F_RDLCK, F_WRLCK, F_UNLCK) and SEEK_SET are 0 to 2"
)]
fn flock_struct(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// Takes an OFD lock of `kind` on `[start, start + len)` (`len` 0: to the
/// end of any file size). `Ok(false)` when someone holds a conflicting one.
fn set_lock(file: &File, kind: libc::c_int, start: i64, len: i64) -> io::Result<bool> {
    let fl = flock_struct(kind, start, len);
    // SAFETY: F_OFD_SETLK reads the flock struct we pass, on our descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Whether someone else holds any lock on byte `at` (a write lock there
/// would conflict).
fn byte_is_held(file: &File, at: i64) -> io::Result<bool> {
    let mut fl = flock_struct(libc::F_WRLCK, at, 1);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(fl.l_type) != libc::F_UNLCK)
}

/// Locks an image without blocking: exclusively (whole-file write lock) for
/// a writable image, shared (QEMU's read-only bytes) for one that is only
/// read. Fails with [`BlockError::Locked`] naming `path` when another open
/// file description (another capsule, QEMU, Cloud Hypervisor, another disk
/// of this VM) holds a conflicting lock. The lock goes with the file.
pub fn lock_image(file: &File, exclusive: bool, path: &Path) -> Result<(), BlockError> {
    let lock_err = |source| BlockError::Lock {
        path: path.to_path_buf(),
        source,
    };
    let locked = if exclusive {
        set_lock(file, libc::F_WRLCK, 0, 0).map_err(lock_err)?
    } else {
        set_lock(file, libc::F_RDLCK, PERM_BASE + PERM_CONSISTENT_READ, 1).map_err(lock_err)?
            && set_lock(file, libc::F_RDLCK, SHARED_BASE + PERM_WRITE, 1).map_err(lock_err)?
            && !byte_is_held(file, PERM_BASE + PERM_WRITE).map_err(lock_err)?
            && !byte_is_held(file, SHARED_BASE + PERM_CONSISTENT_READ).map_err(lock_err)?
    };
    if locked {
        return Ok(());
    }
    // Whatever was taken goes when the caller drops the file; release it
    // now anyway so a refused open leaves no trace while it unwinds.
    let _ = set_lock(file, libc::F_UNLCK, 0, 0);
    Err(BlockError::Locked {
        path: path.to_path_buf(),
        exclusive,
    })
}
