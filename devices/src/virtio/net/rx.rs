//! The receive queue: frames from the backend into the guest's buffers.
//!
//! [`Receive`] is the queue algorithm of one event: read a frame from the
//! backend, gather enough receive chains for it, write it, and when the
//! guest has too few buffers wait for them. [`Net::process_rx`] runs it and
//! does what is left to the device: a link failure, re-signalling the queue
//! and the interrupt.

use std::io;
use std::sync::atomic::Ordering;

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::{
    format_mac, MacAddr, Net, NetBackend, NetStats, FRAME_BUDGET, MAX_CHAIN_DESCRIPTORS,
    MAX_FRAME_LEN, MIN_FRAME_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE, VNET_HDR_LEN,
};
use crate::virtio::device::avail_ring_broken;

/// The receive side's state between events: the frame read from the
/// backend and not yet delivered, and the chains held for it.
pub(super) struct RxState {
    /// The pending frame, header included (`len` bytes of it).
    buf: Vec<u8>,
    /// Length of the pending frame; 0 when there is none.
    len: usize,
    /// Receive chains popped but not used yet (too few for the pending
    /// frame so far).
    held: Vec<RxChain>,
    /// The pending frame's tokens are taken from the receive limiter.
    charged: bool,
}

impl RxState {
    pub(super) fn new() -> Self {
        Self {
            buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            len: 0,
            held: Vec::new(),
            charged: false,
        }
    }

    /// Whether a frame waits for the guest's buffers.
    pub(super) fn has_frame(&self) -> bool {
        self.len != 0
    }

    /// Drops the pending frame (the link went down).
    pub(super) fn drop_frame(&mut self) {
        self.len = 0;
    }

    /// Forgets the frame and the held chains (activation and reset: the
    /// chains belonged to the driver's earlier queue).
    pub(super) fn clear(&mut self) {
        self.len = 0;
        self.held.clear();
    }
}

/// What happened to the pending receive frame.
enum Delivery {
    /// It is in guest memory.
    Delivered,
    /// The guest has not enough buffers now; keep the frame.
    NoBuffers,
    /// The guest can never take it; drop it.
    Dropped,
}

/// What reading the backend gave.
enum Read {
    /// A frame, now pending.
    Frame,
    /// A frame too short or too long, dropped.
    Skipped,
    /// Nothing to read now.
    Empty,
    /// The backend failed for good.
    Failed(io::Error),
}

/// One receive chain: its head, its usable writable segments and their
/// total length.
pub(super) struct RxChain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

/// The receive queue algorithm over one event, with what it borrows from
/// the device.
struct Receive<'a> {
    mem: &'a GuestMemoryMmap,
    queue: &'a mut Queue,
    backend: &'a mut dyn NetBackend,
    state: &'a mut RxState,
    stats: &'a mut NetStats,
    mac: MacAddr,
    /// `MRG_RXBUF` was negotiated: a frame may span several chains.
    mrg: bool,
    /// Frames (and waits for buffers) left in this event.
    budget: usize,
    /// Chains returned to the used ring in this event.
    returned: usize,
    /// The receive rate limiter, if any.
    limiter: Option<&'a mut crate::rate_limiter::RateLimiter>,
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
        if !self.link_up {
            return;
        }
        let mrg = self.common.acked(VIRTIO_NET_F_MRG_RXBUF);
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mut run = Receive {
            mem: &active.mem,
            queue: &mut active.queues[RX_QUEUE],
            backend: self.backend.as_mut(),
            state: &mut self.rx,
            stats: &mut self.stats,
            mac: self.mac,
            mrg,
            budget: FRAME_BUDGET,
            returned: 0,
            limiter: self.rx_limiter.as_mut(),
        };
        let failure = run.run();
        let (returned, out_of_budget) = (run.returned, run.budget == 0);
        if let Some(e) = failure {
            self.link_failed(&e);
        }
        if out_of_budget && self.rx.has_frame() && self.link_up {
            // Out of budget with a frame held: the fd is not polled while
            // a frame is held, so come back through the queue's eventfd.
            self.stats.budget_yields += 1;
            self.common.kick(RX_QUEUE);
        }
        if let (true, Some(active)) = (returned > 0, self.common.activation_mut()) {
            active.signal_used_queue(RX_QUEUE);
        }
    }
}

impl Receive<'_> {
    /// Reads and delivers frames until the backend is empty, the guest is
    /// out of buffers, or the budget is spent; returns a backend failure.
    fn run(&mut self) -> Option<io::Error> {
        loop {
            if !self.state.has_frame() {
                if self.budget == 0 {
                    return None;
                }
                self.budget -= 1;
                match self.read_frame() {
                    Read::Frame => {}
                    Read::Skipped => continue,
                    Read::Empty => return None,
                    Read::Failed(e) => return Some(e),
                }
            }
            if !self.charge_frame() {
                // The frame waits for the limiter's timer.
                return None;
            }
            let next_avail = self.queue.next_avail();
            if let Delivery::NoBuffers = self.deliver_frame() {
                if !self.wait_for_buffers(next_avail) {
                    return None;
                }
            }
        }
    }

    /// Takes the pending frame's bytes from the receive limiter (once per
    /// frame); false if it has to wait.
    fn charge_frame(&mut self) -> bool {
        let Some(l) = self.limiter.as_deref_mut() else {
            return true;
        };
        if self.state.charged {
            return true;
        }
        let bytes = (self.state.len - VNET_HDR_LEN) as u64;
        if l.consume(bytes) {
            self.state.charged = true;
            true
        } else {
            crate::metrics::NET.rx_rate_limiter_throttled.inc();
            false
        }
    }

    /// Reads the next frame from the backend into the pending buffer.
    fn read_frame(&mut self) -> Read {
        let state = &mut *self.state;
        match self.backend.recv(&mut state.buf) {
            Ok(Some(n)) if (VNET_HDR_LEN + MIN_FRAME_LEN..=state.buf.len()).contains(&n) => {
                state.len = n;
                state.charged = false;
                Read::Frame
            }
            Ok(Some(n)) => {
                crate::debug_ratelimited!("virtio-net: dropping a {n}-byte frame from the backend");
                self.stats.rx_dropped += 1;
                Read::Skipped
            }
            Ok(None) => Read::Empty,
            Err(e) => {
                crate::metrics::NET.tap_read_fails.inc();
                Read::Failed(e)
            }
        }
    }

    /// Offers the pending frame to the guest and counts the outcome.
    fn deliver_frame(&mut self) -> Delivery {
        let outcome = self.deliver();
        let len = self.state.len;
        match outcome {
            Delivery::Delivered => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += len as u64;
                crate::metrics::NET.rx_packets_count.inc();
                crate::metrics::NET.rx_bytes_count.add(len as u64);
                self.state.len = 0;
            }
            Delivery::Dropped => {
                self.stats.rx_dropped += 1;
                crate::warn_ratelimited!(
                    "virtio-net {}: dropped a {}-byte frame the guest has no buffer large enough for ({} dropped so far)",
                    format_mac(&self.mac),
                    len - VNET_HDR_LEN,
                    self.stats.rx_dropped
                );
                self.state.len = 0;
            }
            Delivery::NoBuffers => self.stats.rx_waits += 1,
        }
        outcome
    }

    /// The guest has too few buffers for the pending frame: asks it for a
    /// kick, unless buffers came in meanwhile (the held chains are already
    /// popped, so only new ones count). Returns whether to go on now.
    fn wait_for_buffers(&mut self, next_avail: u16) -> bool {
        crate::debug_ratelimited!(
            "virtio-net {}: a {}-byte frame waits for receive buffers: {} chain(s) held ({} bytes), next available {}, driver's available index {:?}",
            format_mac(&self.mac),
            self.state.len - VNET_HDR_LEN,
            self.state.held.len(),
            self.state.held.iter().map(|c| c.capacity).sum::<usize>(),
            self.queue.next_avail(),
            self.queue.avail_idx(self.mem, Ordering::Acquire).map(|i| i.0)
        );
        match self.queue.enable_notification(self.mem) {
            Ok(false) => false,
            Ok(true) if avail_ring_broken(self.queue, self.mem, next_avail) => {
                crate::warn_ratelimited!("virtio-net: queue {RX_QUEUE}: the driver's available index is out of range; queue stalled");
                false
            }
            Ok(true) if self.budget == 0 => false, // re-signalled by the caller
            Ok(true) => {
                self.budget -= 1;
                true
            }
            Err(e) => {
                crate::warn_ratelimited!("virtio-net: cannot enable notifications: {e}");
                false
            }
        }
    }

    /// Puts the pending frame into the receive queue.
    ///
    /// Receive chains are popped into the held ones until the frame fits
    /// (one usable chain without `MRG_RXBUF`). Chains stay held across
    /// calls: if the ring runs dry first, the frame waits, and the queue's
    /// notification point stays past the held chains, so the guest's next
    /// buffers kick the device. Unusable chains go back at once with length
    /// 0. A frame that can never fit (larger than the held chain without
    /// `MRG_RXBUF`, or than a full ring of chains) is dropped and the held
    /// chains kept for the next.
    fn deliver(&mut self) -> Delivery {
        if let Err(outcome) = self.hold_enough_chains() {
            return outcome;
        }
        self.write_frame();
        Delivery::Delivered
    }

    /// Pops chains until the held ones can take the pending frame; the
    /// error says why they cannot (yet).
    fn hold_enough_chains(&mut self) -> Result<(), Delivery> {
        let frame_len = self.state.len;
        let size = usize::from(self.queue.size());
        loop {
            let held = &self.state.held;
            if self.mrg {
                if held.iter().map(|c| c.capacity).sum::<usize>() >= frame_len {
                    return Ok(());
                }
                if held.len() >= size {
                    return Err(Delivery::Dropped);
                }
            } else if let Some(first) = held.first() {
                if first.capacity >= frame_len {
                    return Ok(());
                }
                return Err(Delivery::Dropped);
            }
            let Some(chain) = self.pop_chain() else {
                return Err(Delivery::NoBuffers);
            };
            if chain.capacity == 0 {
                self.return_chain(chain.head, 0);
            } else {
                self.state.held.push(chain);
            }
        }
    }

    /// Writes the pending frame into as many held chains as it needs, with
    /// their count in `num_buffers`, and returns them to the guest.
    fn write_frame(&mut self) {
        let frame_len = self.state.len;
        let mut needed = 0usize;
        let mut cap = 0usize;
        for c in &self.state.held {
            needed += 1;
            cap += c.capacity;
            if cap >= frame_len {
                break;
            }
        }
        let chains: Vec<RxChain> = self.state.held.drain(..needed).collect();
        let num_buffers = if self.mrg {
            u16::try_from(chains.len()).unwrap_or(u16::MAX)
        } else {
            1
        };
        let frame = &mut self.state.buf[..frame_len];
        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut off = 0usize;
        for c in &chains {
            let mut written = 0usize;
            for &(addr, len) in &c.segments {
                if off >= frame.len() {
                    break;
                }
                let n = len.min(frame.len() - off);
                if let Err(e) = vm_memory::Bytes::write_slice(self.mem, &frame[off..off + n], addr)
                {
                    crate::warn_ratelimited!("virtio-net: cannot write a received frame: {e}");
                    break;
                }
                off += n;
                written += n;
            }
            if let Err(e) =
                self.queue
                    .add_used(self.mem, c.head, u32::try_from(written).unwrap_or(u32::MAX))
            {
                crate::warn_ratelimited!("virtio-net: cannot return descriptor {}: {e}", c.head);
            }
            self.returned += 1;
        }
    }

    /// Returns chain `head` to the guest with `len` bytes written.
    fn return_chain(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(self.mem, head, len) {
            crate::warn_ratelimited!("virtio-net: cannot return descriptor {head}: {e}");
        }
        self.returned += 1;
    }

    /// Pops the next receive chain and checks its buffers; chains with a
    /// device-readable descriptor, memory outside the guest or a cut-short
    /// walk have no usable capacity.
    fn pop_chain(&mut self) -> Option<RxChain> {
        let chain = self.queue.pop_descriptor_chain(self.mem)?;
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
            if !GuestMemory::check_range(self.mem, d.addr(), len, Permissions::Write) {
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
}
