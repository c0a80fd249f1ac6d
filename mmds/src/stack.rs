//! The guest's side of the service on the wire: which Ethernet frames are
//! for the metadata service, and the TCP/IP endpoint that answers them.
//!
//! The endpoint is smoltcp's (ARP, IPv4, TCP) on a device made of two
//! in-memory queues: frames the guest sent to the service go in, frames
//! for the guest come out. Its address has prefix length 0, so every
//! guest address is on its link: it answers whatever address the guest
//! has, learning the guest's MAC from the guest's own ARP request. The
//! link is a queue in capsule's memory and loses nothing unless the
//! guest stops taking frames, so the endpoint is polled only when the
//! guest sends it something (no timers run).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use crate::http::{self, Parsed, Response};
use crate::store::Mmds;

/// The service's MAC address (locally administered).
pub const MAC: [u8; 6] = [0x06, 0xa9, 0xfe, 0xa9, 0xfe, 0x01];
/// The TCP port the service listens on.
pub const PORT: u16 = 80;
/// Connections open at once; a SYN beyond them is refused (RST).
const SOCKETS: usize = 16;
/// Frames queued in either direction; beyond, frames are dropped.
const QUEUE_FRAMES: usize = 256;
/// The largest frame taken from the guest (a GSO frame may be larger
/// than the MTU; requests are small).
const MAX_FRAME: usize = 65_550;

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;

/// Whether the Ethernet `frame` is for the service at `ip`: an ARP packet
/// whose target is `ip`, or an IPv4 packet to `ip`.
pub fn is_for(frame: &[u8], ip: Ipv4Addr) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let target = match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        // ARP for IPv4 over Ethernet: the target protocol address at 24.
        ETHERTYPE_ARP => frame.get(ETH_HEADER + 24..ETH_HEADER + 28),
        // IPv4: the destination address at 16.
        ETHERTYPE_IPV4 => frame.get(ETH_HEADER + 16..ETH_HEADER + 20),
        _ => None,
    };
    target == Some(&ip.octets()[..])
}

/// Whether the Ethernet `frame` is IPv4 from a source no answer can go
/// to: the unspecified address, broadcast or multicast. smoltcp answers
/// a SYN from 0.0.0.0 and then panics sending it (it asserts that a
/// packet's destination is specified), so such frames never reach it.
fn from_unanswerable_source(frame: &[u8]) -> bool {
    let ipv4 = frame.get(12..14) == Some(&ETHERTYPE_IPV4.to_be_bytes()[..]);
    match frame.get(ETH_HEADER + 12..ETH_HEADER + 16) {
        Some(&[a, b, c, d]) if ipv4 => {
            let src = Ipv4Addr::new(a, b, c, d);
            src.is_unspecified() || src.is_broadcast() || src.is_multicast()
        }
        _ => false,
    }
}

/// The in-memory link between the guest and the endpoint.
#[derive(Default)]
struct Link {
    /// From the guest.
    rx: VecDeque<Vec<u8>>,
    /// To the guest.
    tx: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        if self.0.len() < QUEUE_FRAMES {
            self.0.push_back(frame);
        }
        r
    }
}

impl Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        // A guest with checksum offload leaves its checksums to the
        // device: accept them unverified, as a NIC that offloads would.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps.checksum.icmpv4 = Checksum::Tx;
        caps
    }
}

/// One connection's request and answer.
#[derive(Default)]
struct Exchange {
    request: Vec<u8>,
    /// The answer not yet taken by the socket.
    answer: Vec<u8>,
    answered: bool,
}

/// The service's endpoint for one network device.
pub struct Responder {
    mmds: Arc<Mutex<Mmds>>,
    ip: Ipv4Addr,
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<(SocketHandle, Exchange)>,
    epoch: std::time::Instant,
}

impl Responder {
    /// An endpoint answering for `mmds` at its configured address.
    pub fn new(mmds: Arc<Mutex<Mmds>>) -> Self {
        let ip = mmds.lock().map(|m| m.ipv4).unwrap_or(crate::DEFAULT_IPV4);
        let mut link = Link::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MAC)));
        config.random_seed = u64::from_le_bytes(*b"capsule!");
        let mut iface = Interface::new(config, &mut link, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(ip.into(), 0));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let mut conns = Vec::new();
        for _ in 0..SOCKETS {
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; http::MAX_REQUEST]),
                tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            );
            conns.push((sockets.add(socket), Exchange::default()));
        }
        let mut r = Self {
            mmds,
            ip,
            link,
            iface,
            sockets,
            conns,
            epoch: std::time::Instant::now(),
        };
        r.service();
        r
    }

    /// The address the endpoint answers at.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Takes a frame the guest sent to the service (see [`is_for`]) and
    /// answers what it can.
    pub fn receive(&mut self, frame: &[u8]) {
        if frame.len() > MAX_FRAME || self.link.rx.len() >= QUEUE_FRAMES {
            log::debug!("mmds: dropping a {}-byte frame", frame.len());
            return;
        }
        if from_unanswerable_source(frame) {
            log::debug!("mmds: dropping a frame from an address no answer can go to");
            return;
        }
        self.link.rx.push_back(frame.to_vec());
        self.poll();
    }

    /// The next frame for the guest.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let frame = self.link.tx.pop_front();
        if frame.is_some() && self.link.tx.is_empty() {
            // The guest takes frames: let the sockets send more.
            self.poll();
        }
        frame
    }

    /// Whether frames for the guest are waiting.
    pub fn has_output(&self) -> bool {
        !self.link.tx.is_empty()
    }

    fn now(&self) -> Instant {
        Instant::from_micros(i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX))
    }

    /// Runs the endpoint until it has nothing more to do now.
    fn poll(&mut self) {
        for _ in 0..8 {
            let now = self.now();
            self.iface.poll(now, &mut self.link, &mut self.sockets);
            if !self.service() {
                break;
            }
        }
    }

    /// Reads requests, writes answers, recycles finished sockets; whether
    /// anything moved (the interface should be polled again).
    fn service(&mut self) -> bool {
        let mut moved = false;
        for (handle, ex) in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                socket.abort();
                *ex = Exchange::default();
                let _ = socket.listen(PORT);
                continue;
            }
            while socket.can_recv() && !ex.answered {
                let mut buf = [0u8; 2048];
                match socket.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => ex.request.extend_from_slice(&buf[..n]),
                }
                moved = true;
                let answer = match http::parse(&ex.request) {
                    Parsed::Incomplete => continue,
                    Parsed::Bad(status, why) => Response::error(status, why),
                    Parsed::Done(req, _) => match self.mmds.lock() {
                        Ok(mut m) => http::respond(&mut m, &req),
                        Err(_) => Response::error(500, "the data store is unavailable"),
                    },
                };
                ex.answer = answer.to_bytes();
                ex.answered = true;
            }
            if ex.answered && !ex.answer.is_empty() && socket.can_send() {
                if let Ok(n) = socket.send_slice(&ex.answer) {
                    ex.answer.drain(..n);
                    moved |= n > 0;
                }
            }
            if ex.answered && ex.answer.is_empty() && socket.may_send() {
                socket.close();
                moved = true;
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests;
