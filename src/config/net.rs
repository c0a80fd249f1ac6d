//! The network devices' options (`--net`, `PUT /network-interfaces`), their
//! MAC addresses and their parser.

use super::Limits;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// The host side of a network device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetBackendConfig {
    /// A host TAP device (created if missing, given CAP_NET_ADMIN).
    Tap {
        /// The interface name.
        name: String,
    },
    /// User-mode networking through passt.
    User {
        /// TCP ports forwarded to the guest: (host port, guest port).
        publish: Vec<(u16, u16)>,
    },
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Where its frames go.
    pub backend: NetBackendConfig,
    /// Its MAC address; [`default_mac`] of its index when not given.
    pub mac: Option<MacAddr>,
    /// Limits on what the guest receives.
    pub rx_limits: Limits,
    /// Limits on what the guest sends.
    pub tx_limits: Limits,
    /// The metadata service this device answers for (`PUT /mmds/config`).
    pub mmds: Option<SharedMmds>,
    /// The kernel's vhost-net moves the frames between the guest and the
    /// TAP (`vhost=on`; TAP only).
    pub vhost: bool,
    /// While the guest streams, a transmit kick waits a short window so
    /// that frames go out in batches (`tx_batch=on`, the default; see
    /// `devices/src/virtio/net/tx_batch.rs`). Not with vhost-net.
    pub tx_batch: bool,
}

/// The metadata service's store, shared by the API (which changes it)
/// and the network devices that answer the guest from it. Two are equal
/// when they are the same store.
#[derive(Debug, Clone, Default)]
pub struct SharedMmds(pub std::sync::Arc<std::sync::Mutex<mmds::Mmds>>);

impl PartialEq for SharedMmds {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedMmds {}

/// The MAC address of network device `index` when none is given: a locally
/// administered unicast address, `02:ca:75:00:HH:LL` with the index in the
/// last two bytes, so it is the same on every run.
pub fn default_mac(index: usize) -> MacAddr {
    // Wraps after 65536 devices, far past the number a VM can have.
    let [.., hi, lo] = index.to_be_bytes();
    [0x02, 0xca, 0x75, 0x00, hi, lo]
}

/// Why a MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six hex bytes.
    #[error("invalid MAC address '{0}' (expected six hex bytes like 02:00:00:00:00:01)")]
    Syntax(String),
    /// The group bit is set.
    #[error("MAC address '{0}' is a multicast address (the lowest bit of the first byte is set)")]
    Multicast(String),
    /// 00:00:00:00:00:00.
    #[error("MAC address '{0}' is all zeroes")]
    Zero(String),
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`); rejects multicast addresses.
pub fn parse_mac(s: &str) -> Result<MacAddr, MacError> {
    let bad = || MacError::Syntax(s.to_string());
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(s.to_string()));
    }
    if mac == [0; 6] {
        return Err(MacError::Zero(s.to_string()));
    }
    Ok(mac)
}

/// Parses `HOSTPORT:GUESTPORT` (or one `PORT` for both).
fn parse_publish(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "invalid port '{p}' in publish={s} (expected HOSTPORT:GUESTPORT, ports 1-65535)"
            )),
        }
    };
    match s.split_once(':') {
        Some((h, g)) => Ok((port(h)?, port(g)?)),
        None => port(s).map(|p| (p, p)),
    }
}

/// Parses the first word of `--net`: `tap=NAME` or `user`.
fn parse_backend(first: &str) -> Result<NetBackendConfig, String> {
    Ok(match first.split_once('=') {
        Some(("tap", name)) => {
            if name.is_empty()
                || name.len() > 15
                || name
                    .bytes()
                    .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
            {
                return Err(format!(
                    "invalid TAP device name '{name}' (1 to 15 characters, no '/', ':' or whitespace)"
                ));
            }
            NetBackendConfig::Tap {
                name: name.to_string(),
            }
        }
        None if first == "user" => NetBackendConfig::User {
            publish: Vec::new(),
        },
        _ => {
            return Err(format!(
                "unknown network backend '{first}' (expected tap=NAME or user)"
            ))
        }
    })
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// Parses `tap=NAME[,mac=MAC][,vhost=on|off][,tx_batch=on|off]` or
    /// `user[,publish=HOST:GUEST...][,mac=MAC][,tx_batch=on|off]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut opts = s.split(',');
        let first = opts.next().unwrap_or_default();
        let mut backend = parse_backend(first)?;
        let mut mac = None;
        let mut vhost = false;
        let mut tx_batch = None;
        for opt in opts {
            match (opt.split_once('='), &mut backend) {
                (Some(("mac", m)), _) => mac = Some(parse_mac(m).map_err(|e| e.to_string())?),
                (Some(("vhost", v)), NetBackendConfig::Tap { .. }) => {
                    vhost = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(format!("invalid vhost={v} (expected on or off)")),
                    }
                }
                (Some(("vhost", _)), NetBackendConfig::User { .. }) => {
                    return Err(
                        "vhost= needs --net tap= (passt's frames pass through capsule)".into(),
                    )
                }
                (Some(("tx_batch", v)), _) => {
                    tx_batch = Some(match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(format!("invalid tx_batch={v} (expected on or off)")),
                    })
                }
                (Some(("publish", p)), NetBackendConfig::User { publish }) => {
                    for spec in p.split('+') {
                        publish.push(parse_publish(spec)?);
                    }
                }
                (Some(("publish", _)), NetBackendConfig::Tap { .. }) => {
                    return Err(
                        "publish= needs --net user (a TAP device is reached directly)".into(),
                    )
                }
                _ => {
                    return Err(format!(
                        "unknown network option '{opt}' (expected mac=MAC, tx_batch=on|off{})",
                        if matches!(backend, NetBackendConfig::User { .. }) {
                            " or publish=HOSTPORT:GUESTPORT"
                        } else {
                            " or vhost=on|off"
                        }
                    ))
                }
            }
        }
        if vhost && tx_batch.is_some() {
            return Err(
                "tx_batch= does not apply to vhost=on (the kernel's vhost-net sends the frames)"
                    .into(),
            );
        }
        if let NetBackendConfig::User { publish } = &backend {
            let mut hosts: Vec<u16> = publish.iter().map(|p| p.0).collect();
            hosts.sort_unstable();
            if let Some(w) = hosts.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!("host port {} is published twice", w[0]));
            }
        }
        Ok(Self {
            backend,
            mac,
            rx_limits: Limits::default(),
            tx_limits: Limits::default(),
            mmds: None,
            vhost,
            tx_batch: tx_batch.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets() {
        let n: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                backend: NetBackendConfig::Tap {
                    name: "tap0".into()
                },
                mac: None,
                rx_limits: Limits::default(),
                tx_limits: Limits::default(),
                mmds: None,
                vhost: false,
                tx_batch: true,
            }
        );
        assert!(!"tap=t0,tx_batch=off".parse::<NetConfig>().unwrap().tx_batch);
        assert!("user,tx_batch=on".parse::<NetConfig>().unwrap().tx_batch);
        let n: NetConfig = "tap=t1,mac=02:00:00:00:00:aB".parse().unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 0xab]));
        assert!(!n.vhost);
        let n: NetConfig = "tap=t1,vhost=on,mac=02:00:00:00:00:01".parse().unwrap();
        assert!(n.vhost);
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(!"tap=t1,vhost=off".parse::<NetConfig>().unwrap().vhost);
        let n: NetConfig = "user".parse().unwrap();
        assert_eq!(n.backend, NetBackendConfig::User { publish: vec![] });
        let n: NetConfig = "user,publish=8080:80,publish=2222:22,mac=02-01-02-03-04-05"
            .parse()
            .unwrap();
        assert_eq!(
            n.backend,
            NetBackendConfig::User {
                publish: vec![(8080, 80), (2222, 22)]
            }
        );
        assert_eq!(n.mac, Some([2, 1, 2, 3, 4, 5]));
        let n: NetConfig = "user,publish=80+443:8443".parse().unwrap();
        assert_eq!(
            n.backend,
            NetBackendConfig::User {
                publish: vec![(80, 80), (443, 8443)]
            }
        );
        for bad in [
            "",
            "tap",
            "tap=",
            "tap=a/b",
            "tap=sixteen-chars-xx",
            "bridge=br0",
            "user,publish=0:80",
            "user,publish=70000:80",
            "user,publish=80:",
            "user,publish=80,publish=80:81",
            "tap=t0,publish=80:80",
            "tap=t0,mac=01:00:00:00:00:01",
            "tap=t0,mac=00:00:00:00:00:00",
            "tap=t0,mac=02:00:00:00:00",
            "tap=t0,mac=02:00:00:00:00:0g",
            "tap=t0,speed=10",
            "tap=t0,vhost=yes",
            "tap=t0,vhost",
            "user,vhost=on",
            "tap=t0,tx_batch=maybe",
            "tap=t0,vhost=on,tx_batch=off",
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err();
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn default_macs_are_stable_unicast_and_distinct() {
        assert_eq!(default_mac(0), [0x02, 0xca, 0x75, 0, 0, 0]);
        assert_eq!(default_mac(1), [0x02, 0xca, 0x75, 0, 0, 1]);
        assert_eq!(default_mac(300), [0x02, 0xca, 0x75, 0, 1, 44]);
        assert_eq!(default_mac(0)[0] & 1, 0);
    }
}
