//! Test helper: waiting for a descriptor (a timerfd, an eventfd) to
//! become readable.

use std::os::unix::io::RawFd;

/// Whether `fd` becomes readable within `timeout_ms` milliseconds.
pub fn readable_within(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, which outlives the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
}
