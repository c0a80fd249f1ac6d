//! Starting a built VM: the event loop and the exit signal made before
//! its devices, then raw terminal mode, dirty page tracking, Landlock,
//! the vCPU threads and the main thread's seccomp filter. Shared by a
//! boot ([`super::build_with`]) and a snapshot restore
//! ([`crate::snapshot::restore`]).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arch::GuestMemoryMmap;
use devices::exit::ExitSignal;
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use event_manager::{EventManager, SubscriberOps};

use super::{Devices, Error, Result, Transport};
use crate::config::format_size;
use crate::device_manager::DeviceManager;
use crate::vmm::{ExitWatcher, Subscriber, Vmm, VCPU_STOP_TIMEOUT};
use crate::vstate::dirty::DirtyLog;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{self, PauseGate, Vcpu, VcpuHandle, VcpuIo};
use crate::vstate::vm::Vm;
use crate::{signals, terminal};

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
/// ([`super::build_with`]) and a snapshot restore ([`crate::snapshot::restore`]).
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
        let count = vcpus.len();
        let mem_size: u64 = persist.config.mem_size;
        let terminal = raw_terminal(self.raw_terminal)?;
        let i8042 = dm.i8042.clone();
        let pause = Arc::new(PauseGate::default());
        pause.set_requested(parts.paused);
        let io = VcpuIo {
            pio: Arc::new(dm.pio),
            mmio: Arc::new(dm.mmio),
            exit: self.exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            pause: pause.clone(),
            halt: halt_watch(parts.no_acpi, count),
        };
        let watch_halt = io.halt.is_some();
        let dirty = dirty_log(&vm, &ram, parts.track_dirty)?;
        // Setup is over: from here on capsule reaches only the files the VM
        // was configured with (the vCPU threads inherit this).
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

/// Stdin's terminal in raw mode while the VM runs, if `raw` and stdin is
/// a terminal; restored when the guard is dropped.
fn raw_terminal(raw: bool) -> Result<Option<terminal::RawModeGuard>> {
    Ok(raw
        .then(terminal::enter_raw_mode)
        .transpose()
        .map_err(Error::Terminal)?
        .flatten())
}

/// The watch for a poweroff by halting, for a guest without ACPI: its
/// poweroff is a halt of every CPU (with ACPI it powers off through ACPI,
/// and a halt is a halt, which leaves a machine on).
fn halt_watch(no_acpi: bool, vcpus: usize) -> Option<Arc<crate::vstate::halt::HaltWatch>> {
    no_acpi.then(|| Arc::new(crate::vstate::halt::HaltWatch::new(vcpus)))
}

/// The dirty page log of `vm`'s memory, if `track` asks for one
/// (`Some(base)`, `base` the Full snapshot the memory is a copy of).
fn dirty_log(vm: &Vm, ram: &GuestRam, track: Option<Option<u64>>) -> Result<Option<DirtyLog>> {
    match track {
        Some(base) => {
            let mut log = DirtyLog::enable(vm.fd(), ram.memory())?;
            log.base = base;
            Ok(Some(log))
        }
        None => Ok(None),
    }
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
