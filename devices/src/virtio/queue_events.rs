//! The event-loop side of a device's queue eventfds.
//!
//! Every descriptor a device has in the event loop carries a data tag, and
//! events are told apart by tag, never by comparing descriptors: queue
//! `i`'s eventfd is tagged `i`, the control eventfd [`CONTROL_TAG`], and a
//! device's own descriptors `DEVICE_TAG_BASE + tag`.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

/// Tag of the control eventfd.
const CONTROL_TAG: u32 = u32::MAX;
/// First tag of a device's own descriptors (queue tags are below it).
const DEVICE_TAG_BASE: u32 = 1 << 16;

/// What an event is, by its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueEvent {
    /// The control eventfd: the registrations were brought in line with
    /// the current activation.
    Control,
    /// Queue `i`'s eventfd (its counter consumed).
    Queue(usize),
    /// A device's own descriptor, with the device's tag.
    Device(u32),
    /// A queue tag with no active eventfd (a registration of an earlier
    /// activation, about to be removed).
    Stale,
}

/// The event-loop side of a device's queue eventfds.
///
/// `activate`/`reset` (on vCPU threads) call [`Self::activate`] and
/// [`Self::deactivate`], which wake the loop through the control eventfd;
/// the event loop then adds or removes the queue eventfds. Closing a
/// retired eventfd waits until it is out of epoll: the transport holds
/// other descriptors of the same eventfds, so closing first would leave a
/// stale registration behind.
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
        let events = Events::with_data(&self.control, CONTROL_TAG, EventSet::IN);
        if let Err(e) = ops.add(events) {
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

    /// Sorts an event by its tag; on a control event, first brings the
    /// registrations in line with the current activation, on a queue
    /// event consumes the queue's counter.
    pub(crate) fn event(&mut self, events: &Events, ops: &mut EventOps) -> QueueEvent {
        match events.data() {
            CONTROL_TAG => {
                self.sync(ops);
                QueueEvent::Control
            }
            tag if tag >= DEVICE_TAG_BASE => QueueEvent::Device(tag - DEVICE_TAG_BASE),
            tag => match self.active.get(tag as usize) {
                Some(evt) => {
                    let _ = evt.read();
                    QueueEvent::Queue(tag as usize)
                }
                None => QueueEvent::Stale,
            },
        }
    }

    /// The [`Events`] for a device's own descriptor `fd` with `tag`.
    pub(crate) fn device_events(fd: RawFd, tag: u32, set: EventSet) -> Events {
        Events::with_data_raw(fd, DEVICE_TAG_BASE.saturating_add(tag), set)
    }

    /// Removes every earlier queue eventfd from the event loop, closes the
    /// retired ones and adds the active ones, each tagged with its queue
    /// index.
    fn sync(&mut self, ops: &mut EventOps) {
        let _ = self.control.read();
        for fd in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                crate::warn_ratelimited!("virtio: cannot stop watching queue eventfd {fd}: {e}");
            }
        }
        self.retired.clear();
        for (index, evt) in (0u32..).zip(self.active.iter()) {
            match ops.add(Events::with_data(evt, index, EventSet::IN)) {
                Ok(()) => self.registered.push(evt.as_raw_fd()),
                Err(e) => crate::error_ratelimited!("virtio: cannot watch queue eventfd: {e}"),
            }
        }
    }

    /// Whether queue `index`'s eventfd was signalled; consumes it (tests).
    #[cfg(test)]
    pub(crate) fn take_kick(&self, index: usize) -> bool {
        self.active.get(index).is_some_and(|e| e.read().is_ok())
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
}
