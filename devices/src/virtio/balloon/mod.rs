//! virtio-balloon (virtio type 5): memory the guest gives back.
//!
//! * **Inflate / deflate** (queues 0 and 1): the host sets a target
//!   (`num_pages` in the configuration space, 4 KiB pages); the driver
//!   takes that many pages from its allocator and sends their page-frame
//!   numbers on the inflate queue, and the device releases them to the
//!   host ([`release::release`]: `MADV_DONTNEED`, or a hole punched in
//!   shared RAM's file). A lower target makes the driver send pages back
//!   on the deflate queue and use them again (no `MUST_TELL_HOST`: the
//!   host has nothing to do, a page is faulted in when touched). The
//!   driver writes how many pages it holds to `actual`.
//! * **Statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): the driver hands over
//!   one buffer of statistics; the device keeps it and returns it every
//!   polling interval, which asks the driver to refill it.
//! * **Deflate on OOM** (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`): the guest may
//!   take pages back from the balloon when it runs out of memory.
//! * **Free page reporting** (`VIRTIO_BALLOON_F_FREE_PAGE_REPORTING`): the
//!   guest reports ranges of free memory (Linux: 2 MiB or larger, some
//!   seconds after they became free); each is released to the host and
//!   its buffer returned.
//!
//! Queues are numbered as Linux's driver sets them up: inflate, deflate,
//! then statistics and reporting only if offered (the driver skips the
//! queues of features that are not there, and the later ones move up).
//!
//! Everything the guest sends is checked: a page-frame number or range
//! outside guest RAM, a buffer of the wrong direction or size is a
//! [`BalloonError`], logged (rate-limited) and counted; its buffer is
//! returned and nothing outside guest RAM is touched.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vmm_sys_util::timerfd::TimerFd;

use super::features::{bit, VIRTIO_F_VERSION_1};
use super::{DeviceEvent, VirtioCommon, VirtioDevice};
use crate::metrics::BALLOON;

pub mod release;
pub mod stats;

pub use stats::GuestStats;

/// The virtio device type of a memory balloon.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// Size of each queue (Linux needs 32 or more for page reporting).
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size is 4 KiB whatever the guest's (virtio 1.2 §5.5).
pub const PAGE_SHIFT: u32 = 12;
/// Bytes of a balloon page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Balloon pages in a MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;

/// Feature bit numbers (virtio 1.2 §5.5.3).
pub mod feature {
    /// The host must be told before a deflated page is used (not offered).
    pub const MUST_TELL_HOST: u32 = 0;
    /// The statistics queue.
    pub const STATS_VQ: u32 = 1;
    /// The guest may deflate when it is out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting (not offered).
    pub const FREE_PAGE_HINT: u32 = 3;
    /// The page poison value (not offered).
    pub const PAGE_POISON: u32 = 4;
    /// The free page reporting queue.
    pub const FREE_PAGE_REPORTING: u32 = 5;
}

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
/// Event tag of the statistics timer.
const STATS_TIMER_TAG: u32 = 1;

/// What the guest did wrong (or what failed) in one balloon request.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Pages outside guest RAM.
    #[error("pages {addr:#x}+{len:#x} are outside guest memory")]
    OutsideMemory {
        /// Guest physical address.
        addr: u64,
        /// Bytes.
        len: u64,
    },
    /// A range that is not whole 4 KiB pages.
    #[error("range {addr:#x}+{len:#x} is not whole 4 KiB pages")]
    Unaligned {
        /// Guest physical address.
        addr: u64,
        /// Bytes.
        len: u64,
    },
    /// A device-writable buffer where the device only reads.
    #[error("a device-writable buffer where the driver must give a readable one")]
    WriteOnly,
    /// A buffer that is not a whole number of entries.
    #[error("a buffer of {0} bytes is not a whole number of entries")]
    Length(u32),
    /// More entries in one chain than a driver ever sends.
    #[error("too many entries in one chain")]
    TooLong,
    /// A buffer that cannot be read.
    #[error("cannot read a buffer: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The host refused to release pages.
    #[error("cannot release guest pages: {0}")]
    Release(#[source] io::Error),
    /// Statistics asked of a balloon that was created without them.
    #[error(
        "statistics are not enabled on the balloon device (stats_polling_interval_s was 0 at boot)"
    )]
    StatsDisabled,
    /// Statistics switched off on a running balloon that has them.
    #[error("statistics cannot be turned off once the balloon device exists")]
    StatsCannotStop,
}

/// How the balloon is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonConfig {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Offer `DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0: no statistics queue.
    pub stats_interval_s: u16,
    /// Offer `FREE_PAGE_REPORTING`.
    pub free_page_reporting: bool,
}

/// What the device did, for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Pages the guest put in the balloon (inflate).
    pub inflated_pages: u64,
    /// Pages the guest took back (deflate).
    pub deflated_pages: u64,
    /// Free ranges the guest reported.
    pub reported_ranges: u64,
    /// Bytes given back to the host (inflate and reports).
    pub released_bytes: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Bad requests (each logged).
    pub errors: u64,
}

/// The balloon device.
pub struct Balloon {
    common: VirtioCommon,
    config: BalloonConfig,
    /// `num_pages` and `actual`, little endian, as the driver reads them.
    space: [u8; 8],
    stats_timer: TimerFd,
    /// The statistics buffer the device holds (its head descriptor).
    stats_head: Option<u16>,
    stats: GuestStats,
    counters: Counters,
}

/// Gives descriptor chain `head` back to the driver, nothing written in
/// it (the balloon's queues only carry requests to the device).
fn give_back(queue: &mut virtio_queue::Queue, mem: &crate::GuestMemoryMmap, head: u16) {
    if let Err(e) = queue.add_used(mem, head, 0) {
        crate::warn_ratelimited!("virtio-balloon: cannot return descriptor {head}: {e}");
    }
}

impl Balloon {
    /// A balloon with `config`'s target and features.
    pub fn new(config: BalloonConfig) -> io::Result<Self> {
        let mut features = bit(VIRTIO_F_VERSION_1);
        let mut queues = vec![QUEUE_SIZE, QUEUE_SIZE];
        if config.stats_interval_s > 0 {
            features |= bit(feature::STATS_VQ);
            queues.push(QUEUE_SIZE);
        }
        if config.deflate_on_oom {
            features |= bit(feature::DEFLATE_ON_OOM);
        }
        if config.free_page_reporting {
            features |= bit(feature::FREE_PAGE_REPORTING);
            queues.push(QUEUE_SIZE);
        }
        let stats_timer = TimerFd::new().map_err(io::Error::from)?;
        // Non-blocking: a read after the timer was re-armed finds nothing.
        // SAFETY: fcntl on a descriptor this function owns.
        if unsafe { libc::fcntl(stats_timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut balloon = Self {
            common: VirtioCommon::new("virtio-balloon", DEVICE_TYPE, features, &queues)?,
            config,
            space: [0; 8],
            stats_timer,
            stats_head: None,
            stats: GuestStats::default(),
            counters: Counters::default(),
        };
        balloon.write_target();
        Ok(balloon)
    }

    /// The configuration, with the current target.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// Sets the target size; the driver is told at once (a configuration
    /// change interrupt) if it runs.
    pub fn set_target_mib(&mut self, amount_mib: u32) {
        self.config.amount_mib = amount_mib;
        self.write_target();
        self.common.config_changed(true);
        log::info!("balloon: target {amount_mib} MiB");
    }

    fn write_target(&mut self) {
        let pages = u64::from(self.config.amount_mib) * PAGES_PER_MIB;
        let pages = u32::try_from(pages).unwrap_or(u32::MAX);
        self.space[..4].copy_from_slice(&pages.to_le_bytes());
    }

    /// The target in balloon pages.
    pub fn target_pages(&self) -> u32 {
        u32::from_le_bytes([self.space[0], self.space[1], self.space[2], self.space[3]])
    }

    /// The pages the driver says it holds (`actual`).
    pub fn actual_pages(&self) -> u32 {
        u32::from_le_bytes([self.space[4], self.space[5], self.space[6], self.space[7]])
    }

    /// What the device did so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The guest's last statistics; `None` if the balloon has none.
    pub fn stats(&self) -> Option<GuestStats> {
        (self.config.stats_interval_s > 0).then_some(self.stats)
    }

    /// A new statistics interval (seconds), with an update asked for at
    /// once. Statistics cannot be turned on or off on a device: only a
    /// balloon created with an interval takes a new non-zero one.
    pub fn set_stats_interval(&mut self, seconds: u16) -> Result<(), BalloonError> {
        match (self.config.stats_interval_s, seconds) {
            (0, _) => Err(BalloonError::StatsDisabled),
            (_, 0) => Err(BalloonError::StatsCannotStop),
            _ => {
                self.config.stats_interval_s = seconds;
                self.arm_stats_timer();
                self.request_stats();
                Ok(())
            }
        }
    }

    fn stats_queue(&self) -> Option<usize> {
        (self.config.stats_interval_s > 0).then_some(2)
    }

    fn reporting_queue(&self) -> Option<usize> {
        self.config
            .free_page_reporting
            .then(|| 2 + usize::from(self.config.stats_interval_s > 0))
    }

    fn arm_stats_timer(&mut self) {
        if self.config.stats_interval_s == 0 || !self.common.is_activated() {
            return;
        }
        let every = Duration::from_secs(u64::from(self.config.stats_interval_s));
        if let Err(e) = self.stats_timer.reset(every, Some(every)) {
            log::error!("virtio-balloon: cannot arm the statistics timer: {e}");
        }
    }

    fn error(&mut self, what: &str, e: &BalloonError) {
        self.counters.errors += 1;
        crate::warn_ratelimited!("virtio-balloon: bad {what} request: {e}");
    }

    /// Takes the inflate or deflate queue's page lists; inflated pages
    /// are released to the host.
    fn process_pfns(&mut self, index: usize) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut errors = Vec::new();
        let mut returned = false;
        while let Some(chain) = active.queues[index].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let (pfns, bad) = release::read_pfns(&mem, chain);
            errors.extend(bad);
            let pages = pfns.len() as u64;
            for range in release::pfn_ranges(pfns) {
                let done = if index == INFLATE {
                    release::release(&mem, range)
                } else {
                    release::check(&mem, range)
                };
                match done {
                    Ok(()) if index == INFLATE => self.counters.released_bytes += range.len,
                    Ok(()) => {}
                    Err(e) => errors.push(e),
                }
            }
            if index == INFLATE {
                self.counters.inflated_pages += pages;
                BALLOON.inflate_count.inc();
            } else {
                self.counters.deflated_pages += pages;
                BALLOON.deflate_count.inc();
            }
            give_back(&mut active.queues[index], &mem, head);
            returned = true;
        }
        if returned {
            active.signal_used_queue(index);
        }
        let what = if index == INFLATE {
            "inflate"
        } else {
            "deflate"
        };
        BALLOON.event_fails.add(errors.len() as u64);
        errors.iter().for_each(|e| self.error(what, e));
    }

    /// Takes the statistics buffer the driver filled and keeps it until
    /// the next update (one that came while another was held returns the
    /// older one).
    fn process_stats(&mut self, index: usize) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut errors = Vec::new();
        let mut returned = false;
        while let Some(chain) = active.queues[index].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let (stats, bad) = stats::read_stats(&mem, chain);
            errors.extend(bad);
            self.stats = stats;
            self.counters.stats_updates += 1;
            BALLOON.stats_updates_count.inc();
            if let Some(old) = self.stats_head.replace(head) {
                give_back(&mut active.queues[index], &mem, old);
                returned = true;
            }
        }
        if returned {
            active.signal_used_queue(index);
        }
        BALLOON.stats_update_fails.add(errors.len() as u64);
        errors.iter().for_each(|e| self.error("statistics", e));
    }

    /// Returns the statistics buffer, which asks the driver for new ones.
    fn request_stats(&mut self) {
        let Some(index) = self.stats_queue() else {
            return;
        };
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let Some(head) = self.stats_head.take() else {
            return;
        };
        give_back(&mut active.queues[index], &active.mem, head);
        active.signal_used_queue(index);
    }

    /// Releases every range the guest reported free and returns its
    /// buffers.
    fn process_reports(&mut self, index: usize) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut errors = Vec::new();
        let mut returned = false;
        while let Some(chain) = active.queues[index].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            for d in chain {
                let range = release::PageRange {
                    addr: d.addr().0,
                    len: u64::from(d.len()),
                };
                self.counters.reported_ranges += 1;
                BALLOON.free_page_report_count.inc();
                match release::release(&mem, range) {
                    Ok(()) => {
                        self.counters.released_bytes += range.len;
                        BALLOON.free_page_report_freed.add(range.len);
                    }
                    Err(e) => errors.push(e),
                }
            }
            give_back(&mut active.queues[index], &mem, head);
            returned = true;
        }
        if returned {
            active.signal_used_queue(index);
        }
        BALLOON.free_page_report_fails.add(errors.len() as u64);
        errors
            .iter()
            .for_each(|e| self.error("free page report", e));
    }

    fn queue_event(&mut self, index: usize) {
        match index {
            INFLATE | DEFLATE => self.process_pfns(index),
            i if Some(i) == self.stats_queue() => self.process_stats(i),
            i if Some(i) == self.reporting_queue() => self.process_reports(i),
            _ => {}
        }
    }
}

impl VirtioDevice for Balloon {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn config_space(&self) -> &[u8] {
        &self.space
    }

    /// Only `actual` (bytes 4 to 7) is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let writable = 4..8u64;
        let end = offset.checked_add(data.len() as u64);
        if !writable.contains(&offset) || end.is_none_or(|e| e > writable.end) {
            crate::debug_ratelimited!("virtio-balloon: config write at {offset:#x} ignored");
            return;
        }
        let at = crate::usize_from(offset);
        self.space[at..at + data.len()].copy_from_slice(data);
    }

    /// (The statistics timer is left running: with no activation or no
    /// buffer held, its ticks do nothing, and the next activation re-arms
    /// it. The vCPU thread that resets the device may not touch timers.)
    fn reset_device(&mut self) -> bool {
        self.stats_head = None;
        self.space[4..].fill(0);
        true
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        if self.config.stats_interval_s > 0 {
            let fd = self.stats_timer.as_raw_fd();
            let what = "the statistics timer";
            VirtioCommon::watch_input(ops, fd, STATS_TIMER_TAG, "virtio-balloon", what);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.common.event(&events, ops) {
            // Armed on the event-loop thread (activation itself runs on a
            // vCPU thread, whose seccomp filter has no timer calls).
            DeviceEvent::Activated => self.arm_stats_timer(),
            DeviceEvent::Queue(index) => self.queue_event(index),
            DeviceEvent::Device {
                tag: STATS_TIMER_TAG,
                ..
            } => {
                let _ = self.stats_timer.wait();
                self.request_stats();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
