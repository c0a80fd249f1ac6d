//! Static IPv4 set-up for `capsule exec --net user` and `--net
//! tap=NAME,ip=...`: the host computes the address, prefix and gateway
//! (for passt: what its DHCP would hand out, which the init does not wait
//! for; for a TAP: what the options say, e.g. the containerd shim's pod
//! network) and the init applies them with the classic interface and
//! route ioctls, so the command finds a working network.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use exec_proto::NetSpec;

/// How long a network interface may take to appear (a module's probe).
const APPEAR: Duration = Duration::from_secs(5);

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        // AF_INET is 2: it fits sa_family_t.
        #[expect(clippy::cast_possible_truncation, reason = "AF_INET (2) fits")]
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; every bit
    // pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// An `AF_INET` datagram socket for the ioctls, closed on drop.
struct Sock(libc::c_int);

impl Sock {
    fn new() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is the structure this request reads or writes.
        if unsafe { libc::ioctl(self.0, request as _, arg as *mut T) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn up(&self, name: &str) -> io::Result<()> {
        let mut req = ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "IFF_UP | IFF_RUNNING is 0x41"
        )]
        let flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= flags };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// The netmask of a prefix length.
fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// Whether `b` is in `a`'s subnet of `prefix` bits.
fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    (u32::from(a) ^ u32::from(b)) & mask(prefix) == 0
}

/// Adds the route to `dst`/`prefix` via `gateway`, or on `dev`'s link.
fn add_route(
    sock: &Sock,
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    dev: Option<&str>,
) -> io::Result<()> {
    // SAFETY: rtentry is plain old data; all zeroes is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(dst);
    rt.rt_genmask = sockaddr(Ipv4Addr::from(mask(prefix)));
    rt.rt_flags = libc::RTF_UP;
    if prefix == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    if let Some(gw) = gateway {
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    let dev = dev
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in an interface name"))?;
    if let Some(d) = &dev {
        // The kernel only reads the name (SIOCADDRT copies it in).
        rt.rt_dev = d.as_ptr().cast_mut();
    }
    sock.ioctl(libc::SIOCADDRT, &mut rt)
}

/// Brings up `lo` and each configured interface with its address (and
/// MTU, if given), and the first one's default route (if it has a
/// gateway).
pub fn configure(nets: &[NetSpec]) -> Result<(), String> {
    if nets.is_empty() {
        return Ok(());
    }
    let sock = Sock::new().map_err(|e| format!("network set-up: socket: {e}"))?;
    let _ = sock.up("lo");
    for (i, net) in nets.iter().enumerate() {
        let name = &net.interface;
        let err = |what: &str, e: io::Error| format!("network set-up of {name}: {what}: {e}");
        let deadline = Instant::now() + APPEAR;
        loop {
            let mut probe = ifreq(name).map_err(|e| err("name", e))?;
            match sock.ioctl(libc::SIOCGIFFLAGS, &mut probe) {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::ENODEV) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err("no such interface", e)),
            }
        }
        let mut req = ifreq(name).map_err(|e| err("name", e))?;
        req.ifr_ifru.ifru_addr = sockaddr(net.address);
        sock.ioctl(libc::SIOCSIFADDR, &mut req)
            .map_err(|e| err("address", e))?;
        req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask(net.prefix)));
        sock.ioctl(libc::SIOCSIFNETMASK, &mut req)
            .map_err(|e| err("netmask", e))?;
        if let Some(mtu) = net.mtu {
            req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
            sock.ioctl(libc::SIOCSIFMTU, &mut req)
                .map_err(|e| err("mtu", e))?;
        }
        sock.up(name).map_err(|e| err("up", e))?;
        if i == 0 && !net.gateway.is_unspecified() {
            if !same_subnet(net.address, net.gateway, net.prefix) {
                // A gateway outside the interface's subnet (a /32 pod
                // address, as some CNI plugins hand out) is reached on
                // the link: a host route to it first.
                add_route(&sock, net.gateway, 32, None, Some(name))
                    .map_err(|e| err("route to the gateway", e))?;
            }
            add_route(&sock, Ipv4Addr::UNSPECIFIED, 0, Some(net.gateway), None)
                .map_err(|e| err("default route", e))?;
        }
    }
    Ok(())
}

/// `nameserver` lines for the spec's DNS servers, or `None` without any.
pub fn resolv_conf(nets: &[NetSpec]) -> Option<String> {
    let servers: Vec<String> = nets
        .iter()
        .flat_map(|n| n.dns.iter())
        .map(|d| format!("nameserver {d}\n"))
        .collect();
    (!servers.is_empty()).then(|| servers.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_subnets() {
        assert_eq!(mask(0), 0);
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
        let a = Ipv4Addr::new(10, 88, 7, 2);
        assert!(same_subnet(a, Ipv4Addr::new(10, 88, 7, 1), 24));
        assert!(!same_subnet(a, Ipv4Addr::new(10, 88, 8, 1), 24));
        assert!(!same_subnet(a, Ipv4Addr::new(169, 254, 1, 1), 32));
        assert!(same_subnet(a, Ipv4Addr::new(169, 254, 1, 1), 0));
    }
}
