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
/// The line control register's offset.
const LCR_OFFSET: u8 = 3;
/// The line status register's offset.
const LSR_OFFSET: u8 = 5;
/// Line status reads after which a guest that never wrote IER counts as
/// one that polls for input.
pub const POLLING_GUEST_READS: u32 = 32;
/// IER: received data available interrupt.
const IER_RDA: u8 = 0x01;
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
    /// A guest that never writes IER (firmware, a bare-metal program that
    /// polls) gets input once it has polled the line status
    /// [`POLLING_GUEST_READS`] times: Linux writes IER before it reads
    /// the line status at all, so this never opens the gate early for it.
    ///
    /// A restored UART carries the guest's IER, so a restored guest whose
    /// port was open gets input at once.
    pub fn accepts_input(&mut self) -> bool {
        // Reading LCR and IER has no side effect on a 16550A.
        if self.serial.read(LCR_OFFSET) & LCR_DLAB != 0 {
            return false;
        }
        if self.serial.read(IER_OFFSET) & IER_RDA != 0 {
            return true;
        }
        !self.ier_written && self.lsr_polls >= POLLING_GUEST_READS
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
        if off == IER_OFFSET && self.serial.read(LCR_OFFSET) & LCR_DLAB == 0 {
            self.ier_written = true;
        }
        if let Err(e) = self.serial.write(off, v) {
            crate::debug_ratelimited!("serial: write failed: {e:?}");
        }
        // The guest may just have become ready for input: wake the input
        // side (it re-checks, and pauses again if not).
        if (off == IER_OFFSET || off == LCR_OFFSET) && self.accepts_input() {
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
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::os::unix::net::UnixStream;

    /// A writer whose contents the test can read back.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    fn read_reg(dev: &Arc<Mutex<SerialDevice>>, off: u64) -> u8 {
        let mut b = [0u8];
        dev.lock().unwrap().read(off, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_writer_and_raises_thre_interrupt() {
        let irq = EventFdTrigger::new().unwrap();
        let out = SharedBuf::default();
        let (mut dev, _) =
            SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
        dev.write(IER, &[0x2]); // THR empty interrupt on
        let mut iir = [0u8];
        dev.read(IIR, &mut iir); // acknowledge the interrupt raised by enabling
        let _ = irq.take();
        for b in b"hi\n" {
            dev.write(DATA, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert!(irq.take(), "THR-empty interrupt must fire");
    }

    /// Pipes more input than the FIFO holds through the event loop and
    /// checks the guest side reads every byte, in order.
    #[test]
    fn input_is_flow_controlled_without_loss() {
        let irq = EventFdTrigger::new().unwrap();
        let (dev, ready) =
            SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        dev.lock().unwrap().write(IER, &[0x1]); // receive interrupt on
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let input = SerialInput::new(dev.clone(), Some(Box::new(guest_side)), ready);
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(input)));

        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        host.write_all(&sent).unwrap();
        drop(host);

        let mut got = Vec::new();
        for _ in 0..10_000 {
            em.run_with_timeout(10).unwrap();
            while read_reg(&dev, LSR) & 1 != 0 {
                got.push(read_reg(&dev, DATA));
            }
            if got.len() == sent.len() {
                break;
            }
        }
        assert_eq!(got, sent);
        assert!(irq.take(), "receive interrupt must fire");
    }

    /// An input the event loop cannot poll (a regular file) is detached
    /// at registration: the guest gets no input from it, and the loop
    /// runs on. A pollable one (a socket) stays attached.
    #[test]
    fn unpollable_input_is_detached() {
        let attach = |input: Box<dyn ReadableFd>| {
            let irq = EventFdTrigger::new().unwrap();
            let (dev, ready) = SerialDevice::new(irq, Box::new(io::sink())).unwrap();
            let dev = Arc::new(Mutex::new(dev));
            dev.lock().unwrap().write(IER, &[0x1]); // receive interrupt on
            let input = Arc::new(Mutex::new(SerialInput::new(
                dev.clone(),
                Some(input),
                ready,
            )));
            let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
            em.add_subscriber(input.clone());
            em.run_with_timeout(10).unwrap();
            let attached = input.lock().unwrap().input.is_some();
            (attached, read_reg(&dev, LSR) & 1 != 0)
        };

        let file = std::fs::File::open("/proc/self/status").unwrap();
        let (attached, data_ready) = attach(Box::new(file));
        assert!(!attached, "a regular file cannot be polled: detached");
        assert!(!data_ready, "nothing from the file reaches the guest");

        let (mut host, guest_side) = UnixStream::pair().unwrap();
        host.write_all(b"x").unwrap();
        let (attached, data_ready) = attach(Box::new(guest_side));
        assert!(attached, "a socket can be polled: attached");
        assert!(data_ready, "its input reaches the guest");
    }

    type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// A UART whose input is the returned socket's peer, served by the
    /// returned event loop; the guest has touched no register yet.
    fn attached_uart() -> (Arc<Mutex<SerialDevice>>, UnixStream, Loop) {
        let irq = EventFdTrigger::new().unwrap();
        let (dev, ready) = SerialDevice::new(irq, Box::new(io::sink())).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let (host, guest_side) = UnixStream::pair().unwrap();
        let input = SerialInput::new(dev.clone(), Some(Box::new(guest_side)), ready);
        let mut em = Loop::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(input)));
        (dev, host, em)
    }

    /// Input typed before the guest's driver opens the port waits on the
    /// host side: the probe's and start-up's reads of the receive register
    /// find nothing to throw away, and every byte arrives once the receive
    /// interrupt is on.
    #[test]
    fn typed_ahead_input_waits_for_the_driver() {
        let (dev, mut host, mut em) = attached_uart();
        host.write_all(b"echo typed-ahead\n").unwrap();
        for _ in 0..5 {
            em.run_with_timeout(10).unwrap();
            // What 8250's start-up does before it enables interrupts.
            assert_eq!(read_reg(&dev, LSR) & 1, 0, "no byte reaches a closed port");
            read_reg(&dev, DATA);
        }
        // The divisor latch selected: IER's offset is the divisor.
        dev.lock().unwrap().write(3, &[0x80]);
        dev.lock().unwrap().write(IER, &[0x1]);
        em.run_with_timeout(10).unwrap();
        assert_eq!(
            read_reg(&dev, LSR) & 1,
            0,
            "a divisor write enables nothing"
        );
        dev.lock().unwrap().write(3, &[0x03]); // 8N1, DLAB off
        em.run_with_timeout(10).unwrap();
        assert_eq!(read_reg(&dev, LSR) & 1, 0, "IER is still off");
        dev.lock().unwrap().write(IER, &[0x1]); // the driver opens the port
        let mut got = Vec::new();
        for _ in 0..100 {
            em.run_with_timeout(10).unwrap();
            while read_reg(&dev, LSR) & 1 != 0 {
                got.push(read_reg(&dev, DATA));
            }
            if got.len() == 17 {
                break;
            }
        }
        assert_eq!(got, b"echo typed-ahead\n");
    }

    /// A guest that never enables interrupts and polls the line status
    /// (firmware, a bare program) still gets its input.
    #[test]
    fn polling_guest_gets_input() {
        let (dev, mut host, mut em) = attached_uart();
        host.write_all(b"q").unwrap();
        let mut got = None;
        for _ in 0..1000 {
            em.run_with_timeout(1).unwrap();
            if read_reg(&dev, LSR) & 1 != 0 {
                got = Some(read_reg(&dev, DATA));
                break;
            }
        }
        assert_eq!(got, Some(b'q'));
    }
}
