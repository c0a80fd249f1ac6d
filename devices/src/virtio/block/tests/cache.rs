//! virtio-blk cache modes: with `Writeback` a guest's flush reaches the
//! image's storage (`DiskImage::flush`, an `fdatasync` for a raw image);
//! with `Unsafe` it completes without it. Either way the flush feature is
//! offered and the guest's writes reach the image file.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A raw image that counts the flushes (fdatasyncs) that reach it.
struct CountingDisk {
    inner: RawImage,
    flushes: Arc<AtomicUsize>,
}

impl DiskImage for CountingDisk {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// Writes two sectors and flushes twice under `mode`; returns how many
/// flushes reached the image and checks that the write did.
fn flushes_reaching_the_image(mode: CacheMode) -> usize {
    let mem = guest_memory();
    let img = image();
    let flushes = Arc::new(AtomicUsize::new(0));
    let disk = CountingDisk {
        inner: RawImage::open(img.as_path(), false).unwrap(),
        flushes: Arc::clone(&flushes),
    };
    let mut block = Block::with_disk(Box::new(disk), [0; ID_BYTES]).unwrap();
    block.set_cache_mode(mode);
    assert_ne!(
        block.avail_features() & bit(VIRTIO_BLK_F_FLUSH),
        0,
        "{mode:?} offers FLUSH"
    );
    let mut d = Driver::with_block(&mem, block, 0);
    mem.write_slice(&[0xc3; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_OUT, 4, &[(DATA, 1024, 0)]), (1, OK));
    for _ in 0..2 {
        assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK), "{mode:?}");
    }
    let on_disk = std::fs::read(img.as_path()).unwrap();
    assert!(
        on_disk[4 * 512..6 * 512].iter().all(|&b| b == 0xc3),
        "{mode:?}: the write reached the image file"
    );
    flushes.load(Ordering::SeqCst)
}

#[test]
fn writeback_flush_syncs_the_image() {
    assert_eq!(flushes_reaching_the_image(CacheMode::Writeback), 2);
}

#[test]
fn unsafe_flush_does_not_sync_the_image() {
    assert_eq!(flushes_reaching_the_image(CacheMode::Unsafe), 0);
}

#[test]
fn the_config_sets_the_cache_mode() {
    let img = image();
    assert_eq!(
        Block::new(config(&img, false, false)).unwrap().cache_mode(),
        CacheMode::Writeback
    );
    drop(img);
    let img = image();
    let mut cfg = config(&img, false, false);
    cfg.cache = CacheMode::Unsafe;
    assert_eq!(Block::new(cfg).unwrap().cache_mode(), CacheMode::Unsafe);
}
