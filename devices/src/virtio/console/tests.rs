//! virtio-console tests: a driver stand-in posts buffers on mock split
//! queues in real guest memory, including hostile ones.

use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::virtio::test_utils::{activate_on_rings, RecordingInterrupt, Rings};
use crate::virtio::{ActivateError, InterruptKind, Queue};

const MEM_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 16;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x2000;
const DATA: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

/// Output that tests can inspect.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

struct Setup<'a> {
    rx: Rings<'a>,
    tx: Rings<'a>,
    console: Console,
    sink: Sink,
    irq: Arc<RecordingInterrupt>,
}

fn setup(mem: &GuestMemoryMmap) -> Setup<'_> {
    let sink = Sink::default();
    let mut console = Console::new(Box::new(sink.clone())).unwrap();
    let rx = Rings::new(mem, RX_RING, QSIZE);
    let tx = Rings::new(mem, TX_RING, QSIZE);
    let irq = activate_on_rings(&mut console, mem, 0, &[&rx, &tx]);
    Setup {
        rx,
        tx,
        console,
        sink,
        irq,
    }
}

impl Setup<'_> {
    fn output(&self) -> Vec<u8> {
        std::mem::take(&mut *self.sink.0.lock().unwrap())
    }
}

#[test]
fn transmits_chains_in_order() {
    let mem = guest_memory();
    let mut s = setup(&mem);
    mem.write_slice(b"hello ", GuestAddress(DATA)).unwrap();
    mem.write_slice(b"wor", GuestAddress(DATA + 0x100)).unwrap();
    mem.write_slice(b"ld\0\xff", GuestAddress(DATA + 0x200))
        .unwrap();
    s.tx.store(0, DATA, 6, 0, 0);
    s.tx.store(1, DATA + 0x100, 3, N, 2);
    s.tx.store(2, DATA + 0x200, 4, 0, 0);
    s.tx.push_avail(0);
    s.tx.push_avail(1);
    s.console.process_tx();
    assert_eq!(s.output(), b"hello world\0\xff");
    assert_eq!(s.tx.used_idx(), 2);
    assert_eq!(s.tx.used_elem(0), (0, 0));
    assert_eq!(s.tx.used_elem(1), (1, 0));
    assert_eq!(s.irq.take(), vec![InterruptKind::Queue(TX_QUEUE as u16)]);
}

#[test]
fn transmit_rejects_writable_and_out_of_memory_descriptors() {
    let mem = guest_memory();
    let mut s = setup(&mem);
    mem.write_slice(b"ok", GuestAddress(DATA)).unwrap();
    // A device-writable descriptor: the chain is dropped from there.
    s.tx.store(0, DATA, 2, N, 1);
    s.tx.store(1, DATA, 2, W, 0);
    // Outside guest memory, and straddling its end.
    s.tx.store(2, MEM_SIZE + 0x1000, 16, 0, 0);
    s.tx.store(3, MEM_SIZE - 2, 16, 0, 0);
    // Address overflow.
    s.tx.store(4, u64::MAX - 1, 16, 0, 0);
    for head in 0..5 {
        s.tx.push_avail(head);
    }
    s.console.process_tx();
    assert_eq!(s.output(), b"ok");
    assert_eq!(s.tx.used_idx(), 5);
}

#[test]
fn transmit_caps_huge_chains() {
    let mem = guest_memory();
    let mut s = setup(&mem);
    // Four descriptors of 4 GiB - 1 each, over all of guest memory: reads
    // stop at the end of memory; the chain is capped at MAX_TX_CHAIN.
    for i in 0..4u16 {
        let (flags, next) = if i < 3 { (N, i + 1) } else { (0, 0) };
        s.tx.store(i, 0, u32::MAX, flags, next);
    }
    s.tx.push_avail(0);
    s.console.process_tx();
    let out = s.output();
    assert!(out.len() <= MAX_TX_CHAIN, "{} bytes", out.len());
    assert_eq!(s.tx.used_idx(), 1);
}

#[test]
fn descriptor_loops_do_not_hang() {
    let mem = guest_memory();
    let mut s = setup(&mem);
    s.tx.store(0, DATA, 8, N, 1);
    s.tx.store(1, DATA, 8, N, 0);
    s.tx.push_avail(0);
    s.tx.store(2, DATA, 8, N, 200); // next outside the table
    s.tx.push_avail(2);
    s.console.process_tx();
    assert!(s.output().len() <= 8 * usize::from(QSIZE) * 2);
    assert_eq!(s.tx.used_idx(), 2);
}

#[test]
fn receive_fills_buffers_as_they_come() {
    let mem = guest_memory();
    let mut s = setup(&mem);
    // No buffers yet: input waits.
    s.console.queue_input(b"0123456789");
    assert_eq!(s.console.pending_input(), 10);
    assert_eq!(s.rx.used_idx(), 0);
    // A chain of a readable (skipped) and two writable descriptors.
    s.rx.store(0, DATA, 4, N, 1);
    s.rx.store(1, DATA + 0x100, 4, W | N, 2);
    s.rx.store(2, DATA + 0x200, 2, W, 0);
    s.rx.push_avail(0);
    s.console.process_rx();
    assert_eq!(s.rx.used_elem(0), (0, 6));
    let mut got = [0u8; 6];
    mem.read_slice(&mut got[..4], GuestAddress(DATA + 0x100))
        .unwrap();
    mem.read_slice(&mut got[4..], GuestAddress(DATA + 0x200))
        .unwrap();
    assert_eq!(&got, b"012345");
    assert_eq!(s.console.pending_input(), 4);
    // A buffer outside guest memory takes nothing.
    s.rx.store(3, MEM_SIZE, 64, W, 0);
    s.rx.push_avail(3);
    // A big one takes the rest.
    s.rx.store(4, DATA + 0x300, 64, W, 0);
    s.rx.push_avail(4);
    s.console.process_rx();
    assert_eq!(s.rx.used_elem(1), (3, 0));
    assert_eq!(s.rx.used_elem(2), (4, 4));
    let mut rest = [0u8; 4];
    mem.read_slice(&mut rest, GuestAddress(DATA + 0x300))
        .unwrap();
    assert_eq!(&rest, b"6789");
    assert_eq!(s.console.pending_input(), 0);
    assert!(s
        .irq
        .take()
        .contains(&InterruptKind::Queue(RX_QUEUE as u16)));
}

#[test]
fn input_room_is_signalled_after_high_water() {
    let mem = guest_memory();
    let mut s = setup(&mem);
    s.console.queue_input(&vec![7u8; INPUT_HIGH_WATER]);
    assert!(s.console.input_ready_evt().read().is_err()); // not yet
                                                          // Drain it through big buffers (16 KiB each, all over DATA).
    let mut drained = 0;
    while s.console.pending_input() > 0 {
        for i in 0..QSIZE {
            s.rx.store(i, DATA, 16 << 10, W, 0);
            s.rx.push_avail(i);
        }
        s.console.process_rx();
        drained += 1;
        assert!(drained < 100);
    }
    assert_eq!(s.console.input_ready_evt().read().unwrap(), 1);
}

#[test]
fn activation_checks_and_reset() {
    let mem = guest_memory();
    let mut c = Console::new(Box::new(Sink::default())).unwrap();
    let rx = Rings::new(&mem, RX_RING, QSIZE);
    let irq = Arc::new(RecordingInterrupt::default());
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(matches!(
        c.activate(mem.clone(), irq.clone(), vec![rx.queue()], vec![evt()]),
        Err(ActivateError::QueueCount { .. })
    ));
    let unready = Queue::new(QSIZE).unwrap();
    assert!(matches!(
        c.activate(
            mem.clone(),
            irq.clone(),
            vec![rx.queue(), unready],
            vec![evt(), evt()]
        ),
        Err(ActivateError::QueueNotReady(1))
    ));
    let tx = Rings::new(&mem, TX_RING, QSIZE);
    c.activate(
        mem.clone(),
        irq.clone(),
        vec![rx.queue(), tx.queue()],
        vec![evt(), evt()],
    )
    .unwrap();
    assert!(c.is_activated());
    assert!(c.reset());
    assert!(!c.is_activated());
    // Inactive: input waits, nothing is touched.
    c.queue_input(b"x");
    c.process_tx();
    assert_eq!(c.pending_input(), 1);
    let mut cfg = [0xffu8; 12];
    c.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 12]);
    assert_eq!(c.device_type(), 3);
}
