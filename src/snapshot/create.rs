//! Saving a paused VM: its state (KVM's, the vCPUs', each device's, a
//! writable disk's overlay beside it) to the snapshot file, guest memory
//! (all of it, or a Diff's pages) to the memory file.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;

use super::{
    format, io_err, memfile, CpuModel, DeviceIds, DiffMemory, DiskState, Error, Kind, MmdsSettings,
    NetState, PciBusState, SnapshotState, VsockState,
};
use crate::config::DiskConfig;
use crate::vmm::Vmm;
use crate::vstate::vm_state;

/// How long the vCPUs get to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`create`] did, for the log and the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct CreateStats {
    /// Wall time.
    pub elapsed: Duration,
    /// Bytes of guest memory written (pages that are not all zero).
    pub mem_written: u64,
}

/// A new snapshot id: unique enough to tell snapshots apart (it is an
/// identity, not a secret).
fn new_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The pages a Diff snapshot of `vmm` writes, and its base.
fn diff_memory(vmm: &mut Vmm) -> Result<DiffMemory, Error> {
    let Some(log) = vmm.dirty.as_mut() else {
        return Err(Error::Unsupported(
            "a Diff snapshot needs dirty-page tracking: boot with track_dirty_pages, or restore with track_dirty_pages (run --restore DIR --track-dirty-pages)",
        ));
    };
    let Some(base_id) = log.base else {
        return Err(Error::Unsupported(
            "a Diff snapshot needs a Full snapshot of this VM to apply to: take a Full one first",
        ));
    };
    let runs = log.runs(vmm._vm.fd(), vmm.ram.memory())?;
    Ok(DiffMemory { base_id, runs })
}

/// Writes a snapshot of the paused VM `vmm`: the state to
/// `snapshot_path`, guest memory to `mem_path` (each through a temporary
/// file renamed into place): all of it, or for [`Kind::Diff`] the pages
/// written since the last Full snapshot. `ids` are the API's names of
/// the disks and network devices (the nets' are the restore's
/// `network_overrides` keys).
pub fn create(
    vmm: &mut Vmm,
    kind: Kind,
    snapshot_path: &Path,
    mem_path: &Path,
    ids: &DeviceIds,
) -> Result<CreateStats, Error> {
    let started = Instant::now();
    if let Some(why) = vmm.persist.unsupported {
        return Err(Error::Unsupported(why));
    }
    // The memory file leaves out pages never faulted in, which are zero
    // in anonymous RAM but the file's bytes in a file-mapped kernel.
    vmm.settle_kernel_map()?;
    let diff = match kind {
        Kind::Full => None,
        Kind::Diff => Some(diff_memory(vmm)?),
    };
    let id = new_id();
    let state = save_state(vmm, id, diff, snapshot_path, ids)?;
    let mem_written = match &state.diff {
        None => memfile::write_memory(&vmm.ram, mem_path)?,
        Some(d) => memfile::write_pages(&vmm.ram, mem_path, &d.runs)?,
    };
    let bytes = format::encode(&state).map_err(Error::Encode)?;
    format::write_atomic(snapshot_path, &bytes).map_err(io_err(snapshot_path))?;
    if let (Kind::Full, Some(log)) = (kind, vmm.dirty.as_mut()) {
        // This snapshot is the base of the next Diffs: they hold the
        // pages written from now on.
        log.reset(vmm._vm.fd(), vmm.ram.memory())?;
        log.base = Some(id);
    }
    let stats = CreateStats {
        elapsed: started.elapsed(),
        mem_written,
    };
    log::info!(
        "snapshot written to {} and {} in {:.1} ms ({} MiB of memory not zero)",
        snapshot_path.display(),
        mem_path.display(),
        stats.elapsed.as_secs_f64() * 1000.0,
        mem_written >> 20
    );
    Ok(stats)
}

/// The state of the paused VM `vmm` (KVM's, the vCPUs', each device's;
/// writable disks' overlays written beside `snapshot_path`), as snapshot
/// `id` with the Diff's memory `diff`, if it is one; its disks and
/// network devices named `ids`.
fn save_state(
    vmm: &Vmm,
    id: u64,
    diff: Option<DiffMemory>,
    snapshot_path: &Path,
    ids: &DeviceIds,
) -> Result<SnapshotState, Error> {
    let h = &vmm.persist;
    // Requests the io_uring engine has in flight complete first so that
    // no saved queue holds a request that was taken and not answered,
    // and no write lands after the save.
    vmm.quiesce_disks();
    let vm = vm_state::save(vmm._vm.fd())?;
    let msrs = crate::vstate::vcpu_state::msr_indices(vmm._vm.kvm())?;
    let vcpus = vmm
        .pause
        .save_states(vmm.vcpus.len(), Arc::new(msrs), SAVE_TIMEOUT)?;
    let lock = |m: &Arc<Mutex<MmioTransport>>| m.lock().unwrap_or_else(|e| e.into_inner()).save();
    let transports = h.transports.iter().map(lock).collect();
    let pci = save_pci(h);
    let disks = save_disks(h, snapshot_path, ids)?;
    let nets = net_states(h, ids);
    Ok(SnapshotState {
        id,
        diff,
        capsule_version: env!("CARGO_PKG_VERSION").to_string(),
        cpu: CpuModel::host(),
        mem_size: h.config.mem_size,
        cmdline: h.config.cmdline.clone(),
        boot: h.boot.clone(),
        vm,
        vcpus,
        serial: h.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
        i8042: h.i8042.lock().unwrap_or_else(|e| e.into_inner()).save(),
        // Always named by the time the VM runs (builder::transport).
        transport: h.config.transport.unwrap_or_default(),
        transports,
        pci,
        disks,
        nets,
        entropy: h.config.entropy,
        vsock: save_vsock(vmm),
        // The halt watch is on exactly when the guest cannot read ACPI.
        no_acpi: Some(vmm.watch_halt),
    })
}

/// The PCI bus's state (its config address, each function's), if the VM
/// has one.
fn save_pci(h: &super::Handles) -> Option<PciBusState> {
    h.pci_root.as_ref().map(|root| PciBusState {
        config_address: root.lock().unwrap_or_else(|e| e.into_inner()).address(),
        functions: h
            .pci_functions
            .iter()
            .map(|f| f.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect(),
    })
}

/// Each disk's state, in the guest's order, named as `ids` names it; a
/// writable disk's overlay is written beside `snapshot_path`.
fn save_disks(
    h: &super::Handles,
    snapshot_path: &Path,
    ids: &DeviceIds,
) -> Result<Vec<DiskState>, Error> {
    let mut disks = Vec::with_capacity(h.blocks.len());
    for (i, (block, config)) in h.blocks.iter().zip(&h.config.disks).enumerate() {
        let mut disk = save_disk(snapshot_path, i, block, config)?;
        disk.drive = ids.drives.get(i).cloned();
        disks.push(disk);
    }
    Ok(disks)
}

/// Each network device's configuration, in the guest's order, named as
/// `ids` names it (`eth<i>` where it names none).
fn net_states(h: &super::Handles, ids: &DeviceIds) -> Vec<NetState> {
    h.config
        .nets
        .iter()
        .zip(&h.macs)
        .enumerate()
        .map(|(i, (n, mac))| NetState {
            iface_id: ids
                .ifaces
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("eth{i}")),
            backend: n.backend.clone(),
            mac: *mac,
            mmds: n.mmds.as_ref().map(MmdsSettings::of),
            rx_limits: n.rx_limits,
            tx_limits: n.tx_limits,
            tx_batch: n.tx_batch,
        })
        .collect()
}

/// The vsock device's state and host socket, if the VM has one.
fn save_vsock(vmm: &Vmm) -> Option<VsockState> {
    match (&vmm.vsock, &vmm.persist.config.vsock) {
        (Some(v), Some(c)) => Some(VsockState {
            device: v.device.lock().unwrap_or_else(|e| e.into_inner()).save(),
            uds_path: c.uds_path.clone(),
        }),
        _ => None,
    }
}

/// The overlay file of disk `index` of the snapshot at `snapshot_path`.
fn overlay_name(snapshot_path: &Path, index: usize) -> String {
    let base = snapshot_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    let letter = char::from(b'a' + u8::try_from(index % 26).unwrap_or(0));
    format!("{base}.vd{letter}.overlay")
}

fn save_disk(
    snapshot_path: &Path,
    index: usize,
    block: &Arc<Mutex<Block>>,
    config: &DiskConfig,
) -> Result<DiskState, Error> {
    let name = overlay_name(snapshot_path, index);
    let path = snapshot_path.with_file_name(&name);
    let tmp = format::temp_path(&path);
    let file = format::create_private(&tmp).map_err(io_err(&tmp))?;
    let saved = block.lock().unwrap_or_else(|e| e.into_inner()).save(&file);
    let block = match saved {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
    };
    let overlay_file = if block.overlay_runs.is_empty() {
        let _ = std::fs::remove_file(&tmp);
        None
    } else {
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Some(name)
    };
    Ok(DiskState {
        config: config.clone(),
        block,
        overlay_file,
        drive: None,
    })
}
