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
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::features::{bit, VIRTIO_F_VERSION_1};
use super::{
    check_activation, device_type, ActivateError, InterruptKind, QueueEvents, VirtioDevice,
    VirtioInterrupt,
};

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

/// State that exists only while the driver has the device activated.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
}

/// A single-port virtio-console. Share it as `Arc<Mutex<Console>>` between
/// a transport (as [`VirtioDevice`]) and the event loop (as
/// [`MutEventSubscriber`]).
pub struct Console {
    out: ConsoleOut,
    out_failed: bool,
    input: VecDeque<u8>,
    input_ready: EventFd,
    input_waiting: bool,
    acked_features: u64,
    events: QueueEvents,
    active: Option<Active>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending_input", &self.input.len())
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Console {
    /// A console whose output goes to `out`.
    pub fn new(out: ConsoleOut) -> io::Result<Self> {
        Ok(Self {
            out,
            out_failed: false,
            input: VecDeque::new(),
            input_ready: crate::eventfd()?,
            input_waiting: false,
            acked_features: 0,
            events: QueueEvents::new()?,
            active: None,
            buf: vec![0; BOUNCE_LEN],
        })
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
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
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used = 0usize;
        while !self.input.is_empty() && used < CHAIN_BUDGET {
            let Some(chain) = active.rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = fill_rx_chain(mem, chain, &mut self.input);
            used += 1;
            if let Err(e) = active.rx.add_used(mem, head, len) {
                crate::warn_ratelimited!(
                    "virtio-console: cannot return receive buffer {head}: {e}"
                );
            }
        }
        if used > 0 {
            notify(&mut active.rx, mem, active.interrupt.as_ref(), RX_QUEUE);
        }
        if !self.input.is_empty() && used >= CHAIN_BUDGET {
            self.events.kick(RX_QUEUE);
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
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used = 0usize;
        while used < CHAIN_BUDGET {
            let Some(chain) = active.tx.pop_descriptor_chain(mem) else {
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
            if let Err(e) = active.tx.add_used(mem, head, 0) {
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
            notify(&mut active.tx, mem, active.interrupt.as_ref(), TX_QUEUE);
        }
        if used >= CHAIN_BUDGET {
            self.events.kick(TX_QUEUE);
        }
    }
}

fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, irq: &dyn VirtioInterrupt, index: usize) {
    // On a read error of the ring flags, interrupt anyway.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = irq.trigger(InterruptKind::Queue(index as u16)) {
            crate::error_ratelimited!("virtio-console: cannot raise interrupt: {e}");
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
            written = written.saturating_add(n as u32);
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

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        bit(VIRTIO_F_VERSION_1)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `struct virtio_console_config` (cols, rows, max_nr_ports,
        // emerg_wr) is all zero: no feature that uses it is offered.
        let _ = offset;
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::debug_ratelimited!("virtio-console: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        check_activation(self.active.is_some(), &queues, &queue_evts, 2)?;
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
            return Err(ActivateError::QueueNotReady(0));
        };
        self.events
            .activate(queue_evts)
            .map_err(ActivateError::EventFd)?;
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.events.deactivate();
        self.acked_features = 0;
        true
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_control(&events) {
            self.events.sync(ops);
            // Input may have been queued before the driver was ready.
            self.process_rx();
            return;
        }
        match self.events.queue_index(events.fd()) {
            Some(RX_QUEUE) => self.process_rx(),
            Some(TX_QUEUE) => self.process_tx(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
