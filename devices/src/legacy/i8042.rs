//! The part of the i8042 keyboard controller a Linux guest needs: the CPU
//! reset command (`reboot=k`).

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// i8042 decoding ports 0x60..=0x64; a reset command ends the VM.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
    exit: ExitSignal,
    reset_evt: EventFdTrigger,
}

impl I8042 {
    /// Creates the controller; a guest reset is reported through `exit`.
    pub fn new(exit: ExitSignal) -> std::io::Result<Self> {
        let reset_evt = EventFdTrigger::new()?;
        Ok(Self {
            device: I8042Device::new(reset_evt.try_clone()?),
            exit,
            reset_evt,
        })
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.device.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.device.write(off, v) {
            log::error!("i8042: cannot signal reset: {e:?}");
        }
        // The reset trigger only counts; the VMM-wide exit carries the reason.
        if self.reset_evt.take() {
            log::info!("guest requested reset (i8042)");
            self.exit.signal(GuestExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone()).unwrap();
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xaa]);
        assert_eq!(exit.reason(), None);
        let mut b = [0xff];
        dev.read(4, &mut b);
        assert_eq!(b[0], 0);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }
}
