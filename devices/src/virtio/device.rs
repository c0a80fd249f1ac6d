//! What every virtio device has in common, and the interface a transport
//! drives it through.
//!
//! A device model is a struct that holds a [`VirtioCommon`] (features
//! offered and accepted, queue sizes, whether the driver activated it,
//! the queues and interrupt of that activation, the queue eventfds in the
//! event loop) plus only what is its own (a disk, a network backend, a
//! configuration space). It implements two traits:
//!
//! * [`VirtioDevice`], whose every method but [`VirtioDevice::common`] has
//!   a default over the common part: a device overrides what differs
//!   (its configuration space, its own activation and reset work);
//! * [`MutEventSubscriber`], the event-loop side, where
//!   [`VirtioCommon::event`] sorts each event by its data tag into a
//!   [`DeviceEvent`]: the device activated, queue `i` kicked, or one of
//!   the device's own descriptors ready. The device only says what each
//!   means to it.
//!
//! The same object is the transport's device and the event-loop
//! subscriber: `VirtioDevice` requires `MutEventSubscriber`, so one
//! `Arc<Mutex<dyn VirtioDevice>>` serves both and is registered once.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

use super::features::{bit, VIRTIO_RING_F_EVENT_IDX};
use super::queue_events::{QueueEvent, QueueEvents};
use super::{InterruptKind, Queue, VirtioInterrupt};

/// Why a device could not be activated.
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
    /// A ready queue's rings lie (partly) outside guest memory.
    #[error("queue {0} lies outside guest memory")]
    QueueOutsideMemory(usize),
    /// The transport's view of a queue does not make a valid queue.
    #[error("queue {index}: {source}")]
    QueueState {
        /// The queue.
        index: usize,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device is already active.
    #[error("device is already active")]
    AlreadyActive,
    /// Setting up notification eventfds failed.
    #[error("cannot set up queue notifications: {0}")]
    EventFd(#[source] io::Error),
    /// A device whose queues another process serves (vhost-user) could
    /// not hand them over.
    #[error("backend refused the queues: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The guest memory, interrupt and queues of one activation: what a device
/// has between `DRIVER_OK` and reset.
pub struct Activation {
    /// Guest memory, for the queues' rings and buffers.
    pub mem: GuestMemoryMmap,
    /// How to interrupt the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// One queue per [`VirtioCommon::queue_sizes`] entry, in order (the
    /// count is checked at activation, so a device indexes them with its
    /// own queue constants).
    pub queues: Vec<Queue>,
    /// The device's name, for log messages.
    name: &'static str,
}

impl Activation {
    /// Tells the driver that queue `index` has new used buffers, unless
    /// it asked not to be told (`VIRTQ_AVAIL_F_NO_INTERRUPT` or
    /// `used_event`). If the ring cannot be read, interrupts anyway.
    pub fn signal_used_queue(&mut self, index: usize) {
        let (Some(queue), Ok(vector)) = (self.queues.get_mut(index), u16::try_from(index)) else {
            return;
        };
        if queue.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(vector)) {
                crate::error_ratelimited!("{}: cannot raise interrupt: {e}", self.name);
            }
        }
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config(&self) {
        if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
            crate::error_ratelimited!("{}: cannot raise config interrupt: {e}", self.name);
        }
    }
}

/// Whether the driver has the device running.
pub enum DeviceState {
    /// Not activated, or reset since: the device touches no guest memory.
    Inactive,
    /// Activated by the driver (`DRIVER_OK`).
    Activated(Activation),
}

/// What an event-loop event means for a device (see
/// [`VirtioCommon::event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The driver activated the device; its queue eventfds are now in the
    /// event loop. Work that waited for activation can start.
    Activated,
    /// The driver kicked queue `index` (or the device re-signalled it).
    Queue(usize),
    /// A descriptor the device registered itself, with
    /// [`VirtioCommon::device_events`] and this `tag`, is ready.
    Device {
        /// The device's tag for the descriptor.
        tag: u32,
        /// What it is ready for.
        set: EventSet,
    },
    /// Nothing for the device to do (a reset was handled, or a stale
    /// notification of an earlier activation).
    None,
}

/// The state every virtio device has, whatever its type: the features,
/// the queues' sizes, the activation and the queue eventfds.
pub struct VirtioCommon {
    name: &'static str,
    device_type: u32,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    config_generation: u32,
    state: DeviceState,
    events: QueueEvents,
}

impl std::fmt::Debug for VirtioCommon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioCommon")
            .field("name", &self.name)
            .field("acked_features", &self.acked_features)
            .field("active", &self.is_activated())
            .finish()
    }
}

impl VirtioCommon {
    /// The common part of a device called `name` in log messages (e.g.
    /// `"virtio-net"`), of virtio type `device_type`, offering
    /// `avail_features`, with one queue of each maximum size in
    /// `queue_sizes`.
    pub fn new(
        name: &'static str,
        device_type: u32,
        avail_features: u64,
        queue_sizes: &[u16],
    ) -> io::Result<Self> {
        Ok(Self {
            name,
            device_type,
            queue_sizes: queue_sizes.to_vec(),
            avail_features,
            acked_features: 0,
            config_generation: 0,
            state: DeviceState::Inactive,
            events: QueueEvents::new()?,
        })
    }

    /// The device's name in log messages.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The virtio device type id.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Maximum size of each queue.
    pub fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Feature bits the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's features (only offered ones are kept).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Whether the driver accepted feature bit number `feature`.
    pub fn acked(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    /// Generation counter of the configuration space.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Sets the generation counter (restoring a snapshot).
    pub fn set_config_generation(&mut self, generation: u32) {
        self.config_generation = generation;
    }

    /// Records a change of the configuration space (a new generation) and,
    /// if `interrupt` and the device is active, tells the driver.
    pub fn config_changed(&mut self, interrupt: bool) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let (true, Some(active)) = (interrupt, self.activation()) {
            active.signal_config();
        }
    }

    /// The activation state.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        matches!(self.state, DeviceState::Activated(_))
    }

    /// The current activation, if any.
    pub fn activation(&self) -> Option<&Activation> {
        match &self.state {
            DeviceState::Activated(a) => Some(a),
            DeviceState::Inactive => None,
        }
    }

    /// Every queue's positions (`describe_queue`), `;`-separated, or
    /// "inactive".
    pub fn describe_queues(&self) -> String {
        match self.activation() {
            Some(a) => a
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| format!("queue {i}: {}", describe_queue(q, &a.mem)))
                .collect::<Vec<_>>()
                .join("; "),
            None => "inactive".into(),
        }
    }

    /// The current activation, if any, for queue work.
    pub fn activation_mut(&mut self) -> Option<&mut Activation> {
        match &mut self.state {
            DeviceState::Activated(a) => Some(a),
            DeviceState::Inactive => None,
        }
    }

    /// Activates the device with what the transport passes: checks that it
    /// is not active yet, that there is one ready queue and one eventfd per
    /// queue size, turns on `EVENT_IDX` if the driver accepted it, and
    /// wakes the event loop to add the queue eventfds.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let expected = self.queue_sizes.len();
        if queue_evts.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len().min(queue_evts.len()),
            });
        }
        self.activate_with(mem, interrupt, queues, queue_evts)
    }

    /// Like [`Self::activate`], but the queue eventfds stay out of the
    /// event loop: for a device whose queues another process serves
    /// (vhost-user), which must get every kick itself. The event loop is
    /// still woken, so the device sees [`DeviceEvent::Activated`].
    pub fn activate_external(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.activate_with(mem, interrupt, queues, Vec::new())
    }

    fn activate_with(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if self.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        let expected = self.queue_sizes.len();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        let event_idx = self.acked(VIRTIO_RING_F_EVENT_IDX);
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        self.events
            .activate(queue_evts)
            .map_err(ActivateError::EventFd)?;
        self.state = DeviceState::Activated(Activation {
            mem,
            interrupt,
            queues,
            name: self.name,
        });
        Ok(())
    }

    /// Returns to the initial state: guest memory, interrupt and queues are
    /// dropped at once (nothing touches guest memory afterwards), the
    /// accepted features are forgotten and the event loop is woken to
    /// remove the queue eventfds.
    pub fn reset(&mut self) {
        self.state = DeviceState::Inactive;
        self.events.deactivate();
        self.acked_features = 0;
    }

    /// Signals queue `index`'s eventfd, so that the event loop comes back
    /// to the queue (used to go on after yielding).
    pub fn kick(&self, index: usize) {
        self.events.kick(index);
    }

    /// Whether queue `index` was kicked since the last call (tests).
    #[cfg(test)]
    pub(crate) fn take_kick(&self, index: usize) -> bool {
        self.events.take_kick(index)
    }

    /// Registers the device with the event loop (call from
    /// [`MutEventSubscriber::init`]).
    pub fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
    }

    /// Sorts an event-loop event by its data tag (call from
    /// [`MutEventSubscriber::process`]). Activation and reset are handled
    /// here: the queue eventfds are added to or removed from the loop.
    pub fn event(&mut self, events: &Events, ops: &mut EventOps) -> DeviceEvent {
        match self.events.event(events, ops) {
            QueueEvent::Control if self.is_activated() => DeviceEvent::Activated,
            QueueEvent::Queue(i) if self.is_activated() => DeviceEvent::Queue(i),
            QueueEvent::Device(tag) => DeviceEvent::Device {
                tag,
                set: events.event_set(),
            },
            QueueEvent::Control | QueueEvent::Queue(_) | QueueEvent::Stale => DeviceEvent::None,
        }
    }

    /// The [`Events`] with which a device registers its own descriptor
    /// `fd` for `set` (with `EventOps::add` or `modify`); its events come
    /// back as [`DeviceEvent::Device`] with `tag`.
    pub fn device_events(fd: std::os::unix::io::RawFd, tag: u32, set: EventSet) -> Events {
        QueueEvents::device_events(fd, tag, set)
    }

    /// Adds the device's own descriptor `fd` (a timer, a completion
    /// eventfd) to the event loop for input, tagged `tag`; a failure is
    /// logged as the device `name` being unable to watch `what`, and
    /// returns false (the device then does without it).
    pub fn watch_input(
        ops: &mut EventOps,
        fd: std::os::unix::io::RawFd,
        tag: u32,
        name: &str,
        what: &str,
    ) -> bool {
        match ops.add(Self::device_events(fd, tag, EventSet::IN)) {
            Ok(()) => true,
            Err(e) => {
                log::error!("{name}: cannot watch {what}: {e}");
                false
            }
        }
    }
}

/// After `enable_notification` said more chains are available: whether
/// the available ring is broken instead (the chains cannot be popped
/// because the driver's available index is more than a ring ahead). A
/// queue that made progress since `next_avail`, or that just had chains
/// added after the last pop, is not.
pub fn avail_ring_broken(queue: &Queue, mem: &GuestMemoryMmap, next_avail: u16) -> bool {
    if queue.next_avail() != next_avail {
        return false;
    }
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => (idx - std::num::Wrapping(next_avail)).0 > queue.size(),
        Err(_) => true,
    }
}

/// One queue's positions, for a log line when a driver and its device
/// seem to wait for each other: the driver's available index against the
/// chains the device took, the used index the device wrote, and with
/// `EVENT_IDX` where each side asked to be notified (`used_event`: the
/// driver wants an interrupt past it; `avail_event`: the device wants a
/// kick past it). A lost notification shows as an index moved past the
/// other side's event mark with nothing taken or signalled since.
pub fn describe_queue(queue: &Queue, mem: &GuestMemoryMmap) -> String {
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};
    let read = |addr: u64| -> String {
        mem.read_obj::<u16>(GuestAddress(addr))
            .map_or_else(|_| "?".into(), |v| u16::from_le(v).to_string())
    };
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_or_else(|_| "?".into(), |v| v.0.to_string());
    let used = queue
        .used_idx(mem, Ordering::Acquire)
        .map_or_else(|_| "?".into(), |v| v.0.to_string());
    let size = u64::from(queue.size());
    let mut line = format!(
        "avail {avail} (taken {}), used {used} (next {})",
        queue.next_avail(),
        queue.next_used()
    );
    if queue.event_idx_enabled() {
        // virtio 1.2 §2.7.10: used_event follows the available ring's
        // entries, avail_event the used ring's.
        let used_event = read(queue.avail_ring() + 4 + 2 * size);
        let avail_event = read(queue.used_ring() + 4 + 8 * size);
        line.push_str(&format!(
            ", used_event {used_event}, avail_event {avail_event}"
        ));
    }
    line
}

/// Reads `data.len()` bytes at `offset` of the configuration space
/// `config`; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device model, independent of the transport.
///
/// Register accesses come from vCPU threads through the transport; queue
/// processing happens on the event-loop thread, through the device's
/// [`MutEventSubscriber`] implementation. Every method but
/// [`Self::common`] and [`Self::common_mut`] has a default over the
/// [`VirtioCommon`]. See the module docs of [`crate::virtio`] for the
/// activation protocol.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// The common part of the device.
    fn common(&self) -> &VirtioCommon;

    /// The common part of the device, mutably.
    fn common_mut(&mut self) -> &mut VirtioCommon;

    /// The virtio device type id (see [`super::device_type`]).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_sizes()
    }

    /// Feature bits the device offers.
    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }

    /// Records the features the driver accepted (a subset of
    /// [`Self::avail_features`], checked by the transport).
    fn set_acked_features(&mut self, features: u64) {
        self.common_mut().set_acked_features(features);
    }

    /// The device's configuration space as bytes (little endian, as the
    /// driver reads it). Empty by default.
    fn config_space(&self) -> &[u8] {
        &[]
    }

    /// Reads device configuration space at `offset`. Bytes past the end of
    /// the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space(), offset, data);
    }

    /// Writes device configuration space at `offset`. Read-only or
    /// out-of-range bytes are ignored; by default nothing is writable.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::debug_ratelimited!(
            "{}: config write at {offset:#x} ignored",
            self.common().name()
        );
    }

    /// Generation counter of the configuration space; changes whenever the
    /// device changes its configuration.
    fn config_generation(&self) -> u32 {
        self.common().config_generation()
    }

    /// Starts the device. `queues` and `queue_evts` hold one entry per queue,
    /// in order; queues the driver left unready have `ready() == false`.
    /// The transport has checked every ready queue against guest memory.
    /// By default [`VirtioCommon::activate`], then [`Self::activated`].
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.common_mut()
            .activate(mem, interrupt, queues, queue_evts)?;
        self.activated();
        Ok(())
    }

    /// The device's own work when the driver activates it (called on the
    /// vCPU thread, after the common part took the queues).
    fn activated(&mut self) {}

    /// Returns the device to its initial state. Returns false if the device
    /// cannot be reset. After a successful reset the device no longer
    /// accesses guest memory, and any later activation starts afresh.
    /// By default [`VirtioCommon::reset`], then [`Self::reset_device`].
    fn reset(&mut self) -> bool {
        self.common_mut().reset();
        self.reset_device()
    }

    /// Returns the device's own state to its initial value; false if it
    /// cannot.
    fn reset_device(&mut self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
