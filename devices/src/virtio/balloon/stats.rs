//! The guest's memory statistics (`VIRTIO_BALLOON_F_STATS_VQ`): the driver
//! fills a buffer of `{le16 tag; le64 value}` entries (10 bytes each,
//! packed) and gives it to the device, which keeps it until it wants
//! fresher numbers; returning it asks the driver for them.

use serde::Serialize;
use vm_memory::Bytes;

use super::BalloonError;
use crate::GuestMemoryMmap;

/// Bytes of one statistics entry.
pub const ENTRY_BYTES: usize = 10;
/// Most entries read from one buffer (virtio defines 16 tags).
pub const MAX_ENTRIES: usize = 64;

/// The guest's last reported statistics, named as in Firecracker's
/// `BalloonStats` (only the tags the guest sent are present).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GuestStats {
    /// Bytes swapped in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Unused memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Memory available for new programs without swapping, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Allocation stalls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    /// Memory scanned asynchronously.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Memory scanned directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Memory reclaimed asynchronously.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Memory reclaimed directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl GuestStats {
    /// Records one entry; unknown tags are ignored (a newer driver).
    pub fn set(&mut self, tag: u16, value: u64) {
        let field = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kill,
            11 => &mut self.alloc_stall,
            12 => &mut self.async_scan,
            13 => &mut self.direct_scan,
            14 => &mut self.async_reclaim,
            15 => &mut self.direct_reclaim,
            _ => return,
        };
        *field = Some(value);
    }
}

/// Reads the statistics in the device-readable buffers of `chain`, at
/// most [`MAX_ENTRIES`]. A device-writable buffer, a partial entry or
/// unreadable memory is an error, after the entries read before it.
pub fn read_stats(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> (GuestStats, Option<BalloonError>) {
    let mut stats = GuestStats::default();
    let mut seen = 0usize;
    for d in chain {
        if d.is_write_only() {
            return (stats, Some(BalloonError::WriteOnly));
        }
        let len = d.len() as usize;
        if !len.is_multiple_of(ENTRY_BYTES) {
            return (stats, Some(BalloonError::Length(d.len())));
        }
        let count = len / ENTRY_BYTES;
        if seen + count > MAX_ENTRIES {
            return (stats, Some(BalloonError::TooLong));
        }
        let mut buf = vec![0u8; len];
        if let Err(e) = mem.read_slice(&mut buf, d.addr()) {
            return (stats, Some(BalloonError::Memory(e)));
        }
        for e in buf.chunks_exact(ENTRY_BYTES) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            stats.set(tag, u64::from_le_bytes(v));
        }
        seen += count;
    }
    (stats, None)
}
