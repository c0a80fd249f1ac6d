//! QEMU-compatible pvpanic device (one I/O port).
//!
//! The guest's pvpanic driver reads the port to learn which events are
//! supported and writes an event bit when the kernel panics. This is how
//! capsule tells a guest panic apart from an ordinary reboot.

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// Event bit: the guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: a crash kernel is loaded (kdump will run); informational only.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic device.
#[derive(Debug)]
pub struct PvPanic {
    exit: ExitSignal,
}

impl PvPanic {
    /// Creates the device; a panic event is reported through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v & PVPANIC_PANICKED != 0 {
            crate::warn_ratelimited!("guest kernel panicked (pvpanic)");
            self.exit.signal(GuestExit::Panic);
        } else if v & PVPANIC_CRASH_LOADED != 0 {
            crate::info_ratelimited!("guest reports a crash kernel is loaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_write_signals_panic() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = PvPanic::new(exit.clone());
        let mut caps = [0u8; 1];
        dev.read(0, &mut caps);
        assert_eq!(caps[0] & PVPANIC_PANICKED, PVPANIC_PANICKED);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
        dev.write(0, &[]);
        assert_eq!(exit.reason(), None);
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), Some(GuestExit::Panic));
    }
}
