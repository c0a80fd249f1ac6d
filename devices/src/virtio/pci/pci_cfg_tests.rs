//! The `VIRTIO_PCI_CAP_PCI_CFG` window: BAR accesses from configuration
//! space, hostile windows, and its fields in snapshots.

use super::*;
use crate::virtio::pci::persist::PciSnapshot;

/// Offset of the configuration access capability, found by walking the
/// chain as a driver does.
fn cap(t: &mut VirtioPci) -> u64 {
    caps(t)
        .into_iter()
        .find(|c| c.1 == CAP_VENDOR && c.2[1] == CFG_PCI)
        .expect("no VIRTIO_PCI_CAP_PCI_CFG")
        .0
}

/// Points the window at `bar`, `offset`, `length`, as a driver does
/// (byte write of the BAR, dword writes of offset and length).
fn aim(t: &mut VirtioPci, bar: u8, offset: u32, length: u32) -> u64 {
    let c = cap(t);
    t.config_write(c + 4, &[bar]);
    t.config_write(c + 8, &offset.to_le_bytes());
    t.config_write(c + 12, &length.to_le_bytes());
    c + 16
}

/// A configuration read of `pci_cfg_data`.
fn window_read(t: &mut VirtioPci, data: u64) -> u32 {
    cfg32(t, data)
}

#[test]
fn the_window_reads_the_common_configuration() {
    let mut f = setup();
    let data = aim(&mut f.t, 0, 0x00, 4);
    // device_feature_select = 1 through the window, device_feature read
    // back through it: the high word, VERSION_1 (bit 32).
    f.t.config_write(data, &1u32.to_le_bytes());
    assert_eq!(rd(&mut f.t, 0x00, 4), 1, "the select was written");
    aim(&mut f.t, 0, 0x04, 4);
    assert_eq!(window_read(&mut f.t, data), 1, "VERSION_1 in the high word");
    // Narrower: num_queues (2 bytes), the rest of the data reads zero.
    aim(&mut f.t, 0, 0x12, 2);
    assert_eq!(window_read(&mut f.t, data), 2, "num_queues");
    // Device configuration, and a byte read of the data field.
    aim(&mut f.t, 0, (layout::DEVICE + 2) as u32, 2);
    assert_eq!(window_read(&mut f.t, data), 0x0403);
    let mut b = [0u8];
    f.t.config_read(data + 1, &mut b);
    assert_eq!(b[0], 0x04);
    // The fields read back what the driver wrote.
    let c = cap(&mut f.t);
    assert_eq!(cfg32(&mut f.t, c + 8), 0x2002);
    assert_eq!(cfg32(&mut f.t, c + 12), 2);
}

#[test]
fn a_notification_through_the_window_kicks_the_queue() {
    let mut f = setup();
    let data = aim(&mut f.t, 0, (layout::NOTIFY + 4) as u32, 2);
    f.t.config_write(data, &1u32.to_le_bytes());
    assert_eq!(f.t.queue_evts()[1].read().unwrap(), 1, "queue 1 notified");
    assert!(f.t.queue_evts()[0].read().is_err(), "queue 0 not notified");
    // A byte write to the data field is a write through the window too.
    f.t.config_write(data + 3, &[0]);
    assert_eq!(f.t.queue_evts()[1].read().unwrap(), 1);
}

#[test]
fn the_window_reaches_the_msix_table() {
    let mut f = setup();
    let data = aim(&mut f.t, 0, (layout::MSIX_TABLE + 16 + 8) as u32, 4);
    f.t.config_write(data, &0x41u32.to_le_bytes());
    assert_eq!(rd(&mut f.t, layout::MSIX_TABLE + 16 + 8, 4), 0x41);
    aim(&mut f.t, 0, (layout::MSIX_TABLE + 16 + 12) as u32, 4);
    assert_eq!(window_read(&mut f.t, data), 1, "vector 1 masked at reset");
}

#[test]
fn hostile_windows_read_zero_and_drop_writes() {
    let mut f = setup();
    wr(&mut f.t, 0x00, 4, 1);
    let notify = (layout::NOTIFY + 4) as u32;
    let bar_end = layout::BAR_SIZE as u32;
    let windows = [
        (7, 0x00, 4),         // no BAR 7
        (1, 0x00, 4),         // BAR 1 is not implemented
        (0xff, notify, 2),    // nor BAR 255
        (0, 0x00, 3),         // length 3
        (0, 0x00, 0),         // length 0
        (0, 0x00, 8),         // length 8
        (0, 0x00, u32::MAX),  // length 4 Gi
        (0, bar_end - 2, 4),  // across the BAR's end
        (0, bar_end, 1),      // past it
        (0, u32::MAX, 4),     // u32::MAX offset
        (0, u32::MAX - 3, 4), // the last dword of the 32-bit space
    ];
    for (bar, offset, length) in windows {
        let data = aim(&mut f.t, bar, offset, length);
        assert_eq!(window_read(&mut f.t, data), 0, "{bar} {offset:#x} {length}");
        f.t.config_write(data, &u32::MAX.to_le_bytes());
        for i in 0..4 {
            f.t.config_write(data + i, &[1]);
            let mut b = [0u8; 2];
            f.t.config_read(data + i, &mut b);
        }
    }
    assert_eq!(rd(&mut f.t, 0x00, 4), 1, "device_feature_select unchanged");
    assert!(
        f.t.queue_evts().iter().all(|e| e.read().is_err()),
        "no queue notified"
    );
    // Aimed with other widths and at odd offsets, the fields still only
    // take what a driver could write, and the window still works.
    let c = cap(&mut f.t);
    for off in c..c + 20 {
        f.t.config_write(off, &[0xff; 3]);
    }
    assert_eq!(
        cfg32(&mut f.t, c) & 0xffff,
        0x0009,
        "id 9, last in the chain"
    );
    assert_eq!(cfg32(&mut f.t, c + 2) & 0xffff, 0x0514, "length 20, type 5");
    let data = aim(&mut f.t, 0, 0x12, 2);
    assert_eq!(window_read(&mut f.t, data), 2);
}

#[test]
fn the_window_is_saved_and_restored_with_configuration_space() {
    let mut f = setup();
    let data = aim(&mut f.t, 0, 0x12, 2);
    let snap = f.t.save();
    let json = serde_json::to_string(&snap).unwrap();
    let snap: PciSnapshot = serde_json::from_str(&json).unwrap();
    let mut g = setup();
    g.t.restore(&snap).unwrap();
    let c = cap(&mut g.t);
    assert_eq!(cfg32(&mut g.t, c + 8), 0x12, "offset");
    assert_eq!(cfg32(&mut g.t, c + 12), 2, "length");
    assert_eq!(window_read(&mut g.t, data), 2, "num_queues through it");
    // A damaged capability header is refused like any read-only byte.
    let mut bad = snap.clone();
    bad.config_space[c as usize + 3] = 4;
    let e = setup().t.restore(&bad).unwrap_err();
    assert!(e.to_string().contains("differs"), "{e}");
}

/// A snapshot of the driven function of `persist_tests.rs` written by
/// capsule before the function had its `VIRTIO_PCI_CAP_PCI_CFG`
/// capability (same format version, 3): the chain ends at MSI-X.
const BEFORE_PCI_CFG: &str = include_str!("testdata/before_pci_cfg_cap.json");

#[test]
fn a_snapshot_from_before_the_capability_restores_with_it_at_reset() {
    let old: PciSnapshot = serde_json::from_str(BEFORE_PCI_CFG).unwrap();
    let mut f = setup();
    let msix = f.t.msix_cap;
    assert_eq!(old.config_space[msix + 1], 0, "old chain ends at MSI-X");
    // The rings the snapshot's queues point at.
    let _rings = [
        Rings::new(&f.mem, 0x1000, QSIZE),
        Rings::new(&f.mem, 0x3000, QSIZE),
    ];
    f.t.restore(&old).unwrap();
    assert_eq!(f.dev.lock().unwrap().activations, 1, "device active again");
    assert_eq!(cfg32(&mut f.t, 4) & 0xffff, 0x6, "command register");
    let c = cap(&mut f.t);
    assert_eq!(cfg32(&mut f.t, c + 8), 0, "window at reset");
    let data = aim(&mut f.t, 0, 0x16, 2);
    assert_eq!(window_read(&mut f.t, data), 1, "queue_select as saved");
    // Saved again, it is a new snapshot with the capability.
    let again = f.t.save();
    assert_eq!(again.config_space[msix + 1] as u64, c);
    assert_eq!(again.msix, old.msix);
    // Zeros in the old place but something else in the chain: refused.
    let mut odd = old.clone();
    odd.config_space[msix + 1] = 0x40;
    assert!(setup().t.restore(&odd).is_err());
}
