//! The transmit queue: frames from the guest's buffers to the backend.

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};

use super::{
    is_fatal, notify, ring_is_broken, Net, SendStatus, FRAME_BUDGET, MAX_CHAIN_DESCRIPTORS,
    MIN_FRAME_LEN, TX_QUEUE, VNET_HDR_LEN,
};

impl Net {
    /// Sends the frames in the transmit queue.
    ///
    /// Stops when the ring is empty (with notifications re-enabled and the
    /// ring checked once more, so a chain added meanwhile is not missed),
    /// when the backend is full (the chain stays in the ring; the
    /// backend's fd is polled for `OUT` and this runs again when it is
    /// writable) or when the budget is spent (the queue is re-signalled).
    pub(super) fn process_tx(&mut self) {
        let Self {
            backend,
            active,
            tx_buf,
            link_up,
            tx_blocked,
            events,
            stats,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        *tx_blocked = false;
        let mem = &active.mem;
        let mut returned = 0usize;
        let mut fatal = None;
        let mut more = false;
        let mut rounds = 0usize;
        'outer: loop {
            // Each round ends with the ring found empty; a ring that keeps
            // claiming chains it does not yield is retried a bounded
            // number of times (and then through the queue's eventfd).
            rounds += 1;
            if rounds > FRAME_BUDGET {
                more = true;
                break;
            }
            if let Err(e) = active.tx.disable_notification(mem) {
                crate::warn_ratelimited!("virtio-net: cannot disable notifications: {e}");
                break;
            }
            let next_avail = active.tx.next_avail();
            loop {
                if returned >= FRAME_BUDGET {
                    more = true;
                    break 'outer;
                }
                if *link_up && backend.has_pending_output() {
                    match backend.flush() {
                        Ok(true) => {}
                        Ok(false) => {
                            *tx_blocked = true;
                            stats.tx_full += 1;
                            break 'outer;
                        }
                        Err(e) => {
                            fatal = Some(e);
                            break 'outer;
                        }
                    }
                }
                let Some(chain) = active.tx.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let frame = match read_tx_frame(mem, chain, tx_buf) {
                    Ok(len) => Some(len),
                    Err(why) => {
                        stats.tx_dropped += 1;
                        crate::warn_ratelimited!(
                            "virtio-net: dropped a transmit chain: {why} ({} dropped so far)",
                            stats.tx_dropped
                        );
                        None
                    }
                };
                if let (Some(len), true) = (frame, *link_up) {
                    match backend.send(&tx_buf[..len]) {
                        Ok(SendStatus::Sent) => {
                            stats.tx_frames += 1;
                            stats.tx_bytes += len as u64;
                        }
                        Ok(SendStatus::Full) => {
                            active.tx.go_to_previous_position();
                            *tx_blocked = true;
                            stats.tx_full += 1;
                            break 'outer;
                        }
                        Err(e) if is_fatal(&e) => fatal = Some(e),
                        Err(e) => {
                            stats.tx_dropped += 1;
                            crate::warn_ratelimited!(
                                "virtio-net: {} refused a frame: {e} ({} dropped so far)",
                                backend.describe(),
                                stats.tx_dropped
                            );
                        }
                    }
                }
                if let Err(e) = active.tx.add_used(mem, head, 0) {
                    crate::warn_ratelimited!("virtio-net: cannot return descriptor {head}: {e}");
                }
                returned += 1;
                if fatal.is_some() {
                    break 'outer;
                }
            }
            match active.tx.enable_notification(mem) {
                Ok(false) => break,
                Ok(true) if ring_is_broken(active, TX_QUEUE, next_avail) => break,
                Ok(true) => {}
                Err(e) => {
                    crate::warn_ratelimited!("virtio-net: cannot enable notifications: {e}");
                    break;
                }
            }
        }
        if returned > 0 {
            notify(&active.mem, &*active.interrupt, &mut active.tx, TX_QUEUE);
        }
        if more {
            stats.budget_yields += 1;
            events.kick(TX_QUEUE);
        }
        if let Some(e) = fatal {
            self.link_failed(&e);
            // Keep draining: the guest must get its buffers back.
            self.events.kick(TX_QUEUE);
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
