//! virtio-pci transport tests: a mock device behind the function.

use std::sync::Mutex as StdMutex;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestAddress;

use super::interrupt::NO_VECTOR;
use super::*;
use crate::pci::msix::MsiMessage;
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1};
use crate::virtio::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::virtio::test_utils::Rings;
use crate::virtio::{ActivateError, InterruptKind, VirtioCommon, VirtioInterrupt};

const QSIZE: u16 = 16;
const BAR: u64 = 0xe000_0000;

struct Mock {
    common: VirtioCommon,
    config: [u8; 8],
    activations: usize,
    irq: Option<Arc<dyn VirtioInterrupt>>,
}

impl MutEventSubscriber for Mock {
    fn init(&mut self, _ops: &mut EventOps) {}
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
}

impl VirtioDevice for Mock {
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
        evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if !queues[0].ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        // With every queue ready (the snapshot tests), the common state
        // is activated too: its queues are what a snapshot saves.
        if queues.iter().all(|q| q.ready()) {
            self.common.activate(mem, interrupt.clone(), queues, evts)?;
        }
        self.activations += 1;
        self.irq = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if self.common.is_activated() {
            self.common.reset();
        }
        self.irq = None;
        true
    }
}

#[derive(Default)]
struct Routes(StdMutex<Vec<(u32, Option<MsiMessage>)>>);

impl MsiRouter for Routes {
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        self.0.lock().unwrap().push((gsi, message));
        Ok(())
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Mock>>,
    routes: Arc<Routes>,
    t: VirtioPci,
}

fn setup() -> Fixture {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let dev = Arc::new(Mutex::new(Mock {
        common: VirtioCommon::new("mock", 2, bit(VIRTIO_F_VERSION_1) | 1, &[QSIZE, QSIZE]).unwrap(),
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        activations: 0,
        irq: None,
    }));
    let routes = Arc::new(Routes::default());
    let t = VirtioPci::new(mem.clone(), dev.clone(), BAR, 24, routes.clone()).unwrap();
    Fixture {
        mem,
        dev,
        routes,
        t,
    }
}

fn cfg32(t: &mut VirtioPci, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.config_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn rd(t: &mut VirtioPci, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    t.read(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wr(t: &mut VirtioPci, off: u64, len: usize, v: u64) {
    t.write(off, &v.to_le_bytes()[..len]);
}

/// The capabilities as (offset, id, bytes after id and next).
fn caps(t: &mut VirtioPci) -> Vec<(u64, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut p = u64::from(cfg32(t, 0x34) as u8);
    while p != 0 && out.len() < 48 {
        let head = cfg32(t, p);
        let mut body = vec![0u8; 18];
        t.config_read(p + 2, &mut body);
        out.push((p, head as u8, body));
        p = u64::from((head >> 8) as u8);
    }
    out
}

#[test]
fn the_function_is_a_modern_virtio_device_with_its_capabilities() {
    let mut f = setup();
    assert_eq!(
        cfg32(&mut f.t, 0),
        0x1042_1af4,
        "vendor 1af4, device 1040 + 2"
    );
    assert_eq!(cfg32(&mut f.t, 8) & 0xff, 1, "revision 1");
    assert_eq!(cfg32(&mut f.t, 0x10), BAR as u32);
    assert_eq!(cfg32(&mut f.t, 0x14), 0, "no other BAR (no legacy I/O BAR)");
    assert_eq!(cfg32(&mut f.t, 0x3c) >> 8 & 0xff, 0, "no INTx pin");
    let caps = caps(&mut f.t);
    let vendor: Vec<_> = caps
        .iter()
        .filter(|c| c.1 == CAP_VENDOR)
        .map(|(_, _, b)| {
            let off = u32::from_le_bytes(b[6..10].try_into().unwrap());
            (b[1], b[2], off)
        })
        .collect();
    assert_eq!(
        vendor,
        vec![
            (CFG_COMMON, 0, 0),
            (CFG_ISR, 0, 0x1000),
            (CFG_DEVICE, 0, 0x2000),
            (CFG_NOTIFY, 0, 0x3000),
            (CFG_PCI, 0, 0)
        ]
    );
    let pci_cfg = caps.last().unwrap();
    assert_eq!(
        (pci_cfg.1, pci_cfg.2[0], pci_cfg.2[1]),
        (CAP_VENDOR, 20, CFG_PCI),
        "VIRTIO_PCI_CAP_PCI_CFG ends the chain: 20 bytes"
    );
    let notify = caps
        .iter()
        .find(|c| c.1 == CAP_VENDOR && c.2[1] == CFG_NOTIFY)
        .unwrap();
    assert_eq!(notify.2[0], 20, "notify cap length");
    assert_eq!(u32::from_le_bytes(notify.2[14..18].try_into().unwrap()), 4);
    let msix = caps.iter().find(|c| c.1 == CAP_MSIX).unwrap();
    assert_eq!(u16::from_le_bytes([msix.2[0], msix.2[1]]), 2, "3 vectors");
    assert_eq!(u32::from_le_bytes(msix.2[2..6].try_into().unwrap()), 0x4000);
    assert_eq!(
        u32::from_le_bytes(msix.2[6..10].try_into().unwrap()),
        0x5000
    );
    assert_eq!(f.t.notify_address(1), BAR + 0x3004);
}

#[test]
fn bar_sizing_works_and_a_moved_bar_is_only_remembered() {
    let mut f = setup();
    f.t.config_write(0x10, &[0xff; 4]);
    assert_eq!(cfg32(&mut f.t, 0x10), !(layout::BAR_SIZE as u32 - 1));
    f.t.config_write(0x10, &(BAR as u32).to_le_bytes());
    assert_eq!(cfg32(&mut f.t, 0x10), BAR as u32);
    f.t.config_write(0x10, &0x1234_5678u32.to_le_bytes());
    assert_eq!(f.t.bar(), BAR);
}

fn drive_to_features_ok(t: &mut VirtioPci) {
    wr(t, 0x14, 1, u64::from(ACKNOWLEDGE));
    wr(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
    wr(t, 0x08, 4, 0);
    wr(t, 0x0c, 4, 1);
    wr(t, 0x08, 4, 1);
    wr(t, 0x0c, 4, 1);
    wr(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
}

fn setup_queue(t: &mut VirtioPci, q: u16, rings: &Rings, vector: u16) {
    wr(t, 0x16, 2, u64::from(q));
    assert_eq!(rd(t, 0x18, 2), u64::from(QSIZE));
    assert_eq!(rd(t, 0x1e, 2), u64::from(q), "notify offset");
    wr(t, 0x18, 2, u64::from(QSIZE));
    wr(t, 0x1a, 2, u64::from(vector));
    wr(t, 0x20, 4, rings.desc & 0xffff_ffff);
    wr(t, 0x24, 4, rings.desc >> 32);
    wr(t, 0x28, 8, rings.avail);
    wr(t, 0x30, 8, rings.used);
    wr(t, 0x1c, 2, 1);
    assert_eq!(rd(t, 0x1c, 2), 1);
    assert_eq!(rd(t, 0x20, 8), rings.desc);
    assert_eq!(rd(t, 0x28, 8), rings.avail);
}

#[test]
fn common_config_sets_up_queues_and_activates_then_resets() {
    let mut f = setup();
    assert_eq!(rd(&mut f.t, 0x12, 2), 2, "num_queues");
    wr(&mut f.t, 0x00, 4, 1);
    assert_eq!(rd(&mut f.t, 0x04, 4), 1, "VERSION_1 in the high word");
    wr(&mut f.t, 0x00, 4, 0);
    assert_eq!(rd(&mut f.t, 0x04, 4), 1, "feature bit 0");
    drive_to_features_ok(&mut f.t);
    assert_eq!(
        rd(&mut f.t, 0x14, 1),
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK)
    );
    let rings = Rings::new(&f.mem, 0x1000, QSIZE);
    wr(&mut f.t, 0x10, 2, 0);
    assert_eq!(rd(&mut f.t, 0x10, 2), 0, "config vector 0");
    setup_queue(&mut f.t, 0, &rings, 1);
    assert_eq!(rd(&mut f.t, 0x1a, 2), 1);
    wr(&mut f.t, 0x1a, 2, 9);
    assert_eq!(rd(&mut f.t, 0x1a, 2), u64::from(NO_VECTOR), "no vector 9");
    wr(&mut f.t, 0x1a, 2, 1);
    wr(
        &mut f.t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    assert_eq!(f.dev.lock().unwrap().activations, 1);
    assert_eq!(rd(&mut f.t, 0x14, 1) as u32 & DRIVER_OK, DRIVER_OK);
    // Queue setup is frozen now.
    wr(&mut f.t, 0x18, 2, 4);
    assert_eq!(rd(&mut f.t, 0x18, 2), u64::from(QSIZE));
    // Notifications reaching the transport signal the queue's eventfd.
    wr(&mut f.t, layout::NOTIFY + 4, 2, 1);
    assert_eq!(f.t.queue_evts()[1].read().unwrap(), 1);
    wr(&mut f.t, layout::NOTIFY + 4 * 100, 2, 1);
    // Reset: status 0, vectors forgotten, queues unready.
    wr(&mut f.t, 0x14, 1, 0);
    assert_eq!(rd(&mut f.t, 0x14, 1), 0);
    assert!(f.dev.lock().unwrap().irq.is_none());
    assert_eq!(rd(&mut f.t, 0x10, 2), u64::from(NO_VECTOR));
    wr(&mut f.t, 0x16, 2, 0);
    assert_eq!(rd(&mut f.t, 0x1c, 2), 0);
    assert_eq!(rd(&mut f.t, 0x1a, 2), u64::from(NO_VECTOR));
}

#[test]
fn activation_of_rings_outside_memory_needs_a_reset() {
    let mut f = setup();
    drive_to_features_ok(&mut f.t);
    wr(&mut f.t, 0x16, 2, 0);
    wr(&mut f.t, 0x20, 8, 0xffff_ffff_ffff_0000);
    wr(&mut f.t, 0x1c, 2, 1);
    wr(
        &mut f.t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    assert_ne!(rd(&mut f.t, 0x14, 1) as u32 & DEVICE_NEEDS_RESET, 0);
    assert_eq!(f.dev.lock().unwrap().activations, 0);
    // Features without VERSION_1 are refused.
    wr(&mut f.t, 0x14, 1, 0);
    wr(&mut f.t, 0x14, 1, u64::from(ACKNOWLEDGE));
    wr(&mut f.t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
    wr(&mut f.t, 0x0c, 4, 1);
    wr(
        &mut f.t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
    );
    assert_eq!(rd(&mut f.t, 0x14, 1), u64::from(ACKNOWLEDGE | DRIVER));
}

#[test]
fn queue_interrupts_go_to_the_queues_vector_through_msix() {
    let mut f = setup();
    drive_to_features_ok(&mut f.t);
    let rings = Rings::new(&f.mem, 0x1000, QSIZE);
    setup_queue(&mut f.t, 0, &rings, 2);
    wr(
        &mut f.t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    // MSI-X on (config space message control), vector 2 programmed.
    let control = f.t.msix_cap as u64 + 2;
    f.t.config_write(control, &0x8000u16.to_le_bytes());
    let entry = layout::MSIX_TABLE + 2 * 16;
    wr(&mut f.t, entry, 8, 0xfee0_0000);
    wr(&mut f.t, entry + 8, 4, 0x31);
    let irq = f.dev.lock().unwrap().irq.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert!(
        f.t.interrupt().msix().irqs()[2].read().is_err(),
        "still masked"
    );
    assert_eq!(rd(&mut f.t, layout::MSIX_PBA, 8), 0b100);
    wr(&mut f.t, entry + 12, 4, 0);
    assert_eq!(f.t.interrupt().msix().irqs()[2].read().unwrap(), 1);
    assert_eq!(
        *f.routes.0.lock().unwrap(),
        vec![(
            26,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            })
        )]
    );
    // Config interrupts with no vector only set the ISR bit.
    irq.trigger(InterruptKind::Config).unwrap();
    assert_eq!(rd(&mut f.t, layout::ISR, 1), 3);
    assert_eq!(rd(&mut f.t, layout::ISR, 1), 0, "read clears");
    // Queue 1 has no vector either; an unknown queue neither.
    irq.trigger(InterruptKind::Queue(1)).unwrap();
    irq.trigger(InterruptKind::Queue(500)).unwrap();
}

#[test]
fn hostile_accesses_anywhere_do_not_panic() {
    let mut f = setup();
    let rings = Rings::new(&f.mem, 0x1000, QSIZE);
    for len in [1usize, 2, 3, 4, 8] {
        let mut buf = vec![0xffu8; len];
        for off in (0..0x110u64).chain([0xfff, 0x1000, 0x1001, 0x2000, 0x2007, 0x3ffe, 0x4ffc]) {
            f.t.config_read(off, &mut buf);
            f.t.config_write(off, &buf);
        }
        for off in (0..layout::BAR_SIZE + 8)
            .step_by(3)
            .chain([u64::MAX - 1, u64::MAX])
        {
            f.t.read(off, &mut buf);
            f.t.write(off, &buf);
        }
    }
    // Whatever that did, a driver can still reset and bring it up.
    wr(&mut f.t, 0x14, 1, 0);
    drive_to_features_ok(&mut f.t);
    setup_queue(&mut f.t, 0, &rings, 0);
    wr(&mut f.t, 0x16, 2, 1);
    wr(&mut f.t, 0x18, 2, 3); // not a power of two: refused
    assert_eq!(rd(&mut f.t, 0x18, 2), u64::from(QSIZE));
    wr(&mut f.t, 0x16, 2, 77); // no such queue: reads zero
    assert_eq!(rd(&mut f.t, 0x18, 2), 0);
    wr(&mut f.t, 0x18, 2, 8);
    wr(
        &mut f.t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    assert_eq!(f.dev.lock().unwrap().activations, 1);
    // Device config reads through the BAR.
    assert_eq!(rd(&mut f.t, layout::DEVICE + 2, 2), 0x0403);
}

#[path = "persist_tests.rs"]
mod persist;

#[path = "pci_cfg_tests.rs"]
mod pci_cfg;

#[path = "vhost_tests.rs"]
mod vhost_backends;
