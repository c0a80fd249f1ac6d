//! virtio-net with its data path in the host kernel (vhost-net).
//!
//! The guest sees the same virtio-net device as [`super::Net`] offers
//! over a TAP (MAC, link status, `MRG_RXBUF`, `EVENT_IDX`, checksum and
//! TSO offloads), but capsule never touches a frame: at activation the
//! device hands the rings to `/dev/vhost-net` (a kernel worker thread of
//! this process then moves frames between the rings and the TAP), and on
//! reset takes them back.
//!
//! What stays in capsule:
//!
//! * feature negotiation: the guest is offered what both vhost-net
//!   ([`VhostNetOps::features`]) and capsule pass through, plus the
//!   device's own `MAC` and `STATUS` and the TAP's offloads; vhost-net is
//!   told the accepted features it knows of (`SET_FEATURES` refuses
//!   others), the TAP the offloads (`TUNSETOFFLOAD`);
//! * the memory table (one entry per guest RAM region: guest address,
//!   size and capsule's mapping of it) and the rings, given as guest
//!   addresses that the vhost crate translates through the same memory;
//! * interrupts: vhost-net writes a *call* eventfd per queue when it used
//!   buffers (it applies `EVENT_IDX` suppression itself); virtio-mmio must
//!   set its interrupt status before the irqfd fires, so the event loop
//!   relays each call as a queue interrupt of the transport (virtio-pci
//!   sends it to the queue's MSI-X vector of the moment);
//! * errors: vhost-net writes an *error* eventfd per queue when it cannot
//!   use a ring (bad addresses or descriptors of a broken or hostile
//!   driver); the queue stops in the kernel and capsule logs it. A ring
//!   outside guest memory is refused at activation (the transport then
//!   asks the driver for a reset); capsule itself never reads the rings.
//!
//! Kicks reach vhost-net without capsule: the queue's notification
//! eventfd (a KVM ioeventfd) is vhost-net's kick eventfd.
//!
//! Not available with vhost-net: rate limits, the metadata service and
//! snapshots (the kernel writes guest memory without capsule's dirty
//! bitmap, and holds the rings' positions); the VMM refuses those
//! combinations.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{format_mac, MacAddr, CONFIG_LEN, QUEUE_SIZE};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::{
    device_type, ActivateError, DeviceEvent, InterruptKind, Queue, VirtioCommon, VirtioDevice,
    VirtioInterrupt,
};
use crate::GuestMemoryMmap;

/// Queues: receive and transmit.
pub const NUM_QUEUES: usize = 2;
/// The virtio features capsule passes between vhost-net and the guest
/// (when vhost-net offers them): the ring layout ones and mergeable
/// receive buffers.
pub const PASSED_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_NET_F_MRG_RXBUF);
/// `VIRTIO_NET_S_LINK_UP` as the 16-bit `status` field.
#[expect(clippy::cast_possible_truncation, reason = "the bit is 1")]
const LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
/// Event tags: the call eventfds are `0..NUM_QUEUES`, the error
/// eventfds follow.
const ERR_TAG_BASE: u32 = 2;

/// Why a vhost-net device could not be set up (at start, before the
/// guest runs).
#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    /// `/dev/vhost-net` is missing.
    #[error(
        "vhost=on: /dev/vhost-net does not exist (load the vhost_net module: modprobe vhost_net)"
    )]
    Missing,
    /// `/dev/vhost-net` cannot be opened by this user.
    #[error("vhost=on: no permission to open /dev/vhost-net (run as root, or give this user access to it)")]
    Permission,
    /// Opening `/dev/vhost-net` failed otherwise.
    #[error("vhost=on: cannot open /dev/vhost-net: {0}")]
    Open(#[source] io::Error),
    /// A setup request failed.
    #[error("vhost=on: vhost-net {step} failed: {source}")]
    Setup {
        /// The request.
        step: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
    },
    /// vhost-net does not offer `VIRTIO_F_VERSION_1` (kernels before 4.0).
    #[error("vhost=on: this kernel's vhost-net does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// An eventfd could not be created.
    #[error("vhost=on: cannot create eventfds: {0}")]
    EventFd(#[source] io::Error),
}

/// Why an activation could not hand the queues to vhost-net (the source
/// of [`ActivateError::Backend`]).
#[derive(Debug, thiserror::Error)]
pub enum VhostActivateError {
    /// The driver did not accept `VIRTIO_F_VERSION_1`.
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// A vhost-net request failed.
    #[error("vhost-net {step}: {source}")]
    Request {
        /// The request.
        step: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
    },
    /// Applying the offloads to the TAP failed.
    #[error("TAP offloads: {0}")]
    Offloads(#[source] io::Error),
}

impl From<VhostActivateError> for ActivateError {
    fn from(e: VhostActivateError) -> Self {
        ActivateError::Backend(Box::new(e))
    }
}

/// What vhost-net needs to serve one queue.
pub struct VringSetup<'a> {
    /// Ring size and the rings' guest addresses.
    pub config: VringConfigData,
    /// The next available index to process.
    pub base: u16,
    /// The eventfd the guest's kicks arrive on.
    pub kick: &'a EventFd,
    /// The eventfd vhost-net writes when it used buffers.
    pub call: &'a EventFd,
    /// The eventfd vhost-net writes when it cannot use the ring.
    pub err: &'a EventFd,
}

/// The vhost-net requests the device makes, together with the TAP they
/// attach: behind a trait so that the unit tests can stand in for the
/// kernel and record what a guest's actions turn into.
pub trait VhostNetOps: Send {
    /// A short description for logs, e.g. `TAP tap0 (vhost-net)`.
    fn describe(&self) -> String;
    /// The features vhost-net offered (`VHOST_GET_FEATURES`).
    fn features(&self) -> u64;
    /// The virtio-net offload features the TAP can carry.
    fn offload_features(&self) -> u64;
    /// `VHOST_SET_FEATURES`.
    fn set_features(&mut self, features: u64) -> Result<(), vhost::Error>;
    /// `VHOST_SET_MEM_TABLE`.
    fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error>;
    /// `VHOST_SET_VRING_NUM`, `_ADDR`, `_BASE`, `_KICK`, `_CALL`, `_ERR`.
    fn start_vring(&mut self, index: usize, ring: &VringSetup<'_>) -> Result<(), vhost::Error>;
    /// `VHOST_NET_SET_BACKEND`: the TAP (`attach`) or none for queue `index`.
    fn set_backend(&mut self, index: usize, attach: bool) -> Result<(), vhost::Error>;
    /// `VHOST_GET_VRING_BASE`, which stops the ring; returns the next
    /// available index.
    fn stop_vring(&mut self, index: usize) -> Result<u32, vhost::Error>;
    /// `TUNSETOFFLOAD` on the TAP for the offloads the driver accepted
    /// (none: 0).
    fn set_offloads(&mut self, acked: u64) -> io::Result<()>;
}

/// The features offered to the guest: what vhost-net offers of the
/// passed-through ones, the TAP's offloads, and the device's own.
pub fn offered_features(vhost_features: u64, tap_offloads: u64) -> u64 {
    (vhost_features & PASSED_FEATURES)
        | tap_offloads
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
}

/// The accepted features that vhost-net is told of: those it offered
/// (`MAC`, `STATUS` and the offloads are capsule's and the TAP's).
pub fn vhost_features(acked: u64, vhost_features: u64) -> u64 {
    acked & vhost_features & PASSED_FEATURES
}

/// The memory table: one entry per guest RAM region, with capsule's
/// mapping of it (vhost-net's worker uses this process's address space).
pub fn memory_table(mem: &GuestMemoryMmap) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|region| VhostUserMemoryRegionInfo {
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            ..Default::default()
        })
        .collect()
}

/// The ring configuration of `queue`, after checking that each ring lies
/// whole within one guest RAM region (vhost-net reaches it through that
/// region's mapping).
pub fn vring_config(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    index: usize,
) -> Result<VringConfigData, ActivateError> {
    let size = usize::from(queue.size());
    // virtio 1.2 §2.7: 16-byte descriptors; flags, idx, the ring and the
    // event field, 2 (available) or 8 (used) bytes per entry.
    for (gpa, len) in [
        (queue.desc_table(), 16 * size),
        (queue.avail_ring(), 6 + 2 * size),
        (queue.used_ring(), 6 + 8 * size),
    ] {
        mem.get_slice(GuestAddress(gpa), len)
            .map_err(|_| ActivateError::QueueOutsideMemory(index))?;
    }
    Ok(VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: queue.desc_table(),
        used_ring_addr: queue.used_ring(),
        avail_ring_addr: queue.avail_ring(),
        log_addr: None,
    })
}

/// A virtio-net device whose frames vhost-net moves.
pub struct VhostNet {
    common: VirtioCommon,
    ops: Box<dyn VhostNetOps>,
    mac: MacAddr,
    config: [u8; CONFIG_LEN],
    /// Per queue: vhost-net writes it when it used buffers.
    calls: Vec<EventFd>,
    /// Per queue: vhost-net writes it when it cannot use the ring.
    errs: Vec<EventFd>,
    /// The kick eventfds of the current activation (vhost-net holds its
    /// own references; these keep the numbers from being reused).
    kicks: Vec<EventFd>,
    /// Rings vhost-net was given, to stop on reset.
    started: usize,
    /// Queues the TAP is attached to, to detach on reset.
    attached: usize,
    /// Interrupts relayed (calls), for the debug line at the end.
    relayed: u64,
}

impl std::fmt::Debug for VhostNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNet")
            .field("backend", &self.ops.describe())
            .field("mac", &format_mac(&self.mac))
            .field("active", &self.common.is_activated())
            .finish()
    }
}

impl Drop for VhostNet {
    fn drop(&mut self) {
        self.stop();
        log::debug!(
            "virtio-net {} ({}): {} interrupts relayed",
            format_mac(&self.mac),
            self.ops.describe(),
            self.relayed
        );
    }
}

impl VhostNet {
    /// A device with MAC address `mac` whose data path `ops` serves.
    pub fn new(ops: Box<dyn VhostNetOps>, mac: MacAddr) -> Result<Self, VhostNetError> {
        if ops.features() & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostNetError::NoVersion1);
        }
        let eventfds = || {
            (0..NUM_QUEUES)
                .map(|_| crate::eventfd())
                .collect::<io::Result<Vec<_>>>()
                .map_err(VhostNetError::EventFd)
        };
        let (calls, errs) = (eventfds()?, eventfds()?);
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        let common = VirtioCommon::new(
            "virtio-net",
            device_type::NET,
            offered_features(ops.features(), ops.offload_features()),
            &[QUEUE_SIZE; NUM_QUEUES],
        )
        .map_err(VhostNetError::EventFd)?;
        Ok(Self {
            common,
            ops,
            mac,
            config,
            calls,
            errs,
            kicks: Vec::new(),
            started: 0,
            attached: 0,
            relayed: 0,
        })
    }

    /// The MAC address in the configuration space.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.common.is_activated()
    }

    /// Hands the activation's memory and rings to vhost-net, then
    /// attaches the TAP to each queue.
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        rings: &[(VringConfigData, u16)],
        kicks: &[EventFd],
    ) -> Result<(), VhostActivateError> {
        let fail = |step| move |source| VhostActivateError::Request { step, source };
        let acked = self.common.acked_features();
        self.ops
            .set_features(vhost_features(acked, self.ops.features()))
            .map_err(fail("SET_FEATURES"))?;
        self.ops
            .set_mem_table(&memory_table(mem))
            .map_err(fail("SET_MEM_TABLE"))?;
        for (index, ((config, base), kick)) in rings.iter().zip(kicks).enumerate() {
            let ring = VringSetup {
                config: *config,
                base: *base,
                kick,
                call: &self.calls[index],
                err: &self.errs[index],
            };
            self.started = index + 1;
            self.ops
                .start_vring(index, &ring)
                .map_err(fail("starting a queue"))?;
        }
        self.ops
            .set_offloads(acked)
            .map_err(VhostActivateError::Offloads)?;
        for index in 0..rings.len() {
            self.attached = index + 1;
            self.ops
                .set_backend(index, true)
                .map_err(fail("SET_BACKEND"))?;
        }
        Ok(())
    }

    /// Detaches the TAP and stops every ring vhost-net was given: after
    /// this the kernel no longer touches guest memory for the device.
    fn stop(&mut self) {
        let name = format_mac(&self.mac);
        for index in 0..std::mem::take(&mut self.attached) {
            if let Err(e) = self.ops.set_backend(index, false) {
                crate::warn_ratelimited!("virtio-net {name}: cannot detach queue {index}: {e}");
            }
        }
        for index in 0..std::mem::take(&mut self.started) {
            if let Err(e) = self.ops.stop_vring(index) {
                crate::warn_ratelimited!("virtio-net {name}: cannot stop queue {index}: {e}");
            }
        }
        self.kicks.clear();
    }

    /// vhost-net used buffers of queue `index`: interrupt the driver.
    fn relay_call(&mut self, index: usize) {
        let Some(call) = self.calls.get(index) else {
            return;
        };
        // Consume the count even when inactive (a late write of an
        // earlier activation), so the level-triggered loop calms down.
        if call.read().is_err() {
            return;
        }
        let Ok(queue) = u16::try_from(index) else {
            return;
        };
        if let Some(active) = self.common.activation() {
            self.relayed += 1;
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(queue)) {
                crate::error_ratelimited!(
                    "virtio-net {}: cannot raise interrupt: {e}",
                    format_mac(&self.mac)
                );
            }
        }
    }

    /// vhost-net could not use queue `index`'s ring: the driver gave it
    /// bad addresses or descriptors. The queue stops in the kernel.
    fn ring_error(&mut self, index: usize) {
        let Some(err) = self.errs.get(index) else {
            return;
        };
        if err.read().is_err() || !self.common.is_activated() {
            return;
        }
        crate::error_ratelimited!(
            "virtio-net {} ({}): vhost-net cannot use queue {index} (the driver gave it bad ring addresses or descriptors); the queue stops until the driver resets the device",
            format_mac(&self.mac),
            self.ops.describe()
        );
    }
}

impl VirtioDevice for VhostNet {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if queue_evts.len() != NUM_QUEUES || queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queue_evts.len().min(queues.len()),
            });
        }
        if self.common.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        if !self.common.acked(VIRTIO_F_VERSION_1) {
            return Err(VhostActivateError::NoVersion1.into());
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        let rings = queues
            .iter()
            .enumerate()
            .map(|(i, q)| Ok((vring_config(&mem, q, i)?, q.next_avail())))
            .collect::<Result<Vec<_>, ActivateError>>()?;
        self.common
            .activate_external(mem.clone(), interrupt, queues)?;
        if let Err(e) = self.start(&mem, &rings, &queue_evts) {
            self.stop();
            if let Err(e) = self.ops.set_offloads(0) {
                crate::warn_ratelimited!("virtio-net: cannot clear offloads: {e}");
            }
            self.common.reset();
            return Err(e.into());
        }
        self.kicks = queue_evts;
        log::info!(
            "virtio-net {}: the guest driver activated the device; vhost-net moves its frames",
            format_mac(&self.mac)
        );
        Ok(())
    }

    fn reset_device(&mut self) -> bool {
        self.stop();
        if let Err(e) = self.ops.set_offloads(0) {
            crate::warn_ratelimited!("virtio-net: cannot clear offloads: {e}");
        }
        true
    }
}

impl MutEventSubscriber for VhostNet {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        let fds = self.calls.iter().chain(&self.errs);
        for (tag, fd) in (0u32..).zip(fds) {
            let events = VirtioCommon::device_events(fd.as_raw_fd(), tag, EventSet::IN);
            if let Err(e) = ops.add(events) {
                log::error!(
                    "virtio-net {}: cannot watch a vhost-net eventfd: {e}",
                    format_mac(&self.mac)
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let DeviceEvent::Device { tag, .. } = self.common.event(&events, ops) {
            match tag.checked_sub(ERR_TAG_BASE) {
                None => self.relay_call(tag as usize),
                Some(q) => self.ring_error(q as usize),
            }
        }
    }
}

#[cfg(test)]
#[path = "vhost_net_tests.rs"]
mod tests;
