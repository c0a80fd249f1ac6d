//! Virtio devices and their transports.
//!
//! A device model ([`VirtioDevice`], e.g. [`block::Block`]) knows nothing
//! about how the guest reaches it; a transport ([`mmio::MmioTransport`], a
//! virtio-pci one later) owns the registers the driver programs and drives
//! the device through the [`VirtioDevice`] trait. The same device object
//! therefore works behind any transport.
//!
//! # The shape of a device
//!
//! A device is a struct holding a [`VirtioCommon`] (features offered and
//! accepted, queue sizes, the [`DeviceState`]: `Inactive` or `Activated`
//! with the guest memory, interrupt and queues of that activation; the
//! queue eventfds) plus only what is its own. It implements
//! [`VirtioDevice`], whose methods default to the common part (a device
//! overrides `config_space`, and the `activated` / `reset_device` hooks
//! for its own work), and [`MutEventSubscriber`], whose `process` asks
//! [`VirtioCommon::event`] what an event is ([`DeviceEvent`]: activated,
//! queue `i` kicked, one of the device's own descriptors ready; told apart
//! by the event's data tag) and runs the device's queue algorithm for it.
//! `devices/tests/null_device.rs` is the smallest complete example.
//!
//! # Objects and threads
//!
//! * The device lives in one `Arc<Mutex<dyn VirtioDevice>>`, registered
//!   once: the transport holds it and is itself a [`BusDevice`] that vCPU
//!   threads call on guest register accesses, and since `VirtioDevice`
//!   requires `MutEventSubscriber`, the same `Arc` joins the VMM's event
//!   manager **when it builds the VM**, long before the guest activates
//!   the device.
//! * The transport creates one notification [`EventFd`] per queue
//!   ([`mmio::MmioTransport::queue_evts`]) and one interrupt `EventFd`
//!   ([`mmio::MmioTransport::interrupt_evt`]). The VMM registers the queue
//!   eventfds as KVM ioeventfds and the interrupt eventfd as a KVM irqfd.
//!
//! # Activation
//!
//! 1. The driver negotiates features and programs the queues through
//!    transport registers (vCPU thread).
//! 2. When it sets `DRIVER_OK`, the transport validates every ready queue
//!    against guest memory and calls [`VirtioDevice::activate`] with guest
//!    memory, the interrupt object, the queues and duplicates of the queue
//!    eventfds.
//! 3. [`VirtioCommon::activate`] checks them, keeps them as the
//!    activation and writes the device's *control* eventfd, which was added
//!    to the event loop in the subscriber's `init`.
//! 4. The event loop wakes on the control eventfd; [`VirtioCommon::event`]
//!    adds the queue eventfds to the loop (tagged with their index) and
//!    reports [`DeviceEvent::Activated`]. From then on queue work happens
//!    on the event-loop thread.
//!
//! # Notification and interrupts
//!
//! The driver writes a queue index to the transport's notify register. KVM
//! turns that write into an eventfd signal through the ioeventfd (without a
//! VM exit); if no ioeventfd is registered the transport signals the same
//! eventfd itself. The event loop then calls the device's `process`, which
//! drains the queue, fills the used ring and calls
//! [`Activation::signal_used_queue`], which calls
//! [`VirtioInterrupt::trigger`] unless the driver suppressed it. For MMIO
//! that sets a bit in the `InterruptStatus` register and writes the irqfd,
//! which KVM injects.
//!
//! # Reset
//!
//! When the driver writes 0 to the status register the transport calls
//! [`VirtioDevice::reset`]. [`VirtioCommon::reset`] drops guest memory,
//! interrupt and queues at once (so the device cannot touch guest memory
//! afterwards) and retires the queue eventfds; the event loop removes them
//! from epoll on the next control event, and only then are they closed.
//! (Closing first would leave stale epoll registrations behind, because
//! the transport still holds other descriptors of the same eventfds.)
//!
//! [`BusDevice`]: crate::bus::BusDevice
//! [`EventFd`]: vmm_sys_util::eventfd::EventFd

pub mod balloon;
pub mod block;
pub mod console;
mod device;
pub mod fs;
pub mod kick_window;
pub mod mmio;
pub mod net;
pub mod pci;
mod queue_events;
pub mod rng;
mod transport;
pub mod vsock;

use std::io;

pub use device::{
    read_config_bytes, ActivateError, Activation, DeviceEvent, DeviceState, VirtioCommon,
    VirtioDevice,
};
pub use virtio_queue::Queue;

#[doc(no_inline)]
pub use event_manager::MutEventSubscriber;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest OS has noticed the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// The driver has acknowledged the features it understands.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bit numbers shared by all device types.
pub mod features {
    use virtio_bindings::virtio_config as c;
    use virtio_bindings::virtio_ring as r;

    /// The device complies with virtio 1.x (mandatory for modern transports).
    pub const VIRTIO_F_VERSION_1: u32 = c::VIRTIO_F_VERSION_1;
    /// The driver may use indirect descriptor tables.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = r::VIRTIO_RING_F_INDIRECT_DESC;
    /// `used_event` / `avail_event` notification suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = r::VIRTIO_RING_F_EVENT_IDX;

    /// The mask for feature bit number `bit`.
    pub const fn bit(bit: u32) -> u64 {
        1u64 << bit
    }
}

/// Virtio device type ids (virtio 1.2 §5).
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
    /// Console device.
    pub const CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
    /// Network device.
    pub const NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
    /// Socket device (vsock).
    pub const VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
    /// File system device (virtio-fs).
    pub const FS: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_FS;
    /// Memory balloon.
    pub const BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
}

/// What an interrupt tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device put buffers in the used ring of this queue.
    Queue(u16),
    /// The device configuration space changed (or the device needs a reset).
    Config,
}

/// How a device interrupts the driver; implemented by each transport.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises an interrupt of `kind`.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Helpers shared by the virtio unit tests.

    /// `size` bytes of guest memory at address 0 backed by a memfd, as
    /// capsule maps guest RAM when a vhost-user backend must map it too.
    pub fn memfd_mem(size: usize) -> crate::GuestMemoryMmap {
        use std::os::unix::io::FromRawFd;
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"virtio-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size as u64).unwrap();
        crate::GuestMemoryMmap::from_ranges_with_files(&[(
            vm_memory::GuestAddress(0),
            size,
            Some(vm_memory::FileOffset::new(file, 0)),
        )])
        .unwrap()
    }

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use crate::GuestMemoryMmap;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::DescriptorTable;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    /// Acknowledges VERSION_1 plus `extra` and activates `device` with one
    /// queue per ring (in order) and a fresh eventfd for each; returns the
    /// interrupt that records what the device raises.
    pub fn activate_on_rings(
        device: &mut dyn VirtioDevice,
        mem: &GuestMemoryMmap,
        extra: u64,
        rings: &[&Rings],
    ) -> Arc<RecordingInterrupt> {
        let irq = Arc::new(RecordingInterrupt::default());
        device.set_acked_features(features::bit(features::VIRTIO_F_VERSION_1) | extra);
        device
            .activate(
                mem.clone(),
                irq.clone(),
                rings.iter().map(|r| r.queue()).collect(),
                rings
                    .iter()
                    .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
                    .collect(),
            )
            .unwrap();
        irq
    }

    /// The driver side of a split virtqueue in guest memory.
    ///
    /// Uses virtio-queue's mock `DescriptorTable` for descriptors but lays
    /// out the rings itself: `MockSplitQueue` 0.18 places the used ring
    /// `size` bytes after the available ring entries instead of `2 * size`,
    /// so the two overlap once more than `size / 2` entries are used.
    pub struct Rings<'a> {
        mem: &'a GuestMemoryMmap,
        table: DescriptorTable<'a, GuestMemoryMmap>,
        /// Queue size.
        pub size: u16,
        /// Descriptor table address.
        pub desc: u64,
        /// Available ring address.
        pub avail: u64,
        /// Used ring address.
        pub used: u64,
    }

    impl<'a> Rings<'a> {
        /// Lays out a queue of `size` entries from `base` and clears it.
        pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
            let n = u64::from(size);
            let avail = base + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            let zeroes = vec![0u8; (used + 6 + 8 * n - base) as usize];
            mem.write_slice(&zeroes, GuestAddress(base)).unwrap();
            Self {
                mem,
                table: DescriptorTable::new(mem, GuestAddress(base), size),
                size,
                desc: base,
                avail,
                used,
            }
        }

        /// A ready device-side queue for these rings.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
            q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
            q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
            q.set_ready(true);
            q
        }

        /// Stores descriptor `index`.
        pub fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.table.store(index, d).unwrap();
        }

        /// The available ring's `idx`.
        pub fn avail_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
        }

        /// Overwrites the available ring's `idx`.
        pub fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Makes the chain at `head` available.
        pub fn push_avail(&self, head: u16) {
            let idx = self.avail_idx();
            let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.set_avail_idx(idx.wrapping_add(1));
        }

        /// Sets `used_event` (for EVENT_IDX).
        pub fn set_used_event(&self, v: u16) {
            let addr = self.avail + 4 + 2 * u64::from(self.size);
            self.mem.write_obj(v, GuestAddress(addr)).unwrap();
        }

        /// The used ring's `idx`.
        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Used ring entry `i` (modulo the size) as (id, len).
        pub fn used_elem(&self, i: u16) -> (u32, u32) {
            let addr = self.used + 4 + 8 * u64::from(i % self.size);
            let id = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let len = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
            (id, len)
        }
    }

    /// An interrupt that records what was raised.
    #[derive(Default)]
    pub struct RecordingInterrupt {
        pub raised: Mutex<Vec<InterruptKind>>,
        pub count: AtomicU32,
    }

    impl RecordingInterrupt {
        pub fn take(&self) -> Vec<InterruptKind> {
            std::mem::take(&mut *self.raised.lock().unwrap())
        }
    }

    impl VirtioInterrupt for RecordingInterrupt {
        fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
            self.count.fetch_add(1, Ordering::SeqCst);
            self.raised.lock().unwrap().push(kind);
            Ok(())
        }
    }
}
