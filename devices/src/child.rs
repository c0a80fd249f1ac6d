//! Starting helper processes (passt, virtiofsd) with exactly the
//! descriptors they need: everything capsule opens is close-on-exec, and
//! between fork and exec the child's own descriptor is put in place and
//! every other one marked close-on-exec.

use std::io;
use std::os::unix::io::RawFd;

/// The highest descriptor number to visit when `close_range` is missing.
pub(crate) fn max_fd() -> RawFd {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        RawFd::try_from(lim.rlim_cur.min(1 << 20)).unwrap_or(1 << 20)
    } else {
        1 << 16
    }
}

/// In a child between fork and exec: puts `fd` at `target` without
/// close-on-exec and marks every descriptor above `target` close-on-exec,
/// so the program gets stdin, stdout, stderr and `target` only (also none
/// that capsule's own parent leaked to it). Marking rather than closing
/// keeps the pipe the standard library reports exec failures through.
/// Only async-signal-safe calls.
pub(crate) fn hand_over(fd: RawFd, target: RawFd, max_fd: RawFd) -> io::Result<()> {
    // SAFETY: plain descriptor operations on numbers; a failure is returned.
    unsafe {
        if fd == target {
            if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        } else if libc::dup2(fd, target) < 0 {
            // dup2 leaves the new descriptor without close-on-exec.
            return Err(io::Error::last_os_error());
        }
        let first = (target + 1) as libc::c_uint;
        if libc::close_range(
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        ) < 0
        {
            // Kernels before 5.11: one descriptor at a time (EBADF for the
            // numbers not in use is fine).
            for n in target + 1..max_fd {
                libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}
