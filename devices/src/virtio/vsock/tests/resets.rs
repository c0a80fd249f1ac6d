//! virtio-vsock resets: a transport reset (after a snapshot restore) and a
//! driver reset drop every connection; a reset owed to a guest without
//! receive buffers waits without spinning.

use super::*;

#[test]
fn transport_reset_drops_connections_and_tells_the_driver() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1000, 52);
    // No event buffer yet: the event waits for one.
    h.dev.lock().unwrap().transport_reset();
    h.run();
    assert_eq!(h.connections(), 0);
    let mut b = Vec::new();
    host.read_to_end(&mut b).unwrap();
    assert!(b.is_empty(), "the host end is closed");
    assert_eq!(h.ev.used_idx(), 0);
    mem.write_obj(0xffff_ffffu32, GuestAddress(EV_BUF)).unwrap();
    h.ev.store(0, EV_BUF, 4, WRITE, 0);
    h.ev.push_avail(0);
    h.kick(EVENT_QUEUE);
    assert_eq!(h.ev.used_idx(), 1);
    assert_eq!(h.ev.used_elem(0), (0, 4));
    let id: u32 = mem.read_obj(GuestAddress(EV_BUF)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    // Nothing more is owed.
    h.ev.store(1, EV_BUF, 4, WRITE, 0);
    h.ev.push_avail(1);
    h.kick(EVENT_QUEUE);
    assert_eq!(h.ev.used_idx(), 1);
}

#[test]
fn a_driver_reset_drops_every_connection() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1000, 52);
    assert!(h.dev.lock().unwrap().reset());
    h.run();
    assert_eq!(h.connections(), 0);
    let mut b = Vec::new();
    host.read_to_end(&mut b).unwrap();
    assert!(b.is_empty());
    // The listener is not watched while the device is inactive.
    let _c = UnixStream::connect(&h.uds).unwrap();
    h.run();
    assert_eq!(h.dev.lock().unwrap().clients.len(), 0);
    let _ = &h.dir;
}

#[test]
fn a_reset_owed_to_a_guest_without_receive_buffers_does_not_spin() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    // No receive buffers at all: even the RESPONSE waits.
    h.send(g(op::REQUEST, 1000, 52), &[]);
    let (host, _) = l.accept().unwrap();
    drop(host);
    h.run();
    // The write to the vanished host end fails: a RST is owed, but the
    // guest posts no receive buffer. The loop must go idle (`run` panics
    // if it never does) with the hung-up stream not polled.
    h.send(g(op::RW, 1000, 52), b"into the void");
    h.run();
    let c = h.dev.lock().unwrap();
    let conn = c
        .conns
        .get(&(52, 1000))
        .expect("kept until the RST is sent");
    assert!(conn.resetting());
    assert_eq!(conn.registered, None);
    drop(c);
    let got = h.recv_until(op::RST);
    assert_eq!(got.last().unwrap().0.dst_port, 1000);
    assert_eq!(h.connections(), 0);
}
