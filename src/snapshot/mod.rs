//! Snapshots: a paused VM written to two files, and new VMs made from them.
//!
//! * The **snapshot file** ([`format`](mod@format)) holds [`SnapshotState`]: the
//!   machine's shape (vCPU count, memory size, the host CPU model), the
//!   KVM state of the VM ([`crate::vstate::vm_state`]) and of each vCPU
//!   ([`crate::vstate::vcpu_state`]), and every device's state (UART,
//!   i8042, each virtio-mmio transport with its device's queues, each
//!   disk's own state). An `,ephemeral` disk's overlay (the guest's writes)
//!   goes to a file beside it, `<snapshot file>.<vdX>.overlay`.
//! * The **memory file** is guest RAM, the regions one after the other,
//!   sparse where a page is zero. A restore maps it `MAP_PRIVATE`
//!   ([`crate::vstate::memory::GuestRam::from_file`]): nothing is read
//!   up front, the guest's first touch of a page brings it from the page
//!   cache, and every VM restored from the same file shares the pages it
//!   has not written. The file must therefore stay unchanged while VMs
//!   made from it run.
//!
//! [`create`] saves a paused VM; [`restore::restore`] builds a new one.

mod create;
pub mod format;
mod memfile;
pub mod restore;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::legacy::persist::{I8042Snapshot, SerialSnapshot};
use devices::legacy::{SerialDevice, I8042};
use devices::pci::PciRoot;
use devices::virtio::block::persist::BlockSnapshot;
use devices::virtio::block::Block;
use devices::virtio::mmio::persist::MmioSnapshot;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::pci::persist::PciSnapshot;
use devices::virtio::pci::VirtioPci;
use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, MacAddr, NetBackendConfig, Transport, VmConfig};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::{self, VmState};
pub use create::{create, CreateStats};
pub use format::FormatError;

/// The vendor, family and model of a CPU: a snapshot only runs on a host
/// with the same (its CPUID, XSAVE layout and MSRs describe that CPU).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// CPUID vendor string, e.g. "AuthenticAMD".
    pub vendor: String,
    /// Display family.
    pub family: u32,
    /// Display model.
    pub model: u32,
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x}",
            self.vendor, self.family, self.model
        )
    }
}

impl CpuModel {
    /// This host's CPU.
    pub fn host() -> Self {
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = Vec::with_capacity(12);
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let base_family = (l1.eax >> 8) & 0xf;
        let base_model = (l1.eax >> 4) & 0xf;
        let (family, model) = if base_family == 0xf {
            (
                base_family + ((l1.eax >> 20) & 0xff),
                base_model | (((l1.eax >> 16) & 0xf) << 4),
            )
        } else if base_family == 0x6 {
            (base_family, base_model | (((l1.eax >> 16) & 0xf) << 4))
        } else {
            (base_family, base_model)
        };
        Self {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            family,
            model,
        }
    }
}

/// A disk as saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskState {
    /// The image and how it was attached.
    pub config: DiskConfig,
    /// The device's own state.
    pub block: BlockSnapshot,
    /// The overlay file's name (beside the snapshot file), if the disk
    /// had data outside its image.
    pub overlay_file: Option<String>,
    /// The API's name for it, if the API named it (absent for disks from
    /// the command line and in older snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drive: Option<DriveId>,
}

/// The API's name for a disk (`PUT /drives/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveId {
    /// Its `drive_id`.
    pub id: String,
    /// Whether it is the guest's root device (`is_root_device`).
    pub root: bool,
    /// Its `partuuid`, if it was given one (absent in older snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

/// The kernel and initrd a VM booted from. A restore opens neither (the
/// guest is in the memory file); a snapshot keeps their names so that the
/// restored VM reports them (`GET /vm/config`) and its own snapshots
/// keep them too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initrd, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
}

impl BootFiles {
    /// The files `config` boots from; `None` for a configuration that
    /// boots none (a restored VM's).
    pub fn of(config: &VmConfig) -> Option<Self> {
        (!config.kernel.as_os_str().is_empty()).then(|| Self {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
        })
    }
}

/// The API's names for a VM's disks and network devices, in the guest's
/// order. A snapshot keeps them, so that the restored VM answers
/// `PATCH /drives/{id}` and `PATCH /network-interfaces/{id}` as the VM
/// saved did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIds {
    /// One per disk, or none at all (disks from the command line have
    /// no name).
    pub drives: Vec<DriveId>,
    /// The network devices' `iface_id`s; `eth0`, ... for those beyond.
    pub ifaces: Vec<String>,
}

/// A network device as saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct NetState {
    /// The API's interface id (`eth0`, ... from the command line).
    pub iface_id: String,
    /// Its host side.
    pub backend: NetBackendConfig,
    /// Its MAC address, as the guest knows it.
    pub mac: MacAddr,
    /// The metadata service it answered for: its settings, not its data
    /// (as Firecracker: a restored VM's data is given again, so clones
    /// need not share one instance's metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<MmdsSettings>,
    /// Its limits on what the guest receives (absent in older snapshots:
    /// none).
    #[serde(default)]
    pub rx_limits: devices::rate_limiter::Limits,
    /// Its limits on what the guest sends (absent in older snapshots:
    /// none).
    #[serde(default)]
    pub tx_limits: devices::rate_limiter::Limits,
    /// Transmit batching (`tx_batch=`; absent in older snapshots: on,
    /// the default).
    #[serde(default = "batching_default")]
    pub tx_batch: bool,
}

/// [`NetState::tx_batch`] of a snapshot that does not say.
fn batching_default() -> bool {
    true
}

/// The metadata service's settings, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmdsSettings {
    /// V2 (session tokens) rather than V1.
    pub v2: bool,
    /// The guest-facing address.
    pub ipv4: std::net::Ipv4Addr,
    /// Always the IMDS text format.
    pub imds_compat: bool,
}

impl MmdsSettings {
    /// The settings of `store`.
    pub fn of(store: &crate::config::SharedMmds) -> Self {
        let m = store.0.lock().unwrap_or_else(|e| e.into_inner());
        Self {
            v2: m.version == mmds::Version::V2,
            ipv4: m.ipv4,
            imds_compat: m.imds_compat,
        }
    }

    /// Gives `store` these settings.
    pub fn apply(&self, store: &crate::config::SharedMmds) {
        let mut m = store.0.lock().unwrap_or_else(|e| e.into_inner());
        m.version = if self.v2 {
            mmds::Version::V2
        } else {
            mmds::Version::V1
        };
        m.ipv4 = self.ipv4;
        m.imds_compat = self.imds_compat;
    }
}

/// What a Diff snapshot's memory file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffMemory {
    /// The [`SnapshotState::id`] of the Full snapshot it applies to.
    pub base_id: u64,
    /// The pages it holds, as runs `(offset, length)` in bytes of the
    /// memory file (page aligned, in order): every page written since
    /// that Full snapshot, zero or not. The rest of the file is holes.
    pub runs: Vec<(u64, u64)>,
}

/// Whether to write all of guest memory or only the pages written since
/// the last Full snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// All of it.
    Full,
    /// The pages the VM's dirty log names (it must track them).
    Diff,
}

/// Everything in a snapshot file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// This snapshot's identity (a Diff names its Full base by it).
    pub id: u64,
    /// For a Diff snapshot, what its memory file holds; `None` for Full.
    pub diff: Option<DiffMemory>,
    /// The capsule that wrote it (information only: the format version
    /// decides compatibility).
    pub capsule_version: String,
    /// The CPU it was taken on.
    pub cpu: CpuModel,
    /// Guest memory in bytes (the memory file's size).
    pub mem_size: u64,
    /// The kernel command line the guest booted with (information).
    pub cmdline: String,
    /// The kernel and initrd the guest booted from (information; absent
    /// in older snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootFiles>,
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// One per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The keyboard controller.
    pub i8042: I8042Snapshot,
    /// The transport the virtio devices are on (a format-2 file, from
    /// before virtio-pci snapshots, has none: virtio-mmio).
    #[serde(default)]
    pub transport: Transport,
    /// Every virtio-mmio transport, in attach order (disks, nets, entropy,
    /// vsock); none with [`Transport::Pci`].
    pub transports: Vec<MmioSnapshot>,
    /// PCI bus 0 and its virtio functions, with [`Transport::Pci`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<PciBusState>,
    /// The disks, in order.
    pub disks: Vec<DiskState>,
    /// The network devices, in order.
    pub nets: Vec<NetState>,
    /// The virtio-rng device's limits, if the VM has one (its transport
    /// is the one after the nets').
    pub entropy: Option<devices::rate_limiter::Limits>,
    /// The virtio-vsock device, if the VM has one (its transport is the
    /// last).
    pub vsock: Option<VsockState>,
    /// Whether the guest cannot read ACPI tables (`acpi=off`, or a kernel
    /// without ACPI): it powers off by halting every vCPU, which the
    /// restored VM watches for as the saved one did. Absent in older
    /// files: see [`SnapshotState::no_acpi`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_acpi: Option<bool>,
}

impl SnapshotState {
    /// Whether the saved guest cannot read ACPI tables. An older file,
    /// which does not say, is taken at its command line's word
    /// (`acpi=off`): a kernel built without ACPI is not known from it.
    pub fn no_acpi(&self) -> bool {
        self.no_acpi
            .unwrap_or_else(|| crate::kernel_load::acpi_off(&self.cmdline))
    }
}

/// PCI bus 0 as saved (`--transport pci`).
#[derive(Debug, Serialize, Deserialize)]
pub struct PciBusState {
    /// The configuration address register (port 0xCF8).
    pub config_address: u32,
    /// Every virtio-pci function, in attach order (as `transports`).
    pub functions: Vec<PciSnapshot>,
}

/// The vsock device as saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct VsockState {
    /// The device's own state.
    pub device: devices::virtio::vsock::persist::VsockSnapshot,
    /// Its host socket (a restore binds it again unless told another).
    pub uds_path: PathBuf,
}

/// What a running VM keeps for a snapshot: its configuration and typed
/// handles to the devices whose state is saved.
pub struct Handles {
    /// The configuration it was built (or restored) with.
    pub config: VmConfig,
    /// The files it booted from (a restored VM's: as its snapshot says).
    pub boot: Option<BootFiles>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// Every virtio-mmio transport, in attach order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// PCI bus 0's configuration mechanism, with `--transport pci`.
    pub pci_root: Option<Arc<Mutex<PciRoot>>>,
    /// Every virtio-pci function, in attach order.
    pub pci_functions: Vec<Arc<Mutex<VirtioPci>>>,
    /// The disks, in order.
    pub blocks: Vec<Arc<Mutex<Block>>>,
    /// The network devices' MAC addresses, in order.
    pub macs: Vec<MacAddr>,
    /// Why this VM cannot be snapshotted, if it cannot (devices of the
    /// caller's, e.g. `capsule exec`'s console, have no saved state).
    pub unsupported: Option<&'static str>,
}

/// Why a snapshot could not be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot file is unreadable, of another version, damaged.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A file could not be written or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// This VM cannot be snapshotted.
    #[error("this VM cannot be snapshotted: {0}")]
    Unsupported(&'static str),
    /// The VM's KVM state could not be saved.
    #[error("cannot save the VM state: {0}")]
    SaveVm(#[from] vm_state::Error),
    /// The vCPUs' KVM state could not be saved.
    #[error("cannot save the VM state: {0}")]
    SaveVcpu(#[from] crate::vstate::vcpu_state::Error),
    /// A parked vCPU did not hand over its state.
    #[error("cannot save the VM state: {0}")]
    SaveVcpus(#[from] crate::vstate::vcpu::SaveError),
    /// The VM could not be paused to copy its file-mapped kernel first.
    #[error("cannot save the VM state: {0}")]
    Pause(#[from] crate::vmm::PauseError),
    /// The dirty-page log could not be read or reset.
    #[error("cannot save the VM state: {0}")]
    DirtyLog(#[from] crate::vstate::dirty::Error),
    /// The state could not be encoded.
    #[error("cannot save the VM state: {0}")]
    Encode(#[source] serde_json::Error),
    /// The memory file does not match the snapshot.
    #[error("memory file {} has {found} bytes; the snapshot's guest has {expected}", .path.display())]
    MemSize {
        /// The memory file.
        path: PathBuf,
        /// Bytes the snapshot expects.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// The snapshot is internally inconsistent or asks for something
    /// this host cannot give.
    #[error("cannot restore {}: {why}", .path.display())]
    Mismatch {
        /// The snapshot file.
        path: PathBuf,
        /// What does not fit.
        why: String,
    },
    /// The VM's saved KVM state could not be put back.
    #[error("cannot restore {}: {source}", .path.display())]
    RestoreVm {
        /// The snapshot file.
        path: PathBuf,
        /// What KVM said.
        source: vm_state::Error,
    },
    /// A device's saved state could not be put back.
    #[error("cannot restore {}: {source}", .path.display())]
    RestoreDevice {
        /// The snapshot file.
        path: PathBuf,
        /// Which device, and why.
        source: restore::DeviceError,
    },
    /// A writable disk of the snapshot is in use (by the VM it was taken
    /// of, or another clone).
    #[error("disk image {} is in use by another process: a VM restored from a snapshot needs its writable disks to itself; give each clone its own copy (--disk) or snapshot a VM whose disk is ,ephemeral", .0.display())]
    SharedDisk(PathBuf),
    /// Building the VM failed.
    #[error(transparent)]
    Build(#[from] crate::builder::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
