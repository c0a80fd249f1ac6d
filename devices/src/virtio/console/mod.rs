//! virtio-console with a single port and no optional features (virtio 1.2
//! §5.3): the guest sees one console, `/dev/hvc0`.
//!
//! Two queues: `receiveq` (0, device → driver) and `transmitq` (1, driver
//! → device). The device is a byte pipe:
//!
//! * Output: bytes the guest transmits are written, in order, to the
//!   [`ConsoleOut`] given at creation, on the event-loop thread.
//! * Input: the host queues bytes with [`Console::queue_input`]; they go
//!   into the receive buffers the driver posts, as those become available.
//!   The host should stop queueing once [`Console::pending_input`] reaches
//!   [`INPUT_HIGH_WATER`]; [`Console::input_ready_evt`] fires when the
//!   pending bytes have dropped below [`INPUT_LOW_WATER`] again.
//!
//! Guest-supplied descriptors are never trusted:
//!
//! * Guest memory is only accessed through vm-memory's checked accessors;
//!   a descriptor outside guest memory ends its chain (nothing more is read
//!   or written for it).
//! * Transmit chains must be device-readable; a chain with a device-writable
//!   descriptor is dropped from that descriptor on. At most
//!   [`MAX_TX_CHAIN`] bytes are taken from one chain (more is dropped with a
//!   warning), so a few huge descriptors cannot flood the host.
//! * Device-readable descriptors in a receive chain are skipped. Input
//!   bytes are consumed only once written to guest memory.
//! * Each queue event handles at most [`CHAIN_BUDGET`] chains before
//!   yielding to the rest of the event loop.

use std::collections::VecDeque;
use std::io::{self, Write};

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::features::{bit, VIRTIO_F_VERSION_1};
use super::{device_type, DeviceEvent, VirtioCommon, VirtioDevice};

/// Index of the receive queue (host → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest → host).
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes taken from one transmit chain.
pub const MAX_TX_CHAIN: usize = 1 << 20;
/// Chains handled per queue event before yielding.
pub const CHAIN_BUDGET: usize = 4 * QUEUE_SIZE as usize;
/// Pending input at which the host should stop queueing more.
pub const INPUT_HIGH_WATER: usize = 1 << 20;
/// Pending input below which [`Console::input_ready_evt`] fires.
pub const INPUT_LOW_WATER: usize = 256 << 10;
/// Bounce buffer for transmitted data.
const BOUNCE_LEN: usize = 64 * 1024;

/// Where transmitted bytes go.
pub type ConsoleOut = Box<dyn Write + Send>;

/// A single-port virtio-console: one object that is both the transport's
/// [`VirtioDevice`] and the event loop's subscriber.
pub struct Console {
    common: VirtioCommon,
    out: ConsoleOut,
    out_failed: bool,
    input: VecDeque<u8>,
    input_ready: EventFd,
    input_waiting: bool,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending_input", &self.input.len())
            .field("active", &self.common.is_activated())
            .finish()
    }
}

impl Console {
    /// A console whose output goes to `out`.
    pub fn new(out: ConsoleOut) -> io::Result<Self> {
        Ok(Self {
            common: VirtioCommon::new(
                "virtio-console",
                device_type::CONSOLE,
                bit(VIRTIO_F_VERSION_1),
                &[QUEUE_SIZE, QUEUE_SIZE],
            )?,
            out,
            out_failed: false,
            input: VecDeque::new(),
            input_ready: crate::eventfd()?,
            input_waiting: false,
            buf: vec![0; BOUNCE_LEN],
        })
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.common.is_activated()
    }

    /// Input bytes not yet delivered to the guest.
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    /// The eventfd that fires when pending input drops below
    /// [`INPUT_LOW_WATER`] after having reached [`INPUT_HIGH_WATER`].
    pub fn input_ready_evt(&self) -> &EventFd {
        &self.input_ready
    }

    /// Queues bytes for the guest and delivers what fits now.
    pub fn queue_input(&mut self, data: &[u8]) {
        self.input.extend(data);
        if self.input.len() >= INPUT_HIGH_WATER {
            self.input_waiting = true;
        }
        self.process_rx();
    }

    /// Moves pending input into the receive buffers the driver posted.
    fn process_rx(&mut self) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mem = &active.mem;
        let rx = &mut active.queues[RX_QUEUE];
        let mut used = 0usize;
        while !self.input.is_empty() && used < CHAIN_BUDGET {
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = fill_rx_chain(mem, chain, &mut self.input);
            used += 1;
            if let Err(e) = rx.add_used(mem, head, len) {
                crate::warn_ratelimited!(
                    "virtio-console: cannot return receive buffer {head}: {e}"
                );
            }
        }
        if used > 0 {
            active.signal_used_queue(RX_QUEUE);
        }
        if !self.input.is_empty() && used >= CHAIN_BUDGET {
            self.common.kick(RX_QUEUE);
        }
        if self.input_waiting && self.input.len() < INPUT_LOW_WATER {
            self.input_waiting = false;
            if let Err(e) = self.input_ready.write(1) {
                crate::error_ratelimited!("virtio-console: cannot signal input room: {e}");
            }
        }
    }

    /// Drains the transmit queue into the output.
    fn process_tx(&mut self) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mem = &active.mem;
        let tx = &mut active.queues[TX_QUEUE];
        let mut used = 0usize;
        while used < CHAIN_BUDGET {
            let Some(chain) = tx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            drain_tx_chain(
                mem,
                chain,
                &mut self.buf,
                &mut self.out,
                &mut self.out_failed,
            );
            used += 1;
            // The device writes nothing into transmit buffers.
            if let Err(e) = tx.add_used(mem, head, 0) {
                crate::warn_ratelimited!(
                    "virtio-console: cannot return transmit buffer {head}: {e}"
                );
            }
        }
        if used > 0 {
            if let Err(e) = self.out.flush() {
                if !self.out_failed {
                    crate::warn_ratelimited!("virtio-console: output failed: {e}");
                    self.out_failed = true;
                }
            }
            active.signal_used_queue(TX_QUEUE);
        }
        if used >= CHAIN_BUDGET {
            self.common.kick(TX_QUEUE);
        }
    }
}

/// Writes pending input into one receive chain; returns the bytes written.
fn fill_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    input: &mut VecDeque<u8>,
) -> u32 {
    let mut written: u32 = 0;
    for desc in chain {
        if input.is_empty() {
            break;
        }
        if !desc.is_write_only() {
            crate::debug_ratelimited!(
                "virtio-console: skipping a device-readable receive descriptor"
            );
            continue;
        }
        let mut room = desc.len() as usize;
        let mut addr = desc.addr();
        while room > 0 && !input.is_empty() {
            let (front, _) = input.as_slices();
            let n = front.len().min(room);
            if mem.write_slice(&front[..n], addr).is_err() {
                crate::warn_ratelimited!(
                    "virtio-console: receive buffer at {:#x} is outside guest memory",
                    addr.0
                );
                return written;
            }
            input.drain(..n);
            room -= n;
            written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
            match addr.0.checked_add(n as u64) {
                Some(a) => addr = GuestAddress(a),
                None => return written,
            }
        }
    }
    written
}

/// Copies one transmit chain to `out`.
fn drain_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
    out: &mut ConsoleOut,
    out_failed: &mut bool,
) {
    let mut taken = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            crate::warn_ratelimited!("virtio-console: device-writable descriptor in a transmit chain; rest of the chain dropped");
            return;
        }
        let mut left = desc.len() as usize;
        let mut addr = desc.addr();
        while left > 0 {
            if taken >= MAX_TX_CHAIN {
                crate::warn_ratelimited!(
                    "virtio-console: transmit chain longer than {MAX_TX_CHAIN} bytes; rest dropped"
                );
                return;
            }
            let n = left.min(buf.len()).min(MAX_TX_CHAIN - taken);
            if mem.read_slice(&mut buf[..n], addr).is_err() {
                crate::warn_ratelimited!(
                    "virtio-console: transmit buffer at {:#x} is outside guest memory",
                    addr.0
                );
                return;
            }
            if !*out_failed {
                if let Err(e) = out.write_all(&buf[..n]) {
                    crate::warn_ratelimited!("virtio-console: output failed: {e}");
                    *out_failed = true;
                }
            }
            left -= n;
            taken += n;
            match addr.0.checked_add(n as u64) {
                Some(a) => addr = GuestAddress(a),
                None => return,
            }
        }
    }
}

/// The configuration space (`struct virtio_console_config`: cols, rows,
/// max_nr_ports, emerg_wr) reads as zero: no feature that uses it is
/// offered. Nothing else differs from the common behaviour.
impl VirtioDevice for Console {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.common.event(&events, ops) {
            // Input may have been queued before the driver was ready.
            DeviceEvent::Activated | DeviceEvent::Queue(RX_QUEUE) => self.process_rx(),
            DeviceEvent::Queue(TX_QUEUE) => self.process_tx(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
