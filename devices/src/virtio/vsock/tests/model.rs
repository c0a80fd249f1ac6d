//! A driver stand-in that keeps Linux's rules
//! (net/vmw_vsock/virtio_transport_common.c, 6.1): it sends at most 64 KiB
//! per packet and only within the device's credit, drops the connection if
//! the device sends past its own credit, answers `CREDIT_REQUEST`, and
//! sends a `CREDIT_UPDATE` after its reader took bytes when the device's
//! view of its free space fell below 64 KiB or its queue ran empty. Linux
//! never asks for credit itself: a sender without credit waits for
//! whatever packet the device sends next. Both ends go at a [`Pace`], and
//! [`Model::run_until`] fails if nothing moves for many steps.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};

use super::super::packet::SHUTDOWN_SEND;
use super::super::*;
use super::harness::*;

/// The guest's receive buffer per socket (Linux's default).
pub(super) const GUEST_BUF: u32 = 256 * 1024;
/// Linux's largest packet.
pub(super) const MAX_PKT: usize = 64 * 1024;
/// Steps without progress that make a stall.
pub(super) const STALL_STEPS: u32 = 200;

/// How fast each end goes, per step.
#[derive(Clone, Copy)]
pub(super) struct Pace {
    /// Receive buffers the guest gives.
    pub rx_bufs: u16,
    /// Bytes the guest's reader takes, per socket.
    pub guest_read: usize,
    /// Bytes the guest's writer sends, per socket.
    pub guest_write: usize,
    /// Bytes the host reads, per connection.
    pub host_read: usize,
    /// Bytes the host writes, per connection.
    pub host_write: usize,
}

pub(super) const FAST: Pace = Pace {
    rx_bufs: 256,
    guest_read: usize::MAX,
    guest_write: usize::MAX,
    host_read: usize::MAX,
    host_write: usize::MAX,
};

/// One guest socket.
#[derive(Debug, Default)]
pub(super) struct Sock {
    pub port: u32,
    pub host_port: u32,
    pub fwd_cnt: u32,
    pub last_fwd_told: u32,
    pub rx: VecDeque<u8>,
    pub got: Vec<u8>,
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub out: Vec<u8>,
    pub sent: usize,
    /// Shut the sending side once `out` is sent.
    pub shut_when_sent: bool,
    pub shut_sent: bool,
    pub peer_shut: u32,
    pub reset: bool,
    /// Sends back what its reader takes (as `cat` on a connection does).
    pub echo: bool,
}

impl Sock {
    /// As Linux reckons it: the peer's buffer, capped at the socket's own.
    pub fn credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.min(GUEST_BUF).saturating_sub(in_flight) as usize
    }

    pub fn header(&mut self, op: u16) -> Header {
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
pub(super) struct HostEnd {
    pub stream: UnixStream,
    pub out: Vec<u8>,
    pub written: usize,
    pub got: Vec<u8>,
    pub eof: bool,
    /// Writes back what it reads (as `cat` on a connection does).
    pub echo: bool,
    pub shut_when_written: bool,
    pub shut: bool,
}

/// Counts of what the device sent the guest.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub rw: u64,
    pub credit_updates: u64,
    pub credit_requests: u64,
    pub bytes_to_guest: u64,
}

/// The Linux-like driver, its sockets and their host ends.
pub(super) struct Model<'a> {
    pub h: Harness<'a>,
    pub socks: Vec<Sock>,
    pub hosts: Vec<HostEnd>,
    pub stats: Stats,
}

impl<'a> Model<'a> {
    pub fn new(h: Harness<'a>) -> Self {
        Self {
            h,
            socks: Vec::new(),
            hosts: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// A guest connection from guest port `port` to host port `dst`,
    /// whose listener is `l`.
    pub fn connect(&mut self, l: &UnixListener, port: u32, dst: u32) -> usize {
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
    pub fn accept_host(&mut self, port: u32) -> usize {
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

    pub fn add(&mut self, s: Sock, stream: UnixStream) -> usize {
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
    pub fn establish(&mut self) {
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

    pub fn sock_of(&self, hdr: &Header) -> Option<usize> {
        self.socks
            .iter()
            .position(|s| s.port == hdr.dst_port && s.host_port == hdr.src_port)
    }

    /// The host ends: write and read within the pace.
    pub fn host_step(&mut self, pace: Pace) {
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
    pub fn guest_receive(&mut self) {
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
    pub fn guest_step(&mut self, pace: Pace) {
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

    pub fn progress(&self) -> usize {
        let g: usize = self.socks.iter().map(|s| s.got.len() + s.sent).sum();
        let h: usize = self
            .hosts
            .iter()
            .map(|e| e.got.len() + e.written + usize::from(e.eof))
            .sum();
        g + h
    }

    /// One step of each end.
    pub fn step(&mut self, pace: Pace) {
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
    pub fn run_until(&mut self, pace: Pace, done: impl Fn(&Self) -> bool) -> u32 {
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

    pub fn dump(&self) -> String {
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
