//! virtio-blk driven the whole way, as a guest's requests reach it: a
//! driver's register writes through the MMIO transport, kicks through the
//! event loop, and requests held back by a rate limiter until it refills.

use super::*;

/// The whole path: MMIO registers, activation through the event loop, a
/// notify, the used ring, the interrupt; then reset and a second activation.
#[test]
pub(super) fn through_mmio_and_event_loop() {
    let mem = guest_memory();
    let img = image();
    let block = Arc::new(Mutex::new(Block::new(config(&img, false, false)).unwrap()));
    let mut t = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(block.clone());

    let wr = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let rd = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };

    for round in 0..2u64 {
        let vq = Rings::new(&mem, RING + round * 0x4000, QSIZE);
        wr(&mut t, 0x70, ACKNOWLEDGE);
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1); // VERSION_1
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(rd(&mut t, 0x34), u32::from(QUEUE_SIZE));
        wr(&mut t, 0x38, u32::from(QSIZE));
        wr(&mut t, 0x80, vq.desc as u32);
        wr(&mut t, 0x90, vq.avail as u32);
        wr(&mut t, 0xa0, vq.used as u32);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(rd(&mut t, 0x70) & DRIVER_OK, DRIVER_OK);

        // A request, notified before the event loop has even seen the
        // activation.
        let hdr = HDR + round * 0x100;
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&round.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap(); // IN
        let next = VRING_DESC_F_NEXT as u16;
        let descs = [
            (hdr, 16, next, 1),
            (DATA, 512, W | next, 2),
            (STATUS, 1, W, 0),
        ];
        for (i, (a, l, f, n)) in descs.into_iter().enumerate() {
            vq.store(i as u16, a, l, f, n);
        }
        vq.push_avail(0);
        wr(&mut t, 0x50, 0);

        for _ in 0..100 {
            if vq.used_idx() == 1 {
                break;
            }
            em.run_with_timeout(50).unwrap();
        }
        assert_eq!(vq.used_idx(), 1, "round {round}");
        assert_eq!(vq.used_elem(0), (0, 513));
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, OK);
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let r = round as usize * 512;
        assert_eq!(got, pattern(IMAGE_LEN)[r..r + 512]);
        assert_eq!(rd(&mut t, 0x60), INT_VRING);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        wr(&mut t, 0x64, INT_VRING);

        // Reset; a notification racing with it must not reach the device.
        wr(&mut t, 0x70, 0);
        assert!(!block.lock().unwrap().is_activated());
        wr(&mut t, 0x50, 0);
        for _ in 0..3 {
            em.run_with_timeout(10).unwrap();
        }
        assert_eq!(vq.used_idx(), 1);
    }
}

#[test]
pub(super) fn rate_limited_requests_wait_for_the_refill() {
    use crate::rate_limiter::{BucketConfig, RateLimiter};
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    // Two operations per 100 ms.
    let ops = BucketConfig {
        size: 2,
        one_time_burst: 0,
        refill_time_ms: 100,
    };
    d.block
        .set_rate_limiter(Some(RateLimiter::new(None, Some(ops)).unwrap()));
    for i in 0..3u64 {
        d.request(VIRTIO_BLK_T_IN, i, &[(DATA + i * 0x1000, 512, W)]);
    }
    assert_eq!(d.run().len(), 2, "the bucket held two operations");
    assert_eq!(d.run().len(), 0, "a kick while limited does nothing");
    let l = d.block.limiter.as_ref().unwrap();
    assert!(
        crate::test_fd::readable_within(l.timer_fd(), 2000),
        "the refill never woke the disk"
    );
    d.block.limiter.as_mut().unwrap().timer_fired();
    assert_eq!(d.run().len(), 1);
    let want = pattern(IMAGE_LEN);
    assert_eq!(d.bytes(DATA + 0x2000, 512), want[2 * 512..3 * 512]);
}

/// A snapshot taken before the event loop read a kick restores a ring with
/// requests and no kick coming: the activation itself serves them.
#[test]
fn requests_in_the_ring_at_activation_are_served() {
    let mem = guest_memory();
    let img = image();
    let block = Arc::new(Mutex::new(Block::new(config(&img, false, false)).unwrap()));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(block.clone());
    let vq = Rings::new(&mem, RING, QSIZE);
    let next = VRING_DESC_F_NEXT as u16;
    mem.write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap(); // IN, sector 0
    vq.store(0, HDR, 16, next, 1);
    vq.store(1, DATA, 512, W | next, 2);
    vq.store(2, STATUS, 1, W, 0);
    vq.push_avail(0);
    activate_on_rings(&mut *block.lock().unwrap(), &mem, 0, &[&vq]);
    for _ in 0..40 {
        if vq.used_idx() == 1 {
            break;
        }
        em.run_with_timeout(50).unwrap();
    }
    assert_eq!(vq.used_idx(), 1, "served without a kick");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
}
