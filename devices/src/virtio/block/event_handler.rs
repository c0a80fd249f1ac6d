//! The event-loop side: the request queue's kicks, the rate limiter's
//! timer, the io_uring's completions.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::{Block, REQUEST_QUEUE};
use crate::virtio::{DeviceEvent, VirtioCommon};

/// The event tag of the rate limiter's timer.
const LIMITER_TAG: u32 = 1;
/// The event tag of the io_uring's completion eventfd.
const URING_TAG: u32 = 2;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        if let Some(l) = &self.limiter {
            let name = "virtio-blk";
            VirtioCommon::watch_input(
                ops,
                l.timer_fd(),
                LIMITER_TAG,
                name,
                "the rate limiter's timer",
            );
        }
        if let Some(u) = &self.uring {
            let what = "the io_uring's completions";
            VirtioCommon::watch_input(ops, u.eventfd(), URING_TAG, "virtio-blk", what);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.common.event(&events, ops) {
            // Requests the driver queued before a snapshot was taken (a
            // kick not yet read then) have no kick coming in the restored
            // VM: serve the ring once. A fresh driver's ring is empty, and
            // the pass turns its notifications on.
            DeviceEvent::Activated => self.process_queue(),
            DeviceEvent::Queue(REQUEST_QUEUE) => {
                crate::metrics::BLOCK.queue_event_count.inc();
                self.process_queue();
            }
            DeviceEvent::Device {
                tag: LIMITER_TAG, ..
            } => {
                if let Some(l) = &mut self.limiter {
                    l.timer_fired();
                }
                self.process_queue();
            }
            DeviceEvent::Device { tag: URING_TAG, .. } => self.uring_completions(),
            _ => {}
        }
    }
}
