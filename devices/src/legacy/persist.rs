//! Snapshot state of the legacy devices: the UART (registers and receive
//! FIFO) and the i8042 controller. The ACPI PM registers and pvpanic hold
//! no state of their own (every register reads as a constant), so they
//! have nothing to save.

use std::io;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::Serial;

use super::i8042::{Pending, OUTPUT_LIMIT};
use super::serial::{FifoEvents, SerialDevice, SerialOut};
use super::I8042;

/// The FIFO size of a 16550A: a restored FIFO longer than this is refused.
const UART_FIFO_SIZE: usize = 64;

/// The UART's registers and the bytes waiting in its receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// The receive FIFO, oldest byte first.
    pub in_buffer: Vec<u8>,
    /// Whether the guest's last FCR write enabled the FIFOs (capsule's
    /// own: the input gate needs it). Absent in older snapshots: false.
    #[serde(default)]
    pub fifo_enabled: bool,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            fifo_enabled: false,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialDevice {
    /// The UART's state, FIFO included.
    pub fn save(&self) -> SerialSnapshot {
        SerialSnapshot {
            fifo_enabled: self.fifo_enabled,
            ..self.serial.state().into()
        }
    }

    /// Puts the UART in the state `snap` (registers and FIFO), keeping
    /// its interrupt, FIFO events and output. A FIFO longer than the
    /// hardware's is refused and leaves the UART as it was.
    pub fn restore(&mut self, snap: &SerialSnapshot) -> io::Result<()> {
        if snap.in_buffer.len() > UART_FIFO_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("serial FIFO of {} bytes", snap.in_buffer.len()),
            ));
        }
        let trigger = self.serial.interrupt_evt().try_clone()?;
        let ready = self.serial.events().buffer_ready.try_clone()?;
        let placeholder = Serial::with_events(
            trigger.try_clone()?,
            FifoEvents {
                buffer_ready: ready.try_clone()?,
            },
            Box::new(io::sink()) as SerialOut,
        );
        let out = std::mem::replace(&mut self.serial, placeholder).into_writer();
        let events = FifoEvents {
            buffer_ready: ready,
        };
        self.serial = Serial::from_state(&SerialState::from(snap), trigger, events, out)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.fifo_enabled = snap.fifo_enabled;
        Ok(())
    }
}

/// The i8042's controller configuration byte, command state and the
/// bytes waiting in its output buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    ctr: u8,
    status_cmd: bool,
    pending: Pending,
    /// (byte, came from the keyboard) pairs, oldest first.
    output: Vec<(u8, bool)>,
}

impl I8042 {
    /// The controller's state.
    pub fn save(&self) -> I8042Snapshot {
        I8042Snapshot {
            ctr: self.ctr,
            status_cmd: self.status_cmd,
            pending: self.pending,
            output: self
                .output
                .iter()
                .copied()
                .zip(self.front_from_keyboard.iter().copied())
                .collect(),
        }
    }

    /// Puts the controller in the state `snap`; an output buffer beyond
    /// the device's limit is refused.
    pub fn restore(&mut self, snap: &I8042Snapshot) -> io::Result<()> {
        if snap.output.len() > OUTPUT_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("i8042 output buffer of {} bytes", snap.output.len()),
            ));
        }
        self.ctr = snap.ctr;
        self.status_cmd = snap.status_cmd;
        self.pending = snap.pending;
        self.output = snap.output.iter().map(|&(b, _)| b).collect();
        self.front_from_keyboard = snap.output.iter().map(|&(_, k)| k).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::legacy::EventFdTrigger;

    #[test]
    fn serial_round_trip_keeps_registers_and_fifo() {
        let (mut a, _) =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        a.write(3, &[0x03]); // LCR: 8 bits
        a.write(7, &[0x5a]); // scratch
        a.enqueue(b"hi").unwrap();
        let snap = a.save();
        assert_eq!(snap.in_buffer, b"hi");
        let json = serde_json::to_string(&snap).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let (mut b, _) =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        b.restore(&back).unwrap();
        let mut byte = [0u8];
        b.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        b.read(0, &mut byte);
        assert_eq!(byte[0], b'h');
        assert_eq!(b.save().in_buffer, b"i");
        let mut long = back.clone();
        long.in_buffer = vec![0; 65];
        assert!(b.restore(&long).is_err());
    }

    /// A guest restored with its port open (receive interrupt on) gets
    /// input at once: a fresh device must not wait for an IER write the
    /// guest made before the snapshot.
    #[test]
    fn restored_open_port_accepts_input() {
        let (mut a, _) =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        a.write(3, &[0x03]);
        a.write(2, &[0x81]); // FCR: FIFOs on
        a.write(1, &[0x0f]); // IER: every interrupt, receive included
        let snap = a.save();
        assert!(snap.fifo_enabled);
        let (mut b, _) =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        assert!(!b.accepts_input(), "a fresh UART waits for the driver");
        b.restore(&snap).unwrap();
        assert!(b.accepts_input(), "the restored driver had the port open");
    }
}
