//! Assembles a VM from a [`VmConfig`], top to bottom:
//! host checks → KVM → guest memory → kernel, initrd, command line →
//! firmware tables and zero page → devices → vCPUs → running [`Vmm`].

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arch::layout;
use devices::exit::{ExitSignal, GuestExit};
use devices::legacy::serial::{ReadableFd, SerialOut};
use devices::legacy::I8042;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use arch::acpi::MmioDevice;
use devices::virtio::block::{Block, BlockConfig, BlockError, ID_BYTES};
use devices::virtio::net::{self, Net, NetBackend, Passt, PasstConfig, PasstError, Tap, TapError};
use devices::virtio::VirtioDevice;

use crate::config::{
    default_mac, format_size, DiskConfig, DiskMode, NetBackendConfig, NetConfig, VmConfig,
};
use crate::device_manager::{self, DeviceManager};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{self, PauseGate, Vcpu, VcpuHandle, VcpuIo};
use crate::vstate::vm::{self, Vm};
use crate::{signals, terminal};

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// How long to wait for vCPU threads to stop once the VM ends.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors while building or running a VM. Each message names what failed
/// and, for files, which file.
#[derive(Debug, thiserror::Error)]
#[allow(clippy::large_enum_variant)]
pub enum Error {
    /// A user-supplied file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
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
    /// The initrd does not fit in guest memory.
    #[error("initrd {path} ({size}) does not fit in guest memory: {source}")]
    InitrdTooBig {
        /// The initrd file.
        path: PathBuf,
        /// Its size.
        size: String,
        /// Underlying error.
        source: arch::boot::Error,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// More memory than the host has.
    #[error("cannot give the guest {asked}: the host has {host} of RAM")]
    HostMemory {
        /// Requested size.
        asked: String,
        /// Host RAM.
        host: String,
    },
    /// Guest memory could not be mapped.
    #[error("cannot allocate {0} of guest memory: {1}")]
    GuestMemory(String, String),
    /// KVM VM setup failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Device setup failed.
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    /// Writing boot data structures failed.
    #[error("cannot write {0}: {1}")]
    Boot(&'static str, String),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// A disk image could not be attached.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A TAP device could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// passt could not be started.
    #[error(transparent)]
    Passt(#[from] PasstError),
    /// Two network devices have the same MAC address.
    #[error("network devices {0} and {1} have the same MAC address {2}")]
    DuplicateMac(usize, usize, String),
    /// A network device could not be created.
    #[error("cannot create network device {0}: {1}")]
    Net(usize, std::io::Error),
    /// The terminal could not be put in raw mode.
    #[error("cannot set up the terminal: {0}")]
    Terminal(std::io::Error),
}

type Result<T> = std::result::Result<T, Error>;

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

/// An event-loop subscriber shared with other parts of the VMM.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Devices and event-loop subscribers added by the caller (e.g. `exec`).
#[derive(Default)]
pub struct Extras {
    /// Virtio devices, attached over virtio-mmio after the disks and
    /// nets (each is also its own event-loop subscriber).
    pub devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    /// More event-loop subscribers.
    pub subscribers: Vec<Subscriber>,
}

/// How [`Vmm::run_with`] ended.
#[derive(Debug)]
pub enum RunEnd<T> {
    /// The guest ended the VM.
    Guest(GuestExit),
    /// The caller's check asked to stop.
    Host(T),
}

/// A running VM.
pub struct Vmm {
    // Field order is drop order: signals stop waking the exit eventfd
    // before it closes; vCPU threads go before the memory they use.
    _signal_wake: signals::WakeGuard,
    vcpus: Vec<VcpuHandle>,
    pause: Arc<PauseGate>,
    i8042: Option<Arc<Mutex<I8042>>>,
    event_manager: EventManager<Subscriber>,
    exit: ExitSignal,
    _terminal: Option<terminal::RawModeGuard>,
    _vm: Vm,
    ram: GuestRam,
}

/// Errors of [`Vmm::pause`] and [`Vmm::resume`].
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Not every vCPU reached the parked state in time.
    #[error("only {parked} of {total} vCPUs paused within {timeout:?}")]
    Timeout {
        /// vCPUs parked.
        parked: usize,
        /// vCPUs running.
        total: usize,
        /// How long capsule waited.
        timeout: Duration,
    },
}

/// How long [`Vmm::pause`] and [`Vmm::resume`] wait for the vCPUs.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for Vmm {
    fn drop(&mut self) {
        if !vcpu::stop_all(&mut self.vcpus, VCPU_STOP_TIMEOUT) {
            // A vCPU still in KVM_RUN reaches guest RAM by address.
            self.ram.keep_mapped();
        }
    }
}

impl Vmm {
    /// Runs one round of the device event loop, waiting at most `timeout`
    /// for an event; returns the guest's exit reason once it has ended the
    /// VM. The vCPUs keep running (or stay paused) in between.
    pub fn run_once(&mut self, timeout: Duration) -> Result<Option<GuestExit>> {
        if let Some(r) = self.exit.reason() {
            return Ok(Some(r));
        }
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        self.event_manager
            .run_with_timeout(ms)
            .map_err(|e| Error::EventLoop(e.to_string()))?;
        Ok(self.exit.reason())
    }

    /// Adds an event-loop subscriber to the running VM (e.g. a waker for
    /// API requests).
    pub fn add_subscriber(&mut self, sub: Subscriber) {
        self.event_manager.add_subscriber(sub);
    }

    /// Pauses the VM: every vCPU leaves `KVM_RUN` and parks. Returns once
    /// all of them are parked. Devices keep running (a paused guest's
    /// queued I/O completes; its interrupts wait in the irqchip).
    pub fn pause(&mut self) -> std::result::Result<(), PauseError> {
        self.pause.set_requested(true);
        let total = self.vcpus.iter().filter(|v| !v.is_finished()).count();
        let vcpus = &self.vcpus;
        if self.pause.wait_parked(
            PAUSE_TIMEOUT,
            |parked| parked >= total,
            || vcpus.iter().for_each(VcpuHandle::kick),
        ) {
            log::info!("VM paused ({total} vCPUs parked)");
            Ok(())
        } else {
            Err(PauseError::Timeout {
                parked: self.pause.parked(),
                total,
                timeout: PAUSE_TIMEOUT,
            })
        }
    }

    /// Resumes a paused VM; returns once every vCPU has left the parked
    /// state (is about to enter `KVM_RUN`).
    pub fn resume(&mut self) -> std::result::Result<(), PauseError> {
        self.pause.set_requested(false);
        let total = self.vcpus.len();
        if self
            .pause
            .wait_parked(PAUSE_TIMEOUT, |parked| parked == 0, || {})
        {
            log::info!("VM resumed");
            Ok(())
        } else {
            Err(PauseError::Timeout {
                parked: self.pause.parked(),
                total,
                timeout: PAUSE_TIMEOUT,
            })
        }
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard (i8042). Returns false
    /// if the keyboard's buffer is full (the guest is not reading it).
    pub fn send_ctrl_alt_del(&self) -> bool {
        match &self.i8042 {
            Some(k) => k
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger_ctrl_alt_del(),
            None => false,
        }
    }

    /// Runs the device event loop until the guest powers off, resets,
    /// panics or faults; then stops the vCPUs.
    pub fn run(mut self) -> Result<GuestExit> {
        let reason = loop {
            if let Some(r) = self.exit.reason() {
                break r;
            }
            self.event_manager
                .run()
                .map_err(|e| Error::EventLoop(e.to_string()))?;
        };
        vcpu::stop_all(&mut self.vcpus, VCPU_STOP_TIMEOUT);
        Ok(reason)
    }

    /// Like [`Self::run`], but calls `check` before every event-loop round
    /// and at least every `tick`; when it returns `Some`, the vCPUs are
    /// stopped and that value is returned. A guest exit is only reported if
    /// `check` did not ask to stop first.
    pub fn run_with<T>(
        mut self,
        tick: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<RunEnd<T>> {
        let tick_ms = i32::try_from(tick.as_millis()).unwrap_or(i32::MAX);
        let end = loop {
            if let Some(t) = check() {
                break RunEnd::Host(t);
            }
            if let Some(r) = self.exit.reason() {
                break RunEnd::Guest(r);
            }
            self.event_manager
                .run_with_timeout(tick_ms)
                .map_err(|e| Error::EventLoop(e.to_string()))?;
        };
        vcpu::stop_all(&mut self.vcpus, VCPU_STOP_TIMEOUT);
        Ok(end)
    }
}

/// Wakes the event loop when the VM must end.
struct ExitWatcher(ExitSignal);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch for guest exit: {e}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.clear_event();
        if let Some(sig) = signals::pending() {
            if self.0.reason().is_none() {
                log::warn!("{}: stopping the VM", signals::name(sig));
            }
            self.0.signal(GuestExit::Stopped);
        }
    }
}

/// Builds and starts a VM.
pub fn build(config: &VmConfig, console: Console) -> Result<Vmm> {
    build_with(config, console, Extras::default())
}

/// Builds and starts a VM with extra devices and subscribers.
pub fn build_with(config: &VmConfig, console: Console, extras: Extras) -> Result<Vmm> {
    // Open user files first: a typo should not cost a KVM setup.
    let mut kernel = open("kernel", &config.kernel)?;
    let initrd = config
        .initrd
        .as_ref()
        .map(|p| open("initrd", p).map(|f| (p, f)))
        .transpose()?;
    check_host_memory(config.mem_size)?;

    let kvm = Vm::open_kvm(&config.kvm_path)?;
    let mut ram = GuestRam::new(&arch::memory::ram_regions(config.mem_size))
        .map_err(|e| Error::GuestMemory(format_size(config.mem_size), e.to_string()))?;
    let mem = ram.memory();
    let vm = Vm::new(kvm, mem)?;

    let entry = load_kernel(mem, &config.kernel, &mut kernel)?;
    let initrd = if initrd.is_some() || config.initramfs.is_some() {
        Some(load_initrd(mem, initrd, config.initramfs.as_deref())?)
    } else {
        None
    };

    let mut event_manager =
        EventManager::<Subscriber>::new().map_err(|e| Error::EventLoop(e.to_string()))?;
    let exit = ExitSignal::new().map_err(|e| Error::EventLoop(e.to_string()))?;
    event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));

    let mut dm = DeviceManager::new();
    let serial_input = dm.attach_legacy_devices(
        &vm,
        &exit,
        console.out,
        console.input,
        crate::process_start(),
    )?;
    event_manager.add_subscriber(Arc::new(Mutex::new(serial_input)));
    let mut add_virtio = |device: Arc<Mutex<dyn VirtioDevice>>| -> Result<()> {
        // One object: the transport's device and the event loop's subscriber.
        dm.attach_virtio_mmio(&vm, mem, device.clone())?;
        event_manager.add_subscriber(device);
        Ok(())
    };
    for (index, disk) in config.disks.iter().enumerate() {
        add_virtio(Arc::new(Mutex::new(open_disk(index, disk)?)))?;
    }
    let macs: Vec<_> = config
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| n.mac.unwrap_or_else(|| default_mac(i)))
        .collect();
    for (i, mac) in macs.iter().enumerate() {
        if let Some(j) = macs[..i].iter().position(|m| m == mac) {
            return Err(Error::DuplicateMac(j, i, net::format_mac(mac)));
        }
    }
    for (index, (nic, mac)) in config.nets.iter().zip(macs).enumerate() {
        add_virtio(Arc::new(Mutex::new(open_net(index, nic, mac)?)))?;
    }
    for device in extras.devices {
        add_virtio(device)?;
    }
    for sub in extras.subscribers {
        event_manager.add_subscriber(sub);
    }

    let cmdline = kernel_cmdline(&config.cmdline, dm.virtio_mmio_devices());
    let cmdline_size = load_cmdline(mem, &cmdline)?;
    arch::mptable::setup_mptable(mem, config.vcpus)
        .map_err(|e| Error::Boot("MP table", e.to_string()))?;
    let rsdp = arch::acpi::create_acpi_tables(mem, config.vcpus, dm.virtio_mmio_devices())
        .map_err(|e| Error::Boot("ACPI tables", e.to_string()))?;
    arch::boot::configure_system(
        mem,
        GuestAddress(layout::CMDLINE_START),
        cmdline_size,
        initrd.as_ref(),
        entry.setup_header,
        Some(rsdp),
    )
    .map_err(|e| Error::Boot("zero page", e.to_string()))?;

    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(vm.fd(), index)?;
        vcpu.configure(vm.kvm(), mem, entry.address, config.vcpus)?;
        vcpus.push(vcpu);
    }

    let terminal = if console.raw_terminal {
        terminal::enter_raw_mode().map_err(Error::Terminal)?
    } else {
        None
    };

    vcpu::install_kick_handler()?;
    let pause = Arc::new(PauseGate::default());
    let i8042 = dm.i8042.clone();
    let io = VcpuIo {
        pio: Arc::new(dm.pio),
        mmio: Arc::new(dm.mmio),
        exit: exit.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        pause: pause.clone(),
    };
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
    log::info!(
        "VM started: {} vCPU(s), {} of memory, {:.1} ms after capsule started",
        config.vcpus,
        format_size(config.mem_size),
        crate::process_start().elapsed().as_secs_f64() * 1000.0
    );

    Ok(Vmm {
        _signal_wake: signals::wake_on_signal(&exit),
        vcpus: handles,
        pause,
        i8042,
        event_manager,
        exit,
        _terminal: terminal,
        _vm: vm,
        ram,
    })
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

fn check_host_memory(asked: u64) -> Result<()> {
    // SAFETY: sysinfo only fills the struct it is given.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Ok(()); // Cannot tell; let the mapping decide.
    }
    let host = info.totalram.saturating_mul(u64::from(info.mem_unit));
    if asked > host {
        return Err(Error::HostMemory {
            asked: format_size(asked),
            host: format_size(host),
        });
    }
    Ok(())
}

/// Where and how the kernel starts.
struct KernelEntry {
    address: u64,
    setup_header: Option<linux_loader::bootparam::setup_header>,
}

fn load_kernel(mem: &GuestMemoryMmap, path: &Path, file: &mut File) -> Result<KernelEntry> {
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| Error::LoadKernel {
        path: path.to_path_buf(),
        source,
    };
    match Elf::load(mem, None, file, himem) {
        Ok(r) => {
            return Ok(KernelEntry {
                address: r.kernel_load.0,
                setup_header: None,
            })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {}
        Err(e) => return Err(load_err(e)),
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|source| Error::File {
            what: "kernel",
            path: path.to_path_buf(),
            source,
        })?;
    match BzImage::load(mem, None, file, himem) {
        Ok(r) => Ok(KernelEntry {
            address: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            setup_header: r.setup_header,
        }),
        Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)) => {
            Err(Error::NotAKernel(path.to_path_buf()))
        }
        Err(e) => Err(load_err(e)),
    }
}

/// Loads the initrd file (if any) followed by the generated initramfs
/// bytes (if any, 4-byte aligned after the file, as the kernel accepts
/// concatenated archives) at the top of low memory.
fn load_initrd(
    mem: &GuestMemoryMmap,
    file: Option<(&PathBuf, File)>,
    extra: Option<&[u8]>,
) -> Result<arch::boot::InitrdConfig> {
    let (path, file_size) = match &file {
        Some((path, f)) => {
            let size = f.metadata().map_err(|source| Error::File {
                what: "initrd",
                path: path.to_path_buf(),
                source,
            })?;
            (path.to_path_buf(), size.len())
        }
        None => (PathBuf::from("(generated initramfs)"), 0),
    };
    let file_err = |source| Error::File {
        what: "initrd",
        path: path.clone(),
        source,
    };
    let extra_at = if extra.is_some() {
        file_size.next_multiple_of(4)
    } else {
        file_size
    };
    let total = extra_at + extra.map_or(0, |e| e.len() as u64);
    let size = usize::try_from(total).map_err(|_| file_err(std::io::Error::other("too large")))?;
    let address =
        arch::boot::initrd_load_addr(mem, size).map_err(|source| Error::InitrdTooBig {
            path: path.clone(),
            size: format_size(total),
            source,
        })?;
    if let Some((_, mut f)) = file {
        mem.read_exact_volatile_from(address, &mut f, file_size as usize)
            .map_err(|e| file_err(std::io::Error::other(e.to_string())))?;
    }
    if let Some(extra) = extra {
        // Zero the alignment gap, then the archive.
        let gap = vec![0u8; (extra_at - file_size) as usize];
        mem.write_slice(&gap, address.unchecked_add(file_size))
            .and_then(|()| mem.write_slice(extra, address.unchecked_add(extra_at)))
            .map_err(|e| Error::Boot("initramfs", e.to_string()))?;
    }
    Ok(arch::boot::InitrdConfig { address, size })
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
    Block::new(BlockConfig {
        path: disk.path.clone(),
        read_only: disk.mode == DiskMode::ReadOnly,
        ephemeral: disk.mode == DiskMode::Ephemeral,
        serial,
    })
    .map_err(Error::Disk)
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
    Net::new(backend, mac).map_err(|e| Error::Net(index, e))
}

/// The command line the guest gets. With ACPI (the default) virtio-mmio
/// devices are described in the DSDT; a guest booted with `acpi=off` does
/// not read it, so the devices are then announced with
/// `virtio_mmio.device=` entries instead (its legacy interrupt routing maps
/// the lines those name).
fn kernel_cmdline(user: &str, virtio_mmio: &[MmioDevice]) -> String {
    let mut cmdline = user.to_string();
    if user.split_whitespace().any(|w| w == "acpi=off") {
        for dev in virtio_mmio {
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                dev.len >> 10,
                dev.base,
                dev.gsi
            ));
        }
    }
    cmdline
}

/// Writes the command line; returns its size including the NUL.
fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize> {
    let mut c =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    c.insert_str(cmdline).map_err(|e| {
        Error::Cmdline(format!(
            "{e} (at most {} bytes)",
            layout::CMDLINE_MAX_SIZE - 1
        ))
    })?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &c)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let len = c.as_cstring().map_err(|e| Error::Cmdline(e.to_string()))?;
    Ok(len.as_bytes_with_nul().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_mmio_on_cmdline_only_without_acpi() {
        let devs = [MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        }];
        assert_eq!(kernel_cmdline("console=ttyS0", &devs), "console=ttyS0");
        assert_eq!(
            kernel_cmdline("console=ttyS0 acpi=off", &devs),
            "console=ttyS0 acpi=off virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
