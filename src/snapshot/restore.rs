//! A new VM from a snapshot: the same machine as the one saved (memory
//! mapped from the memory file, devices attached in the same order so
//! they sit at the same addresses and interrupt lines), then every saved
//! state put back, then the vCPUs started (or left paused).

use std::path::{Path, PathBuf};

use devices::virtio::block::BlockError;

use super::{format, CpuModel, DeviceIds, Error, SnapshotState};
use crate::builder::{self, Console, Started};
use crate::config::{DiskConfig, DiskMode, NetBackendConfig, NetConfig, Transport, VmConfig};
use crate::vmm::Vmm;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::vstate::vm_state;

/// What to restore and what to change on the way.
#[derive(Debug, Clone, Default)]
pub struct RestoreConfig {
    /// The snapshot file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_path: PathBuf,
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// Start the vCPUs at once (else the VM stays paused).
    pub resume: bool,
    /// New TAP devices by interface id (the API's `network_overrides`).
    pub tap_overrides: Vec<(String, String)>,
    /// Replacement network devices, in order (the CLI's `--net`): as many
    /// as the snapshot has. A replacement without a MAC keeps the saved one.
    pub nets: Option<Vec<NetConfig>>,
    /// Replacement disks, in order (the CLI's `--disk`): as many as the
    /// snapshot has, each with the same content as the one saved.
    pub disks: Option<Vec<DiskConfig>>,
    /// For a Diff snapshot: the snapshot file and memory file of the Full
    /// snapshot it applies to.
    pub base: Option<(PathBuf, PathBuf)>,
    /// A new vsock device configuration (the CLI's `--vsock`): the guest
    /// re-reads its CID after the reset a restore sends it.
    pub vsock: Option<crate::config::VsockConfig>,
    /// A new host socket for the vsock device (the API's
    /// `vsock_override`).
    pub vsock_uds: Option<PathBuf>,
    /// Log the pages written from now on, for Diff snapshots of the
    /// restored VM (`track_dirty_pages`).
    pub track_dirty: bool,
    /// The metadata service's store that network devices saved with one
    /// answer from (the API's, so `PUT /mmds` reaches the restored VM);
    /// it takes the saved settings.
    pub mmds: crate::config::SharedMmds,
}

/// The memory a restore maps: the snapshot's memory file, or for a Diff
/// snapshot its base's, with the Diff's pages (its memory file and the
/// runs it holds) to copy on top.
struct Memory {
    file: std::fs::File,
    diff: Option<(std::fs::File, Vec<(u64, u64)>)>,
}

/// Opens memory file `path` and checks it holds `size` bytes.
fn open_memory(path: &Path, size: u64) -> Result<std::fs::File, Error> {
    let mem = crate::hostfile::open_regular(path).map_err(super::io_err(path))?;
    let found = mem.metadata().map_err(super::io_err(path))?.len();
    if found != size {
        return Err(Error::MemSize {
            path: path.to_path_buf(),
            expected: size,
            found,
        });
    }
    Ok(mem)
}

/// The memory of `state` (read from `cfg`'s snapshot, whose memory file
/// is `mem`): for a Diff snapshot, checks that `cfg.base` is its Full one.
fn memory(cfg: &RestoreConfig, state: &SnapshotState, mem: std::fs::File) -> Result<Memory, Error> {
    let mismatch = |why: String| Error::Mismatch {
        path: cfg.snapshot_path.clone(),
        why,
    };
    let (diff, (base_state, base_mem)) = match (&state.diff, &cfg.base) {
        (None, None) => return Ok(Memory { file: mem, diff: None }),
        (None, Some(_)) => {
            return Err(mismatch(
                "it is a Full snapshot: a base is only for Diff snapshots".into(),
            ))
        }
        (Some(_), None) => {
            return Err(mismatch(
                "it is a Diff snapshot: give the Full snapshot it applies to (run --restore DIR --base FULL_DIR)".into(),
            ))
        }
        (Some(d), Some(b)) => (d, b),
    };
    let base: SnapshotState = format::read(base_state)?;
    if base.diff.is_some() {
        return Err(mismatch(format!(
            "its base {} is a Diff snapshot: give the Full one",
            base_state.display()
        )));
    }
    if base.id != diff.base_id || base.mem_size != state.mem_size {
        return Err(mismatch(format!(
            "it applies to Full snapshot {:#x}, and {} is snapshot {:#x}",
            diff.base_id,
            base_state.display(),
            base.id
        )));
    }
    // The runs are checked now, before KVM and the mapping: a damaged
    // Diff is refused before anything is built.
    super::memfile::check_runs(state.mem_size, &diff.runs)
        .map_err(|e| mismatch(format!("its page list is damaged: {e}")))?;
    Ok(Memory {
        file: open_memory(base_mem, state.mem_size)?,
        diff: Some((mem, diff.runs.clone())),
    })
}

/// Copies the Diff snapshot's pages `runs` from its memory file `diff`
/// into guest memory (mapped from the base): O(pages in the Diff).
fn apply_diff(ram: &GuestRam, diff: &std::fs::File, runs: &[(u64, u64)]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;
    let mut buf = vec![0u8; 2 << 20];
    super::memfile::for_each_piece(ram.memory(), runs, |region, start, at, len| {
        for off in (0..len).step_by(buf.len()) {
            let n = arch::usize_from((len - off).min(buf.len() as u64));
            diff.read_exact_at(&mut buf[..n], at + off)?;
            region
                .write_slice(&buf[..n], vm_memory::MemoryRegionAddress(start + off))
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    })
}

/// Reads and checks the snapshot and memory files of `cfg`.
fn load(cfg: &RestoreConfig) -> Result<(SnapshotState, Memory), Error> {
    let state: SnapshotState = format::read(&cfg.snapshot_path)?;
    let mismatch = |why: String| Error::Mismatch {
        path: cfg.snapshot_path.clone(),
        why,
    };
    let count = state.vcpus.len();
    if count == 0 || u8::try_from(count).map_or(true, |n| n > arch::layout::MAX_VCPUS) {
        return Err(mismatch(format!("{count} vCPUs")));
    }
    check_transport(&state).map_err(mismatch)?;
    let host = CpuModel::host();
    if state.cpu != host {
        return Err(mismatch(format!(
            "it was taken on a {}, this host has a {host}",
            state.cpu
        )));
    }
    if state.mem_size < crate::config::MIN_MEM_SIZE {
        return Err(mismatch(format!("{} bytes of memory", state.mem_size)));
    }
    let mem = open_memory(&cfg.mem_path, state.mem_size)?;
    let memory = memory(cfg, &state, mem)?;
    Ok((state, memory))
}

/// Checks that the saved transports are those of the snapshot's devices:
/// one per device, all of the snapshot's transport (virtio-mmio
/// transports, or virtio-pci functions on a saved PCI bus).
fn check_transport(state: &SnapshotState) -> Result<(), String> {
    let rng = usize::from(state.entropy.is_some());
    let vsock = usize::from(state.vsock.is_some());
    let devices = state.disks.len() + state.nets.len() + rng + vsock;
    let functions = state.pci.as_ref().map(|p| p.functions.len());
    let (mmio, pci) = match state.transport {
        Transport::Mmio => (devices, None),
        // A VM with no virtio device has no PCI bus.
        Transport::Pci => (0, (devices > 0).then_some(devices)),
    };
    if state.transports.len() != mmio || functions != pci {
        return Err(format!(
            "{} virtio-mmio transports and {} virtio-pci functions for {} disks, {} network devices, {rng} entropy and {vsock} vsock device on {}",
            state.transports.len(),
            functions.map_or_else(|| "no PCI bus with".into(), |n| n.to_string()),
            state.disks.len(),
            state.nets.len(),
            state.transport
        ));
    }
    Ok(())
}

/// What a restore reads and checks before it opens KVM: the snapshot
/// file (and a Diff's base), the memory files' sizes, a Diff's page
/// runs, and the configuration the VM would be built with. All of it
/// comes from files a user gives, so anything in them must end in an
/// error, never a panic; the fuzz target `snapshot_file` calls this.
pub fn check(cfg: &RestoreConfig) -> Result<(SnapshotState, VmConfig), Error> {
    let (state, _memory) = load(cfg)?;
    let config = vm_config(cfg, &state)?;
    Ok((state, config))
}

/// The configuration of the restored VM: the saved one with the
/// overrides of `cfg` applied.
fn vm_config(cfg: &RestoreConfig, state: &SnapshotState) -> Result<VmConfig, Error> {
    let mismatch = |why: String| Error::Mismatch {
        path: cfg.snapshot_path.clone(),
        why,
    };
    let disks = match &cfg.disks {
        Some(d) if d.len() != state.disks.len() => {
            return Err(mismatch(format!(
                "{} --disk given; the snapshot has {} disks",
                d.len(),
                state.disks.len()
            )))
        }
        Some(d) => d.clone(),
        None => state.disks.iter().map(|d| d.config.clone()).collect(),
    };
    let mut nets: Vec<NetConfig> = match &cfg.nets {
        Some(n) if n.len() != state.nets.len() => {
            return Err(mismatch(format!(
                "{} --net given; the snapshot has {} network devices",
                n.len(),
                state.nets.len()
            )))
        }
        Some(n) => n.clone(),
        None => state
            .nets
            .iter()
            .map(|n| NetConfig {
                backend: n.backend.clone(),
                mac: None,
                rx_limits: n.rx_limits,
                tx_limits: n.tx_limits,
                mmds: None,
                vhost: false,
                tx_batch: n.tx_batch,
            })
            .collect(),
    };
    for (n, saved) in nets.iter_mut().zip(&state.nets) {
        n.mac.get_or_insert(saved.mac);
        if let Some(settings) = &saved.mmds {
            settings.apply(&cfg.mmds);
            n.mmds = Some(cfg.mmds.clone());
        }
    }
    for (iface, tap) in &cfg.tap_overrides {
        let Some(i) = state.nets.iter().position(|n| &n.iface_id == iface) else {
            return Err(mismatch(format!(
                "no network interface {iface:?} in the snapshot"
            )));
        };
        nets[i].backend = NetBackendConfig::Tap { name: tap.clone() };
    }
    Ok(VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        initramfs: None,
        cmdline: state.cmdline.clone(),
        vcpus: u8::try_from(state.vcpus.len()).map_err(|_| mismatch("too many vCPUs".into()))?,
        mem_size: state.mem_size,
        kvm_path: cfg.kvm_path.clone(),
        disks,
        nets,
        vsock: vsock_config(cfg, state)?,
        // Nor a virtio-fs share.
        fs: Vec::new(),
        entropy: state.entropy,
        // A VM with a balloon cannot be snapshotted.
        balloon: None,
        transport: Some(state.transport),
    })
}

/// The restored VM's vsock device: the saved one, or the CLI's
/// replacement, or the saved CID on the API's new socket.
fn vsock_config(
    cfg: &RestoreConfig,
    state: &SnapshotState,
) -> Result<Option<crate::config::VsockConfig>, Error> {
    let Some(saved) = &state.vsock else {
        if cfg.vsock.is_some() || cfg.vsock_uds.is_some() {
            return Err(Error::Mismatch {
                path: cfg.snapshot_path.clone(),
                why: "the snapshot has no vsock device to override".into(),
            });
        }
        return Ok(None);
    };
    Ok(Some(match (&cfg.vsock, &cfg.vsock_uds) {
        (Some(v), _) => v.clone(),
        (None, uds) => crate::config::VsockConfig {
            guest_cid: saved.device.guest_cid,
            uds_path: uds.clone().unwrap_or_else(|| saved.uds_path.clone()),
        },
    }))
}

/// A writable disk the snapshot's VM (or another clone) still holds: say
/// how clones get a disk of their own.
fn explain_lock(e: builder::Error) -> Error {
    match e {
        builder::Error::Disk(BlockError::Locked {
            path,
            exclusive: true,
        }) => Error::SharedDisk(path),
        e => e.into(),
    }
}

/// A VM restored from a snapshot, and what the snapshot names its devices.
pub struct Restored {
    /// The running (or paused) VM.
    pub vmm: Vmm,
    /// The API's names of its disks and network devices.
    pub ids: DeviceIds,
}

/// The API's names of the devices of `state`: its disks' only if it
/// names every one (a disk from the command line has no name).
fn device_ids(state: &SnapshotState) -> DeviceIds {
    DeviceIds {
        drives: state
            .disks
            .iter()
            .map(|d| d.drive.clone())
            .collect::<Option<_>>()
            .unwrap_or_default(),
        ifaces: state.nets.iter().map(|n| n.iface_id.clone()).collect(),
    }
}

/// Builds a VM from the snapshot of `cfg` with `console` as its console.
/// Its disks and network devices are the VM's for changes while it runs
/// (`Vmm::change_disk`, `Vmm::change_net`), as a booted VM's are.
pub fn restore(cfg: &RestoreConfig, console: Console) -> Result<Restored, Error> {
    let started_at = std::time::Instant::now();
    let (state, memory) = load(cfg)?;
    let config = vm_config(cfg, &state)?;
    let (vm, ram) = restored_vm(cfg, &state, &memory, &config)?;
    let mem = ram.memory();

    let (mut started, mut dm) = Started::new(console.raw_terminal)?;
    let exit = started.exit.clone();
    let mut devices = started.devices(&mut dm, &vm, mem, state.transport);
    devices.add_legacy(&exit, console)?;
    let disks = devices.add_disks(&config.disks).map_err(explain_lock)?;
    let nets = devices.add_nets(&config.nets)?;
    devices.add_entropy(config.entropy)?;
    let vsock = config
        .vsock
        .as_ref()
        .map(|v| devices.add_vsock(v))
        .transpose()?;
    let (blocks, macs) = (devices.blocks, devices.macs);

    let vcpus = restored_vcpus(&vm, &config, &state)?;
    restore_devices(cfg, &state, &dm, &blocks).map_err(|source| Error::RestoreDevice {
        path: cfg.snapshot_path.clone(),
        source,
    })?;
    if let Some(v) = &vsock {
        v.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restored();
    }
    let mut persist = builder::handles(&config, &dm, blocks, macs, None);
    persist.boot = state.boot.clone();
    let parts = builder::Parts {
        vsock,
        disks,
        nets,
        ..launch_parts(cfg, &state)
    };
    let vmm = started.launch(vm, ram, dm, vcpus, persist, parts)?;
    log::info!(
        "restored {} in {:.1} ms ({})",
        cfg.snapshot_path.display(),
        started_at.elapsed().as_secs_f64() * 1000.0,
        if cfg.resume { "running" } else { "paused" }
    );
    Ok(Restored {
        vmm,
        ids: device_ids(&state),
    })
}

/// The VM of `config` with the snapshot's memory mapped (a Diff's pages
/// copied on top) and its VM-wide state put back: no devices, no vCPUs.
fn restored_vm(
    cfg: &RestoreConfig,
    state: &SnapshotState,
    memory: &Memory,
    config: &VmConfig,
) -> Result<(Vm, GuestRam), Error> {
    builder::check_host_memory(config.mem_size)?;
    let kvm = Vm::open_kvm(&config.kvm_path).map_err(builder::Error::from)?;
    let regions = arch::memory::ram_regions(config.mem_size);
    let ram = GuestRam::from_file(&regions, &memory.file).map_err(|source| {
        builder::Error::GuestMemory {
            size: config.mem_size,
            source,
        }
    })?;
    if let Some((diff, runs)) = &memory.diff {
        apply_diff(&ram, diff, runs).map_err(super::io_err(&cfg.mem_path))?;
    }
    let vm = Vm::new(kvm, ram.memory()).map_err(builder::Error::from)?;
    vm_state::restore(vm.fd(), &state.vm).map_err(|source| Error::RestoreVm {
        path: cfg.snapshot_path.clone(),
        source,
    })?;
    Ok((vm, ram))
}

/// The vCPUs of `vm`, each with its saved state put back.
///
/// They (and their LAPICs) come before the devices' states: a device put
/// back may raise its interrupt at once (a transport's saved interrupt
/// status, the vsock device's TRANSPORT_RESET). KVM injects an irqfd's
/// interrupt from a work queue: before the vCPUs existed it had no LAPIC
/// to go to, and one restored afterwards overwrote its request register.
/// Either way the guest never heard of it: clones of an exec template
/// waited for that reset until their boot timeout, now and then (the
/// first nested run of exec_snapshot_20).
fn restored_vcpus(vm: &Vm, config: &VmConfig, state: &SnapshotState) -> Result<Vec<Vcpu>, Error> {
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in (0..config.vcpus).zip(&state.vcpus) {
        let vcpu = Vcpu::new(vm.fd(), index).map_err(builder::Error::from)?;
        vcpu.restore(saved).map_err(builder::Error::from)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// How the restored VM starts, but for its devices: paused or not, its
/// power-off watch, and the base its dirty pages are tracked against.
fn launch_parts(cfg: &RestoreConfig, state: &SnapshotState) -> builder::Parts {
    builder::Parts {
        paused: !cfg.resume,
        // A guest without ACPI powers off by halting: watched for as in
        // the VM saved.
        no_acpi: state.no_acpi(),
        // A VM restored from a Full snapshot is that snapshot but for the
        // pages it writes: the base of its Diffs.
        track_dirty: cfg
            .track_dirty
            .then(|| state.diff.is_none().then_some(state.id)),
        ..Default::default()
    }
}

/// Why a device's saved state could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The UART's.
    #[error("serial: {0}")]
    Serial(#[source] std::io::Error),
    /// The i8042's.
    #[error("i8042: {0}")]
    I8042(#[source] std::io::Error),
    /// A disk's.
    #[error("disk {index}: {source}")]
    Disk {
        /// Which disk.
        index: usize,
        /// Why.
        source: devices::virtio::block::persist::BlockRestoreError,
    },
    /// A virtio transport's (or its device's).
    #[error("virtio device {index}: {source}")]
    Transport {
        /// Which transport.
        index: usize,
        /// Why.
        source: devices::virtio::mmio::persist::RestoreError,
    },
    /// A virtio-pci function's (or its device's).
    #[error("virtio-pci function {index}: {source}")]
    Pci {
        /// Which function, in attach order.
        index: usize,
        /// Why.
        source: devices::virtio::pci::persist::PciRestoreError,
    },
    /// Not as many virtio-pci functions as saved.
    #[error("{saved} virtio-pci functions saved, {built} built")]
    PciCount {
        /// Functions in the snapshot.
        saved: usize,
        /// Functions of the restored VM.
        built: usize,
    },
    /// The snapshot names an overlay file that is not a plain file name.
    #[error("invalid overlay file name {0:?}")]
    OverlayName(String),
    /// A disk's overlay file could not be opened.
    #[error("{}: {source}", .path.display())]
    Overlay {
        /// The overlay file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Puts the saved device states back: UART, i8042, each disk (and its
/// overlay), then each transport (which re-activates its device).
fn restore_devices(
    cfg: &RestoreConfig,
    state: &SnapshotState,
    dm: &crate::device_manager::DeviceManager,
    blocks: &[std::sync::Arc<std::sync::Mutex<devices::virtio::block::Block>>],
) -> Result<(), DeviceError> {
    let serial = dm.serial.as_ref().expect("COM1 is attached");
    serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(&state.serial)
        .map_err(DeviceError::Serial)?;
    let i8042 = dm.i8042.as_ref().expect("the i8042 is attached");
    i8042
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(&state.i8042)
        .map_err(DeviceError::I8042)?;
    for (i, (block, saved)) in blocks.iter().zip(&state.disks).enumerate() {
        let overlay = match &saved.overlay_file {
            Some(name) => Some(open_overlay(&cfg.snapshot_path, name)?),
            None => None,
        };
        block
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&saved.block, overlay.as_ref())
            .map_err(|source| DeviceError::Disk { index: i, source })?;
        if saved.config.mode == DiskMode::ReadWrite && saved.block.overlay_runs.is_empty() {
            log::debug!("disk {i}: writable image reopened and locked");
        }
    }
    for (i, (t, saved)) in dm.transports.iter().zip(&state.transports).enumerate() {
        t.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(saved)
            .map_err(|source| DeviceError::Transport { index: i, source })?;
    }
    restore_pci(state, dm)
}

/// Puts back PCI bus 0 and each virtio-pci function (configuration
/// space, MSI-X with its KVM routes, common configuration), which
/// re-activates its device.
fn restore_pci(
    state: &SnapshotState,
    dm: &crate::device_manager::DeviceManager,
) -> Result<(), DeviceError> {
    let (Some(saved), Some(root)) = (&state.pci, dm.pci_root()) else {
        return Ok(());
    };
    if saved.functions.len() != dm.pci_functions.len() {
        return Err(DeviceError::PciCount {
            saved: saved.functions.len(),
            built: dm.pci_functions.len(),
        });
    }
    {
        let mut root = root.lock().unwrap_or_else(|e| e.into_inner());
        root.set_address(saved.config_address);
        root.set_probed();
    }
    for (i, (f, snap)) in dm.pci_functions.iter().zip(&saved.functions).enumerate() {
        f.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(snap)
            .map_err(|source| DeviceError::Pci { index: i, source })?;
    }
    Ok(())
}

/// Opens an overlay file named in the snapshot: a plain file name beside
/// the snapshot file, nothing else (a damaged or hostile snapshot must not
/// make capsule read any other file).
fn open_overlay(snapshot_path: &Path, name: &str) -> Result<std::fs::File, DeviceError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(DeviceError::OverlayName(name.to_owned()));
    }
    let path = snapshot_path.with_file_name(name);
    crate::hostfile::open_regular(&path).map_err(|source| DeviceError::Overlay { path, source })
}
