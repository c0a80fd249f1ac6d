//! The common configuration structure (virtio 1.2 §4.1.4.3): features,
//! device status, queue setup and MSI-X vectors, and the device status
//! machine that activates and resets the device.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::PciInterrupt;
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1};
use crate::virtio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use crate::virtio::transport::{self, StatusWrite};
use crate::virtio::{VirtioDevice, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// Register offsets in the common configuration structure.
mod reg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the structure.
    pub const END: u64 = 0x38;
}
/// Size of the common configuration structure.
pub const COMMON_CFG_SIZE: u64 = reg::END;
/// [`COMMON_CFG_SIZE`] as an array length.
const COMMON_LEN: usize = 0x38;
const _: () = assert!(COMMON_LEN as u64 == COMMON_CFG_SIZE);

/// The driver-visible state of the common configuration, and the device.
pub struct CommonCfg {
    pub(super) mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    pub(super) interrupt: Arc<PciInterrupt>,
    pub(super) queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    pub(super) device_type: u32,
    pub(super) device_features: u64,
    pub(super) status: u8,
    pub(super) device_feature_select: u32,
    pub(super) driver_feature_select: u32,
    pub(super) driver_features: u64,
    pub(super) queue_select: u16,
}

impl CommonCfg {
    /// The state for `device` with `queues` and their eventfds.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<PciInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let (device_type, features) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            (
                d.device_type(),
                d.avail_features() | bit(VIRTIO_F_VERSION_1),
            )
        };
        Self {
            mem,
            device,
            interrupt,
            queues,
            queue_evts,
            device_type,
            device_features: features,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
        }
    }

    /// The device.
    pub fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The queue notification eventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The structure as bytes, for a read of any width at any offset.
    fn snapshot(&self) -> [u8; COMMON_LEN] {
        let mut b = [0u8; COMMON_LEN];
        let mut put = |off: u64, v: &[u8]| {
            let o = crate::usize_from(off);
            b[o..o + v.len()].copy_from_slice(v);
        };
        let features = match self.device_feature_select {
            0 => self.device_features & 0xffff_ffff,
            1 => self.device_features >> 32,
            _ => 0,
        };
        put(
            reg::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(reg::DEVICE_FEATURE, &features.to_le_bytes()[..4]);
        put(
            reg::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let driver = match self.driver_feature_select {
            0 => self.driver_features & 0xffff_ffff,
            1 => self.driver_features >> 32,
            _ => 0,
        };
        put(reg::DRIVER_FEATURE, &driver.to_le_bytes()[..4]);
        put(
            reg::CONFIG_MSIX_VECTOR,
            &self.interrupt.config_vector().to_le_bytes(),
        );
        let num_queues = u16::try_from(self.queues.len()).unwrap_or(u16::MAX);
        put(reg::NUM_QUEUES, &num_queues.to_le_bytes());
        put(reg::DEVICE_STATUS, &[self.status]);
        let generation = self.lock_device().config_generation().to_le_bytes()[0];
        put(reg::CONFIG_GENERATION, &[generation]);
        put(reg::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let qi = usize::from(self.queue_select);
            put(reg::QUEUE_SIZE, &q.size().to_le_bytes());
            put(
                reg::QUEUE_MSIX_VECTOR,
                &self.interrupt.queue_vector(qi).to_le_bytes(),
            );
            put(reg::QUEUE_ENABLE, &u16::from(q.ready()).to_le_bytes());
            put(reg::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(reg::QUEUE_DESC, &q.desc_table().to_le_bytes());
            put(reg::QUEUE_DRIVER, &q.avail_ring().to_le_bytes());
            put(reg::QUEUE_DEVICE, &q.used_ring().to_le_bytes());
        }
        b
    }

    /// Reads `data.len()` bytes at `offset`; past the end reads zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.snapshot(), offset, data);
    }

    /// Writes a register: each register at its own width; the 64-bit
    /// queue addresses also as two dwords. Other writes are dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let v = match data.len() {
            1 | 2 | 4 | 8 => {
                let mut b = [0u8; 8];
                b[..data.len()].copy_from_slice(data);
                u64::from_le_bytes(b)
            }
            _ => return,
        };
        let v32 = u32::try_from(v & 0xffff_ffff).unwrap_or(0);
        let v16 = u16::try_from(v & 0xffff).unwrap_or(0);
        match (offset, data.len()) {
            (reg::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v32,
            (reg::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v32,
            (reg::DRIVER_FEATURE, 4) => self.write_driver_features(v32),
            (reg::CONFIG_MSIX_VECTOR, 2) => self.interrupt.set_config_vector(v16),
            (reg::DEVICE_STATUS, 1) => self.write_status(data[0]),
            (reg::QUEUE_SELECT, 2) => self.queue_select = v16,
            (reg::QUEUE_SIZE, 2) => self.with_queue(|q| {
                if q.try_set_size(v16).is_err() {
                    crate::debug_ratelimited!("virtio-pci: invalid queue size {v16}");
                }
            }),
            (reg::QUEUE_MSIX_VECTOR, 2) => {
                let q = usize::from(self.queue_select);
                self.interrupt.set_queue_vector(q, v16);
            }
            (reg::QUEUE_ENABLE, 2) if v16 == 1 => self.with_queue(|q| q.set_ready(true)),
            (off, len) if (reg::QUEUE_DESC..reg::END).contains(&off) => {
                self.write_queue_address(off, len, v)
            }
            _ => crate::debug_ratelimited!(
                "virtio-pci: {}-byte common config write at {offset:#x} ignored",
                data.len()
            ),
        }
    }

    fn write_queue_address(&mut self, off: u64, len: usize, v: u64) {
        let base = off & !7;
        let (lo, hi) = match (len, off - base) {
            (8, 0) => (Some(low(v)), Some(low(v >> 32))),
            (4, 0) => (Some(low(v)), None),
            (4, 4) => (None, Some(low(v))),
            _ => {
                crate::debug_ratelimited!("virtio-pci: {len}-byte queue address write ignored");
                return;
            }
        };
        self.with_queue(|q| match base {
            reg::QUEUE_DESC => q.set_desc_table_address(lo, hi),
            reg::QUEUE_DRIVER => q.set_avail_ring_address(lo, hi),
            _ => q.set_used_ring_address(lo, hi),
        });
    }

    /// Applies `f` to the selected queue while the driver may still
    /// configure queues (before `DRIVER_OK`).
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if u32::from(self.status) & DRIVER_OK != 0 {
            crate::debug_ratelimited!("virtio-pci: queue configured after DRIVER_OK, ignored");
            return;
        }
        if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
            f(q);
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if u32::from(self.status) != ACKNOWLEDGE | DRIVER {
            crate::debug_ratelimited!(
                "virtio-pci: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            // No feature bits there: a driver setting any gets FEATURES_OK
            // refused.
            _ if v != 0 => self.driver_features |= 1 << 63,
            _ => {}
        }
    }

    fn write_status(&mut self, v: u8) {
        let old = u32::from(self.status);
        match transport::status_write(old, u32::from(v)) {
            StatusWrite::Reset => self.reset(),
            StatusWrite::Failed => {
                crate::info_ratelimited!(
                    "virtio-pci: driver marked device type {} FAILED",
                    self.device_type
                );
                self.status |= low8(FAILED);
            }
            StatusWrite::Store => self.status = v,
            StatusWrite::FeaturesOk => self.features_ok(),
            StatusWrite::DriverOk => self.driver_ok(),
            StatusWrite::Ignored(why) => {
                crate::debug_ratelimited!("virtio-pci: status {old:#x} -> {v:#x} ignored: {why}")
            }
        }
    }

    fn features_ok(&mut self) {
        let acked = self.driver_features;
        if let Some(why) = transport::refuse_features(acked, self.device_features) {
            crate::warn_ratelimited!("virtio-pci: {why}; refused");
            return;
        }
        self.lock_device().set_acked_features(acked);
        self.status |= low8(FEATURES_OK);
    }

    fn driver_ok(&mut self) {
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let bits = transport::driver_ok(
            "virtio-pci",
            self.device_type,
            &mut *self.lock_device(),
            &self.mem,
            &self.queues,
            &self.queue_evts,
            interrupt,
        );
        self.status |= low8(bits);
    }

    fn reset(&mut self) {
        if self.status != 0 && !self.lock_device().reset() {
            crate::error_ratelimited!("virtio-pci: device type {} cannot reset", self.device_type);
            self.status = low8(DEVICE_NEEDS_RESET);
            return;
        }
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.reset();
    }
}

#[expect(clippy::cast_possible_truncation, reason = "truncation is the point")]
const fn low(v: u64) -> u32 {
    v as u32
}

/// Status bits all fit in the 8-bit device status register.
#[expect(
    clippy::cast_possible_truncation,
    reason = "status bits are below 0x100"
)]
const fn low8(v: u32) -> u8 {
    v as u8
}
