//! virtio-mmio transport tests: a mock device behind the register window.

use super::*;
use crate::virtio::features::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::test_utils::Rings;
use crate::virtio::{ActivateError, VirtioCommon};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestAddress;

const QSIZE: u16 = 16;

struct MockDevice {
    common: VirtioCommon,
    acked: u64,
    config: [u8; 8],
    activations: Vec<(usize, Vec<bool>)>,
    resets: usize,
    refuse_reset: bool,
}

impl Default for MockDevice {
    fn default() -> Self {
        let features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | 1;
        Self {
            common: VirtioCommon::new("mock", 42, features, &[QSIZE, QSIZE]).unwrap(),
            acked: 0,
            config: [0; 8],
            activations: Vec::new(),
            resets: 0,
            refuse_reset: false,
        }
    }
}

impl MutEventSubscriber for MockDevice {
    fn init(&mut self, _ops: &mut EventOps) {}
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
}

/// Records what the transport does instead of the common behaviour.
impl VirtioDevice for MockDevice {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn config_space(&self) -> &[u8] {
        &self.config
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if !queues[0].ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        self.activations
            .push((queue_evts.len(), queues.iter().map(|q| q.ready()).collect()));
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        self.acked = 0;
        !self.refuse_reset
    }
}

fn setup() -> (GuestMemoryMmap, Arc<Mutex<MockDevice>>, MmioTransport) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let dev = Arc::new(Mutex::new(MockDevice::default()));
    let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    (mem, dev, t)
}

fn rd(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
    wr(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    wr(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, low);
    wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, high);
    wr(
        t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport, index: u32, vq: &Rings) {
    wr(t, regs::VIRTIO_MMIO_QUEUE_SEL, index);
    assert_eq!(rd(t, regs::VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(rd(t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QSIZE));
    wr(t, regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
    let split = |a: u64| (a as u32, (a >> 32) as u32);
    let (l, h) = split(vq.desc);
    wr(t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, l);
    wr(t, regs::VIRTIO_MMIO_QUEUE_DESC_HIGH, h);
    let (l, h) = split(vq.avail);
    wr(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, l);
    wr(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, h);
    let (l, h) = split(vq.used);
    wr(t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, l);
    wr(t, regs::VIRTIO_MMIO_QUEUE_USED_HIGH, h);
    wr(t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rd(t, regs::VIRTIO_MMIO_QUEUE_READY), 1);
}

#[test]
fn identification_registers() {
    let (_, _, mut t) = setup();
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_VENDOR_ID), 0);
    wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES),
        (1 << VIRTIO_RING_F_EVENT_IDX) | 1
    );
    wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES), 1); // VERSION_1
    wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_CONFIG_GENERATION), 0);
    assert_eq!(t.queue_evts().len(), 2);
}

#[test]
fn full_handshake_activates_device() {
    let (mem, dev, mut t) = setup();
    let vq = Rings::new(&mem, 0x1000, QSIZE);
    negotiate(&mut t, 1, 1);
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
    assert_eq!(dev.lock().unwrap().acked, bit(VIRTIO_F_VERSION_1) | 1);
    setup_queue(&mut t, 0, &vq);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_eq!(
        dev.lock().unwrap().activations,
        vec![(2, vec![true, false])]
    );

    // The device raised a queue interrupt during activation.
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    assert_eq!(t.interrupt_evt().read().unwrap(), 1);
    wr(&mut t, regs::VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Queue configuration is frozen after DRIVER_OK.
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 1);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 0);

    // Notifications signal the queue's eventfd.
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    assert!(t.queue_evts()[0].read().is_err());
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 7); // no such queue: ignored
}

#[test]
fn feature_negotiation_rejects() {
    // Without VERSION_1.
    let (_, dev, mut t) = setup();
    negotiate(&mut t, 1, 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(dev.lock().unwrap().acked, 0);

    // With a feature the device does not offer.
    let (_, dev, mut t) = setup();
    negotiate(&mut t, 1 | 2, 1);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(dev.lock().unwrap().acked, 0);

    // With a bit in a feature word that does not exist.
    let (_, _, mut t) = setup();
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 5);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn status_transitions_must_be_in_order() {
    let (_, dev, mut t) = setup();
    // Skipping ACKNOWLEDGE.
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
    // Straight to DRIVER_OK.
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | DRIVER_OK,
    );
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE);
    // Features written before DRIVER are ignored.
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
    // Clearing a bit without a reset.
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
    // FAILED sticks until reset.
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FAILED,
    );
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FAILED
    );
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FAILED
    );
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
    assert!(dev.lock().unwrap().activations.is_empty());
}

#[test]
fn invalid_queue_sets_needs_reset() {
    let (_, dev, mut t) = setup();
    negotiate(&mut t, 0, 1);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
    // Rings beyond the end of guest memory.
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, 0xfff0_0000);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    let status = rd(&mut t, regs::VIRTIO_MMIO_STATUS);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
    assert!(dev.lock().unwrap().activations.is_empty());
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    // Nothing but a reset gets it going again.
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, status | 0x10);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), status);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn device_refusing_activation_sets_needs_reset() {
    let (_, dev, mut t) = setup();
    negotiate(&mut t, 0, 1);
    // No queue made ready: the mock device refuses.
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_ne!(rd(&mut t, regs::VIRTIO_MMIO_STATUS) & DEVICE_NEEDS_RESET, 0);
    assert!(dev.lock().unwrap().activations.is_empty());
}

#[test]
fn reset_clears_transport_and_device() {
    let (mem, dev, mut t) = setup();
    let vq = Rings::new(&mem, 0x1000, QSIZE);
    negotiate(&mut t, 1, 1);
    setup_queue(&mut t, 0, &vq);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    {
        let d = dev.lock().unwrap();
        assert_eq!(d.resets, 1);
        assert_eq!(d.acked, 0);
    }
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(
        t.queue_evts()[0].read().is_err(),
        "stale notification drained"
    );

    // The device can be brought up again.
    negotiate(&mut t, 0, 1);
    setup_queue(&mut t, 0, &vq);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(dev.lock().unwrap().activations.len(), 2);

    // A device that cannot reset leaves NEEDS_RESET set.
    dev.lock().unwrap().refuse_reset = true;
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), DEVICE_NEEDS_RESET);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), DEVICE_NEEDS_RESET);
}

#[test]
fn config_space_access() {
    let (_, dev, mut t) = setup();
    dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
    let mut b = [0u8; 4];
    t.read(0x100, &mut b);
    assert_eq!(b, [1, 2, 3, 4]);
    let mut b = [0u8; 2];
    t.read(0x106, &mut b);
    assert_eq!(b, [7, 8]);
    let mut b = [0xffu8; 8];
    t.read(0x104, &mut b);
    assert_eq!(b, [5, 6, 7, 8, 0, 0, 0, 0]);
    let mut b = [0xffu8; 1];
    t.read(0xfff, &mut b);
    assert_eq!(b, [0]);
    t.write(0x101, &[0xaa]);
    assert_eq!(dev.lock().unwrap().config[1], 0xaa);
    // Odd widths are ignored.
    let mut b = [0xffu8; 3];
    t.read(0x100, &mut b);
    assert_eq!(b, [0, 0, 0]);
    t.write(0x100, &[9, 9, 9]);
    assert_eq!(dev.lock().unwrap().config[0], 1);
}

#[test]
fn bad_widths_and_offsets_are_ignored() {
    let (_, _, mut t) = setup();
    for (off, len) in [
        (0u64, 1usize),
        (0, 2),
        (0, 8),
        (2, 4),
        (0x71, 4),
        (0x1000, 4),
        (u64::MAX, 4),
    ] {
        let mut b = vec![0xffu8; len];
        t.read(off, &mut b);
        assert!(b.iter().all(|&x| x == 0), "read {off:#x}/{len}");
    }
    // Unknown registers read as zero.
    assert_eq!(rd(&mut t, 0x0fc - 4), 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY), 0);
    // Byte-wide and unaligned status writes do nothing.
    t.write(0x70, &[ACKNOWLEDGE as u8]);
    t.write(0x72, &ACKNOWLEDGE.to_le_bytes());
    t.write(0x70, &[1, 0, 0, 0, 0, 0, 0, 0]);
    t.write(u64::MAX, &[1, 0, 0, 0]);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
    // Out-of-range queue selection.
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 9);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 8);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 0);
    // Invalid queue sizes are refused.
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 0x1_0000);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 3);
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 32);
    assert_eq!(t.queues[0].size(), QSIZE);
}
