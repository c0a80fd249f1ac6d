//! The transmit queue: frames from the guest's buffers to the backend.
//!
//! [`Transmit`] is the queue algorithm of one event: rounds of draining
//! the ring (flush what the backend holds, pop a chain, check and copy the
//! frame, send it, return the chain), each ending with notifications
//! re-enabled and the ring found empty. [`Net::process_tx`] runs it and
//! does what is left to the device: the interrupt, re-signalling the
//! queue, a paused backend, a link failure.

use std::io;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, Permissions};

use super::{
    is_fatal, Net, NetBackend, NetStats, SendStatus, FRAME_BUDGET, MAX_CHAIN_DESCRIPTORS,
    MIN_FRAME_LEN, TX_QUEUE, VNET_HDR_LEN,
};
use crate::virtio::device::avail_ring_broken;
use crate::virtio::VirtioCommon;

/// Why a transmit run stopped.
enum TxStop {
    /// The ring is empty and notifications are enabled again (or they
    /// cannot be, or the ring is broken: the queue stalls).
    Idle,
    /// The backend is full; the chain stays in the ring.
    BackendFull,
    /// The budget is spent with chains left.
    Budget,
    /// The backend failed for good.
    Fatal(io::Error),
    /// The transmit limiter refused the next frame; the chain stays in
    /// the ring until its timer fires.
    Limited,
}

/// The transmit queue algorithm over one event, with what it borrows from
/// the device.
struct Transmit<'a> {
    mem: &'a GuestMemoryMmap,
    queue: &'a mut Queue,
    backend: &'a mut dyn NetBackend,
    buf: &'a mut [u8],
    stats: &'a mut NetStats,
    /// Frames are sent only while the link is up (else dropped).
    link_up: bool,
    /// Chains returned to the used ring in this event.
    returned: usize,
    /// The transmit rate limiter, if any.
    limiter: Option<&'a mut crate::rate_limiter::RateLimiter>,
}

impl Net {
    /// Sends the frames in the transmit queue.
    ///
    /// Stops when the ring is empty (with notifications re-enabled and the
    /// ring checked once more, so a chain added meanwhile is not missed),
    /// when the backend is full (the chain stays in the ring; the
    /// backend's fd is polled for `OUT` and this runs again when it is
    /// writable) or when the budget is spent (the queue is re-signalled).
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        self.tx_blocked = false;
        let mut run = Transmit {
            mem: &active.mem,
            queue: &mut active.queues[TX_QUEUE],
            backend: self.backend.as_mut(),
            buf: &mut self.tx_buf,
            stats: &mut self.stats,
            link_up: self.link_up,
            returned: 0,
            limiter: self.tx_limiter.as_mut(),
        };
        let stop = run.run();
        if run.returned > 0 {
            active.signal_used_queue(TX_QUEUE);
            // The guest is sending (a run that found the ring empty, as
            // at activation, says nothing about the next kick).
            if let Some(b) = &mut self.tx_batch {
                b.ran(started);
            }
        }
        match stop {
            TxStop::Idle => {}
            TxStop::Limited => crate::metrics::NET.tx_rate_limiter_throttled.inc(),
            TxStop::BackendFull => {
                self.tx_blocked = true;
                self.stats.tx_full += 1;
            }
            TxStop::Budget => {
                self.stats.budget_yields += 1;
                self.kick_tx_again();
            }
            TxStop::Fatal(e) => {
                self.link_failed(&e);
                // Keep draining: the guest must get its buffers back.
                self.kick_tx_again();
            }
        }
        // Answers the backend made itself (the metadata service's) are
        // not announced by its fd: deliver them now.
        if self.backend.has_local_frames() {
            self.process_rx();
        }
    }
}

/// Bytes in the next transmit chain of `common`'s device, left in the
/// ring (0: there is none).
fn next_tx_len(common: &mut VirtioCommon) -> u64 {
    let Some(active) = common.activation_mut() else {
        return 0;
    };
    let queue = &mut active.queues[TX_QUEUE];
    let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
        return 0;
    };
    let len = chain
        .take(MAX_CHAIN_DESCRIPTORS)
        .filter(|d| !d.is_write_only())
        .fold(0u64, |a, d| a.saturating_add(u64::from(d.len())));
    queue.go_to_previous_position();
    len
}

impl Net {
    /// Re-signals the transmit queue for work left after a run; that
    /// kick is not held for a batching window.
    fn kick_tx_again(&mut self) {
        if let Some(b) = &mut self.tx_batch {
            b.serve_next_kick();
        }
        self.common.kick(TX_QUEUE);
    }

    /// The driver kicked the transmit queue: served now, or after the
    /// batching window if the guest is streaming (`tx_batch.rs`). A held
    /// queue's notifications are turned off meanwhile (without
    /// `EVENT_IDX` the driver would kick for every frame); the run at the
    /// window's end turns them on again.
    pub(super) fn tx_kicked(&mut self) {
        let common = &mut self.common;
        let held = match &mut self.tx_batch {
            Some(b) => b.hold_kick(std::time::Instant::now(), || {
                super::tx_batch::worth_holding(next_tx_len(common))
            }),
            None => false,
        };
        if !held {
            self.process_tx();
            return;
        }
        self.stats.tx_batched += 1;
        if let Some(active) = self.common.activation_mut() {
            let mem = &active.mem;
            if let Err(e) = active.queues[TX_QUEUE].disable_notification(mem) {
                crate::warn_ratelimited!("virtio-net: cannot disable notifications: {e}");
            }
        }
    }
}

impl Transmit<'_> {
    /// Drains the ring in rounds. A ring that keeps claiming chains it does
    /// not yield is retried a bounded number of times (and then through
    /// the queue's eventfd).
    fn run(&mut self) -> TxStop {
        for _ in 0..FRAME_BUDGET {
            if let Err(e) = self.queue.disable_notification(self.mem) {
                crate::warn_ratelimited!("virtio-net: cannot disable notifications: {e}");
                return TxStop::Idle;
            }
            let next_avail = self.queue.next_avail();
            if let Some(stop) = self.drain() {
                return stop;
            }
            match self.queue.enable_notification(self.mem) {
                Ok(false) => return TxStop::Idle,
                Ok(true) if avail_ring_broken(self.queue, self.mem, next_avail) => {
                    crate::warn_ratelimited!("virtio-net: queue {TX_QUEUE}: the driver's available index is out of range; queue stalled");
                    return TxStop::Idle;
                }
                Ok(true) => {}
                Err(e) => {
                    crate::warn_ratelimited!("virtio-net: cannot enable notifications: {e}");
                    return TxStop::Idle;
                }
            }
        }
        TxStop::Budget
    }

    /// Sends chains until the ring is empty (`None`) or transmission has
    /// to stop.
    fn drain(&mut self) -> Option<TxStop> {
        loop {
            if self.returned >= FRAME_BUDGET {
                return Some(TxStop::Budget);
            }
            if let Some(stop) = self.flush_backend() {
                return Some(stop);
            }
            let chain = self.queue.pop_descriptor_chain(self.mem)?;
            let head = chain.head_index();
            if let Some(l) = self.limiter.as_deref_mut() {
                let bytes = chain
                    .clone()
                    .filter(|d| !d.is_write_only())
                    .fold(0u64, |a, d| a.saturating_add(u64::from(d.len())))
                    .saturating_sub(VNET_HDR_LEN as u64);
                if !l.consume(bytes) {
                    self.queue.go_to_previous_position();
                    return Some(TxStop::Limited);
                }
            }
            let frame = self.read_frame(chain);
            let mut fatal = None;
            if let (Some(len), true) = (frame, self.link_up) {
                match self.send(len) {
                    Ok(()) => {}
                    Err(TxStop::Fatal(e)) => fatal = Some(e),
                    Err(stop) => {
                        self.queue.go_to_previous_position();
                        return Some(stop);
                    }
                }
            }
            if let Err(e) = self.queue.add_used(self.mem, head, 0) {
                crate::warn_ratelimited!("virtio-net: cannot return descriptor {head}: {e}");
            }
            self.returned += 1;
            if let Some(e) = fatal {
                return Some(TxStop::Fatal(e));
            }
        }
    }

    /// Pushes out what the backend still holds from an earlier frame;
    /// returns why transmission has to stop, if it has.
    fn flush_backend(&mut self) -> Option<TxStop> {
        if !self.link_up || !self.backend.has_pending_output() {
            return None;
        }
        match self.backend.flush() {
            Ok(true) => None,
            Ok(false) => Some(TxStop::BackendFull),
            Err(e) => Some(TxStop::Fatal(e)),
        }
    }

    /// Copies the frame of `chain` into the buffer; returns its length, or
    /// `None` for a chain that is returned unsent.
    fn read_frame(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> Option<usize> {
        match read_tx_frame(self.mem, chain, self.buf) {
            Ok(len) => Some(len),
            Err(why) => {
                crate::metrics::NET.tx_malformed_frames.inc();
                self.stats.tx_dropped += 1;
                crate::warn_ratelimited!(
                    "virtio-net: dropped a transmit chain: {why} ({} dropped so far)",
                    self.stats.tx_dropped
                );
                None
            }
        }
    }

    /// Sends the `len`-byte frame in the buffer. A frame the backend
    /// refuses for now is `Err(BackendFull)`; one it refuses once is
    /// dropped.
    fn send(&mut self, len: usize) -> Result<(), TxStop> {
        match self.backend.send(&self.buf[..len]) {
            Ok(SendStatus::Sent) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += len as u64;
                crate::metrics::NET.tx_packets_count.inc();
                crate::metrics::NET.tx_bytes_count.add(len as u64);
                Ok(())
            }
            Ok(SendStatus::Full) => Err(TxStop::BackendFull),
            Err(e) if is_fatal(&e) => Err(TxStop::Fatal(e)),
            Err(e) => {
                self.stats.tx_dropped += 1;
                crate::metrics::NET.tap_write_fails.inc();
                crate::warn_ratelimited!(
                    "virtio-net: {} refused a frame: {e} ({} dropped so far)",
                    self.backend.describe(),
                    self.stats.tx_dropped
                );
                Ok(())
            }
        }
    }
}

/// Copies a transmit chain into `buf`; returns the length (header
/// included) or why the chain is unusable.
fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, &'static str> {
    let mut len = 0usize;
    let mut last_has_next = false;
    for (count, d) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err("too many descriptors");
        }
        last_has_next = d.has_next();
        if d.is_write_only() {
            return Err("device-writable descriptor in a transmit chain");
        }
        let dlen = d.len() as usize;
        let end = len
            .checked_add(dlen)
            .filter(|&e| e <= buf.len())
            .ok_or("frame larger than the maximum")?;
        if !GuestMemory::check_range(mem, d.addr(), dlen, Permissions::Read) {
            return Err("buffer outside guest memory");
        }
        vm_memory::Bytes::read_slice(mem, &mut buf[len..end], d.addr())
            .map_err(|_| "buffer outside guest memory")?;
        len = end;
    }
    if last_has_next {
        return Err("chain cut short (loop, bad index or bad memory)");
    }
    if len < VNET_HDR_LEN {
        return Err("shorter than the virtio-net header");
    }
    if len < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err("shorter than an Ethernet header");
    }
    Ok(len)
}
