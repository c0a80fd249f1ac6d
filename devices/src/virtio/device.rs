//! The virtio device model interface: [`VirtioDevice`] and what its
//! activation checks.

use std::io;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Queue, VirtioInterrupt};

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device is already active.
    #[error("device is already active")]
    AlreadyActive,
    /// Setting up notification eventfds failed.
    #[error("cannot set up queue notifications: {0}")]
    EventFd(#[source] io::Error),
}

/// The checks every device's [`VirtioDevice::activate`] starts with: the
/// device is not `active` yet, the transport passed `expected` queues and
/// as many notification eventfds, and the driver made every queue ready.
pub fn check_activation(
    active: bool,
    queues: &[Queue],
    queue_evts: &[EventFd],
    expected: usize,
) -> Result<(), ActivateError> {
    if active {
        return Err(ActivateError::AlreadyActive);
    }
    if queues.len() != expected || queue_evts.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len().min(queue_evts.len()),
        });
    }
    match queues.iter().position(|q| !q.ready()) {
        Some(i) => Err(ActivateError::QueueNotReady(i)),
        None => Ok(()),
    }
}

/// A virtio device model, independent of the transport.
///
/// Register accesses come from vCPU threads through the transport; queue
/// processing happens on the event-loop thread. See the module docs for the
/// activation protocol.
pub trait VirtioDevice: Send {
    /// The virtio device type id (see [`device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;

    /// Records the features the driver accepted (a subset of
    /// [`Self::avail_features`], checked by the transport).
    fn set_acked_features(&mut self, features: u64);

    /// Reads device configuration space at `offset`. Bytes past the end of
    /// the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space at `offset`. Read-only or
    /// out-of-range bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Generation counter of the configuration space; changes whenever the
    /// device changes its configuration.
    fn config_generation(&self) -> u32 {
        0
    }

    /// Starts the device. `queues` and `queue_evts` hold one entry per queue,
    /// in order; queues the driver left unready have `ready() == false`.
    /// The transport has checked every ready queue against guest memory.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;

    /// Returns the device to its initial state. Returns false if the device
    /// cannot be reset. After a successful reset the device no longer
    /// accesses guest memory, and any later activation starts afresh.
    fn reset(&mut self) -> bool;
}
