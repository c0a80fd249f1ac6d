//! The guest network configuration of `capsule exec --net user`: what
//! passt hands out by DHCP, computed on the host so that the init can set
//! it up at once. passt gives the guest the host's own IPv4 address and
//! prefix on the interface with the default route, and the host's default
//! gateway (connections to the gateway address reach the host itself).
//! Name servers are the host's, except loopback ones (a local resolver
//! such as systemd-resolved's 127.0.0.53 is not reachable as such).

use std::net::Ipv4Addr;

use exec_proto::NetSpec;

use crate::config::{NetBackendConfig, NetConfig};

/// A static IPv4 configuration the guest init gives a `--net tap=` device
/// (`ip=ADDR/PREFIX[,gw=GATEWAY][,mtu=N]`): what the containerd shim
/// passes for a pod's network, which has no DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapIpv4 {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its prefix length (0 to 32).
    pub prefix: u8,
    /// The default gateway (`None`: no default route).
    pub gateway: Option<Ipv4Addr>,
    /// The interface's MTU (`None`: the driver's 1500).
    pub mtu: Option<u16>,
}

impl TapIpv4 {
    /// The init's record for interface `eth{index}`.
    pub fn spec(&self, index: usize) -> NetSpec {
        NetSpec {
            interface: format!("eth{index}"),
            address: self.address,
            prefix: self.prefix,
            gateway: self.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED),
            dns: Vec::new(),
            mtu: self.mtu,
        }
    }
}

/// A `capsule exec --net` value: a network device as `run` takes it and,
/// for a TAP, an optional static IPv4 configuration for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecNet {
    /// The device.
    pub net: NetConfig,
    /// `ip=`, `gw=`, `mtu=` of a `tap=` device.
    pub ipv4: Option<TapIpv4>,
}

/// Parses `A.B.C.D/P`.
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("invalid ip={s} (expected an IPv4 ADDRESS/PREFIX like 10.88.0.2/24)");
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let address: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    if address.is_unspecified() || address.is_multicast() || address.is_broadcast() {
        return Err(format!(
            "invalid ip={s} (not a unicast address a guest can have)"
        ));
    }
    Ok((address, prefix))
}

impl std::str::FromStr for ExecNet {
    type Err = String;

    /// Parses what `NetConfig` takes, plus `ip=ADDR/PREFIX`, `gw=ADDR`
    /// and `mtu=N` (68 to 65535) after `tap=NAME`; `gw=` and `mtu=` need
    /// `ip=`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut rest = Vec::new();
        let (mut ip, mut gw, mut mtu) = (None, None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("ip", v)) => ip = Some(parse_cidr(v)?),
                Some(("gw", v)) => {
                    let g: Ipv4Addr = v.parse().map_err(|_| {
                        format!("invalid gw={v} (expected an IPv4 address like 10.88.0.1)")
                    })?;
                    if g.is_unspecified() || g.is_multicast() || g.is_broadcast() {
                        return Err(format!("invalid gw={v} (not a unicast address)"));
                    }
                    gw = Some(g);
                }
                Some(("mtu", v)) => {
                    mtu = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|m| *m >= 68)
                            .ok_or_else(|| format!("invalid mtu={v} (expected 68 to 65535)"))?,
                    );
                }
                _ => rest.push(opt),
            }
        }
        let net: NetConfig = rest.join(",").parse()?;
        let ipv4 = match (ip, &net.backend) {
            (None, _) if gw.is_some() || mtu.is_some() => {
                return Err("gw= and mtu= need ip=ADDRESS/PREFIX".into())
            }
            (None, _) => None,
            (Some(_), NetBackendConfig::User { .. }) => {
                return Err(
                    "ip= needs --net tap= (passt's network is configured from the host's)".into(),
                )
            }
            (Some((address, prefix)), NetBackendConfig::Tap { .. }) => {
                if gw == Some(address) {
                    return Err(format!("gw={address} is the guest's own address"));
                }
                Some(TapIpv4 {
                    address,
                    prefix,
                    gateway: gw,
                    mtu,
                })
            }
        };
        Ok(Self { net, ipv4 })
    }
}

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
        mtu: None,
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
    fn tap_with_a_static_address() {
        let n: ExecNet = "tap=capsule0,mac=02:00:00:00:00:07,ip=10.88.7.2/24,gw=10.88.7.1,mtu=1450"
            .parse()
            .unwrap();
        assert_eq!(n.net.mac, Some([2, 0, 0, 0, 0, 7]));
        let ip = n.ipv4.unwrap();
        assert_eq!(
            ip,
            TapIpv4 {
                address: Ipv4Addr::new(10, 88, 7, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 88, 7, 1)),
                mtu: Some(1450),
            }
        );
        let spec = ip.spec(0);
        assert_eq!(spec.interface, "eth0");
        assert_eq!(spec.gateway, Ipv4Addr::new(10, 88, 7, 1));
        assert_eq!(spec.mtu, Some(1450));
        // No gateway: no default route (0.0.0.0 in the init's record).
        let n: ExecNet = "tap=t0,ip=10.0.0.5/32".parse().unwrap();
        assert_eq!(n.ipv4.unwrap().spec(1).gateway, Ipv4Addr::UNSPECIFIED);
        // What `run` takes is unchanged.
        let n: ExecNet = "user,publish=80".parse().unwrap();
        assert_eq!(n.ipv4, None);
        for bad in [
            "tap=t0,ip=10.0.0.5",
            "tap=t0,ip=10.0.0.5/33",
            "tap=t0,ip=10.0.0/24",
            "tap=t0,ip=0.0.0.0/0",
            "tap=t0,ip=224.0.0.1/4",
            "tap=t0,ip=10.0.0.2/24,gw=x",
            "tap=t0,ip=10.0.0.2/24,gw=10.0.0.2",
            "tap=t0,ip=10.0.0.2/24,gw=255.255.255.255",
            "tap=t0,ip=10.0.0.2/24,mtu=67",
            "tap=t0,ip=10.0.0.2/24,mtu=65536",
            "tap=t0,ip=10.0.0.2/24,mtu=",
            "tap=t0,gw=10.0.0.1",
            "tap=t0,mtu=1500",
            "user,ip=10.0.0.2/24",
            "tap=t0,ip=10.0.0.2/24,speed=1",
        ] {
            let e = bad.parse::<ExecNet>().unwrap_err();
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn loopback_has_an_address() {
        assert_eq!(interface_address("lo"), Some((Ipv4Addr::LOCALHOST, 8)));
    }
}
