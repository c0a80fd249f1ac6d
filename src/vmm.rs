//! The running VM: its vCPU threads, the device event loop and what the
//! VMM does to a running guest (pause, resume, Ctrl-Alt-Del), and the one
//! place its event loop is driven. [`crate::builder`] makes one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::path::Path;

use devices::exit::{ExitSignal, GuestExit};
use devices::legacy::I8042;
use devices::rate_limiter::Limits;
use devices::virtio::block::BlockError;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::builder::{Error, Result};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{self, PauseGate, VcpuHandle};
use crate::vstate::vm::Vm;
use crate::{signals, terminal};

/// How long to wait for vCPU threads to stop once the VM ends.
pub(crate) const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// An event-loop subscriber shared with other parts of the VMM.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How [`Vmm::run`] ended.
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
    pub(crate) _signal_wake: signals::WakeGuard,
    /// The kernel, while it is mapped from its file (until a lease break
    /// or a snapshot settles it).
    pub(crate) kernel_map: Option<crate::kernel_map::KernelMap>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) pause: Arc<PauseGate>,
    pub(crate) i8042: Option<Arc<Mutex<I8042>>>,
    pub(crate) event_manager: EventManager<Subscriber>,
    /// What a snapshot of this VM saves (device handles: dropped with
    /// the event loop, before guest memory).
    pub(crate) persist: crate::snapshot::Handles,
    pub(crate) exit: ExitSignal,
    pub(crate) _terminal: Option<terminal::RawModeGuard>,
    pub(crate) _vm: Vm,
    pub(crate) ram: GuestRam,
    /// Kick the vCPUs now and then to see whether they halted for good
    /// (a guest without ACPI: `vstate::halt`).
    pub(crate) watch_halt: bool,
    /// The guest was booted with its kernel console on COM1 (not
    /// `quiet`): stopped by a signal before it wrote a byte there, it has
    /// its vCPUs' state logged, to tell a guest that never ran from one
    /// that ran without a console.
    pub(crate) serial_console: bool,
    /// The virtio-blk devices, in the guest's order (vda, vdb, ...).
    pub(crate) disks: Vec<Arc<Mutex<devices::virtio::block::Block>>>,
    /// The virtio-net devices, in the guest's order (eth0, eth1, ...).
    pub(crate) nets: Vec<Option<Arc<Mutex<devices::virtio::net::Net>>>>,
    pub(crate) vsock: Option<VsockHandle>,
    /// The virtio-balloon device.
    pub(crate) balloon: Option<Arc<Mutex<devices::virtio::balloon::Balloon>>>,
    /// The pages written since the last Full snapshot, when the VM
    /// tracks them (for Diff snapshots).
    pub(crate) dirty: Option<crate::vstate::dirty::DirtyLog>,
}

/// The vsock device of a VM and its host socket file (removed when the
/// VM is dropped).
pub struct VsockHandle {
    pub(crate) device: Arc<Mutex<devices::virtio::vsock::Vsock>>,
    pub(crate) _socket: crate::unixsock::SocketFile,
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
    /// The transport its virtio devices are on: the one its configuration
    /// named, else the one capsule picked for its kernel (a restored VM's:
    /// the one its snapshot recorded).
    pub fn transport(&self) -> crate::config::Transport {
        self.persist.config.transport.unwrap_or_default()
    }

    /// Starts logging the pages the guest and the devices write, for Diff
    /// snapshots once a first Full one is taken (the API's
    /// `track_dirty_pages` at boot); nothing if the VM already does.
    pub fn track_dirty_pages(&mut self) -> std::result::Result<(), crate::vstate::dirty::Error> {
        if self.dirty.is_none() {
            self.dirty = Some(crate::vstate::dirty::DirtyLog::enable(
                self._vm.fd(),
                self.ram.memory(),
            )?);
        }
        Ok(())
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
        self.wait_parked(
            total,
            |parked| parked >= total,
            || vcpus.iter().for_each(VcpuHandle::kick),
        )?;
        log::info!("VM paused ({total} vCPUs parked)");
        Ok(())
    }

    /// Resumes a paused VM; returns once every vCPU has left the parked
    /// state (is about to enter `KVM_RUN`).
    pub fn resume(&mut self) -> std::result::Result<(), PauseError> {
        self.pause.set_requested(false);
        self.wait_parked(self.vcpus.len(), |parked| parked == 0, || {})?;
        log::info!("VM resumed");
        Ok(())
    }

    /// Waits up to [`PAUSE_TIMEOUT`] until `cond(parked vCPUs)` holds,
    /// calling `kick` meanwhile; a time-out reports how many of `total`
    /// vCPUs were parked.
    fn wait_parked(
        &self,
        total: usize,
        cond: impl Fn(usize) -> bool,
        kick: impl FnMut(),
    ) -> std::result::Result<(), PauseError> {
        if self.pause.wait_parked(PAUSE_TIMEOUT, cond, kick) {
            Ok(())
        } else {
            Err(PauseError::Timeout {
                parked: self.pause.parked(),
                total,
                timeout: PAUSE_TIMEOUT,
            })
        }
    }

    /// Lets every virtio-blk device's requests in flight complete (used
    /// ring, interrupt), so that none writes guest memory afterwards: the
    /// io_uring engine's reads land from the kernel's side. All of the
    /// VM's block devices, a restored VM's too.
    pub(crate) fn quiesce_disks(&self) {
        for block in &self.persist.blocks {
            block.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
        }
    }

    /// Copies the kernel's pages out of its file mapping into guest RAM
    /// and releases the file ([`crate::kernel_map`]), if it is mapped:
    /// with the vCPUs parked (paused here if they were not) and block
    /// requests in flight completed, so that nothing writes guest RAM
    /// meanwhile. Nothing to do if the kernel was copied.
    pub(crate) fn settle_kernel_map(&mut self) -> std::result::Result<(), PauseError> {
        let Some(kmap) = self.kernel_map.take() else {
            return Ok(());
        };
        let was_paused = self.pause.requested();
        if !was_paused {
            if let Err(e) = self.pause() {
                self.kernel_map = Some(kmap);
                return Err(e);
            }
        }
        self.quiesce_disks();
        if let Err(e) = kmap.settle() {
            // The lease is gone with the map: the file may now change
            // under the pages not copied.
            log::error!("kernel: cannot copy the mapped pages into guest RAM: {e}");
        }
        if !was_paused {
            self.resume()?;
        }
        Ok(())
    }

    /// Drops every vsock connection and sends the guest's driver a
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (for a snapshot restore: the
    /// host ends of the connections did not survive it). Returns false if
    /// the VM has no vsock device.
    pub fn vsock_transport_reset(&self) -> bool {
        match &self.vsock {
            Some(v) => {
                v.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .transport_reset();
                true
            }
            None => false,
        }
    }

    /// Changes disk `index` (in the guest's order) while the VM runs: a
    /// new image at `image` (for the guest, a media change) and/or new
    /// `limits`. The VM's configuration follows, so that a snapshot saves
    /// the disk as it now is. `None` if the VM has no such disk.
    pub fn change_disk(
        &mut self,
        index: usize,
        image: Option<&Path>,
        limits: Option<Limits>,
    ) -> Option<std::result::Result<(), BlockError>> {
        let mut disk = self
            .disks
            .get(index)?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let config = self.persist.config.disks.get_mut(index)?;
        if let Some(path) = image {
            if let Err(e) = disk.replace_image(path) {
                return Some(Err(e));
            }
            config.path = path.to_owned();
        }
        if let Some(l) = limits {
            disk.update_rate_limiter(l.bandwidth, l.ops);
            config.limits = l;
        }
        Some(Ok(()))
    }

    /// New limits on what network device `index` (in the guest's order)
    /// receives (`rx`) and sends (`tx`) while the VM runs (`None` leaves
    /// a direction as it is); the VM's configuration follows, so that a
    /// snapshot saves them. False if the VM has no such device (a
    /// vhost-net device's frames do not pass through capsule).
    pub fn change_net(&mut self, index: usize, rx: Option<Limits>, tx: Option<Limits>) -> bool {
        let Some(net) = self.nets.get(index).and_then(Option::as_ref) else {
            return false;
        };
        let Some(config) = self.persist.config.nets.get_mut(index) else {
            return false;
        };
        net.lock()
            .unwrap_or_else(|e| e.into_inner())
            .update_rate_limiters(rx, tx);
        config.rx_limits = rx.unwrap_or(config.rx_limits);
        config.tx_limits = tx.unwrap_or(config.tx_limits);
        true
    }

    /// The balloon device, if the VM has one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<devices::virtio::balloon::Balloon>>> {
        self.balloon.as_ref()
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

    /// Says so when a guest with virtio-pci devices ends without ever
    /// having looked at PCI bus 0: its kernel most likely has no PCI
    /// support, so it found none of its devices (a root file system on a
    /// disk among them). A guest stopped by the host counts only if it got
    /// as far as writing to its console.
    fn hint_unprobed_pci(&self, end: GuestExit) {
        let Some(root) = &self.persist.pci_root else {
            return;
        };
        if root.lock().unwrap_or_else(|e| e.into_inner()).probed() {
            return;
        }
        if end == GuestExit::Stopped && devices::metrics::UART.write_count.get() == 0 {
            return;
        }
        log::warn!(
            "the guest never looked at PCI bus 0, where its virtio devices are (--transport pci): \
             if its kernel has no PCI support (CONFIG_PCI, CONFIG_PCI_MSI, CONFIG_VIRTIO_PCI), \
             boot it with --transport mmio"
        );
    }

    /// The VM's run loop (the only one): runs the device event loop until
    /// the guest powers off, resets, panics or faults, or `check` asks to
    /// stop; then stops the vCPUs. `check` runs before every event-loop
    /// round, and at least every `tick` (with `None` a round waits for an
    /// event however long it takes; a guest without ACPI has rounds every
    /// `vstate::halt::CHECK_EVERY` all the same, to see whether it halted
    /// for good); it gets the VM, so it may act on it
    /// (the API pauses and resumes it from there). A guest exit is only
    /// reported if `check` did not ask to stop first.
    pub fn run<T>(
        mut self,
        tick: Option<Duration>,
        mut check: impl FnMut(&mut Vmm) -> Option<T>,
    ) -> Result<RunEnd<T>> {
        // With a halt watch, rounds end at least every halt check, to kick
        // the vCPUs.
        let every = crate::vstate::halt::CHECK_EVERY;
        let tick = match (tick, self.watch_halt) {
            (Some(t), true) => Some(t.min(every)),
            (None, true) => Some(every),
            (t, false) => t,
        };
        let tick_ms = tick.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut last_kick = std::time::Instant::now();
        let end = loop {
            if let Some(t) = check(&mut self) {
                break RunEnd::Host(t);
            }
            if signals::take_state_request() {
                log::warn!("SIGUSR2: the VM's state follows");
                crate::stall::log_state(&mut self, log::Level::Warn);
            }
            if let Some(r) = self.exit.reason() {
                if r == GuestExit::Stopped
                    && self.serial_console
                    && devices::metrics::UART.write_count.get() == 0
                {
                    log::warn!("the guest never wrote to its serial console (console=ttyS0); where it was:");
                    crate::stall::log_vcpus(&mut self, log::Level::Warn, "silent guest");
                }
                self.hint_unprobed_pci(r);
                break RunEnd::Guest(r);
            }
            if self
                .kernel_map
                .as_ref()
                .is_some_and(crate::kernel_map::KernelMap::wants_settle)
            {
                log::info!("kernel file opened for writing elsewhere: copying the mapped kernel");
                if let Err(e) = self.settle_kernel_map() {
                    // Tried again on the next round (the break stays
                    // pending until the lease is released or times out).
                    log::warn!("kernel: cannot pause to copy the mapped kernel: {e}");
                }
            }
            if self.watch_halt && last_kick.elapsed() >= every {
                // A halted vCPU does not leave KVM_RUN by itself: kicked,
                // it reports whether it halted for good (vstate::halt).
                self.vcpus.iter().for_each(VcpuHandle::kick);
                last_kick = std::time::Instant::now();
            }
            self.event_manager
                .run_with_timeout(tick_ms)
                .map_err(Error::EventLoop)?;
        };
        vcpu::stop_all(&mut self.vcpus, VCPU_STOP_TIMEOUT);
        Ok(end)
    }
}

/// Wakes the event loop when the VM must end.
pub(crate) struct ExitWatcher(pub(crate) ExitSignal);

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
