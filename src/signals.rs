//! Termination signals: SIGTERM, SIGINT and SIGHUP stop a running VM in
//! order instead of killing capsule where it stands.
//!
//! While a VM runs, the first such signal is recorded and wakes the event
//! loop (through the VM's exit eventfd), which ends the VM like a guest
//! power-off: vCPUs stopped, devices dropped (TAP devices closed, passt
//! ended), the runtime directory of a named VM removed, waiters told. The
//! process then dies of the same signal ([`reraise_pending`]), so a parent
//! still sees "killed by SIGTERM" (status 143 in a shell). With no VM
//! running, or on a second signal while the first is being handled,
//! capsule dies at once — with the terminal restored, as before.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The signals handled.
const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The eventfd to write to on a signal; -1 when no VM is running.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The first signal received while a VM ran; 0 if none.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signum: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    let first = PENDING
        .compare_exchange(0, signum, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if fd < 0 || !first {
        die(signum);
    }
    let one: u64 = 1;
    // SAFETY: write is async-signal-safe; `one` is 8 readable bytes, the
    // size an eventfd takes. A closed fd only makes write fail.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Restores the terminal and dies of `signum`. Async-signal-safe.
fn die(signum: libc::c_int) -> ! {
    crate::terminal::restore();
    // SAFETY: signal and raise are async-signal-safe; with the default
    // action restored, raising a termination signal ends the process.
    unsafe {
        libc::signal(signum, libc::SIG_DFL);
        libc::raise(signum);
        libc::_exit(128 + signum)
    }
}

/// Installs the handlers (once per process).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in SIGNALS {
            // SAFETY: the handler only uses atomics and async-signal-safe
            // calls (write, tcsetattr, signal, raise, _exit).
            unsafe {
                libc::signal(
                    sig,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
        }
    });
}

/// While the returned guard lives, a termination signal wakes `wake` (an
/// eventfd watched by the VM's event loop) instead of killing capsule.
pub fn wake_on_signal(wake: &impl AsRawFd) -> WakeGuard {
    WAKE_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
    WakeGuard(wake.as_raw_fd())
}

/// Stops the signal wake-ups when dropped (before the eventfd closes).
#[derive(Debug)]
pub struct WakeGuard(RawFd);

impl Drop for WakeGuard {
    fn drop(&mut self) {
        let _ = WAKE_FD.compare_exchange(self.0, -1, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The termination signal received while a VM ran, if any.
pub fn pending() -> Option<libc::c_int> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// If a termination signal stopped the VM, dies of it now (the VM is gone
/// and cleaned up by then).
pub fn reraise_pending() {
    if let Some(sig) = pending() {
        die(sig);
    }
}

/// A short name for a termination signal, for messages.
pub fn name(signum: libc::c_int) -> &'static str {
    match signum {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
