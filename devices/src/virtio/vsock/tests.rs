//! virtio-vsock driven by a hostile driver stand-in: rings in guest
//! memory, the device in a real event loop, real Unix sockets on the host.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::conn::CONN_BUF_ALLOC;
use super::packet::{op, Header, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1};
use crate::virtio::test_utils::{RecordingInterrupt, Rings};
use crate::virtio::InterruptKind;

mod hostile;
mod resets;

const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 8 << 20;
const TX_BUFS: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u16 = 16;
const RX_BUFS: u64 = 0x30_0000;
const RX_SLOT: u64 = 0x1100;
const RX_PAYLOAD: u32 = 4096;
const EV_BUF: u64 = 0x70_0000;

type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// The driver stand-in and the host around one device.
struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    rx: Rings<'a>,
    tx: Rings<'a>,
    ev: Rings<'a>,
    dev: Arc<Mutex<Vsock>>,
    em: Loop,
    kicks: Vec<EventFd>,
    irq: Arc<RecordingInterrupt>,
    dir: TempDir,
    uds: PathBuf,
    tx_next: u16,
    rx_next: u16,
    rx_seen: u16,
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A packet header from the guest's `src_port` to host port `dst_port`.
fn g(op: u16, src_port: u32, dst_port: u32) -> Header {
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
    fn new(mem: &'a GuestMemoryMmap) -> Self {
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
            d.set_acked_features(bit(VIRTIO_F_VERSION_1));
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
            rx_next: 0,
            rx_seen: 0,
        };
        h.run();
        h
    }

    /// Runs the event loop until it has nothing more to do.
    fn run(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(20).unwrap() == 0 {
                return;
            }
        }
        panic!("the device never went idle");
    }

    fn kick(&mut self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
        self.run();
    }

    /// Puts a raw transmit chain (descriptors `(addr, len, flags)`, linked
    /// in order) in the ring and kicks.
    fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let base = (self.tx_next % TX_SLOTS) * 8;
        self.tx_next += 1;
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
        self.kick(TX_QUEUE);
    }

    /// Sends a packet: the header and the payload in two descriptors, as
    /// Linux does.
    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let slot = TX_BUFS + u64::from(self.tx_next % TX_SLOTS) * TX_SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap();
        if payload.is_empty() {
            self.send_chain(&[(slot, HDR_LEN as u32, 0)]);
        } else {
            self.mem
                .write_slice(payload, GuestAddress(slot + 0x100))
                .unwrap();
            self.send_chain(&[
                (slot, HDR_LEN as u32, 0),
                (slot + 0x100, payload.len() as u32, 0),
            ]);
        }
    }

    /// Posts `n` receive buffers (one descriptor of header + 4 KiB each)
    /// and kicks.
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.rx_next % QUEUE_SIZE;
            self.rx_next = self.rx_next.wrapping_add(1);
            let addr = RX_BUFS + u64::from(i) * RX_SLOT;
            self.rx
                .store(i, addr, HDR_LEN as u32 + RX_PAYLOAD, WRITE, 0);
            self.rx.push_avail(i);
        }
        self.kick(RX_QUEUE);
    }

    /// The packets the device put in the receive ring since last time.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (id, len) = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BUFS + u64::from(id) * RX_SLOT;
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
    fn recv_until(&mut self, op: u16) -> Vec<(Header, Vec<u8>)> {
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

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connections()
    }

    /// A host listener for guest connections to `port`.
    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(host::forward_path(&self.uds, port)).unwrap()
    }

    /// Opens a guest connection from `src` to host port `dst` (whose
    /// listener is `l`); returns the host's end.
    fn guest_connect(&mut self, l: &UnixListener, src: u32, dst: u32) -> UnixStream {
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

fn ops(p: &[(Header, Vec<u8>)]) -> Vec<u16> {
    p.iter().map(|(h, _)| h.op).collect()
}

fn payload_of(p: &[(Header, Vec<u8>)]) -> Vec<u8> {
    p.iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, d)| d.clone())
        .collect()
}

#[test]
fn config_space_is_the_cid_and_reserved_cids_are_refused() {
    let dir = TempDir::new_with_prefix("/tmp/capsule-vsock-test-").unwrap();
    let path = dir.as_path().join("s");
    let l = UnixListener::bind(&path).unwrap();
    let d = Vsock::new(0xfff0_0003, path.clone(), l.try_clone().unwrap()).unwrap();
    let mut b = [0u8; 8];
    d.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0xfff0_0003);
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes().len(), 3);
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let r = Vsock::new(bad, path.clone(), l.try_clone().unwrap());
        assert!(matches!(r, Err(VsockError::BadCid(c)) if c == bad));
    }
}

#[test]
fn guest_connections_reach_the_port_listener_and_carry_data_both_ways() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1000, 52);

    h.send(g(op::RW, 1000, 52), b"hello host");
    let mut b = [0u8; 10];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");

    host.write_all(b"hello guest").unwrap();
    let got = h.recv_until(op::RW);
    assert_eq!(payload_of(&got), b"hello guest");
    let (hdr, _) = &got[got.len() - 1];
    assert_eq!(hdr.fwd_cnt, 10, "the header carries what reached the host");
    assert!(h
        .irq
        .take()
        .contains(&InterruptKind::Queue(RX_QUEUE as u16)));
}

#[test]
fn a_port_without_listener_is_refused_with_a_reset() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    h.send(g(op::REQUEST, 1000, 77), &[]);
    let got = h.recv_until(op::RST);
    let (r, _) = &got[0];
    assert_eq!((r.op, r.src_port, r.dst_port), (op::RST, 77, 1000));
    assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_clients_connect_with_a_line_and_get_ok_and_a_stream() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    h.run();
    let got = h.recv_until(op::REQUEST);
    let (req, _) = got.iter().find(|(h, _)| h.op == op::REQUEST).unwrap();
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= host::FIRST_LOCAL_PORT);
    let local = req.src_port;
    // The guest accepts.
    h.send(g(op::RESPONSE, 1234, local), &[]);
    let mut line = [0u8; 64];
    let n = client.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {local}\n")
    );
    client.write_all(b"ping").unwrap();
    h.run();
    let got = h.recv_until(op::RW);
    assert_eq!(payload_of(&got), b"ping");
    h.send(g(op::RW, 1234, local), b"pong");
    let mut b = [0u8; 4];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
}

#[test]
fn a_refusing_guest_closes_the_host_client_without_ok() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    h.run();
    let got = h.recv_until(op::REQUEST);
    let local = got[0].0.src_port;
    h.send(g(op::RST, 9, local), &[]);
    let mut b = Vec::new();
    client.read_to_end(&mut b).unwrap();
    assert!(b.is_empty(), "no OK line for a refused connection");
    assert_eq!(h.connections(), 0);
}

#[test]
fn bad_connect_lines_are_dropped_and_the_listener_keeps_serving() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    for bad in [&b"HELLO 5\n"[..], b"CONNECT x\n", &[b'9'; 100]] {
        let mut c = UnixStream::connect(&h.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(bad).unwrap();
        h.run();
        // Closed with nothing written (a reset if bytes were left unread).
        let mut b = Vec::new();
        match c.read_to_end(&mut b) {
            Ok(_) => assert!(b.is_empty()),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert!(h.recv().is_empty(), "nothing reached the guest");
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 5\n").unwrap();
    h.run();
    assert_eq!(ops(&h.recv_until(op::REQUEST)), vec![op::REQUEST]);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut hdr = g(op::REQUEST, 1000, 52);
    hdr.buf_alloc = 8192;
    h.send(hdr, &[]);
    h.post_rx(4);
    let (mut host, _) = l.accept().unwrap();
    assert_eq!(ops(&h.recv()), vec![op::RESPONSE]);

    host.write_all(&[7u8; 100_000]).unwrap();
    h.run();
    h.post_rx(16);
    let got = h.recv();
    assert_eq!(payload_of(&got).len(), 8192, "exactly the guest's credit");
    assert_eq!(got.last().unwrap().0.op, op::CREDIT_REQUEST);
    h.post_rx(16);
    assert!(h.recv().is_empty(), "nothing more without credit");

    let mut upd = g(op::CREDIT_UPDATE, 1000, 52);
    upd.buf_alloc = 8192;
    upd.fwd_cnt = 8192;
    h.send(upd, &[]);
    let got = h.recv();
    assert_eq!(payload_of(&got).len(), 8192, "the next 8 KiB");
}

#[test]
fn a_guest_sending_past_its_credit_is_reset_and_capsule_holds_at_most_the_credit() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let _host = h.guest_connect(&l, 1000, 52); // never reads
    let chunk = vec![1u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..256 {
        h.send(g(op::RW, 1000, 52), &chunk);
        if let Some(c) = h.dev.lock().unwrap().conns.get(&(52, 1000)) {
            assert!(c.buffered() <= CONN_BUF_ALLOC as usize);
        }
        h.post_rx(2);
        if ops(&h.recv()).contains(&op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "16 MiB past the credit without a reset");
    assert_eq!(h.connections(), 0);
}

#[test]
fn credit_updates_follow_what_the_host_takes() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1000, 52);
    let chunk = vec![2u8; 32 * 1024];
    for _ in 0..4 {
        h.send(g(op::RW, 1000, 52), &chunk);
    }
    let mut b = vec![0u8; 4 * chunk.len()];
    host.read_exact(&mut b).unwrap();
    let got = h.recv_until(op::CREDIT_UPDATE);
    let (upd, _) = got.iter().find(|(h, _)| h.op == op::CREDIT_UPDATE).unwrap();
    assert!(upd.fwd_cnt >= conn::CREDIT_UPDATE_THRESHOLD);
    // And one on request.
    h.send(g(op::CREDIT_REQUEST, 1000, 52), &[]);
    let got = h.recv_until(op::CREDIT_UPDATE);
    assert_eq!(got.last().unwrap().0.fwd_cnt, 4 * chunk.len() as u32);
}

#[test]
fn shutdowns_go_through_in_each_direction() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1000, 52);

    // Host stops sending: the guest hears SHUTDOWN(SEND) after the data.
    host.write_all(b"last words").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    h.run();
    let got = h.recv_until(op::SHUTDOWN);
    assert_eq!(payload_of(&got), b"last words");
    let (s, _) = got.last().unwrap();
    assert_eq!(s.flags, SHUTDOWN_SEND);

    // The guest can still send; then it stops sending: host sees EOF.
    h.send(g(op::RW, 1000, 52), b"reply");
    let mut s = g(op::SHUTDOWN, 1000, 52);
    s.flags = SHUTDOWN_SEND;
    h.send(s, &[]);
    let mut b = Vec::new();
    host.read_to_end(&mut b).unwrap();
    assert_eq!(b, b"reply");
    assert_eq!(h.connections(), 1);

    // Both directions: the device answers with RST and forgets it.
    s.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    h.send(s, &[]);
    let got = h.recv_until(op::RST);
    assert_eq!(got.last().unwrap().0.dst_port, 1000);
    assert_eq!(h.connections(), 0);
}

#[test]
fn a_vanished_host_end_resets_a_sending_guest() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let host = h.guest_connect(&l, 1000, 52);
    drop(host);
    drop(l);
    h.run();
    let got = h.recv_until(op::SHUTDOWN);
    assert_eq!(got.last().unwrap().0.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    h.send(g(op::RW, 1000, 52), b"anyone?");
    let got = h.recv_until(op::RST);
    assert_eq!(got.last().unwrap().0.op, op::RST);
    assert_eq!(h.connections(), 0);
}

#[test]
fn twenty_connections_carry_their_own_data() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut hosts = Vec::new();
    for i in 0..20u32 {
        hosts.push(h.guest_connect(&l, 2000 + i, 52));
    }
    for i in 0..20u32 {
        h.send(g(op::RW, 2000 + i, 52), format!("to host {i}").as_bytes());
        hosts[i as usize]
            .write_all(format!("to guest {i}").as_bytes())
            .unwrap();
    }
    h.run();
    let mut got = Vec::new();
    for _ in 0..10 {
        h.post_rx(8);
        got.extend(h.recv());
    }
    for (i, host) in hosts.iter_mut().enumerate() {
        let want = format!("to host {i}");
        let mut b = vec![0u8; want.len()];
        host.read_exact(&mut b).unwrap();
        assert_eq!(b, want.as_bytes());
        let to_guest: Vec<u8> = got
            .iter()
            .filter(|(h, _)| h.op == op::RW && h.dst_port == 2000 + i as u32)
            .flat_map(|(_, d)| d.clone())
            .collect();
        assert_eq!(to_guest, format!("to guest {i}").as_bytes());
    }
    assert_eq!(h.connections(), 20);
}
