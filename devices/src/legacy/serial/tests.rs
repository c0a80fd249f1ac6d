//! Tests of the UART device and its input pump.

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
    let (mut dev, _) = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
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
    let (dev, ready) = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
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

/// What the guest reads, as a driver would on each interrupt, until
/// `n` bytes have come (or 100 turns of the event loop have passed).
fn drain(dev: &Arc<Mutex<SerialDevice>>, em: &mut Loop, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    for _ in 0..100 {
        em.run_with_timeout(10).unwrap();
        while read_reg(dev, LSR) & 1 != 0 {
            got.push(read_reg(dev, DATA));
        }
        if got.len() >= n {
            break;
        }
    }
    got
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
    assert_eq!(drain(&dev, &mut em, 17), b"echo typed-ahead\n");
}

/// Linux's 8250 probe (`autoconfig`, as traced from a guest that lost
/// the first three typed-ahead bytes) turns every interrupt on for a
/// moment and reads the receive register afterwards: input typed
/// ahead must not be queued then, and must all arrive once the port
/// is opened and its FIFOs enabled.
#[test]
fn the_8250_probe_does_not_open_the_gate() {
    let (dev, mut host, mut em) = attached_uart();
    host.write_all(b"echo typed-$((6*7))-ahead\n").unwrap();
    let w = |off: u64, v: u8| dev.lock().unwrap().write(off, &[v]);
    // autoconfig: the IER existence test.
    read_reg(&dev, IER);
    w(IER, 0x00);
    read_reg(&dev, IER);
    w(IER, 0x0f);
    em.run_with_timeout(10).unwrap();
    read_reg(&dev, IER);
    w(IER, 0x00);
    // The 16550A test and the FIFO clearing, then the receive register
    // read that threw bytes away.
    w(3, 0xbf);
    w(2, 0x00); // EFR, with the config-mode LCR
    w(3, 0x00);
    w(2, 0x01);
    read_reg(&dev, 2);
    w(2, 0x07);
    w(2, 0x00);
    em.run_with_timeout(10).unwrap();
    assert_eq!(read_reg(&dev, LSR) & 1, 0, "nothing queued while probing");
    read_reg(&dev, DATA);
    // The IRQ probe: all interrupts on, FIFOs off, then cleared.
    w(IER, 0x0f);
    em.run_with_timeout(10).unwrap();
    assert_eq!(
        read_reg(&dev, LSR) & 1,
        0,
        "nothing queued by the IRQ probe"
    );
    read_reg(&dev, DATA);
    w(IER, 0x00);
    // The port opened (8250 start-up), then set_termios: the FIFOs on,
    // and modem status interrupts with the transmit one (0x0f).
    w(3, 0x03);
    w(IER, 0x05);
    w(2, 0x81);
    w(IER, 0x0f);
    assert_eq!(drain(&dev, &mut em, 26), b"echo typed-$((6*7))-ahead\n");
}

/// A port that runs with every interrupt on and its FIFOs enabled (an
/// opened Linux port sending, with modem status interrupts) accepts
/// input; one with the FIFOs off and IER 0x0f does not yet.
#[test]
fn all_interrupts_on_accepts_input_once_the_fifos_are() {
    let irq = EventFdTrigger::new().unwrap();
    let (mut dev, _ready) = SerialDevice::new(irq, Box::new(io::sink())).unwrap();
    dev.write(3, &[0x03]);
    dev.write(IER, &[0x0f]);
    assert!(!dev.accepts_input(), "the probe's IER, FIFOs off");
    dev.write(2, &[0x81]);
    assert!(dev.accepts_input(), "FIFOs on");
    dev.write(2, &[0x06]); // cleared and off again
    assert!(!dev.accepts_input());
    dev.write(IER, &[0x05]);
    assert!(
        dev.accepts_input(),
        "receive interrupts without the probe's mask"
    );
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
