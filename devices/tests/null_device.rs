//! A trivial virtio device written against the public device scaffold
//! only, to show what a new device costs: this file and nothing else.
//!
//! The "null" device has one queue whose buffers it returns unread, and a
//! 4-byte configuration space. The test drives it the way the VMM does:
//! behind the virtio-mmio transport, registered once with an event loop,
//! with a driver stand-in programming the registers and the rings in guest
//! memory.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures cast small, known values"
)]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::virtio::features::{bit, VIRTIO_F_VERSION_1};
use devices::virtio::mmio::{MmioTransport, INT_VRING};
use devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use devices::virtio::{DeviceEvent, VirtioCommon, VirtioDevice};
use devices::GuestMemoryMmap;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_mmio as regs;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

/// Not a type virtio assigns; the driver stand-in does not care.
const NULL_DEVICE_TYPE: u32 = 0x4e;
const QUEUE_SIZE: u16 = 8;

/// The whole device: the common part and a configuration space.
struct Null {
    common: VirtioCommon,
    config: [u8; 4],
}

impl Null {
    fn new() -> Self {
        let features = bit(VIRTIO_F_VERSION_1);
        Self {
            common: VirtioCommon::new("virtio-null", NULL_DEVICE_TYPE, features, &[QUEUE_SIZE])
                .unwrap(),
            config: *b"null",
        }
    }

    /// Returns every available buffer unread.
    fn process_queue(&mut self) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mut returned = 0;
        while let Some(chain) = active.queues[0].pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            active.queues[0].add_used(&active.mem, head, 0).unwrap();
            returned += 1;
        }
        if returned > 0 {
            active.signal_used_queue(0);
        }
    }
}

impl VirtioDevice for Null {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }
}

impl MutEventSubscriber for Null {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let DeviceEvent::Queue(0) = self.common.event(&events, ops) {
            self.process_queue();
        }
    }
}

// The driver stand-in.

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFER: u64 = 0x4000;

fn read_reg(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

fn write_reg(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

/// Feature negotiation and queue 0 set up, up to `DRIVER_OK`.
fn bring_up(t: &mut MmioTransport) {
    write_reg(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    write_reg(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    write_reg(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_reg(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
    write_reg(
        t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
    assert_eq!(
        read_reg(t, regs::VIRTIO_MMIO_STATUS) & FEATURES_OK,
        FEATURES_OK
    );
    write_reg(t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(
        read_reg(t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX),
        u32::from(QUEUE_SIZE)
    );
    write_reg(t, regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
    write_reg(t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
    write_reg(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    write_reg(t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    write_reg(t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    let ok = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    write_reg(t, regs::VIRTIO_MMIO_STATUS, ok);
    assert_eq!(read_reg(t, regs::VIRTIO_MMIO_STATUS), ok);
}

/// Makes descriptor `index` (one 64-byte buffer) available.
fn post_buffer(mem: &GuestMemoryMmap, index: u16) {
    let desc = DESC + 16 * u64::from(index);
    mem.write_obj(BUFFER + 64 * u64::from(index), GuestAddress(desc))
        .unwrap();
    mem.write_obj(64u32, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(0u16, GuestAddress(desc + 12)).unwrap(); // flags
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    let slot = AVAIL + 4 + 2 * u64::from(idx % QUEUE_SIZE);
    mem.write_obj(index, GuestAddress(slot)).unwrap();
    mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
        .unwrap();
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

#[test]
fn a_null_device_works_behind_the_mmio_transport_and_the_event_loop() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    // One object, registered once: the transport's device and the event
    // loop's subscriber are the same `Arc`.
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Null::new()));
    let mut transport = MmioTransport::new(mem.clone(), device.clone()).unwrap();
    let mut event_loop = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    event_loop.add_subscriber(device.clone());

    assert_eq!(
        read_reg(&mut transport, regs::VIRTIO_MMIO_DEVICE_ID),
        NULL_DEVICE_TYPE
    );
    let mut config = [0u8; 8];
    transport.read(0x100, &mut config);
    assert_eq!(&config, b"null\0\0\0\0", "config space plus zeroes past it");

    bring_up(&mut transport);
    assert!(device.lock().unwrap().common().is_activated());
    // The activation reaches the loop, which adds the queue's eventfd.
    event_loop.run_with_timeout(100).unwrap();

    for index in 0..3 {
        post_buffer(&mem, index);
    }
    write_reg(&mut transport, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    event_loop.run_with_timeout(100).unwrap();
    assert_eq!(used_idx(&mem), 3, "every buffer returned");
    assert_eq!(
        read_reg(&mut transport, regs::VIRTIO_MMIO_INTERRUPT_STATUS),
        INT_VRING
    );
    assert_eq!(transport.interrupt_evt().read().unwrap(), 1);

    // A reset takes the queue away: a later kick touches no guest memory.
    write_reg(&mut transport, regs::VIRTIO_MMIO_STATUS, 0);
    assert!(!device.lock().unwrap().common().is_activated());
    event_loop.run_with_timeout(100).unwrap();
    post_buffer(&mem, 3);
    write_reg(&mut transport, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    event_loop.run_with_timeout(10).unwrap();
    assert_eq!(used_idx(&mem), 3);
}
