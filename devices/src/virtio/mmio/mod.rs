//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2).
//!
//! [`MmioTransport`] is a [`BusDevice`] covering a 0x1000-byte window: the
//! registers below 0x100 and the device configuration space from 0x100.
//! Registers are 32 bits wide; accesses of another width or alignment, and
//! accesses to unknown registers, are ignored (reads return zero).
//!
//! Queue notifications (writes to `QueueNotify`, offset 0x50) signal the
//! queue's eventfd from [`MmioTransport::queue_evts`]; the VMM normally also
//! registers those eventfds as KVM ioeventfds at `base + 0x50` with the queue
//! index as datamatch, so such writes never leave the kernel. Interrupts go
//! through [`MmioInterrupt`], whose eventfd the VMM registers as an irqfd.

use crate::GuestMemoryMmap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio as regs;
use virtio_queue::{Queue, QueueT};

use vmm_sys_util::eventfd::EventFd;

use super::features::{bit, VIRTIO_F_VERSION_1};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::transport::{self, StatusWrite};
use super::{InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;

/// Size of the MMIO window of one device.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the `QueueNotify` register, for ioeventfd registration.
pub const NOTIFY_OFFSET: u64 = regs::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// `MagicValue`: "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Transport version implemented (modern, non-legacy).
const MMIO_VERSION: u32 = 2;
/// `VendorID` reported to the driver.
const VENDOR_ID: u32 = 0;
/// Start of the device configuration space.
const CONFIG_OFFSET: u64 = regs::VIRTIO_MMIO_CONFIG as u64;

/// `InterruptStatus` bit: a used ring was updated.
pub const INT_VRING: u32 = regs::VIRTIO_MMIO_INT_VRING;
/// `InterruptStatus` bit: the configuration changed.
pub const INT_CONFIG: u32 = regs::VIRTIO_MMIO_INT_CONFIG;

/// Why a transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device asks for a queue size virtio does not allow.
    #[error("virtio queue {index}: invalid maximum size {max}: {source}")]
    QueueSize {
        /// The queue.
        index: usize,
        /// Its maximum size.
        max: u16,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// An interrupt or notification eventfd cannot be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// Interrupt state of one virtio-mmio device: the `InterruptStatus`
/// register plus the eventfd registered as the device's irqfd.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    /// Creates the interrupt with a non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irq: crate::eventfd()?,
        })
    }

    /// The eventfd to register as irqfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.irq
    }

    /// The current `InterruptStatus` value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the `InterruptStatus` bits set in `bits` (`InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets `InterruptStatus` to a restored value and, if any bit is set,
    /// raises the line once: the driver reads the status and handles
    /// what is pending (a spare interrupt with nothing to do is harmless).
    fn restore(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            if let Err(e) = self.irq.write(1) {
                log::warn!("virtio-mmio: cannot raise the restored interrupt: {e}");
            }
        }
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue(_) => INT_VRING,
            InterruptKind::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// A virtio device behind a virtio-mmio (version 2) register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<MmioInterrupt>,
    /// The driver's view of each queue (configuration only; the device gets
    /// its own copies at activation).
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl MmioTransport {
    /// Puts `device` behind a new transport. Creates one notification
    /// eventfd per queue and the interrupt eventfd.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, TransportError> {
        let (device_type, device_features, max_sizes) = {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            (
                dev.device_type(),
                dev.avail_features() | bit(VIRTIO_F_VERSION_1),
                dev.queue_max_sizes().to_vec(),
            )
        };
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &max)| {
                Queue::new(max).map_err(|source| TransportError::QueueSize { index, max, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = max_sizes
            .iter()
            .map(|_| crate::eventfd())
            .collect::<io::Result<Vec<_>>>()
            .map_err(TransportError::EventFd)?;
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(MmioInterrupt::new().map_err(TransportError::EventFd)?),
            queues,
            queue_evts,
            device_type,
            device_features,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
        })
    }

    /// One notification eventfd per queue, in queue order. Register queue
    /// `i`'s as an ioeventfd at `base + NOTIFY_OFFSET`, 4 bytes, datamatch `i`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd to register as the device's irqfd.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.event_fd()
    }

    /// The interrupt object (for `InterruptStatus` inspection).
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status register as the driver sees it.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Applies `f` to the selected queue, but only while the driver may still
    /// configure queues (before `DRIVER_OK`).
    fn with_queue_config(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.status & DRIVER_OK != 0 {
            crate::debug_ratelimited!("virtio-mmio: queue configured after DRIVER_OK, ignored");
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
            f(q);
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let Ok(reg) = u32::try_from(offset) else {
            return 0;
        };
        match reg {
            regs::VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            regs::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            regs::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            regs::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            regs::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => low_half(self.device_features),
                1 => low_half(self.device_features >> 32),
                _ => 0,
            },
            regs::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            regs::VIRTIO_MMIO_QUEUE_READY => {
                self.selected_queue().map_or(0, |q| u32::from(q.ready()))
            }
            regs::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            regs::VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: their length reads as -1.
            regs::VIRTIO_MMIO_SHM_LEN_LOW
            | regs::VIRTIO_MMIO_SHM_LEN_HIGH
            | regs::VIRTIO_MMIO_SHM_BASE_LOW
            | regs::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            regs::VIRTIO_MMIO_CONFIG_GENERATION => self.lock_device().config_generation(),
            _ => {
                crate::debug_ratelimited!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let Ok(reg) = u32::try_from(offset) else {
            return;
        };
        match reg {
            regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            regs::VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(v) {
                Ok(n) => self.with_queue_config(|q| {
                    if q.try_set_size(n).is_err() {
                        crate::debug_ratelimited!("virtio-mmio: invalid queue size {n}");
                    }
                }),
                Err(_) => crate::debug_ratelimited!("virtio-mmio: invalid queue size {v}"),
            },
            regs::VIRTIO_MMIO_QUEUE_READY => {
                if v == 0 {
                    // Always accepted, so that a driver tearing down queues
                    // reads back 0.
                    if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                        q.set_ready(false);
                    }
                } else if v == 1 {
                    self.with_queue_config(|q| q.set_ready(true));
                }
            }
            regs::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            regs::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            regs::VIRTIO_MMIO_STATUS => self.write_status(v),
            regs::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.with_queue_config(|q| q.set_desc_table_address(Some(v), None))
            }
            regs::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.with_queue_config(|q| q.set_desc_table_address(None, Some(v)))
            }
            regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.with_queue_config(|q| q.set_avail_ring_address(Some(v), None))
            }
            regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.with_queue_config(|q| q.set_avail_ring_address(None, Some(v)))
            }
            regs::VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.with_queue_config(|q| q.set_used_ring_address(Some(v), None))
            }
            regs::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.with_queue_config(|q| q.set_used_ring_address(None, Some(v)))
            }
            regs::VIRTIO_MMIO_SHM_SEL => {}
            _ => crate::debug_ratelimited!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status != ACKNOWLEDGE | DRIVER {
            crate::debug_ratelimited!(
                "virtio-mmio: driver features written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            // No feature bits exist there; a driver setting any is buggy
            // and FEATURES_OK will be refused.
            _ if v != 0 => self.driver_features |= 1 << 63,
            _ => {}
        }
    }

    fn notify(&self, v: u32) {
        match self.queue_evts.get(v as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::error_ratelimited!("virtio-mmio: cannot signal queue {v}: {e}");
                }
            }
            None => crate::debug_ratelimited!("virtio-mmio: notify for unknown queue {v}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        match transport::status_write(self.status, v) {
            StatusWrite::Reset => self.reset(),
            StatusWrite::Failed => {
                crate::info_ratelimited!(
                    "virtio-mmio: driver marked device type {} FAILED",
                    self.device_type
                );
                self.status |= FAILED;
            }
            StatusWrite::Store => self.status = v,
            StatusWrite::FeaturesOk => self.features_ok(),
            StatusWrite::DriverOk => self.driver_ok(),
            StatusWrite::Ignored(why) => crate::debug_ratelimited!(
                "virtio-mmio: status {:#x} -> {v:#x} ignored: {why}",
                self.status
            ),
        }
    }

    /// Accepts the driver's features, or leaves FEATURES_OK clear so the
    /// driver sees the refusal when it reads the status back.
    fn features_ok(&mut self) {
        let acked = self.driver_features;
        if let Some(why) = transport::refuse_features(acked, self.device_features) {
            crate::warn_ratelimited!("virtio-mmio: {why}; refused");
            return;
        }
        self.lock_device().set_acked_features(acked);
        self.status |= FEATURES_OK;
    }

    fn driver_ok(&mut self) {
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let bits = transport::driver_ok(
            "virtio-mmio",
            self.device_type,
            &mut *self.lock_device(),
            &self.mem,
            &self.queues,
            &self.queue_evts,
            interrupt,
        );
        self.status |= bits;
    }

    fn reset(&mut self) {
        if self.status != 0 && !self.lock_device().reset() {
            crate::error_ratelimited!("virtio-mmio: device type {} cannot reset", self.device_type);
            self.status = DEVICE_NEEDS_RESET;
            return;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= MMIO_SIZE {
            return;
        }
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.lock_device().read_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::debug_ratelimited!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_SIZE {
            return;
        }
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.lock_device()
                    .write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::debug_ratelimited!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            crate::debug_ratelimited!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

pub mod persist;

/// The low 32 bits of a 64-bit feature word (the register window shows
/// the word in two halves).
#[expect(clippy::cast_possible_truncation, reason = "truncation is the point")]
const fn low_half(v: u64) -> u32 {
    v as u32
}

#[cfg(test)]
mod tests;
