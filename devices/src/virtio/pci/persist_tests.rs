//! virtio-pci snapshot tests: a driven function saved and restored into
//! a fresh one, and damaged snapshots refused without a change.

use super::*;
use crate::virtio::mmio::persist::QueueRestoreError;
use crate::virtio::pci::persist::{PciRestoreError, PciSnapshot};

const MSG: MsiMessage = MsiMessage {
    address: 0xfee0_1000,
    data: 0x41,
};

/// A function the driver took to DRIVER_OK: queue 0 on vector 2 (live),
/// queue 1 with no vector, configuration changes on vector 0 (masked, with
/// an interrupt pending), MSI-X on, selects left at odd values.
fn driven(f: &mut Fixture) -> [Rings<'_>; 2] {
    drive_to_features_ok(&mut f.t);
    let rings = [
        Rings::new(&f.mem, 0x1000, QSIZE),
        Rings::new(&f.mem, 0x3000, QSIZE),
    ];
    setup_queue(&mut f.t, 0, &rings[0], 2);
    setup_queue(&mut f.t, 1, &rings[1], NO_VECTOR);
    wr(&mut f.t, 0x10, 2, 0);
    wr(
        &mut f.t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    let control = f.t.msix_cap as u64 + 2;
    f.t.config_write(control, &0x8000u16.to_le_bytes());
    // Bus master and memory decode on, as a driver does.
    f.t.config_write(4, &0x6u16.to_le_bytes());
    let entry = layout::MSIX_TABLE + 2 * 16;
    wr(&mut f.t, entry, 8, MSG.address);
    wr(&mut f.t, entry + 8, 4, u64::from(MSG.data));
    wr(&mut f.t, entry + 12, 4, 0);
    wr(&mut f.t, 0x16, 2, 1);
    wr(&mut f.t, 0x00, 4, 1);
    let irq = f.dev.lock().unwrap().irq.clone().unwrap();
    irq.trigger(InterruptKind::Config).unwrap();
    rings
}

#[test]
fn a_saved_function_is_the_same_function_once_restored() {
    let mut f = setup();
    let _rings = driven(&mut f);
    let snap = f.t.save();
    assert_eq!(snap.common.queue_msix_vectors, vec![2, NO_VECTOR]);
    assert_eq!(snap.common.config_msix_vector, 0);
    assert!(snap.msix.pending[0], "config vector 0 is masked: pending");
    assert!(snap.common.active_queues.is_some());
    // Through JSON, as in a snapshot file.
    let json = serde_json::to_string(&snap).unwrap();
    let snap: PciSnapshot = serde_json::from_str(&json).unwrap();

    let mut g = setup();
    g.t.restore(&snap).unwrap();
    assert_eq!(g.t.save(), snap);
    assert_eq!(g.dev.lock().unwrap().activations, 1, "device active again");
    assert_eq!(
        rd(&mut g.t, 0x14, 1),
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    );
    assert_eq!(rd(&mut g.t, 0x16, 2), 1, "queue_select");
    assert_eq!(rd(&mut g.t, 0x00, 4), 1, "device_feature_select");
    assert_eq!(cfg32(&mut g.t, 4) & 0xffff, 0x6, "command register");
    assert_eq!(cfg32(&mut g.t, 0x10), BAR as u32, "BAR 0");
    // The live vector's KVM route is set again, and delivers.
    assert_eq!(*g.routes.0.lock().unwrap(), vec![(26, Some(MSG))]);
    let irq = g.dev.lock().unwrap().irq.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(g.t.interrupt().msix().irqs()[2].read().unwrap(), 1);
    // The pending configuration interrupt fires once vector 0 is unmasked.
    assert_eq!(rd(&mut g.t, layout::MSIX_PBA, 8), 0b1);
    let entry0 = layout::MSIX_TABLE;
    wr(&mut g.t, entry0, 8, MSG.address);
    wr(&mut g.t, entry0 + 12, 4, 0);
    assert_eq!(g.t.interrupt().msix().irqs()[0].read().unwrap(), 1);
}

#[test]
fn an_inactive_function_restores_without_activating() {
    let f = setup();
    let snap = f.t.save();
    assert!(snap.common.active_queues.is_none());
    let mut g = setup();
    g.t.restore(&snap).unwrap();
    assert_eq!(g.dev.lock().unwrap().activations, 0);
    assert!(g.routes.0.lock().unwrap().is_empty(), "MSI-X off: no route");
}

/// `damage` applied to a driven function's snapshot must be refused by a
/// fresh function, which keeps its state; returns the error.
fn refused(damage: impl FnOnce(&mut PciSnapshot)) -> PciRestoreError {
    let mut f = setup();
    let _rings = driven(&mut f);
    let mut snap = f.t.save();
    damage(&mut snap);
    let mut g = setup();
    let before = g.t.save();
    let e = g.t.restore(&snap).unwrap_err();
    assert_eq!(g.t.save(), before, "{e}: nothing changed");
    assert_eq!(g.dev.lock().unwrap().activations, 0);
    assert!(g.routes.0.lock().unwrap().is_empty());
    e
}

#[test]
fn out_of_range_vectors_are_refused() {
    let e = refused(|s| s.common.queue_msix_vectors[0] = 3);
    assert!(
        matches!(
            e,
            PciRestoreError::Vector {
                vector: 3,
                vectors: 3
            }
        ),
        "{e}"
    );
    assert_eq!(e.to_string(), "MSI-X vector 3 of a table of 3");
    let e = refused(|s| s.common.config_msix_vector = 0x8000);
    assert!(matches!(e, PciRestoreError::Vector { vector: 0x8000, .. }));
    let e = refused(|s| s.common.queue_msix_vectors.push(NO_VECTOR));
    assert!(matches!(e, PciRestoreError::QueueCount { .. }), "{e}");
}

#[test]
fn inconsistent_state_is_refused() {
    let e = refused(|s| s.device_type = 1);
    assert!(matches!(e, PciRestoreError::DeviceType { .. }), "{e}");
    // Another vendor id: read-only byte 0.
    let e = refused(|s| s.config_space[0] ^= 1);
    assert!(e.to_string().contains("byte 0x0 differs"), "{e}");
    let e = refused(|s| s.config_space.truncate(64));
    assert!(e.to_string().contains("64 bytes"), "{e}");
    // MSI-X enabled in the state, off in configuration space.
    let e = refused(|s| s.msix.function_masked = true);
    assert!(matches!(e, PciRestoreError::Control { .. }), "{e}");
    let e = refused(|s| {
        s.msix.entries.pop();
        s.msix.pending.pop();
    });
    assert!(matches!(e, PciRestoreError::Msix(_)), "{e}");
    let e = refused(|s| s.msix.pending.push(true));
    assert!(matches!(e, PciRestoreError::Msix(_)), "{e}");
    let e = refused(|s| s.common.status |= 0x20);
    assert!(matches!(e, PciRestoreError::Status(_)), "{e}");
    let e = refused(|s| s.common.acked_features |= 1 << 40);
    assert!(matches!(e, PciRestoreError::Features(_)), "{e}");
    let e = refused(|s| {
        s.common.queues.pop();
    });
    assert!(matches!(e, PciRestoreError::QueueCount { .. }), "{e}");
    let e = refused(|s| s.common.queues[0].desc_table = 0xffff_0000);
    assert!(
        matches!(
            e,
            PciRestoreError::Queue(QueueRestoreError::QueueOutsideMemory(0))
        ),
        "{e}"
    );
    let e = refused(|s| s.common.queues[0].size = 3);
    assert!(
        matches!(
            e,
            PciRestoreError::Queue(QueueRestoreError::Queue { index: 0, .. })
        ),
        "{e}"
    );
    let e = refused(|s| {
        if let Some(a) = s.common.active_queues.as_mut() {
            a[0].used_ring = 1 << 40;
        }
    });
    assert!(
        matches!(
            e,
            PciRestoreError::Queue(QueueRestoreError::QueueOutsideMemory(0))
        ),
        "{e}"
    );
}
