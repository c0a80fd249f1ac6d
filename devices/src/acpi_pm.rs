//! Hardware-reduced ACPI power management registers.
//!
//! A hardware-reduced ACPI platform has no PM1 blocks; the FADT instead
//! names a sleep control register, a sleep status register and a reset
//! register. This device backs all three as consecutive one-byte I/O ports
//! (control, status, reset), so that a guest's `poweroff` (S5) and
//! `reboot` end the VM.

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// Offset of the sleep control register.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = 2;
/// Number of ports the device decodes.
pub const PORT_COUNT: u64 = 3;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The ACPI power management device.
#[derive(Debug)]
pub struct AcpiPm {
    exit: ExitSignal,
    s5_sleep_type: u8,
    reset_value: u8,
}

impl AcpiPm {
    /// Creates the device. `s5_sleep_type` is the `SLP_TYP` the DSDT's
    /// `_S5_` object announces; `reset_value` the FADT's reset value.
    pub fn new(exit: ExitSignal, s5_sleep_type: u8, reset_value: u8) -> Self {
        Self {
            exit,
            s5_sleep_type,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Nothing is ever asleep or waking: all registers read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL_OFFSET if v & SLP_EN != 0 => {
                let typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if typ == self.s5_sleep_type {
                    log::info!("guest requested power off (ACPI S5)");
                    self.exit.signal(GuestExit::PowerOff);
                } else {
                    crate::warn_ratelimited!(
                        "guest requested unsupported sleep type {typ}; ignored"
                    );
                }
            }
            RESET_OFFSET if v == self.reset_value => {
                log::info!("guest requested reset (ACPI reset register)");
                self.exit.signal(GuestExit::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let exit = ExitSignal::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone(), 5, 1);
        // Sleep type without SLP_EN, and another sleep state: no exit.
        pm.write(SLEEP_CONTROL_OFFSET, &[5 << 2]);
        pm.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), None);
        pm.write(SLEEP_CONTROL_OFFSET, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(GuestExit::PowerOff));
    }

    #[test]
    fn reset_register_resets() {
        let exit = ExitSignal::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone(), 5, 1);
        pm.write(RESET_OFFSET, &[2]);
        pm.write(SLEEP_STATUS_OFFSET, &[1]);
        assert_eq!(exit.reason(), None);
        let mut b = [0xffu8; 1];
        pm.read(SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b[0], 0);
        pm.write(RESET_OFFSET, &[1]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }
}
