//! The VM's configuration as API actions and `--config-file` build it
//! before start (Firecracker's `VmResources`): validated piece by piece,
//! then turned into the [`VmConfig`] the builder takes. The controller
//! decides when a piece may change; this decides whether it is valid.

use std::path::PathBuf;

use super::action::VmmActionError;
use super::types::*;
use crate::config::{
    self, parse_mac, DiskCache, DiskConfig, DiskEngine, DiskMode, NetBackendConfig, NetConfig,
    VmConfig, VsockConfig,
};
use crate::snapshot::{DeviceIds, DriveId};

mod restored;

/// The Firecracker-compatible default memory size (MiB) before
/// `PUT /machine-config`.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Largest vCPU count the API accepts (Firecracker's limit).
pub const MAX_API_VCPUS: u64 = 32;

type Result<T> = std::result::Result<T, VmmActionError>;

/// The configuration so far.
pub struct VmResources {
    pub(super) machine: MachineConfig,
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    nets: Vec<NetworkInterface>,
    vsock: Option<Vsock>,
    pub(super) logger: Option<Logger>,
    pub(super) serial: Option<SerialDevice>,
    pub(super) metrics: Option<Metrics>,
    entropy: Option<EntropyDevice>,
    /// The metadata service's store (its data may change while the VM
    /// runs) and settings.
    pub(super) mmds: config::SharedMmds,
    mmds_config: Option<super::mmds::MmdsConfig>,
    pub(super) balloon: Option<super::balloon::Balloon>,
    kvm_path: PathBuf,
    direct: Option<VmConfig>,
    /// The transport when the machine configuration names none (the
    /// command line's `--transport`).
    default_transport: Option<config::Transport>,
}

impl VmResources {
    /// Firecracker's defaults (1 vCPU, 128 MiB, no kernel yet) on `kvm_path`.
    pub fn new(kvm_path: PathBuf) -> Self {
        Self {
            machine: MachineConfig {
                vcpu_count: 1,
                mem_size_mib: DEFAULT_MEM_MIB,
                smt: Some(false),
                track_dirty_pages: Some(false),
                cpu_template: None,
                huge_pages: Some("None".to_string()),
                transport: None,
            },
            boot: None,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            logger: None,
            serial: None,
            metrics: None,
            entropy: None,
            mmds: config::SharedMmds::default(),
            mmds_config: None,
            balloon: None,
            kvm_path,
            direct: None,
            default_transport: None,
        }
    }

    /// The configuration as `GET /vm/config` reports it.
    pub fn full_config(&self) -> FullVmConfig {
        FullVmConfig {
            boot_source: self.boot.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            machine_config: Some(self.machine.clone()),
            logger: self.logger.clone(),
            serial: self.serial.clone(),
            metrics: self.metrics.clone(),
            entropy: self.entropy.clone(),
            mmds_config: self.mmds_config.clone(),
            balloon: self.balloon,
            ..FullVmConfig::default()
        }
    }

    /// `PUT /machine-config`: validated, Firecracker's defaults filled in.
    pub fn set_machine(&mut self, m: MachineConfig) -> Result<()> {
        validate_machine(&m)?;
        self.machine = MachineConfig {
            smt: Some(m.smt.unwrap_or(false)),
            track_dirty_pages: Some(m.track_dirty_pages.unwrap_or(false)),
            huge_pages: Some(m.huge_pages.clone().unwrap_or_else(|| "None".into())),
            ..m
        };
        Ok(())
    }

    /// Whether the VM logs the pages it writes (for Diff snapshots).
    pub fn track_dirty_pages(&self) -> bool {
        self.machine.track_dirty_pages == Some(true)
    }

    /// `PATCH /machine-config`: the fields given replace the current
    /// ones; the result is validated as a whole.
    pub fn patch_machine(&mut self, u: MachineConfigUpdate) -> Result<()> {
        let m = self.machine.patched(u);
        validate_machine(&m)?;
        self.machine = m;
        Ok(())
    }

    /// `PUT /entropy`: the VM gets a virtio-rng device.
    pub fn set_entropy(&mut self, e: EntropyDevice) -> Result<()> {
        self.entropy = Some(e);
        Ok(())
    }

    /// `PUT /mmds/config`: the interfaces named must exist already.
    pub fn set_mmds_config(&mut self, c: super::mmds::MmdsConfig) -> Result<()> {
        super::mmds::configure(&self.mmds, &c, &self.iface_ids())?;
        self.mmds_config = Some(c);
        Ok(())
    }

    /// `PUT /balloon`: the VM gets a virtio-balloon device (a second
    /// `PUT` replaces the first).
    pub fn set_balloon(&mut self, b: super::balloon::Balloon) -> Result<()> {
        super::balloon::validate(&b, self.machine.mem_size_mib)?;
        self.balloon = Some(b);
        Ok(())
    }

    /// The drives in the guest's order: the root drive first (vda).
    fn ordered_drives(&self) -> impl Iterator<Item = &Drive> {
        let root = self.drives.iter().filter(|d| d.is_root_device);
        root.chain(self.drives.iter().filter(|d| !d.is_root_device))
    }

    /// The guest's index of drive `id`.
    pub fn drive_index(&self, id: &str) -> Option<usize> {
        self.ordered_drives().position(|d| d.drive_id == id)
    }

    /// The guest's index of network interface `id`.
    pub fn net_index(&self, id: &str) -> Option<usize> {
        self.nets.iter().position(|n| n.iface_id == id)
    }

    /// Records a `PATCH /drives/{id}` that took effect.
    pub fn patched_drive(&mut self, p: &PartialDrive) {
        if let Some(d) = self.drives.iter_mut().find(|d| d.drive_id == p.drive_id) {
            if let Some(path) = &p.path_on_host {
                d.path_on_host = Some(path.clone());
            }
            if let Some(r) = p.rate_limiter {
                d.rate_limiter = Some(r);
            }
        }
    }

    /// Records a `PATCH /network-interfaces/{id}` that took effect.
    pub fn patched_net(&mut self, p: &PartialNetworkInterface) {
        if let Some(n) = self.nets.iter_mut().find(|n| n.iface_id == p.iface_id) {
            if p.rx_rate_limiter.is_some() {
                n.rx_rate_limiter = p.rx_rate_limiter;
            }
            if p.tx_rate_limiter.is_some() {
                n.tx_rate_limiter = p.tx_rate_limiter;
            }
        }
    }

    /// `PUT /boot-source`.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<()> {
        if b.kernel_image_path.is_empty() {
            return Err(VmmActionError::Unsupported("kernel_image_path is empty"));
        }
        self.boot = Some(b);
        Ok(())
    }

    /// `PUT /drives/{id}`: validated; at most one root device.
    pub fn set_drive(&mut self, d: Drive) -> Result<()> {
        validate_drive(&d)?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|x| x.is_root_device && x.drive_id != d.drive_id)
        {
            return Err(VmmActionError::Unsupported(
                "A root block device already exists!",
            ));
        }
        match self.drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
            Some(x) => *x = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PUT /vsock`: validated (the CID's range; the socket is bound at
    /// start, so a bad path fails `InstanceStart`). A second `PUT`
    /// replaces the first, as in Firecracker.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<()> {
        vsock_config(&v)?;
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: validated.
    pub fn set_net(&mut self, n: NetworkInterface) -> Result<()> {
        if n.mtu.is_some() {
            return Err(VmmActionError::NetUnsupported(n.iface_id));
        }
        if let Some(mac) = &n.guest_mac {
            parse_mac(mac).map_err(|source| VmmActionError::NetMac {
                iface: n.iface_id.clone(),
                source,
            })?;
        }
        if n.host_dev_name.is_empty() {
            return Err(VmmActionError::NetNoHostDev(n.iface_id));
        }
        match self.nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
            Some(x) => *x = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// Uses `config` (from the command line) for the VM instead of what
    /// API requests configure; `GET /machine-config` and `GET /vm/config`
    /// report its vCPUs, memory and boot source.
    pub fn set_direct(&mut self, config: VmConfig) {
        self.set_shape(&config);
        self.boot = Some(boot_source(
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
        ));
        self.balloon = config.balloon.map(super::balloon::Balloon::from_device);
        self.direct = Some(config);
    }

    /// The machine configuration's vCPUs, memory and transport from
    /// `config`, for a VM the API's requests did not shape (its
    /// transport only when it is not the default: Firecracker's clients
    /// see Firecracker's fields).
    fn set_shape(&mut self, config: &VmConfig) {
        self.machine.vcpu_count = u64::from(config.vcpus);
        self.machine.mem_size_mib = config.mem_size >> 20;
        self.machine.transport = config.transport.filter(|t| *t != config::Transport::Mmio);
    }

    /// Records the transport the started VM is on when its machine
    /// configuration named none (capsule picked it for the kernel), so
    /// `GET /machine-config` says which; like `set_shape`, only
    /// when it is not virtio-mmio, the transport Firecracker's clients
    /// assume.
    pub fn record_transport(&mut self, t: config::Transport) {
        if self.machine.transport.is_none() && t != config::Transport::Mmio {
            self.machine.transport = Some(t);
        }
    }

    /// The transport used when the machine configuration names none
    /// (`--transport`).
    pub fn set_default_transport(&mut self, t: config::Transport) {
        self.default_transport = Some(t);
    }

    /// The network interfaces' ids, in order.
    pub fn iface_ids(&self) -> Vec<String> {
        self.nets.iter().map(|n| n.iface_id.clone()).collect()
    }

    /// The names of the drives and network interfaces, in the guest's
    /// order (for snapshots).
    pub fn device_ids(&self) -> DeviceIds {
        DeviceIds {
            drives: self
                .ordered_drives()
                .map(|d| DriveId {
                    id: d.drive_id.clone(),
                    root: d.is_root_device,
                    partuuid: d.partuuid.clone(),
                })
                .collect(),
            ifaces: self.iface_ids(),
        }
    }

    /// The KVM device.
    pub fn kvm_path(&self) -> std::path::PathBuf {
        self.kvm_path.clone()
    }

    /// The [`VmConfig`] the current configuration describes.
    pub fn vm_config(&self) -> Result<VmConfig> {
        if let Some(c) = &self.direct {
            return Ok(c.clone());
        }
        let entropy = self
            .entropy
            .as_ref()
            .map(|e| e.rate_limiter.map(|r| r.limits()).unwrap_or_default());
        let Some(boot) = &self.boot else {
            return Err(VmmActionError::NoKernel);
        };
        let ordered: Vec<&Drive> = self.ordered_drives().collect();
        Ok(VmConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            initramfs: None,
            cmdline: cmdline(boot, &ordered),
            vcpus: u8::try_from(self.machine.vcpu_count)
                .map_err(|_| VmmActionError::BadVcpuCount)?,
            mem_size: self.machine.mem_size_mib << 20,
            kvm_path: self.kvm_path.clone(),
            disks: ordered.iter().map(|d| disk_config(d)).collect(),
            nets: self
                .nets
                .iter()
                .map(|n| self.net_config(n))
                .collect::<Result<_>>()?,
            vsock: self.vsock.as_ref().map(vsock_config).transpose()?,
            fs: Vec::new(),
            entropy,
            balloon: self.balloon.map(|b| b.device_config()),
            transport: self.machine.transport.or(self.default_transport),
        })
    }

    /// The builder's view of network interface `n`: a TAP device, with
    /// the metadata service if the MMDS configuration names `n`.
    fn net_config(&self, n: &NetworkInterface) -> Result<NetConfig> {
        let mac = n.guest_mac.as_deref().map(parse_mac).transpose();
        Ok(NetConfig {
            backend: NetBackendConfig::Tap {
                name: n.host_dev_name.clone(),
            },
            mac: mac.map_err(|source| VmmActionError::NetMac {
                iface: n.iface_id.clone(),
                source,
            })?,
            rx_limits: n.rx_rate_limiter.map(|r| r.limits()).unwrap_or_default(),
            tx_limits: n.tx_rate_limiter.map(|r| r.limits()).unwrap_or_default(),
            mmds: self
                .mmds_config
                .as_ref()
                .filter(|c| c.network_interfaces.contains(&n.iface_id))
                .map(|_| self.mmds.clone()),
            vhost: false,
            tx_batch: true,
        })
    }
}

/// The kernel command line: the boot arguments (or capsule's default),
/// then the root device if the first of the `ordered` drives is the root
/// one (the guest's first disk, vda).
fn cmdline(boot: &BootSource, ordered: &[&Drive]) -> String {
    let mut cmdline = boot
        .boot_args
        .clone()
        .unwrap_or_else(|| config::DEFAULT_CMDLINE.to_string());
    if let Some(root) = ordered.first().filter(|d| d.is_root_device) {
        let ro = root.is_read_only.unwrap_or(false);
        match &root.partuuid {
            Some(u) => cmdline.push_str(&format!(" root=PARTUUID={u}")),
            None => cmdline.push_str(" root=/dev/vda"),
        }
        cmdline.push_str(if ro { " ro" } else { " rw" });
    }
    cmdline
}

/// The builder's view of drive `d`.
fn disk_config(d: &Drive) -> DiskConfig {
    DiskConfig {
        path: PathBuf::from(d.path_on_host.clone().unwrap_or_default()),
        mode: if d.is_read_only.unwrap_or(false) {
            DiskMode::ReadOnly
        } else {
            DiskMode::ReadWrite
        },
        limits: d.rate_limiter.map(|r| r.limits()).unwrap_or_default(),
        // Validated by validate_drive: absent or Writeback is
        // writeback (Firecracker's default is Unsafe).
        cache: if d.cache_type.as_deref() == Some("Unsafe") {
            DiskCache::Unsafe
        } else {
            DiskCache::Writeback
        },
        // Validated by validate_drive: Sync or Async.
        engine: if d.io_engine.as_deref() == Some("Async") {
            DiskEngine::IoUring
        } else {
            DiskEngine::Sync
        },
    }
}

/// The `PUT /boot-source` body of kernel `kernel`, initrd `initrd` and
/// command line `cmdline`.
fn boot_source(
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
) -> BootSource {
    BootSource {
        kernel_image_path: kernel.display().to_string(),
        boot_args: Some(cmdline.to_owned()),
        initrd_path: initrd.map(|p| p.display().to_string()),
    }
}

/// The builder's view of a `PUT /vsock` body.
fn vsock_config(v: &Vsock) -> Result<VsockConfig> {
    if v.uds_path.is_empty() {
        return Err(VmmActionError::Unsupported("vsock: uds_path is empty"));
    }
    let c = VsockConfig {
        guest_cid: v.guest_cid,
        uds_path: PathBuf::from(&v.uds_path),
    };
    c.validate().map_err(VmmActionError::Vsock)?;
    Ok(c)
}

fn validate_machine(m: &MachineConfig) -> Result<()> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_API_VCPUS {
        return Err(VmmActionError::VcpuCount {
            max: MAX_API_VCPUS,
            got: m.vcpu_count,
        });
    }
    let min = config::MIN_MEM_SIZE >> 20;
    if m.mem_size_mib < min || m.mem_size_mib > (1 << 30) {
        return Err(VmmActionError::MemSize {
            min,
            got: m.mem_size_mib,
        });
    }
    let unsupported = VmmActionError::Unsupported;
    if m.smt == Some(true) {
        return Err(unsupported("smt is not supported"));
    }
    if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
        return Err(unsupported("CPU templates are not supported"));
    }
    if m.huge_pages.as_deref().is_some_and(|t| t != "None") {
        return Err(unsupported("huge_pages is not supported"));
    }
    Ok(())
}

fn validate_drive(d: &Drive) -> Result<()> {
    if d.drive_id.is_empty()
        || !d
            .drive_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(VmmActionError::DriveId(d.drive_id.clone()));
    }
    let unsupported = VmmActionError::Unsupported;
    if d.socket.is_some() {
        return Err(unsupported("vhost-user drives (socket) are not supported"));
    }
    match d.path_on_host.as_deref() {
        None | Some("") => return Err(unsupported("path_on_host is required")),
        Some(_) => {}
    }
    if d.io_engine
        .as_deref()
        .is_some_and(|e| e != "Sync" && e != "Async")
    {
        return Err(unsupported("io_engine must be Sync or Async"));
    }
    if d.cache_type
        .as_deref()
        .is_some_and(|c| c != "Unsafe" && c != "Writeback")
    {
        return Err(unsupported("cache_type must be Unsafe or Writeback"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Transport;

    pub(super) fn with_kernel() -> VmResources {
        let mut r = VmResources::new("/dev/kvm".into());
        r.set_boot_source(BootSource {
            kernel_image_path: "/k".into(),
            boot_args: None,
            initrd_path: None,
        })
        .unwrap();
        r
    }

    /// The machine configuration's transport wins; without one the
    /// command line's default applies, and without that none: the builder
    /// picks one when it has read the kernel.
    #[test]
    fn the_transport_comes_from_the_machine_config_else_the_default() {
        let mut r = with_kernel();
        assert_eq!(r.vm_config().unwrap().transport, None);
        r.set_default_transport(Transport::Pci);
        assert_eq!(r.vm_config().unwrap().transport, Some(Transport::Pci));
        let mut m = r.machine.clone();
        m.transport = Some(Transport::Mmio);
        r.set_machine(m.clone()).unwrap();
        assert_eq!(r.vm_config().unwrap().transport, Some(Transport::Mmio));
        m.transport = None;
        r.set_machine(m).unwrap();
        assert_eq!(r.vm_config().unwrap().transport, Some(Transport::Pci));
        r.patch_machine(MachineConfigUpdate {
            transport: Some(Transport::Mmio),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.machine.transport, Some(Transport::Mmio));
        assert_eq!(r.vm_config().unwrap().transport, Some(Transport::Mmio));
    }

    /// A command-line VM reports its transport only when it is not the
    /// default (Firecracker's clients see Firecracker's fields).
    #[test]
    fn a_direct_config_reports_pci_only() {
        let mut r = with_kernel();
        let mut c = r.vm_config().unwrap();
        r.set_direct(c.clone());
        assert_eq!(r.machine.transport, None);
        c.transport = Some(Transport::Pci);
        r.set_direct(c);
        assert_eq!(r.machine.transport, Some(Transport::Pci));
        assert_eq!(r.vm_config().unwrap().transport, Some(Transport::Pci));
    }

    /// The transport capsule picked for a VM whose machine configuration
    /// named none is reported once it runs, virtio-pci only; one the
    /// configuration named is never replaced.
    #[test]
    fn the_picked_transport_is_reported_once_the_vm_runs() {
        let mut r = with_kernel();
        r.record_transport(Transport::Mmio);
        assert_eq!(r.machine.transport, None);
        r.record_transport(Transport::Pci);
        assert_eq!(r.machine.transport, Some(Transport::Pci));
        let mut named = with_kernel();
        named.machine.transport = Some(Transport::Mmio);
        named.record_transport(Transport::Pci);
        assert_eq!(named.machine.transport, Some(Transport::Mmio));
    }
}
