//! virtio-rng (entropy device, virtio type 4): the guest's `hw_random`
//! driver hands over device-writable buffers and gets them back filled
//! with random bytes from the host's `getrandom(2)` (the kernel's CSPRNG,
//! never blocking once it is seeded).
//!
//! One request queue. A guest chooses the buffer sizes, so the work per
//! event loop round is bounded ([`BYTES_PER_EVENT`]); the rest of the
//! queue is taken up again in the next round (the queue is re-kicked).
//! A read-only descriptor in a chain is skipped (the driver only writes);
//! a buffer outside guest memory ends its chain with what was written.

use std::io;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::features::{bit, VIRTIO_F_VERSION_1};
use super::{DeviceEvent, VirtioCommon, VirtioDevice};
use crate::metrics::ENTROPY;
use crate::rate_limiter::RateLimiter;

/// The virtio device type of an entropy source.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most random bytes given in one event-loop round.
pub const BYTES_PER_EVENT: usize = 1 << 20;
/// Most random bytes written into one chain (Linux asks for at most a
/// page or so at a time).
const BYTES_PER_CHAIN: usize = 64 << 10;

const REQUEST_QUEUE: usize = 0;
/// Event tag of the rate limiter's timer.
const LIMITER_TAG: u32 = 1;

/// Fills `buf` from the host's `getrandom(2)`.
fn host_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // byte slice; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// The entropy device.
pub struct Rng {
    common: VirtioCommon,
    buf: Vec<u8>,
    limiter: Option<RateLimiter>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            common: VirtioCommon::new(
                "virtio-rng",
                DEVICE_TYPE,
                bit(VIRTIO_F_VERSION_1),
                &[QUEUE_SIZE],
            )?,
            buf: vec![0u8; BYTES_PER_CHAIN],
            limiter: None,
        })
    }

    /// The device with its bytes and requests limited by `limiter`.
    pub fn with_limiter(limiter: RateLimiter) -> io::Result<Self> {
        let mut rng = Self::new()?;
        rng.limiter = Some(limiter).filter(RateLimiter::is_limiting);
        Ok(rng)
    }

    /// Fills and returns the available chains, up to [`BYTES_PER_EVENT`].
    fn process_queue(&mut self) {
        let Self {
            common,
            buf,
            limiter,
        } = self;
        let Some(active) = common.activation_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut given = 0usize;
        let mut returned = 0u32;
        let mut more = false;
        while let Some(chain) = active.queues[REQUEST_QUEUE].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            if let Some(l) = limiter.as_mut() {
                if !l.consume(writable_len(chain.clone()) as u64) {
                    // Left for when the limiter's timer fires.
                    active.queues[REQUEST_QUEUE].go_to_previous_position();
                    ENTROPY.entropy_rate_limiter_throttled.inc();
                    break;
                }
            }
            let written = fill_chain(&mem, chain, buf);
            given += written;
            if let Err(e) = active.queues[REQUEST_QUEUE].add_used(
                &mem,
                head,
                u32::try_from(written).unwrap_or(u32::MAX),
            ) {
                crate::warn_ratelimited!("virtio-rng: cannot return descriptor {head}: {e}");
            }
            returned += 1;
            if given >= BYTES_PER_EVENT {
                more = true;
                break;
            }
        }
        if returned > 0 {
            active.signal_used_queue(REQUEST_QUEUE);
        }
        ENTROPY.entropy_bytes.add(given as u64);
        if more {
            common.kick(REQUEST_QUEUE);
        }
    }
}

/// The bytes [`fill_chain`] would write into `chain`.
fn writable_len(chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> usize {
    chain
        .filter(|d| d.is_write_only())
        .map(|d| d.len() as usize)
        .fold(0usize, |a, b| a.saturating_add(b))
        .min(BYTES_PER_CHAIN)
}

/// Writes random bytes into the device-writable buffers of `chain` (at
/// most [`BYTES_PER_CHAIN`]); returns how many.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> usize {
    let mut written = 0usize;
    for d in chain {
        if !d.is_write_only() {
            continue;
        }
        let want = (d.len() as usize).min(BYTES_PER_CHAIN - written);
        if want == 0 {
            break;
        }
        let part = &mut buf[..want];
        if let Err(e) = host_random(part) {
            ENTROPY.host_rng_fails.inc();
            crate::warn_ratelimited!("virtio-rng: getrandom failed: {e}");
            break;
        }
        if let Err(e) = mem.write_slice(part, d.addr()) {
            crate::debug_ratelimited!("virtio-rng: buffer outside guest memory: {e}");
            break;
        }
        written += want;
    }
    written
}

impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        if let Some(l) = &self.limiter {
            let what = "the rate limiter's timer";
            VirtioCommon::watch_input(ops, l.timer_fd(), LIMITER_TAG, "virtio-rng", what);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.common.event(&events, ops) {
            DeviceEvent::Queue(REQUEST_QUEUE) => {
                ENTROPY.entropy_event_count.inc();
                // A blocked device waits for its timer, not for kicks.
                if !self.limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
                    self.process_queue();
                }
            }
            DeviceEvent::Device {
                tag: LIMITER_TAG, ..
            } => {
                if let Some(l) = &mut self.limiter {
                    l.timer_fired();
                }
                self.process_queue();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
