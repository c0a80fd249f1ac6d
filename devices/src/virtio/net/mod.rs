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
//!
//! # Layout
//!
//! This file holds the device (features, configuration space, link state,
//! activation and reset hooks); `rx.rs` and `tx.rs` the receive and
//! transmit queue algorithms, `event_handler.rs` what each event-loop
//! event means and which events the backend is polled for; `backend.rs`
//! the [`NetBackend`] interface, `tap.rs` and `stream.rs` its two
//! implementations (`passt.rs` runs passt on the other end of a stream).
//! `vhost_net.rs` is the other virtio-net device, [`VhostNet`], whose frames
//! the kernel's vhost-net moves between the rings and a TAP
//! (`vhost_kern.rs`: the `/dev/vhost-net` requests).

mod backend;
mod event_handler;
pub mod mmds;
pub mod passt;
mod rx;
pub mod stream;
pub mod tap;
mod tx;
mod tx_batch;
pub mod vhost_kern;
pub mod vhost_net;

use std::io;

use event_manager::EventSet;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};

pub use self::mmds::MmdsBackend;
pub use backend::{is_fatal, NetBackend, SendStatus};
pub use passt::{Passt, PasstConfig, PasstError};
pub use stream::StreamBackend;
pub use tap::{Tap, TapError};
pub use vhost_kern::KernelVhostNet;
pub use vhost_net::{VhostNet, VhostNetError};

use rx::RxState;

use super::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::{device_type, VirtioCommon, VirtioDevice};

/// Size of `virtio_net_hdr_v1`, in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// `VIRTIO_NET_S_LINK_UP` as the 16-bit `status` field of the configuration space.
#[expect(clippy::cast_possible_truncation, reason = "the bit is 1")]
const LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
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
    /// Transmit kicks held back for a batching window.
    pub tx_batched: u64,
}

/// A virtio-net device: one object that is both the transport's
/// [`VirtioDevice`] and the event loop's subscriber.
pub struct Net {
    common: VirtioCommon,
    backend: Box<dyn NetBackend>,
    mac: MacAddr,
    /// `struct virtio_net_config`: `mac`, then `status`.
    config: [u8; CONFIG_LEN],
    link_up: bool,
    rx: RxState,
    tx_buf: Vec<u8>,
    /// Transmission paused because the backend was full; resumes when its
    /// fd is writable.
    tx_blocked: bool,
    /// What the backend's fd is registered for in the event loop.
    registered: Option<EventSet>,
    stats: NetStats,
    /// Limits on what the guest receives.
    rx_limiter: Option<crate::rate_limiter::RateLimiter>,
    /// Limits on what the guest sends.
    tx_limiter: Option<crate::rate_limiter::RateLimiter>,
    /// Holds transmit kicks back briefly while the guest streams
    /// (`tx_batch.rs`); `None`: every kick is served at once.
    tx_batch: Option<crate::virtio::kick_window::KickWindow>,
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
            .field("active", &self.common.is_activated())
            .finish()
    }
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
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        Ok(Self {
            common: VirtioCommon::new(
                "virtio-net",
                device_type::NET,
                avail_features,
                &[QUEUE_SIZE, QUEUE_SIZE],
            )?,
            backend,
            mac,
            config,
            link_up: true,
            rx: RxState::new(),
            tx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            tx_blocked: false,
            registered: None,
            stats: NetStats::default(),
            rx_limiter: None,
            tx_limiter: None,
            tx_batch: Some(tx_batch::new_window()?),
        })
    }

    /// Turns transmit batching (on by default; see `tx_batch.rs`) off or
    /// on again. Call before the device joins the event loop, which then
    /// watches the batching timer.
    pub fn set_tx_batching(&mut self, on: bool) -> io::Result<()> {
        match (on, self.tx_batch.is_some()) {
            (false, _) => self.tx_batch = None,
            (true, false) => self.tx_batch = Some(tx_batch::new_window()?),
            (true, true) => {}
        }
        Ok(())
    }

    /// Limits what the guest receives (`rx`) and sends (`tx`). Call before
    /// the device joins the event loop (which then watches the limiters'
    /// timers); give limiters that limit nothing yet if limits may come
    /// later ([`Self::update_rate_limiters`]).
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<crate::rate_limiter::RateLimiter>,
        tx: Option<crate::rate_limiter::RateLimiter>,
    ) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    /// New limits while the VM runs (`PATCH /network-interfaces/{id}`):
    /// `None` leaves a direction as it is. False if the device has no
    /// limiter for a direction given.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<crate::rate_limiter::Limits>,
        tx: Option<crate::rate_limiter::Limits>,
    ) -> bool {
        let mut ok = true;
        for (limits, limiter) in [(rx, &mut self.rx_limiter), (tx, &mut self.tx_limiter)] {
            match (limits, limiter) {
                (Some(l), Some(limiter)) => limiter.update(l.bandwidth, l.ops),
                (Some(_), None) => ok = false,
                (None, _) => {}
            }
        }
        ok
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
        self.common.is_activated()
    }

    /// Marks the link as down after a backend failure: logged once, link
    /// status down, configuration interrupt.
    fn link_failed(&mut self, e: &io::Error) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        self.rx.drop_frame();
        crate::error_ratelimited!(
            "virtio-net {}: link problem: {}: {e}; the guest's link is now down",
            format_mac(&self.mac),
            self.backend.describe()
        );
        self.config[6..8].fill(0);
        let status = self.common.acked(VIRTIO_NET_F_STATUS);
        self.common.config_changed(status);
    }
}

impl VirtioDevice for Net {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    /// The MAC is writable only with the legacy interface; nothing here is
    /// writable for a VERSION_1 driver (the default `write_config`).
    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activated(&mut self) {
        if let Err(e) = self.backend.set_offloads(self.common.acked_features()) {
            crate::warn_ratelimited!(
                "virtio-net: cannot set offloads on {}: {e}",
                self.backend.describe()
            );
        }
        self.rx.clear();
    }

    fn reset_device(&mut self) -> bool {
        self.rx.clear();
        self.tx_blocked = false;
        if let Some(b) = &mut self.tx_batch {
            b.reset();
        }
        if self.link_up {
            if let Err(e) = self.backend.set_offloads(0) {
                crate::warn_ratelimited!("virtio-net: cannot clear offloads: {e}");
            }
        }
        true
    }
}

#[cfg(test)]
mod tests;
