//! virtio-vsock driven by a hostile driver stand-in: rings in guest
//! memory, the device in a real event loop, real Unix sockets on the host.
//! `harness.rs`: the stand-in; `flow.rs`: credit and throughput with a
//! driver that keeps Linux's rules; `hostile.rs`: malformed and hostile
//! input; `resets.rs`: transport and driver resets.

mod flow;
mod harness;
mod hostile;
mod model;
mod resets;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use self::harness::*;
use super::conn::CONN_BUF_ALLOC;
use super::packet::{op, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::*;
use crate::virtio::InterruptKind;

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
    let mut client = h.host_client(b"CONNECT 1234\n");
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
    let mut client = h.host_client(b"CONNECT 9\n");
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
        let mut c = h.host_client(bad);
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
    // Half the window (the guest's 256 KiB buffer, below capsule's
    // credit): the guest still knows of room enough.
    let window = CONN_BUF_ALLOC.min(g(op::RW, 1000, 52).buf_alloc);
    let half = (window / 2) as usize / chunk.len();
    for _ in 0..half {
        h.send(g(op::RW, 1000, 52), &chunk);
    }
    let mut b = vec![0u8; half * chunk.len()];
    host.read_exact(&mut b).unwrap();
    h.post_rx(8);
    assert!(h.recv().is_empty(), "no update while the guest has room");
    // One more packet: the room it knows of is low, so it hears of all
    // the host took.
    h.send(g(op::RW, 1000, 52), &chunk);
    let got = h.recv_until(op::CREDIT_UPDATE);
    let (upd, _) = got.iter().find(|(h, _)| h.op == op::CREDIT_UPDATE).unwrap();
    assert_eq!(upd.fwd_cnt, (half + 1) as u32 * chunk.len() as u32);
    // And one on request, whatever the room.
    h.send(g(op::CREDIT_REQUEST, 1000, 52), &[]);
    let got = h.recv_until(op::CREDIT_UPDATE);
    assert_eq!(
        got.last().unwrap().0.fwd_cnt,
        (half + 1) as u32 * chunk.len() as u32
    );
}

/// Linux never sends more than its own socket buffer unacknowledged,
/// whatever credit capsule offers: a guest whose buffer is smaller than
/// the credit sends that much and waits. Before updates were reckoned
/// against the smaller of the two, it waited forever.
#[test]
fn a_guest_with_a_small_buffer_that_sent_it_all_hears_of_the_room() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut req = g(op::REQUEST, 1000, 52);
    req.buf_alloc = 64 * 1024;
    h.send(req, &[]);
    h.recv_until(op::RESPONSE);
    let (mut host, _) = l.accept().unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let chunk = vec![3u8; 16 * 1024];
    for _ in 0..4 {
        let mut rw = g(op::RW, 1000, 52);
        rw.buf_alloc = 64 * 1024;
        h.send(rw, &chunk);
    }
    let mut b = vec![0u8; 64 * 1024];
    host.read_exact(&mut b).unwrap();
    h.run();
    let got = h.recv_until(op::CREDIT_UPDATE);
    let told = got.iter().map(|(h, _)| h.fwd_cnt).max().unwrap();
    assert!(
        told >= 32 * 1024,
        "the guest knows of half its window free at least (told {told})"
    );
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

#[test]
fn an_available_index_out_of_range_does_not_spin() {
    let mem = guest_memory();
    let mut h = Harness::with(
        &mem,
        RX_PAYLOAD,
        crate::virtio::features::bit(crate::virtio::features::VIRTIO_RING_F_EVENT_IDX),
    );
    // A RST is owed and no receive buffer is there; the driver claims a
    // thousand on each queue. The device must go idle (`run` panics if it
    // never does), not retry the rings forever.
    h.send(g(op::REQUEST, 1000, 77), &[]);
    h.rx.set_avail_idx(h.rx.avail_idx().wrapping_add(1000));
    h.kick(RX_QUEUE);
    h.tx.set_avail_idx(h.tx.avail_idx().wrapping_add(1000));
    h.kick(TX_QUEUE);
    assert_eq!(h.connections(), 0);
}

#[test]
fn the_device_describes_its_queues_and_connections() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let _host = h.guest_connect(&l, 1000, 52);
    h.send(g(op::RW, 1000, 52), b"hi");
    let line = h.dev.lock().unwrap().describe();
    // Three queues, each with the driver's and the device's positions;
    // the transmit queue took every chain the driver made available.
    for q in 0..3 {
        assert!(line.contains(&format!("queue {q}: avail ")), "{line}");
    }
    let tx = line.split("queue 1: ").nth(1).unwrap();
    let avail: u16 = tx.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(tx.contains(&format!("(taken {avail})")), "{line}");
    assert!(line.contains("peer_port: 1000"), "{line}");
    assert!(line.contains("state: Established"), "{line}");
}
