//! The event-loop side: which events the backend's descriptor is polled
//! for and what each event means.

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Net, RX_QUEUE, TX_QUEUE};
use crate::virtio::{DeviceEvent, VirtioCommon};

/// The device's tag for the backend's descriptor.
const BACKEND: u32 = 0;
/// The tag of the receive limiter's timer.
const RX_LIMITER: u32 = 1;
/// The tag of the transmit limiter's timer.
const TX_LIMITER: u32 = 2;
/// The tag of the transmit batching window's timer.
const TX_BATCH: u32 = 3;

impl Net {
    /// What the backend's fd should be polled for now.
    pub(super) fn wanted_backend_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.common.is_activated() || !self.link_up {
            return set;
        }
        if !self.rx.has_frame() {
            set |= EventSet::IN;
        }
        if self.tx_blocked || self.backend.has_pending_output() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Brings the backend's event-loop registration in line with
    /// [`Self::wanted_backend_events`].
    fn update_backend_registration(&mut self, ops: &mut EventOps) {
        let want = self.wanted_backend_events();
        let fd = self.backend.raw_fd();
        let result = match (self.registered, want.is_empty()) {
            (Some(cur), false) if cur == want => return,
            (None, true) => return,
            (Some(_), false) => ops.modify(VirtioCommon::device_events(fd, BACKEND, want)),
            (None, false) => ops.add(VirtioCommon::device_events(fd, BACKEND, want)),
            (Some(_), true) => ops.remove(Events::empty_raw(fd)),
        };
        match result {
            Ok(()) => self.registered = (!want.is_empty()).then_some(want),
            Err(e) => crate::error_ratelimited!(
                "virtio-net: cannot update event registration of {}: {e}",
                self.backend.describe()
            ),
        }
    }

    pub(super) fn process_backend(&mut self, set: EventSet) {
        if set.intersects(EventSet::OUT) {
            match self.backend.flush() {
                Ok(true) => self.process_tx(),
                Ok(false) => {}
                Err(e) => self.link_failed(&e),
            }
        }
        if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
            self.process_rx();
        }
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP)
            && self.link_up
            && !self.rx.has_frame()
        {
            // Nothing to read although the descriptor reports an error.
            self.link_failed(&io::Error::other(
                "the descriptor reports an error or hang-up",
            ));
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        for (limiter, tag) in [
            (&self.rx_limiter, RX_LIMITER),
            (&self.tx_limiter, TX_LIMITER),
        ] {
            if let Some(l) = limiter {
                let what = "a rate limiter's timer";
                VirtioCommon::watch_input(ops, l.timer_fd(), tag, "virtio-net", what);
            }
        }
        if let Some(b) = &self.tx_batch {
            let what = "the transmit window's timer";
            if !VirtioCommon::watch_input(ops, b.timer_fd(), TX_BATCH, "virtio-net", what) {
                // Kicks are then served at once.
                self.tx_batch = None;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.common.event(&events, ops) {
            // Frames may have queued up before activation. And frames the
            // driver queued before a snapshot was taken (a kick held by
            // the transmit window or not yet read then) have no kick
            // coming in the restored VM: the transmit ring is served once
            // (a fresh driver's is empty; the run turns its notifications
            // on).
            DeviceEvent::Activated => {
                self.process_tx();
                self.process_rx();
            }
            DeviceEvent::Queue(RX_QUEUE) => {
                crate::metrics::NET.rx_queue_event_count.inc();
                self.process_rx()
            }
            DeviceEvent::Queue(TX_QUEUE) => {
                crate::metrics::NET.tx_queue_event_count.inc();
                self.tx_kicked()
            }
            DeviceEvent::Device { tag: TX_BATCH, .. } => {
                if let Some(b) = &mut self.tx_batch {
                    b.fired();
                }
                self.process_tx();
            }
            DeviceEvent::Device { tag: BACKEND, set } => self.process_backend(set),
            DeviceEvent::Device {
                tag: RX_LIMITER, ..
            } => {
                if let Some(l) = &mut self.rx_limiter {
                    l.timer_fired();
                }
                self.process_rx();
            }
            DeviceEvent::Device {
                tag: TX_LIMITER, ..
            } => {
                if let Some(l) = &mut self.tx_limiter {
                    l.timer_fired();
                }
                self.process_tx();
            }
            _ => {}
        }
        self.update_backend_registration(ops);
    }
}
