//! What a VM is made of, as the user asked for it.
//!
//! The CLI (and later the API) produce a [`VmConfig`]; the
//! [`builder`](crate::builder) turns it into a running VM.

use std::path::PathBuf;

/// Kernel command line used when the user gives none: serial console,
/// reboot through the keyboard controller, reboot one second after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;
/// Default guest memory: 256 MiB.
pub const DEFAULT_MEM_SIZE: u64 = 256 << 20;
/// Smallest guest memory capsule accepts.
pub const MIN_MEM_SIZE: u64 = 32 << 20;
/// Default KVM device.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// A generated initramfs (cpio newc) loaded right after `initrd`
    /// (`capsule exec`'s init and files).
    pub initramfs: Option<Vec<u8>>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (1..=254).
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// The KVM device to open.
    pub kvm_path: PathBuf,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in the order the guest sees them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// The virtio-vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares, each served by its own virtiofsd.
    pub fs: Vec<FsConfig>,
    /// A virtio-rng device (`PUT /entropy`), with its limits.
    pub entropy: Option<Limits>,
    /// A virtio-balloon device (`PUT /balloon`, `--balloon`).
    pub balloon: Option<devices::virtio::balloon::BalloonConfig>,
    /// How the guest reaches its virtio devices (`--transport`, the
    /// machine configuration's `transport`).
    pub transport: Transport,
}

/// How the guest reaches its virtio devices (`--transport`; `transport`
/// in `PUT /machine-config`, a capsule extension: `"mmio"` or `"pci"`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio windows announced in the DSDT (or on the command line).
    #[default]
    Mmio,
    /// Modern virtio-pci functions with MSI-X on PCI bus 0.
    Pci,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mmio => "mmio",
            Self::Pci => "pci",
        })
    }
}

/// A virtio-vsock device with Firecracker's host side: host clients
/// connect to `uds_path`, guest connections to host port P go to
/// `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more, below 2^32 - 1).
    pub guest_cid: u64,
    /// The Unix socket capsule listens on (created mode 0600).
    pub uds_path: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    /// Parses `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", n)) => {
                    cid = Some(
                        n.parse::<u64>()
                            .map_err(|_| format!("invalid vsock CID '{n}'"))?,
                    )
                }
                Some(("uds", p)) if !p.is_empty() => uds = Some(PathBuf::from(p)),
                _ => {
                    return Err(format!(
                        "unknown vsock option '{opt}' (expected cid=N,uds=PATH)"
                    ))
                }
            }
        }
        let config = Self {
            guest_cid: cid.ok_or("vsock needs cid=N")?,
            uds_path: uds.ok_or("vsock needs uds=PATH")?,
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

impl VsockConfig {
    /// Checks the CID: 0-2 are reserved (hypervisor, local, host) and
    /// Linux's CIDs are 32 bits with `u32::MAX` meaning any.
    pub fn validate(&self) -> Result<(), BadCid> {
        if !(3..u64::from(u32::MAX)).contains(&self.guest_cid) {
            return Err(BadCid(self.guest_cid));
        }
        Ok(())
    }
}

/// A vsock CID outside what a guest may have.
#[derive(Debug, thiserror::Error)]
#[error("invalid vsock CID {0} (3 to {max}; 0-2 are reserved)", max = u32::MAX - 1)]
pub struct BadCid(pub u64);

/// A host directory shared with the guest over virtio-fs (`--fs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The host directory.
    pub dir: PathBuf,
    /// The mount tag the guest names it by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// virtiofsd refuses the guest's writes.
    pub read_only: bool,
    /// Mount points under `dir` are shown to the guest as submounts
    /// (virtiofsd's default). Off for `exec --host-root`, whose share is
    /// an overlayfs lower layer: overlayfs refuses such automount points
    /// (`EREMOTE`).
    pub submounts: bool,
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    /// Parses `HOSTDIR:TAG[,ro]`. The directory may itself contain `:`;
    /// the tag is what follows the last one.
    fn from_str(s: &str) -> Result<Self, String> {
        let (spec, read_only) = match s.strip_suffix(",ro") {
            Some(spec) => (spec, true),
            None => (s, false),
        };
        let Some((dir, tag)) = spec.rsplit_once(':') else {
            return Err(format!("invalid --fs '{s}' (expected HOSTDIR:TAG[,ro])"));
        };
        if dir.is_empty() {
            return Err(format!("invalid --fs '{s}': empty host directory"));
        }
        if tag.is_empty() || tag.len() > 36 || tag.contains([',', '\0']) {
            return Err(format!(
                "invalid --fs tag '{tag}' (1 to 36 bytes, no comma; expected HOSTDIR:TAG[,ro])"
            ));
        }
        Ok(Self {
            dir: PathBuf::from(dir),
            tag: tag.to_string(),
            read_only,
            submounts: true,
        })
    }
}

pub use devices::rate_limiter::Limits;

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

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// Parses `tap=NAME[,mac=MAC][,vhost=on|off]` or
    /// `user[,publish=HOST:GUEST...][,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut opts = s.split(',');
        let first = opts.next().unwrap_or_default();
        let mut backend = match first.split_once('=') {
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
        };
        let mut mac = None;
        let mut vhost = false;
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
                        "unknown network option '{opt}' (expected mac=MAC{})",
                        if matches!(backend, NetBackendConfig::User { .. }) {
                            " or publish=HOSTPORT:GUESTPORT"
                        } else {
                            " or vhost=on|off"
                        }
                    ))
                }
            }
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
        })
    }
}

/// How a disk image is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskMode {
    /// Read-write; the image is locked exclusively.
    #[default]
    ReadWrite,
    /// Read-only for the guest; the image is locked shared.
    ReadOnly,
    /// Copy-on-write: the guest reads and writes, the image is never
    /// modified and the writes are gone when the VM ends.
    Ephemeral,
}

/// What a disk does with the guest's flushes (`,cache=` on the command
/// line, a drive's `cache_type` in the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskCache {
    /// A flush makes the data durable (`fdatasync` of the image).
    #[default]
    Writeback,
    /// A flush completes without `fdatasync`: fast, but a host crash or
    /// power loss can lose what the guest was told is on disk.
    Unsafe,
}

/// Which engine moves a disk's data (`,engine=` on the command line, a
/// drive's `io_engine` in the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskEngine {
    /// Requests one after the other on the device thread.
    #[default]
    Sync,
    /// Requests in flight together through an io_uring (the API's
    /// `"Async"`).
    IoUring,
}

/// A raw disk image for a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// How it is attached.
    pub mode: DiskMode,
    /// Limits on the guest's requests.
    pub limits: Limits,
    /// What a flush does (absent in configurations saved before it
    /// existed: writeback).
    #[serde(default)]
    pub cache: DiskCache,
    /// Which engine moves the data (absent in configurations saved before
    /// it existed: sync).
    #[serde(default)]
    pub engine: DiskEngine,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// Parses `PATH[,ro|,rw|,ephemeral][,cache=writeback|unsafe]
    /// [,engine=sync|io_uring]` (options in any order): the
    /// options are the comma-separated words at the end; a comma in a
    /// directory name (a word with a `/`) belongs to the path.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = s;
        let mut mode = None;
        let mut cache = None;
        let mut engine = None;
        while let Some((p, opt)) = path.rsplit_once(',') {
            if opt.contains('/') {
                break;
            }
            let conflict = || format!("disk option '{opt}' conflicts with a later one");
            if let Some(m) = opt.strip_prefix("cache=") {
                if cache.is_some() {
                    return Err(conflict());
                }
                cache = Some(match m {
                    "writeback" => DiskCache::Writeback,
                    "unsafe" => DiskCache::Unsafe,
                    _ => {
                        return Err(format!(
                            "unknown disk cache mode '{m}' (expected writeback or unsafe)"
                        ))
                    }
                });
            } else if let Some(e) = opt.strip_prefix("engine=") {
                if engine.is_some() {
                    return Err(conflict());
                }
                engine = Some(match e {
                    "sync" => DiskEngine::Sync,
                    "io_uring" => DiskEngine::IoUring,
                    _ => {
                        return Err(format!(
                            "unknown disk engine '{e}' (expected sync or io_uring)"
                        ))
                    }
                });
            } else {
                let m = match opt {
                    "ro" => DiskMode::ReadOnly,
                    "rw" => DiskMode::ReadWrite,
                    "ephemeral" => DiskMode::Ephemeral,
                    _ => {
                        return Err(format!(
                            "unknown disk option '{opt}' (expected ro, rw, ephemeral, cache=MODE or engine=ENGINE)"
                        ))
                    }
                };
                if mode.is_some() {
                    return Err(conflict());
                }
                mode = Some(m);
            }
            path = p;
        }
        if path.is_empty() {
            return Err("missing disk image path".to_string());
        }
        Ok(Self {
            path: PathBuf::from(path),
            mode: mode.unwrap_or_default(),
            limits: Limits::default(),
            cache: cache.unwrap_or_default(),
            engine: engine.unwrap_or_default(),
        })
    }
}

/// Errors in a size string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional unit.
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix (plain numbers are MiB)")]
    Invalid(String),
    /// Does not fit in 64 bits.
    #[error("size '{0}' is too large")]
    Overflow(String),
}

/// Parses a memory size: `512` (MiB), `512M`, `2G`, `1048576K`, `1T`, with
/// an optional `iB`/`B` after the unit, case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Invalid(s.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" | "m" => 20,
        "k" => 10,
        "g" => 30,
        "t" => 40,
        _ => return Err(SizeError::Invalid(s.to_string())),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Formats a byte count for messages: exact when it is a whole number of
/// some unit (`512 MiB`), else to one decimal (`23.5 GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, name) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            return if bytes.is_multiple_of(unit) {
                format!("{} {name}", bytes >> shift)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(matches!(parse_size(""), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("M"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("12X"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn disks() {
        let d: DiskConfig = "/img/root.ext4".parse().unwrap();
        assert_eq!(d.mode, DiskMode::ReadWrite);
        assert_eq!(d.path, PathBuf::from("/img/root.ext4"));
        let d: DiskConfig = "a.img,ro".parse().unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode),
            ("a.img", DiskMode::ReadOnly)
        );
        let d: DiskConfig = "a.img,ephemeral".parse().unwrap();
        assert_eq!(d.mode, DiskMode::Ephemeral);
        assert!("a.img,fast".parse::<DiskConfig>().is_err());
        assert!(",ro".parse::<DiskConfig>().is_err());
        assert!("".parse::<DiskConfig>().is_err());
        // A comma inside a directory name is part of the path.
        let d: DiskConfig = "/a,b/c.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/a,b/c.img"));
        assert_eq!(d.cache, DiskCache::Writeback);
    }

    #[test]
    fn disk_cache_modes() {
        let d: DiskConfig = "/dev/vdb,cache=unsafe".parse().unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode, d.cache),
            ("/dev/vdb", DiskMode::ReadWrite, DiskCache::Unsafe)
        );
        let d: DiskConfig = "a.img,ro,cache=unsafe".parse().unwrap();
        assert_eq!((d.mode, d.cache), (DiskMode::ReadOnly, DiskCache::Unsafe));
        let d: DiskConfig = "/x,y/a.img,cache=writeback,ephemeral".parse().unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode, d.cache),
            ("/x,y/a.img", DiskMode::Ephemeral, DiskCache::Writeback)
        );
        for bad in [
            "a.img,cache=none",
            "a.img,cache=",
            "a.img,cache=unsafe,cache=writeback",
            "a.img,ro,ephemeral",
            ",cache=unsafe",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let e = "a.img,cache=none".parse::<DiskConfig>().unwrap_err();
        assert!(e.contains("writeback or unsafe"), "{e}");
    }

    #[test]
    fn disk_engines() {
        let d: DiskConfig = "a.img".parse().unwrap();
        assert_eq!(d.engine, DiskEngine::Sync);
        let d: DiskConfig = "/x,y/a.img,engine=io_uring,ro,cache=unsafe"
            .parse()
            .unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode, d.cache, d.engine),
            (
                "/x,y/a.img",
                DiskMode::ReadOnly,
                DiskCache::Unsafe,
                DiskEngine::IoUring
            )
        );
        let d: DiskConfig = "a.img,engine=sync".parse().unwrap();
        assert_eq!(d.engine, DiskEngine::Sync);
        for bad in [
            "a.img,engine=aio",
            "a.img,engine=",
            "a.img,engine=io_uring,engine=sync",
            "a.img,engine=sync,engine=sync",
            ",engine=io_uring",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let e = "a.img,engine=aio".parse::<DiskConfig>().unwrap_err();
        assert!(e.contains("sync or io_uring"), "{e}");
        // Saved before the field existed.
        let d: DiskConfig = "a.img,engine=io_uring".parse().unwrap();
        let mut v = serde_json::to_value(&d).unwrap();
        assert!(v.as_object_mut().unwrap().remove("engine").is_some());
        let old: DiskConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old.engine, DiskEngine::Sync);
    }

    #[test]
    fn vsock() {
        let v: VsockConfig = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!(
            v,
            VsockConfig {
                guest_cid: 3,
                uds_path: "/run/v.sock".into()
            }
        );
        let v: VsockConfig = "uds=a,cid=4294967294".parse().unwrap();
        assert_eq!(v.guest_cid, u64::from(u32::MAX) - 1);
        for bad in [
            "",
            "cid=3",
            "uds=x",
            "cid=2,uds=x",
            "cid=0,uds=x",
            "cid=4294967295,uds=x",
            "cid=x,uds=y",
            "cid=3,uds=",
            "cid=3,uds=x,mode=1",
            "cid=-3,uds=x",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }

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
            }
        );
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

    #[test]
    fn formats() {
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(3 << 30), "3 GiB");
        assert_eq!(format_size(1536 << 10), "1.5 MiB");
        assert_eq!(format_size(2048), "2 KiB");
        assert_eq!(format_size(100), "100 bytes");
    }

    #[test]
    fn fs_shares() {
        let f: FsConfig = "/srv/a:b:tag".parse().unwrap();
        assert_eq!(
            f,
            FsConfig {
                dir: "/srv/a:b".into(),
                tag: "tag".into(),
                read_only: false,
                submounts: true,
            }
        );
        let f: FsConfig = "/x:t,ro".parse().unwrap();
        assert!(f.read_only);
        assert_eq!(f.tag, "t");
        for bad in [
            "/x",
            ":t",
            "/x:",
            "/x:a,b",
            &format!("/x:{}", "t".repeat(37)),
            "/x:t,rw",
        ] {
            assert!(bad.parse::<FsConfig>().is_err(), "{bad}");
        }
    }
}
