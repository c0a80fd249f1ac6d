//! The io_uring engine: the synchronous engine's request, hostile-chain
//! and event-loop tests again with `engine=io_uring`, then what only this
//! engine has (requests in flight together, draining on reset and
//! snapshot, reads that meet the end of a shrunk image, refusals).

use super::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Runs `test` with [`config`] asking for the io_uring engine.
fn with_uring(test: fn()) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ENGINE.set(IoEngine::Sync);
        }
    }
    let _reset = Reset;
    ENGINE.set(IoEngine::IoUring);
    test();
}

macro_rules! again_with_uring {
    ($($name:ident => $test:path),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                with_uring($test);
            }
        )*
    };
}

again_with_uring! {
    read_across_descriptors => super::read_across_descriptors,
    large_read => super::large_read_across_max_size_descriptors,
    write_then_read_back_and_flush => super::write_then_read_back_and_flush,
    get_id => super::get_id,
    read_only_disk_rejects_writes => super::read_only_disk_rejects_writes,
    discard_and_write_zeroes => super::discard_and_write_zeroes,
    event_idx_suppresses_interrupts => super::event_idx_suppresses_interrupts,
    reset_stops_processing => super::reset_stops_processing,
    out_of_range_sectors => super::hostile::out_of_range_and_overflowing_sectors,
    buffers_outside_guest_memory => super::hostile::buffers_outside_guest_memory,
    wrong_direction => super::hostile::wrong_direction_data_descriptors,
    bad_headers => super::hostile::bad_headers,
    unusable_status => super::hostile::missing_or_unusable_status_descriptor,
    unsupported_request_types => super::hostile::unsupported_request_types,
    descriptor_loops => super::hostile::descriptor_loops_and_bad_next_indices,
    bad_available_ring_entries => super::hostile::bad_available_ring_entries,
    indirect_chains_and_too_many_descriptors => super::hostile::indirect_chains,
    through_mmio_and_event_loop => super::event_loop::through_mmio_and_event_loop,
    rate_limited => super::event_loop::rate_limited_requests_wait_for_the_refill,
}

fn uring_driver<'a>(mem: &'a GuestMemoryMmap, img: &TempFile) -> Driver<'a> {
    let mut cfg = config(img, false, false);
    cfg.engine = IoEngine::IoUring;
    let d = Driver::new(mem, cfg);
    assert_eq!(d.block.engine(), IoEngine::IoUring);
    d
}

/// [`uring_driver`] whose requests stay in flight until the test runs
/// the completions (none is answered inside its submission).
fn lazy_uring_driver<'a>(mem: &'a GuestMemoryMmap, img: &TempFile) -> Driver<'a> {
    let mut d = uring_driver(mem, img);
    lazy(&mut d);
    d
}

fn lazy(d: &mut Driver<'_>) {
    if let Some(u) = d.block.uring.as_deref_mut() {
        u.reap_after_submit = false;
    }
}

fn in_flight(d: &Driver<'_>) -> usize {
    d.block.uring.as_ref().map_or(0, |u| u.in_flight())
}

/// Queues four writes and a read without running completions: all are in
/// flight at once, none in the used ring; then all complete.
#[test]
fn requests_are_in_flight_together() {
    let mem = guest_memory();
    let img = image();
    let mut d = lazy_uring_driver(&mem, &img);
    for i in 0..4u64 {
        mem.write_slice(&[0x30 + i as u8; 1024], GuestAddress(DATA + i * 0x1000))
            .unwrap();
        d.request(VIRTIO_BLK_T_OUT, 8 + 2 * i, &[(DATA + i * 0x1000, 1024, 0)]);
    }
    d.request(VIRTIO_BLK_T_IN, 100, &[(DATA + 0x8000, 2048, W)]);
    d.block.process_queue();
    assert_eq!(in_flight(&d), 5);
    assert_eq!(d.vq.used_idx(), 0, "nothing answered before it completes");
    assert!(d.irq.take().is_empty());
    let used = d.run();
    assert_eq!(used.len(), 5);
    assert_eq!(in_flight(&d), 0);
    let mut lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    lens.sort_unstable();
    assert_eq!(lens, vec![1, 1, 1, 1, 2049]);
    for st in 0..5 {
        assert_eq!(d.byte(STATUS + st * 0x10), OK);
    }
    let want = pattern(IMAGE_LEN);
    assert_eq!(d.bytes(DATA + 0x8000, 2048), want[100 * 512..104 * 512]);
    let disk = std::fs::read(img.as_path()).unwrap();
    for i in 0..4usize {
        let at = (8 + 2 * i) * 512;
        assert!(disk[at..at + 1024].iter().all(|&b| b == 0x30 + i as u8));
    }
    assert!(!d.irq.take().is_empty());
}

/// By default the requests that complete inside their submission (reads
/// the page cache serves, usually) are answered in the same round, under
/// one interrupt; the rest stay in flight and complete through the
/// eventfd as before. Nothing is answered twice or lost.
#[test]
fn completions_inside_the_submission_are_answered_at_once() {
    let mem = guest_memory();
    let img = image();
    let mut d = uring_driver(&mem, &img);
    for i in 0..4u64 {
        d.request(VIRTIO_BLK_T_IN, 8 * i, &[(DATA + i * 0x1000, 4096, W)]);
    }
    d.block.process_queue();
    let answered = usize::from(d.vq.used_idx());
    assert_eq!(answered + in_flight(&d), 4);
    assert_eq!(
        d.irq.take().is_empty(),
        answered == 0,
        "one interrupt iff something was answered"
    );
    // The used ring's entries, each request's once.
    let mut heads: Vec<u32> = d.run().iter().map(|u| u.0).collect();
    heads.sort_unstable();
    heads.dedup();
    assert_eq!(heads.len(), 4);
    assert_eq!(usize::from(d.vq.used_idx()), 4);
    let want = pattern(IMAGE_LEN);
    for i in 0..4usize {
        let at = i * 8 * 512;
        assert_eq!(d.bytes(DATA + i as u64 * 0x1000, 4096), want[at..at + 4096]);
        assert_eq!(d.byte(STATUS + i as u64 * 0x10), OK);
    }
}

/// With the ring full, the queue's other requests wait in the available
/// ring (no notification needed) and are taken as completions free room.
#[test]
fn a_full_ring_waits_for_completions() {
    let mem = guest_memory();
    let img = image();
    let mut d = uring_driver(&mem, &img);
    d.block.uring = Some(Box::new(super::super::uring::Uring::with_slots(2).unwrap()));
    lazy(&mut d);
    for i in 0..5u64 {
        d.request(VIRTIO_BLK_T_IN, i, &[(DATA + i * 0x1000, 512, W)]);
    }
    d.block.process_queue();
    assert_eq!(in_flight(&d), 2, "no more than the ring's slots");
    assert_eq!(d.vq.used_idx(), 0);
    let used = d.run();
    assert_eq!(used.len(), 5);
    assert_eq!(in_flight(&d), 0);
    let want = pattern(IMAGE_LEN);
    for i in 0..5usize {
        assert_eq!(
            d.bytes(DATA + i as u64 * 0x1000, 512),
            want[i * 512..(i + 1) * 512]
        );
        assert_eq!(d.byte(STATUS + i as u64 * 0x10), OK);
    }
}

/// A flush submitted with writes still in flight completes after them,
/// and the data is in the file.
#[test]
fn flush_after_writes_in_the_same_batch() {
    let mem = guest_memory();
    let img = image();
    let mut d = lazy_uring_driver(&mem, &img);
    mem.write_slice(&[0x6b; 4096], GuestAddress(DATA)).unwrap();
    d.request(VIRTIO_BLK_T_OUT, 20, &[(DATA, 4096, 0)]);
    let (_, flush_status) = d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    d.block.process_queue();
    assert_eq!(in_flight(&d), 2);
    let used = d.run();
    assert_eq!(used.len(), 2);
    assert_eq!(d.byte(flush_status), OK);
    let disk = std::fs::read(img.as_path()).unwrap();
    assert!(disk[20 * 512..28 * 512].iter().all(|&b| b == 0x6b));

    // cache=unsafe: answered at once, nothing submitted.
    d.block.set_cache_mode(CacheMode::Unsafe);
    let (_, st) = d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    d.block.process_queue();
    assert_eq!(in_flight(&d), 0);
    assert_eq!(d.byte(st), OK);
}

/// A reset waits for the requests in flight and answers them first: the
/// kernel writes guest memory until they complete.
#[test]
fn reset_and_quiesce_complete_requests_in_flight() {
    let mem = guest_memory();
    let img = image();
    let mut d = lazy_uring_driver(&mem, &img);
    d.request(VIRTIO_BLK_T_IN, 4, &[(DATA, 4096, W)]);
    d.block.process_queue();
    assert_eq!(in_flight(&d), 1);
    d.block.quiesce();
    assert_eq!(in_flight(&d), 0);
    assert_eq!(d.vq.used_idx(), 1);
    assert_eq!(d.irq.take(), vec![InterruptKind::Queue(0)]);
    assert_eq!(d.bytes(DATA, 4096), pattern(IMAGE_LEN)[2048..6144]);

    d.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x4000, 4096, W)]);
    d.block.process_queue();
    assert_eq!(in_flight(&d), 1);
    assert!(d.block.reset());
    assert_eq!(in_flight(&d), 0);
    assert_eq!(d.vq.used_idx(), 2, "answered before the reset");
    assert_eq!(d.bytes(DATA + 0x4000, 4096), pattern(IMAGE_LEN)[..4096]);
}

/// Dropping the device (the VM's end) with requests in flight waits for
/// them.
#[test]
fn drop_waits_for_requests_in_flight() {
    let mem = guest_memory();
    let img = image();
    let mut d = lazy_uring_driver(&mem, &img);
    mem.write_slice(&[0x42; 8192], GuestAddress(DATA)).unwrap();
    d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 8192, 0)]);
    d.block.process_queue();
    assert_eq!(in_flight(&d), 1);
    drop(d);
    let disk = std::fs::read(img.as_path()).unwrap();
    assert!(disk[..8192].iter().all(|&b| b == 0x42));
}

/// The image shrank under the VM: a read that reaches past its new end
/// gets a short read, is resubmitted for the rest, meets the end and
/// fails; a read before it still works.
#[test]
fn read_past_the_end_of_a_shrunk_image() {
    let mem = guest_memory();
    let img = image();
    let mut d = uring_driver(&mem, &img);
    img.as_file().set_len(8 * 512 + 100).unwrap();
    mem.write_slice(&[0x99; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 6, &[(DATA, 4096, W)]), (1, IOERR));
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 2048, W)]), (2049, OK));
    assert_eq!(d.bytes(DATA, 2048), pattern(IMAGE_LEN)[..2048]);
}

/// Guest pages a read fills are dirty for Diff snapshots, as with the
/// synchronous engine's copies.
#[test]
fn reads_mark_guest_pages_dirty() {
    let mem = guest_memory();
    let img = image();
    let mut d = uring_driver(&mem, &img);
    let at = DATA + 0x8_0000;
    let region = mem.find_region(GuestAddress(at)).unwrap();
    assert!(!region.bitmap().dirty_at(at as usize));
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(at, 8192, W)]).1, OK);
    assert!(region.bitmap().dirty_at(at as usize));
    assert!(region.bitmap().dirty_at(at as usize + 4096));
}

#[test]
fn advance_drops_what_was_moved() {
    let mut buf = [0u8; 64];
    let base = buf.as_mut_ptr();
    let v = |off: usize, len: usize| libc::iovec {
        iov_base: base.wrapping_add(off).cast(),
        iov_len: len,
    };
    let mut iov = vec![v(0, 16), v(16, 16), v(32, 32)];
    super::super::uring::advance(&mut iov, 20);
    let got: Vec<_> = iov
        .iter()
        .map(|i| (i.iov_base as usize - base as usize, i.iov_len))
        .collect();
    assert_eq!(got, vec![(20, 12), (32, 32)]);
    super::super::uring::advance(&mut iov, 12);
    assert_eq!(iov.len(), 1);
    assert_eq!(iov[0].iov_len, 32);
}

#[test]
fn ephemeral_disks_are_refused() {
    let img = image();
    let mut cfg = config(&img, false, true);
    cfg.engine = IoEngine::IoUring;
    let err = Block::new(cfg).unwrap_err();
    assert!(matches!(err, BlockError::UringEphemeral(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("ephemeral") && msg.contains("engine=sync"),
        "{msg}"
    );
    // Read-only wins over ephemeral, and a read-only disk is fine.
    let mut cfg = config(&img, true, true);
    cfg.engine = IoEngine::IoUring;
    assert_eq!(Block::new(cfg).unwrap().engine(), IoEngine::IoUring);
}

/// What capsule prints when io_uring_setup fails: one line that names
/// the image, the cause and the way out.
#[test]
fn unavailable_io_uring_is_one_clear_line() {
    let err = BlockError::Uring {
        path: "/img/root.ext4".into(),
        source: io::Error::from_raw_os_error(libc::EPERM),
    };
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    for want in ["/img/root.ext4", "io_uring", "not permitted", "engine=sync"] {
        assert!(msg.contains(want), "{want} in {msg}");
    }
}
