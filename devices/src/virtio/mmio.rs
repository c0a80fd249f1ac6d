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

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio as regs;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::{bit, VIRTIO_F_VERSION_1};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt};
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
            irq: EventFd::new(EFD_NONBLOCK)?,
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
            .map(|_| EventFd::new(EFD_NONBLOCK))
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
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
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
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & FAILED != 0 {
            crate::info_ratelimited!(
                "virtio-mmio: driver marked device type {} FAILED",
                self.device_type
            );
            self.status |= FAILED;
            return;
        }
        if old & (FAILED | DEVICE_NEEDS_RESET) != 0 {
            crate::debug_ratelimited!("virtio-mmio: status {v:#x} written before reset, ignored");
            return;
        }
        if v == old {
            return;
        }
        if v & old != old {
            crate::debug_ratelimited!(
                "virtio-mmio: status {old:#x} -> {v:#x} clears bits, ignored"
            );
            return;
        }
        match (old, v & !old) {
            (0, ACKNOWLEDGE) => self.status = v,
            (ACKNOWLEDGE, DRIVER) => self.status = v,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => self.features_ok(),
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.driver_ok(),
            _ => crate::debug_ratelimited!(
                "virtio-mmio: invalid status transition {old:#x} -> {v:#x}"
            ),
        }
    }

    /// Accepts the driver's features, or leaves FEATURES_OK clear so the
    /// driver sees the refusal when it reads the status back.
    fn features_ok(&mut self) {
        let acked = self.driver_features;
        let unknown = acked & !self.device_features;
        if unknown != 0 {
            crate::warn_ratelimited!(
                "virtio-mmio: driver acked unoffered features {unknown:#x}; refused"
            );
            return;
        }
        if acked & bit(VIRTIO_F_VERSION_1) == 0 {
            crate::warn_ratelimited!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; refused"
            );
            return;
        }
        self.lock_device().set_acked_features(acked);
        self.status |= FEATURES_OK;
    }

    fn driver_ok(&mut self) {
        match self.activate_device() {
            Ok(()) => self.status |= DRIVER_OK,
            Err(e) => {
                crate::error_ratelimited!(
                    "virtio-mmio: cannot activate device type {}: {e}",
                    self.device_type
                );
                self.status |= DRIVER_OK | DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                    crate::error_ratelimited!("virtio-mmio: cannot raise config interrupt: {e}");
                }
            }
        }
    }

    fn activate_device(&mut self) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivateError::QueueOutsideMemory(index));
            }
            queues.push(
                Queue::try_from(q.state())
                    .map_err(|source| ActivateError::QueueState { index, source })?,
            );
        }
        let evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(ActivateError::EventFd)?;
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.lock_device()
            .activate(self.mem.clone(), interrupt, queues, evts)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::features::VIRTIO_RING_F_EVENT_IDX;
    use crate::virtio::test_utils::Rings;
    use crate::virtio::VirtioCommon;
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use vm_memory::GuestAddress;

    const QSIZE: u16 = 16;

    struct MockDevice {
        common: VirtioCommon,
        acked: u64,
        config: [u8; 8],
        activations: Vec<(usize, Vec<bool>)>,
        resets: usize,
        refuse_reset: bool,
    }

    impl Default for MockDevice {
        fn default() -> Self {
            let features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | 1;
            Self {
                common: VirtioCommon::new("mock", 42, features, &[QSIZE, QSIZE]).unwrap(),
                acked: 0,
                config: [0; 8],
                activations: Vec::new(),
                resets: 0,
                refuse_reset: false,
            }
        }
    }

    impl MutEventSubscriber for MockDevice {
        fn init(&mut self, _ops: &mut EventOps) {}
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    }

    /// Records what the transport does instead of the common behaviour.
    impl VirtioDevice for MockDevice {
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn config_space(&self) -> &[u8] {
            &self.config
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<Queue>,
            queue_evts: Vec<EventFd>,
        ) -> Result<(), ActivateError> {
            if !queues[0].ready() {
                return Err(ActivateError::QueueNotReady(0));
            }
            interrupt.trigger(InterruptKind::Queue(0)).unwrap();
            self.activations
                .push((queue_evts.len(), queues.iter().map(|q| q.ready()).collect()));
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.acked = 0;
            !self.refuse_reset
        }
    }

    fn setup() -> (GuestMemoryMmap, Arc<Mutex<MockDevice>>, MmioTransport) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(MockDevice::default()));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        (mem, dev, t)
    }

    fn rd(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
        wr(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        wr(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, low);
        wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, high);
        wr(
            t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, vq: &Rings) {
        wr(t, regs::VIRTIO_MMIO_QUEUE_SEL, index);
        assert_eq!(rd(t, regs::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(rd(t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QSIZE));
        wr(t, regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        let split = |a: u64| (a as u32, (a >> 32) as u32);
        let (l, h) = split(vq.desc);
        wr(t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, l);
        wr(t, regs::VIRTIO_MMIO_QUEUE_DESC_HIGH, h);
        let (l, h) = split(vq.avail);
        wr(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, l);
        wr(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, h);
        let (l, h) = split(vq.used);
        wr(t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, l);
        wr(t, regs::VIRTIO_MMIO_QUEUE_USED_HIGH, h);
        wr(t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(t, regs::VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn identification_registers() {
        let (_, _, mut t) = setup();
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_VENDOR_ID), 0);
        wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES),
            (1 << VIRTIO_RING_F_EVENT_IDX) | 1
        );
        wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES), 1); // VERSION_1
        wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_CONFIG_GENERATION), 0);
        assert_eq!(t.queue_evts().len(), 2);
    }

    #[test]
    fn full_handshake_activates_device() {
        let (mem, dev, mut t) = setup();
        let vq = Rings::new(&mem, 0x1000, QSIZE);
        negotiate(&mut t, 1, 1);
        assert_eq!(
            rd(&mut t, regs::VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        assert_eq!(dev.lock().unwrap().acked, bit(VIRTIO_F_VERSION_1) | 1);
        setup_queue(&mut t, 0, &vq);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            rd(&mut t, regs::VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert_eq!(
            dev.lock().unwrap().activations,
            vec![(2, vec![true, false])]
        );

        // The device raised a queue interrupt during activation.
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        wr(&mut t, regs::VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Queue configuration is frozen after DRIVER_OK.
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 1);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 0);

        // Notifications signal the queue's eventfd.
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err());
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 7); // no such queue: ignored
    }

    #[test]
    fn feature_negotiation_rejects() {
        // Without VERSION_1.
        let (_, dev, mut t) = setup();
        negotiate(&mut t, 1, 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        assert_eq!(dev.lock().unwrap().acked, 0);

        // With a feature the device does not offer.
        let (_, dev, mut t) = setup();
        negotiate(&mut t, 1 | 2, 1);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        assert_eq!(dev.lock().unwrap().acked, 0);

        // With a bit in a feature word that does not exist.
        let (_, _, mut t) = setup();
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 5);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
        );
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
    }

    #[test]
    fn status_transitions_must_be_in_order() {
        let (_, dev, mut t) = setup();
        // Skipping ACKNOWLEDGE.
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, DRIVER);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
        // Straight to DRIVER_OK.
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | DRIVER_OK,
        );
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE);
        // Features written before DRIVER are ignored.
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
        );
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        // Clearing a bit without a reset.
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        // FAILED sticks until reset.
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FAILED,
        );
        assert_eq!(
            rd(&mut t, regs::VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FAILED
        );
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
        );
        assert_eq!(
            rd(&mut t, regs::VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FAILED
        );
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
        assert!(dev.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let (_, dev, mut t) = setup();
        negotiate(&mut t, 0, 1);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        // Rings beyond the end of guest memory.
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, 0xfff0_0000);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        let status = rd(&mut t, regs::VIRTIO_MMIO_STATUS);
        assert_ne!(status & DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
        // Nothing but a reset gets it going again.
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, status | 0x10);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), status);
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn device_refusing_activation_sets_needs_reset() {
        let (_, dev, mut t) = setup();
        negotiate(&mut t, 0, 1);
        // No queue made ready: the mock device refuses.
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(rd(&mut t, regs::VIRTIO_MMIO_STATUS) & DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn reset_clears_transport_and_device() {
        let (mem, dev, mut t) = setup();
        let vq = Rings::new(&mem, 0x1000, QSIZE);
        negotiate(&mut t, 1, 1);
        setup_queue(&mut t, 0, &vq);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        {
            let d = dev.lock().unwrap();
            assert_eq!(d.resets, 1);
            assert_eq!(d.acked, 0);
        }
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(
            t.queue_evts()[0].read().is_err(),
            "stale notification drained"
        );

        // The device can be brought up again.
        negotiate(&mut t, 0, 1);
        setup_queue(&mut t, 0, &vq);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(dev.lock().unwrap().activations.len(), 2);

        // A device that cannot reset leaves NEEDS_RESET set.
        dev.lock().unwrap().refuse_reset = true;
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), DEVICE_NEEDS_RESET);
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), DEVICE_NEEDS_RESET);
    }

    #[test]
    fn config_space_access() {
        let (_, dev, mut t) = setup();
        dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut b = [0u8; 4];
        t.read(0x100, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        let mut b = [0u8; 2];
        t.read(0x106, &mut b);
        assert_eq!(b, [7, 8]);
        let mut b = [0xffu8; 8];
        t.read(0x104, &mut b);
        assert_eq!(b, [5, 6, 7, 8, 0, 0, 0, 0]);
        let mut b = [0xffu8; 1];
        t.read(0xfff, &mut b);
        assert_eq!(b, [0]);
        t.write(0x101, &[0xaa]);
        assert_eq!(dev.lock().unwrap().config[1], 0xaa);
        // Odd widths are ignored.
        let mut b = [0xffu8; 3];
        t.read(0x100, &mut b);
        assert_eq!(b, [0, 0, 0]);
        t.write(0x100, &[9, 9, 9]);
        assert_eq!(dev.lock().unwrap().config[0], 1);
    }

    #[test]
    fn bad_widths_and_offsets_are_ignored() {
        let (_, _, mut t) = setup();
        for (off, len) in [
            (0u64, 1usize),
            (0, 2),
            (0, 8),
            (2, 4),
            (0x71, 4),
            (0x1000, 4),
            (u64::MAX, 4),
        ] {
            let mut b = vec![0xffu8; len];
            t.read(off, &mut b);
            assert!(b.iter().all(|&x| x == 0), "read {off:#x}/{len}");
        }
        // Unknown registers read as zero.
        assert_eq!(rd(&mut t, 0x0fc - 4), 0);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY), 0);
        // Byte-wide and unaligned status writes do nothing.
        t.write(0x70, &[ACKNOWLEDGE as u8]);
        t.write(0x72, &ACKNOWLEDGE.to_le_bytes());
        t.write(0x70, &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.write(u64::MAX, &[1, 0, 0, 0]);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_STATUS), 0);
        // Out-of-range queue selection.
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 9);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 8);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 0);
        // Invalid queue sizes are refused.
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 0x1_0000);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 3);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 32);
        assert_eq!(t.queues[0].size(), QSIZE);
    }
}
