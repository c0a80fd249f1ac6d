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
    /// machine configuration's `transport`); `None`: capsule picks when
    /// it has read the kernel (`builder::pick_transport`): virtio-pci if
    /// the kernel image shows it can drive it, else virtio-mmio.
    pub transport: Option<Transport>,
}

#[cfg(test)]
impl VmConfig {
    /// A VM of `kernel` and nothing else: 1 vCPU, 128 MiB, no initrd,
    /// command line or device, the transport left to capsule (tests).
    pub(crate) fn bare(kernel: &str) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            initramfs: None,
            cmdline: String::new(),
            vcpus: 1,
            mem_size: 128 << 20,
            kvm_path: DEFAULT_KVM_PATH.into(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            entropy: None,
            balloon: None,
            transport: None,
        }
    }
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

pub use devices::rate_limiter::Limits;

mod disk;
mod fs;
mod net;
mod vsock;

pub use disk::{DiskCache, DiskConfig, DiskEngine, DiskMode};
pub use fs::FsConfig;
pub use net::{default_mac, parse_mac, MacAddr, MacError, NetBackendConfig, NetConfig, SharedMmds};
pub use vsock::{BadCid, VsockConfig};

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
    fn formats() {
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(3 << 30), "3 GiB");
        assert_eq!(format_size(1536 << 10), "1.5 MiB");
        assert_eq!(format_size(2048), "2 KiB");
        assert_eq!(format_size(100), "100 bytes");
    }
}
