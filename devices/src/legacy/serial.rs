//! A 16550A UART (vm-superio) wired to a host input and output stream.
//!
//! Output: every byte the guest transmits goes straight to the writer on the
//! vCPU thread that wrote it. Input: [`SerialInput`] is an event-loop
//! subscriber that reads the host stream only while the UART's receive FIFO
//! has room, and stops polling when it is full until the guest drains it, so
//! no typed or piped byte is dropped.

use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// A [`Trigger`] backed by an eventfd (used for irqfd interrupts).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Creates a non-blocking eventfd trigger.
    pub fn new() -> io::Result<Self> {
        Ok(Self(crate::eventfd()?))
    }

    /// Duplicates the underlying eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// The eventfd, e.g. to register it as an irqfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }

    /// Returns whether the trigger fired since the last call, and clears it.
    pub fn take(&self) -> bool {
        self.0.read().is_ok()
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The interrupt enable register's offset.
const IER_OFFSET: u8 = 1;
/// The FIFO control register's offset (writes; reads are IIR).
const FCR_OFFSET: u8 = 2;
/// The line control register's offset.
const LCR_OFFSET: u8 = 3;
/// The line status register's offset.
const LSR_OFFSET: u8 = 5;
/// Line status reads after which a guest that never wrote IER counts as
/// one that polls for input.
pub const POLLING_GUEST_READS: u32 = 32;
/// IER: received data available interrupt.
const IER_RDA: u8 = 0x01;
/// IER: every interrupt source of a 16550A. The 8250 probe writes this
/// to see whether the register exists; so does its IRQ probe.
const IER_ALL: u8 = 0x0f;
/// FCR: FIFOs enabled.
const FCR_ENABLE_FIFO: u8 = 0x01;
/// LCR: divisor latch access.
const LCR_DLAB: u8 = 0x80;

/// Tells the input side when the guest has emptied the receive FIFO, or
/// has become ready for input.
#[derive(Debug)]
pub struct FifoEvents {
    pub(super) buffer_ready: EventFd,
}

impl SerialEvents for FifoEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        crate::metrics::UART.write_count.inc();
    }
    fn tx_lost_byte(&self) {
        crate::metrics::UART.missed_write_count.inc();
        crate::debug_ratelimited!("serial: output byte lost");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.buffer_ready.write(1) {
            crate::error_ratelimited!("serial: cannot signal empty FIFO: {e}");
        }
    }
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The UART as a port-I/O bus device.
pub struct SerialDevice {
    pub(super) serial: Serial<EventFdTrigger, FifoEvents, SerialOut>,
    /// Whether the guest has written IER: a driver that uses interrupts.
    ier_written: bool,
    /// Line status reads while IER was never written (a polling guest).
    lsr_polls: u32,
    /// Whether the last FCR write enabled the FIFOs (vm-superio ignores
    /// FCR, so the device keeps it for [`Self::accepts_input`]).
    pub(super) fifo_enabled: bool,
}

impl SerialDevice {
    /// Creates a UART that raises `interrupt` and writes output to `out`.
    /// Returns the device and the eventfd that fires when the receive FIFO
    /// becomes empty (for [`SerialInput`]).
    pub fn new(interrupt: EventFdTrigger, out: SerialOut) -> io::Result<(Self, EventFd)> {
        let buffer_ready = crate::eventfd()?;
        let events = FifoEvents {
            buffer_ready: buffer_ready.try_clone()?,
        };
        Ok((
            Self {
                serial: Serial::with_events(interrupt, events, out),
                ier_written: false,
                lsr_polls: 0,
                fifo_enabled: false,
            },
            buffer_ready,
        ))
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Whether the guest's driver is ready for input: the receive
    /// interrupt is enabled. Linux's 8250 driver enables it when the port
    /// is opened, and before that (while probing, and in its start-up
    /// sequence) it reads the receive register to clear the UART, which
    /// would throw away whatever a user typed ahead. So input waits on the
    /// host side until then. While the divisor latch is selected (DLAB)
    /// the register is the divisor, so input waits for that to end too.
    ///
    /// The probe also writes IER = 0x0f for a moment (to see that the
    /// register exists, and again in its IRQ probe) and then reads the
    /// receive register: that value alone does not open the gate. An
    /// opened Linux port has its FIFOs enabled (`set_termios` writes FCR)
    /// and may run with all four interrupts on, so it opens the gate once
    /// the FIFOs are on; before that, the port's own start-up enables
    /// IER = 0x05, which opens it too.
    ///
    /// A guest that never writes IER (firmware, a bare-metal program that
    /// polls) gets input once it has polled the line status
    /// [`POLLING_GUEST_READS`] times: Linux writes IER before it reads
    /// the line status at all, so this never opens the gate early for it.
    ///
    /// A restored UART carries the guest's IER and FIFO enable, so a
    /// restored guest whose port was open gets input at once.
    pub fn accepts_input(&mut self) -> bool {
        // Reading LCR and IER has no side effect on a 16550A.
        if self.divisor_latched() {
            return false;
        }
        let ier = self.serial.read(IER_OFFSET);
        if ier & IER_RDA != 0 {
            return ier & IER_ALL != IER_ALL || self.fifo_enabled;
        }
        !self.ier_written && self.lsr_polls >= POLLING_GUEST_READS
    }

    /// Whether LCR selects the divisor latch (DLAB): offsets 0 and 1 are
    /// then the divisor, not the data and interrupt enable registers.
    fn divisor_latched(&mut self) -> bool {
        self.serial.read(LCR_OFFSET) & LCR_DLAB != 0
    }

    /// Queues bytes for the guest to read; returns how many were taken.
    pub fn enqueue(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(vm_superio::serial::Error::FullFifo) => Ok(0),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
            if off == LSR_OFFSET && !self.ier_written && self.lsr_polls < POLLING_GUEST_READS {
                self.lsr_polls += 1;
                if self.lsr_polls == POLLING_GUEST_READS {
                    // A polling guest: wake the input side.
                    self.serial.events().in_buffer_empty();
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        // Only IER and FCR writes need LCR read (not every output byte).
        // With DLAB set, offset 1 is the divisor, and the probe's offset 2
        // writes under LCR 0xbf go to a 16650's EFR.
        match off {
            IER_OFFSET if !self.divisor_latched() => self.ier_written = true,
            FCR_OFFSET if !self.divisor_latched() => {
                self.fifo_enabled = v & FCR_ENABLE_FIFO != 0;
            }
            _ => {}
        }
        if let Err(e) = self.serial.write(off, v) {
            crate::debug_ratelimited!("serial: write failed: {e:?}");
        }
        // The guest may just have become ready for input: wake the input
        // side (it re-checks, and pauses again if not).
        if matches!(off, IER_OFFSET | FCR_OFFSET | LCR_OFFSET) && self.accepts_input() {
            self.serial.events().in_buffer_empty();
        }
    }
}

/// A host stream the UART can read from.
pub trait ReadableFd: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> ReadableFd for T {}

/// Event-loop subscriber feeding a host input stream into the UART.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: Option<Box<dyn ReadableFd>>,
    buffer_ready: EventFd,
    paused: bool,
}

impl SerialInput {
    /// Feeds `input` (if any) into `serial`; `buffer_ready` is the eventfd
    /// returned by [`SerialDevice::new`].
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        input: Option<Box<dyn ReadableFd>>,
        buffer_ready: EventFd,
    ) -> Self {
        Self {
            serial,
            input,
            buffer_ready,
            paused: false,
        }
    }

    fn input_fd(&self) -> Option<RawFd> {
        self.input.as_ref().map(|i| i.as_raw_fd())
    }

    fn stop_input(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.input_fd() {
            if !self.paused {
                let _ = ops.remove(Events::empty_raw(fd));
            }
        }
        self.input = None;
    }

    /// Moves what the host has typed into the FIFO, as much as fits.
    fn pump(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = if serial.accepts_input() {
            serial.fifo_capacity()
        } else {
            0
        };
        let Some(fd) = self.input_fd() else { return };
        if room == 0 {
            // Stop polling until the guest drains the FIFO or enables its
            // receive interrupt.
            if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                crate::warn_ratelimited!("serial: cannot pause input: {e}");
            }
            log::debug!("serial: FIFO full or guest not reading, input paused");
            self.paused = true;
            return;
        }
        let mut buf = [0u8; 64];
        let len = room.min(buf.len());
        let input = self.input.as_mut().expect("input checked above");
        match input.read(&mut buf[..len]) {
            Ok(0) => {
                log::debug!("serial: input reached end of file");
                drop(serial);
                self.stop_input(ops);
            }
            Ok(n) => {
                if let Err(e) = serial.enqueue(&buf[..n]) {
                    crate::error_ratelimited!("serial: cannot queue input: {e}");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                crate::warn_ratelimited!("serial: input error, detaching input: {e}");
                drop(serial);
                self.stop_input(ops);
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.buffer_ready, EventSet::IN)) {
            crate::error_ratelimited!("serial: cannot watch FIFO events: {e}");
        }
        if let Some(fd) = self.input_fd() {
            // Regular files and /dev/null cannot be polled; such an input
            // is simply not connected.
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::info!("serial: input cannot be polled ({e}); guest gets no input");
                self.input = None;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.buffer_ready.as_raw_fd() {
            let _ = self.buffer_ready.read();
            log::debug!("serial: FIFO drained (paused: {})", self.paused);
            if self.paused {
                self.paused = false;
                if let Some(fd) = self.input_fd() {
                    if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                        crate::warn_ratelimited!("serial: cannot resume input: {e}");
                        self.input = None;
                    }
                }
            }
            return;
        }
        if Some(events.fd()) == self.input_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.pump(ops);
            } else if events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::ERROR)
            {
                self.stop_input(ops);
            }
        }
    }
}

#[cfg(test)]
mod tests;
