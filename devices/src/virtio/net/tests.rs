//! virtio-net tests: a driver stand-in builds chains in real guest memory
//! (mock split queues) and a scripted backend plays the host side.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::test_utils::{activate_on_rings, RecordingInterrupt, Rings};
use crate::virtio::{ActivateError, InterruptKind};
use virtio_queue::QueueT;

const MEM_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 16;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x3000;
const BUFS: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const MAC: MacAddr = [0x02, 0xca, 0x75, 0, 0, 7];

mod event_loop;

/// What the scripted backend saw and will do.
#[derive(Default)]
struct Script {
    incoming: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    recv_error: Option<i32>,
    send_error: Option<i32>,
    full: bool,
    offloads: Vec<u64>,
}

struct MockBackend {
    script: Arc<Mutex<Script>>,
    fd: EventFd,
    offloads: u64,
}

impl NetBackend for MockBackend {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn describe(&self) -> String {
        "mock".into()
    }
    fn offload_features(&self) -> u64 {
        self.offloads
    }
    fn set_offloads(&mut self, acked: u64) -> io::Result<()> {
        self.script.lock().unwrap().offloads.push(acked);
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut s = self.script.lock().unwrap();
        if let Some(e) = s.recv_error {
            return Err(io::Error::from_raw_os_error(e));
        }
        let Some(f) = s.incoming.pop_front() else {
            return Ok(None);
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<SendStatus> {
        let mut s = self.script.lock().unwrap();
        if let Some(e) = s.send_error {
            return Err(io::Error::from_raw_os_error(e));
        }
        if s.full {
            return Ok(SendStatus::Full);
        }
        s.sent.push(frame.to_vec());
        Ok(SendStatus::Sent)
    }
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A frame with a zero vnet header and `len` bytes of pattern after it.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    rx: Rings<'a>,
    tx: Rings<'a>,
    net: Net,
    irq: Arc<RecordingInterrupt>,
    script: Arc<Mutex<Script>>,
    next_rx: u16,
    next_tx: u16,
    next_buf: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, acked: u64) -> Self {
        Self::with_offloads(mem, acked, 0)
    }

    fn with_offloads(mem: &'a GuestMemoryMmap, acked: u64, offloads: u64) -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let backend = MockBackend {
            script: script.clone(),
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
            offloads,
        };
        let mut net = Net::new(Box::new(backend), MAC).unwrap();
        let rx = Rings::new(mem, RX_RING, QSIZE);
        let tx = Rings::new(mem, TX_RING, QSIZE);
        let irq = activate_on_rings(&mut net, mem, acked, &[&rx, &tx]);
        Self {
            mem,
            rx,
            tx,
            net,
            irq,
            script,
            next_rx: 0,
            next_tx: 0,
            next_buf: BUFS,
        }
    }

    /// Guest memory for a buffer of `len` bytes.
    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += (len + 63) & !63;
        a
    }

    /// Stores a chain of (addr, len, flags) in `rings` from descriptor
    /// `*next`, linked in order, and makes it available.
    fn chain(rings: &Rings, next: &mut u16, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if *next + n > QSIZE {
            *next = 0;
        }
        let head = *next;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            if i + 1 < descs.len() {
                rings.store(idx, addr, len, flags | N, idx + 1);
            } else {
                rings.store(idx, addr, len, flags, 0);
            }
        }
        *next += n;
        rings.push_avail(head);
        head
    }

    /// Posts a receive buffer of `len` bytes; returns its address.
    fn post_rx(&mut self, len: u32) -> u64 {
        let a = self.alloc(u64::from(len));
        Self::chain(&self.rx, &mut self.next_rx, &[(a, len, W)]);
        a
    }

    /// Puts `bytes` in guest memory split in pieces of at most `piece`
    /// bytes and queues them as one transmit chain.
    fn send(&mut self, bytes: &[u8], piece: usize) -> u16 {
        let mut descs = Vec::new();
        for p in bytes.chunks(piece) {
            let a = self.alloc(p.len() as u64);
            self.mem.write_slice(p, GuestAddress(a)).unwrap();
            descs.push((a, p.len() as u32, 0));
        }
        Self::chain(&self.tx, &mut self.next_tx, &descs)
    }

    fn incoming(&self, f: Vec<u8>) {
        self.script.lock().unwrap().incoming.push_back(f);
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.script.lock().unwrap().sent)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn config(net: &Net) -> [u8; 8] {
    let mut c = [0u8; 8];
    net.read_config(0, &mut c);
    c
}

#[test]
fn features_and_config_space() {
    let mem = guest_memory();
    let d = Driver::with_offloads(&mem, 0, bit(VIRTIO_NET_F_CSUM));
    let f = d.net.avail_features();
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    assert_eq!(f & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(config(&d.net), [2, 0xca, 0x75, 0, 0, 7, 1, 0]);
    // Reads past the end are zero; writes are ignored.
    let mut b = [0xffu8; 4];
    d.net.read_config(6, &mut b);
    assert_eq!(b, [1, 0, 0, 0]);
    let mut net = d.net;
    net.write_config(0, &[9; 6]);
    assert_eq!(config(&net)[..6], MAC);
    assert_eq!(net.device_type(), device_type::NET);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

#[test]
fn offloads_follow_negotiation_and_reset() {
    let mem = guest_memory();
    let all = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    let mut d = Driver::with_offloads(&mem, all, all);
    assert!(d.net.reset());
    let got = d.script.lock().unwrap().offloads.clone();
    assert_eq!(got, vec![bit(VIRTIO_F_VERSION_1) | all, 0]);
}

#[test]
fn transmit_sends_whole_frames_from_split_chains() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, 0);
    let f1 = frame(1500, 1);
    let f2 = frame(60, 2);
    d.send(&f1, 700);
    d.send(&f2, 12);
    d.net.process_tx();
    assert_eq!(d.sent(), vec![f1, f2]);
    assert_eq!(d.tx.used_idx(), 2);
    assert_eq!(d.tx.used_elem(0).1, 0);
    assert_eq!(d.irq.take(), vec![InterruptKind::Queue(TX_QUEUE as u16)]);
}

#[test]
fn hostile_transmit_chains_are_returned_unsent() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, 0);
    // Shorter than the vnet header.
    d.send(&[0u8; 8], 8);
    // A header but no Ethernet header.
    d.send(&frame(10, 0), 64);
    // Oversized: more than the largest TSO frame.
    d.send(&vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 1], 40_000);
    // A device-writable descriptor in a transmit chain.
    let a = d.alloc(100);
    Driver::chain(&d.tx, &mut d.next_tx, &[(a, 50, 0), (a + 50, 50, W)]);
    // A buffer outside guest memory, and one that wraps around.
    Driver::chain(&d.tx, &mut d.next_tx, &[(MEM_SIZE - 20, 100, 0)]);
    Driver::chain(&d.tx, &mut d.next_tx, &[(u64::MAX - 10, 100, 0)]);
    // A descriptor loop and a `next` outside the table.
    d.next_tx = 0;
    d.tx.store(12, a, 40, N, 12);
    d.tx.push_avail(12);
    d.tx.store(13, a, 40, N, 999);
    d.tx.push_avail(13);
    // A bogus head index.
    d.tx.push_avail(4000);
    // Finally a good frame: the queue still works.
    d.next_tx = 14;
    let good = frame(100, 5);
    d.send(&good, 200);
    d.net.process_tx();
    assert_eq!(d.sent(), vec![good]);
    // Every chain but the bogus head came back.
    assert_eq!(d.tx.used_idx(), 9);
    for i in 0..9 {
        assert_eq!(d.tx.used_elem(i).1, 0);
    }
}

#[test]
fn receive_merges_buffers_and_sets_num_buffers() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    let bufs: Vec<u64> = (0..4).map(|_| d.post_rx(1536)).collect();
    let f = frame(3100, 3);
    d.incoming(f.clone());
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 3);
    let lens: Vec<u32> = (0..3).map(|i| d.rx.used_elem(i).1).collect();
    assert_eq!(lens, vec![1536, 1536, (f.len() - 2 * 1536) as u32]);
    let mut got = d.read(bufs[0], 1536);
    got.extend(d.read(bufs[1], 1536));
    got.extend(d.read(bufs[2], f.len() - 3072));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(d.irq.take(), vec![InterruptKind::Queue(RX_QUEUE as u16)]);
}

#[test]
fn receive_keeps_frames_until_the_guest_has_buffers() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    let f1 = frame(4000, 1);
    let f2 = frame(100, 2);
    d.incoming(f1.clone());
    d.incoming(f2.clone());
    // No buffers at all.
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 0);
    // Not enough for the first frame: nothing is used, nothing dropped.
    let b1 = d.post_rx(2048);
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 0);
    assert_eq!(d.net.wanted_backend_events(), EventSet::empty());
    // Enough now (the guest kicks the receive queue).
    let b2 = d.post_rx(2048);
    let b3 = d.post_rx(2048);
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 3);
    let mut got = d.read(b1, 2048);
    got.extend(d.read(b2, f1.len() - 2048));
    assert_eq!(&got[VNET_HDR_LEN..], &f1[VNET_HDR_LEN..]);
    assert_eq!(d.read(b3 + VNET_HDR_LEN as u64, 100), &f2[VNET_HDR_LEN..]);
    assert_eq!(d.net.wanted_backend_events(), EventSet::IN);
}

#[test]
fn receive_without_mrg_needs_one_big_enough_chain() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, 0);
    // A 1526-byte chain in two descriptors, then a bigger one.
    let a = d.alloc(1526);
    Driver::chain(&d.rx, &mut d.next_rx, &[(a, 12, W), (a + 12, 1514, W)]);
    d.incoming(frame(1514, 1));
    d.incoming(frame(3000, 2));
    d.incoming(frame(60, 3));
    d.net.process_rx();
    // The first frame fits; the second can never fit a 1526-byte chain
    // once posted, but with no chain at all it waits.
    assert_eq!(d.rx.used_idx(), 1);
    assert_eq!(d.rx.used_elem(0).1, 1526);
    assert_eq!(d.read(a + 10, 2), vec![1, 0]); // num_buffers = 1
    let small = d.post_rx(1526);
    d.net.process_rx();
    // The 3000-byte frame was dropped, the chain reused for the next one.
    assert_eq!(d.rx.used_idx(), 2);
    assert_eq!(d.rx.used_elem(1).1, (VNET_HDR_LEN + 60) as u32);
    assert_eq!(d.read(small + VNET_HDR_LEN as u64, 60), &frame(60, 3)[12..]);
}

#[test]
fn hostile_receive_chains_are_skipped() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    let a = d.alloc(2048);
    // Device-readable, outside guest memory, a loop.
    Driver::chain(&d.rx, &mut d.next_rx, &[(a, 2048, 0)]);
    Driver::chain(&d.rx, &mut d.next_rx, &[(MEM_SIZE - 100, 2048, W)]);
    d.rx.store(5, a, 100, W | N, 5);
    d.rx.push_avail(5);
    d.next_rx = 6;
    let good = d.post_rx(2048);
    let f = frame(500, 9);
    d.incoming(f.clone());
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 4);
    let lens: Vec<u32> = (0..4).map(|i| d.rx.used_elem(i).1).collect();
    assert_eq!(lens, vec![0, 0, 0, f.len() as u32]);
    // The last chain posted is the good one.
    assert_eq!(d.rx.used_elem(3).0, u32::from(d.next_rx - 1));
    let got = d.read(good, f.len());
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
}

#[test]
fn short_frames_from_the_backend_are_dropped() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    d.post_rx(2048);
    d.incoming(vec![0; 5]);
    d.incoming(frame(3, 0));
    d.incoming(frame(64, 4));
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 1);
    assert_eq!(d.rx.used_elem(0).1, (VNET_HDR_LEN + 64) as u32);
}

#[test]
fn a_failing_backend_takes_the_link_down_not_the_vmm() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_NET_F_STATUS));
    d.post_rx(2048);
    d.script.lock().unwrap().recv_error = Some(libc::EBADFD);
    d.net.process_rx();
    assert!(!d.net.link_up());
    assert_eq!(config(&d.net)[6..], [0, 0]);
    assert_eq!(d.irq.take(), vec![InterruptKind::Config]);
    assert_eq!(d.net.wanted_backend_events(), EventSet::empty());
    // Transmit chains still come back (dropped), so the guest never stalls.
    d.send(&frame(100, 1), 200);
    d.net.process_tx();
    assert!(d.sent().is_empty());
    assert_eq!(d.tx.used_idx(), 1);
}

#[test]
fn transient_send_errors_drop_one_frame() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, 0);
    d.script.lock().unwrap().send_error = Some(libc::EIO);
    d.send(&frame(100, 1), 200);
    d.net.process_tx();
    assert!(d.net.link_up());
    assert_eq!(d.tx.used_idx(), 1);
    d.script.lock().unwrap().send_error = Some(libc::EBADFD);
    d.send(&frame(100, 1), 200);
    d.send(&frame(100, 2), 200);
    d.net.process_tx();
    assert!(!d.net.link_up());
    // The second chain is drained on the re-kick.
    d.net.process_tx();
    assert_eq!(d.tx.used_idx(), 3);
}

#[test]
fn a_full_backend_leaves_chains_in_the_ring() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, 0);
    d.script.lock().unwrap().full = true;
    let f = frame(100, 1);
    d.send(&f, 200);
    d.net.process_tx();
    assert_eq!(d.tx.used_idx(), 0);
    assert!(d.sent().is_empty());
    d.script.lock().unwrap().full = false;
    d.net.process_tx();
    assert_eq!(d.tx.used_idx(), 1);
    assert_eq!(d.sent(), vec![f]);
}

#[test]
fn a_full_backend_is_polled_for_writability_until_it_takes_the_frame() {
    // A backend with no output queue of its own (a TAP) that refuses a
    // frame: the device must wait for the fd to become writable, or the
    // chain would sit in the ring with notifications off and nothing to
    // wake the device (the guest does not kick again under EVENT_IDX).
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_RING_F_EVENT_IDX));
    assert!(!d.net.wanted_backend_events().contains(EventSet::OUT));
    d.script.lock().unwrap().full = true;
    let f = frame(100, 1);
    d.send(&f, 200);
    d.net.process_tx();
    assert_eq!(d.tx.used_idx(), 0);
    assert!(d.net.wanted_backend_events().contains(EventSet::OUT));
    assert_eq!(d.net.stats().tx_full, 1);
    // Writable again: the pending chain goes out without a guest kick.
    d.script.lock().unwrap().full = false;
    d.net.process_backend(EventSet::OUT);
    assert_eq!(d.tx.used_idx(), 1);
    assert_eq!(d.sent(), vec![f]);
    assert!(!d.net.wanted_backend_events().contains(EventSet::OUT));
    assert_eq!(d.net.stats().tx_frames, 1);
}

#[test]
fn reset_stops_all_guest_memory_access() {
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    d.post_rx(2048);
    d.send(&frame(100, 1), 200);
    assert!(d.net.reset());
    d.incoming(frame(100, 2));
    d.net.process_rx();
    d.net.process_tx();
    assert_eq!(d.rx.used_idx(), 0);
    assert_eq!(d.tx.used_idx(), 0);
    assert!(d.sent().is_empty());
    assert!(!d.net.is_activated());
}

#[test]
fn activation_checks_queues() {
    let mem = guest_memory();
    let backend = MockBackend {
        script: Arc::default(),
        fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        offloads: 0,
    };
    let mut net = Net::new(Box::new(backend), MAC).unwrap();
    let rx = Rings::new(&mem, RX_RING, QSIZE);
    let irq = Arc::new(RecordingInterrupt::default());
    let one = net.activate(
        mem.clone(),
        irq.clone(),
        vec![rx.queue()],
        vec![EventFd::new(EFD_NONBLOCK).unwrap()],
    );
    assert!(matches!(one, Err(ActivateError::QueueCount { .. })));
    let mut unready = rx.queue();
    unready.set_ready(false);
    let r = net.activate(
        mem.clone(),
        irq,
        vec![rx.queue(), unready],
        vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ],
    );
    assert!(matches!(r, Err(ActivateError::QueueNotReady(1))));
}
