//! virtio-net (virtio 1.2 §5.1) over a [`NetBackend`]: a TAP device or
//! passt.
//!
//! Two queues, receive (0) and transmit (1). Every frame on either queue
//! starts with a 12-byte `virtio_net_hdr_v1` (`VERSION_1` is required).
//! Work happens on the event-loop thread when a queue is kicked or the
//! backend's descriptor is ready.
//!
//! # Receive
//!
//! A frame read from the backend is held in the device until the guest has
//! room for it; meanwhile the backend is not read (it is taken out of the
//! event loop), so frames queue up in the host kernel or in passt instead
//! of being dropped. With `MRG_RXBUF` a frame is spread over as many
//! receive chains as it needs (`num_buffers` in the header says how many);
//! without it one chain must hold it. A frame is dropped only when the
//! guest cannot ever take it: it does not fit a single chain (no
//! `MRG_RXBUF`) or the whole ring.
//!
//! # Transmit
//!
//! Each transmit chain is one frame: device-readable descriptors only,
//! at least the vnet header plus an Ethernet header, at most
//! [`MAX_FRAME_LEN`] bytes after the header. Anything else (write-only
//! descriptors, a chain cut short by a loop, a bad index or memory outside
//! the guest, an oversized or too short frame) is returned to the guest
//! unsent. When the backend cannot take more (a full passt socket) the
//! chain stays in the ring and transmission resumes when it can.
//!
//! # Link problems
//!
//! A backend that fails for good (TAP deleted, passt exited) is logged
//! once as a link problem, the link status in the configuration space goes
//! down (with a configuration interrupt) and transmitted frames are
//! dropped; the VM keeps running. A frame the backend refuses once (e.g.
//! the TAP is administratively down) is dropped with a rate-limited
//! warning.
//!
//! Guest memory is only accessed through vm-memory's checked accessors.

mod backend;
pub mod stream;
pub mod tap;

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

pub use backend::{is_fatal, NetBackend, SendStatus};
pub use stream::{Passt, PasstConfig, PasstError, StreamBackend};
pub use tap::{Tap, TapError};

use super::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::{
    check_activation, device_type, ActivateError, InterruptKind, QueueEvents, VirtioDevice,
    VirtioInterrupt,
};

/// Size of `virtio_net_hdr_v1`, in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Shortest frame accepted: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Longest frame (after the vnet header): a 64 KiB TSO packet plus
/// Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 8;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Most descriptors looked at in one chain.
const MAX_CHAIN_DESCRIPTORS: usize = 1024;
/// Frames handled per event in each direction before yielding.
const FRAME_BUDGET: usize = 256;
/// Length of the configuration space: `mac` and `status`.
const CONFIG_LEN: usize = 8;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &MacAddr) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// State that exists only while the driver has the device activated.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
    /// Receive chains popped but not used yet (too few for the pending
    /// frame so far).
    held: Vec<RxChain>,
    /// Receive chains returned to the used ring since the last interrupt.
    returned: usize,
}

/// Traffic counters, logged at debug level when the device is dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Bytes sent to the backend (vnet headers included).
    pub tx_bytes: u64,
    /// Times the backend was full and transmission paused.
    pub tx_full: u64,
    /// Transmit chains returned unsent (malformed or refused).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (vnet headers included).
    pub rx_bytes: u64,
    /// Times a frame waited for the guest's receive buffers.
    pub rx_waits: u64,
    /// Frames dropped on receive.
    pub rx_dropped: u64,
    /// Times a budget ran out and the device re-signalled itself.
    pub budget_yields: u64,
}

/// A virtio-net device. Share it as `Arc<Mutex<Net>>` between a transport
/// (as [`VirtioDevice`]) and the event loop (as [`MutEventSubscriber`]).
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: MacAddr,
    avail_features: u64,
    acked_features: u64,
    link_up: bool,
    config_generation: u32,
    events: QueueEvents,
    active: Option<Active>,
    /// The frame read from the backend and not yet delivered (header
    /// included); `rx_len == 0` when there is none.
    rx_buf: Vec<u8>,
    rx_len: usize,
    tx_buf: Vec<u8>,
    /// Transmission paused because the backend was full; resumes when its
    /// fd is writable.
    tx_blocked: bool,
    /// What the backend's fd is registered for in the event loop.
    registered: Option<EventSet>,
    stats: NetStats,
}

impl Drop for Net {
    fn drop(&mut self) {
        log::debug!(
            "virtio-net {} ({}): {:?}",
            format_mac(&self.mac),
            self.backend.describe(),
            self.stats
        );
    }
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.backend.describe())
            .field("mac", &format_mac(&self.mac))
            .field("link_up", &self.link_up)
            .field("active", &self.active.is_some())
            .finish()
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

/// One receive chain: its head, its usable writable segments and their
/// total length.
struct RxChain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl Net {
    /// A device with MAC address `mac` over `backend`.
    pub fn new(backend: Box<dyn NetBackend>, mac: MacAddr) -> io::Result<Self> {
        let avail_features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | backend.offload_features();
        Ok(Self {
            backend,
            mac,
            avail_features,
            acked_features: 0,
            link_up: true,
            config_generation: 0,
            events: QueueEvents::new()?,
            active: None,
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_len: 0,
            tx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            tx_blocked: false,
            registered: None,
            stats: NetStats::default(),
        })
    }

    /// The MAC address in the configuration space.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Whether the link is up (the backend has not failed).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    /// Marks the link as down after a backend failure: logged once, link
    /// status down, configuration interrupt.
    fn link_failed(&mut self, e: &io::Error) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        self.rx_len = 0;
        crate::error_ratelimited!(
            "virtio-net {}: link problem: {}: {e}; the guest's link is now down",
            format_mac(&self.mac),
            self.backend.describe()
        );
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            if self.acked_features & bit(VIRTIO_NET_F_STATUS) != 0 {
                if let Err(e) = active.interrupt.trigger(InterruptKind::Config) {
                    crate::error_ratelimited!("virtio-net: cannot raise config interrupt: {e}");
                }
            }
        }
    }

    /// Moves frames from the backend to the receive queue until either runs
    /// dry or the budget is spent; interrupts the guest if it should.
    ///
    /// When the budget runs out with a frame still held, the receive queue
    /// is signalled again so that the rest is not left waiting for a guest
    /// kick that may never come (the guest does not kick for buffers it
    /// made available before the device asked for notifications). With no
    /// frame held, the backend's fd stays registered (level-triggered), so
    /// the event loop comes back for the rest.
    fn process_rx(&mut self) {
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

    /// Sends the frames in the transmit queue.
    ///
    /// Stops when the ring is empty (with notifications re-enabled and the
    /// ring checked once more, so a chain added meanwhile is not missed),
    /// when the backend is full (the chain stays in the ring; the
    /// backend's fd is polled for `OUT` and this runs again when it is
    /// writable) or when the budget is spent (the queue is re-signalled).
    fn process_tx(&mut self) {
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

    /// What the backend's fd should be polled for now.
    fn wanted_backend_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.active.is_none() || !self.link_up {
            return set;
        }
        if self.rx_len == 0 {
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
            (Some(_), false) => ops.modify(Events::new_raw(fd, want)),
            (None, false) => ops.add(Events::new_raw(fd, want)),
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

    fn process_backend(&mut self, set: EventSet) {
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
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) && self.link_up && self.rx_len == 0 {
            // Nothing to read although the descriptor reports an error.
            self.link_failed(&io::Error::other(
                "the descriptor reports an error or hang-up",
            ));
        }
    }
}

/// After `enable_notification` said more chains are available: whether
/// the ring is broken instead (the chains cannot be popped because the
/// driver's available index is more than a ring ahead). A queue that made
/// no progress since `next_avail` but is not broken just had chains added
/// after the last pop; the caller goes on.
fn ring_is_broken(active: &Active, index: usize, next_avail: u16) -> bool {
    let queue = if index == RX_QUEUE {
        &active.rx
    } else {
        &active.tx
    };
    if queue.next_avail() != next_avail {
        return false;
    }
    let broken = match queue.avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => (idx - std::num::Wrapping(next_avail)).0 > queue.size(),
        Err(_) => true,
    };
    if broken {
        crate::warn_ratelimited!("virtio-net: queue {index}: the driver's available index is out of range; queue stalled");
    }
    broken
}

/// Interrupts the guest for `queue` if it wants one.
fn notify(mem: &GuestMemoryMmap, interrupt: &dyn VirtioInterrupt, queue: &mut Queue, index: usize) {
    // On a read error of used_event, interrupt anyway.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.trigger(InterruptKind::Queue(index as u16)) {
            crate::error_ratelimited!("virtio-net: cannot raise interrupt: {e}");
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

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with the legacy interface; nothing here
        // is writable for a VERSION_1 driver.
        crate::debug_ratelimited!("virtio-net: config write at {offset:#x} ignored");
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        check_activation(self.active.is_some(), &queues, &queue_evts, 2)?;
        let mut queues = queues.into_iter();
        let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady(0));
        };
        let event_idx = self.acked(VIRTIO_RING_F_EVENT_IDX);
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        if let Err(e) = self.backend.set_offloads(self.acked_features) {
            crate::warn_ratelimited!(
                "virtio-net: cannot set offloads on {}: {e}",
                self.backend.describe()
            );
        }
        self.events
            .activate(queue_evts)
            .map_err(ActivateError::EventFd)?;
        self.rx_len = 0;
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
            held: Vec::new(),
            returned: 0,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.events.deactivate();
        self.acked_features = 0;
        self.rx_len = 0;
        self.tx_blocked = false;
        if self.link_up {
            if let Err(e) = self.backend.set_offloads(0) {
                crate::warn_ratelimited!("virtio-net: cannot clear offloads: {e}");
            }
        }
        true
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_control(&events) {
            self.events.sync(ops);
            // Frames may have queued up before activation.
            self.process_rx();
        } else if events.fd() == self.backend.raw_fd() {
            self.process_backend(events.event_set());
        } else {
            match self.events.queue_index(events.fd()) {
                Some(RX_QUEUE) => self.process_rx(),
                Some(TX_QUEUE) => self.process_tx(),
                _ => {}
            }
        }
        self.update_backend_registration(ops);
    }
}

#[cfg(test)]
mod tests;
