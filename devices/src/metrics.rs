//! Counters that devices keep for the VMM's metrics (`PUT /metrics`,
//! Firecracker's metrics JSON lines). They are process-wide and summed over
//! all devices of a kind, as Firecracker's aggregate `block` and `net`
//! groups are; each is one relaxed atomic add where it is counted.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// virtio-blk counters (Firecracker's `block` group).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Bytes read from disks for the guest.
    pub read_bytes: Counter,
    /// Bytes the guest wrote to disks.
    pub write_bytes: Counter,
    /// Read requests completed.
    pub read_count: Counter,
    /// Write requests completed.
    pub write_count: Counter,
    /// Flush requests completed.
    pub flush_count: Counter,
    /// Malformed or unsupported requests.
    pub invalid_reqs_count: Counter,
    /// Requests that failed with an I/O error.
    pub execute_fails: Counter,
    /// Queue notifications handled.
    pub queue_event_count: Counter,
    /// Times a rate limiter held requests back.
    pub rate_limiter_throttled_events: Counter,
}

/// virtio-net counters (Firecracker's `net` group).
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Bytes delivered to the guest.
    pub rx_bytes_count: Counter,
    /// Frames delivered to the guest.
    pub rx_packets_count: Counter,
    /// Bytes the guest sent.
    pub tx_bytes_count: Counter,
    /// Frames the guest sent.
    pub tx_packets_count: Counter,
    /// Reads from the backend (TAP, passt) that failed.
    pub tap_read_fails: Counter,
    /// Writes to the backend that failed.
    pub tap_write_fails: Counter,
    /// Frames the guest sent that were malformed (dropped).
    pub tx_malformed_frames: Counter,
    /// Receive-queue notifications handled.
    pub rx_queue_event_count: Counter,
    /// Transmit-queue notifications handled.
    pub tx_queue_event_count: Counter,
    /// Times a receive rate limiter held frames back.
    pub rx_rate_limiter_throttled: Counter,
    /// Times a transmit rate limiter held frames back.
    pub tx_rate_limiter_throttled: Counter,
}

/// virtio-rng counters (Firecracker's `entropy` group).
#[derive(Debug, Default)]
pub struct EntropyMetrics {
    /// Requests (queue notifications) handled.
    pub entropy_event_count: Counter,
    /// Random bytes given to the guest.
    pub entropy_bytes: Counter,
    /// `getrandom` failures.
    pub host_rng_fails: Counter,
    /// Times the rate limiter held requests back.
    pub entropy_rate_limiter_throttled: Counter,
}

/// virtio-balloon counters (Firecracker's `balloon` group).
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Inflate requests (page lists) handled.
    pub inflate_count: Counter,
    /// Deflate requests handled.
    pub deflate_count: Counter,
    /// Statistics buffers received from the guest.
    pub stats_updates_count: Counter,
    /// Statistics buffers that were malformed.
    pub stats_update_fails: Counter,
    /// Inflate or deflate requests that were malformed (in part).
    pub event_fails: Counter,
    /// Free ranges the guest reported.
    pub free_page_report_count: Counter,
    /// Bytes those reports gave back to the host.
    pub free_page_report_freed: Counter,
    /// Reported ranges refused (outside RAM, unaligned) or not released.
    pub free_page_report_fails: Counter,
}

/// The balloon device.
pub static BALLOON: BalloonMetrics = BalloonMetrics {
    inflate_count: Counter::new(),
    deflate_count: Counter::new(),
    stats_updates_count: Counter::new(),
    stats_update_fails: Counter::new(),
    event_fails: Counter::new(),
    free_page_report_count: Counter::new(),
    free_page_report_freed: Counter::new(),
    free_page_report_fails: Counter::new(),
};

/// All block devices.
pub static BLOCK: BlockMetrics = BlockMetrics {
    read_bytes: Counter::new(),
    write_bytes: Counter::new(),
    read_count: Counter::new(),
    write_count: Counter::new(),
    flush_count: Counter::new(),
    invalid_reqs_count: Counter::new(),
    execute_fails: Counter::new(),
    queue_event_count: Counter::new(),
    rate_limiter_throttled_events: Counter::new(),
};

/// All network devices.
pub static NET: NetMetrics = NetMetrics {
    rx_bytes_count: Counter::new(),
    rx_packets_count: Counter::new(),
    tx_bytes_count: Counter::new(),
    tx_packets_count: Counter::new(),
    tap_read_fails: Counter::new(),
    tap_write_fails: Counter::new(),
    tx_malformed_frames: Counter::new(),
    rx_queue_event_count: Counter::new(),
    tx_queue_event_count: Counter::new(),
    rx_rate_limiter_throttled: Counter::new(),
    tx_rate_limiter_throttled: Counter::new(),
};

/// The entropy device.
pub static ENTROPY: EntropyMetrics = EntropyMetrics {
    entropy_event_count: Counter::new(),
    entropy_bytes: Counter::new(),
    host_rng_fails: Counter::new(),
    entropy_rate_limiter_throttled: Counter::new(),
};

/// vCPU exits, by kind (Firecracker's `vcpu` group).
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// Port I/O reads.
    pub exit_io_in: Counter,
    /// Port I/O writes.
    pub exit_io_out: Counter,
    /// MMIO reads.
    pub exit_mmio_read: Counter,
    /// MMIO writes.
    pub exit_mmio_write: Counter,
    /// Exits that stopped the VM with an error (entry failure, internal
    /// error, unexpected exit, KVM_RUN failure).
    pub failures: Counter,
}

/// All vCPUs.
pub static VCPU: VcpuMetrics = VcpuMetrics {
    exit_io_in: Counter::new(),
    exit_io_out: Counter::new(),
    exit_mmio_read: Counter::new(),
    exit_mmio_write: Counter::new(),
    failures: Counter::new(),
};

/// Serial console counters (Firecracker's `uart` group).
#[derive(Debug, Default)]
pub struct UartMetrics {
    /// Bytes the guest wrote to the UART's transmit register.
    pub write_count: Counter,
    /// Of those, bytes lost (the output could not take them).
    pub missed_write_count: Counter,
}

/// The serial console (COM1).
pub static UART: UartMetrics = UartMetrics {
    write_count: Counter::new(),
    missed_write_count: Counter::new(),
};
