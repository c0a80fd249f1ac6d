//! The harness must really drive the devices: a seed request has to
//! complete, or the fuzzer would only ever exercise the set-up.

use super::*;
use devices::virtio::status::DEVICE_NEEDS_RESET;

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = format!("{}/corpus/{target}/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn used_idx(rig: &Rig, q: u32) -> u16 {
    rig.mem
        .read_obj(GuestAddress(queue_layout(q).2 + 2))
        .unwrap()
}

#[test]
fn block_read_seed_completes() {
    let rig = run_device(Kind::Block, &seed("virtio_blk", "read"), |r, _| r.notify(0));
    assert_eq!(used_idx(&rig, 0), 1);
    let status: u8 = rig.mem.read_obj(GuestAddress(0x980)).unwrap();
    assert_eq!(status, 0, "VIRTIO_BLK_S_OK");
    let data: u8 = rig.mem.read_obj(GuestAddress(0x1000)).unwrap();
    assert_eq!(data, 0xa5, "the disk's bytes");
}

#[test]
fn net_seeds_complete() {
    let rig = run_device(Kind::Net, &seed("virtio_net_tx", "one-frame"), |r, _| {
        r.notify(1)
    });
    assert_eq!(used_idx(&rig, 1), 1);
    let rig = run_device(Kind::Net, &seed("virtio_net_rx", "one-buffer"), |r, _| {
        r.notify(0)
    });
    assert_eq!(used_idx(&rig, 0), 1);
}

#[test]
fn balloon_seed_releases_pages() {
    let rig = run_device(Kind::Balloon, &seed("virtio_balloon", "inflate"), |r, _| {
        r.notify(0)
    });
    assert_eq!(used_idx(&rig, 0), 1);
    let page: u8 = rig.mem.read_obj(GuestAddress(0x8000)).unwrap();
    assert_eq!(page, 0, "the inflated page was released (reads zero)");
    let rig = run_device(Kind::Balloon, &seed("virtio_balloon", "report"), |r, _| {
        r.notify(3)
    });
    assert_eq!(used_idx(&rig, 3), 1);
}

#[test]
fn rng_seeds_fill_buffers() {
    let rig = run_device(Kind::Rng, &seed("virtio_rng", "two-buffers"), |r, _| {
        r.notify(0)
    });
    assert!(used_idx(&rig, 0) >= 2, "both chains returned");
    let mut got = [0u8; 64];
    rig.mem.read_slice(&mut got, GuestAddress(0x800)).unwrap();
    assert_ne!(got, [0u8; 64], "the buffer was filled");
    // A chain the device may only read gets nothing written.
    let rig = run_device(
        Kind::Rng,
        &seed("virtio_rng", "read-only-buffer"),
        |r, _| r.notify(0),
    );
    let mut got = [0u8; 64];
    rig.mem.read_slice(&mut got, GuestAddress(0x800)).unwrap();
    assert_eq!(
        got, [0u8; 64],
        "nothing written into a device-readable buffer"
    );
}

#[test]
fn fs_backend_serves_the_rings_and_its_signals_interrupt() {
    let opts = [0u8; 9];
    let mut rig = Rig::new(Kind::Fs, &mut Input::new(&opts), &[]);
    let fs = rig.fs.clone().unwrap();
    rig.set_up_driver(0);
    assert_eq!(fs.started(), 2, "both queues handed to the backend");
    assert_eq!(rig.read(0x60) & 1, 0, "no interrupt yet");
    fs.fire(1);
    rig.run_events();
    assert_eq!(rig.read(0x60) & 1, 1, "the used signal became an interrupt");
}

#[test]
fn fs_rings_outside_memory_never_reach_the_backend() {
    let opts = [0u8; 9];
    let mut rig = Rig::new(Kind::Fs, &mut Input::new(&opts), &[]);
    let fs = rig.fs.clone().unwrap();
    // A driver's bring-up with queue 1's used ring in the last 8
    // bytes of memory: too short for 16 entries.
    rig.negotiate(0);
    for q in 0..2 {
        let (desc, avail, used) = queue_layout(q);
        let used = if q == 1 { MEM_SIZE as u64 - 8 } else { used };
        rig.write(reg::QUEUE_SEL, q);
        rig.write(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
        rig.write(reg::QUEUE_DESC_LOW, desc as u32);
        rig.write(reg::QUEUE_AVAIL_LOW, avail as u32);
        rig.write(reg::QUEUE_USED_LOW, used as u32);
        rig.write(reg::QUEUE_READY, 1);
    }
    rig.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    rig.run_events();
    assert_eq!(fs.started(), 0, "no queue was handed to the backend");
    assert_eq!(
        rig.read(reg::STATUS) & DEVICE_NEEDS_RESET,
        DEVICE_NEEDS_RESET,
        "the driver is told the activation failed"
    );
}

#[test]
fn console_seed_completes() {
    let rig = run_device(
        Kind::Console,
        &seed("virtio_console", "tx-and-rx"),
        |r, round| r.notify(u32::from(round % 2)),
    );
    // Two rounds: the receive kick, then the transmit kick, which
    // finds the chain offered twice (the harness re-offers buffers
    // between rounds).
    assert_eq!(used_idx(&rig, 1), 2, "transmitted");
    assert!(used_idx(&rig, 0) >= 1, "received");
    let mut got = [0u8; 11];
    rig.mem.read_slice(&mut got, GuestAddress(0xc00)).unwrap();
    assert_eq!(&got, b"host input\n");
}

/// The queue's MSI-X vector (queue `q` has vector `q + 1` after the
/// harness's bring-up) was raised.
fn pci_vector_fired(rig: &mut Rig, vector: usize) -> bool {
    rig.pci().unwrap().take_interrupts().contains(&vector)
}

#[test]
fn block_read_completes_over_pci_with_its_vector() {
    let mut rig = run_device_over(
        TransportKind::Pci,
        Kind::Block,
        &seed("virtio_blk", "read"),
        |r, _| r.notify(0),
    );
    assert_eq!(used_idx(&rig, 0), 1);
    let status: u8 = rig.mem.read_obj(GuestAddress(0x980)).unwrap();
    assert_eq!(status, 0, "VIRTIO_BLK_S_OK");
    // run_device took the interrupt; a second request raises it again.
    let avail = queue_layout(0).1;
    rig.mem.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
    rig.notify(0);
    assert!(pci_vector_fired(&mut rig, 1), "queue 0's vector");
    assert_eq!(rig.pci().unwrap().read_isr() & 1, 1, "the ISR's queue bit");
}

#[test]
fn pci_seeds_bring_each_device_up_by_hand() {
    // The seeds hard-code where the capabilities are.
    let opts = [0u8; 8];
    let mut rig = Rig::new_over(TransportKind::Pci, Kind::Rng, &mut Input::new(&opts), &[]);
    let pci = rig.pci().unwrap();
    assert_eq!((pci.msix_cap(), pci.pci_cfg_cap()), (0x84, 0x90));
    for (name, queues) in [
        ("driver-block", 1),
        ("driver-net", 2),
        ("driver-console", 2),
        ("driver-balloon", 4),
        ("driver-rng", 1),
        ("driver-fs", 2),
    ] {
        let mut rig = pci::run(&seed("virtio_pci", name));
        assert_eq!(rig.queues, queues, "{name}");
        // The driver reset the device at the end: status 0 again, after
        // it had reached DRIVER_OK.
        let pci = rig.pci().unwrap();
        assert_eq!(pci.common_read(pci::common::DEVICE_STATUS, 1), 0, "{name}");
    }
    // Without the final reset, the block request completes.
    let mut data = seed("virtio_pci", "driver-block");
    let reset = [14u8, 1];
    let at = data.len() - reset.len();
    assert_eq!(&data[at..], &reset);
    data.truncate(at);
    let mut rig = pci::run(&data);
    assert_eq!(used_idx(&rig, 0), 1, "the request completed");
    let pci = rig.pci().unwrap();
    assert_eq!(
        pci.common_read(pci::common::DEVICE_STATUS, 1),
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    );
}

#[test]
fn pci_fs_backend_serves_the_rings_and_its_signals_reach_the_vector() {
    let opts = [0u8; 9];
    let mut rig = Rig::new_over(TransportKind::Pci, Kind::Fs, &mut Input::new(&opts), &[]);
    let fs = rig.fs.clone().unwrap();
    rig.set_up_driver(0);
    assert_eq!(fs.started(), 2, "both queues handed to the backend");
    fs.fire(1);
    rig.run_events();
    assert!(pci_vector_fired(&mut rig, 2), "queue 1's vector");
}

#[test]
fn pci_masked_vector_is_pending_then_delivered() {
    let data = seed("virtio_blk", "read");
    let mut rig = run_device_over(TransportKind::Pci, Kind::Block, &data, |r, _| r.notify(0));
    rig.pci()
        .unwrap()
        .program_vector(1, 0xfee0_0000, 0x31, true);
    // The chain offered again.
    let avail = queue_layout(0).1;
    rig.mem.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
    rig.notify(0);
    assert_eq!(used_idx(&rig, 0), 2);
    let mut pba = [0u8; 8];
    let pci = rig.pci().unwrap();
    pci.bar_read(devices::virtio::pci::layout::MSIX_PBA, &mut pba);
    assert_eq!(pba[0] & 2, 2, "vector 1 pending while masked");
    assert!(!pci.take_interrupts().contains(&1));
    pci.program_vector(1, 0xfee0_0000, 0x31, false);
    assert!(
        pci.take_interrupts().contains(&1),
        "delivered once unmasked"
    );
}

#[test]
fn both_configuration_mechanisms_agree_everywhere() {
    let opts = [0u8; 8];
    let mut rig = Rig::new_over(TransportKind::Pci, Kind::Net, &mut Input::new(&opts), &[]);
    let pci = rig.pci().unwrap();
    for slot in 0..4 {
        for reg in 0..=255u8 {
            for len in [1, 2, 4] {
                pci.compare_mechanisms(slot, reg, len);
            }
        }
    }
    pci.check();
}

#[test]
fn every_pci_seed_runs() {
    let dir = format!("{}/corpus/virtio_pci", env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(dir).unwrap() {
        pci::run(&std::fs::read(entry.unwrap().path()).unwrap());
    }
}
