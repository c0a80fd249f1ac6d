//! virtio-blk tests of what a broken or hostile driver can send: sectors
//! out of range, buffers outside guest memory or in the wrong direction,
//! bad headers and status descriptors, unknown request types, descriptor
//! loops, bad available-ring entries and indirect chains. Each gets an
//! error status (or the device marks itself `NEEDS_RESET`), never a panic.

use super::*;

#[test]
pub(super) fn out_of_range_and_overflowing_sectors() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    let cap = (IMAGE_LEN / 512) as u64;
    let data = [(DATA, 1024, W)];
    assert_eq!(d.one(VIRTIO_BLK_T_IN, cap - 2, &data).1, OK);
    assert_eq!(d.one(VIRTIO_BLK_T_IN, cap - 1, &data), (1, IOERR));
    assert_eq!(d.one(VIRTIO_BLK_T_IN, cap, &data), (1, IOERR));
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 + 1, 1 << 55] {
        assert_eq!(
            d.one(VIRTIO_BLK_T_IN, sector, &data),
            (1, IOERR),
            "{sector:#x}"
        );
        assert_eq!(d.one(VIRTIO_BLK_T_OUT, sector, &[(DATA, 512, 0)]).1, IOERR);
    }
    // Not a whole number of sectors.
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, W)]).1, IOERR);
    // More data than a request may carry (descriptor lengths alone).
    let huge = [(DATA, 0x1000_0000, W), (DATA, 0x1000_0000, W)];
    const { assert!(2 * 0x1000_0000 > MAX_DATA_LEN) };
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &huge).1, IOERR);
    assert!(std::fs::read(img.as_path()).unwrap() == pattern(IMAGE_LEN));
}

#[test]
pub(super) fn buffers_outside_guest_memory() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    for addr in [MEM_SIZE, MEM_SIZE - 256, 1 << 40, u64::MAX - 100] {
        assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(addr, 512, W)]), (1, IOERR));
        // A write whose second buffer is bad writes nothing at all.
        mem.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
        let data = [(DATA, 512, 0), (addr, 512, 0)];
        assert_eq!(d.one(VIRTIO_BLK_T_OUT, 0, &data), (1, IOERR));
    }
    assert!(std::fs::read(img.as_path()).unwrap() == pattern(IMAGE_LEN));

    // Header outside memory.
    let status = d.status();
    d.add_chain(&[(MEM_SIZE + 0x1000, 16, 0), (status, 1, W)]);
    assert_eq!(d.run()[0].1, 1);
    assert_eq!(d.byte(status), IOERR);

    // Status byte outside memory: returned with length 0.
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    d.add_chain(&[(hdr, 16, 0), (DATA, 512, W), (MEM_SIZE, 1, W)]);
    assert_eq!(d.run()[0].1, 0);
}

#[test]
pub(super) fn wrong_direction_data_descriptors() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, 0)]), (1, IOERR));
    assert_eq!(
        d.bytes(DATA, 512),
        vec![0x11; 512],
        "guest buffer untouched"
    );
    assert_eq!(d.one(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, W)]), (1, IOERR));
    assert_eq!(
        d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W), (DATA + 512, 512, 0)])
            .1,
        IOERR
    );
    assert!(std::fs::read(img.as_path()).unwrap() == pattern(IMAGE_LEN));
}

#[test]
pub(super) fn bad_headers() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    for (len, flags) in [(8u32, 0u16), (15, 0), (17, 0), (16, W)] {
        let hdr = d.header(VIRTIO_BLK_T_IN, 0);
        let status = d.status();
        d.add_chain(&[(hdr, len, flags), (DATA, 512, W), (status, 1, W)]);
        assert_eq!(d.run()[0].1, 1);
        assert_eq!(d.byte(status), IOERR, "header {len}/{flags}");
    }
}

#[test]
pub(super) fn missing_or_unusable_status_descriptor() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    // Header only.
    let hdr = d.header(VIRTIO_BLK_T_FLUSH, 0);
    d.add_chain(&[(hdr, 16, 0)]);
    assert_eq!(d.run(), vec![(0, 0)]);
    // Status descriptor device-readable.
    let status = d.status();
    d.add_chain(&[(hdr, 16, 0), (status, 1, 0)]);
    assert_eq!(d.run()[0].1, 0);
    assert_eq!(d.byte(status), UNTOUCHED);
    // Zero-length status descriptor.
    let status = d.status();
    d.add_chain(&[(hdr, 16, 0), (status, 0, W)]);
    assert_eq!(d.run()[0].1, 0);
    assert_eq!(d.byte(status), UNTOUCHED);
    // A read without a status descriptor: its data buffer is taken as the
    // status, and the request, now without data, fails.
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    d.add_chain(&[(hdr, 16, 0), (DATA, 512, W)]);
    assert_eq!(d.run()[0].1, 1);
    assert_eq!(d.byte(DATA), IOERR);
}

#[test]
pub(super) fn unsupported_request_types() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    for ty in [2u32, 3, 5, 99, u32::MAX] {
        assert_eq!(d.one(ty, 0, &[(DATA, 512, W)]), (1, UNSUPP), "type {ty}");
    }
}

#[test]
pub(super) fn descriptor_loops_and_bad_next_indices() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let status = d.status();
    let next = VRING_DESC_F_NEXT as u16;
    let store =
        |i: u16, addr: u64, len: u32, flags: u16, nx: u16| d.vq.store(i, addr, len, flags, nx);
    // 0 -> 1 -> 2 -> 1 -> 2 ...
    store(0, hdr, 16, next, 1);
    store(1, DATA, 512, W | next, 2);
    store(2, status, 1, W | next, 1);
    d.make_available(0);
    // 3 -> index 200, outside the table.
    store(3, hdr, 16, next, 200);
    d.make_available(3);
    // A self-loop on the head.
    store(4, hdr, 16, next, 4);
    d.make_available(4);
    assert_eq!(d.run(), vec![(0, 0), (3, 0), (4, 0)]);
    assert_eq!(d.byte(status), UNTOUCHED);

    // The queue still works afterwards.
    d.next_desc = 5;
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).1, OK);
}

#[test]
pub(super) fn bad_available_ring_entries() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    // A head index outside the descriptor table cannot be returned.
    d.make_available(QSIZE + 3);
    assert_eq!(d.run(), vec![]);
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).1, OK);

    // An available index too far ahead stalls the queue without spinning.
    let idx = d.vq.avail_idx();
    d.vq.set_avail_idx(idx.wrapping_add(QSIZE + 1));
    assert_eq!(d.run(), vec![]);
}

/// Stores an indirect table at INDIRECT and makes a one-descriptor chain
/// pointing to it available.
fn add_indirect(d: &mut Driver<'_>, descs: &[(u64, u32, u16)]) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let (flags, next) = if i + 1 < descs.len() {
            (flags | VRING_DESC_F_NEXT as u16, i as u16 + 1)
        } else {
            (flags, 0)
        };
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        d.mem
            .write_obj(desc, GuestAddress(INDIRECT + 16 * i as u64))
            .unwrap();
    }
    d.add_chain(&[(
        INDIRECT,
        16 * descs.len() as u32,
        VRING_DESC_F_INDIRECT as u16,
    )]);
}

#[test]
pub(super) fn indirect_chains() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    let hdr = d.header(VIRTIO_BLK_T_IN, 1);
    let status = d.status();
    add_indirect(&mut d, &[(hdr, 16, 0), (DATA, 512, W), (status, 1, W)]);
    assert_eq!(d.run()[0].1, 513);
    assert_eq!(d.byte(status), OK);
    assert_eq!(d.bytes(DATA, 512), pattern(IMAGE_LEN)[512..1024]);

    // Longer than any request may be: IOERR, and no data transferred.
    mem.write_slice(&[0x99; 512], GuestAddress(DATA)).unwrap();
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let status = d.status();
    let mut descs = vec![(hdr, 16, 0)];
    descs.extend((0..MAX_DESCRIPTORS).map(|_| (DATA, 512, W)));
    descs.push((status, 1, W));
    add_indirect(&mut d, &descs);
    assert_eq!(d.run()[0].1, 1);
    assert_eq!(d.byte(status), IOERR);
    assert_eq!(d.bytes(DATA, 512), vec![0x99; 512]);

    // A loop inside an indirect table.
    let desc = RawDescriptor::from(SplitDescriptor::new(hdr, 16, VRING_DESC_F_NEXT as u16, 0));
    mem.write_obj(desc, GuestAddress(INDIRECT)).unwrap();
    d.add_chain(&[(INDIRECT, 16, VRING_DESC_F_INDIRECT as u16)]);
    assert_eq!(d.run()[0].1, 0);
    // An indirect table outside guest memory.
    d.add_chain(&[(MEM_SIZE, 64, VRING_DESC_F_INDIRECT as u16)]);
    assert_eq!(d.run()[0].1, 0);
}
