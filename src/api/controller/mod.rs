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

use std::path::PathBuf;

use super::action::{VmmAction, VmmActionError, VmmData};
use super::resources::VmResources;
use super::types::*;
use crate::builder::{self, Console};
use crate::config::VmConfig;
use crate::hostfile::{DroppingWriter, OutputKind};
use crate::vmm::Vmm;

mod outputs;
mod running;
mod snapshot;

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
    resources: VmResources,
    console: Option<Console>,
    /// The VM `InstanceStart` built, until the caller takes it.
    started: Option<Vmm>,
    /// Whether the VM's shape was configured (a snapshot can no longer
    /// be loaded).
    configured: bool,
}

type Result<T> = std::result::Result<T, VmmActionError>;

impl Controller {
    /// A controller with Firecracker's defaults (1 vCPU, 128 MiB). The
    /// guest console is `console` unless `PUT /serial` redirects its output.
    pub fn new(id: String, kvm_path: PathBuf, console: Console) -> Self {
        Self {
            id,
            state: State::NotStarted,
            resources: VmResources::new(kvm_path),
            console: Some(console),
            started: None,
            configured: false,
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
            .chain(c.metrics.map(VmmAction::PutMetrics))
            .chain(c.machine_config.map(VmmAction::PutMachineConfig))
            .chain(c.boot_source.map(VmmAction::PutBootSource))
            .chain(c.drives.into_iter().map(VmmAction::PutDrive))
            .chain(
                c.network_interfaces
                    .into_iter()
                    .map(VmmAction::PutNetworkInterface),
            )
            .chain(c.vsock.map(VmmAction::PutVsock))
            .chain(c.entropy.map(VmmAction::PutEntropy))
            .chain(c.mmds_config.map(VmmAction::PutMmdsConfig))
            .chain(c.balloon.map(VmmAction::PutBalloon));
        for action in actions {
            self.handle(action, None)?;
        }
        Ok(())
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
    /// Counted in the API metrics.
    pub fn handle(&mut self, action: VmmAction, vmm: Option<&mut Vmm>) -> Result<VmmData> {
        let counters = super::metrics::counters_for(&action);
        let r = self.handle_uncounted(action, vmm);
        if let Some((count, fails)) = counters {
            count.inc();
            if r.is_err() {
                fails.inc();
            }
        }
        r
    }

    fn handle_uncounted(&mut self, action: VmmAction, vmm: Option<&mut Vmm>) -> Result<VmmData> {
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
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.resources.machine.clone()))
            }
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.resources.full_config()))),
            VmmAction::PutMachineConfig(m) => self.configure(|r| r.set_machine(m)),
            VmmAction::PutBootSource(b) => self.configure(|r| r.set_boot_source(b)),
            VmmAction::PutDrive(d) => self.configure(|r| r.set_drive(d)),
            VmmAction::PutNetworkInterface(n) => self.configure(|r| r.set_net(n)),
            VmmAction::PutVsock(v) => self.configure(|r| r.set_vsock(v)),
            VmmAction::PutLogger(l) => self.put_logger(l),
            VmmAction::PutSerial(s) => self.put_serial(s),
            VmmAction::Action(ActionType::FlushMetrics) => self.flush_metrics(),
            VmmAction::PutMetrics(m) => self.put_metrics(m),
            VmmAction::PatchMachineConfig(u) => self.configure(|r| r.patch_machine(u)),
            VmmAction::PutEntropy(e) => self.configure(|r| r.set_entropy(e)),
            VmmAction::PutCpuConfig => Err(VmmActionError::Unsupported(
                "CPU configuration (cpu-config) is not supported by capsule",
            )),
            VmmAction::Action(ActionType::InstanceStart) => {
                self.pre_boot()?;
                self.start()?;
                Ok(VmmData::Empty)
            }
            VmmAction::Action(ActionType::SendCtrlAltDel) => self.ctrl_alt_del(vmm),
            VmmAction::PatchVm(want) => self.pause_or_resume(vmm, want),
            VmmAction::CreateSnapshot(p) => self.create_snapshot(vmm, &p),
            VmmAction::LoadSnapshot(p) => self.load_snapshot(&p),
            VmmAction::PatchDrive(p) => self.patch_drive(vmm, p),
            VmmAction::PatchNetworkInterface(p) => self.patch_net(vmm, p),
            // The data may change at any time; the guest reads it live.
            VmmAction::PutMmds(v) => super::mmds::put(&self.resources.mmds, v),
            VmmAction::PatchMmds(v) => super::mmds::patch(&self.resources.mmds, &v),
            VmmAction::GetMmds => super::mmds::get(&self.resources.mmds),
            VmmAction::PutMmdsConfig(c) => self.configure(|r| r.set_mmds_config(c)),
            VmmAction::SetMmdsSizeLimit(n) => super::mmds::set_size_limit(&self.resources.mmds, n),
            VmmAction::PutBalloon(b) => self.configure(|r| r.set_balloon(b)),
            a @ (VmmAction::GetBalloon
            | VmmAction::PatchBalloon(_)
            | VmmAction::GetBalloonStats
            | VmmAction::PatchBalloonStats(_)) => {
                super::balloon::handle(a, &mut self.resources, vmm)
            }
        }
    }

    /// A change to the configuration, which only exists before start.
    fn configure(&mut self, set: impl FnOnce(&mut VmResources) -> Result<()>) -> Result<VmmData> {
        self.pre_boot()?;
        self.configured = true;
        set(&mut self.resources)?;
        Ok(VmmData::Empty)
    }

    /// Uses `config` (from the command line) for the VM instead of what
    /// API requests configure (see [`VmResources::set_direct`]).
    pub fn set_direct(&mut self, config: VmConfig) {
        self.resources.set_direct(config);
    }

    /// The virtio transport when the machine configuration names none
    /// (the command line's `--transport`).
    pub fn set_default_transport(&mut self, t: crate::config::Transport) {
        self.resources.set_default_transport(t);
    }

    /// The console, with its output redirected if `PUT /serial` asked;
    /// `None` if an earlier failed start took it.
    fn take_console(&mut self) -> Result<Option<Console>> {
        let Some(mut console) = self.console.take() else {
            return Ok(None);
        };
        if let Some(path) = self
            .resources
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.as_ref())
        {
            match crate::hostfile::open_output(std::path::Path::new(path)) {
                Ok((f, OutputKind::File)) => console.out = Box::new(f),
                Ok((f, OutputKind::Fifo)) => {
                    console.out = Box::new(DroppingWriter::new(f, "serial_out_path"))
                }
                Err(source) => {
                    self.console = Some(console);
                    return Err(VmmActionError::SerialOut {
                        path: path.into(),
                        source,
                    });
                }
            }
        }
        Ok(Some(console))
    }

    fn start(&mut self) -> Result<()> {
        let config = self.resources.vm_config()?;
        let Some(console) = self.take_console()? else {
            return Err(VmmActionError::NoConsole);
        };
        let built = builder::build(&config, console).and_then(|mut vmm| {
            if self.resources.track_dirty_pages() {
                vmm.track_dirty_pages()?;
            }
            Ok(vmm)
        });
        match built {
            Ok(vmm) => {
                self.resources.record_transport(vmm.transport());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, DiskMode};

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

    /// A drive `id` backed by `/{id}.img`: the root device read-write,
    /// any other read-only.
    fn drive(id: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            path_on_host: Some(format!("/{id}.img")),
            is_root_device: root,
            is_read_only: Some(!root),
            partuuid: None,
            cache_type: None,
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }

    /// The configuration steps before start, in the order a client takes
    /// them, then what a start that fails leaves behind.
    #[test]
    fn pre_boot_configuration() {
        let mut c = ctl();
        assert_eq!(c.state().name(), "Not started");
        machine_config_is_checked(&mut c);
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
        drives_are_checked(&mut c);
        vm_config_carries_the_drives(&c);
        nothing_runs_before_start(&mut c);
    }

    /// A machine configuration is taken; a vCPU count of 0 and SMT are
    /// refused.
    fn machine_config_is_checked(c: &mut Controller) {
        let m = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
            transport: None,
        };
        assert!(ok(c, VmmAction::PutMachineConfig(m.clone())));
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
        assert!(!ok(c, VmmAction::PutMachineConfig(bad)));
    }

    /// Drives: the Aio engine, a second root device and an id that is not
    /// a name are refused; cache and engine choices are taken.
    fn drives_are_checked(c: &mut Controller) {
        let unsafe_data = Drive {
            cache_type: Some("Unsafe".into()),
            io_engine: Some("Async".into()),
            ..drive("data", false)
        };
        let aio = Drive {
            io_engine: Some("Aio".into()),
            ..drive("data", false)
        };
        assert!(!ok(c, VmmAction::PutDrive(aio)));
        assert!(ok(c, VmmAction::PutDrive(unsafe_data)));
        assert!(ok(c, VmmAction::PutDrive(drive("rootfs", true))));
        assert!(!ok(c, VmmAction::PutDrive(drive("other", true))));
        assert!(matches!(
            c.handle(VmmAction::PutDrive(drive("a b", false)), None),
            Err(VmmActionError::DriveId(id)) if id == "a b"
        ));
    }

    /// The VM configuration built from the steps so far: command line,
    /// disks in order with their modes, caches and engines, vCPUs, memory.
    fn vm_config_carries_the_drives(c: &Controller) {
        let vm = c.resources.vm_config().unwrap();
        assert_eq!(vm.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(vm.disks[0].path, PathBuf::from("/rootfs.img"));
        assert_eq!(vm.disks[1].mode, DiskMode::ReadOnly);
        // cache_type Unsafe is carried to the disk; absent is writeback.
        assert_eq!(vm.disks[1].cache, crate::config::DiskCache::Unsafe);
        assert_eq!(vm.disks[0].cache, crate::config::DiskCache::Writeback);
        // io_engine Async is the io_uring engine; absent is sync.
        assert_eq!(vm.disks[1].engine, crate::config::DiskEngine::IoUring);
        assert_eq!(vm.disks[0].engine, crate::config::DiskEngine::Sync);
        assert_eq!((vm.vcpus, vm.mem_size), (2, 256 << 20));
    }

    /// Pause and Ctrl-Alt-Del are refused before start; a start that fails
    /// leaves the VM configurable, its configuration intact.
    fn nothing_runs_before_start(c: &mut Controller) {
        // Pause before start, Ctrl-Alt-Del before start.
        assert!(matches!(
            c.handle(VmmAction::PatchVm(VmState::Paused), None),
            Err(VmmActionError::NotStarted(_))
        ));
        assert!(!ok(c, VmmAction::Action(ActionType::SendCtrlAltDel)));
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
        let config: FullVmConfig = serde_json::from_str(r#"{"pmem": []}"#).unwrap();
        assert_eq!(
            c.apply_config(config).unwrap_err().to_string(),
            "capsule does not support: pmem"
        );
    }
}
