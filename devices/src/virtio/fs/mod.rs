//! virtio-fs (virtio 1.2 §5.11) as a vhost-user frontend: the FUSE
//! requests on the queues are served by another process, a virtiofsd
//! ([`daemon::Virtiofsd`]), which capsule starts and stops.
//!
//! capsule keeps only the virtio side: the configuration space (the
//! mount tag and the number of request queues), feature negotiation and
//! the hand-over of the queues. At activation the device tells the
//! backend over the vhost-user socket where guest memory is (one
//! `SET_MEM_TABLE` with the memfd behind each RAM region, so guest RAM
//! must be shared: see capsule's `vstate::memory`), where each ring is
//! (as capsule's own addresses of them), and gives it, per queue, the
//! queue's notification eventfd (the KVM ioeventfd: a guest kick reaches
//! the backend without capsule) and a *call* eventfd. The backend writes
//! the call eventfd when it used buffers; the event loop relays that as
//! a queue interrupt of the transport, because virtio-mmio must set its
//! interrupt status before the irqfd fires, which the backend cannot do
//! (virtio-pci sends it to the queue's MSI-X vector of the moment).
//!
//! capsule never reads a FUSE request: what a hostile guest sends on the
//! queues reaches virtiofsd (sandboxed, see `docs/security.md`), not the
//! VMM. What the guest can do to the device itself is the same as for
//! every device: program features and queues through the transport, read
//! and write the configuration space (read-only here).

pub mod daemon;

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::{
    device_type, ActivateError, DeviceEvent, InterruptKind, Queue, VirtioCommon, VirtioDevice,
    VirtioInterrupt,
};

/// The longest mount tag (the configuration space's `tag` field; a tag
/// of exactly this length has no terminating NUL).
pub const MAX_TAG_LEN: usize = 36;
/// Queues: the high-priority queue, then one request queue.
pub const NUM_QUEUES: usize = QUEUES as usize;
/// [`NUM_QUEUES`] in the register width.
const QUEUES: u16 = 2;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// vhost-user's own feature bit: the backend speaks protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// The virtio features capsule passes through from the backend to the
/// guest: the ring layout ones it has seen work end to end.
const PASSED_FEATURES: u64 =
    bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX);
/// Tag of the device event of the backend's socket (the call eventfds
/// use their queue index).
const SOCKET_TAG: u32 = QUEUES as u32;

/// Why a virtio-fs device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The mount tag is empty, too long or has a NUL byte.
    #[error("invalid virtio-fs tag {0:?}: 1 to 36 bytes, no NUL")]
    Tag(String),
    /// The vhost-user handshake failed.
    #[error("vhost-user handshake with virtiofsd failed at {step}: {source}{how}")]
    Handshake {
        /// The request that failed.
        step: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
        /// How the daemon ended, if it did (else empty).
        how: String,
    },
    /// The backend serves fewer queues than virtio-fs needs.
    #[error("virtiofsd is unusable: it serves {0} queues, virtio-fs needs {NUM_QUEUES}")]
    QueueCount(u64),
    /// The backend does not offer `VIRTIO_F_VERSION_1`.
    #[error("virtiofsd is unusable: it does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// An eventfd could not be created.
    #[error("cannot create the virtio-fs call eventfds: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Why an activation could not hand the queues to the backend (the
/// source of [`ActivateError::Backend`]).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The driver did not accept `VIRTIO_F_VERSION_1`.
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// A guest RAM region has no file behind it for the backend to map.
    #[error("guest RAM at {0:#x} is not shareable (no file behind it)")]
    NotShareable(u64),
    /// A vhost-user request failed.
    #[error("{step}: {source}")]
    Request {
        /// The request.
        step: &'static str,
        /// What the vhost crate said.
        source: vhost::Error,
    },
}

impl From<BackendError> for ActivateError {
    fn from(e: BackendError) -> Self {
        ActivateError::Backend(Box::new(e))
    }
}

/// The vhost-user requests the device makes: the frontend's side of the
/// protocol, behind a trait so that the unit tests can stand in for a
/// backend and record what a guest's actions turn into.
pub trait VhostUserOps: Send {
    /// `SET_OWNER`, `GET_FEATURES`, and, if the backend offers protocol
    /// features, `GET_PROTOCOL_FEATURES` + `SET_PROTOCOL_FEATURES`.
    /// Returns the backend's virtio features.
    fn handshake(&mut self) -> Result<u64, FsError>;
    /// `SET_FEATURES`.
    fn set_features(&mut self, features: u64) -> Result<(), vhost::Error>;
    /// `SET_MEM_TABLE`.
    fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error>;
    /// `SET_VRING_NUM`, `_ADDR`, `_BASE`, `_CALL`, `_KICK`, then
    /// `SET_VRING_ENABLE` when protocol features were negotiated.
    fn start_vring(&mut self, index: usize, ring: &VringSetup<'_>) -> Result<(), vhost::Error>;
    /// `SET_VRING_ENABLE` false (if negotiated) and `GET_VRING_BASE`,
    /// which stops the backend's use of the ring.
    fn stop_vring(&mut self, index: usize) -> Result<(), vhost::Error>;
    /// The socket, to notice the backend going away.
    fn raw_fd(&self) -> std::os::unix::io::RawFd;
}

/// What the backend needs to know to serve one queue.
pub struct VringSetup<'a> {
    /// The ring's addresses (capsule's own mapping of them) and sizes.
    pub config: VringConfigData,
    /// The next available index to process.
    pub base: u16,
    /// The eventfd the backend writes when it used buffers.
    pub call: &'a EventFd,
    /// The eventfd the guest's kicks arrive on.
    pub kick: &'a EventFd,
}

/// [`VhostUserOps`] over rust-vmm's vhost-user [`Frontend`].
pub struct FrontendOps {
    frontend: Frontend,
    protocol: bool,
}

impl FrontendOps {
    /// Wraps a connected frontend.
    pub fn new(frontend: Frontend) -> Self {
        Self {
            frontend,
            protocol: false,
        }
    }
}

impl VhostUserOps for FrontendOps {
    fn handshake(&mut self) -> Result<u64, FsError> {
        let step = |step| {
            move |source| FsError::Handshake {
                step,
                source,
                how: String::new(),
            }
        };
        self.frontend.set_owner().map_err(step("SET_OWNER"))?;
        let features = self.frontend.get_features().map_err(step("GET_FEATURES"))?;
        if features & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            // No SET_FEATURES yet: it comes at activation with what the
            // guest accepted (libvhost-user backends refuse features
            // without VERSION_1 as a legacy device).
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            self.frontend
                .set_protocol_features(offered & wanted)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if offered.contains(VhostUserProtocolFeatures::MQ) {
                let n = self
                    .frontend
                    .get_queue_num()
                    .map_err(step("GET_QUEUE_NUM"))?;
                if n < NUM_QUEUES as u64 {
                    return Err(FsError::QueueCount(n));
                }
            }
            self.protocol = true;
        }
        Ok(features)
    }

    fn set_features(&mut self, features: u64) -> Result<(), vhost::Error> {
        let own = if self.protocol {
            bit(VHOST_USER_F_PROTOCOL_FEATURES)
        } else {
            0
        };
        self.frontend.set_features(features | own)
    }

    fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        self.frontend.set_mem_table(regions).map(|_| ())
    }

    fn start_vring(&mut self, index: usize, ring: &VringSetup<'_>) -> Result<(), vhost::Error> {
        self.frontend.set_vring_num(index, ring.config.queue_size)?;
        self.frontend.set_vring_addr(index, &ring.config)?;
        self.frontend.set_vring_base(index, ring.base)?;
        self.frontend.set_vring_call(index, ring.call)?;
        self.frontend.set_vring_kick(index, ring.kick)?;
        if self.protocol {
            self.frontend.set_vring_enable(index, true)?;
        }
        Ok(())
    }

    fn stop_vring(&mut self, index: usize) -> Result<(), vhost::Error> {
        if self.protocol {
            self.frontend.set_vring_enable(index, false)?;
        }
        self.frontend.get_vring_base(index).map(|_| ())
    }

    fn raw_fd(&self) -> std::os::unix::io::RawFd {
        self.frontend.as_raw_fd()
    }
}

/// A virtio-fs device whose requests a vhost-user backend serves.
pub struct Fs {
    common: VirtioCommon,
    backend: Box<dyn VhostUserOps>,
    /// The process serving the backend, stopped when the device is dropped.
    daemon: Option<daemon::Virtiofsd>,
    config: [u8; MAX_TAG_LEN + 4],
    tag: String,
    /// Per queue: the backend writes it when it used buffers.
    calls: Vec<EventFd>,
    /// The kick eventfds of the current activation (the backend has its
    /// own copies; these keep the numbers from being reused meanwhile).
    kicks: Vec<EventFd>,
    /// Queues the backend was told to serve, to stop on reset.
    started: usize,
    /// The backend's socket closed: logged once, not watched any more.
    backend_gone: bool,
}

impl Fs {
    /// A device with mount `tag` whose queues `backend` serves; `daemon`
    /// (if any) is the backend's process, stopped with the device. Does
    /// the vhost-user handshake.
    pub fn new(
        tag: &str,
        mut backend: Box<dyn VhostUserOps>,
        mut daemon: Option<daemon::Virtiofsd>,
    ) -> Result<Self, FsError> {
        let config = config_space(tag)?;
        let features = match backend.handshake() {
            Ok(f) => f,
            Err(FsError::Handshake { step, source, .. }) => {
                // Most likely the daemon refused its arguments or the
                // directory and exited: say so.
                let how = daemon
                    .as_mut()
                    .map(|d| d.describe_exit())
                    .unwrap_or_default();
                return Err(FsError::Handshake { step, source, how });
            }
            Err(e) => return Err(e),
        };
        if features & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::NoVersion1);
        }
        let calls = (0..NUM_QUEUES)
            .map(|_| crate::eventfd())
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        let common = VirtioCommon::new(
            "virtio-fs",
            device_type::FS,
            features & PASSED_FEATURES,
            &[QUEUE_SIZE; NUM_QUEUES],
        )
        .map_err(FsError::EventFd)?;
        Ok(Self {
            common,
            backend,
            daemon,
            config,
            tag: tag.to_string(),
            calls,
            kicks: Vec::new(),
            started: 0,
            backend_gone: false,
        })
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Hands the activation's memory and rings (configuration, next
    /// available index) to the backend.
    fn start_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        rings: &[(VringConfigData, u16)],
        kicks: &[EventFd],
    ) -> Result<(), ActivateError> {
        let fail = |step| move |source| BackendError::Request { step, source };
        self.backend
            .set_features(self.common.acked_features())
            .map_err(fail("SET_FEATURES"))?;
        let regions = memory_regions(mem)?;
        self.backend
            .set_mem_table(&regions)
            .map_err(fail("SET_MEM_TABLE"))?;
        for (index, ((config, base), kick)) in rings.iter().zip(kicks).enumerate() {
            let ring = VringSetup {
                config: *config,
                base: *base,
                call: &self.calls[index],
                kick,
            };
            self.started = index + 1;
            self.backend
                .start_vring(index, &ring)
                .map_err(fail("starting a queue"))?;
        }
        Ok(())
    }

    /// Tells the backend to stop every queue it was given.
    fn stop_backend(&mut self) {
        for index in 0..std::mem::take(&mut self.started) {
            if let Err(e) = self.backend.stop_vring(index) {
                crate::warn_ratelimited!("virtio-fs {}: cannot stop queue {index}: {e}", self.tag);
            }
        }
    }

    /// The backend used buffers of queue `index`: interrupt the driver.
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
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(queue)) {
                crate::error_ratelimited!("virtio-fs {}: cannot raise interrupt: {e}", self.tag);
            }
        }
    }

    /// The backend's socket hung up (it is watched for nothing else):
    /// the backend ended. Logged once (with how the daemon ended), then
    /// the socket is left alone.
    fn backend_event(&mut self, ops: &mut EventOps) {
        if self.backend_gone {
            return;
        }
        self.backend_gone = true;
        let how = self
            .daemon
            .as_mut()
            .map(|d| d.describe_exit())
            .unwrap_or_default();
        log::error!(
            "virtio-fs {}: the vhost-user backend closed its socket{how}; file operations on this share will hang in the guest",
            self.tag
        );
        let _ = ops.remove(Events::empty_raw(self.backend.raw_fd()));
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        // The daemon field drops after this and stops the process.
        log::debug!("virtio-fs {}: device dropped", self.tag);
    }
}

/// The configuration space: the tag, NUL-padded, then
/// `num_request_queues` (le32).
fn config_space(tag: &str) -> Result<[u8; MAX_TAG_LEN + 4], FsError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
        return Err(FsError::Tag(tag.to_string()));
    }
    let mut config = [0u8; MAX_TAG_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[MAX_TAG_LEN..].copy_from_slice(&(u32::from(QUEUES) - 1).to_le_bytes());
    Ok(config)
}

/// One vhost-user memory region per guest RAM region, each with the file
/// (memfd) behind it. Private anonymous RAM cannot be shared: refused.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, ActivateError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| BackendError::NotShareable(region.start_addr().0).into())
        })
        .collect()
}

/// The ring addresses of `queue` as capsule's host addresses, which the
/// backend translates through the memory table.
fn vring_config(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    index: usize,
) -> Result<VringConfigData, ActivateError> {
    // Each ring whole, within one region: the backend reaches it through
    // the region's mapping, so it must not run past the region's end.
    let host = |gpa: u64, len: usize| {
        mem.get_slice(GuestAddress(gpa), len)
            .and_then(|_| mem.get_host_address(GuestAddress(gpa)))
            .map(|p| p as u64)
            .map_err(|_| ActivateError::QueueOutsideMemory(index))
    };
    let size = usize::from(queue.size());
    Ok(VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: queue.size(),
        flags: 0,
        // virtio 1.2 §2.7: 16-byte descriptors; flags, idx, the ring and
        // the event field of 2 (available) or 8 (used) bytes per entry.
        desc_table_addr: host(queue.desc_table(), 16 * size)?,
        used_ring_addr: host(queue.used_ring(), 6 + 8 * size)?,
        avail_ring_addr: host(queue.avail_ring(), 6 + 2 * size)?,
        log_addr: None,
    })
}

impl VirtioDevice for Fs {
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
        if queue_evts.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queue_evts.len(),
            });
        }
        if self.common.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        if !self.common.acked(VIRTIO_F_VERSION_1) {
            return Err(BackendError::NoVersion1.into());
        }
        let rings = queues
            .iter()
            .enumerate()
            .map(|(i, q)| Ok((vring_config(&mem, q, i)?, q.next_avail())))
            .collect::<Result<Vec<_>, ActivateError>>()?;
        self.common
            .activate_external(mem.clone(), interrupt, queues)?;
        if let Err(e) = self.start_backend(&mem, &rings, &queue_evts) {
            self.stop_backend();
            self.common.reset();
            return Err(e);
        }
        self.kicks = queue_evts;
        log::info!(
            "virtio-fs {}: the guest driver activated the share",
            self.tag
        );
        Ok(())
    }

    fn reset_device(&mut self) -> bool {
        self.stop_backend();
        self.kicks.clear();
        true
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        for (tag, call) in (0u32..).zip(&self.calls) {
            let events = VirtioCommon::device_events(call.as_raw_fd(), tag, EventSet::IN);
            if let Err(e) = ops.add(events) {
                log::error!("virtio-fs {}: cannot watch call eventfd: {e}", self.tag);
            }
        }
        // Hang-up only, not IN: the backend's replies to requests made
        // from a vCPU thread (activation, reset) make the socket readable
        // while the loop waits, and are read by the frontend, not here.
        let events =
            VirtioCommon::device_events(self.backend.raw_fd(), SOCKET_TAG, EventSet::READ_HANG_UP);
        if let Err(e) = ops.add(events) {
            log::warn!(
                "virtio-fs {}: cannot watch the backend socket: {e}",
                self.tag
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.common.event(&events, ops) {
            DeviceEvent::Device {
                tag: SOCKET_TAG, ..
            } => self.backend_event(ops),
            DeviceEvent::Device { tag, .. } => self.relay_call(tag as usize),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
