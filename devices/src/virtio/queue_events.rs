//! The event-loop side of a device's queue eventfds.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
            control: EventFd::new(EFD_NONBLOCK)?,
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
