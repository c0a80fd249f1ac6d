//! virtio-blk over a raw disk image (virtio 1.2 §5.2).
//!
//! One request queue. With the default synchronous engine, requests are
//! handled on the event-loop thread when the queue's eventfd fires; with
//! `engine=io_uring` ([`IoEngine::IoUring`], `uring.rs`) reads, writes and
//! flushes are submitted to an io_uring and completed when its eventfd
//! fires, and the rest below (budgets, resumption) concerns the
//! synchronous engine.
//!
//! That thread also serves the API and the orderly stop, so one queue event
//! does a bounded amount of work: at most [`BYTE_BUDGET`] bytes of data
//! plus one bounce-buffer chunk ([`SIZE_MAX`]), and at most
//! [`REQUEST_BUDGET`] requests; with work left the device re-signals its
//! own queue eventfd and yields, and the loop comes back to it after the
//! other ready events. A read or write larger than what is left of the
//! budget stops between two chunks: its chain goes back to the available
//! ring (nothing is written to the used ring) and the next event pops it
//! again and continues where it stopped, if the chain still describes the
//! same request (head, type, sector, length; else it starts over). A
//! snapshot taken meanwhile saves the queue with that request not yet
//! consumed, so a restored VM simply executes it again. The size of a
//! request is bounded too: data descriptors of at most [`SIZE_MAX`] bytes
//! (advertised and enforced), at most [`SEG_MAX`] of them, so at most
//! [`MAX_DATA_LEN`] bytes.
//!
//! Every guest-supplied descriptor chain is validated before any I/O:
//!
//! * A chain that does not end properly (a descriptor loop, a `next` index
//!   outside the table, unreadable descriptor memory, a bad indirect table;
//!   virtio-queue cuts such walks short) is returned with used length 0 and
//!   nothing is written.
//! * The last descriptor must be a device-writable status byte inside guest
//!   memory; otherwise used length 0 and nothing is written.
//! * Everything else is answered in the status byte: more than
//!   [`MAX_DESCRIPTORS`] descriptors, a header that is not exactly 16
//!   device-readable bytes, data descriptors of the wrong direction or
//!   outside guest memory, a data descriptor over [`SIZE_MAX`] bytes, more
//!   than [`MAX_DATA_LEN`] bytes, a read or write
//!   of zero bytes or of a partial sector, a sector range beyond the capacity
//!   (checked arithmetic), writes to a read-only disk: `IOERR`; unknown
//!   request types: `UNSUPP`.
//! * Used length = data bytes written to guest memory + 1 status byte.
//!
//! Guest memory is only accessed through vm-memory, which bounds-checks
//! every access.
//!
//! Offered features: `VERSION_1`, `RING_INDIRECT_DESC`, `RING_EVENT_IDX`,
//! `FLUSH`, `SEG_MAX`, `SIZE_MAX`, `BLK_SIZE`, and either `RO` (read-only
//! disks) or `DISCARD` + `WRITE_ZEROES` (writable ones).

pub mod disk;
mod drain;
mod ephemeral;
mod error;
mod event_handler;
mod lock;
pub mod persist;
mod request;
mod uring;

use std::io;
use std::path::PathBuf;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};

pub use disk::{DiskImage, RawImage};
pub use ephemeral::EphemeralImage;
pub use error::BlockError;
pub use lock::lock_image;
pub use uring::IoEngine;

use super::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::{device_type, VirtioCommon, VirtioDevice};

/// Size of a virtio-blk sector; capacity and request positions use it.
pub const SECTOR_SIZE: u64 = 512;
/// [`SECTOR_SIZE`] as the 32-bit `blk_size` of the configuration space.
const BLK_SIZE: u32 = 512;
const _: () = assert!(BLK_SIZE as u64 == SECTOR_SIZE);
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Maximum data descriptors per request (`seg_max`).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Maximum size of one data descriptor (`size_max`); longer ones fail with
/// `IOERR`. Small enough that the largest request ([`MAX_DATA_LEN`], about
/// 16 MiB) is a short stall of the event loop. A Linux guest takes it as
/// its maximum segment size and builds its requests to fit.
pub const SIZE_MAX: u32 = 64 * 1024;
/// Maximum descriptors per request: header, data, status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Maximum data bytes per request.
pub const MAX_DATA_LEN: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Maximum sectors in one discard / write-zeroes segment.
pub const MAX_ZEROES_SECTORS: u32 = (1 << 30) / BLK_SIZE;
/// Maximum segments in one discard / write-zeroes request.
pub const MAX_ZEROES_SEGMENTS: u32 = 16;
/// Discard granularity hint, in sectors.
const DISCARD_ALIGNMENT: u32 = 8;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bounce buffer size for data transfers: one data descriptor at most.
const BOUNCE_LEN: usize = SIZE_MAX as usize;
/// Requests handled per queue event before yielding to other event-loop
/// work (the device re-signals itself to continue).
pub const REQUEST_BUDGET: usize = 4 * QUEUE_SIZE as usize;
/// Data bytes (read, written, zeroed or discarded) per queue event before
/// yielding: the event loop's latency for the API and the stop is this
/// much disk I/O plus one chunk of a read or write (or one discard /
/// write-zeroes request, which moves no data through the VMM).
pub const BYTE_BUDGET: u64 = 1 << 20;

/// Length of the configuration space we expose (up to
/// `write_zeroes_may_unmap` plus padding).
const CONFIG_LEN: usize = 60;

/// What the device does with the guest's flush requests (a drive's
/// `cache_type`). Either way the device offers `VIRTIO_BLK_F_FLUSH`, and
/// the guest's writes reach the image (the host's page cache) before they
/// complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// A flush completes once the image's data is on stable storage
    /// (`fdatasync`): what the guest was told is durable survives a host
    /// crash or power loss.
    #[default]
    Writeback,
    /// A flush completes at once without reaching the image's storage: the
    /// host's page cache alone holds the guest's recent writes, which a
    /// host crash or power loss can lose (the VMM's own death cannot).
    Unsafe,
}

/// How to back a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image file (or block device).
    pub path: PathBuf,
    /// Expose the disk read-only (opened read-only, shared lock). Takes
    /// precedence over `ephemeral`.
    pub read_only: bool,
    /// Copy-on-write: the image is opened read-only with a shared lock and
    /// the guest's writes go to an anonymous overlay that vanishes on exit.
    pub ephemeral: bool,
    /// Serial number returned by GET_ID (at most 20 bytes).
    pub serial: String,
    /// What a flush does.
    pub cache: CacheMode,
    /// Which engine moves the data.
    pub engine: IoEngine,
}

/// The request queue's index.
const REQUEST_QUEUE: usize = 0;

/// A virtio-blk device: one object that is both the transport's
/// [`VirtioDevice`] and the event loop's subscriber.
pub struct Block {
    common: VirtioCommon,
    disk: Box<dyn DiskImage>,
    capacity: u64,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    buf: Vec<u8>,
    /// [`BYTE_BUDGET`], smaller in tests.
    byte_budget: u64,
    /// A read or write the last event stopped partway: its head index and
    /// how far it got. Cleared on reset and activation.
    resume: Option<(u16, request::Progress)>,
    /// Limits on the guest's requests (`rate_limiter` of a drive).
    limiter: Option<crate::rate_limiter::RateLimiter>,
    /// What a flush does.
    cache: CacheMode,
    /// The io_uring engine, if the disk uses it.
    uring: Option<Box<uring::Uring>>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.capacity)
            .field("read_only", &self.disk.is_read_only())
            .field("cache", &self.cache)
            .field("io_uring", &self.uring.is_some())
            .field("active", &self.common.is_activated())
            .finish()
    }
}

impl Block {
    /// Opens, locks and sizes the image described by `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let id = serial_id(&config.serial)?;
        let uring = config.engine == IoEngine::IoUring;
        if uring && config.ephemeral && !config.read_only {
            return Err(BlockError::UringEphemeral(config.path));
        }
        let disk: Box<dyn DiskImage> = if config.read_only {
            Box::new(RawImage::open(&config.path, true)?)
        } else if config.ephemeral {
            Box::new(EphemeralImage::open(&config.path)?)
        } else {
            Box::new(RawImage::open(&config.path, false)?)
        };
        if !disk.len().is_multiple_of(SECTOR_SIZE) {
            crate::warn_ratelimited!(
                "disk image {}: size {} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible",
                config.path.display(),
                disk.len(),
                disk.len() % SECTOR_SIZE
            );
        }
        let mut block = Self::with_disk(disk, id).map_err(|source| BlockError::EventFd {
            path: config.path.clone(),
            source,
        })?;
        block.cache = config.cache;
        if uring {
            let ring = uring::Uring::new().map_err(|source| BlockError::Uring {
                path: config.path.clone(),
                source,
            })?;
            block.uring = Some(Box::new(ring));
            log::info!("disk image {}: io_uring engine", config.path.display());
        }
        Ok(block)
    }

    /// Creates a device over an already opened backend, with
    /// [`CacheMode::Writeback`] (see [`Self::set_cache_mode`]).
    pub fn with_disk(disk: Box<dyn DiskImage>, id: [u8; ID_BYTES]) -> io::Result<Self> {
        let capacity = disk.len() / SECTOR_SIZE;
        let read_only = disk.is_read_only();
        let mut avail_features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE);
        if read_only {
            avail_features |= bit(VIRTIO_BLK_F_RO);
        } else {
            avail_features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        Ok(Self {
            common: VirtioCommon::new(
                "virtio-blk",
                device_type::BLOCK,
                avail_features,
                &[QUEUE_SIZE],
            )?,
            disk,
            capacity,
            id,
            config: config_space(capacity),
            buf: vec![0; BOUNCE_LEN],
            byte_budget: BYTE_BUDGET,
            resume: None,
            limiter: None,
            cache: CacheMode::Writeback,
            uring: None,
        })
    }

    /// Sets what the guest's flushes do.
    pub fn set_cache_mode(&mut self, cache: CacheMode) {
        self.cache = cache;
    }

    /// What the guest's flushes do.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the guest sees the disk read-only.
    pub fn is_read_only(&self) -> bool {
        self.disk.is_read_only()
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.common.is_activated()
    }

    /// Limits the guest's requests (bytes and operations). Call before
    /// the device joins the event loop, which then watches the limiter's
    /// timer (give one that limits nothing yet if limits may come later,
    /// with [`Self::update_rate_limiter`]).
    pub fn set_rate_limiter(&mut self, limiter: Option<crate::rate_limiter::RateLimiter>) {
        self.limiter = limiter;
    }

    /// New limits while the VM runs (`PATCH /drives/{id}`); false if the
    /// device has no limiter (none was set before it joined the event
    /// loop).
    pub fn update_rate_limiter(
        &mut self,
        bandwidth: Option<crate::rate_limiter::BucketConfig>,
        ops: Option<crate::rate_limiter::BucketConfig>,
    ) -> bool {
        match &mut self.limiter {
            Some(l) => {
                l.update(bandwidth, ops);
                true
            }
            None => false,
        }
    }

    /// Replaces the image under a running guest (`PATCH /drives/{id}` with
    /// a new `path_on_host`: a media change). The new image is opened and
    /// locked like the first (read-only if the disk is); the old one is
    /// closed (its lock released) and the guest is told of the new
    /// capacity with a configuration-change interrupt.
    pub fn replace_image(&mut self, path: &std::path::Path) -> Result<(), BlockError> {
        let read_only = self.disk.is_read_only();
        let disk: Box<dyn DiskImage> = Box::new(RawImage::open(path, read_only)?);
        // In-flight io_uring requests name the old image's descriptor.
        self.quiesce();
        self.capacity = disk.len() / SECTOR_SIZE;
        self.disk = disk;
        self.config = config_space(self.capacity);
        self.common.config_changed(true);
        Ok(())
    }
}

/// The GET_ID answer for `serial`: its bytes, zero padded.
fn serial_id(serial: &str) -> Result<[u8; ID_BYTES], BlockError> {
    let bytes = serial.as_bytes();
    if bytes.len() > ID_BYTES {
        return Err(BlockError::SerialTooLong {
            serial: serial.to_string(),
        });
    }
    let mut id = [0u8; ID_BYTES];
    id[..bytes.len()].copy_from_slice(bytes);
    Ok(id)
}

/// The little-endian `virtio_blk_config` for a disk of `capacity` sectors.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &BLK_SIZE.to_le_bytes()); // blk_size
    put(36, &MAX_ZEROES_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_ZEROES_SEGMENTS.to_le_bytes()); // max_discard_seg
    put(44, &DISCARD_ALIGNMENT.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_ZEROES_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_ZEROES_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

/// Nothing in the configuration space is writable (no `CONFIG_WCE`): the
/// default `write_config`.
impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    /// A fresh queue: no request of the old one is continued.
    fn activated(&mut self) {
        self.resume = None;
    }

    /// In-flight io_uring requests finish first: they write guest
    /// memory, which the driver owns again once the reset is done.
    fn reset(&mut self) -> bool {
        self.finish_in_flight(false);
        self.common.reset();
        self.reset_device()
    }

    fn reset_device(&mut self) -> bool {
        self.resume = None;
        true
    }
}

#[cfg(test)]
mod tests;
