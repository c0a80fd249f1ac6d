//! The part of the i8042 keyboard controller a Linux guest uses: the CPU
//! reset command (`reboot=k`), and a keyboard that answers the PS/2
//! commands Linux's `atkbd` driver sends and can be made to type
//! Ctrl-Alt-Del ([`I8042::trigger_ctrl_alt_del`], the API's
//! `SendCtrlAltDel`).
//!
//! Ports (offsets from 0x60): 0 is the data port, 4 the status (read) and
//! command (write) port. Bytes for the guest queue in an output buffer; the
//! keyboard interrupt (IRQ 1, through `irq`) is raised for each byte that
//! comes from the keyboard while the guest enabled keyboard interrupts.
//! There is no auxiliary (mouse) port.

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// Status register: output buffer full.
const STATUS_OBF: u8 = 1 << 0;
/// Status register: system flag (self-test passed).
const STATUS_SYS: u8 = 1 << 2;
/// Status register: the last write was a command.
const STATUS_CMD: u8 = 1 << 3;
/// Status register: keyboard not inhibited.
const STATUS_UNLOCKED: u8 = 1 << 4;

/// Controller configuration byte: keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 1 << 0;
/// Controller configuration byte: system flag.
const CTR_SYS: u8 = 1 << 2;
/// Controller configuration byte: keyboard disabled.
const CTR_KBD_DISABLED: u8 = 1 << 4;
/// Controller configuration byte: translate set 2 to set 1.
const CTR_XLATE: u8 = 1 << 6;

/// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPORT: u8 = 0xd0;
const CMD_WRITE_OUTPORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;

/// Most bytes the output buffer holds; older keyboard bytes are dropped
/// beyond this (a guest that never reads cannot grow host memory).
pub(super) const OUTPUT_LIMIT: usize = 64;

/// Ctrl, Alt, Delete pressed then released, in scancode set 1 (what the
/// guest reads when the controller translates, Linux's default).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same in scancode set 2 (no translation).
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// What the next data-port write means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Pending {
    /// A byte for the keyboard.
    Keyboard,
    /// The controller configuration byte (after 0x60).
    Ctr,
    /// The output port (after 0xd1).
    OutPort,
    /// A byte to put in the output buffer as if typed (after 0xd2).
    KbdOutBuf,
    /// A byte for the (absent) auxiliary device: swallowed.
    Aux,
    /// The parameter of a keyboard command that takes one.
    KeyboardParam,
}

/// i8042 decoding ports 0x60..=0x64; a reset command ends the VM.
pub struct I8042 {
    exit: ExitSignal,
    irq: EventFdTrigger,
    pub(super) ctr: u8,
    pub(super) status_cmd: bool,
    pub(super) pending: Pending,
    pub(super) output: VecDeque<u8>,
    /// Whether the byte at the front of `output` raised (or must raise) an
    /// interrupt once it is the front.
    pub(super) front_from_keyboard: VecDeque<bool>,
}

impl I8042 {
    /// Creates the controller: a guest reset is reported through `exit`,
    /// the keyboard interrupt is raised through `irq`.
    pub fn new(exit: ExitSignal, irq: EventFdTrigger) -> Self {
        Self {
            exit,
            irq,
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            status_cmd: false,
            pending: Pending::Keyboard,
            output: VecDeque::new(),
            front_from_keyboard: VecDeque::new(),
        }
    }

    /// Types Ctrl-Alt-Del on the keyboard: presses and releases, in the
    /// scancode set the guest reads. Returns false (and queues nothing) if
    /// the output buffer has no room.
    pub fn trigger_ctrl_alt_del(&mut self) -> bool {
        let codes: &[u8] = if self.ctr & CTR_XLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if self.output.len() + codes.len() > OUTPUT_LIMIT {
            return false;
        }
        let stale = !self.output.is_empty();
        for &c in codes {
            self.push(c, true);
        }
        // Bytes the guest has not read were already there, so `push`
        // raised nothing: if their interrupt was lost (or never raised,
        // interrupts being off then), the keys would wait behind them for
        // good. A real controller holds IRQ 1 up while its buffer is full;
        // an edge now stands for that level (a spurious one is harmless:
        // the driver finds no data and returns).
        if stale {
            self.raise_for_front();
        }
        true
    }

    /// Whether a keyboard byte at the front of the buffer raises IRQ 1.
    fn kbd_irq_enabled(&self) -> bool {
        self.ctr & CTR_KBD_INT != 0 && self.ctr & CTR_KBD_DISABLED == 0
    }

    /// Sets the configuration byte. Turning keyboard interrupts on with
    /// a keyboard byte waiting raises IRQ 1, as a real controller's level
    /// interrupt would: otherwise that byte, and all behind it, would
    /// never be read.
    fn set_ctr(&mut self, ctr: u8) {
        let before = self.kbd_irq_enabled();
        self.ctr = ctr;
        if !before && self.kbd_irq_enabled() && !self.output.is_empty() {
            self.raise_for_front();
        }
    }

    /// Queues a byte for the guest; keyboard bytes raise IRQ 1 when they
    /// reach the front of the buffer and keyboard interrupts are enabled.
    fn push(&mut self, byte: u8, from_keyboard: bool) {
        if self.output.len() >= OUTPUT_LIMIT {
            return;
        }
        let was_empty = self.output.is_empty();
        self.output.push_back(byte);
        self.front_from_keyboard.push_back(from_keyboard);
        if was_empty {
            self.raise_for_front();
        }
    }

    fn raise_for_front(&self) {
        let keyboard = self.front_from_keyboard.front().copied().unwrap_or(false);
        if keyboard && self.kbd_irq_enabled() {
            if let Err(e) = self.irq.trigger() {
                crate::warn_ratelimited!("i8042: cannot raise the keyboard interrupt: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        self.front_from_keyboard.pop_front();
        if !self.output.is_empty() {
            self.raise_for_front();
        }
        byte
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYS | STATUS_UNLOCKED;
        if !self.output.is_empty() {
            s |= STATUS_OBF;
        }
        if self.status_cmd {
            s |= STATUS_CMD;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.status_cmd = true;
        self.pending = Pending::Keyboard;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR => self.pending = Pending::Ctr,
            CMD_AUX_DISABLE | CMD_AUX_ENABLE => {}
            // No auxiliary port: its interface test reports a clock line
            // stuck low.
            CMD_AUX_TEST => self.push(0x01, false),
            CMD_SELF_TEST => self.push(0x55, false),
            CMD_KBD_TEST => self.push(0x00, false),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.set_ctr(self.ctr & !CTR_KBD_DISABLED),
            // Output port: A20 enabled, CPU not in reset.
            CMD_READ_OUTPORT => self.push(0x03, false),
            CMD_WRITE_OUTPORT => self.pending = Pending::OutPort,
            CMD_WRITE_KBD_OUTBUF => self.pending = Pending::KbdOutBuf,
            CMD_WRITE_AUX_OUTBUF | CMD_WRITE_AUX => self.pending = Pending::Aux,
            CMD_RESET_CPU => self.reset(),
            _ => crate::debug_ratelimited!("i8042: ignored command {cmd:#x}"),
        }
    }

    fn reset(&self) {
        log::info!("guest requested reset (i8042)");
        self.exit.signal(GuestExit::Reset);
    }

    fn data(&mut self, byte: u8) {
        self.status_cmd = false;
        let pending = std::mem::replace(&mut self.pending, Pending::Keyboard);
        match pending {
            Pending::Ctr => self.set_ctr(byte),
            Pending::OutPort => {
                // Bit 0 low holds the CPU in reset.
                if byte & 1 == 0 {
                    self.reset();
                }
            }
            Pending::KbdOutBuf => self.push(byte, true),
            Pending::Aux => {}
            Pending::KeyboardParam => self.push(KBD_ACK, true),
            Pending::Keyboard => self.keyboard(byte),
        }
    }

    /// A byte sent to the keyboard: a PS/2 keyboard command.
    fn keyboard(&mut self, cmd: u8) {
        match cmd {
            // Set LEDs, set typematic rate, select scancode set: a
            // parameter byte follows; both bytes are acknowledged.
            0xed | 0xf3 => {
                self.push(KBD_ACK, true);
                self.pending = Pending::KeyboardParam;
            }
            0xf0 => {
                self.push(KBD_ACK, true);
                self.pending = Pending::KeyboardParam;
            }
            // Identify: an MF2 keyboard (translated id when translating).
            0xf2 => {
                self.push(KBD_ACK, true);
                self.push(0xab, true);
                self.push(
                    if self.ctr & CTR_XLATE != 0 {
                        0x41
                    } else {
                        0x83
                    },
                    true,
                );
            }
            // Echo.
            0xee => self.push(0xee, true),
            // Reset: acknowledge, then self-test passed.
            0xff => {
                self.push(KBD_ACK, true);
                self.push(KBD_BAT_OK, true);
            }
            // Enable, disable, set defaults and the rest: acknowledged.
            _ => self.push(KBD_ACK, true),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            0 => self.read_data(),
            4 => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.data(v),
            4 => self.command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, ExitSignal, EventFdTrigger) {
        let exit = ExitSignal::new().unwrap();
        let irq = EventFdTrigger::new().unwrap();
        let dev = I8042::new(exit.clone(), irq.try_clone().unwrap());
        (dev, exit, irq)
    }

    fn read(dev: &mut I8042, port: u64) -> u8 {
        let mut b = [0u8];
        dev.read(port, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_resets() {
        let (mut dev, exit, _) = dev();
        dev.write(4, &[0xaa]);
        assert_eq!(read(&mut dev, 0), 0x55);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }

    #[test]
    fn output_port_reset_bit_resets() {
        let (mut dev, exit, _) = dev();
        dev.write(4, &[0xd1]);
        dev.write(0, &[0x03]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xd1]);
        dev.write(0, &[0x02]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }

    #[test]
    fn configuration_byte_round_trips() {
        let (mut dev, _, _) = dev();
        dev.write(4, &[0x20]);
        assert_ne!(read(&mut dev, 4) & STATUS_OBF, 0);
        assert_eq!(read(&mut dev, 0), 0x45);
        assert_eq!(read(&mut dev, 4) & STATUS_OBF, 0);
        dev.write(4, &[0x60]);
        dev.write(0, &[0x05]);
        dev.write(4, &[0x20]);
        assert_eq!(read(&mut dev, 0), 0x05);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_with_interrupts() {
        let (mut dev, _, irq) = dev();
        dev.write(0, &[0xf2]);
        assert!(irq.take());
        assert_eq!(read(&mut dev, 0), KBD_ACK);
        assert!(irq.take(), "next byte raises the interrupt again");
        assert_eq!(read(&mut dev, 0), 0xab);
        assert_eq!(read(&mut dev, 0), 0x41);
        dev.write(0, &[0xed]);
        dev.write(0, &[0x00]);
        assert_eq!(read(&mut dev, 0), KBD_ACK);
        assert_eq!(read(&mut dev, 0), KBD_ACK);
        assert_eq!(read(&mut dev, 4) & STATUS_OBF, 0);
    }

    #[test]
    fn ctrl_alt_del_in_the_guest_scancode_set() {
        let (mut dev, _, irq) = dev();
        assert!(dev.trigger_ctrl_alt_del());
        assert!(irq.take());
        let got: Vec<u8> = (0..8).map(|_| read(&mut dev, 0)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        // Without translation: set 2.
        dev.write(4, &[0x60]);
        dev.write(0, &[CTR_KBD_INT]);
        assert!(dev.trigger_ctrl_alt_del());
        let got: Vec<u8> = (0..11).map(|_| read(&mut dev, 0)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET2);
    }

    /// A keyboard byte queued while keyboard interrupts were off raises
    /// IRQ 1 when they are turned on, and a Ctrl-Alt-Del queued behind
    /// unread bytes raises it again: the keys never wait for an interrupt
    /// that will not come.
    #[test]
    fn waiting_keyboard_bytes_always_get_an_interrupt() {
        let (mut dev, _, irq) = dev();
        dev.write(4, &[0x60]);
        dev.write(0, &[CTR_XLATE]); // interrupts off
        dev.write(0, &[0xf2]); // keyboard ACK and id, no interrupt
        assert!(!irq.take());
        dev.write(4, &[0x60]);
        dev.write(0, &[CTR_XLATE | CTR_KBD_INT]);
        assert!(irq.take(), "enabling interrupts with data waiting");
        // The guest lost that interrupt: a Ctrl-Alt-Del still gets one.
        assert!(dev.trigger_ctrl_alt_del());
        assert!(irq.take(), "keys queued behind unread bytes");
        assert_eq!(read(&mut dev, 0), KBD_ACK);
        // Disabled keyboard: enabling it (0xae) raises for waiting data.
        dev.write(4, &[CMD_KBD_DISABLE]);
        irq.take();
        dev.write(4, &[CMD_KBD_ENABLE]);
        assert!(irq.take(), "keyboard enabled with data waiting");
    }

    #[test]
    fn output_is_bounded() {
        let (mut dev, _, _) = dev();
        let mut ok = 0;
        while dev.trigger_ctrl_alt_del() {
            ok += 1;
            assert!(ok < 100);
        }
        assert_eq!(dev.output.len(), ok * 8);
        assert!(dev.output.len() <= OUTPUT_LIMIT);
        // Garbage offsets and empty accesses are harmless.
        dev.write(2, &[0xfe]);
        dev.write(0, &[]);
        let mut empty = [];
        dev.read(0, &mut empty);
    }
}
