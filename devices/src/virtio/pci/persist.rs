//! Snapshot state of a virtio-pci function: its configuration space (BAR,
//! command register, MSI-X message control, everything the guest may
//! write), the MSI-X table and pending bits, the common configuration the
//! driver programmed (feature and queue selects, each queue's setup and
//! vector, the device status) and, for an activated device, the device's
//! own queue positions. As with virtio-mmio (`mmio/persist.rs`), an
//! activated device is activated again with its saved queues.
//!
//! A snapshot file is user input: [`VirtioPci::restore`] checks all of it
//! (the read-only configuration bytes, the table size, every vector, every
//! queue, the status and features) before it changes anything.
//!
//! The configuration space is saved whole, so the fields the driver
//! writes into the `VIRTIO_PCI_CAP_PCI_CFG` capability (BAR, offset,
//! length, data) are saved and restored with it. Files written before the
//! function had that capability (the same format version, 3) have no
//! capability there: they restore with it at its reset state.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::interrupt::NO_VECTOR;
use super::{pci_cfg_cap_body, VirtioPci, CAP_VENDOR};
use crate::pci::config::RestoreError as ConfigRestoreError;
use crate::pci::config::CONFIG_SIZE;
use crate::pci::msix::{MsixRestoreError, MsixSnapshot, CONTROL_ENABLE, CONTROL_FUNCTION_MASK};
use crate::virtio::mmio::persist::{restore_queues, QueueRestoreError, QueueSnapshot};
use crate::virtio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use crate::virtio::{ActivateError, DeviceState, VirtioInterrupt};

/// A virtio-pci function as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSnapshot {
    /// The virtio device type, checked on restore.
    pub device_type: u32,
    /// The 256 bytes of configuration space.
    pub config_space: Vec<u8>,
    /// The MSI-X table, pending bits and control.
    pub msix: MsixSnapshot,
    /// The common configuration and the device's common state.
    pub common: CommonSnapshot,
}

/// The common configuration structure's state and the device's common
/// state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonSnapshot {
    /// `device_status`.
    pub status: u8,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// `queue_select`.
    pub queue_select: u16,
    /// `config_msix_vector`.
    pub config_msix_vector: u16,
    /// Each queue's `queue_msix_vector`.
    pub queue_msix_vectors: Vec<u16>,
    /// The ISR status byte.
    pub isr: u8,
    /// The driver's view of each queue (size, enable, addresses).
    pub queues: Vec<QueueSnapshot>,
    /// The features the device accepted.
    pub acked_features: u64,
    /// The configuration generation.
    pub config_generation: u32,
    /// The device's own queues, if it is activated.
    pub active_queues: Option<Vec<QueueSnapshot>>,
}

/// Why a virtio-pci function could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum PciRestoreError {
    /// The snapshot is of another kind of device.
    #[error("device type {found} where the snapshot has {expected}")]
    DeviceType {
        /// Type in the snapshot.
        expected: u32,
        /// Type of the device here.
        found: u32,
    },
    /// The configuration space does not fit this function.
    #[error("PCI configuration space: {0}")]
    Config(#[from] ConfigRestoreError),
    /// The MSI-X state does not fit this function.
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixRestoreError),
    /// The configuration space's message control disagrees with the
    /// MSI-X state.
    #[error("MSI-X message control {config:#06x} in configuration space, {msix:#06x} in the MSI-X state")]
    Control {
        /// Enable and mask bits in configuration space.
        config: u16,
        /// Those of the MSI-X state.
        msix: u16,
    },
    /// A vector past the table.
    #[error("MSI-X vector {vector} of a table of {vectors}")]
    Vector {
        /// The vector.
        vector: u16,
        /// Vectors in the table.
        vectors: usize,
    },
    /// The snapshot has a different number of queues.
    #[error("{found} queues where the snapshot has {expected}")]
    QueueCount {
        /// Queues (or queue vectors) in the snapshot.
        expected: usize,
        /// Queues of the device here.
        found: usize,
    },
    /// A saved queue cannot be restored.
    #[error(transparent)]
    Queue(#[from] QueueRestoreError),
    /// A device status with bits virtio does not define.
    #[error("invalid device status {0:#x}")]
    Status(u8),
    /// Accepted features the device does not offer.
    #[error("accepted features {0:#x} are not offered by the device")]
    Features(u64),
    /// Activating the device again failed.
    #[error("cannot activate the device: {0}")]
    Activate(#[from] ActivateError),
}

/// Device status bits virtio defines.
const STATUS_BITS: u32 =
    ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET | FAILED;

impl VirtioPci {
    /// The function's and its device's state. Call with the vCPUs paused
    /// and from the event-loop thread, so that neither the driver nor the
    /// device moves the queues meanwhile.
    pub fn save(&self) -> PciSnapshot {
        let c = &self.common;
        let interrupt = c.interrupt.clone();
        let (acked_features, config_generation, active_queues) = {
            let dev = c.lock_device();
            let common = dev.common();
            let active = match common.state() {
                DeviceState::Activated(a) => {
                    Some(a.queues.iter().map(|q| q.state().into()).collect())
                }
                DeviceState::Inactive => None,
            };
            (common.acked_features(), common.config_generation(), active)
        };
        let msix = interrupt.msix().save();
        PciSnapshot {
            device_type: c.device_type,
            config_space: self.config.save(),
            msix,
            common: CommonSnapshot {
                status: c.status,
                device_feature_select: c.device_feature_select,
                driver_feature_select: c.driver_feature_select,
                driver_features: c.driver_features,
                queue_select: c.queue_select,
                config_msix_vector: interrupt.config_vector(),
                queue_msix_vectors: (0..interrupt.queues())
                    .map(|q| interrupt.queue_vector(q))
                    .collect(),
                isr: interrupt.isr(),
                queues: c.queues.iter().map(|q| q.state().into()).collect(),
                acked_features,
                config_generation,
                active_queues,
            },
        }
    }

    /// Puts a freshly made function (and its device) in the state `snap`:
    /// configuration space, MSI-X (each live vector routed again, pending
    /// ones delivered), the common configuration; an activated device is
    /// activated again with its saved queues and each queue kicked once.
    /// Everything is checked first: on error nothing has changed.
    pub fn restore(&mut self, snap: &PciSnapshot) -> Result<(), PciRestoreError> {
        let device_type = self.common.device_type;
        if snap.device_type != device_type {
            return Err(PciRestoreError::DeviceType {
                expected: snap.device_type,
                found: device_type,
            });
        }
        let mut config = self.config.clone();
        config.restore(&self.with_pci_cfg_cap(&snap.config_space))?;
        let mask = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        let control = config.read_u16(self.msix_cap + 2) & mask;
        let msix_control = (if snap.msix.enabled { CONTROL_ENABLE } else { 0 })
            | (if snap.msix.function_masked {
                CONTROL_FUNCTION_MASK
            } else {
                0
            });
        if control != msix_control {
            return Err(PciRestoreError::Control {
                config: control,
                msix: msix_control,
            });
        }
        let (queues, active) = self.check_common(&snap.common)?;
        let interrupt = self.common.interrupt.clone();
        let s = &snap.common;
        // Checks the table size before it changes anything.
        interrupt.msix().restore(&snap.msix)?;
        // Checked above: cannot fail.
        interrupt
            .restore(s.config_msix_vector, &s.queue_msix_vectors, s.isr)
            .map_err(|bad| match bad {
                Some(vector) => PciRestoreError::Vector {
                    vector,
                    vectors: interrupt.msix().len(),
                },
                None => PciRestoreError::QueueCount {
                    expected: s.queue_msix_vectors.len(),
                    found: interrupt.queues(),
                },
            })?;
        self.config = config;
        self.apply_common(s, queues, active)
    }

    /// `saved`, or, if it is the configuration space of a function that
    /// had no `VIRTIO_PCI_CAP_PCI_CFG` capability yet (its chain ends at
    /// MSI-X and the bytes where that capability now is are zero), a copy
    /// with the capability linked in at its reset state. Anything else is
    /// left for [`crate::pci::ConfigSpace::restore`] to check.
    fn with_pci_cfg_cap<'a>(&self, saved: &'a [u8]) -> Cow<'a, [u8]> {
        let link = self.msix_cap + 1;
        let cap = self.pci_cfg_cap;
        let (body, _) = pci_cfg_cap_body();
        let end = cap + 2 + body.len();
        let before_cap = saved.len() == CONFIG_SIZE
            && saved.get(link) == Some(&0)
            && saved
                .get(cap..end)
                .is_some_and(|b| b.iter().all(|&b| b == 0));
        let (Ok(next), true) = (u8::try_from(cap), before_cap) else {
            return Cow::Borrowed(saved);
        };
        let mut upgraded = saved.to_vec();
        upgraded[link] = next;
        upgraded[cap] = CAP_VENDOR;
        upgraded[cap + 1] = 0;
        upgraded[cap + 2..end].copy_from_slice(&body);
        Cow::Owned(upgraded)
    }

    /// Checks the common state against this function: vectors, queues,
    /// status and features. Returns the driver's queues and, for a live
    /// device, its own.
    fn check_common(
        &self,
        s: &CommonSnapshot,
    ) -> Result<(Vec<Queue>, Option<Vec<Queue>>), PciRestoreError> {
        let count = self.common.queues.len();
        let check_count = |n: usize| {
            (n == count)
                .then_some(())
                .ok_or(PciRestoreError::QueueCount {
                    expected: n,
                    found: count,
                })
        };
        check_count(s.queues.len())?;
        check_count(s.queue_msix_vectors.len())?;
        let vectors = self.common.interrupt.msix().len();
        if let Some(&vector) = std::iter::once(&s.config_msix_vector)
            .chain(&s.queue_msix_vectors)
            .find(|&&v| v != NO_VECTOR && usize::from(v) >= vectors)
        {
            return Err(PciRestoreError::Vector { vector, vectors });
        }
        if u32::from(s.status) & !STATUS_BITS != 0 {
            return Err(PciRestoreError::Status(s.status));
        }
        let unoffered = s.acked_features & !self.common.device_features;
        if unoffered != 0 {
            return Err(PciRestoreError::Features(unoffered));
        }
        let mem = &self.common.mem;
        let to_queues = |qs: &[QueueSnapshot]| restore_queues(qs, mem);
        let queues = to_queues(&s.queues)?;
        let status = u32::from(s.status);
        let live = status & DRIVER_OK != 0 && status & DEVICE_NEEDS_RESET == 0;
        let active = match (live, &s.active_queues) {
            (true, Some(a)) => {
                check_count(a.len())?;
                Some(to_queues(a)?)
            }
            _ => None,
        };
        Ok((queues, active))
    }

    /// Applies the checked common state; activates the device with
    /// `active` and kicks each of its queues.
    fn apply_common(
        &mut self,
        s: &CommonSnapshot,
        queues: Vec<Queue>,
        active: Option<Vec<Queue>>,
    ) -> Result<(), PciRestoreError> {
        let c = &mut self.common;
        c.queues = queues;
        c.status = s.status;
        c.device_feature_select = s.device_feature_select;
        c.driver_feature_select = s.driver_feature_select;
        c.driver_features = s.driver_features;
        c.queue_select = s.queue_select;
        let evts = c
            .queue_evts()
            .iter()
            .map(vmm_sys_util::eventfd::EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(ActivateError::EventFd)?;
        let interrupt: Arc<dyn VirtioInterrupt> = c.interrupt.clone();
        let mem = c.mem.clone();
        let mut dev = c.lock_device();
        dev.set_acked_features(s.acked_features);
        dev.common_mut().set_config_generation(s.config_generation);
        if let Some(active) = active {
            let count = active.len();
            dev.activate(mem, interrupt, active, evts)?;
            for i in 0..count {
                dev.common().kick(i);
            }
        }
        Ok(())
    }
}
