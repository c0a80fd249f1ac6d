//! `CAPSULE_SECCOMP=trap`: a forbidden call raises `SIGSYS` instead of
//! killing the process at once; the handler says which thread made which
//! call, puts the terminal back and exits. For developers finding a call
//! a filter lacks (`docs/security.md`).

use std::cell::Cell;

/// A process ended by a forbidden call exits with this status (128 +
/// SIGSYS, what a shell shows for a process killed by `SIGSYS`, as the
/// default kill mode does).
pub const STATUS: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// This thread's name, kept where the signal handler can read it
    /// without allocating.
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Records the calling thread's name for the handler.
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(buf.len());
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    NAME.with(|c| c.set(buf));
}

/// Installs the process-wide `SIGSYS` handler.
pub fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill handler, flags, mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t to clear.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: valid sigaction; the handler only makes async-signal-safe
    // calls that every filter allows (write, ioctl TCSETS, exit_group).
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Appends `s` to `buf` at `*at`, as far as it fits.
fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

/// The decimal digits of `n`, without allocating.
fn put_num(buf: &mut [u8], at: &mut usize, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        put(buf, at, b"-");
    }
    put(buf, at, &digits[i..]);
}

/// The line the handler writes (also used by the tests).
pub fn message(buf: &mut [u8], thread: &[u8], nr: i64) -> usize {
    let mut at = 0;
    let name_len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    put(buf, &mut at, b"capsule: error: seccomp: thread '");
    put(buf, &mut at, &thread[..name_len]);
    put(buf, &mut at, b"' made a forbidden system call ");
    put_num(buf, &mut at, nr);
    put(buf, &mut at, b"; stopping (status ");
    put_num(buf, &mut at, i64::from(STATUS));
    put(
        buf,
        &mut at,
        b"). If capsule needs it, add it to src/seccomp/filters.rs (docs/security.md)\n",
    );
    at
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // For SIGSYS the kernel fills `_sigsys`: after si_signo, si_errno,
    // si_code and padding (16 bytes) come `_call_addr` (8 bytes) and
    // `_syscall` (int) at byte 24.
    // SAFETY: the kernel passed a valid siginfo_t for a SA_SIGINFO handler.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let name = NAME.with(|c| c.get());
    let mut buf = [0u8; 256];
    let len = message(&mut buf, &name, i64::from(nr));
    crate::terminal::restore();
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(STATUS);
    }
}
