//! The receive queue: frames from the backend into the guest's buffers.

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::{
    format_mac, notify, ring_is_broken, Active, Net, FRAME_BUDGET, MAX_CHAIN_DESCRIPTORS,
    MIN_FRAME_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE, VNET_HDR_LEN,
};

/// What happened to the pending receive frame.
enum Delivery {
    /// It is in guest memory.
    Delivered,
    /// The guest has not enough buffers now; keep the frame.
    NoBuffers,
    /// The guest can never take it; drop it.
    Dropped,
}

/// One receive chain: its head, its usable writable segments and their
/// total length.
pub(super) struct RxChain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl Net {
    /// Moves frames from the backend to the receive queue until either runs
    /// dry or the budget is spent; interrupts the guest if it should.
    ///
    /// When the budget runs out with a frame still held, the receive queue
    /// is signalled again so that the rest is not left waiting for a guest
    /// kick that may never come (the guest does not kick for buffers it
    /// made available before the device asked for notifications). With no
    /// frame held, the backend's fd stays registered (level-triggered), so
    /// the event loop comes back for the rest.
    pub(super) fn process_rx(&mut self) {
        if self.active.is_none() || !self.link_up {
            return;
        }
        let mrg = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let mut budget = FRAME_BUDGET;
        loop {
            if self.rx_len == 0 {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(n))
                        if (VNET_HDR_LEN + MIN_FRAME_LEN..=self.rx_buf.len()).contains(&n) =>
                    {
                        self.rx_len = n
                    }
                    Ok(Some(n)) => {
                        crate::debug_ratelimited!(
                            "virtio-net: dropping a {n}-byte frame from the backend"
                        );
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.link_failed(&e);
                        break;
                    }
                }
            }
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let next_avail = active.rx.next_avail();
            match deliver(active, &mut self.rx_buf[..self.rx_len], mrg) {
                Delivery::Delivered => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += self.rx_len as u64;
                    self.rx_len = 0;
                }
                Delivery::Dropped => {
                    self.stats.rx_dropped += 1;
                    crate::warn_ratelimited!(
                        "virtio-net {}: dropped a {}-byte frame the guest has no buffer large enough for ({} dropped so far)",
                        format_mac(&self.mac),
                        self.rx_len - VNET_HDR_LEN,
                        self.stats.rx_dropped
                    );
                    self.rx_len = 0;
                }
                Delivery::NoBuffers => {
                    self.stats.rx_waits += 1;
                    crate::debug_ratelimited!(
                        "virtio-net {}: a {}-byte frame waits for receive buffers: {} chain(s) held ({} bytes), next available {}, driver's available index {:?}",
                        format_mac(&self.mac),
                        self.rx_len - VNET_HDR_LEN,
                        active.held.len(),
                        active.held.iter().map(|c| c.capacity).sum::<usize>(),
                        active.rx.next_avail(),
                        active
                            .rx
                            .avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire)
                            .map(|i| i.0)
                    );
                    // Wait for the guest: ask for a kick, unless buffers
                    // came in meanwhile (the held chains are already
                    // popped, so only new ones count).
                    match active.rx.enable_notification(&active.mem) {
                        Ok(false) => break,
                        Ok(true) if ring_is_broken(active, RX_QUEUE, next_avail) => break,
                        Ok(true) if budget == 0 => break, // re-signalled below
                        Ok(true) => budget -= 1,
                        Err(e) => {
                            crate::warn_ratelimited!(
                                "virtio-net: cannot enable notifications: {e}"
                            );
                            break;
                        }
                    }
                }
            }
        }
        if budget == 0 && self.rx_len != 0 && self.link_up {
            // Out of budget with a frame held: the fd is not polled while
            // a frame is held, so come back through the queue's eventfd.
            self.stats.budget_yields += 1;
            self.events.kick(RX_QUEUE);
        }
        if let Some(active) = self.active.as_mut() {
            if active.returned > 0 {
                active.returned = 0;
                notify(&active.mem, &*active.interrupt, &mut active.rx, RX_QUEUE);
            }
        }
    }
}

/// Pops the next receive chain and checks its buffers; chains with a
/// device-readable descriptor, memory outside the guest or a cut-short walk
/// have no usable capacity.
fn pop_rx_chain(active: &mut Active) -> Option<RxChain> {
    let chain = active.rx.pop_descriptor_chain(&active.mem)?;
    let head = chain.head_index();
    let mut segments = Vec::new();
    let mut capacity = 0usize;
    let mut ok = true;
    let mut last_has_next = false;
    for (count, d) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS || !d.is_write_only() {
            ok = false;
            break;
        }
        last_has_next = d.has_next();
        let len = d.len() as usize;
        if !GuestMemory::check_range(&active.mem, d.addr(), len, Permissions::Write) {
            ok = false;
            break;
        }
        if len > 0 {
            segments.push((d.addr(), len));
            capacity = capacity.saturating_add(len);
        }
    }
    if !ok || last_has_next {
        crate::debug_ratelimited!("virtio-net: unusable receive chain {head}");
        segments.clear();
        capacity = 0;
    }
    Some(RxChain {
        head,
        segments,
        capacity,
    })
}

/// Puts `frame` (header included) into the receive queue.
///
/// Receive chains are popped into `active.held` until the frame fits (one
/// usable chain without `MRG_RXBUF`). Chains stay held across calls: if
/// the ring runs dry first, the frame waits, and the queue's notification
/// point stays past the held chains, so the guest's next buffers kick the
/// device. Unusable chains go back at once with length 0. A frame that
/// can never fit (larger than the held chain without `MRG_RXBUF`, or than
/// a full ring of chains) is dropped and the held chains kept for the next.
fn deliver(active: &mut Active, frame: &mut [u8], mrg: bool) -> Delivery {
    let size = usize::from(active.rx.size());
    loop {
        let held_capacity: usize = active.held.iter().map(|c| c.capacity).sum();
        if mrg {
            if held_capacity >= frame.len() {
                break;
            }
            if active.held.len() >= size {
                return Delivery::Dropped;
            }
        } else if let Some(first) = active.held.first() {
            if first.capacity >= frame.len() {
                break;
            }
            return Delivery::Dropped;
        }
        let Some(chain) = pop_rx_chain(active) else {
            return Delivery::NoBuffers;
        };
        if chain.capacity == 0 {
            if let Err(e) = active.rx.add_used(&active.mem, chain.head, 0) {
                crate::warn_ratelimited!(
                    "virtio-net: cannot return descriptor {}: {e}",
                    chain.head
                );
            }
            active.returned += 1;
        } else {
            active.held.push(chain);
        }
    }
    // Enough chains are held: take as many as the frame needs.
    let mut needed = 0usize;
    let mut cap = 0usize;
    for c in &active.held {
        needed += 1;
        cap += c.capacity;
        if cap >= frame.len() {
            break;
        }
    }
    let chains: Vec<RxChain> = active.held.drain(..needed).collect();
    let num_buffers = if mrg {
        u16::try_from(chains.len()).unwrap_or(u16::MAX)
    } else {
        1
    };
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&num_buffers.to_le_bytes());
    let mem = &active.mem;
    let mut off = 0usize;
    for c in &chains {
        let mut written = 0usize;
        for &(addr, len) in &c.segments {
            if off >= frame.len() {
                break;
            }
            let n = len.min(frame.len() - off);
            if let Err(e) = vm_memory::Bytes::write_slice(mem, &frame[off..off + n], addr) {
                crate::warn_ratelimited!("virtio-net: cannot write a received frame: {e}");
                break;
            }
            off += n;
            written += n;
        }
        if let Err(e) = active.rx.add_used(mem, c.head, written as u32) {
            crate::warn_ratelimited!("virtio-net: cannot return descriptor {}: {e}", c.head);
        }
        active.returned += 1;
    }
    Delivery::Delivered
}
