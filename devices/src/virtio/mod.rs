//! Virtio devices and their transports.
//!
//! A device model ([`VirtioDevice`], e.g. [`block::Block`]) knows nothing
//! about how the guest reaches it; a transport ([`mmio::MmioTransport`], a
//! virtio-pci one later) owns the registers the driver programs and drives
//! the device through the [`VirtioDevice`] trait. The same device object
//! therefore works behind any transport.
//!
//! # Objects and threads
//!
//! * The device lives in an `Arc<Mutex<D>>`. The transport holds one clone
//!   (as `Arc<Mutex<dyn VirtioDevice>>`) and is itself a [`BusDevice`] that
//!   vCPU threads call on guest register accesses. Devices that do I/O also
//!   implement [`MutEventSubscriber`]; the VMM adds another clone of the same
//!   `Arc` to its event manager **when it builds the VM**, long before the
//!   guest activates the device.
//! * The transport creates one notification [`EventFd`] per queue
//!   ([`mmio::MmioTransport::queue_evts`]) and one interrupt `EventFd`
//!   ([`mmio::MmioTransport::interrupt_evt`]). The VMM registers the queue
//!   eventfds as KVM ioeventfds and the interrupt eventfd as a KVM irqfd.
//!
//! # Activation
//!
//! 1. The driver negotiates features and programs the queues through
//!    transport registers (vCPU thread).
//! 2. When it sets `DRIVER_OK`, the transport validates every ready queue
//!    against guest memory and calls [`VirtioDevice::activate`] with guest
//!    memory, the interrupt object, the queues and duplicates of the queue
//!    eventfds.
//! 3. The device stores them and hands the eventfds to its [`QueueEvents`],
//!    which writes the device's *control* eventfd. That eventfd was added to
//!    the event loop in the subscriber's `init`.
//! 4. The event loop wakes on the control eventfd; the subscriber calls
//!    [`QueueEvents::sync`], which adds the queue eventfds to the loop with
//!    `EventOps::add`. From then on queue work happens on the event-loop
//!    thread.
//!
//! # Notification and interrupts
//!
//! The driver writes a queue index to the transport's notify register. KVM
//! turns that write into an eventfd signal through the ioeventfd (without a
//! VM exit); if no ioeventfd is registered the transport signals the same
//! eventfd itself. The event loop then calls the device's `process`, which
//! drains the queue, fills the used ring and calls
//! [`VirtioInterrupt::trigger`]. For MMIO that sets a bit in the
//! `InterruptStatus` register and writes the irqfd, which KVM injects.
//!
//! # Reset
//!
//! When the driver writes 0 to the status register the transport calls
//! [`VirtioDevice::reset`]. The device drops guest memory, interrupt and
//! queues at once (so it cannot touch guest memory afterwards) and retires
//! its queue eventfds through [`QueueEvents::deactivate`]; the event loop
//! removes them from epoll on the next control event, and only then are they
//! closed. (Closing first would leave stale epoll registrations behind,
//! because the transport still holds other descriptors of the same eventfds.)
//!
//! [`BusDevice`]: crate::bus::BusDevice

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::Queue;

#[doc(no_inline)]
pub use event_manager::MutEventSubscriber;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest OS has noticed the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// The driver has acknowledged the features it understands.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bit numbers shared by all device types.
pub mod features {
    use virtio_bindings::virtio_config as c;
    use virtio_bindings::virtio_ring as r;

    /// The device complies with virtio 1.x (mandatory for modern transports).
    pub const VIRTIO_F_VERSION_1: u32 = c::VIRTIO_F_VERSION_1;
    /// The driver may use indirect descriptor tables.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = r::VIRTIO_RING_F_INDIRECT_DESC;
    /// `used_event` / `avail_event` notification suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = r::VIRTIO_RING_F_EVENT_IDX;

    /// The mask for feature bit number `bit`.
    pub const fn bit(bit: u32) -> u64 {
        1u64 << bit
    }
}

/// Virtio device type ids (virtio 1.2 §5).
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
    /// Console device.
    pub const CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
    /// Network device.
    pub const NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
}

/// What an interrupt tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device put buffers in the used ring of this queue.
    Queue(u16),
    /// The device configuration space changed (or the device needs a reset).
    Config,
}

/// How a device interrupts the driver; implemented by each transport.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises an interrupt of `kind`.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device is already active.
    #[error("device is already active")]
    AlreadyActive,
    /// Setting up notification eventfds failed.
    #[error("cannot set up queue notifications: {0}")]
    EventFd(#[source] io::Error),
}

/// The checks every device's [`VirtioDevice::activate`] starts with: the
/// device is not `active` yet, the transport passed `expected` queues and
/// as many notification eventfds, and the driver made every queue ready.
pub fn check_activation(
    active: bool,
    queues: &[Queue],
    queue_evts: &[EventFd],
    expected: usize,
) -> Result<(), ActivateError> {
    if active {
        return Err(ActivateError::AlreadyActive);
    }
    if queues.len() != expected || queue_evts.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len().min(queue_evts.len()),
        });
    }
    match queues.iter().position(|q| !q.ready()) {
        Some(i) => Err(ActivateError::QueueNotReady(i)),
        None => Ok(()),
    }
}

/// A virtio device model, independent of the transport.
///
/// Register accesses come from vCPU threads through the transport; queue
/// processing happens on the event-loop thread. See the module docs for the
/// activation protocol.
pub trait VirtioDevice: Send {
    /// The virtio device type id (see [`device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;

    /// Records the features the driver accepted (a subset of
    /// [`Self::avail_features`], checked by the transport).
    fn set_acked_features(&mut self, features: u64);

    /// Reads device configuration space at `offset`. Bytes past the end of
    /// the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space at `offset`. Read-only or
    /// out-of-range bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Generation counter of the configuration space; changes whenever the
    /// device changes its configuration.
    fn config_generation(&self) -> u32 {
        0
    }

    /// Starts the device. `queues` and `queue_evts` hold one entry per queue,
    /// in order; queues the driver left unready have `ready() == false`.
    /// The transport has checked every ready queue against guest memory.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;

    /// Returns the device to its initial state. Returns false if the device
    /// cannot be reset. After a successful reset the device no longer
    /// accesses guest memory, and any later activation starts afresh.
    fn reset(&mut self) -> bool;
}

/// The event-loop side of a device's queue eventfds.
///
/// A device embeds one `QueueEvents` and forwards its
/// [`MutEventSubscriber`] calls: `init` to [`Self::init`], and in `process`
/// calls [`Self::sync`] when [`Self::is_control`] says the event is the
/// control eventfd, otherwise looks the fd up with [`Self::queue_index`].
/// `activate`/`reset` (on vCPU threads) call [`Self::activate`] and
/// [`Self::deactivate`], which wake the loop so it can add or remove the
/// queue eventfds.
#[derive(Debug)]
pub struct QueueEvents {
    control: EventFd,
    /// Eventfds of the current activation, one per queue.
    active: Vec<EventFd>,
    /// Eventfds of earlier activations, kept open until removed from epoll.
    retired: Vec<EventFd>,
    /// Fds currently registered with the event loop (besides `control`).
    registered: Vec<RawFd>,
}

impl QueueEvents {
    /// Creates the bookkeeping with a fresh non-blocking control eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            control: crate::eventfd()?,
            active: Vec::new(),
            retired: Vec::new(),
            registered: Vec::new(),
        })
    }

    /// Adds the control eventfd to the event loop (call from `init`).
    pub fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control, EventSet::IN)) {
            crate::error_ratelimited!("virtio: cannot watch device control events: {e}");
        }
    }

    /// Takes the queue eventfds of a new activation and wakes the loop.
    pub fn activate(&mut self, evts: Vec<EventFd>) -> io::Result<()> {
        self.retired.append(&mut self.active);
        self.active = evts;
        self.control.write(1)
    }

    /// Retires the current queue eventfds and wakes the loop to remove them.
    pub fn deactivate(&mut self) {
        if self.active.is_empty() {
            return;
        }
        self.retired.append(&mut self.active);
        if let Err(e) = self.control.write(1) {
            crate::error_ratelimited!("virtio: cannot signal device reset: {e}");
        }
    }

    /// Whether `events` is for the control eventfd.
    pub fn is_control(&self, events: &Events) -> bool {
        events.fd() == self.control.as_raw_fd()
    }

    /// Brings the event loop's registrations in line with the current
    /// activation: removes every earlier queue eventfd, closes retired ones
    /// and adds the active ones (call from `process` on a control event).
    pub fn sync(&mut self, ops: &mut EventOps) {
        let _ = self.control.read();
        for fd in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                crate::warn_ratelimited!("virtio: cannot stop watching queue eventfd {fd}: {e}");
            }
        }
        self.retired.clear();
        for evt in &self.active {
            match ops.add(Events::new(evt, EventSet::IN)) {
                Ok(()) => self.registered.push(evt.as_raw_fd()),
                Err(e) => crate::error_ratelimited!("virtio: cannot watch queue eventfd: {e}"),
            }
        }
    }

    /// Signals queue `index`'s eventfd, so the event loop calls the device
    /// again (used to continue work after yielding).
    pub fn kick(&self, index: usize) {
        if let Some(evt) = self.active.get(index) {
            if let Err(e) = evt.write(1) {
                crate::error_ratelimited!("virtio: cannot re-signal queue {index}: {e}");
            }
        }
    }

    /// The queue whose active eventfd is `fd`, after consuming its counter.
    pub fn queue_index(&self, fd: RawFd) -> Option<usize> {
        let index = self.active.iter().position(|e| e.as_raw_fd() == fd)?;
        let _ = self.active[index].read();
        Some(index)
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Helpers shared by the virtio unit tests.

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::DescriptorTable;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// Acknowledges VERSION_1 plus `extra` and activates `device` with one
    /// queue per ring (in order) and a fresh eventfd for each; returns the
    /// interrupt that records what the device raises.
    pub fn activate_on_rings(
        device: &mut dyn VirtioDevice,
        mem: &GuestMemoryMmap,
        extra: u64,
        rings: &[&Rings],
    ) -> Arc<RecordingInterrupt> {
        let irq = Arc::new(RecordingInterrupt::default());
        device.set_acked_features(features::bit(features::VIRTIO_F_VERSION_1) | extra);
        device
            .activate(
                mem.clone(),
                irq.clone(),
                rings.iter().map(|r| r.queue()).collect(),
                rings
                    .iter()
                    .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
                    .collect(),
            )
            .unwrap();
        irq
    }

    /// The driver side of a split virtqueue in guest memory.
    ///
    /// Uses virtio-queue's mock `DescriptorTable` for descriptors but lays
    /// out the rings itself: `MockSplitQueue` 0.18 places the used ring
    /// `size` bytes after the available ring entries instead of `2 * size`,
    /// so the two overlap once more than `size / 2` entries are used.
    pub struct Rings<'a> {
        mem: &'a GuestMemoryMmap,
        table: DescriptorTable<'a, GuestMemoryMmap>,
        /// Queue size.
        pub size: u16,
        /// Descriptor table address.
        pub desc: u64,
        /// Available ring address.
        pub avail: u64,
        /// Used ring address.
        pub used: u64,
    }

    impl<'a> Rings<'a> {
        /// Lays out a queue of `size` entries from `base` and clears it.
        pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
            let n = u64::from(size);
            let avail = base + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            let zeroes = vec![0u8; (used + 6 + 8 * n - base) as usize];
            mem.write_slice(&zeroes, GuestAddress(base)).unwrap();
            Self {
                mem,
                table: DescriptorTable::new(mem, GuestAddress(base), size),
                size,
                desc: base,
                avail,
                used,
            }
        }

        /// A ready device-side queue for these rings.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
            q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
            q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
            q.set_ready(true);
            q
        }

        /// Stores descriptor `index`.
        pub fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.table.store(index, d).unwrap();
        }

        /// The available ring's `idx`.
        pub fn avail_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
        }

        /// Overwrites the available ring's `idx`.
        pub fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Makes the chain at `head` available.
        pub fn push_avail(&self, head: u16) {
            let idx = self.avail_idx();
            let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.set_avail_idx(idx.wrapping_add(1));
        }

        /// Sets `used_event` (for EVENT_IDX).
        pub fn set_used_event(&self, v: u16) {
            let addr = self.avail + 4 + 2 * u64::from(self.size);
            self.mem.write_obj(v, GuestAddress(addr)).unwrap();
        }

        /// The used ring's `idx`.
        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Used ring entry `i` (modulo the size) as (id, len).
        pub fn used_elem(&self, i: u16) -> (u32, u32) {
            let addr = self.used + 4 + 8 * u64::from(i % self.size);
            let id = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let len = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
            (id, len)
        }
    }

    /// An interrupt that records what was raised.
    #[derive(Default)]
    pub struct RecordingInterrupt {
        pub raised: Mutex<Vec<InterruptKind>>,
        pub count: AtomicU32,
    }

    impl RecordingInterrupt {
        pub fn take(&self) -> Vec<InterruptKind> {
            std::mem::take(&mut *self.raised.lock().unwrap())
        }
    }

    impl VirtioInterrupt for RecordingInterrupt {
        fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
            self.count.fetch_add(1, Ordering::SeqCst);
            self.raised.lock().unwrap().push(kind);
            Ok(())
        }
    }
}
