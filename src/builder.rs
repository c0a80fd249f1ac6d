//! Assembles a VM from a [`VmConfig`], top to bottom:
//! host checks → KVM → guest memory → kernel, initrd, command line →
//! firmware tables and zero page → devices → vCPUs → running [`Vmm`].

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arch::layout;
use arch::GuestMemoryMmap;
use devices::exit::ExitSignal;
use devices::legacy::serial::{ReadableFd, SerialOut};
use event_manager::{EventManager, SubscriberOps};
use linux_loader::loader::{self};
use vm_memory::GuestAddress;

use devices::virtio::block::{Block, BlockConfig, BlockError, ID_BYTES};
use devices::virtio::net::{self, Net, NetBackend, Passt, PasstConfig, PasstError, Tap, TapError};
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;

use crate::config::{
    default_mac, format_size, DiskConfig, DiskMode, FsConfig, NetBackendConfig, NetConfig,
    VmConfig, VsockConfig,
};
use crate::device_manager::{self, DeviceManager};
use crate::kernel_acpi::KernelAcpi;
use crate::kernel_load::{kernel_cmdline, load_cmdline, load_initrd, load_kernel, KernelEntry};
use crate::vmm::{ExitWatcher, Subscriber, Vmm, VsockHandle, VCPU_STOP_TIMEOUT};
use crate::vstate::dirty::DirtyLog;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{self, PauseGate, Vcpu, VcpuHandle, VcpuIo};
use crate::vstate::vm::{self, Vm};
use crate::{signals, terminal};

/// What to do when a kernel or initrd named by the user cannot be read.
fn file_hint(what: &str, e: &std::io::Error) -> &'static str {
    match (what, e.kind()) {
        ("initrd", std::io::ErrorKind::NotFound) => {
            "; check the path (capsule exec needs no --initrd: it makes its own initramfs)"
        }
        (_, std::io::ErrorKind::NotFound) => "; check the path",
        (_, std::io::ErrorKind::PermissionDenied) => "; make it readable by you",
        _ => "",
    }
}

/// Errors while building or running a VM. Each message names what failed
/// and, for files, which file.
#[derive(Debug, thiserror::Error)]
#[allow(clippy::large_enum_variant)]
pub enum Error {
    /// Dirty-page tracking could not be enabled.
    #[error(transparent)]
    DirtyLog(#[from] crate::vstate::dirty::Error),
    /// A user-supplied file could not be opened or read.
    #[error("cannot read {what} {path}: {source}{hint}", hint = file_hint(.what, .source))]
    File {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(PathBuf),
    /// The kernel could not be loaded into guest memory.
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        /// The kernel file.
        path: PathBuf,
        /// Underlying error.
        source: loader::Error,
    },
    /// The initrd could not be read into guest memory.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: vm_memory::GuestMemoryError,
    },
    /// The initrd does not fit in guest memory.
    #[error("initrd {path} ({}) does not fit in guest memory: {source}", format_size(*.size))]
    InitrdTooBig {
        /// The initrd file.
        path: PathBuf,
        /// Its size in bytes (with the generated initramfs).
        size: u64,
        /// Underlying error.
        source: arch::boot::Error,
    },
    /// The command line is malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line is too long.
    #[error("invalid kernel command line: {0} (at most {max} bytes)", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written to guest memory.
    #[error("invalid kernel command line: {0}")]
    LoadCmdline(#[source] loader::Error),
    /// More memory than the host has.
    #[error("cannot give the guest {}: the host has {} of RAM; ask for less (--memory, or mem_size_mib over the API)", format_size(*.asked), format_size(*.host))]
    HostMemory {
        /// Requested size in bytes.
        asked: u64,
        /// Host RAM in bytes.
        host: u64,
    },
    /// Guest memory could not be mapped.
    #[error("cannot allocate {} of guest memory: {source}", format_size(*.size))]
    GuestMemory {
        /// Bytes asked for.
        size: u64,
        /// Underlying error.
        source: crate::vstate::memory::Error,
    },
    /// KVM VM setup failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Device setup failed.
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    /// The MP table could not be written.
    #[error("cannot write MP table: {0}")]
    MpTable(#[source] arch::mptable::Error),
    /// The ACPI tables could not be written.
    #[error("cannot write ACPI tables: {0}")]
    Acpi(#[source] arch::acpi::Error),
    /// The zero page could not be written.
    #[error("cannot write zero page: {0}")]
    ZeroPage(#[source] arch::boot::Error),
    /// The generated initramfs could not be written.
    #[error("cannot write initramfs: {0}")]
    Initramfs(#[source] vm_memory::GuestMemoryError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(#[source] event_manager::Error),
    /// A rate limiter's timer could not be created.
    #[error("cannot create a rate limiter: {0}")]
    RateLimiter(#[source] std::io::Error),
    /// The entropy device could not be created.
    #[error("cannot create the entropy device: {0}")]
    Entropy(#[source] std::io::Error),
    /// The eventfd the VM's end is signalled on could not be created.
    #[error("event loop: {0}")]
    ExitEvent(#[source] std::io::Error),
    /// A disk image could not be attached.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A TAP device could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// passt could not be started.
    #[error(transparent)]
    Passt(#[from] PasstError),
    /// The vsock socket cannot be created.
    #[error("vsock socket {}: {why}", path.display())]
    VsockSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        why: crate::unixsock::BindError,
    },
    /// The vsock device cannot be made.
    #[error("vsock device: {0}")]
    Vsock(#[source] devices::virtio::vsock::VsockError),
    /// A virtio-fs share could not be set up.
    #[error(transparent)]
    FsShare(#[from] crate::fs_share::Error),
    /// Two network devices have the same MAC address.
    #[error("network devices {0} and {1} have the same MAC address {mac}", mac = net::format_mac(.2))]
    DuplicateMac(usize, usize, net::MacAddr),
    /// A network device could not be created.
    #[error("cannot create network device {0}: {1}")]
    Net(usize, std::io::Error),
    /// The terminal could not be put in raw mode.
    #[error("cannot set up the terminal: {0}")]
    Terminal(std::io::Error),
    /// File access could not be restricted.
    #[error(transparent)]
    Landlock(#[from] crate::landlock::Error),
    /// The main thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
}

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

    let kvm = Vm::open_kvm(&config.kvm_path)?;
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
    let vm = Vm::new(kvm, mem)?;

    let entry = load_kernel(mem, &config.kernel, &mut kernel)?;
    let initrd = if initrd.is_some() || config.initramfs.is_some() {
        Some(load_initrd(mem, initrd, config.initramfs.as_deref())?)
    } else {
        None
    };

    let unsupported = if !extras.devices.is_empty() {
        Some("capsule exec's devices have no saved state")
    } else if !config.fs.is_empty() {
        Some("virtio-fs shares have no saved state yet")
    } else {
        None
    };
    let (mut started, mut dm) = Started::new(console.raw_terminal)?;
    let exit = started.exit.clone();
    let mut devices = started.devices(&mut dm, &vm, mem);
    devices.add_legacy(&exit, console)?;
    if FC_BOOT_TIMER.load(std::sync::atomic::Ordering::Relaxed) {
        devices
            .dm
            .attach_fc_boot_timer(config.mem_size, crate::process_start())?;
    }
    let disks = devices.add_disks(&config.disks)?;
    let nets = devices.add_nets(&config.nets)?;
    devices.add_entropy(config.entropy)?;
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

    let no_acpi = write_boot_data(mem, config, &dm, &entry, initrd.as_ref())?;
    let vcpus = create_vcpus(&vm, mem, &entry, config.vcpus)?;
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
            paused: false,
            track_dirty: None,
        },
    )
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
        serial: dm.serial.clone().expect("COM1 is attached first"),
        i8042: dm.i8042.clone().expect("the i8042 is attached first"),
        transports: dm.transports.clone(),
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
    /// The virtio-net devices, in the guest's order.
    pub(crate) nets: Vec<Arc<Mutex<Net>>>,
    /// Start with every vCPU parked (a restore without `resume_vm`).
    pub(crate) paused: bool,
    /// Track dirty pages (for Diff snapshots): `Some(base)`, `base` the
    /// id of the Full snapshot the VM's memory is a copy of, if any.
    pub(crate) track_dirty: Option<Option<u64>>,
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

    /// The device builder for this VM.
    pub(crate) fn devices<'a>(
        &'a mut self,
        dm: &'a mut DeviceManager,
        vm: &'a Vm,
        mem: &'a GuestMemoryMmap,
    ) -> Devices<'a> {
        Devices {
            dm,
            vm,
            mem,
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
        let handles = start_vcpus(vcpus, &io, &mut ram)?;
        log::info!(
            "VM started: {count} vCPU(s), {} of memory, {:.1} ms after capsule started",
            format_size(mem_size),
            crate::process_start().elapsed().as_secs_f64() * 1000.0
        );
        let vmm = Vmm {
            _signal_wake: signals::wake_on_signal(&self.exit),
            vcpus: handles,
            pause,
            i8042,
            event_manager: self.event_manager,
            exit: self.exit,
            _terminal: terminal,
            _vm: vm,
            ram,
            persist,
            vsock: parts.vsock,
            watch_halt,
            disks: parts.disks,
            nets: parts.nets,
            dirty,
        };
        // The main thread's own filter, after it started every thread it
        // starts (a thread inherits its parent's filter). On failure the VM
        // is dropped: its vCPUs are stopped.
        crate::seccomp::install(crate::seccomp::ThreadKind::Vmm)?;
        Ok(vmm)
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

/// What adding a device needs: the buses, the VM (for irqfds and
/// ioeventfds), guest memory (for virtio queues) and the event loop.
pub(crate) struct Devices<'a> {
    dm: &'a mut DeviceManager,
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    event_manager: &'a mut EventManager<Subscriber>,
    /// The disks added, in order (for snapshots).
    pub(crate) blocks: Vec<Arc<Mutex<Block>>>,
    /// The network devices' MAC addresses, in order.
    pub(crate) macs: Vec<net::MacAddr>,
}

impl Devices<'_> {
    /// COM1 (and its input), the i8042, ACPI PM registers, pvpanic and the
    /// boot-time marker on the port-I/O bus.
    pub(crate) fn add_legacy(&mut self, exit: &ExitSignal, console: Console) -> Result<()> {
        let serial_input = self.dm.attach_legacy_devices(
            self.vm,
            exit,
            console.out,
            console.input,
            crate::process_start(),
        )?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(serial_input)));
        Ok(())
    }

    /// A virtio device, over virtio-mmio and in the event loop: one
    /// object, the transport's device and the loop's subscriber.
    fn add_virtio(&mut self, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<()> {
        self.dm
            .attach_virtio_mmio(self.vm, self.mem, device.clone())?;
        self.event_manager.add_subscriber(device);
        Ok(())
    }

    /// One virtio-blk device per `--disk`, in order (vda, vdb, ...);
    /// returns them, for changes while the VM runs.
    pub(crate) fn add_disks(&mut self, disks: &[DiskConfig]) -> Result<Vec<Arc<Mutex<Block>>>> {
        let mut out = Vec::new();
        for (index, disk) in disks.iter().enumerate() {
            let block = Arc::new(Mutex::new(open_disk(index, disk)?));
            self.blocks.push(block.clone());
            self.add_virtio(block.clone())?;
            out.push(block);
        }
        Ok(out)
    }

    /// One virtio-fs device per `--fs`, each with its own virtiofsd.
    fn add_shares(&mut self, shares: &[FsConfig], virtiofsd: &Path) -> Result<()> {
        for share in shares {
            let fs = Arc::new(Mutex::new(crate::fs_share::open(share, virtiofsd)?));
            self.add_virtio(fs)?;
        }
        Ok(())
    }

    /// One virtio-net device per `--net`, in order (eth0, eth1, ...);
    /// returns them, for changes while the VM runs.
    pub(crate) fn add_nets(&mut self, nets: &[NetConfig]) -> Result<Vec<Arc<Mutex<Net>>>> {
        let macs: Vec<_> = nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.mac.unwrap_or_else(|| default_mac(i)))
            .collect();
        for (i, mac) in macs.iter().enumerate() {
            if let Some(j) = macs[..i].iter().position(|m| m == mac) {
                return Err(Error::DuplicateMac(j, i, *mac));
            }
        }
        self.macs = macs.clone();
        let mut out = Vec::new();
        for (index, (nic, mac)) in nets.iter().zip(macs).enumerate() {
            let device = Arc::new(Mutex::new(open_net(index, nic, mac)?));
            self.add_virtio(device.clone())?;
            out.push(device);
        }
        Ok(out)
    }

    /// The virtio-rng device, if the VM has one (its state is the
    /// transport's: queues and features; the rate limiter starts full).
    pub(crate) fn add_entropy(
        &mut self,
        limits: Option<devices::rate_limiter::Limits>,
    ) -> Result<()> {
        if let Some(limits) = limits {
            let rng = devices::rate_limiter::RateLimiter::new(limits.bandwidth, limits.ops)
                .and_then(devices::virtio::rng::Rng::with_limiter)
                .map_err(Error::Entropy)?;
            self.add_virtio(Arc::new(Mutex::new(rng)))?;
        }
        Ok(())
    }

    /// The virtio-vsock device: its socket is bound (0600, never
    /// replacing anything but a stale socket) before the device exists.
    pub(crate) fn add_vsock(&mut self, v: &VsockConfig) -> Result<VsockHandle> {
        let (listener, file) =
            crate::unixsock::bind(&v.uds_path).map_err(|why| Error::VsockSocket {
                path: v.uds_path.clone(),
                why,
            })?;
        // The socket file is unlinked when the VM ends, under Landlock.
        if let Some(parent) = v.uds_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::landlock::allow(parent, crate::landlock::Reach::RemoveEntries);
        }
        let device = Vsock::new(v.guest_cid, v.uds_path.clone(), listener).map_err(Error::Vsock)?;
        let device = Arc::new(Mutex::new(device));
        self.add_virtio(device.clone())?;
        log::info!(
            "vsock: guest CID {}, host socket {}",
            v.guest_cid,
            v.uds_path.display()
        );
        Ok(VsockHandle {
            device,
            _socket: file,
        })
    }

    /// The caller's devices and subscribers (`capsule exec`'s console and
    /// stdin pump).
    fn add_extras(&mut self, extras: Extras) -> Result<()> {
        for dev in extras.devices {
            self.add_virtio(dev)?;
        }
        for sub in extras.subscribers {
            self.event_manager.add_subscriber(sub);
        }
        Ok(())
    }
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
    let cmdline = kernel_cmdline(&config.cmdline, dm.virtio_mmio_devices(), no_acpi);
    let cmdline_size = load_cmdline(mem, &cmdline)?;
    arch::mptable::setup_mptable(mem, config.vcpus).map_err(Error::MpTable)?;
    let rsdp = arch::acpi::create_acpi_tables(mem, config.vcpus, dm.virtio_mmio_devices())
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
    Ok(no_acpi || config.cmdline.split_whitespace().any(|w| w == "acpi=off"))
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

/// Opens disk `index` as a virtio-blk device. The serial the guest reads
/// (GET_ID) is the image's file name, cut to the 20 bytes virtio allows.
fn open_disk(index: usize, disk: &DiskConfig) -> Result<Block> {
    let mut serial: String = disk
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("disk{index}"));
    while serial.len() > ID_BYTES {
        serial.pop();
    }
    let mut block = Block::new(BlockConfig {
        path: disk.path.clone(),
        read_only: disk.mode == DiskMode::ReadOnly,
        ephemeral: disk.mode == DiskMode::Ephemeral,
        serial,
    })
    .map_err(Error::Disk)?;
    block.set_rate_limiter(rate_limiter(&disk.limits).map_err(Error::RateLimiter)?);
    Ok(block)
}

/// The limiter for `limits` (one that limits nothing yet, if they are
/// empty: a `PATCH` may set limits while the VM runs).
fn rate_limiter(
    limits: &crate::config::Limits,
) -> std::io::Result<Option<devices::rate_limiter::RateLimiter>> {
    devices::rate_limiter::RateLimiter::new(limits.bandwidth, limits.ops).map(Some)
}

/// Creates network device `index` with its backend: opens the TAP device
/// or starts passt.
fn open_net(index: usize, nic: &NetConfig, mac: net::MacAddr) -> Result<Net> {
    let backend: Box<dyn NetBackend> = match &nic.backend {
        NetBackendConfig::Tap { name } => Box::new(Tap::open(name)?),
        NetBackendConfig::User { publish } => Box::new(Passt::spawn(&PasstConfig {
            binary: net::stream::default_passt_binary(),
            publish: publish.clone(),
            debug: log::log_enabled!(log::Level::Debug),
        })?),
    };
    log::info!(
        "network device {index}: {} with MAC {}",
        backend.describe(),
        net::format_mac(&mac)
    );
    let mut net = Net::new(backend, mac).map_err(|e| Error::Net(index, e))?;
    let rx = rate_limiter(&nic.rx_limits).map_err(|e| Error::Net(index, e))?;
    let tx = rate_limiter(&nic.tx_limits).map_err(|e| Error::Net(index, e))?;
    net.set_rate_limiters(rx, tx);
    Ok(net)
}
