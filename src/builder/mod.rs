//! Assembles a VM from a [`VmConfig`], top to bottom:
//! host checks → KVM → guest memory → kernel, initrd, command line →
//! firmware tables and zero page → devices → vCPUs → running [`Vmm`].

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arch::layout;
use arch::GuestMemoryMmap;
use devices::exit::ExitSignal;
use devices::legacy::serial::{ReadableFd, SerialOut};
use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;

use devices::virtio::block::Block;
use devices::virtio::net::{self, Net};
use devices::virtio::VirtioDevice;

use crate::config::{format_size, VmConfig};
use crate::device_manager::DeviceManager;
use crate::kernel_acpi::KernelAcpi;
use crate::kernel_load::{kernel_cmdline, load_cmdline, load_initrd, load_kernel, KernelEntry};
use crate::vmm::{ExitWatcher, Subscriber, Vmm, VCPU_STOP_TIMEOUT};
use crate::vstate::dirty::DirtyLog;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{self, PauseGate, Vcpu, VcpuHandle, VcpuIo};
use crate::vstate::vm::Vm;
use crate::{signals, terminal};

mod attach;
mod error;
pub(crate) use self::attach::Devices;
pub use self::error::Error;

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Where the guest console goes.
pub struct Console {
    /// Guest serial output.
    pub out: SerialOut,
    /// Host input typed or piped into the guest, if any.
    pub input: Option<Box<dyn ReadableFd>>,
    /// Put stdin's terminal in raw mode while the VM runs.
    pub raw_terminal: bool,
}

impl Console {
    /// The process's stdin and stdout.
    pub fn stdio() -> Self {
        // `std::io::stdin()` is buffered: it would swallow input beyond what
        // the UART FIFO takes and then never poll as readable again. Read
        // the descriptor directly instead.
        let input = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(|fd| Box::new(File::from(fd)) as Box<dyn ReadableFd>);
        if let Err(e) = &input {
            log::warn!("guest console gets no input: cannot duplicate stdin: {e}");
        }
        Self {
            out: Box::new(std::io::stdout()),
            input: input.ok(),
            raw_terminal: true,
        }
    }
}

/// Devices and event-loop subscribers added by the caller (e.g. `exec`).
#[derive(Default)]
pub struct Extras {
    /// Virtio devices, attached over virtio-mmio after the disks and
    /// nets (each is also its own event-loop subscriber).
    pub devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    /// More event-loop subscribers.
    pub subscribers: Vec<Subscriber>,
}

/// Builds and starts a VM.
pub fn build(config: &VmConfig, console: Console) -> Result<Vmm> {
    build_with(config, console, Extras::default())
}

/// Builds and starts a VM with extra devices and subscribers: one step
/// per paragraph, in the order a PC is put together.
pub fn build_with(config: &VmConfig, console: Console, extras: Extras) -> Result<Vmm> {
    // Open user files first: a typo should not cost a KVM setup.
    let mut kernel = open("kernel", &config.kernel)?;
    let initrd = config
        .initrd
        .as_ref()
        .map(|p| open("initrd", p).map(|f| (p, f)))
        .transpose()?;
    check_host_memory(config.mem_size)?;
    let virtiofsd = crate::fs_share::check(&config.fs)?;
    crate::setup_step("user files opened");

    let kvm = Vm::open_kvm(&config.kvm_path)?;
    crate::setup_step("/dev/kvm opened");
    // A vhost-user backend (virtiofsd) maps guest RAM itself: then RAM is
    // a shared memfd, else private anonymous memory.
    let ranges = arch::memory::ram_regions(config.mem_size);
    let ram = if virtiofsd.is_some() {
        GuestRam::new_shared(&ranges)
    } else {
        GuestRam::new(&ranges)
    };
    let ram = ram.map_err(|source| Error::GuestMemory {
        size: config.mem_size,
        source,
    })?;
    let mem = ram.memory();
    crate::setup_step("guest RAM mapped");
    let vm = Vm::new(kvm, mem)?;
    crate::setup_step("VM created");

    let map_kernel = crate::kernel_map::allowed(config);
    let (entry, kernel_map) = load_kernel(mem, &config.kernel, &mut kernel, map_kernel)?;
    crate::setup_step("kernel loaded");
    let initrd = if initrd.is_some() || config.initramfs.is_some() {
        Some(load_initrd(mem, initrd, config.initramfs.as_deref())?)
    } else {
        None
    };
    crate::setup_step("initrd loaded");

    let unsupported = snapshot_refusal(config, &extras);
    let (mut started, mut dm) = Started::new(console.raw_terminal)?;
    let exit = started.exit.clone();
    let mut devices = started.devices(&mut dm, &vm, mem, config.transport);
    devices.add_legacy(&exit, console)?;
    if FC_BOOT_TIMER.load(std::sync::atomic::Ordering::Relaxed) {
        devices
            .dm
            .attach_fc_boot_timer(config.mem_size, crate::process_start())?;
    }
    let disks = devices.add_disks(&config.disks)?;
    let nets = devices.add_nets(&config.nets)?;
    devices.add_entropy(config.entropy)?;
    let balloon = devices.add_balloon(config.balloon, config.mem_size)?;
    if let Some(binary) = &virtiofsd {
        devices.add_shares(&config.fs, binary)?;
    }
    let vsock = config
        .vsock
        .as_ref()
        .map(|v| devices.add_vsock(v))
        .transpose()?;
    devices.add_extras(extras)?;
    let (blocks, macs) = (devices.blocks, devices.macs);
    crate::setup_step("devices attached");

    let no_acpi = write_boot_data(mem, config, &dm, &entry, initrd.as_ref())?;
    crate::setup_step("boot data written");
    let vcpus = create_vcpus(&vm, mem, &entry, config.vcpus)?;
    crate::setup_step("vCPUs created");
    let persist = handles(config, &dm, blocks, macs, unsupported);
    started.launch(
        vm,
        ram,
        dm,
        vcpus,
        persist,
        Parts {
            vsock,
            no_acpi,
            disks,
            nets,
            balloon,
            paused: false,
            track_dirty: None,
            kernel_map,
            serial_console: serial_console_expected(&config.cmdline),
        },
    )
}

/// Whether a guest booted with `cmdline` writes its kernel's messages to
/// COM1 from its first seconds: `console=ttyS0` without `quiet`.
fn serial_console_expected(cmdline: &str) -> bool {
    let args: Vec<&str> = cmdline.split_whitespace().collect();
    args.iter().any(|a| a.starts_with("console=ttyS0")) && !args.contains(&"quiet")
}

/// The typed device handles a snapshot saves (see [`crate::snapshot`]).
pub(crate) fn handles(
    config: &VmConfig,
    dm: &DeviceManager,
    blocks: Vec<Arc<Mutex<Block>>>,
    macs: Vec<net::MacAddr>,
    unsupported: Option<&'static str>,
) -> crate::snapshot::Handles {
    crate::snapshot::Handles {
        config: VmConfig {
            initramfs: None,
            ..config.clone()
        },
        boot: crate::snapshot::BootFiles::of(config),
        serial: dm.serial.clone().expect("COM1 is attached first"),
        i8042: dm.i8042.clone().expect("the i8042 is attached first"),
        transports: dm.transports.clone(),
        pci_root: dm.pci_root(),
        pci_functions: dm.pci_functions.clone(),
        blocks,
        macs,
        unsupported,
    }
}

/// What a VM has beyond its saved state: handles for changes while it runs.
#[derive(Default)]
pub(crate) struct Parts {
    /// The vsock device.
    pub(crate) vsock: Option<crate::vmm::VsockHandle>,
    /// The guest cannot read ACPI tables: its power-off is a halt.
    pub(crate) no_acpi: bool,
    /// The virtio-blk devices, in the guest's order.
    pub(crate) disks: Vec<Arc<Mutex<Block>>>,
    /// The virtio-net devices, in the guest's order (`None`: vhost-net).
    pub(crate) nets: Vec<Option<Arc<Mutex<Net>>>>,
    /// The virtio-balloon device.
    pub(crate) balloon: Option<Arc<Mutex<devices::virtio::balloon::Balloon>>>,
    /// Start with every vCPU parked (a restore without `resume_vm`).
    pub(crate) paused: bool,
    /// Track dirty pages (for Diff snapshots): `Some(base)`, `base` the
    /// id of the Full snapshot the VM's memory is a copy of, if any.
    pub(crate) track_dirty: Option<Option<u64>>,
    /// The kernel, mapped from its file ([`crate::kernel_map`]).
    pub(crate) kernel_map: Option<crate::kernel_map::KernelMap>,
    /// A booted guest whose kernel console is COM1 (not `quiet`): one
    /// stopped without a byte written there gets its vCPUs' state
    /// logged ([`crate::vmm::Vmm::run`]).
    pub(crate) serial_console: bool,
}

/// The parts of a VM made before its devices (the event loop and the exit
/// signal) and what starting it needs: shared by a boot
/// ([`build_with`]) and a snapshot restore ([`crate::snapshot::restore`]).
pub(crate) struct Started {
    pub(crate) event_manager: EventManager<Subscriber>,
    pub(crate) exit: ExitSignal,
    raw_terminal: bool,
}

impl Started {
    /// The event loop (watching the exit signal) and an empty device
    /// manager.
    pub(crate) fn new(raw_terminal: bool) -> Result<(Self, DeviceManager)> {
        let mut event_manager = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
        let exit = ExitSignal::new().map_err(Error::ExitEvent)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
        Ok((
            Self {
                event_manager,
                exit,
                raw_terminal,
            },
            DeviceManager::new(),
        ))
    }

    /// The device builder for this VM, its virtio devices on `transport`.
    pub(crate) fn devices<'a>(
        &'a mut self,
        dm: &'a mut DeviceManager,
        vm: &'a Vm,
        mem: &'a GuestMemoryMmap,
        transport: Transport,
    ) -> Devices<'a> {
        Devices {
            dm,
            vm,
            mem,
            transport,
            event_manager: &mut self.event_manager,
            blocks: Vec::new(),
            macs: Vec::new(),
        }
    }

    /// Raw terminal mode, then the vCPU threads (parked at once if
    /// `paused`): the running [`Vmm`].
    pub(crate) fn launch(
        self,
        vm: Vm,
        mut ram: GuestRam,
        dm: DeviceManager,
        vcpus: Vec<Vcpu>,
        persist: crate::snapshot::Handles,
        parts: Parts,
    ) -> Result<Vmm> {
        let paused = parts.paused;
        let count = vcpus.len();
        let mem_size: u64 = persist.config.mem_size;
        let terminal = self
            .raw_terminal
            .then(terminal::enter_raw_mode)
            .transpose()
            .map_err(Error::Terminal)?
            .flatten();
        let i8042 = dm.i8042.clone();
        let pause = Arc::new(PauseGate::default());
        pause.set_requested(paused);
        let io = VcpuIo {
            pio: Arc::new(dm.pio),
            mmio: Arc::new(dm.mmio),
            exit: self.exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            pause: pause.clone(),
            // Without ACPI a guest's poweroff is a halt of every CPU: watch
            // for it (with ACPI it powers off through ACPI, and a halt is a
            // halt, which leaves a machine on).
            halt: parts
                .no_acpi
                .then(|| Arc::new(crate::vstate::halt::HaltWatch::new(vcpus.len()))),
        };
        let watch_halt = io.halt.is_some();
        // Setup is over: from here on capsule reaches only the files the VM
        // was configured with (the vCPU threads inherit this).
        let dirty = match parts.track_dirty {
            Some(base) => {
                let mut log = DirtyLog::enable(vm.fd(), ram.memory())?;
                log.base = base;
                Some(log)
            }
            None => None,
        };
        crate::landlock::restrict(&persist.config)?;
        crate::setup_step("Landlock applied");
        let handles = start_vcpus(vcpus, &io, &mut ram)?;
        log::info!(
            "VM started: {count} vCPU(s), {} of memory, {:.1} ms after capsule started",
            format_size(mem_size),
            crate::process_start().elapsed().as_secs_f64() * 1000.0
        );
        let mut event_manager = self.event_manager;
        if let Some(kmap) = &parts.kernel_map {
            event_manager.add_subscriber(Arc::new(Mutex::new(
                kmap.watcher().map_err(Error::KernelLease)?,
            )));
        }
        let vmm = Vmm {
            _signal_wake: signals::wake_on_signal(&self.exit),
            kernel_map: parts.kernel_map,
            vcpus: handles,
            pause,
            i8042,
            event_manager,
            exit: self.exit,
            _terminal: terminal,
            _vm: vm,
            ram,
            persist,
            vsock: parts.vsock,
            watch_halt,
            serial_console: parts.serial_console,
            disks: parts.disks,
            nets: parts.nets,
            balloon: parts.balloon,
            dirty,
        };
        // The main thread's own filter, after it started every thread it
        // starts (a thread inherits its parent's filter). On failure the VM
        // is dropped: its vCPUs are stopped.
        crate::seccomp::install(crate::seccomp::ThreadKind::Vmm)?;
        Ok(vmm)
    }
}

pub use crate::config::Transport;

/// Why a snapshot of this VM would be refused, if it would: devices
/// whose state capsule cannot save. The same on both transports: what
/// blocks a snapshot is the device's state (a backend holding the rings,
/// untracked writes to guest memory), not how the guest reaches it.
fn snapshot_refusal(config: &VmConfig, extras: &Extras) -> Option<&'static str> {
    if !extras.devices.is_empty() {
        Some("capsule exec's devices have no saved state")
    } else if !config.fs.is_empty() {
        Some("virtio-fs shares have no saved state yet")
    } else if config.balloon.is_some() {
        Some("a balloon device has no saved state yet")
    } else if config.nets.iter().any(|n| n.vhost) {
        Some("a vhost-net device's rings are in the kernel's hands (and its writes to guest memory are not tracked)")
    } else {
        None
    }
}

/// Whether VMs get Firecracker's boot timer ([`enable_fc_boot_timer`]).
static FC_BOOT_TIMER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Gives the VMs of this process Firecracker's boot timer (its
/// `--boot-timer`, a process-wide option there too): a write of 123 to
/// MMIO address 0xc0000000 logs the time since capsule started.
pub fn enable_fc_boot_timer() {
    FC_BOOT_TIMER.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The command line, the MP table, the ACPI tables and the zero page.
/// Returns whether the guest cannot read ACPI tables (`acpi=off`, or a
/// kernel without ACPI).
fn write_boot_data(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    dm: &DeviceManager,
    entry: &KernelEntry,
    initrd: Option<&arch::boot::InitrdConfig>,
) -> Result<bool> {
    let no_acpi = match &entry.acpi {
        KernelAcpi::Absent(how) => {
            log::info!(
                "the kernel has no ACPI ({how}): its virtio-mmio devices are announced on its command line"
            );
            true
        }
        KernelAcpi::Present(how) => {
            log::debug!("the kernel has ACPI ({how})");
            false
        }
        KernelAcpi::Unknown => false,
    };
    let cmdline = kernel_cmdline(
        &config.cmdline,
        dm.virtio_mmio_devices(),
        no_acpi,
        dm.has_pci(),
    );
    let cmdline_size = load_cmdline(mem, &cmdline)?;
    arch::mptable::setup_mptable(mem, config.vcpus).map_err(Error::MpTable)?;
    let rsdp = arch::acpi::create_acpi_tables_with(
        mem,
        config.vcpus,
        dm.virtio_mmio_devices(),
        dm.has_pci(),
    )
    .map_err(Error::Acpi)?;
    arch::boot::configure_system(
        mem,
        GuestAddress(layout::CMDLINE_START),
        cmdline_size,
        initrd,
        entry.setup_header,
        Some(rsdp),
    )
    .map_err(Error::ZeroPage)?;
    Ok(no_acpi || crate::kernel_load::acpi_off(&config.cmdline))
}

/// Creates and configures the vCPUs (not started yet).
fn create_vcpus(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    entry: &KernelEntry,
    count: u8,
) -> Result<Vec<Vcpu>> {
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let vcpu = Vcpu::new(vm.fd(), index)?;
        vcpu.configure(vm.kvm(), mem, entry.address, count)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Starts a thread per vCPU. If one cannot start, those already running
/// are stopped (and guest memory stays mapped if one of them would not).
pub(crate) fn start_vcpus(
    vcpus: Vec<Vcpu>,
    io: &VcpuIo,
    ram: &mut GuestRam,
) -> Result<Vec<VcpuHandle>> {
    vcpu::install_kick_handler()?;
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        match vcpu.start(io.clone()) {
            Ok(h) => handles.push(h),
            Err(e) => {
                if !vcpu::stop_all(&mut handles, VCPU_STOP_TIMEOUT) {
                    ram.keep_mapped();
                }
                return Err(e.into());
            }
        }
    }
    Ok(handles)
}

fn open(what: &'static str, path: &Path) -> Result<File> {
    let err = |source| Error::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    // Non-blocking open and a type check: a FIFO must not hang us.
    crate::hostfile::open_regular(path).map_err(err)
}

pub(crate) fn check_host_memory(asked: u64) -> Result<()> {
    // SAFETY: sysinfo only fills the struct it is given.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Ok(()); // Cannot tell; let the mapping decide.
    }
    let host = info.totalram.saturating_mul(u64::from(info.mem_unit));
    if asked > host {
        return Err(Error::HostMemory { asked, host });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_console_is_expected_on_com1_without_quiet() {
        assert!(serial_console_expected("console=ttyS0 reboot=k panic=1"));
        assert!(serial_console_expected("console=ttyS0,115200n8"));
        // capsule exec's kernel is quiet: it may write nothing at all.
        assert!(!serial_console_expected("console=ttyS0 quiet reboot=k"));
        assert!(!serial_console_expected("console=hvc0"));
        assert!(!serial_console_expected(""));
    }

    fn config(transport: Transport) -> VmConfig {
        VmConfig {
            kernel: "vmlinux".into(),
            initrd: None,
            initramfs: None,
            cmdline: String::new(),
            vcpus: 1,
            mem_size: 128 << 20,
            kvm_path: crate::config::DEFAULT_KVM_PATH.into(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            entropy: None,
            balloon: None,
            transport,
        }
    }

    #[test]
    fn vhost_net_and_virtio_fs_vms_refuse_snapshots_on_either_transport() {
        for transport in [Transport::Mmio, Transport::Pci] {
            let extras = Extras::default();
            let mut c = config(transport);
            c.nets.push("tap=t0".parse().unwrap());
            assert_eq!(snapshot_refusal(&c, &extras), None, "{transport:?}");
            c.nets.push("tap=t1,vhost=on".parse().unwrap());
            let why = snapshot_refusal(&c, &extras).unwrap();
            assert!(
                why.starts_with("a vhost-net device"),
                "{transport:?}: {why}"
            );
            c.nets.clear();
            c.fs.push("/tmp:share".parse().unwrap());
            assert_eq!(
                snapshot_refusal(&c, &extras),
                Some("virtio-fs shares have no saved state yet"),
                "{transport:?}"
            );
        }
    }
}
