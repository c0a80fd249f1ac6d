//! The driver stand-in: rings in guest memory, the device in a real
//! event loop, real Unix sockets on the host.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::super::conn::CONN_BUF_ALLOC;
pub(super) use super::super::packet::{op, Header, HDR_LEN, TYPE_STREAM};
use super::super::*;
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1};
use crate::virtio::test_utils::{RecordingInterrupt, Rings};

pub(super) const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
pub(super) const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub(super) const GUEST_CID: u64 = 3;
pub(super) const MEM_SIZE: u64 = 24 << 20;
pub(super) const TX_BUFS: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
/// Transmit packets that may wait in the ring before a kick.
pub(super) const TX_SLOTS: u16 = 16;
pub(super) const EV_BUF: u64 = 0x38_0000;
pub(super) const RX_BUFS: u64 = 0x40_0000;
/// Payload room of the stand-in's receive buffers unless a test picks
/// another.
pub(super) const RX_PAYLOAD: u32 = 4096;

type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// The driver stand-in and the host around one device.
pub(super) struct Harness<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub rx: Rings<'a>,
    pub tx: Rings<'a>,
    pub ev: Rings<'a>,
    pub dev: Arc<Mutex<Vsock>>,
    em: Loop,
    kicks: Vec<EventFd>,
    pub irq: Arc<RecordingInterrupt>,
    pub dir: TempDir,
    pub uds: PathBuf,
    pub tx_next: u16,
    /// Transmit packets in the ring not yet kicked.
    tx_unkicked: u16,
    pub rx_next: u16,
    rx_seen: u16,
    /// Payload room of each receive buffer.
    rx_payload: u32,
    /// Kicks the stand-in sent, per queue.
    pub kicks_sent: [u32; 3],
    /// EVENT_IDX was negotiated: [`Self::notify`] kicks only when the
    /// device's `avail_event` asks for it.
    event_idx: bool,
    /// Each queue's available index at its last notification.
    notified_at: [u16; 3],
}

pub(super) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A packet header from the guest's `src_port` to host port `dst_port`.
pub(super) fn g(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}

impl<'a> Harness<'a> {
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with(mem, RX_PAYLOAD, 0)
    }

    /// A harness whose receive buffers have `rx_payload` bytes of room
    /// after the header, acknowledging `features` besides VERSION_1.
    pub fn with(mem: &'a GuestMemoryMmap, rx_payload: u32, features: u64) -> Self {
        assert!(rx_payload as usize <= packet::MAX_PAYLOAD);
        let dir = TempDir::new_with_prefix("/tmp/capsule-vsock-test-").unwrap();
        let uds = dir.as_path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let dev = Arc::new(Mutex::new(
            Vsock::new(GUEST_CID, uds.clone(), listener).unwrap(),
        ));
        let mut em = Loop::new().unwrap();
        em.add_subscriber(dev.clone());
        let rx = Rings::new(mem, 0x1_0000, QUEUE_SIZE);
        let tx = Rings::new(mem, 0x2_0000, QUEUE_SIZE);
        let ev = Rings::new(mem, 0x3_0000, QUEUE_SIZE);
        let irq = Arc::new(RecordingInterrupt::default());
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        {
            let mut d = dev.lock().unwrap();
            assert_eq!(d.avail_features() & features, features, "offered");
            d.set_acked_features(bit(VIRTIO_F_VERSION_1) | features);
            d.activate(
                mem.clone(),
                irq.clone(),
                vec![rx.queue(), tx.queue(), ev.queue()],
                evts,
            )
            .unwrap();
        }
        let mut h = Self {
            mem,
            rx,
            tx,
            ev,
            dev,
            em,
            kicks,
            irq,
            dir,
            uds,
            tx_next: 0,
            tx_unkicked: 0,
            rx_next: 0,
            rx_seen: 0,
            rx_payload,
            kicks_sent: [0; 3],
            event_idx: features & bit(crate::virtio::features::VIRTIO_RING_F_EVENT_IDX) != 0,
            notified_at: [0; 3],
        };
        h.run();
        h
    }

    /// Runs the event loop until it has nothing more to do.
    pub fn run(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(20).unwrap() == 0 {
                return;
            }
        }
        panic!("the device never went idle");
    }

    /// Runs the event loop until nothing is ready at once (everything in
    /// these tests is synchronous: a socket write or a kick is ready for
    /// the loop when the call returns).
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the device never went idle");
    }

    pub fn kick(&mut self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
        self.kicks_sent[queue] += 1;
        self.run();
    }

    /// Tells the device of new chains in `queue` as a driver does: only
    /// if it asks to be told (no `VRING_USED_F_NO_NOTIFY`; with EVENT_IDX,
    /// only when the available index passed its `avail_event`). A device
    /// that forgets to ask then stalls, as it would with Linux.
    pub fn notify(&mut self, queue: usize) {
        let ring = [&self.rx, &self.tx, &self.ev][queue];
        let new = ring.avail_idx();
        let old = std::mem::replace(&mut self.notified_at[queue], new);
        let wanted = if self.event_idx {
            let event: u16 = self
                .mem
                .read_obj(GuestAddress(ring.used + 4 + 8 * u64::from(ring.size)))
                .unwrap();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(ring.used)).unwrap();
            flags & 1 == 0
        };
        if wanted {
            self.kicks[queue].write(1).unwrap();
            self.kicks_sent[queue] += 1;
        }
        self.settle();
    }

    /// Kicks without waiting for the loop.
    pub fn kick_now(&mut self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
        self.kicks_sent[queue] += 1;
        self.settle();
    }

    /// Puts a raw transmit chain (descriptors `(addr, len, flags)`, linked
    /// in order) in the ring and kicks.
    pub fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
        self.put_chain(descs);
        self.tx_unkicked = 0;
        self.kick(TX_QUEUE);
    }

    fn put_chain(&mut self, descs: &[(u64, u32, u16)]) {
        assert!(self.tx_unkicked < TX_SLOTS, "transmit slots in use");
        let base = (self.tx_next % TX_SLOTS) * 8;
        self.tx_next = self.tx_next.wrapping_add(1);
        self.tx_unkicked += 1;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let more = if (i as usize) + 1 < descs.len() {
                NEXT
            } else {
                0
            };
            self.tx
                .store(base + i, addr, len, flags | more, base + i + 1);
        }
        self.tx.push_avail(base);
    }

    /// Writes a packet (the header and the payload in two descriptors, as
    /// Linux does) into the next transmit slot and makes it available.
    pub fn queue_packet(&mut self, mut hdr: Header, payload: &[u8]) {
        if self.tx_unkicked == TX_SLOTS {
            self.flush_tx();
        }
        hdr.len = payload.len() as u32;
        let slot = TX_BUFS + u64::from(self.tx_next % TX_SLOTS) * TX_SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap();
        if payload.is_empty() {
            self.put_chain(&[(slot, HDR_LEN as u32, 0)]);
        } else {
            self.mem
                .write_slice(payload, GuestAddress(slot + 0x100))
                .unwrap();
            self.put_chain(&[
                (slot, HDR_LEN as u32, 0),
                (slot + 0x100, payload.len() as u32, 0),
            ]);
        }
    }

    /// Kicks the transmit queue for the packets queued since the last kick
    /// and lets the loop handle them.
    pub fn flush_tx(&mut self) {
        if self.tx_unkicked > 0 {
            self.tx_unkicked = 0;
            self.notify(TX_QUEUE);
            // The slots are reused: each chain must have been taken.
            assert_eq!(
                self.tx.used_idx(),
                self.tx_next,
                "the device left transmit chains in the ring"
            );
        }
    }

    /// Sends a packet and kicks.
    pub fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.queue_packet(hdr, payload);
        self.tx_unkicked = 0;
        self.kick(TX_QUEUE);
    }

    fn rx_slot(&self) -> u64 {
        (u64::from(self.rx_payload) + HDR_LEN as u64 + 0xff) & !0xff
    }

    /// Receive buffers posted and not yet seen used.
    pub fn rx_outstanding(&self) -> u16 {
        self.rx_next.wrapping_sub(self.rx_seen)
    }

    /// Makes up to `n` receive buffers (one descriptor of header and
    /// payload room each) available, as many as the ring has room for;
    /// returns how many.
    pub fn give_rx(&mut self, n: u16) -> u16 {
        let n = n.min(QUEUE_SIZE - self.rx_outstanding());
        for _ in 0..n {
            let i = self.rx_next % QUEUE_SIZE;
            self.rx_next = self.rx_next.wrapping_add(1);
            let addr = RX_BUFS + u64::from(i) * self.rx_slot();
            self.rx
                .store(i, addr, HDR_LEN as u32 + self.rx_payload, WRITE, 0);
            self.rx.push_avail(i);
        }
        n
    }

    /// Posts `n` receive buffers and kicks.
    pub fn post_rx(&mut self, n: u16) {
        self.give_rx(n);
        self.kick(RX_QUEUE);
    }

    /// The packets the device put in the receive ring since last time.
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (id, len) = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BUFS + u64::from(id) * self.rx_slot();
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            if (len as usize) < HDR_LEN {
                out.push((Header::default(), b));
                continue;
            }
            let hdr = Header::from_bytes(b[..HDR_LEN].try_into().unwrap());
            assert_eq!(
                hdr.len as usize,
                b.len() - HDR_LEN,
                "len matches the payload"
            );
            out.push((hdr, b[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Receives until a packet with `op` arrives (posting buffers as
    /// needed); returns everything received.
    pub fn recv_until(&mut self, op: u16) -> Vec<(Header, Vec<u8>)> {
        let mut all = Vec::new();
        for _ in 0..200 {
            self.post_rx(8);
            let got = self.recv();
            let done = got.iter().any(|(h, _)| h.op == op);
            all.extend(got);
            if done {
                return all;
            }
        }
        panic!("no packet with op {op}; got {:?}", ops(&all));
    }

    pub fn connections(&self) -> usize {
        self.dev.lock().unwrap().connections()
    }

    /// A host listener for guest connections to `port`.
    pub fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(host::forward_path(&self.uds, port)).unwrap()
    }

    /// A host client on the device's socket that has written `line` (a
    /// `CONNECT <port>\n` request, or anything a client may send).
    pub fn host_client(&self, line: &[u8]) -> UnixStream {
        let mut c = UnixStream::connect(&self.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(line).unwrap();
        c
    }

    /// Opens a guest connection from `src` to host port `dst` (whose
    /// listener is `l`); returns the host's end.
    pub fn guest_connect(&mut self, l: &UnixListener, src: u32, dst: u32) -> UnixStream {
        self.send(g(op::REQUEST, src, dst), &[]);
        let got = self.recv_until(op::RESPONSE);
        let (h, _) = got.iter().find(|(h, _)| h.op == op::RESPONSE).unwrap();
        assert_eq!((h.src_port, h.dst_port), (dst, src));
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

pub(super) fn ops(p: &[(Header, Vec<u8>)]) -> Vec<u16> {
    p.iter().map(|(h, _)| h.op).collect()
}

pub(super) fn payload_of(p: &[(Header, Vec<u8>)]) -> Vec<u8> {
    p.iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, d)| d.clone())
        .collect()
}
