//! The VM's state machine, driven by API requests (or a config file):
//!
//! ```text
//! NotStarted ──InstanceStart──▶ Running ◀──Resumed/Paused──▶ Paused
//!     │ (configuration requests)     └──── guest exit ────────┴──▶ (process ends)
//! ```
//!
//! Before `InstanceStart` requests fill in a configuration; `InstanceStart`
//! builds the VM with [`builder::build`] and starts it. Every request is
//! answered after it took effect (a pause after every vCPU is parked).

use std::path::PathBuf;

use devices::exit::GuestExit;

use super::http::Response;
use super::types::*;
use crate::builder::{self, Console, Vmm};
use crate::config::{self, parse_mac, DiskConfig, DiskMode, NetBackendConfig, NetConfig, VmConfig};
use crate::hostfile::{DroppingWriter, OutputKind};

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

/// A parsed API request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
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
}

/// What a request did besides its response.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing else.
    None,
    /// The VM was just started.
    Started,
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
    vmm: Option<Vmm>,
    direct: Option<VmConfig>,
}

const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

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
            vmm: None,
            direct: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The running VM, once started.
    pub fn vmm_mut(&mut self) -> Option<&mut Vmm> {
        self.vmm.as_mut()
    }

    /// Applies a whole configuration (a `--config-file`), in Firecracker's
    /// order, without starting the VM.
    pub fn apply_config(&mut self, c: FullVmConfig) -> Result<(), String> {
        let unsupported = c.unsupported_sections();
        if !unsupported.is_empty() {
            return Err(format!(
                "capsule does not support: {}",
                unsupported.join(", ")
            ));
        }
        let mut reqs = Vec::new();
        if let Some(l) = c.logger {
            reqs.push(Request::PutLogger(l));
        }
        if let Some(s) = c.serial {
            reqs.push(Request::PutSerial(s));
        }
        if let Some(m) = c.machine_config {
            reqs.push(Request::PutMachineConfig(m));
        }
        if let Some(b) = c.boot_source {
            reqs.push(Request::PutBootSource(b));
        }
        reqs.extend(c.drives.into_iter().map(Request::PutDrive));
        reqs.extend(
            c.network_interfaces
                .into_iter()
                .map(Request::PutNetworkInterface),
        );
        for r in reqs {
            let (resp, _) = self.handle(r);
            if resp.status >= 300 {
                let msg = resp
                    .body
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["fault_message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("status {}", resp.status));
                return Err(msg);
            }
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

    fn pre_boot(&self) -> Result<(), Response> {
        if self.state == State::NotStarted {
            Ok(())
        } else {
            Err(Response::fault(400, NOT_AFTER_START))
        }
    }

    /// Handles one request.
    pub fn handle(&mut self, req: Request) -> (Response, Effect) {
        match self.dispatch(req) {
            Ok((r, e)) => (r, e),
            Err(r) => (r, Effect::None),
        }
    }

    fn dispatch(&mut self, req: Request) -> Result<(Response, Effect), Response> {
        let ok = || Ok((Response::no_content(), Effect::None));
        let json = |v: &dyn erased::Ser| Ok((Response::json(v.to_json()), Effect::None));
        match req {
            Request::GetInstanceInfo => json(&InstanceInfo {
                app_name: "capsule".to_string(),
                id: self.id.clone(),
                state: self.state.name().to_string(),
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            }),
            Request::GetVersion => json(&Version {
                firecracker_version: env!("CARGO_PKG_VERSION").to_string(),
            }),
            Request::GetMachineConfig => json(&self.machine),
            Request::GetVmConfig => json(&self.full_config()),
            Request::PutMachineConfig(m) => {
                self.pre_boot()?;
                validate_machine(&m).map_err(|e| Response::fault(400, e))?;
                self.machine = MachineConfig {
                    smt: Some(m.smt.unwrap_or(false)),
                    track_dirty_pages: Some(m.track_dirty_pages.unwrap_or(false)),
                    huge_pages: Some(m.huge_pages.clone().unwrap_or_else(|| "None".into())),
                    ..m
                };
                ok()
            }
            Request::PutBootSource(b) => {
                self.pre_boot()?;
                if b.kernel_image_path.is_empty() {
                    return Err(Response::fault(400, "kernel_image_path is empty"));
                }
                self.boot = Some(b);
                ok()
            }
            Request::PutDrive(d) => {
                self.pre_boot()?;
                validate_drive(&d).map_err(|e| Response::fault(400, e))?;
                if d.is_root_device
                    && self
                        .drives
                        .iter()
                        .any(|x| x.is_root_device && x.drive_id != d.drive_id)
                {
                    return Err(Response::fault(400, "A root block device already exists!"));
                }
                match self.drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
                    Some(x) => *x = d,
                    None => self.drives.push(d),
                }
                ok()
            }
            Request::PutNetworkInterface(n) => {
                self.pre_boot()?;
                if n.mtu.is_some() || n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
                    return Err(Response::fault(
                        400,
                        format!(
                            "network interface {}: mtu and rate limiters are not supported",
                            n.iface_id
                        ),
                    ));
                }
                if let Some(mac) = &n.guest_mac {
                    parse_mac(mac).map_err(|e| {
                        Response::fault(400, format!("network interface {}: {e}", n.iface_id))
                    })?;
                }
                if n.host_dev_name.is_empty() {
                    return Err(Response::fault(
                        400,
                        format!("network interface {}: empty host_dev_name", n.iface_id),
                    ));
                }
                match self.nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
                    Some(x) => *x = n,
                    None => self.nets.push(n),
                }
                ok()
            }
            Request::PutLogger(l) => {
                configure_logger(&l).map_err(|e| Response::fault(400, e))?;
                self.logger = Some(l);
                ok()
            }
            Request::PutSerial(s) => {
                self.pre_boot()?;
                if s.rate_limiter.is_some() {
                    return Err(Response::fault(400, "serial rate_limiter is not supported"));
                }
                self.serial = Some(s);
                ok()
            }
            Request::Action(ActionType::FlushMetrics) => Err(Response::fault(
                400,
                "capsule has no metrics to flush (PUT /metrics is not supported)",
            )),
            Request::Action(ActionType::InstanceStart) => {
                self.pre_boot()?;
                self.start().map_err(|e| Response::fault(400, e))?;
                Ok((Response::no_content(), Effect::Started))
            }
            Request::Action(ActionType::SendCtrlAltDel) => {
                let vmm = self
                    .vmm
                    .as_ref()
                    .filter(|_| self.state != State::NotStarted);
                let Some(vmm) = vmm else {
                    return Err(Response::fault(
                        400,
                        "SendCtrlAltDel needs a started microVM",
                    ));
                };
                if self.state == State::Paused {
                    return Err(Response::fault(
                        400,
                        "the microVM is paused: resume it before SendCtrlAltDel",
                    ));
                }
                if !vmm.send_ctrl_alt_del() {
                    return Err(Response::fault(
                        400,
                        "the guest is not reading its keyboard (i8042 buffer full)",
                    ));
                }
                ok()
            }
            Request::PatchVm(want) => {
                let Some(vmm) = self.vmm.as_mut() else {
                    return Err(Response::fault(
                        400,
                        "the microVM is not started: cannot pause or resume it",
                    ));
                };
                match want {
                    VmState::Paused => {
                        vmm.pause()
                            .map_err(|e| Response::fault(400, e.to_string()))?;
                        self.state = State::Paused;
                    }
                    VmState::Resumed => {
                        vmm.resume()
                            .map_err(|e| Response::fault(400, e.to_string()))?;
                        self.state = State::Running;
                    }
                }
                ok()
            }
        }
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
    pub fn vm_config(&self) -> Result<VmConfig, String> {
        if let Some(c) = &self.direct {
            return Ok(c.clone());
        }
        let Some(boot) = &self.boot else {
            return Err("Cannot start microvm without kernel configuration.".to_string());
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
            vcpus: u8::try_from(self.machine.vcpu_count).map_err(|_| "bad vcpu_count")?,
            mem_size: self.machine.mem_size_mib << 20,
            kvm_path: self.kvm_path.clone(),
            disks,
            nets: self
                .nets
                .iter()
                .map(|n| {
                    Ok(NetConfig {
                        backend: NetBackendConfig::Tap {
                            name: n.host_dev_name.clone(),
                        },
                        mac: n.guest_mac.as_deref().map(parse_mac).transpose()?,
                    })
                })
                .collect::<Result<_, String>>()?,
        })
    }

    fn start(&mut self) -> Result<(), String> {
        let config = self.vm_config()?;
        let Some(mut console) = self.console.take() else {
            return Err("the console is gone (an earlier start failed)".to_string());
        };
        if let Some(path) = self
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.as_ref())
        {
            match crate::hostfile::open_output(std::path::Path::new(path)) {
                Ok((f, OutputKind::File)) => console.out = Box::new(f),
                Ok((f, OutputKind::Fifo)) => {
                    console.out = Box::new(DroppingWriter::new(f, "serial_out_path"))
                }
                Err(e) => {
                    self.console = Some(console);
                    return Err(format!("cannot open serial_out_path {path}: {e}"));
                }
            }
        }
        match builder::build(&config, console) {
            Ok(vmm) => {
                self.vmm = Some(vmm);
                self.state = State::Running;
                log::info!("microVM started");
                Ok(())
            }
            // The console went into the failed build: a later start gets
            // stdio again.
            Err(e) => {
                self.console = Some(Console::stdio());
                Err(e.to_string())
            }
        }
    }

    /// Runs one event-loop round of a started VM (at most `tick`); returns
    /// the guest's exit once it ended the VM.
    pub fn run_once(&mut self, tick: std::time::Duration) -> Result<Option<GuestExit>, String> {
        match self.vmm.as_mut() {
            Some(v) => v.run_once(tick).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }
}

fn validate_machine(m: &MachineConfig) -> Result<(), String> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_API_VCPUS {
        return Err(format!(
            "vcpu_count must be between 1 and {MAX_API_VCPUS}, not {}",
            m.vcpu_count
        ));
    }
    let min = config::MIN_MEM_SIZE >> 20;
    if m.mem_size_mib < min || m.mem_size_mib > (1 << 30) {
        return Err(format!(
            "mem_size_mib must be at least {min}, not {}",
            m.mem_size_mib
        ));
    }
    if m.smt == Some(true) {
        return Err("smt is not supported".to_string());
    }
    if m.track_dirty_pages == Some(true) {
        return Err("track_dirty_pages is not supported".to_string());
    }
    if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
        return Err("CPU templates are not supported".to_string());
    }
    if m.huge_pages.as_deref().is_some_and(|t| t != "None") {
        return Err("huge_pages is not supported".to_string());
    }
    Ok(())
}

fn validate_drive(d: &Drive) -> Result<(), String> {
    if d.drive_id.is_empty()
        || !d
            .drive_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(format!(
            "invalid drive_id '{}': use letters, digits and _",
            d.drive_id
        ));
    }
    if d.socket.is_some() {
        return Err("vhost-user drives (socket) are not supported".to_string());
    }
    if d.rate_limiter.is_some() {
        return Err("drive rate_limiter is not supported".to_string());
    }
    match d.path_on_host.as_deref() {
        None | Some("") => return Err("path_on_host is required".to_string()),
        Some(_) => {}
    }
    if d.io_engine.as_deref().is_some_and(|e| e != "Sync") {
        return Err("only the Sync io_engine is supported".to_string());
    }
    if d.cache_type
        .as_deref()
        .is_some_and(|c| c != "Unsafe" && c != "Writeback")
    {
        return Err("cache_type must be Unsafe or Writeback".to_string());
    }
    Ok(())
}

fn configure_logger(l: &Logger) -> Result<(), String> {
    let level = match &l.level {
        Some(s) => {
            crate::logger::parse_level(s).ok_or_else(|| format!("invalid log level '{s}'"))?
        }
        None => log::LevelFilter::Info,
    };
    let out = match &l.log_path {
        Some(p) => {
            let (file, kind) = crate::hostfile::open_output(std::path::Path::new(p))
                .map_err(|e| format!("cannot open log_path {p}: {e}"))?;
            Some(crate::logger::Output::new(file, kind))
        }
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

/// Serialization behind a trait object (to keep `dispatch` short).
mod erased {
    /// Something that serializes to JSON.
    pub trait Ser {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
        }
    }
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

    fn status(c: &mut Controller, r: Request) -> u16 {
        c.handle(r).0.status
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
        assert_eq!(status(&mut c, Request::PutMachineConfig(m.clone())), 204);
        let bad = MachineConfig {
            vcpu_count: 0,
            ..m.clone()
        };
        assert_eq!(status(&mut c, Request::PutMachineConfig(bad)), 400);
        let bad = MachineConfig {
            smt: Some(true),
            ..m
        };
        assert_eq!(status(&mut c, Request::PutMachineConfig(bad)), 400);
        // No kernel yet.
        let (r, _) = c.handle(Request::Action(ActionType::InstanceStart));
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().contains("without kernel"));
        assert_eq!(
            status(
                &mut c,
                Request::PutBootSource(BootSource {
                    kernel_image_path: "/k".into(),
                    boot_args: Some("console=ttyS0".into()),
                    initrd_path: None,
                })
            ),
            204
        );
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
        assert_eq!(status(&mut c, Request::PutDrive(drive("data", false))), 204);
        assert_eq!(
            status(&mut c, Request::PutDrive(drive("rootfs", true))),
            204
        );
        assert_eq!(status(&mut c, Request::PutDrive(drive("other", true))), 400);
        assert_eq!(status(&mut c, Request::PutDrive(drive("a b", false))), 400);
        let vm = c.vm_config().unwrap();
        assert_eq!(vm.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(vm.disks[0].path, PathBuf::from("/rootfs.img"));
        assert_eq!(vm.disks[1].mode, DiskMode::ReadOnly);
        assert_eq!((vm.vcpus, vm.mem_size), (2, 256 << 20));
        // Pause before start, Ctrl-Alt-Del before start.
        assert_eq!(status(&mut c, Request::PatchVm(VmState::Paused)), 400);
        assert_eq!(
            status(&mut c, Request::Action(ActionType::SendCtrlAltDel)),
            400
        );
        // Start fails (no KVM here): still not started, still configurable.
        assert_eq!(
            status(&mut c, Request::Action(ActionType::InstanceStart)),
            400
        );
        assert_eq!(c.state(), State::NotStarted);
        let (r, _) = c.handle(Request::GetVmConfig);
        let v: serde_json::Value = serde_json::from_str(&r.body.unwrap()).unwrap();
        assert_eq!(v["boot-source"]["kernel_image_path"], "/k");
        assert_eq!(v["drives"].as_array().unwrap().len(), 2);
    }
}
