//! Snapshot state of the virtio-vsock device.
//!
//! What survives a snapshot is the device's identity (the guest's CID)
//! and, in the transport's snapshot, its queues. Its connections do not:
//! their host ends are sockets of the process that was saved. So a
//! restored device starts with none and, as Firecracker does, tells the
//! driver with a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue
//! (the guest then drops its side of every connection and re-reads its
//! CID, which a clone may have changed).

use serde::{Deserialize, Serialize};

use super::Vsock;

/// The saved device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSnapshot {
    /// The guest's context id when it was saved.
    pub guest_cid: u64,
}

impl Vsock {
    /// The device's state (call with the vCPUs paused).
    pub fn save(&self) -> VsockSnapshot {
        VsockSnapshot {
            guest_cid: self.cid(),
        }
    }

    /// Once the transport's state is back (the device activated again
    /// with its saved queues): the guest's connections are gone, say so.
    pub fn restored(&mut self) {
        self.transport_reset();
    }
}
