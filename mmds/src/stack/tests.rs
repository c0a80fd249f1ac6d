//! The endpoint against a guest played by a second, independent TCP/IP
//! stack (smoltcp as a client, with its own ARP and TCP), and against
//! frames no stack would send.

use super::*;
use serde_json::json;
use smoltcp::wire::Ipv4Address;

/// A guest at 169.254.1.2/16.
struct Guest {
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
}

impl Guest {
    fn new() -> Self {
        let mut link = Link::default();
        let mac = EthernetAddress([0x52, 0x54, 0, 0, 0, 2]);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(mac)),
            &mut link,
            Instant::ZERO,
        );
        // A link-local address: smoltcp, unlike Linux, takes ARP replies
        // only from its own networks.
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(Ipv4Address::new(169, 254, 1, 2).into(), 16))
                .unwrap();
        });
        let mut sockets = SocketSet::new(Vec::new());
        let socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        let handle = sockets.add(socket);
        Self {
            link,
            iface,
            sockets,
            handle,
        }
    }

    /// Sends `request` over a new connection and returns the whole answer
    /// (until the service closes), moving frames both ways.
    fn exchange(&mut self, r: &mut Responder, request: &str, port: u16) -> String {
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(self.handle)
            .connect(cx, (Ipv4Address::new(169, 254, 169, 254), PORT), port)
            .unwrap();
        let mut sent = false;
        let mut answer = Vec::new();
        for step in 0..2000 {
            let now = Instant::from_millis(step);
            self.iface.poll(now, &mut self.link, &mut self.sockets);
            while let Some(frame) = self.link.tx.pop_front() {
                if is_for(&frame, r.ip()) {
                    r.receive(&frame);
                }
            }
            while let Some(frame) = r.pop() {
                self.link.rx.push_back(frame);
            }
            let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
            if s.may_send() && !sent {
                s.send_slice(request.as_bytes()).unwrap();
                sent = true;
            }
            while s.can_recv() {
                let mut buf = [0u8; 4096];
                let n = s.recv_slice(&mut buf).unwrap();
                answer.extend_from_slice(&buf[..n]);
            }
            if sent && !s.may_recv() {
                s.close();
                for _ in 0..4 {
                    self.iface.poll(now, &mut self.link, &mut self.sockets);
                    while let Some(frame) = self.link.tx.pop_front() {
                        r.receive(&frame);
                    }
                }
                s_abort(&mut self.sockets, self.handle);
                return String::from_utf8(answer).unwrap();
            }
        }
        panic!("no answer; got {:?}", String::from_utf8_lossy(&answer));
    }
}

fn s_abort(sockets: &mut SocketSet<'static>, h: SocketHandle) {
    sockets.get_mut::<tcp::Socket>(h).abort();
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").unwrap().1
}

fn store() -> Arc<Mutex<Mmds>> {
    let mut m = Mmds::default();
    m.put(json!({"latest": {"meta-data": {"instance-id": "i-42", "big": "x".repeat(40_000)}}}))
        .unwrap();
    Arc::new(Mutex::new(m))
}

#[test]
fn a_guest_stack_gets_answers_over_arp_and_tcp() {
    let mmds = store();
    let mut r = Responder::new(mmds.clone());
    let mut g = Guest::new();
    let a = g.exchange(
        &mut r,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n",
        40000,
    );
    assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
    assert_eq!(body(&a), "i-42");
    // An answer larger than one window and many segments.
    let a = g.exchange(&mut r, "GET /latest/meta-data/big HTTP/1.1\r\n\r\n", 40001);
    assert_eq!(body(&a).len(), 40_000);
    // V2: a token first, then the GET with it; without it, 401.
    mmds.lock().unwrap().version = crate::Version::V2;
    let a = g.exchange(&mut r, "GET /latest HTTP/1.1\r\n\r\n", 40002);
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    let a = g.exchange(
        &mut r,
        "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
        40003,
    );
    let token = body(&a).to_string();
    let get =
        format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
    assert_eq!(body(&g.exchange(&mut r, &get, 40004)), "i-42");
    // Many connections in a row: sockets are recycled.
    for port in 41000..41040 {
        assert_eq!(body(&g.exchange(&mut r, &get, port)), "i-42");
    }
}

#[test]
fn only_frames_for_the_service_are_taken() {
    let ip = crate::DEFAULT_IPV4;
    let mut ipv4 = vec![0u8; 34];
    ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    ipv4[30..34].copy_from_slice(&ip.octets());
    assert!(is_for(&ipv4, ip));
    ipv4[33] ^= 1;
    assert!(!is_for(&ipv4, ip));
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    arp[38..42].copy_from_slice(&ip.octets());
    assert!(is_for(&arp, ip));
    assert!(!is_for(&arp[..40], ip));
    assert!(!is_for(&[], ip));
    let mut ipv6 = ipv4.clone();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert!(!is_for(&ipv6, ip));
}

/// Frames no stack would send (truncated, garbage, huge) are dropped
/// without a panic, and the endpoint still answers afterwards.
#[test]
fn hostile_frames_are_dropped() {
    let mut r = Responder::new(store());
    let mut seed = 0x1234_5678_u32;
    let mut rand = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for len in [0usize, 1, 13, 14, 20, 34, 42, 54, 60, 1514, MAX_FRAME + 1] {
        for _ in 0..50 {
            let mut f: Vec<u8> = (0..len).map(|_| rand().to_le_bytes()[0]).collect();
            if f.len() >= 34 {
                f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                f[30..34].copy_from_slice(&crate::DEFAULT_IPV4.octets());
                f[14] = 0x45;
            }
            r.receive(&f);
            while r.pop().is_some() {}
        }
    }
    let mut g = Guest::new();
    let a = g.exchange(
        &mut r,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n",
        40000,
    );
    assert_eq!(body(&a), "i-42");
}

/// A TCP SYN to the service's port 80 from `src`, with valid checksums.
fn syn_from(src: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 54];
    f[0..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    // IPv4: 20-byte header, 40 bytes in all, TTL 64, TCP.
    f[14..24].copy_from_slice(&[0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6]);
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&crate::DEFAULT_IPV4.octets());
    // TCP: port 40000 to 80, sequence 1000, header 20 bytes, SYN.
    f[34..38].copy_from_slice(&[0x9c, 0x40, 0, 80]);
    f[38..42].copy_from_slice(&1000u32.to_be_bytes());
    f[46..48].copy_from_slice(&[0x50, 0x02]);
    f[48..50].copy_from_slice(&64240u16.to_be_bytes());
    let mut ip = smoltcp::wire::Ipv4Packet::new_unchecked(&mut f[14..]);
    ip.fill_checksum();
    let (s, d) = (ip.src_addr(), ip.dst_addr());
    let mut tcp = smoltcp::wire::TcpPacket::new_unchecked(&mut f[34..]);
    tcp.fill_checksum(&s.into(), &d.into());
    f
}

/// Found by the `mmds` fuzz target (2026-12-05): a SYN from source
/// address 0.0.0.0 made smoltcp's interface panic on the answer (an
/// `assert!` that a packet's destination is specified), so any guest
/// could crash capsule with one frame. Frames from a source no answer can
/// go to (unspecified, broadcast, multicast) are now dropped before
/// smoltcp sees them; a SYN from a real address is still answered.
#[test]
fn a_syn_from_the_unspecified_address_does_not_panic() {
    let mut r = Responder::new(store());
    for src in [[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 1]] {
        r.receive(&syn_from(src));
        assert!(r.pop().is_none(), "an answer to {src:?}");
    }
    r.receive(&syn_from([169, 254, 1, 2]));
    assert!(r.pop().is_some(), "no answer to a SYN from 169.254.1.2");
}
