//! How devices tell the VMM that the guest wants the VM to end.
//!
//! Power-off, reset and panic requests (and fatal vCPU faults) arrive on vCPU threads (port writes)
//! but are acted on by the VMM's event loop; the host's own stop request
//! takes the same way. [`ExitSignal`] records the
//! first request and wakes the loop through an eventfd.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Why the guest asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GuestExit {
    /// The guest powered off (ACPI S5).
    PowerOff = 1,
    /// The guest reset the machine (i8042, ACPI reset register, triple fault).
    Reset = 2,
    /// The guest kernel panicked (pvpanic).
    Panic = 3,
    /// A vCPU hit a condition the VMM cannot handle (KVM entry failure,
    /// emulation failure); the VM cannot go on.
    Fault = 4,
    /// Not the guest: the host asked the VMM to stop the VM (e.g. a
    /// termination signal).
    Stopped = 5,
}

impl GuestExit {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::PowerOff),
            2 => Some(Self::Reset),
            3 => Some(Self::Panic),
            4 => Some(Self::Fault),
            5 => Some(Self::Stopped),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Inner {
    reason: AtomicU8,
    evt: EventFd,
}

/// A cloneable handle that devices use to request the end of the VM.
#[derive(Debug, Clone)]
pub struct ExitSignal {
    inner: Arc<Inner>,
}

impl ExitSignal {
    /// Creates a signal with a non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                reason: AtomicU8::new(0),
                evt: crate::eventfd()?,
            }),
        })
    }

    /// Records `reason` and wakes the waiter. The first reason wins: a
    /// panicking guest that then reboots is still reported as a panic.
    pub fn signal(&self, reason: GuestExit) {
        let _ =
            self.inner
                .reason
                .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        if let Err(e) = self.inner.evt.write(1) {
            crate::error_ratelimited!("cannot signal guest exit: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<GuestExit> {
        GuestExit::from_u8(self.inner.reason.load(Ordering::SeqCst))
    }

    /// Consumes a pending wake-up, if any.
    pub fn clear_event(&self) {
        let _ = self.inner.evt.read();
    }
}

impl AsRawFd for ExitSignal {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.evt.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.clone().signal(GuestExit::Panic);
        s.signal(GuestExit::Reset);
        assert_eq!(s.reason(), Some(GuestExit::Panic));
        assert_eq!(s.inner.evt.read().unwrap(), 2);
    }
}
