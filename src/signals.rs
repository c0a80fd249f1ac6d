//! Termination signals: SIGTERM, SIGINT and SIGHUP stop a running VM in
//! order instead of killing capsule where it stands.
//!
//! While a VM runs, the first such signal is recorded and wakes the event
//! loop (through the VM's exit eventfd), which ends the VM like a guest
//! power-off: vCPUs stopped, devices dropped (TAP devices closed, passt
//! ended), the runtime directory of a named VM removed, waiters told. The
//! process then dies of the same signal ([`reraise_pending`]), so a parent
//! still sees "killed by SIGTERM" (status 143 in a shell). A capsule still
//! waiting for its API to configure and start a VM ends the same way (the
//! wait watches an eventfd too), so its socket file and runtime directory
//! go. Otherwise with no VM running, or on a second signal while the first
//! is being handled, capsule dies at once — with the terminal restored.
//!
//! SIGUSR2 asks a running VM for its state: the event loop logs (at
//! `warn`) where each vCPU is and every virtio queue's positions
//! ([`take_state_request`], `crate::stall`), and the VM runs on. With no
//! VM running it is ignored.
//!
//! `capsule exec` forwards signals to the command instead
//! ([`forward_to`]): those of [`exec_proto::FORWARDED_SIGNALS`] are
//! recorded and wake the session, which sends them to the guest. A
//! stopping one (SIGTERM, SIGINT, SIGHUP, SIGQUIT) is forwarded only
//! while the command runs, and only once: before the command started, or
//! the second time, it stops the VM as above.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use exec_proto::{FORWARDED_SIGNALS, STOPPING_SIGNALS};
use vmm_sys_util::eventfd::EventFd;

/// The signals handled.
const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The eventfd to write to on a signal; -1 when no VM is running.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The first signal received while a VM ran; 0 if none.
static PENDING: AtomicI32 = AtomicI32::new(0);

/// SIGUSR2 came: the VM's state is to be logged.
static STATE_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The eventfd to write to when a signal is to be forwarded; -1 when
/// signals are not forwarded.
static FORWARD_FD: AtomicI32 = AtomicI32::new(-1);
/// Signals received and not yet forwarded: bit N-1 for signal N.
static TO_FORWARD: AtomicU64 = AtomicU64::new(0);
/// Whether the command runs (a stopping signal is forwarded only then).
static COMMAND_RUNNING: AtomicBool = AtomicBool::new(false);
/// The stopping signal already forwarded; 0 if none.
static STOP_FORWARDED: AtomicI32 = AtomicI32::new(0);

fn is_in(list: &[u8], signum: libc::c_int) -> bool {
    list.iter().any(|&s| libc::c_int::from(s) == signum)
}

/// Records `signum` for the command and wakes the session, if it is to
/// be forwarded. Async-signal-safe.
fn forward(signum: libc::c_int) -> bool {
    let fd = FORWARD_FD.load(Ordering::SeqCst);
    if fd < 0 || !is_in(&FORWARDED_SIGNALS, signum) {
        return false;
    }
    if is_in(&STOPPING_SIGNALS, signum)
        && (!COMMAND_RUNNING.load(Ordering::SeqCst)
            || STOP_FORWARDED
                .compare_exchange(0, signum, Ordering::SeqCst, Ordering::SeqCst)
                .is_err())
    {
        return false;
    }
    TO_FORWARD.fetch_or(1 << (signum - 1), Ordering::SeqCst);
    wake(fd);
    true
}

/// Adds one to the eventfd `fd`. Async-signal-safe.
fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: write is async-signal-safe; `one` is 8 readable bytes, the
    // size an eventfd takes. A closed fd only makes write fail.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

extern "C" fn on_signal(signum: libc::c_int) {
    if forward(signum) {
        return;
    }
    if signum == libc::SIGWINCH {
        // Ignored unless forwarded, as by default.
        return;
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    let first = PENDING
        .compare_exchange(0, signum, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if fd < 0 || !first {
        die(signum);
    }
    wake(fd);
}

/// SIGUSR2 (unless forwarded): records the request and wakes the event
/// loop of a running VM. Async-signal-safe.
extern "C" fn on_state_request(signum: libc::c_int) {
    if forward(signum) {
        return;
    }
    STATE_REQUESTED.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        wake(fd);
    }
}

/// Whether SIGUSR2 asked for the VM's state since the last call.
pub fn take_state_request() -> bool {
    STATE_REQUESTED.swap(false, Ordering::SeqCst)
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

fn handle(signals: impl IntoIterator<Item = libc::c_int>) {
    for sig in signals {
        // SAFETY: the handler only uses atomics and async-signal-safe
        // calls (write, tcsetattr, signal, raise, _exit).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// Installs the handlers (once per process).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        handle(SIGNALS);
        // SAFETY: the handler only uses atomics and write (see
        // `on_state_request`); `forward_to` replaces it for `exec`.
        unsafe {
            libc::signal(
                libc::SIGUSR2,
                on_state_request as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    });
}

/// While the returned guard lives, the signals of
/// [`exec_proto::FORWARDED_SIGNALS`] are recorded for the command (see
/// [`take_forwarded`]) and wake `wake`, except a stopping one before
/// [`set_command_running`] or after one was forwarded already.
pub fn forward_to(wake: EventFd) -> ForwardGuard {
    static ONCE: std::sync::Once = std::sync::Once::new();
    install();
    ONCE.call_once(|| handle(FORWARDED_SIGNALS.iter().map(|&s| libc::c_int::from(s))));
    TO_FORWARD.store(0, Ordering::SeqCst);
    STOP_FORWARDED.store(0, Ordering::SeqCst);
    COMMAND_RUNNING.store(false, Ordering::SeqCst);
    FORWARD_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
    ForwardGuard(wake)
}

/// Stops forwarding when dropped (before its eventfd closes).
#[derive(Debug)]
pub struct ForwardGuard(EventFd);

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        let _ =
            FORWARD_FD.compare_exchange(self.0.as_raw_fd(), -1, Ordering::SeqCst, Ordering::SeqCst);
        COMMAND_RUNNING.store(false, Ordering::SeqCst);
    }
}

/// The command started (`true`) or ended: stopping signals are forwarded
/// only in between.
pub fn set_command_running(running: bool) {
    COMMAND_RUNNING.store(running, Ordering::SeqCst);
}

/// The signals received for the command since the last call, in
/// increasing order.
pub fn take_forwarded() -> Vec<libc::c_int> {
    let bits = TO_FORWARD.swap(0, Ordering::SeqCst);
    (1..=64).filter(|s| bits & (1u64 << (s - 1)) != 0).collect()
}

/// Whether `signum` asks the command to end (and a second one stops the
/// VM).
pub fn is_stopping(signum: libc::c_int) -> bool {
    is_in(&STOPPING_SIGNALS, signum)
}

/// Makes capsule end as if `signum` had stopped the VM: for a forwarded
/// stopping signal the command did not answer in time. The caller ends
/// the run loop; capsule then dies of `signum` ([`reraise_pending`]).
pub fn stop_with(signum: libc::c_int) {
    let _ = PENDING.compare_exchange(0, signum, Ordering::SeqCst, Ordering::SeqCst);
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

/// A short name for a termination or forwarded signal, for messages.
pub fn name(signum: libc::c_int) -> &'static str {
    match signum {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        libc::SIGWINCH => "SIGWINCH",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarded_signals_are_the_ones_named() {
        let named = [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
            libc::SIGTERM,
            libc::SIGWINCH,
        ];
        let got: Vec<libc::c_int> = FORWARDED_SIGNALS.iter().map(|&s| s.into()).collect();
        assert_eq!(got, named);
        for s in named {
            assert_ne!(name(s), "a signal");
        }
        for s in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM] {
            assert!(is_stopping(s));
        }
        assert!(!is_stopping(libc::SIGUSR1));
    }

    /// The only test that touches the process-wide forwarding state
    /// (sessions of other tests have `forwarding` off): USR1 is forwarded at any time, a stopping signal only while
    /// the command runs and only once; the wake eventfd fires for each
    /// forwarded one. A real SIGUSR2 raised here reaches the handler.
    #[test]
    fn forwarding_decides_per_signal_and_wakes_the_session() {
        let wake = devices::eventfd().unwrap();
        let guard = forward_to(wake.try_clone().unwrap());
        assert!(forward(libc::SIGUSR1));
        assert!(!forward(libc::SIGTERM), "not before the command runs");
        assert!(!forward(libc::SIGSEGV), "not a forwarded signal");
        set_command_running(true);
        assert!(forward(libc::SIGTERM));
        assert!(
            !forward(libc::SIGINT),
            "a second stopping signal stops the VM"
        );
        assert!(forward(libc::SIGUSR1));
        // SAFETY: raise on this thread; the handler forwards SIGUSR2.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        assert_eq!(
            take_forwarded(),
            [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM]
        );
        assert!(take_forwarded().is_empty());
        assert_eq!(wake.read().unwrap(), 4);
        drop(guard);
        assert!(!forward(libc::SIGUSR1), "not after the guard is gone");
        assert!(take_forwarded().is_empty());
    }
}
