//! Credit flow and throughput against a driver stand-in that keeps
//! Linux's rules (net/vmw_vsock/virtio_transport_common.c, 6.1): it
//! sends at most 64 KiB per packet and only within the device's credit,
//! drops the connection if the device sends past its own credit, answers
//! `CREDIT_REQUEST`, and sends a `CREDIT_UPDATE` after its reader took
//! bytes when the device's view of its free space fell below 64 KiB or its
//! queue ran empty. Linux never asks for credit itself: a sender without
//! credit waits for whatever packet the device sends next.
//!
//! Each test paces both ends (how much the host reads, how many receive
//! buffers the guest gives and how much its reader takes per step) and
//! fails if nothing moves for many steps: a stall, not a slow test.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use super::super::packet::SHUTDOWN_SEND;
use super::super::*;
use super::harness::*;
use crate::virtio::features::{bit, VIRTIO_RING_F_EVENT_IDX};

/// The guest's receive buffer per socket (Linux's default).
const GUEST_BUF: u32 = 256 * 1024;
/// Linux's largest packet.
const MAX_PKT: usize = 64 * 1024;
/// Steps without progress that make a stall.
const STALL_STEPS: u32 = 200;

/// How fast each end goes, per step.
#[derive(Clone, Copy)]
struct Pace {
    /// Receive buffers the guest gives.
    rx_bufs: u16,
    /// Bytes the guest's reader takes, per socket.
    guest_read: usize,
    /// Bytes the guest's writer sends, per socket.
    guest_write: usize,
    /// Bytes the host reads, per connection.
    host_read: usize,
    /// Bytes the host writes, per connection.
    host_write: usize,
}

const FAST: Pace = Pace {
    rx_bufs: 256,
    guest_read: usize::MAX,
    guest_write: usize::MAX,
    host_read: usize::MAX,
    host_write: usize::MAX,
};

/// One guest socket.
#[derive(Debug, Default)]
struct Sock {
    port: u32,
    host_port: u32,
    fwd_cnt: u32,
    last_fwd_told: u32,
    rx: VecDeque<u8>,
    got: Vec<u8>,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    out: Vec<u8>,
    sent: usize,
    /// Shut the sending side once `out` is sent.
    shut_when_sent: bool,
    shut_sent: bool,
    peer_shut: u32,
    reset: bool,
    /// Sends back what its reader takes (as `cat` on a connection does).
    echo: bool,
}

impl Sock {
    fn credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_told = self.fwd_cnt;
        Header {
            buf_alloc: GUEST_BUF,
            fwd_cnt: self.fwd_cnt,
            ..g(op, self.port, self.host_port)
        }
    }
}

/// The host end of one connection.
#[derive(Debug)]
struct HostEnd {
    stream: UnixStream,
    out: Vec<u8>,
    written: usize,
    got: Vec<u8>,
    eof: bool,
    /// Writes back what it reads (as `cat` on a connection does).
    echo: bool,
    shut_when_written: bool,
    shut: bool,
}

/// Counts of what the device sent the guest.
#[derive(Debug, Default)]
struct Stats {
    rw: u64,
    credit_updates: u64,
    credit_requests: u64,
    bytes_to_guest: u64,
}

/// The Linux-like driver, its sockets and their host ends.
struct Model<'a> {
    h: Harness<'a>,
    socks: Vec<Sock>,
    hosts: Vec<HostEnd>,
    stats: Stats,
}

impl<'a> Model<'a> {
    fn new(h: Harness<'a>) -> Self {
        Self {
            h,
            socks: Vec::new(),
            hosts: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// A guest connection from guest port `port` to host port `dst`,
    /// whose listener is `l`.
    fn connect(&mut self, l: &UnixListener, port: u32, dst: u32) -> usize {
        let mut s = Sock {
            port,
            host_port: dst,
            ..Sock::default()
        };
        let req = s.header(op::REQUEST);
        self.h.queue_packet(req, &[]);
        self.h.flush_tx();
        let (stream, _) = l.accept().unwrap();
        self.add(s, stream)
    }

    /// A host client's connection to guest port `port`; the guest's
    /// socket echoes.
    fn accept_host(&mut self, port: u32) -> usize {
        let mut c = UnixStream::connect(&self.h.uds).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.h.settle();
        self.add(
            Sock {
                port,
                echo: true,
                ..Sock::default()
            },
            c,
        )
    }

    fn add(&mut self, s: Sock, stream: UnixStream) -> usize {
        stream.set_nonblocking(true).unwrap();
        self.socks.push(s);
        self.hosts.push(HostEnd {
            stream,
            out: Vec::new(),
            written: 0,
            got: Vec::new(),
            eof: false,
            echo: false,
            shut_when_written: false,
            shut: false,
        });
        self.socks.len() - 1
    }

    /// Brings every connection up: guest connections get their
    /// `RESPONSE`; host clients' `REQUEST`s are accepted and each client
    /// learns its port from its `OK` line.
    fn establish(&mut self) {
        let mut requests = Vec::new();
        let clients = self.socks.iter().filter(|s| s.host_port == 0).count();
        for _ in 0..100 {
            self.h.give_rx(64);
            self.h.kick_now(RX_QUEUE);
            for (hdr, _) in self.h.recv() {
                match hdr.op {
                    op::RESPONSE => {
                        let s = self.sock_of(&hdr).expect("a response for a socket");
                        self.socks[s].peer_buf_alloc = hdr.buf_alloc;
                        self.socks[s].peer_fwd_cnt = hdr.fwd_cnt;
                    }
                    op::REQUEST => {
                        let resp = Header {
                            buf_alloc: GUEST_BUF,
                            ..g(op::RESPONSE, hdr.dst_port, hdr.src_port)
                        };
                        self.h.queue_packet(resp, &[]);
                        requests.push(hdr);
                    }
                    o => panic!("op {o} while connecting"),
                }
            }
            self.h.flush_tx();
            let guests_up = self
                .socks
                .iter()
                .all(|s| s.host_port == 0 || s.peer_buf_alloc != 0);
            if guests_up && requests.len() == clients {
                break;
            }
        }
        assert_eq!(requests.len(), clients, "every host client's request");
        for (s, e) in self.socks.iter_mut().zip(&mut self.hosts) {
            if s.host_port != 0 {
                continue;
            }
            e.stream.set_nonblocking(false).unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.last() != Some(&b'\n') {
                e.stream.read_exact(&mut b).unwrap();
                line.push(b[0]);
            }
            e.stream.set_nonblocking(true).unwrap();
            let text = std::str::from_utf8(&line).unwrap();
            let port: u32 = text.strip_prefix("OK ").unwrap().trim().parse().unwrap();
            let req = requests.iter().find(|r| r.src_port == port).unwrap();
            s.host_port = port;
            s.peer_buf_alloc = req.buf_alloc;
            s.peer_fwd_cnt = req.fwd_cnt;
        }
        assert!(
            self.socks.iter().all(|s| s.peer_buf_alloc != 0),
            "connections up"
        );
    }

    fn sock_of(&self, hdr: &Header) -> Option<usize> {
        self.socks
            .iter()
            .position(|s| s.port == hdr.dst_port && s.host_port == hdr.src_port)
    }

    /// The host ends: write and read within the pace.
    fn host_step(&mut self, pace: Pace) {
        let mut buf = vec![0u8; 64 * 1024];
        for e in &mut self.hosts {
            let mut budget = pace.host_write;
            while e.written < e.out.len() && budget > 0 {
                let end = e.out.len().min(e.written + budget.min(1 << 20));
                match e.stream.write(&e.out[e.written..end]) {
                    Ok(n) => {
                        e.written += n;
                        budget -= n;
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => panic!("host write: {err}"),
                }
            }
            if e.written == e.out.len() && e.shut_when_written && !e.shut {
                e.shut = true;
                e.stream.shutdown(Shutdown::Write).unwrap();
            }
            let mut budget = pace.host_read;
            while !e.eof && budget > 0 {
                let want = budget.min(buf.len());
                match e.stream.read(&mut buf[..want]) {
                    Ok(0) => e.eof = true,
                    Ok(n) => {
                        e.got.extend_from_slice(&buf[..n]);
                        if e.echo {
                            e.out.extend_from_slice(&buf[..n]);
                        }
                        budget -= n;
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => panic!("host read: {err}"),
                }
            }
            if e.echo && e.eof && !e.shut {
                e.shut_when_written = true;
            }
        }
    }

    /// What the device put in the receive ring.
    fn guest_receive(&mut self) {
        for (hdr, data) in self.h.recv() {
            let Some(i) = self.sock_of(&hdr) else {
                panic!("a packet for no socket: {hdr:?}");
            };
            let s = &mut self.socks[i];
            s.peer_buf_alloc = hdr.buf_alloc;
            s.peer_fwd_cnt = hdr.fwd_cnt;
            match hdr.op {
                op::RW => {
                    self.stats.rw += 1;
                    self.stats.bytes_to_guest += data.len() as u64;
                    assert!(
                        s.rx.len() + data.len() <= GUEST_BUF as usize,
                        "port {}: the device sent {} bytes with {} queued: past the guest's credit",
                        s.port,
                        data.len(),
                        s.rx.len()
                    );
                    assert!(s.peer_shut & SHUTDOWN_SEND == 0, "data after SHUTDOWN");
                    s.rx.extend(data);
                }
                op::CREDIT_REQUEST => {
                    self.stats.credit_requests += 1;
                    let upd = s.header(op::CREDIT_UPDATE);
                    self.h.queue_packet(upd, &[]);
                }
                op::CREDIT_UPDATE => self.stats.credit_updates += 1,
                op::SHUTDOWN => s.peer_shut |= hdr.flags,
                op::RST => s.reset = true,
                o => panic!("port {}: unexpected op {o}", s.port),
            }
        }
    }

    /// The guest's readers and writers.
    fn guest_step(&mut self, pace: Pace) {
        for s in &mut self.socks {
            if s.reset {
                continue;
            }
            let n = s.rx.len().min(pace.guest_read);
            if n > 0 {
                let taken: Vec<u8> = s.rx.drain(..n).collect();
                if s.echo {
                    s.out.extend_from_slice(&taken);
                }
                s.got.extend(taken);
                s.fwd_cnt = s.fwd_cnt.wrapping_add(n as u32);
                let delta = s.fwd_cnt.wrapping_sub(s.last_fwd_told);
                let free = GUEST_BUF - delta;
                if delta != 0 && (free < MAX_PKT as u32 || s.rx.is_empty()) {
                    let upd = s.header(op::CREDIT_UPDATE);
                    self.h.queue_packet(upd, &[]);
                }
            }
            let mut budget = pace.guest_write;
            while s.sent < s.out.len() && budget > 0 {
                let n = (s.out.len() - s.sent)
                    .min(s.credit())
                    .min(MAX_PKT)
                    .min(budget);
                if n == 0 {
                    break;
                }
                let hdr = s.header(op::RW);
                let (from, to) = (s.sent, s.sent + n);
                s.sent = to;
                s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
                budget -= n;
                let payload = s.out[from..to].to_vec();
                self.h.queue_packet(hdr, &payload);
            }
            if s.echo && s.peer_shut & SHUTDOWN_SEND != 0 && s.rx.is_empty() {
                s.shut_when_sent = true;
            }
            if s.sent == s.out.len() && s.shut_when_sent && !s.shut_sent {
                s.shut_sent = true;
                let mut hdr = s.header(op::SHUTDOWN);
                hdr.flags = SHUTDOWN_SEND;
                self.h.queue_packet(hdr, &[]);
            }
        }
        self.h.flush_tx();
    }

    fn progress(&self) -> usize {
        let g: usize = self.socks.iter().map(|s| s.got.len() + s.sent).sum();
        let h: usize = self
            .hosts
            .iter()
            .map(|e| e.got.len() + e.written + usize::from(e.eof))
            .sum();
        g + h
    }

    /// One step of each end.
    fn step(&mut self, pace: Pace) {
        self.host_step(pace);
        self.h.settle();
        if self.h.give_rx(pace.rx_bufs) > 0 {
            self.h.notify(RX_QUEUE);
        }
        self.guest_receive();
        self.guest_step(pace);
        self.h.irq.take();
    }

    /// Steps until `done` holds; panics on a stall.
    fn run_until(&mut self, pace: Pace, done: impl Fn(&Self) -> bool) -> u32 {
        let mut last = self.progress();
        let mut idle = 0;
        let mut steps = 0;
        while !done(self) {
            steps += 1;
            self.step(pace);
            let p = self.progress();
            if p == last {
                idle += 1;
                assert!(
                    idle < STALL_STEPS,
                    "stalled after {steps} steps:\n{}",
                    self.dump()
                );
            } else {
                idle = 0;
                last = p;
            }
        }
        steps
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        for (i, (g, e)) in self.socks.iter().zip(&self.hosts).enumerate() {
            s += &format!(
                "  #{i} guest {}<->{}: sent {}/{} tx_cnt {} peer credit {} (alloc {} fwd {}) | got {} queued {} fwd_cnt {} told {} | shut {} reset {}\n",
                g.port, g.host_port, g.sent, g.out.len(), g.tx_cnt, g.credit(), g.peer_buf_alloc,
                g.peer_fwd_cnt, g.got.len(), g.rx.len(), g.fwd_cnt, g.last_fwd_told, g.peer_shut, g.reset
            );
            s += &format!(
                "      host: written {}/{} got {} eof {} shut {}\n",
                e.written,
                e.out.len(),
                e.got.len(),
                e.eof,
                e.shut
            );
        }
        let d = self.h.dev.lock().unwrap();
        for c in d.conns.values() {
            s += &format!("  device: {c:?}\n");
        }
        s += &format!("  rx buffers outstanding {}\n", self.h.rx_outstanding());
        s
    }
}

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
