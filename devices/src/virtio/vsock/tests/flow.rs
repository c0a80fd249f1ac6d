//! Credit flow and throughput against the Linux-rules driver stand-in of
//! `model.rs`. Each test paces both ends (how much the host reads, how many
//! receive buffers the guest gives and how much its reader takes per step)
//! and fails if nothing moves for many steps: a stall, not a slow test.

use std::io::{self, Read};
use std::time::Instant;

use super::super::packet::SHUTDOWN_SEND;
use super::super::*;
use super::harness::*;
use super::model::*;
use crate::virtio::features::{bit, VIRTIO_RING_F_EVENT_IDX};

/// `n` bytes that differ with `seed` and with their position.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8 ^ seed)
        .collect()
}

/// Both ways on one connection, `mib` MiB each, at `pace`.
fn both_ways(h: Harness<'_>, mib: usize, pace: Pace) -> Stats {
    let l = h.listen(52);
    let mut m = Model::new(h);
    let i = m.connect(&l, 1000, 52);
    m.establish();
    let to_host = pattern(mib << 20, 1);
    let to_guest = pattern(mib << 20, 2);
    m.socks[i].out = to_host.clone();
    m.socks[i].shut_when_sent = true;
    m.hosts[i].out = to_guest.clone();
    m.hosts[i].shut_when_written = true;
    m.run_until(pace, |m| {
        m.hosts[0].eof && m.socks[0].peer_shut & SHUTDOWN_SEND != 0 && m.socks[0].rx.is_empty()
    });
    assert!(
        m.hosts[i].got == to_host,
        "the host got the guest's bytes in order"
    );
    assert!(
        m.socks[i].got == to_guest,
        "the guest got the host's bytes in order"
    );
    assert!(!m.socks[i].reset);
    std::mem::take(&mut m.stats)
}

#[test]
fn eight_mib_each_way_with_a_slow_host_reader_and_a_slow_guest() {
    let mem = guest_memory();
    let pace = Pace {
        rx_bufs: 3,
        guest_read: 12 * 1024,
        guest_write: 40 * 1024,
        host_read: 20 * 1024,
        host_write: 100 * 1024,
    };
    both_ways(Harness::new(&mem), 8, pace);
}

#[test]
fn a_guest_that_gives_receive_buffers_late_still_gets_everything() {
    let mem = guest_memory();
    let h = Harness::with(&mem, 64 * 1024, 0);
    // One buffer per step, and the reader takes a byte less than a
    // packet: the device keeps running into an empty ring and into the
    // end of the guest's credit.
    let pace = Pace {
        rx_bufs: 1,
        guest_read: 64 * 1024 - 1,
        host_read: 4096,
        ..FAST
    };
    both_ways(h, 4, pace);
}

#[test]
fn both_ways_with_event_idx_and_large_receive_buffers() {
    let mem = guest_memory();
    let h = Harness::with(&mem, 64 * 1024, bit(VIRTIO_RING_F_EVENT_IDX));
    let stats = both_ways(h, 8, FAST);
    // Large buffers are filled: not one 4 KiB read per packet.
    assert!(
        stats.rw <= (8 << 20) / (16 * 1024),
        "{} RW packets for 8 MiB",
        stats.rw
    );
}

#[test]
fn twenty_connections_each_move_a_mib_both_ways_at_once() {
    let mem = guest_memory();
    let h = Harness::new(&mem);
    let echo = h.listen(5003);
    let mut m = Model::new(h);
    // Ten guest connections to a host echo, ten host clients to a guest
    // echo, as the boot case vsock_20_connections does.
    for k in 0..10u32 {
        let i = m.connect(&echo, 3000 + k, 5003);
        m.socks[i].out = pattern(1 << 20, k as u8);
        m.socks[i].shut_when_sent = true;
        m.hosts[i].echo = true;
    }
    let mut sent = Vec::new();
    for k in 0..10u32 {
        let i = m.accept_host(5002);
        m.hosts[i].out = pattern(1 << 20, 100 + k as u8);
        m.hosts[i].shut_when_written = true;
        sent.push((i, m.hosts[i].out.clone()));
    }
    m.establish();
    let pace = Pace {
        rx_bufs: 32,
        guest_read: 32 * 1024,
        guest_write: 64 * 1024,
        host_read: 64 * 1024,
        host_write: 64 * 1024,
    };
    m.run_until(pace, |m| {
        m.socks.iter().zip(&m.hosts).all(|(s, e)| {
            // Each side saw the other's end of stream after the echo.
            e.eof && s.peer_shut & SHUTDOWN_SEND != 0 && s.rx.is_empty()
        })
    });
    for (s, e) in m.socks.iter().zip(&m.hosts) {
        if e.echo {
            assert!(
                s.got == s.out,
                "port {}: the host's echo came back intact",
                s.port
            );
        } else {
            assert!(
                e.got == s.got,
                "port {}: the guest's echo came back intact",
                s.port
            );
        }
        assert!(!s.reset, "port {} was reset", s.port);
    }
    for (i, data) in sent {
        assert!(
            m.socks[i].got == data,
            "host client {i}: the guest got it intact"
        );
    }
}

#[test]
fn a_guest_out_of_credit_hears_of_every_byte_the_host_takes() {
    let mem = guest_memory();
    let h = Harness::new(&mem);
    let l = h.listen(52);
    let mut m = Model::new(h);
    let i = m.connect(&l, 1000, 52);
    m.establish();
    m.socks[i].out = pattern(4 << 20, 3);
    // The host takes nothing: the guest fills its credit (and the host
    // socket's buffer) and waits.
    let stopped = Pace {
        host_read: 0,
        ..FAST
    };
    for _ in 0..20 {
        m.step(stopped);
    }
    assert!(m.socks[i].sent < 4 << 20);
    assert_eq!(m.socks[i].credit(), 0, "the guest used all its credit");
    // The host reads what its socket holds, and no more: the device
    // forwards what it held, but cannot forward all of it. The guest,
    // which never asks, must be told of the room made.
    let mut b = vec![0u8; 64 * 1024];
    loop {
        match m.hosts[i].stream.read(&mut b) {
            Ok(n) => assert!(n > 0),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    m.h.settle();
    m.h.give_rx(8);
    m.h.kick_now(RX_QUEUE);
    m.guest_receive();
    assert!(
        m.socks[i].credit() > 0,
        "the guest was not told of the room the host made:\n{}",
        m.dump()
    );
}

#[test]
fn a_half_shut_connection_keeps_carrying_the_other_way() {
    let mem = guest_memory();
    let h = Harness::new(&mem);
    let l = h.listen(52);
    let mut m = Model::new(h);
    let a = m.connect(&l, 1000, 52);
    let b = m.connect(&l, 1001, 52);
    m.establish();
    // a: the guest says at once it sends nothing; the host sends 2 MiB.
    m.socks[a].shut_when_sent = true;
    m.hosts[a].out = pattern(2 << 20, 5);
    m.hosts[a].shut_when_written = true;
    // b: the host says at once it sends nothing; the guest sends 2 MiB.
    m.hosts[b].shut_when_written = true;
    m.socks[b].out = pattern(2 << 20, 6);
    m.socks[b].shut_when_sent = true;
    let pace = Pace {
        rx_bufs: 8,
        host_read: 32 * 1024,
        ..FAST
    };
    m.run_until(pace, |m| {
        m.socks[a].peer_shut & SHUTDOWN_SEND != 0 && m.socks[a].rx.is_empty() && m.hosts[b].eof
    });
    assert!(
        m.hosts[a].eof,
        "the host saw the guest's end of stream at once"
    );
    assert!(m.hosts[a].got.is_empty());
    assert!(m.socks[a].got == m.hosts[a].out);
    assert!(m.socks[b].peer_shut & SHUTDOWN_SEND != 0);
    assert!(m.socks[b].got.is_empty());
    assert!(m.hosts[b].got == m.socks[b].out);
    assert!(!m.socks[a].reset && !m.socks[b].reset);
}

/// A bench, not a check: MiB/s of each direction through the device and
/// what it cost in packets, kicks and interrupts (`cargo test -p devices
/// --release vsock_throughput -- --ignored --nocapture`).
#[test]
#[ignore]
fn vsock_throughput() {
    for (rx_payload, features) in [(4096 - 320, 0), (4096 - 320, bit(VIRTIO_RING_F_EVENT_IDX))] {
        for dir in ["guest to host", "host to guest"] {
            let mem = guest_memory();
            let h = Harness::with(&mem, rx_payload, features);
            let l = h.listen(52);
            let mut m = Model::new(h);
            let i = m.connect(&l, 1000, 52);
            m.establish();
            let n = 64 << 20;
            if dir == "guest to host" {
                m.socks[i].out = vec![7; n];
            } else {
                m.hosts[i].out = vec![7; n];
            }
            let irq0 = m.h.irq.count.load(std::sync::atomic::Ordering::SeqCst);
            let t = Instant::now();
            m.run_until(FAST, |m| m.hosts[0].got.len() + m.socks[0].got.len() >= n);
            let secs = t.elapsed().as_secs_f64();
            let irq = m.h.irq.count.load(std::sync::atomic::Ordering::SeqCst) - irq0;
            println!(
                "{dir:>13}, rx buffers {rx_payload} B, event_idx {}: {:.0} MiB/s; {} RW, {} credit updates, {} tx kicks, {} rx kicks, {irq} interrupts",
                features != 0,
                64.0 / secs,
                m.stats.rw,
                m.stats.credit_updates,
                m.h.kicks_sent[TX_QUEUE],
                m.h.kicks_sent[RX_QUEUE],
            );
        }
    }
}
