//! virtio-vsock against a hostile driver: malformed transmit chains,
//! unknown operations, types and connections, resets owed to a guest that
//! posts no receive buffers, too many connections, unusable receive
//! buffers. Each is answered or refused, bounded, and changes nothing
//! else.

use super::*;

#[test]
fn malformed_transmit_chains_are_returned_and_change_nothing() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let slot = TX_BUFS;
    let mut hdr = g(op::REQUEST, 1000, 52);
    mem.write_slice(&hdr.to_bytes(), GuestAddress(slot))
        .unwrap();
    let cases: Vec<Vec<(u64, u32, u16)>> = vec![
        // A device-writable descriptor.
        vec![(slot, HDR_LEN as u32, WRITE)],
        // Shorter than the header.
        vec![(slot, HDR_LEN as u32 - 1, 0)],
        // The header outside guest memory.
        vec![(MEM_SIZE - 8, HDR_LEN as u32, 0)],
        // A length that wraps the address space.
        vec![(u64::MAX - 4, HDR_LEN as u32, 0)],
        // An empty chain of zero-length descriptors.
        vec![(slot, 0, 0), (slot, 0, 0)],
    ];
    let mut returned = 0;
    for c in &cases {
        h.send_chain(c);
        returned += 1;
        assert_eq!(h.tx.used_idx(), returned);
    }
    // A header whose len is longer than the chain, or over 64 KiB.
    for len in [100u32, 64 * 1024 + 1, u32::MAX] {
        hdr.op = op::RW;
        hdr.len = len;
        mem.write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap();
        h.send_chain(&[(slot, HDR_LEN as u32, 0), (slot + 0x100, 10, 0)]);
        returned += 1;
        assert_eq!(h.tx.used_idx(), returned);
    }
    // A descriptor loop (each descriptor points at itself).
    let base = (h.tx_next % TX_SLOTS) * 8;
    h.tx_next += 1;
    h.tx.store(base, slot, 8, NEXT, base);
    h.tx.push_avail(base);
    h.kick(TX_QUEUE);
    returned += 1;
    assert_eq!(h.tx.used_idx(), returned);
    // A descriptor index out of the table.
    h.tx.store(base, slot, HDR_LEN as u32, NEXT, 999);
    h.tx.push_avail(base);
    h.kick(TX_QUEUE);
    returned += 1;
    assert_eq!(h.tx.used_idx(), returned);

    h.post_rx(8);
    assert!(h.recv().is_empty(), "no packet came of it");
    assert_eq!(h.connections(), 0);
    // The device still works.
    let _host = h.guest_connect(&l, 1000, 52);
}

#[test]
fn unknown_ops_types_and_connections_get_resets() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let _host = h.guest_connect(&l, 1000, 52);

    // An unknown op on a live connection resets it.
    h.send(g(99, 1000, 52), &[]);
    let got = h.recv_until(op::RST);
    assert_eq!(got.last().unwrap().0.dst_port, 1000);
    assert_eq!(h.connections(), 0);

    // A second REQUEST on a live connection resets it too.
    let _host2 = h.guest_connect(&l, 1001, 52);
    h.send(g(op::REQUEST, 1001, 52), &[]);
    h.recv_until(op::RST);
    assert_eq!(h.connections(), 0);

    // Data, responses and credit packets of no connection get a RST;
    // a RST of no connection gets nothing.
    for o in [op::RW, op::RESPONSE, op::CREDIT_UPDATE, op::SHUTDOWN, 42] {
        h.send(g(o, 3000, 52), b"x");
        let got = h.recv_until(op::RST);
        assert_eq!(got.last().unwrap().0.dst_port, 3000);
    }
    h.send(g(op::RST, 3000, 52), &[]);
    h.post_rx(4);
    assert!(h.recv().is_empty());

    // A socket type other than stream (SEQPACKET) is refused.
    let mut seq = g(op::REQUEST, 3001, 52);
    seq.type_ = 2;
    h.send(seq, &[]);
    let got = h.recv_until(op::RST);
    assert_eq!(got.last().unwrap().0.dst_port, 3001);

    // A packet that claims another source CID, or is not for the host,
    // is dropped without an answer.
    let mut spoof = g(op::REQUEST, 3002, 52);
    spoof.src_cid = 7;
    h.send(spoof, &[]);
    let mut other = g(op::REQUEST, 3003, 52);
    other.dst_cid = 9;
    h.send(other, &[]);
    h.post_rx(4);
    assert!(h.recv().is_empty());
    assert_eq!(h.connections(), 0);
}

#[test]
fn resets_owed_without_receive_buffers_are_bounded() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    for i in 0..(MAX_STRAY_RESETS as u32 * 4) {
        h.send(g(op::RW, 5000 + i, 52), b"x");
    }
    assert_eq!(h.dev.lock().unwrap().strays.len(), MAX_STRAY_RESETS);
    let mut all = Vec::new();
    for _ in 0..20 {
        h.post_rx(16);
        all.extend(h.recv());
    }
    assert_eq!(all.len(), MAX_STRAY_RESETS);
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let l = h.listen(52);
    let mut hosts = Vec::new();
    for i in 0..MAX_CONNECTIONS as u32 {
        h.send(g(op::REQUEST, 10_000 + i, 52), &[]);
        hosts.push(l.accept().unwrap());
        h.post_rx(1);
    }
    h.recv();
    assert_eq!(h.connections(), MAX_CONNECTIONS);
    h.send(g(op::REQUEST, 20_000, 52), &[]);
    let got = h.recv_until(op::RST);
    assert_eq!(got.last().unwrap().0.dst_port, 20_000);
    assert_eq!(h.connections(), MAX_CONNECTIONS);
}

#[test]
fn unusable_receive_buffers_are_returned_empty() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    h.send(g(op::REQUEST, 1000, 77), &[]); // owes a RST
                                           // Device-readable, too short, outside memory.
    h.rx.store(0, RX_BUFS, 4096, 0, 0);
    h.rx.store(1, RX_BUFS, 10, WRITE, 0);
    h.rx.store(2, MEM_SIZE - 8, 4096, WRITE, 0);
    for i in 0..3 {
        h.rx.push_avail(i);
    }
    h.rx_next = 3;
    h.kick(RX_QUEUE);
    let got = h.recv();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(_, b)| b.is_empty()), "{got:?}");
    // The RST is still delivered in a good buffer.
    h.post_rx(1);
    assert_eq!(ops(&h.recv()), vec![op::RST]);
}
