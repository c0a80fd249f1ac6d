//! The guest network configuration of `capsule exec --net user`: what
//! passt hands out by DHCP, computed on the host so that the init can set
//! it up at once. passt gives the guest the host's own IPv4 address and
//! prefix on the interface with the default route, and the host's default
//! gateway (connections to the gateway address reach the host itself).
//! Name servers are the host's, except loopback ones (a local resolver
//! such as systemd-resolved's 127.0.0.53 is not reachable as such).

use std::net::Ipv4Addr;

use exec_proto::NetSpec;

/// The default route's interface and gateway from `/proc/net/route` text.
pub fn default_route(route: &str) -> Option<(String, Ipv4Addr)> {
    route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (iface, dest, gw, mask) = (f.first()?, f.get(1)?, f.get(2)?, f.get(7)?);
        if *dest != "00000000" || *mask != "00000000" {
            return None;
        }
        // Host byte order (little endian on x86) hex.
        let gw = u32::from_str_radix(gw, 16).ok()?;
        Some((iface.to_string(), Ipv4Addr::from(gw.swap_bytes())))
    })
}

/// The first IPv4 address and prefix of interface `name`.
fn interface_address(name: &str) -> Option<(Ipv4Addr, u8)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut p = list;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned, which stays valid
        // until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name and, for AF_INET, sockaddr_in
        // address and mask, as getifaddrs documents.
        unsafe {
            if std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() != name.as_bytes()
                || i32::from((*ifa.ifa_addr).sa_family) != libc::AF_INET
            {
                continue;
            }
            let addr = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let mask = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
            let prefix =
                u8::try_from(u32::from_be(mask.sin_addr.s_addr).leading_ones()).unwrap_or(32);
            found = Some((Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), prefix));
            break;
        }
    }
    // SAFETY: the list getifaddrs returned, not used afterwards.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// Non-loopback `nameserver` addresses of resolv.conf text.
pub fn name_servers(resolv: &str) -> Vec<Ipv4Addr> {
    resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

/// Why the host has no configuration for passt to copy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No IPv4 default route.
    #[error("--net user: the host has no IPv4 default route for passt to copy")]
    NoDefaultRoute,
    /// The default route's interface has no IPv4 address.
    #[error("--net user: no IPv4 address on {0}")]
    NoAddress(String),
}

/// The configuration passt will hand to `eth{index}`, or why there is
/// none (passt itself then refuses to start).
pub fn user_net(index: usize) -> Result<NetSpec, Error> {
    let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let (iface, gateway) = default_route(&route).ok_or(Error::NoDefaultRoute)?;
    let (address, prefix) =
        interface_address(&iface).ok_or_else(|| Error::NoAddress(iface.clone()))?;
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    Ok(NetSpec {
        interface: format!("eth{index}"),
        address,
        prefix,
        gateway,
        dns: name_servers(&resolv),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_and_name_servers() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
captup\t004DA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
captup\t00000000\tFE4DA8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
";
        assert_eq!(
            default_route(route),
            Some(("captup".to_string(), Ipv4Addr::new(192, 168, 77, 254)))
        );
        assert_eq!(default_route("Iface\n"), None);
        let resolv =
            "# x\nnameserver 127.0.0.53\nnameserver 9.9.9.9\nnameserver bogus\nsearch lan\n";
        assert_eq!(name_servers(resolv), vec![Ipv4Addr::new(9, 9, 9, 9)]);
    }

    #[test]
    fn loopback_has_an_address() {
        assert_eq!(interface_address("lo"), Some((Ipv4Addr::LOCALHOST, 8)));
    }
}
