//! virtio-blk tests: requests driven through a mock split queue in real
//! guest memory, over temporary image files.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::{MmioTransport, INT_VRING};
use crate::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::virtio::test_utils::{activate_on_rings, RecordingInterrupt, Rings};
use crate::virtio::{ActivateError, InterruptKind, Queue, VirtioInterrupt};
use event_manager::MutEventSubscriber;

mod cache;
mod event_loop;
mod fairness;
mod hostile;
mod uring;

const MEM_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 16;
const RING: u64 = 0x1000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const INDIRECT: u64 = 0x30_0000;
const STATUS: u64 = 0x38_0000;
const IMAGE_LEN: usize = 64 * 1024;
const W: u16 = VRING_DESC_F_WRITE as u16;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// What an untouched status byte holds.
const UNTOUCHED: u8 = 0xee;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn image() -> TempFile {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().write_all(&pattern(IMAGE_LEN)).unwrap();
    tmp
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

std::thread_local! {
    /// The engine [`config`] asks for: the io_uring tests run some of the
    /// synchronous engine's tests again with it.
    static ENGINE: std::cell::Cell<IoEngine> = const { std::cell::Cell::new(IoEngine::Sync) };
}

fn config(image: &TempFile, read_only: bool, ephemeral: bool) -> BlockConfig {
    BlockConfig {
        path: image.as_path().to_path_buf(),
        read_only,
        ephemeral,
        serial: "capsule-disk-0".into(),
        cache: CacheMode::Writeback,
        engine: ENGINE.get(),
    }
}

/// A driver stand-in: builds requests in guest memory and feeds them to a
/// block device that owns the other side of the queue.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: Rings<'a>,
    block: Block,
    irq: Arc<RecordingInterrupt>,
    next_desc: u16,
    requests: u64,
    used_seen: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, cfg: BlockConfig) -> Self {
        Self::with_features(mem, cfg, 0)
    }

    fn with_features(mem: &'a GuestMemoryMmap, cfg: BlockConfig, extra: u64) -> Self {
        Self::with_block(mem, Block::new(cfg).unwrap(), extra)
    }

    fn with_block(mem: &'a GuestMemoryMmap, mut block: Block, extra: u64) -> Self {
        let vq = Rings::new(mem, RING, QSIZE);
        let irq = activate_on_rings(&mut block, mem, extra, &[&vq]);
        Self {
            mem,
            vq,
            block,
            irq,
            next_desc: 0,
            requests: 0,
            used_seen: 0,
        }
    }

    /// Stores descriptors (addr, len, flags) as one chain, linking them in
    /// order, and makes the chain available. Returns the head index.
    fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT as u16, idx + 1)
            } else {
                (flags, 0)
            };
            self.vq.store(idx, addr, len, flags, next);
        }
        self.next_desc += n;
        self.make_available(head);
        head
    }

    fn make_available(&self, head: u16) {
        self.vq.push_avail(head);
    }

    /// Writes a request header; returns its address.
    fn header(&mut self, ty: u32, sector: u64) -> u64 {
        let addr = HDR + self.requests * 0x100;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
        addr
    }

    /// A fresh status byte; returns its address.
    fn status(&mut self) -> u64 {
        let addr = STATUS + self.requests * 0x10;
        self.requests += 1;
        self.mem.write_obj(UNTOUCHED, GuestAddress(addr)).unwrap();
        addr
    }

    /// Queues a well-framed request: header, `data` (addr, len, flags), status.
    fn request(&mut self, ty: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u16, u64) {
        let hdr = self.header(ty, sector);
        let status = self.status();
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend_from_slice(data);
        descs.push((status, 1, W));
        (self.add_chain(&descs), status)
    }

    /// Lets the device run; returns the new used-ring entries (id, len).
    fn run(&mut self) -> Vec<(u32, u32)> {
        self.block.process_queue();
        self.block.settle();
        let mut out = Vec::new();
        let used_idx = self.vq.used_idx();
        while self.used_seen != used_idx {
            out.push(self.vq.used_elem(self.used_seen));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Runs one request and returns (used len, status byte).
    fn one(&mut self, ty: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u32, u8) {
        let (head, status) = self.request(ty, sector, data);
        let used = self.run();
        assert_eq!(used.len(), 1, "exactly one used entry");
        assert_eq!(used[0].0, u32::from(head));
        (used[0].1, self.byte(status))
    }
}

#[test]
fn config_space_and_features() {
    let mem = guest_memory();
    let img = image();
    let d = Driver::new(&mem, config(&img, false, false));
    let mut c = [0u8; 8];
    d.block.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), (IMAGE_LEN / 512) as u64);
    let mut w = [0u8; 4];
    d.block.read_config(8, &mut w);
    assert_eq!(u32::from_le_bytes(w), SIZE_MAX);
    d.block.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), SEG_MAX);
    d.block.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512);
    d.block.read_config(58, &mut w);
    assert_eq!(w, [0; 4], "past the end reads as zero");
    d.block.read_config(u64::MAX, &mut w);
    assert_eq!(w, [0; 4]);
    let f = d.block.avail_features();
    for b in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & bit(b), 0);
    }
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(d.block.device_type(), 2);

    let img2 = image();
    let ro = Block::new(config(&img2, true, false)).unwrap();
    assert_ne!(ro.avail_features() & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.avail_features() & bit(VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn read_across_descriptors() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    let (len, status) = d.one(
        VIRTIO_BLK_T_IN,
        3,
        &[(DATA, 512, W), (DATA + 0x1000, 1024, W)],
    );
    assert_eq!(status, OK);
    assert_eq!(len, 1536 + 1);
    let want = pattern(IMAGE_LEN);
    assert_eq!(d.bytes(DATA, 512), want[3 * 512..4 * 512]);
    assert_eq!(d.bytes(DATA + 0x1000, 1024), want[4 * 512..6 * 512]);
    assert_eq!(d.irq.take(), vec![InterruptKind::Queue(0)]);
}

#[test]
fn large_read_across_max_size_descriptors() {
    let mem = guest_memory();
    let tmp = TempFile::new().unwrap();
    let big = pattern(1 << 20);
    tmp.as_file().write_all(&big).unwrap();
    let mut d = Driver::new(&mem, config(&tmp, true, false));
    // 320 KiB: five descriptors of SIZE_MAX, each filled in one chunk
    // (straight from the raw image).
    let max = u64::from(SIZE_MAX);
    let data: Vec<_> = (0..5).map(|i| (DATA + i * max, SIZE_MAX, W)).collect();
    let (len, status) = d.one(VIRTIO_BLK_T_IN, 8, &data);
    assert_eq!((len, status), (5 * SIZE_MAX + 1, OK));
    assert_eq!(
        d.bytes(DATA, 5 * max as usize),
        big[4096..4096 + 5 * max as usize]
    );
}

#[test]
fn write_then_read_back_and_flush() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
    let (len, status) = d.one(
        VIRTIO_BLK_T_OUT,
        10,
        &[(DATA, 512, 0), (DATA + 512, 512, 0)],
    );
    assert_eq!((len, status), (1, OK));
    let (len, status) = d.one(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((len, status), (1, OK));
    let on_disk = std::fs::read(img.as_path()).unwrap();
    let mut want = pattern(IMAGE_LEN);
    want[10 * 512..12 * 512].fill(0x5a);
    assert!(on_disk == want);
    let (_, status) = d.one(VIRTIO_BLK_T_IN, 10, &[(DATA + 0x10000, 1024, W)]);
    assert_eq!(status, OK);
    assert_eq!(d.bytes(DATA + 0x10000, 1024), vec![0x5a; 1024]);
}

#[test]
fn get_id() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    mem.write_slice(&[0xff; 32], GuestAddress(DATA)).unwrap();
    let (len, status) = d.one(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    assert_eq!((len, status), (21, OK));
    let mut want = b"capsule-disk-0".to_vec();
    want.resize(20, 0);
    assert_eq!(d.bytes(DATA, 20), want);
    assert_eq!(d.byte(DATA + 20), 0xff, "nothing past 20 bytes");
    // A short buffer gets a prefix.
    let (len, status) = d.one(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x100, 4, W)]);
    assert_eq!((len, status), (5, OK));
    assert_eq!(d.bytes(DATA + 0x100, 4), b"caps");
    // No buffer or a device-readable one.
    assert_eq!(d.one(VIRTIO_BLK_T_GET_ID, 0, &[]).1, IOERR);
    assert_eq!(d.one(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, 0)]).1, IOERR);
}

#[test]
fn serial_too_long_is_rejected() {
    let img = image();
    let mut cfg = config(&img, false, false);
    cfg.serial = "x".repeat(21);
    assert!(matches!(
        Block::new(cfg),
        Err(BlockError::SerialTooLong { .. })
    ));
}

#[test]
fn read_only_disk_rejects_writes() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, true, false));
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, 0)]), (1, IOERR));
    // Not offered on a read-only disk.
    let seg = segment(0, 1, 0);
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(
        d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
        UNSUPP
    );
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, &[]).1, OK);
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).1, OK);
    assert!(std::fs::read(img.as_path()).unwrap() == pattern(IMAGE_LEN));
}

fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let mut segs = segment(2, 2, 0).to_vec();
    segs.extend_from_slice(&segment(8, 1, unmap));
    mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    assert_eq!(
        d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 32, 0)]),
        (1, OK)
    );
    let mut want = pattern(IMAGE_LEN);
    want[2 * 512..4 * 512].fill(0);
    want[8 * 512..9 * 512].fill(0);
    assert!(std::fs::read(img.as_path()).unwrap() == want);

    mem.write_slice(&segment(20, 4, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, 0)]).1, OK);
    // Discarded sectors read back either unchanged or as zeroes.
    let disk = std::fs::read(img.as_path()).unwrap();
    let range = 20 * 512..24 * 512;
    if disk[range.clone()].iter().all(|&b| b == 0) {
        want[range].fill(0);
    }
    assert!(disk == want);

    // Discard must not carry the unmap flag; unknown flags are unsupported.
    mem.write_slice(&segment(0, 1, unmap), GuestAddress(DATA))
        .unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, 0)]).1, UNSUPP);
    mem.write_slice(&segment(0, 1, 2), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
        UNSUPP
    );
    // Out of range, overflowing, oversized, malformed.
    let cap = (IMAGE_LEN / 512) as u64;
    for seg in [
        segment(cap, 1, 0),
        segment(u64::MAX, 2, 0),
        segment(0, u32::MAX, 0),
    ] {
        mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(
            d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
            IOERR
        );
    }
    assert_eq!(
        d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 12, 0)]).1,
        IOERR
    );
    assert_eq!(d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[]).1, IOERR);
    assert_eq!(
        d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, W)]).1,
        IOERR
    );
    let many = 16 * (MAX_ZEROES_SEGMENTS + 1);
    assert_eq!(d.one(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, many, 0)]).1, IOERR);
    assert!(std::fs::read(img.as_path()).unwrap() == want);
}

#[test]
fn ephemeral_disk_keeps_base_file() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, true));
    assert!(!d.block.is_read_only());
    mem.write_slice(&[0xc3; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_OUT, 5, &[(DATA, 1024, 0)]).1, OK);
    mem.write_slice(&segment(9, 2, 0), GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(
        d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA + 0x2000, 16, 0)])
            .1,
        OK
    );
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, &[]).1, OK);
    assert_eq!(d.one(VIRTIO_BLK_T_IN, 4, &[(DATA + 0x4000, 4096, W)]).1, OK);
    let mut want = pattern(IMAGE_LEN);
    want[5 * 512..7 * 512].fill(0xc3);
    want[9 * 512..11 * 512].fill(0);
    assert_eq!(d.bytes(DATA + 0x4000, 4096), want[4 * 512..12 * 512]);
    assert!(std::fs::read(img.as_path()).unwrap() == pattern(IMAGE_LEN));
    drop(d);
    assert!(std::fs::read(img.as_path()).unwrap() == pattern(IMAGE_LEN));
}

#[test]
fn images_are_locked_between_devices() {
    let img = image();
    let rw = Block::new(config(&img, false, false)).unwrap();
    for (ro, eph) in [(false, false), (true, false), (false, true)] {
        let err = Block::new(config(&img, ro, eph)).unwrap_err();
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        assert!(err
            .to_string()
            .contains(&img.as_path().display().to_string()));
    }
    drop(rw);
    let a = Block::new(config(&img, true, false)).unwrap();
    let b = Block::new(config(&img, false, true)).unwrap();
    assert!(matches!(
        Block::new(config(&img, false, false)),
        Err(BlockError::Locked { .. })
    ));
    drop((a, b));
    Block::new(config(&img, false, false)).unwrap();
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::with_features(
        &mem,
        config(&img, false, false),
        bit(VIRTIO_RING_F_EVENT_IDX),
    );
    d.vq.set_used_event(5);
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, &[]).1, OK);
    assert!(d.irq.take().is_empty(), "driver asked for no interrupt yet");
    d.vq.set_used_event(1);
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, &[]).1, OK);
    assert_eq!(d.irq.take(), vec![InterruptKind::Queue(0)]);
}

#[test]
fn reset_stops_processing() {
    let mem = guest_memory();
    let img = image();
    let mut d = Driver::new(&mem, config(&img, false, false));
    assert!(d.block.is_activated());
    assert!(d.block.reset());
    assert!(!d.block.is_activated());
    d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    assert_eq!(d.run(), vec![]);
    assert!(d.irq.take().is_empty());
}

#[test]
fn activation_checks_queues() {
    let mem = guest_memory();
    let img = image();
    let mut block = Block::new(config(&img, false, false)).unwrap();
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(RecordingInterrupt::default());
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let err = block
        .activate(mem.clone(), irq.clone(), vec![], vec![])
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { .. }));
    let err = block
        .activate(
            mem.clone(),
            irq.clone(),
            vec![Queue::new(16).unwrap()],
            vec![evt()],
        )
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(0)));
    let vq = Rings::new(&mem, RING, QSIZE);
    let q = || vq.queue();
    block
        .activate(mem.clone(), irq.clone(), vec![q()], vec![evt()])
        .unwrap();
    let err = block
        .activate(mem.clone(), irq, vec![q()], vec![evt()])
        .unwrap_err();
    assert!(matches!(err, ActivateError::AlreadyActive));
}
