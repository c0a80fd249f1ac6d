use std::os::fd::FromRawFd;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress};

use super::*;
use crate::virtio::test_utils::{activate_on_rings, Rings};
use crate::virtio::InterruptKind;
use crate::GuestMemoryMmap;

const MEM: usize = 0x40_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
/// Ring bases: one 64 KiB area per queue, below the data.
const RINGS: [u64; 4] = [0x1000, 0x1_1000, 0x2_1000, 0x3_1000];
/// Where the driver's buffers (PFN lists, statistics) go.
const BUF: u64 = 0x8_0000;
/// Pages the tests fill and release.
const DATA: u64 = 0x20_0000;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(addr))
        .unwrap();
}

fn page_is(mem: &GuestMemoryMmap, addr: u64, byte: u8) -> bool {
    let mut b = vec![0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b.iter().all(|&x| x == byte)
}

/// Writes `pfns` at `at` and returns their byte length.
fn put_pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

fn balloon(config: BalloonConfig) -> Balloon {
    Balloon::new(config).unwrap()
}

#[test]
fn inflate_releases_the_pages_and_deflate_touches_nothing() {
    let mem = guest_memory();
    let mut b = balloon(BalloonConfig::default());
    assert_eq!(b.device_type(), 5);
    let (inf, def) = (
        Rings::new(&mem, RINGS[0], 16),
        Rings::new(&mem, RINGS[1], 16),
    );
    let irq = activate_on_rings(&mut b, &mem, 0, &[&inf, &def]);
    fill(&mem, DATA, 4 * PAGE_SIZE as usize, 0xaa);
    // Pages 0, 1 and 3 of DATA (unsorted, one twice); page 2 stays.
    let first = (DATA >> PAGE_SHIFT) as u32;
    let len = put_pfns(&mem, BUF, &[first + 3, first, first + 1, first]);
    inf.store(0, BUF, len, 0, 0);
    inf.push_avail(0);
    b.queue_event(INFLATE);
    assert_eq!(inf.used_idx(), 1);
    assert_eq!(inf.used_elem(0), (0, 0));
    assert!(page_is(&mem, DATA, 0) && page_is(&mem, DATA + PAGE_SIZE, 0));
    assert!(
        page_is(&mem, DATA + 2 * PAGE_SIZE, 0xaa),
        "a page not named"
    );
    assert!(page_is(&mem, DATA + 3 * PAGE_SIZE, 0));
    let c = b.counters();
    assert_eq!(
        (c.inflated_pages, c.released_bytes, c.errors),
        (4, 3 * PAGE_SIZE, 0)
    );
    assert_eq!(irq.take(), vec![InterruptKind::Queue(0)]);

    // Deflate: the guest takes page 2 back; its contents stay.
    let len = put_pfns(&mem, BUF, &[first + 2]);
    def.store(0, BUF, len, 0, 0);
    def.push_avail(0);
    b.queue_event(DEFLATE);
    assert_eq!(def.used_idx(), 1);
    assert!(page_is(&mem, DATA + 2 * PAGE_SIZE, 0xaa));
    assert_eq!(b.counters().deflated_pages, 1);
}

#[test]
fn hostile_page_lists_are_errors_and_touch_nothing_outside_ram() {
    let mem = guest_memory();
    let mut b = balloon(BalloonConfig::default());
    let (inf, def) = (
        Rings::new(&mem, RINGS[0], 16),
        Rings::new(&mem, RINGS[1], 16),
    );
    let _irq = activate_on_rings(&mut b, &mem, 0, &[&inf, &def]);
    fill(&mem, DATA, PAGE_SIZE as usize, 0x55);
    let ok = (DATA >> PAGE_SHIFT) as u32;
    // 0: PFNs past RAM and the largest one, beside a good one.
    let len = put_pfns(&mem, BUF, &[(MEM as u32 >> 12), u32::MAX, ok]);
    inf.store(0, BUF, len, 0, 0);
    // 1: device-writable (a driver only gives readable lists).
    put_pfns(&mem, BUF + 0x100, &[ok]);
    inf.store(1, BUF + 0x100, 4, W, 0);
    // 2: too short for one PFN; 3: not a whole number of PFNs.
    inf.store(2, BUF + 0x100, 2, 0, 0);
    inf.store(3, BUF + 0x100, 7, 0, 0);
    // 4: a list outside guest memory; 5: 4 GiB long.
    inf.store(4, 0x1_0000_0000, 4, 0, 0);
    inf.store(5, BUF, u32::MAX - 3, 0, 0);
    // 6: a readable list, then a writable part of the same chain.
    inf.store(6, BUF + 0x100, 4, N, 7);
    inf.store(7, BUF + 0x200, 4, W, 0);
    for head in [0, 1, 2, 3, 4, 5, 6] {
        inf.push_avail(head);
    }
    b.queue_event(INFLATE);
    assert_eq!(inf.used_idx(), 7, "every buffer is returned");
    // The good PFN of chain 0 and of chain 6's readable part: released.
    assert!(page_is(&mem, DATA, 0));
    let c = b.counters();
    assert_eq!(c.errors, 2 + 6, "two bad PFNs, six bad chains");
    assert_eq!(
        c.released_bytes,
        2 * PAGE_SIZE,
        "the good page, once per chain"
    );
    // Deflate is checked the same way.
    let len = put_pfns(&mem, BUF, &[u32::MAX]);
    def.store(0, BUF, len, 0, 0);
    def.push_avail(0);
    b.queue_event(DEFLATE);
    assert_eq!(def.used_idx(), 1);
    assert_eq!(b.counters().errors, 9);
}

#[test]
fn config_space_target_and_actual() {
    let mem = guest_memory();
    let mut b = balloon(BalloonConfig {
        amount_mib: 3,
        ..Default::default()
    });
    let mut w = [0u8; 4];
    b.read_config(0, &mut w);
    assert_eq!(u32::from_le_bytes(w), 3 * 256);
    // The driver writes `actual`; nothing else is writable.
    b.write_config(4, &77u32.to_le_bytes());
    b.write_config(0, &1u32.to_le_bytes());
    b.write_config(6, &[1, 2, 3, 4]);
    b.write_config(u64::MAX, &[1]);
    assert_eq!((b.target_pages(), b.actual_pages()), (768, 77));
    let (inf, def) = (
        Rings::new(&mem, RINGS[0], 16),
        Rings::new(&mem, RINGS[1], 16),
    );
    let irq = activate_on_rings(&mut b, &mem, 0, &[&inf, &def]);
    b.set_target_mib(64);
    assert_eq!(b.target_pages(), 64 * 256);
    assert_eq!(irq.take(), vec![InterruptKind::Config]);
    // A target past what 32 bits of pages hold is capped, not wrapped.
    b.set_target_mib(u32::MAX);
    assert_eq!(b.target_pages(), u32::MAX);
    assert!(b.reset());
    assert_eq!(b.actual_pages(), 0);
}

#[test]
fn queues_follow_the_offered_features() {
    let only_reporting = balloon(BalloonConfig {
        free_page_reporting: true,
        deflate_on_oom: true,
        ..Default::default()
    });
    assert_eq!(only_reporting.queue_max_sizes().len(), 3);
    assert_eq!(only_reporting.reporting_queue(), Some(2));
    let f = only_reporting.avail_features();
    assert_ne!(f & bit(feature::DEFLATE_ON_OOM), 0);
    assert_eq!(f & bit(feature::STATS_VQ), 0);
    let all = balloon(BalloonConfig {
        free_page_reporting: true,
        stats_interval_s: 1,
        ..Default::default()
    });
    assert_eq!(all.queue_max_sizes().len(), 4);
    assert_eq!(
        (all.stats_queue(), all.reporting_queue()),
        (Some(2), Some(3))
    );
    assert_eq!(all.avail_features() & bit(feature::DEFLATE_ON_OOM), 0);
    assert_eq!(balloon(BalloonConfig::default()).queue_max_sizes().len(), 2);
}

/// Writes statistics entries at `at`; returns their byte length.
fn put_stats(mem: &GuestMemoryMmap, at: u64, entries: &[(u16, u64)]) -> u32 {
    let mut bytes = Vec::new();
    for (tag, v) in entries {
        bytes.extend(tag.to_le_bytes());
        bytes.extend(v.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

#[test]
fn statistics_are_kept_and_the_buffer_returned_on_request() {
    let mem = guest_memory();
    let mut b = balloon(BalloonConfig {
        stats_interval_s: 5,
        ..Default::default()
    });
    let rings: Vec<Rings> = RINGS[..3]
        .iter()
        .map(|&r| Rings::new(&mem, r, 16))
        .collect();
    let irq = activate_on_rings(
        &mut b,
        &mem,
        bit(feature::STATS_VQ),
        &[&rings[0], &rings[1], &rings[2]],
    );
    let st = &rings[2];
    let len = put_stats(
        &mem,
        BUF,
        &[(4, 100 << 20), (5, 512 << 20), (99, 1), (2, 7)],
    );
    st.store(0, BUF, len, 0, 0);
    st.push_avail(0);
    b.queue_event(2);
    let s = b.stats().unwrap();
    assert_eq!(
        (s.free_memory, s.total_memory, s.major_faults),
        (Some(100 << 20), Some(512 << 20), Some(7))
    );
    assert_eq!(s.swap_in, None);
    assert_eq!(st.used_idx(), 0, "the buffer is held until the next update");
    // PATCH /balloon/statistics: a new interval asks for an update now.
    b.set_stats_interval(1).unwrap();
    assert_eq!(st.used_idx(), 1);
    assert_eq!(irq.take(), vec![InterruptKind::Queue(2)]);
    assert!(matches!(
        b.set_stats_interval(0),
        Err(BalloonError::StatsCannotStop)
    ));
    // Two buffers at once (hostile): the older one goes back; a bad one
    // is an error with what was read before it kept.
    let len = put_stats(&mem, BUF + 0x100, &[(4, 1)]);
    st.store(1, BUF + 0x100, len, N, 2);
    st.store(2, BUF + 0x200, 10, W, 0);
    st.store(3, BUF, 7, 0, 0);
    st.push_avail(1);
    st.push_avail(3);
    b.queue_event(2);
    assert_eq!(st.used_idx(), 2);
    assert_eq!(b.counters().errors, 2);
    assert_eq!(
        b.stats().unwrap(),
        GuestStats::default(),
        "the last buffer had nothing"
    );
    let none = balloon(BalloonConfig::default());
    assert_eq!(none.stats(), None);
    let mut none = none;
    assert!(matches!(
        none.set_stats_interval(1),
        Err(BalloonError::StatsDisabled)
    ));
}

#[test]
fn reported_free_ranges_are_released_and_bad_ones_refused() {
    let mem = guest_memory();
    let mut b = balloon(BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    });
    let rings: Vec<Rings> = RINGS[..3]
        .iter()
        .map(|&r| Rings::new(&mem, r, 16))
        .collect();
    let irq = activate_on_rings(
        &mut b,
        &mem,
        bit(feature::FREE_PAGE_REPORTING),
        &[&rings[0], &rings[1], &rings[2]],
    );
    let rep = &rings[2];
    fill(&mem, DATA, 0x10_0000, 0x77);
    // One chain as Linux sends it (device-writable, 2 pages and 8 pages),
    // then a range past RAM, a range across its end, an unaligned one.
    rep.store(0, DATA, 2 * PAGE_SIZE as u32, W | N, 1);
    rep.store(1, DATA + 0x8000, 8 * PAGE_SIZE as u32, W, 0);
    rep.store(2, MEM as u64, 0x1000, W, 0);
    rep.store(3, MEM as u64 - 0x1000, 0x2000, W, 0);
    rep.store(4, DATA + 0x20_0001, 0x1000, W, 0);
    for head in [0, 2, 3, 4] {
        rep.push_avail(head);
    }
    b.queue_event(2);
    assert_eq!(rep.used_idx(), 4);
    assert!(page_is(&mem, DATA, 0) && page_is(&mem, DATA + PAGE_SIZE, 0));
    assert!(page_is(&mem, DATA + 2 * PAGE_SIZE, 0x77));
    assert!(page_is(&mem, DATA + 0x8000 + 7 * PAGE_SIZE, 0));
    assert!(page_is(&mem, DATA + 0x8000 + 8 * PAGE_SIZE, 0x77));
    let c = b.counters();
    assert_eq!(
        (c.reported_ranges, c.released_bytes, c.errors),
        (5, 10 * PAGE_SIZE, 3)
    );
    assert_eq!(irq.take(), vec![InterruptKind::Queue(2)]);
}

#[test]
fn shared_file_backed_ram_gets_a_hole_punched() {
    // SAFETY: memfd_create with a NUL-terminated name; checked below.
    let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let ranges = [(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )];
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges).unwrap();
    fill(&mem, DATA, 0x10_0000, 0x33);
    let blocks = |f: &std::fs::File| std::os::unix::fs::MetadataExt::blocks(&f.metadata().unwrap());
    let before = blocks(&file);
    release::release(
        &mem,
        release::PageRange {
            addr: DATA,
            len: 0x8_0000,
        },
    )
    .unwrap();
    // (Measured first: reading a hole of shared memory allocates a page.)
    assert_eq!(
        before - blocks(&file),
        0x8_0000 / 512,
        "the file's pages were freed"
    );
    assert!(page_is(&mem, DATA, 0) && page_is(&mem, DATA + 0x7_f000, 0));
    assert!(page_is(&mem, DATA + 0x8_0000, 0x33));
}
