//! The VM's state machine, driven by API requests (or a config file):
//!
//! ```text
//! NotStarted ──InstanceStart──▶ Running ◀──Resumed/Paused──▶ Paused
//!     │ (configuration requests)     └──── guest exit ────────┴──▶ (process ends)
//! ```
//!
//! Before `InstanceStart` actions fill in a configuration; `InstanceStart`
//! builds the VM with [`builder::build`] and starts it; the caller then
//! takes the running [`Vmm`] ([`Controller::take_started`]) into its run
//! loop and passes it back with each later action. Every action returns
//! after it took effect (a pause after every vCPU is parked). Nothing here
//! knows of HTTP: actions, answers and errors are typed
//! ([`super::action`]); the API server makes responses of them.

use std::fs::OpenOptions;
use std::path::PathBuf;

use super::action::{VmmAction, VmmActionError, VmmData};
use super::types::*;
use crate::builder::{self, Console};
use crate::config::{self, parse_mac, DiskConfig, DiskMode, NetBackendConfig, NetConfig, VmConfig};
use crate::vmm::Vmm;

/// The Firecracker-compatible default memory size (MiB) before
/// `PUT /machine-config`.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Largest vCPU count the API accepts (Firecracker's limit).
pub const MAX_API_VCPUS: u64 = 32;

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Configuration is still accepted.
    NotStarted,
    /// The vCPUs run.
    Running,
    /// The vCPUs are parked.
    Paused,
}

impl State {
    /// The name `GET /` reports.
    pub fn name(self) -> &'static str {
        match self {
            State::NotStarted => "Not started",
            State::Running => "Running",
            State::Paused => "Paused",
        }
    }
}

/// The VM and its configuration.
pub struct Controller {
    id: String,
    state: State,
    machine: MachineConfig,
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    nets: Vec<NetworkInterface>,
    logger: Option<Logger>,
    serial: Option<SerialDevice>,
    kvm_path: PathBuf,
    console: Option<Console>,
    /// The VM `InstanceStart` built, until the caller takes it.
    started: Option<Vmm>,
    direct: Option<VmConfig>,
}

type Result<T> = std::result::Result<T, VmmActionError>;

impl Controller {
    /// A controller with Firecracker's defaults (1 vCPU, 128 MiB). The
    /// guest console is `console` unless `PUT /serial` redirects its output.
    pub fn new(id: String, kvm_path: PathBuf, console: Console) -> Self {
        Self {
            id,
            state: State::NotStarted,
            machine: MachineConfig {
                vcpu_count: 1,
                mem_size_mib: DEFAULT_MEM_MIB,
                smt: Some(false),
                track_dirty_pages: Some(false),
                cpu_template: None,
                huge_pages: Some("None".to_string()),
            },
            boot: None,
            drives: Vec::new(),
            nets: Vec::new(),
            logger: None,
            serial: None,
            kvm_path,
            console: Some(console),
            started: None,
            direct: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The VM the last `InstanceStart` built, for the caller's run loop
    /// (which passes it back to [`Self::handle`] from then on).
    pub fn take_started(&mut self) -> Option<Vmm> {
        self.started.take()
    }

    /// Applies a whole configuration (a `--config-file`), in Firecracker's
    /// order, without starting the VM: the same actions the API takes.
    pub fn apply_config(&mut self, c: FullVmConfig) -> Result<()> {
        let unsupported = c.unsupported_sections();
        if !unsupported.is_empty() {
            return Err(VmmActionError::UnsupportedSections(unsupported));
        }
        let actions = (c.logger.map(VmmAction::PutLogger).into_iter())
            .chain(c.serial.map(VmmAction::PutSerial))
            .chain(c.machine_config.map(VmmAction::PutMachineConfig))
            .chain(c.boot_source.map(VmmAction::PutBootSource))
            .chain(c.drives.into_iter().map(VmmAction::PutDrive))
            .chain(
                c.network_interfaces
                    .into_iter()
                    .map(VmmAction::PutNetworkInterface),
            );
        for action in actions {
            self.handle(action, None)?;
        }
        Ok(())
    }

    fn full_config(&self) -> FullVmConfig {
        FullVmConfig {
            boot_source: self.boot.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            machine_config: Some(self.machine.clone()),
            logger: self.logger.clone(),
            serial: self.serial.clone(),
            ..FullVmConfig::default()
        }
    }

    fn pre_boot(&self) -> Result<()> {
        if self.state == State::NotStarted {
            Ok(())
        } else {
            Err(VmmActionError::NotAfterStart)
        }
    }

    /// Carries out one action. `vmm` is the running VM (`None` before
    /// `InstanceStart`, whose VM [`Self::take_started`] hands over).
    pub fn handle(&mut self, action: VmmAction, vmm: Option<&mut Vmm>) -> Result<VmmData> {
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                app_name: "capsule".to_string(),
                id: self.id.clone(),
                state: self.state.name().to_string(),
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            })),
            VmmAction::GetVersion => Ok(VmmData::Version(Version {
                firecracker_version: env!("CARGO_PKG_VERSION").to_string(),
            })),
            VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(self.machine.clone())),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.full_config()))),
            VmmAction::PutMachineConfig(m) => self.put_machine(m),
            VmmAction::PutBootSource(b) => self.put_boot_source(b),
            VmmAction::PutDrive(d) => self.put_drive(d),
            VmmAction::PutNetworkInterface(n) => self.put_net(n),
            VmmAction::PutLogger(l) => {
                configure_logger(&l)?;
                self.logger = Some(l);
                Ok(VmmData::Empty)
            }
            VmmAction::PutSerial(s) => {
                self.pre_boot()?;
                if s.rate_limiter.is_some() {
                    return Err(VmmActionError::Unsupported(
                        "serial rate_limiter is not supported",
                    ));
                }
                self.serial = Some(s);
                Ok(VmmData::Empty)
            }
            VmmAction::Action(ActionType::FlushMetrics) => Err(VmmActionError::Unsupported(
                "capsule has no metrics to flush (PUT /metrics is not supported)",
            )),
            VmmAction::Action(ActionType::InstanceStart) => {
                self.pre_boot()?;
                self.start()?;
                Ok(VmmData::Empty)
            }
            VmmAction::Action(ActionType::SendCtrlAltDel) => self.ctrl_alt_del(vmm),
            VmmAction::PatchVm(want) => self.pause_or_resume(vmm, want),
        }
    }

    fn put_machine(&mut self, m: MachineConfig) -> Result<VmmData> {
        self.pre_boot()?;
        validate_machine(&m)?;
        self.machine = MachineConfig {
            smt: Some(m.smt.unwrap_or(false)),
            track_dirty_pages: Some(m.track_dirty_pages.unwrap_or(false)),
            huge_pages: Some(m.huge_pages.clone().unwrap_or_else(|| "None".into())),
            ..m
        };
        Ok(VmmData::Empty)
    }

    fn put_boot_source(&mut self, b: BootSource) -> Result<VmmData> {
        self.pre_boot()?;
        if b.kernel_image_path.is_empty() {
            return Err(VmmActionError::Unsupported("kernel_image_path is empty"));
        }
        self.boot = Some(b);
        Ok(VmmData::Empty)
    }

    fn put_drive(&mut self, d: Drive) -> Result<VmmData> {
        self.pre_boot()?;
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
        Ok(VmmData::Empty)
    }

    fn put_net(&mut self, n: NetworkInterface) -> Result<VmmData> {
        self.pre_boot()?;
        if n.mtu.is_some() || n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
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
        Ok(VmmData::Empty)
    }

    fn ctrl_alt_del(&self, vmm: Option<&mut Vmm>) -> Result<VmmData> {
        let Some(vmm) = vmm.filter(|_| self.state != State::NotStarted) else {
            return Err(VmmActionError::NotStarted(
                "SendCtrlAltDel needs a started microVM",
            ));
        };
        if self.state == State::Paused {
            return Err(VmmActionError::Unsupported(
                "the microVM is paused: resume it before SendCtrlAltDel",
            ));
        }
        if !vmm.send_ctrl_alt_del() {
            return Err(VmmActionError::Unsupported(
                "the guest is not reading its keyboard (i8042 buffer full)",
            ));
        }
        Ok(VmmData::Empty)
    }

    fn pause_or_resume(&mut self, vmm: Option<&mut Vmm>, want: VmState) -> Result<VmmData> {
        let Some(vmm) = vmm else {
            return Err(VmmActionError::NotStarted(
                "the microVM is not started: cannot pause or resume it",
            ));
        };
        match want {
            VmState::Paused => {
                vmm.pause()?;
                self.state = State::Paused;
            }
            VmState::Resumed => {
                vmm.resume()?;
                self.state = State::Running;
            }
        }
        Ok(VmmData::Empty)
    }

    /// Uses `config` (from the command line) for the VM instead of what
    /// API requests configure; `GET /machine-config` and `GET /vm/config`
    /// report its vCPUs, memory and boot source.
    pub fn set_direct(&mut self, config: VmConfig) {
        self.machine.vcpu_count = u64::from(config.vcpus);
        self.machine.mem_size_mib = config.mem_size >> 20;
        self.boot = Some(BootSource {
            kernel_image_path: config.kernel.display().to_string(),
            boot_args: Some(config.cmdline.clone()),
            initrd_path: config.initrd.as_ref().map(|p| p.display().to_string()),
        });
        self.direct = Some(config);
    }

    /// The [`VmConfig`] the current configuration describes.
    pub fn vm_config(&self) -> Result<VmConfig> {
        if let Some(c) = &self.direct {
            return Ok(c.clone());
        }
        let Some(boot) = &self.boot else {
            return Err(VmmActionError::NoKernel);
        };
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| config::DEFAULT_CMDLINE.to_string());
        // The root drive is the guest's first disk (vda).
        let mut ordered: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        ordered.extend(self.drives.iter().filter(|d| !d.is_root_device));
        if let Some(root) = ordered.first().filter(|d| d.is_root_device) {
            let ro = root.is_read_only.unwrap_or(false);
            match &root.partuuid {
                Some(u) => cmdline.push_str(&format!(" root=PARTUUID={u}")),
                None => cmdline.push_str(" root=/dev/vda"),
            }
            cmdline.push_str(if ro { " ro" } else { " rw" });
        }
        let disks = ordered
            .iter()
            .map(|d| DiskConfig {
                path: PathBuf::from(d.path_on_host.clone().unwrap_or_default()),
                mode: if d.is_read_only.unwrap_or(false) {
                    DiskMode::ReadOnly
                } else {
                    DiskMode::ReadWrite
                },
            })
            .collect();
        Ok(VmConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            initramfs: None,
            cmdline,
            vcpus: u8::try_from(self.machine.vcpu_count)
                .map_err(|_| VmmActionError::BadVcpuCount)?,
            mem_size: self.machine.mem_size_mib << 20,
            kvm_path: self.kvm_path.clone(),
            disks,
            nets: self
                .nets
                .iter()
                .map(|n| {
                    let mac = n.guest_mac.as_deref().map(parse_mac).transpose();
                    Ok(NetConfig {
                        backend: NetBackendConfig::Tap {
                            name: n.host_dev_name.clone(),
                        },
                        mac: mac.map_err(|source| VmmActionError::NetMac {
                            iface: n.iface_id.clone(),
                            source,
                        })?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    fn start(&mut self) -> Result<()> {
        let config = self.vm_config()?;
        let Some(mut console) = self.console.take() else {
            return Err(VmmActionError::NoConsole);
        };
        if let Some(path) = self
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.as_ref())
        {
            match OpenOptions::new().append(true).create(true).open(path) {
                Ok(f) => console.out = Box::new(f),
                Err(source) => {
                    self.console = Some(console);
                    return Err(VmmActionError::SerialOut {
                        path: path.into(),
                        source,
                    });
                }
            }
        }
        match builder::build(&config, console) {
            Ok(vmm) => {
                self.started = Some(vmm);
                self.state = State::Running;
                log::info!("microVM started");
                Ok(())
            }
            // The console went into the failed build: a later start gets
            // stdio again.
            Err(e) => {
                self.console = Some(Console::stdio());
                Err(e.into())
            }
        }
    }
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
    if m.track_dirty_pages == Some(true) {
        return Err(unsupported("track_dirty_pages is not supported"));
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
    if d.rate_limiter.is_some() {
        return Err(unsupported("drive rate_limiter is not supported"));
    }
    match d.path_on_host.as_deref() {
        None | Some("") => return Err(unsupported("path_on_host is required")),
        Some(_) => {}
    }
    if d.io_engine.as_deref().is_some_and(|e| e != "Sync") {
        return Err(unsupported("only the Sync io_engine is supported"));
    }
    if d.cache_type
        .as_deref()
        .is_some_and(|c| c != "Unsafe" && c != "Writeback")
    {
        return Err(unsupported("cache_type must be Unsafe or Writeback"));
    }
    Ok(())
}

fn configure_logger(l: &Logger) -> Result<()> {
    let level = match &l.level {
        Some(s) => {
            crate::logger::parse_level(s).ok_or_else(|| VmmActionError::LogLevel(s.clone()))?
        }
        None => log::LevelFilter::Info,
    };
    let out = match &l.log_path {
        Some(p) => Some(
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(|source| VmmActionError::LogPath {
                    path: p.into(),
                    source,
                })?,
        ),
        None => None,
    };
    crate::logger::configure(
        crate::logger::Settings {
            level,
            show_level: l.show_level.unwrap_or(false),
            show_origin: l.show_log_origin.unwrap_or(false),
            module: l.module.clone(),
        },
        out,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl() -> Controller {
        let console = Console {
            out: Box::new(std::io::sink()),
            input: None,
            raw_terminal: false,
        };
        Controller::new("t".into(), "/nonexistent/kvm".into(), console)
    }

    /// Whether `c` accepted `a` before start.
    fn ok(c: &mut Controller, a: VmmAction) -> bool {
        c.handle(a, None).is_ok()
    }

    #[test]
    fn pre_boot_configuration() {
        let mut c = ctl();
        assert_eq!(c.state().name(), "Not started");
        let m = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        };
        assert!(ok(&mut c, VmmAction::PutMachineConfig(m.clone())));
        let bad = MachineConfig {
            vcpu_count: 0,
            ..m.clone()
        };
        assert!(matches!(
            c.handle(VmmAction::PutMachineConfig(bad), None),
            Err(VmmActionError::VcpuCount { got: 0, .. })
        ));
        let bad = MachineConfig {
            smt: Some(true),
            ..m
        };
        assert!(!ok(&mut c, VmmAction::PutMachineConfig(bad)));
        // No kernel yet.
        let e = c.handle(VmmAction::Action(ActionType::InstanceStart), None);
        assert!(matches!(e, Err(VmmActionError::NoKernel)));
        assert!(e.unwrap_err().to_string().contains("without kernel"));
        assert!(ok(
            &mut c,
            VmmAction::PutBootSource(BootSource {
                kernel_image_path: "/k".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: None,
            })
        ));
        let drive = |id: &str, root: bool| Drive {
            drive_id: id.into(),
            path_on_host: Some(format!("/{id}.img")),
            is_root_device: root,
            is_read_only: Some(!root),
            partuuid: None,
            cache_type: None,
            rate_limiter: None,
            io_engine: None,
            socket: None,
        };
        assert!(ok(&mut c, VmmAction::PutDrive(drive("data", false))));
        assert!(ok(&mut c, VmmAction::PutDrive(drive("rootfs", true))));
        assert!(!ok(&mut c, VmmAction::PutDrive(drive("other", true))));
        assert!(matches!(
            c.handle(VmmAction::PutDrive(drive("a b", false)), None),
            Err(VmmActionError::DriveId(id)) if id == "a b"
        ));
        let vm = c.vm_config().unwrap();
        assert_eq!(vm.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(vm.disks[0].path, PathBuf::from("/rootfs.img"));
        assert_eq!(vm.disks[1].mode, DiskMode::ReadOnly);
        assert_eq!((vm.vcpus, vm.mem_size), (2, 256 << 20));
        // Pause before start, Ctrl-Alt-Del before start.
        assert!(matches!(
            c.handle(VmmAction::PatchVm(VmState::Paused), None),
            Err(VmmActionError::NotStarted(_))
        ));
        assert!(!ok(&mut c, VmmAction::Action(ActionType::SendCtrlAltDel)));
        // Start fails (no KVM here): still not started, still configurable,
        // and the builder's error is kept as it is.
        assert!(matches!(
            c.handle(VmmAction::Action(ActionType::InstanceStart), None),
            Err(VmmActionError::Start(_))
        ));
        assert_eq!(c.state(), State::NotStarted);
        assert!(c.take_started().is_none());
        let Ok(VmmData::VmConfig(v)) = c.handle(VmmAction::GetVmConfig, None) else {
            panic!("GET /vm/config failed");
        };
        assert_eq!(v.boot_source.unwrap().kernel_image_path, "/k");
        assert_eq!(v.drives.len(), 2);
    }

    #[test]
    fn config_file_errors_are_the_actions_errors() {
        let mut c = ctl();
        let config: FullVmConfig = serde_json::from_str(
            r#"{"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                "guest_mac": "01:00:00:00:00:01"}]}"#,
        )
        .unwrap();
        let e = c.apply_config(config).unwrap_err();
        assert!(matches!(
            &e,
            VmmActionError::NetMac { iface, source: config::MacError::Multicast(_) }
                if iface == "eth0"
        ));
        assert!(e
            .to_string()
            .starts_with("network interface eth0: MAC address"));
        let config: FullVmConfig = serde_json::from_str(r#"{"balloon": {}}"#).unwrap();
        assert_eq!(
            c.apply_config(config).unwrap_err().to_string(),
            "capsule does not support: balloon"
        );
    }
}
