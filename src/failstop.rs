//! Fail-stop: a panic anywhere in capsule ends the process at once.
//!
//! A panic is a capsule bug (guest and client input never panic by
//! design). Unwinding one thread would leave the rest running on state it
//! may have half-changed: a vCPU thread would vanish while the VMM and the
//! other vCPUs ran on, the VM silently stuck. So the panic hook installed
//! by [`install`] says which thread panicked, where and why, on stderr,
//! puts the terminal back and exits with [`status`] (70 for `run` and the
//! verbs, 125 for `exec`) without unwinding or running destructors. The
//! kernel then releases what the process held: guest memory, the image
//! locks, TAP devices capsule created, passt (its socket closes); a named
//! VM's runtime directory is left stale and removed by the next verb.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// The status a panic exits with unless [`set_status`] chose another:
/// `EX_SOFTWARE` from sysexits.h, "internal software error".
pub const DEFAULT_STATUS: u8 = 70;

static STATUS: AtomicU8 = AtomicU8::new(DEFAULT_STATUS);

/// Sets the status a panic exits with (`exec` uses its own error status).
pub fn set_status(status: u8) {
    STATUS.store(status, Ordering::Relaxed);
}

/// The status a panic exits with.
pub fn status() -> u8 {
    STATUS.load(Ordering::Relaxed)
}

/// Installs the fail-stop panic hook (call once, early in `main`).
pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let line = format!(
            "capsule: error: internal error: thread '{name}' panicked{at}: {payload}; stopping the VM (status {})\n",
            status()
        );
        crate::terminal::restore();
        let _ = std::io::stderr().write_all(line.as_bytes());
        // SAFETY: _exit ends the process without running anything else;
        // that is the point (no unwinding into half-changed state).
        unsafe { libc::_exit(i32::from(status())) };
    }));
}

/// Test hook (debug builds only, so release binaries do not carry it):
/// `CAPSULE_TEST_PANIC=WHAT` makes the thread that asks panic, so the
/// tests can check the fail-stop path. `what` names the place.
pub fn test_panic_requested(what: &str) -> bool {
    cfg!(debug_assertions) && std::env::var_os("CAPSULE_TEST_PANIC").is_some_and(|v| v == what)
}
