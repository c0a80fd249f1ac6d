//! Snapshot state of a virtio-mmio transport and of the common part of
//! the device behind it: the registers the driver programmed, each
//! queue's configuration, the interrupt status, the accepted features and,
//! for an activated device, the device's own queue positions
//! (`next_avail`, `next_used`). Restoring an activated device activates it
//! again with those queues, through the same path as a driver's
//! `DRIVER_OK`, so a device's own activation work (a TAP's offloads) is
//! redone.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::MmioTransport;
use crate::virtio::status::{DEVICE_NEEDS_RESET, DRIVER_OK};
use crate::virtio::DeviceState;

/// One queue: the driver's configuration and, for a device's own copy,
/// its positions in the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in use.
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// The queue, checked by virtio-queue (sizes a power of two within
    /// the maximum, ring alignment).
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Why a saved queue cannot be restored (either transport).
#[derive(Debug, thiserror::Error)]
pub enum QueueRestoreError {
    /// A queue's saved state is invalid.
    #[error("queue {index}: {source}")]
    Queue {
        /// The queue.
        index: usize,
        /// Why.
        source: virtio_queue::Error,
    },
    /// A saved queue's rings are outside guest memory.
    #[error("queue {0} lies outside guest memory")]
    QueueOutsideMemory(usize),
}

/// The saved queues `qs`, each checked by virtio-queue and, if ready,
/// with its rings inside `mem`.
pub fn restore_queues(
    qs: &[QueueSnapshot],
    mem: &crate::GuestMemoryMmap,
) -> Result<Vec<Queue>, QueueRestoreError> {
    qs.iter()
        .enumerate()
        .map(|(index, q)| {
            let queue = q
                .to_queue()
                .map_err(|source| QueueRestoreError::Queue { index, source })?;
            if queue.ready() && !queue.is_valid(mem) {
                return Err(QueueRestoreError::QueueOutsideMemory(index));
            }
            Ok(queue)
        })
        .collect()
}

/// A transport's registers and its device's common state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// The virtio device type, checked on restore.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// The driver's view of each queue.
    pub queues: Vec<QueueSnapshot>,
    /// The features the device accepted.
    pub acked_features: u64,
    /// The configuration generation.
    pub config_generation: u32,
    /// The device's own queues, if it is activated.
    pub active_queues: Option<Vec<QueueSnapshot>>,
}

/// Why a transport could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot is of another kind of device.
    #[error("device type {found} where the snapshot has {expected}")]
    DeviceType {
        /// Type in the snapshot.
        expected: u32,
        /// Type of the device here.
        found: u32,
    },
    /// The snapshot has a different number of queues.
    #[error("{found} queues where the snapshot has {expected}")]
    QueueCount {
        /// Queues in the snapshot.
        expected: usize,
        /// Queues of the device here.
        found: usize,
    },
    /// A saved queue cannot be restored.
    #[error(transparent)]
    Queue(#[from] QueueRestoreError),
    /// Activating the device again failed.
    #[error("cannot activate the device: {0}")]
    Activate(#[from] crate::virtio::ActivateError),
}

impl MmioTransport {
    /// The transport's and its device's state. Call with the vCPUs paused
    /// and from the event-loop thread, so neither the driver nor the
    /// device moves the queues meanwhile.
    pub fn save(&self) -> MmioSnapshot {
        let dev = self.lock_device();
        let common = dev.common();
        let active_queues = match common.state() {
            DeviceState::Activated(a) => Some(a.queues.iter().map(|q| q.state().into()).collect()),
            DeviceState::Inactive => None,
        };
        MmioSnapshot {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            acked_features: common.acked_features(),
            config_generation: common.config_generation(),
            active_queues,
        }
    }

    /// Puts a freshly made transport (and its device) in the state `snap`;
    /// an activated device is activated again with its saved queues and
    /// each queue is kicked once, so that work the driver queued before
    /// the snapshot is picked up. Every value is checked as a driver's
    /// would be: a snapshot cannot make the device read outside guest
    /// memory.
    pub fn restore(&mut self, snap: &MmioSnapshot) -> Result<(), RestoreError> {
        if snap.device_type != self.device_type {
            return Err(RestoreError::DeviceType {
                expected: snap.device_type,
                found: self.device_type,
            });
        }
        let count = self.queues.len();
        let check_count = |n: usize| {
            if n == count {
                Ok(())
            } else {
                Err(RestoreError::QueueCount {
                    expected: n,
                    found: count,
                })
            }
        };
        check_count(snap.queues.len())?;
        let to_queues = |qs: &[QueueSnapshot]| restore_queues(qs, &self.mem);
        self.queues = to_queues(&snap.queues)?;
        self.status = snap.status;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.driver_features = snap.driver_features;
        self.queue_sel = snap.queue_sel;
        {
            let mut dev = self.lock_device();
            dev.set_acked_features(snap.acked_features);
            dev.common_mut()
                .set_config_generation(snap.config_generation);
        }
        let live = snap.status & DRIVER_OK != 0 && snap.status & DEVICE_NEEDS_RESET == 0;
        if let (true, Some(active)) = (live, &snap.active_queues) {
            check_count(active.len())?;
            let queues = to_queues(active)?;
            let evts = self
                .queue_evts
                .iter()
                .map(vmm_sys_util::eventfd::EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(crate::virtio::ActivateError::EventFd)?;
            let interrupt: std::sync::Arc<dyn crate::virtio::VirtioInterrupt> =
                self.interrupt.clone();
            let mut dev = self.lock_device();
            dev.activate(self.mem.clone(), interrupt, queues, evts)?;
            for i in 0..count {
                dev.common().kick(i);
            }
        }
        self.interrupt.restore(snap.interrupt_status);
        Ok(())
    }
}
