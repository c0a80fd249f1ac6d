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

pub mod format;
pub mod restore;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::persist::{I8042Snapshot, SerialSnapshot};
use devices::legacy::{SerialDevice, I8042};
use devices::virtio::block::persist::BlockSnapshot;
use devices::virtio::block::Block;
use devices::virtio::mmio::persist::MmioSnapshot;
use devices::virtio::mmio::MmioTransport;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{DiskConfig, MacAddr, NetBackendConfig, VmConfig};
use crate::vmm::Vmm;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::{self, VmState};
pub use format::FormatError;

/// How long the vCPUs get to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// One per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The keyboard controller.
    pub i8042: I8042Snapshot,
    /// Every virtio-mmio transport, in attach order (disks, nets, entropy,
    /// vsock).
    pub transports: Vec<MmioSnapshot>,
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
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// Every virtio-mmio transport, in attach order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
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
    /// The VM's or a vCPU's KVM state could not be saved.
    #[error("cannot save the VM state: {0}")]
    Save(String),
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
    let runs = log
        .runs(vmm._vm.fd(), vmm.ram.memory())
        .map_err(|e| Error::Save(e.to_string()))?;
    Ok(DiffMemory { base_id, runs })
}

/// Writes a snapshot of the paused VM `vmm`: the state to
/// `snapshot_path`, guest memory to `mem_path` (each through a temporary
/// file renamed into place): all of it, or for [`Kind::Diff`] the pages
/// written since the last Full snapshot. `iface_ids` name the network
/// devices for `network_overrides` (the API's ids; `eth0`, ... when
/// shorter).
pub fn create(
    vmm: &mut Vmm,
    kind: Kind,
    snapshot_path: &Path,
    mem_path: &Path,
    iface_ids: &[String],
) -> Result<CreateStats, Error> {
    let started = Instant::now();
    if let Some(why) = vmm.persist.unsupported {
        return Err(Error::Unsupported(why));
    }
    let diff = match kind {
        Kind::Full => None,
        Kind::Diff => Some(diff_memory(vmm)?),
    };
    let h = &vmm.persist;
    let vm = vm_state::save(vmm._vm.fd()).map_err(|e| Error::Save(e.to_string()))?;
    let msrs = crate::vstate::vcpu_state::msr_indices(vmm._vm.kvm())
        .map_err(|e| Error::Save(e.to_string()))?;
    let vcpus = vmm
        .pause
        .save_states(vmm.vcpus.len(), Arc::new(msrs), SAVE_TIMEOUT)
        .map_err(Error::Save)?;
    let lock = |m: &Arc<Mutex<MmioTransport>>| m.lock().unwrap_or_else(|e| e.into_inner()).save();
    let transports = h.transports.iter().map(lock).collect();
    let mut disks = Vec::with_capacity(h.blocks.len());
    for (i, (block, config)) in h.blocks.iter().zip(&h.config.disks).enumerate() {
        disks.push(save_disk(snapshot_path, i, block, config)?);
    }
    let nets = h
        .config
        .nets
        .iter()
        .zip(&h.macs)
        .enumerate()
        .map(|(i, (n, mac))| NetState {
            iface_id: iface_ids
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("eth{i}")),
            backend: n.backend.clone(),
            mac: *mac,
        })
        .collect();
    let id = new_id();
    let state = SnapshotState {
        id,
        diff,
        capsule_version: env!("CARGO_PKG_VERSION").to_string(),
        cpu: CpuModel::host(),
        mem_size: h.config.mem_size,
        cmdline: h.config.cmdline.clone(),
        vm,
        vcpus,
        serial: h.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
        i8042: h.i8042.lock().unwrap_or_else(|e| e.into_inner()).save(),
        transports,
        disks,
        nets,
        entropy: h.config.entropy,
        vsock: match (&vmm.vsock, &h.config.vsock) {
            (Some(v), Some(c)) => Some(VsockState {
                device: v.device.lock().unwrap_or_else(|e| e.into_inner()).save(),
                uds_path: c.uds_path.clone(),
            }),
            _ => None,
        },
    };
    let mem_written = match &state.diff {
        None => write_memory(&vmm.ram, mem_path)?,
        Some(d) => write_pages(&vmm.ram, mem_path, &d.runs)?,
    };
    let bytes = format::encode(&state).map_err(|e| Error::Save(e.to_string()))?;
    format::write_atomic(snapshot_path, &bytes).map_err(io_err(snapshot_path))?;
    if let (Kind::Full, Some(log)) = (kind, vmm.dirty.as_mut()) {
        // This snapshot is the base of the next Diffs: they hold the
        // pages written from now on.
        log.reset(vmm._vm.fd(), vmm.ram.memory())
            .map_err(|e| Error::Save(e.to_string()))?;
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
    })
}

/// Writes the `runs` (offset, length) of guest memory, the regions laid
/// one after the other, to a new memory file `path` of the full size;
/// the rest stays holes. Every page of a run is written, zero or not (a
/// page the guest zeroed must overwrite the base's). Returns the bytes
/// written.
fn write_pages(
    ram: &crate::vstate::memory::GuestRam,
    path: &Path,
    runs: &[(u64, u64)],
) -> Result<u64, Error> {
    use std::os::unix::fs::FileExt;
    let mem = ram.memory();
    let tmp = format::temp_path(path);
    let result = (|| -> std::io::Result<u64> {
        let file = format::create_private(&tmp)?;
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        file.set_len(total)?;
        let mut buf = vec![0u8; 2 << 20];
        let mut written = 0u64;
        for_each_piece(mem, runs, |region, start, at, len| {
            for off in (0..len).step_by(buf.len()) {
                let n = arch::usize_from((len - off).min(buf.len() as u64));
                region
                    .read_slice(&mut buf[..n], vm_memory::MemoryRegionAddress(start + off))
                    .map_err(std::io::Error::other)?;
                file.write_all_at(&buf[..n], at + off)?;
                written += n as u64;
            }
            Ok(())
        })?;
        file.sync_data()?;
        std::fs::rename(&tmp, path)?;
        Ok(written)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// Calls `f(region, offset in region, offset in the memory file, length)`
/// for each part of each run of `runs` (memory-file offsets, the regions
/// laid one after the other) that falls in one region. A run outside
/// guest memory is an error (a damaged Diff snapshot).
pub(crate) fn for_each_piece(
    mem: &arch::GuestMemoryMmap,
    runs: &[(u64, u64)],
    mut f: impl FnMut(&arch::GuestRegionMmap, u64, u64, u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    for &(at, len) in runs {
        let end = at.checked_add(len).filter(|&e| e <= total);
        if end.is_none() || at % PAGE as u64 != 0 || len % PAGE as u64 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("page run {at:#x}+{len:#x} is not whole pages of guest memory"),
            ));
        }
        let mut base = 0u64;
        for region in mem.iter() {
            let (lo, hi) = (at.max(base), (at + len).min(base + region.len()));
            if lo < hi {
                f(region, lo - base, lo, hi - lo)?;
            }
            base += region.len();
        }
    }
    Ok(())
}

/// Which of the `pages` pages from host address `addr` have ever been
/// written (present or swapped out, from /proc/self/pagemap). A page of
/// anonymous memory that is neither has never been touched and reads as
/// zero: reading it anyway would only fault in the zero page, which on a
/// large guest costs seconds.
fn touched_pages(pagemap: &File, addr: usize, pages: usize) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let mut raw = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut raw, (addr / PAGE) as u64 * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) & (PRESENT | SWAPPED) != 0)
        .collect())
}

/// The host page size.
const PAGE: usize = 4096;

/// Writes guest memory, region after region, to `path`; all-zero pages
/// are left as holes. Pages of anonymous RAM the guest never touched are
/// not even read. Returns the bytes written.
fn write_memory(ram: &crate::vstate::memory::GuestRam, path: &Path) -> Result<u64, Error> {
    const CHUNK: usize = 2 << 20;
    let mem = ram.memory();
    let tmp = format::temp_path(path);
    let result = (|| -> std::io::Result<u64> {
        let file = format::create_private(&tmp)?;
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        file.set_len(total)?;
        // Without pagemap (no /proc) every page is read through the
        // mapping. With it, a page never touched is zero, or for RAM
        // mapped from a memory file the file's: read from the file.
        let pagemap = File::open("/proc/self/pagemap").ok();
        let source = ram.backing_file();
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        let mut written = 0u64;
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(std::io::Error::other)? as usize;
            let mut done = 0u64;
            while done < region.len() {
                let n = arch::usize_from((region.len() - done).min(CHUNK as u64));
                let pages = n.div_ceil(PAGE);
                let touched = match &pagemap {
                    Some(pm) => touched_pages(pm, host + arch::usize_from(done), pages)?,
                    None => vec![true; pages],
                };
                let at = offset + done;
                let chunk = Chunk {
                    region,
                    start: done,
                    at,
                    source,
                };
                written += chunk.write(&file, &mut buf[..n], &touched)?;
                done += n as u64;
            }
            offset += region.len();
        }
        file.sync_data()?;
        std::fs::rename(&tmp, path)?;
        Ok(written)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// `buf.len()` bytes of guest memory: at `start` of `region`, at `at` in
/// the memory file (and in `source`, the file RAM is mapped from, if any).
struct Chunk<'a> {
    region: &'a arch::GuestRegionMmap,
    start: u64,
    at: u64,
    source: Option<&'a File>,
}

impl Chunk<'_> {
    /// Writes the chunk's pages that are not all zero to `file`, runs of
    /// pages in one write; `touched` pages are read through the mapping,
    /// the others from `source` (or are zero). Returns the bytes written.
    fn write(&self, file: &File, buf: &mut [u8], touched: &[bool]) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let n = buf.len();
        let mut written = 0u64;
        let mut i = 0;
        while i < touched.len() {
            let kind = touched[i];
            let first = i;
            while i < touched.len() && touched[i] == kind {
                i += 1;
            }
            let (lo, hi) = (first * PAGE, n.min(i * PAGE));
            match (kind, self.source) {
                (true, _) => self
                    .region
                    .read_slice(
                        &mut buf[lo..hi],
                        vm_memory::MemoryRegionAddress(self.start + lo as u64),
                    )
                    .map_err(std::io::Error::other)?,
                (false, Some(src)) => {
                    // Only the parts of the source that hold data.
                    let (from, to) = (self.at + lo as u64, self.at + hi as u64);
                    for (s, e) in data_ranges(src, from, to)? {
                        let (a, b) = (arch::usize_from(s - self.at), arch::usize_from(e - self.at));
                        src.read_exact_at(&mut buf[a..b], s)?;
                        written += write_nonzero(file, &buf[a..b], s)?;
                    }
                    continue;
                }
                (false, None) => continue,
            }
            written += write_nonzero(file, &buf[lo..hi], self.at + lo as u64)?;
        }
        Ok(written)
    }
}

/// The ranges of `[from, to)` in `file` that hold data (between its
/// holes), page aligned, from `SEEK_DATA`/`SEEK_HOLE`.
fn data_ranges(file: &File, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; it only moves the file
        // offset, which nothing else uses (every read here is positioned).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
        if r >= 0 {
            Ok(Some(r as u64))
        } else {
            match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            }
        }
    };
    let mut ranges = Vec::new();
    let mut pos = from;
    while pos < to {
        let Some(start) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= to {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        let start = start - start % PAGE as u64;
        ranges.push((start.max(from), end.next_multiple_of(PAGE as u64).min(to)));
        pos = end;
    }
    Ok(ranges)
}

/// Writes the pages of `data` that are not all zero to `file` at `at`
/// (runs of them in one write); returns the bytes written.
fn write_nonzero(file: &File, data: &[u8], at: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let mut p = 0;
    loop {
        let has_data = p < data.len() && data[p..data.len().min(p + PAGE)].iter().any(|&b| b != 0);
        match (has_data, run) {
            (true, None) => run = Some(p),
            (false, Some(s)) => {
                let end = p.min(data.len());
                file.write_all_at(&data[s..end], at + s as u64)?;
                written += (end - s) as u64;
                run = None;
            }
            _ => {}
        }
        if p >= data.len() {
            break;
        }
        p += PAGE;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    /// Runs are memory-file offsets over the regions laid end to end: one
    /// across a region boundary is split; a run off the end or not whole
    /// pages (a damaged Diff) is refused.
    #[test]
    fn page_runs_map_onto_regions_and_bad_ones_are_refused() {
        let mem = arch::GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x10_0000), 0x3000),
        ])
        .unwrap();
        let mut seen = Vec::new();
        for_each_piece(
            &mem,
            &[(0x1000, 0x2000), (0x4000, 0x1000)],
            |r, start, at, len| {
                seen.push((r.start_addr().0, start, at, len));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (0, 0x1000, 0x1000, 0x1000),
                (0x10_0000, 0, 0x2000, 0x1000),
                (0x10_0000, 0x2000, 0x4000, 0x1000),
            ]
        );
        for bad in [
            (0x4000, 0x2000),
            (0x800, 0x1000),
            (0, 0x10),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            let e = for_each_piece(&mem, &[bad], |_, _, _, _| Ok(())).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{bad:x?}");
        }
    }
}
