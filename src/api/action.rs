//! The typed boundary of the VMM: what can be asked of it
//! ([`VmmAction`]), what it answers ([`VmmData`]) and why it refuses
//! ([`VmmActionError`]). The HTTP server routes requests to actions and
//! turns answers into responses; `--config-file` and `--kernel` use the
//! same actions without any HTTP or JSON in between.

use std::path::PathBuf;

use super::types::*;
use crate::builder;
use crate::config::MacError;
use crate::vmm::PauseError;

/// An action for the VMM.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /serial`.
    PutSerial(SerialDevice),
    /// `PUT /snapshot/create`.
    CreateSnapshot(super::snapshot::SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(super::snapshot::SnapshotLoadParams),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /cpu-config` (refused: capsule has no CPU templates).
    PutCpuConfig,
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /mmds`.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`.
    PatchMmds(serde_json::Value),
    /// `GET /mmds`.
    GetMmds,
    /// `PUT /mmds/config`.
    PutMmdsConfig(super::mmds::MmdsConfig),
    /// `--mmds-size-limit` (no HTTP route).
    SetMmdsSizeLimit(usize),
    /// `PUT /balloon`.
    PutBalloon(super::balloon::Balloon),
    /// `PATCH /balloon`.
    PatchBalloon(super::balloon::BalloonUpdate),
    /// `GET /balloon`.
    GetBalloon,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(super::balloon::BalloonStatsUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
}

/// What an action that succeeded returns.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    /// Nothing (HTTP: 204).
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /version`.
    Version(Version),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /vm/config`.
    VmConfig(Box<FullVmConfig>),
    /// `GET /mmds`.
    Mmds(serde_json::Value),
    /// `GET /balloon`.
    Balloon(super::balloon::Balloon),
    /// `GET /balloon/statistics`.
    BalloonStats(super::balloon::BalloonStats),
}

/// Why the VMM refused or failed an action. The message is what an API
/// client gets as `fault_message` (and what `capsule run` prints).
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// A configuration action after `InstanceStart`.
    #[error("The requested operation is not supported after starting the microVM.")]
    NotAfterStart,
    /// An action that only exists for a started VM (`FlushMetrics`).
    #[error("The requested operation is not supported before starting the microVM.")]
    NotBeforeStart,
    /// An action that needs a running VM before `InstanceStart`.
    #[error("{0}")]
    NotStarted(&'static str),
    /// A configuration that capsule does not implement (or that is
    /// malformed in a way that needs no more than this sentence).
    #[error("{0}")]
    Unsupported(&'static str),
    /// An invalid `PUT /vsock` (the CID's range).
    #[error(transparent)]
    Vsock(#[from] crate::config::BadCid),
    /// A refused metadata service request.
    #[error("{0}")]
    Mmds(String),
    /// `vcpu_count` out of range.
    #[error("vcpu_count must be between 1 and {max}, not {got}")]
    VcpuCount {
        /// The largest count accepted.
        max: u64,
        /// The count asked for.
        got: u64,
    },
    /// `mem_size_mib` out of range.
    #[error("mem_size_mib must be at least {min}, not {got}")]
    MemSize {
        /// The smallest size accepted (MiB).
        min: u64,
        /// The size asked for.
        got: u64,
    },
    /// A drive id with characters other than letters, digits and `_`.
    #[error("invalid drive_id '{0}': use letters, digits and _")]
    DriveId(String),
    /// A network interface with an mtu.
    #[error("network interface {0}: mtu is not supported")]
    NetUnsupported(String),
    /// A network interface without a TAP device name.
    #[error("network interface {0}: empty host_dev_name")]
    NetNoHostDev(String),
    /// A network interface with a bad MAC address.
    #[error("network interface {iface}: {source}")]
    NetMac {
        /// The interface.
        iface: String,
        /// What is wrong with its MAC address.
        source: MacError,
    },
    /// `PUT /logger` with an unknown level.
    #[error("invalid log level '{0}'")]
    LogLevel(String),
    /// `PUT /logger`'s log file could not be opened.
    #[error("cannot open log_path {path}: {source}")]
    LogPath {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `--config-file` with sections capsule does not implement.
    #[error("capsule does not support: {}", .0.join(", "))]
    UnsupportedSections(Vec<&'static str>),
    /// `InstanceStart` without `PUT /boot-source`.
    #[error("Cannot start microvm without kernel configuration.")]
    NoKernel,
    /// `InstanceStart` after a start that failed took the console along.
    #[error("the console is gone (an earlier start failed)")]
    NoConsole,
    /// The configured vCPU count does not fit the VM.
    #[error("bad vcpu_count")]
    BadVcpuCount,
    /// `PUT /serial`'s output file could not be opened.
    #[error("cannot open serial_out_path {path}: {source}")]
    SerialOut {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Building the VM failed.
    #[error(transparent)]
    Start(#[from] builder::Error),
    /// A `PATCH` for a drive or interface the VM does not have.
    #[error("no {what} with id '{id}' in the running microVM")]
    NoSuchDevice {
        /// `drive` or `network interface`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// A drive's new image could not be used.
    #[error("drive {id}: {source}")]
    DriveSwap {
        /// The drive.
        id: String,
        /// Why.
        source: devices::virtio::block::BlockError,
    },
    /// Metrics could not be set up or written.
    #[error(transparent)]
    Metrics(#[from] super::metrics::MetricsError),
    /// Pausing or resuming failed.
    #[error(transparent)]
    Pause(#[from] PauseError),
    /// A balloon request was refused.
    #[error(transparent)]
    Balloon(#[from] super::balloon::Error),
    /// Creating or loading a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
}
