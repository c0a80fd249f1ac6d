//! Assembles a VM from a [`VmConfig`], top to bottom:
//! host checks → KVM → guest memory → kernel, initrd, command line →
//! firmware tables and zero page → devices → vCPUs → running [`Vmm`].

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arch::layout;
use arch::GuestMemoryMmap;
use devices::legacy::serial::{ReadableFd, SerialOut};
use vm_memory::GuestAddress;

use devices::virtio::block::Block;
use devices::virtio::net;
use devices::virtio::VirtioDevice;

use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::kernel_load::{kernel_cmdline, load_cmdline, load_initrd, load_kernel, KernelEntry};
use crate::kernel_probe::Support;
use crate::vmm::{Subscriber, Vmm};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

mod attach;
mod error;
mod launch;
mod transport;
pub(crate) use self::attach::Devices;
pub use self::error::Error;
pub(crate) use self::launch::{Parts, Started};

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
    let mut files = UserFiles::open(config)?;
    crate::setup_step("user files opened");

    let (vm, ram) = create_vm(config, files.virtiofsd.is_some())?;
    let mem = ram.memory();

    let map_kernel = crate::kernel_map::allowed(config);
    let (entry, kernel_map) = load_kernel(mem, &config.kernel, &mut files.kernel, map_kernel)?;
    crate::setup_step("kernel loaded");
    let transport = transport::pick(config, &entry.support);
    let config = &VmConfig {
        transport: Some(transport),
        ..config.clone()
    };
    let initrd = if files.initrd.is_some() || config.initramfs.is_some() {
        Some(load_initrd(mem, files.initrd, config.initramfs.as_deref())?)
    } else {
        None
    };
    crate::setup_step("initrd loaded");

    let unsupported = snapshot_refusal(config, &extras);
    let (mut started, mut dm) = Started::new(console.raw_terminal)?;
    let exit = started.exit.clone();
    let mut devices = started.devices(&mut dm, &vm, mem, transport);
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
    if let Some(binary) = &files.virtiofsd {
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

/// What a VM's configuration names on the host, opened or checked before
/// anything else.
struct UserFiles<'a> {
    /// The kernel image.
    kernel: File,
    /// The initrd, and its path.
    initrd: Option<(&'a PathBuf, File)>,
    /// The virtiofsd binary, if the VM shares directories.
    virtiofsd: Option<PathBuf>,
}

impl<'a> UserFiles<'a> {
    /// Opens the kernel and initrd of `config`, and checks that the host
    /// has the memory it asks for and the virtiofsd its shares need.
    fn open(config: &'a VmConfig) -> Result<Self> {
        let kernel = open("kernel", &config.kernel)?;
        let initrd = config
            .initrd
            .as_ref()
            .map(|p| open("initrd", p).map(|f| (p, f)))
            .transpose()?;
        check_host_memory(config.mem_size)?;
        let virtiofsd = crate::fs_share::check(&config.fs)?;
        Ok(Self {
            kernel,
            initrd,
            virtiofsd,
        })
    }
}

/// Opens KVM, maps guest RAM and creates the VM on it. A vhost-user
/// backend (virtiofsd) maps guest RAM itself: with one (`shared`) RAM is
/// a shared memfd, else private anonymous memory.
fn create_vm(config: &VmConfig, shared: bool) -> Result<(Vm, GuestRam)> {
    let kvm = Vm::open_kvm(&config.kvm_path)?;
    crate::setup_step("/dev/kvm opened");
    let ranges = arch::memory::ram_regions(config.mem_size);
    let ram = if shared {
        GuestRam::new_shared(&ranges)
    } else {
        GuestRam::new(&ranges)
    };
    let ram = ram.map_err(|source| Error::GuestMemory {
        size: config.mem_size,
        source,
    })?;
    crate::setup_step("guest RAM mapped");
    let vm = Vm::new(kvm, ram.memory())?;
    crate::setup_step("VM created");
    Ok((vm, ram))
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
    let no_acpi = match &entry.support.acpi {
        Support::Absent(how) => {
            log::info!(
                "the kernel has no ACPI ({how}): its virtio-mmio devices are announced on its command line"
            );
            true
        }
        Support::Present(how) => {
            log::debug!("the kernel has ACPI ({how})");
            false
        }
        Support::Unknown => false,
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
            transport: Some(transport),
            ..VmConfig::bare("vmlinux")
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
