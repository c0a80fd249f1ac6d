//! virtio-blk tests of the event loop's fairness: the per-event byte
//! budget, requests that span several events, and `size_max`.

use std::io::Write;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;

/// A data descriptor longer than the advertised `size_max` fails with
/// IOERR and moves no data; one of exactly `size_max` is served.
#[test]
fn descriptor_longer_than_size_max_fails() {
    let mem = guest_memory();
    let tmp = TempFile::new().unwrap();
    let big = pattern(1 << 20);
    tmp.as_file().write_all(&big).unwrap();
    let mut d = Driver::new(&mem, config(&tmp, false, false));
    let long = SIZE_MAX + 512;
    mem.write_slice(&vec![0xee; long as usize], GuestAddress(DATA))
        .unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, long, W)]), (1, IOERR));
    assert!(
        d.bytes(DATA, long as usize).iter().all(|&b| b == 0xee),
        "nothing read"
    );
    // Also behind a short first descriptor, and for writes.
    assert_eq!(
        d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W), (DATA + 512, long, W)]),
        (1, IOERR)
    );
    assert_eq!(d.one(VIRTIO_BLK_T_OUT, 0, &[(DATA, long, 0)]), (1, IOERR));
    assert_eq!(
        std::fs::read(tmp.as_path()).unwrap(),
        big,
        "nothing written"
    );
    assert_eq!(
        d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, SIZE_MAX, W)]),
        (SIZE_MAX + 1, OK)
    );
    assert_eq!(d.bytes(DATA, SIZE_MAX as usize), big[..SIZE_MAX as usize]);
}

/// One queue event moves at most the byte budget (plus the request that
/// crosses it), then re-signals the queue eventfd so the event loop comes
/// back without a guest notification; completed requests are interrupted
/// for before yielding.
#[test]
fn byte_budget_yields_and_rekicks() {
    let mem = guest_memory();
    let tmp = TempFile::new().unwrap();
    tmp.as_file().write_all(&pattern(1 << 20)).unwrap();
    let mut d = Driver::new(&mem, config(&tmp, true, false));
    let kicked = |d: &Driver<'_>| d.block.common.take_kick(0);
    assert_eq!(d.block.byte_budget, BYTE_BUDGET);
    d.block.byte_budget = 2 * u64::from(SIZE_MAX) - 512;
    for i in 0..5 {
        d.request(VIRTIO_BLK_T_IN, i * 128, &[(DATA, SIZE_MAX, W)]);
    }
    assert_eq!(d.run().len(), 2, "two requests reach the budget");
    assert!(kicked(&d), "the device re-signalled its queue");
    assert_eq!(d.irq.take(), vec![InterruptKind::Queue(0)]);
    assert_eq!(d.run().len(), 2);
    assert!(kicked(&d));
    assert_eq!(d.run().len(), 1);
    assert!(!kicked(&d), "no work left, no kick");
    // Requests that move no data do not use up the byte budget.
    for _ in 0..5 {
        d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    assert_eq!(d.run().len(), 5);
    assert!(!kicked(&d));
}

/// A driver over a 1 MiB image (pattern), writable or not, whose device
/// has a byte budget of one bounce-buffer chunk.
fn one_chunk_budget<'a>(mem: &'a GuestMemoryMmap, tmp: &TempFile, read_only: bool) -> Driver<'a> {
    tmp.as_file().write_all(&pattern(1 << 20)).unwrap();
    let mut d = Driver::new(mem, config(tmp, read_only, false));
    d.block.byte_budget = u64::from(SIZE_MAX);
    d
}

/// Five data descriptors of `SIZE_MAX` at DATA (320 KiB), `flags` each.
fn five_chunks(flags: u16) -> Vec<(u64, u32, u16)> {
    let max = u64::from(SIZE_MAX);
    (0..5).map(|i| (DATA + i * max, SIZE_MAX, flags)).collect()
}

/// A read larger than the budget does not hold the event loop for its
/// whole length: each event moves one budget's worth, the chain goes back
/// to the ring with nothing used, the device re-kicks itself, and the
/// request completes, with all its data, in the event that moves its last
/// chunk. (Before requests could stop partway, the first event served
/// all 320 KiB.)
#[test]
fn read_larger_than_budget_spans_events() {
    let mem = guest_memory();
    let tmp = TempFile::new().unwrap();
    let mut d = one_chunk_budget(&mem, &tmp, true);
    let (head, status) = d.request(VIRTIO_BLK_T_IN, 8, &five_chunks(W));
    for event in 1..5 {
        assert_eq!(d.run(), vec![], "event {event}: the request is not done");
        assert!(d.block.common.take_kick(0), "event {event}: re-kicked");
        assert!(!d.block.common.take_kick(0), "one kick per event");
        assert_eq!(d.byte(status), UNTOUCHED, "no status before the end");
    }
    assert_eq!(d.run(), vec![(u32::from(head), 5 * SIZE_MAX + 1)]);
    assert_eq!(d.byte(status), OK);
    let len = 5 * SIZE_MAX as usize;
    assert!(d.bytes(DATA, len) == pattern(1 << 20)[4096..4096 + len]);
}

/// The same for a write: the image holds every chunk once it completes,
/// and a later request goes on normally.
#[test]
fn write_larger_than_budget_spans_events() {
    let mem = guest_memory();
    let tmp = TempFile::new().unwrap();
    let mut d = one_chunk_budget(&mem, &tmp, false);
    let len = 5 * SIZE_MAX as usize;
    let data: Vec<u8> = (0..len).map(|i| (i / 4096) as u8 ^ 0xa5).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (head, status) = d.request(VIRTIO_BLK_T_OUT, 16, &five_chunks(0));
    let mut events = 1;
    let used = loop {
        let used = d.run();
        if !used.is_empty() {
            break used;
        }
        assert!(d.block.common.take_kick(0));
        events += 1;
        assert!(events <= 5, "the write never completes");
    };
    assert_eq!((events, used), (5, vec![(u32::from(head), 1)]));
    assert_eq!(d.byte(status), OK);
    let mut want = pattern(1 << 20);
    want[16 * 512..16 * 512 + len].copy_from_slice(&data);
    assert!(std::fs::read(tmp.as_path()).unwrap() == want);
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
}

/// A guest that rewrites a request the device stopped in gets the new
/// request executed from its start (none of the old progress is trusted),
/// and a device reset forgets the progress too.
#[test]
fn rewritten_or_reset_request_starts_over() {
    let mem = guest_memory();
    let tmp = TempFile::new().unwrap();
    let mut d = one_chunk_budget(&mem, &tmp, true);
    let (_, status) = d.request(VIRTIO_BLK_T_IN, 8, &five_chunks(W));
    assert_eq!(d.run(), vec![]);
    assert_eq!(d.run(), vec![]);
    // Same chain, other sector (the header is the first request's).
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&64u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_slice(&[0u8; 5 * 65536], GuestAddress(DATA))
        .unwrap();
    let mut events = 0;
    while d.run().is_empty() {
        events += 1;
        assert!(events < 5, "progress of the old request was reused");
    }
    assert_eq!(events, 4, "five more events: all five chunks again");
    assert_eq!(d.byte(status), OK);
    let len = 5 * SIZE_MAX as usize;
    assert!(d.bytes(DATA, len) == pattern(1 << 20)[64 * 512..64 * 512 + len]);

    // Stopped partway, then the driver resets the device: nothing of the
    // request is remembered.
    d.request(VIRTIO_BLK_T_IN, 8, &five_chunks(W));
    assert_eq!(d.run(), vec![]);
    assert!(d.block.resume.is_some());
    assert!(d.block.reset());
    assert!(d.block.resume.is_none());
}

/// A request that spans events is charged to the rate limiter once: with
/// one operation in the bucket (and no refill within the test), it still
/// completes; the next request is held back.
#[test]
fn request_spanning_events_is_rate_limited_once() {
    use crate::rate_limiter::{BucketConfig, RateLimiter};
    let mem = guest_memory();
    let tmp = TempFile::new().unwrap();
    let mut d = one_chunk_budget(&mem, &tmp, true);
    let ops = BucketConfig {
        size: 1,
        one_time_burst: 0,
        refill_time_ms: 600_000,
    };
    d.block
        .set_rate_limiter(Some(RateLimiter::new(None, Some(ops)).unwrap()));
    let (head, _) = d.request(VIRTIO_BLK_T_IN, 8, &five_chunks(W));
    let mut used = Vec::new();
    for _ in 0..5 {
        used.extend(d.run());
    }
    assert_eq!(used, vec![(u32::from(head), 5 * SIZE_MAX + 1)]);
    d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    assert_eq!(d.run(), vec![], "the bucket is empty");
}
