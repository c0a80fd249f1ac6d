//! The virtio PCI transport, modern only (virtio 1.2 §4.1).
//!
//! [`VirtioPci`] is a PCI function (vendor 0x1AF4, device 0x1040 plus the
//! virtio device type, revision 1, no I/O BAR, no INTx) with one 32-bit
//! memory BAR holding, at fixed offsets ([`layout`]), the common
//! configuration, the ISR status byte, the device configuration, the queue
//! notification addresses and the MSI-X table and pending-bit array.
//! Vendor capabilities point the driver at each of them; the MSI-X
//! capability at the table. A last vendor capability,
//! `VIRTIO_PCI_CAP_PCI_CFG`, is a window into the BAR from configuration
//! space (§4.1.4.9): the driver writes a BAR, offset and length into it,
//! then reading or writing its `pci_cfg_data` accesses the BAR there
//! through the same code as an MMIO access (so a notification through it
//! kicks the queue).
//!
//! The same object is the [`PciDevice`] on bus 0 (configuration space)
//! and the [`BusDevice`] on the MMIO bus at the BAR. Queue `i`'s
//! notification address is `BAR + NOTIFY + 4 * i`; the VMM registers it
//! as an ioeventfd on [`VirtioPci::queue_evts`], so notifications never
//! exit to userspace; a write that does reach the transport signals the
//! same eventfd. Interrupts are MSI-X only ([`interrupt::PciInterrupt`]).

mod common;
pub mod interrupt;
pub mod persist;

use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use crate::bus::BusDevice;
use crate::pci::config::{self, overlaps, ConfigSpace, Identity};
use crate::pci::msix::{MsiRouter, Msix};
use crate::pci::PciDevice;
use crate::virtio::mmio::TransportError;
use crate::virtio::VirtioDevice;
use crate::GuestMemoryMmap;
use common::CommonCfg;
use interrupt::PciInterrupt;

/// Offsets of the structures in the BAR, and its size.
pub mod layout {
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// ISR status (one byte, read to clear).
    pub const ISR: u64 = 0x1000;
    /// Device configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Size of the device configuration window.
    pub const DEVICE_SIZE: u64 = 0x1000;
    /// Queue notifications, [`NOTIFY_MULTIPLIER`] bytes apart.
    pub const NOTIFY: u64 = 0x3000;
    /// Distance between two queues' notification addresses.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// Size of the notification window (1024 queues).
    pub const NOTIFY_SIZE: u64 = 0x1000;
    /// MSI-X table (256 vectors).
    pub const MSIX_TABLE: u64 = 0x4000;
    /// MSI-X pending-bit array.
    pub const MSIX_PBA: u64 = 0x5000;
    /// Size of the BAR.
    pub const BAR_SIZE: u64 = 0x8000;
}

/// PCI vendor id of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Device id of a modern virtio device of type 0.
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// Most queues the notification window has room for.
const MAX_QUEUES: usize = 1024;
/// Most vectors the MSI-X table window has room for.
const MAX_VECTORS: usize = 256;

/// Capability ids.
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
/// Virtio capability types.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// `virtio_pci_cfg_cap`: the common header (16 bytes) and `pci_cfg_data`.
const PCI_CFG_CAP_LEN: u8 = 20;
/// Offsets in that capability (from its id byte) of the fields the
/// driver writes.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// Why a virtio PCI function could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PciTransportError {
    /// The queues cannot be created.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Too many queues for the BAR layout.
    #[error("{0} queues: the virtio-pci transport has room for {MAX_QUEUES}")]
    TooManyQueues(usize),
    /// The configuration space cannot hold the header.
    #[error("PCI configuration space: {0}")]
    Config(#[from] config::Error),
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// A virtio device behind a modern virtio PCI function.
pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability.
    pci_cfg_cap: usize,
    bar: u64,
    common: CommonCfg,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("bar", &self.bar)
            .field("status", &self.common.status())
            .finish()
    }
}

impl VirtioPci {
    /// Puts `device` behind a PCI function whose BAR is at `bar` (a
    /// multiple of [`layout::BAR_SIZE`] below 4 GiB) and whose MSI-X
    /// vectors (one per queue, plus one for configuration changes) use
    /// GSIs from `first_gsi`, routed through `router`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        bar: u64,
        first_gsi: u32,
        router: Arc<dyn MsiRouter>,
    ) -> Result<Self, PciTransportError> {
        let (device_type, sizes) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            (d.device_type(), d.queue_max_sizes().to_vec())
        };
        if sizes.len() > MAX_QUEUES || sizes.len() >= MAX_VECTORS {
            return Err(PciTransportError::TooManyQueues(sizes.len()));
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &max)| {
                Queue::new(max).map_err(|source| TransportError::QueueSize { index, max, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let evts = sizes
            .iter()
            .map(|_| crate::eventfd())
            .collect::<io::Result<Vec<_>>>()
            .map_err(PciTransportError::EventFd)?;
        // Below MAX_VECTORS, checked above.
        let vectors = u16::try_from(sizes.len() + 1).unwrap_or(1);
        let msix = Msix::new(vectors, first_gsi, router).map_err(PciTransportError::EventFd)?;
        let Caps {
            config,
            msix: msix_cap,
            pci_cfg: pci_cfg_cap,
        } = build_config(device_type, bar, &msix)?;
        let interrupt = Arc::new(PciInterrupt::new(msix, sizes.len()));
        Ok(Self {
            config,
            msix_cap,
            pci_cfg_cap,
            bar,
            common: CommonCfg::new(mem, device, interrupt, queues, evts),
        })
    }

    /// The device behind the function.
    pub fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.common.lock_device()
    }

    /// One notification eventfd per queue: register queue `i`'s as an
    /// ioeventfd at [`Self::notify_address`]`(i)`, any width.
    pub fn queue_evts(&self) -> &[EventFd] {
        self.common.queue_evts()
    }

    /// Guest address of queue `i`'s notification register.
    pub fn notify_address(&self, i: usize) -> u64 {
        self.bar + layout::NOTIFY + u64::from(layout::NOTIFY_MULTIPLIER) * i as u64
    }

    /// The interrupt state (vectors, MSI-X table).
    pub fn interrupt(&self) -> &Arc<PciInterrupt> {
        &self.common.interrupt
    }

    /// The device status as the driver last set it.
    pub fn status(&self) -> u8 {
        self.common.status()
    }

    /// The BAR's guest address.
    pub fn bar(&self) -> u64 {
        self.bar
    }

    fn notify(&self, offset: u64) {
        let i = offset / u64::from(layout::NOTIFY_MULTIPLIER);
        match self.common.queue_evts().get(crate::usize_from(i)) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::error_ratelimited!("virtio-pci: cannot signal queue {i}: {e}");
                }
            }
            None => crate::debug_ratelimited!("virtio-pci: notify for unknown queue {i}"),
        }
    }
}

use vmm_sys_util::eventfd::EventFd;

/// A function's configuration space and where two of its capabilities
/// are.
struct Caps {
    config: ConfigSpace,
    /// Offset of the MSI-X capability.
    msix: usize,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability.
    pci_cfg: usize,
}

/// The configuration space: header, the four virtio structure
/// capabilities, MSI-X, the configuration access capability, and the BAR.
fn build_config(device_type: u32, bar: u64, msix: &Msix) -> Result<Caps, PciTransportError> {
    let device_id = u16::try_from(device_type)
        .ok()
        .and_then(|t| MODERN_DEVICE_BASE.checked_add(t))
        .unwrap_or(MODERN_DEVICE_BASE);
    let mut c = ConfigSpace::new(&Identity {
        vendor: VIRTIO_VENDOR,
        device: device_id,
        revision: 1,
        // Other device class (virtio devices are classless here; the
        // driver matches the ids).
        class: [0xff, 0x00, 0x00],
        subsystem_vendor: VIRTIO_VENDOR,
        subsystem: 0x40,
    });
    c.set_memory_bar(0, bar, layout::BAR_SIZE)?;
    let caps = [
        (CFG_COMMON, layout::COMMON, common::COMMON_CFG_SIZE),
        (CFG_ISR, layout::ISR, 1),
        (CFG_DEVICE, layout::DEVICE, layout::DEVICE_SIZE),
    ];
    for (kind, offset, len) in caps {
        let body = virtio_cap(kind, offset, len, 16);
        c.add_capability(CAP_VENDOR, &body, &vec![0; body.len()])?;
    }
    let mut notify = virtio_cap(CFG_NOTIFY, layout::NOTIFY, layout::NOTIFY_SIZE, 20);
    notify.extend_from_slice(&layout::NOTIFY_MULTIPLIER.to_le_bytes());
    c.add_capability(CAP_VENDOR, &notify, &vec![0; notify.len()])?;
    // Message control (table size - 1), table and PBA offsets in BAR 0.
    let table_size = u16::try_from(msix.len() - 1).unwrap_or(0);
    let mut body = table_size.to_le_bytes().to_vec();
    body.extend_from_slice(&low32(layout::MSIX_TABLE).to_le_bytes());
    body.extend_from_slice(&low32(layout::MSIX_PBA).to_le_bytes());
    let mut writable = vec![0u8; body.len()];
    writable[1] = 0xc0; // enable and function mask
    let msix_cap = c.add_capability(CAP_MSIX, &body, &writable)?;
    // Last in the chain, so that the capabilities before it sit where
    // they did before it was added (snapshots taken then still restore:
    // persist.rs).
    let (body, writable) = pci_cfg_cap_body();
    let pci_cfg = c.add_capability(CAP_VENDOR, &body, &writable)?;
    Ok(Caps {
        config: c,
        msix: msix_cap,
        pci_cfg,
    })
}

/// The `VIRTIO_PCI_CAP_PCI_CFG` capability after its id and next bytes,
/// as at reset (BAR, offset, length and data zero), and its write mask:
/// the driver may write the BAR, offset, length and data fields.
fn pci_cfg_cap_body() -> (Vec<u8>, Vec<u8>) {
    let mut body = virtio_cap(CFG_PCI, 0, 0, PCI_CFG_CAP_LEN);
    body.extend_from_slice(&[0; 4]);
    let mut writable = vec![0u8; body.len()];
    // Body offsets are capability offsets less the two header bytes.
    writable[PCI_CFG_BAR - 2] = 0xff;
    writable[PCI_CFG_OFFSET - 2..PCI_CFG_DATA + 4 - 2].fill(0xff);
    (body, writable)
}

/// The body of a virtio vendor capability (after id and next) of
/// `cap_len` bytes in all: length, type, BAR 0, id 0, padding, offset,
/// length.
fn virtio_cap(kind: u8, offset: u64, len: u64, cap_len: u8) -> Vec<u8> {
    let mut b = vec![cap_len, kind, 0, 0, 0, 0];
    b.extend_from_slice(&low32(offset).to_le_bytes());
    b.extend_from_slice(&low32(len).to_le_bytes());
    b
}

/// Layout offsets and sizes are below 4 GiB.
#[expect(
    clippy::cast_possible_truncation,
    reason = "layout constants are small"
)]
const fn low32(v: u64) -> u32 {
    v as u32
}

impl VirtioPci {
    /// The BAR offset and length the configuration access capability
    /// names, if they are a 1-, 2- or 4-byte access inside BAR 0.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        // The BAR byte, then `id` and padding.
        let bar = self.config.read_u32(cap + PCI_CFG_BAR) & 0xff;
        let offset = u64::from(self.config.read_u32(cap + PCI_CFG_OFFSET));
        let len = self.config.read_u32(cap + PCI_CFG_LENGTH);
        let len = match len {
            1 | 2 | 4 => usize::try_from(len).ok()?,
            _ => return None,
        };
        // The offset is a u32 and the length at most 4: no overflow.
        (bar == 0 && offset + len as u64 <= layout::BAR_SIZE).then_some((offset, len))
    }

    /// Before a configuration read of `pci_cfg_data`: reads the BAR
    /// where the capability points into it (zeros if it points nowhere
    /// valid), through the same path as an MMIO read.
    fn pci_cfg_load(&mut self) {
        let mut buf = [0u8; 4];
        match self.pci_cfg_window() {
            Some((offset, len)) => BusDevice::read(self, offset, &mut buf[..len]),
            None => crate::debug_ratelimited!("virtio-pci: PCI_CFG read of an invalid window"),
        }
        let data = self.pci_cfg_cap + PCI_CFG_DATA;
        // `data` is inside the 256 bytes: add_capability checked it.
        self.config.write(data as u64, &buf);
    }

    /// After a configuration write to `pci_cfg_data`: writes its first
    /// `length` bytes to the BAR where the capability points (dropped if
    /// it points nowhere valid), through the same path as an MMIO write.
    fn pci_cfg_store(&mut self) {
        let Some((offset, len)) = self.pci_cfg_window() else {
            crate::debug_ratelimited!("virtio-pci: PCI_CFG write to an invalid window");
            return;
        };
        let data = self.config.read_u32(self.pci_cfg_cap + PCI_CFG_DATA);
        let bytes = data.to_le_bytes();
        BusDevice::write(self, offset, &bytes[..len]);
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            self.pci_cfg_load();
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let old_bar = self.config.bar_address(0);
        self.config.write(offset, data);
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            self.pci_cfg_store();
        }
        let control = self.msix_cap + 2;
        if overlaps(offset, data.len(), control, 2) {
            let v = self.config.read_u16(control);
            self.common.interrupt.msix().set_control(v);
        }
        let bar = self.config.bar_address(0);
        if bar != old_bar && bar.map(u64::from) == Some(self.bar) {
            log::debug!("virtio-pci: BAR 0 back at {:#x}", self.bar);
        } else if bar != old_bar && bar != Some(!(low32(layout::BAR_SIZE) - 1)) {
            crate::warn_ratelimited!(
                "virtio-pci: guest moved BAR 0 to {bar:#x?}; the device stays at {:#x}",
                self.bar
            );
        }
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < layout::COMMON + common::COMMON_CFG_SIZE => self.common.read(o, data),
            layout::ISR if data.len() == 1 => data[0] = self.common.interrupt.take_isr(),
            o if (layout::DEVICE..layout::DEVICE + layout::DEVICE_SIZE).contains(&o) => {
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    self.common
                        .lock_device()
                        .read_config(o - layout::DEVICE, data);
                }
            }
            o if (layout::MSIX_TABLE..layout::MSIX_PBA).contains(&o) => self
                .common
                .interrupt
                .msix()
                .table_read(o - layout::MSIX_TABLE, data),
            o if (layout::MSIX_PBA..layout::BAR_SIZE).contains(&o) => self
                .common
                .interrupt
                .msix()
                .pba_read(o - layout::MSIX_PBA, data),
            _ => crate::debug_ratelimited!("virtio-pci: {}-byte read at {offset:#x}", data.len()),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < layout::COMMON + common::COMMON_CFG_SIZE => self.common.write(o, data),
            o if (layout::DEVICE..layout::DEVICE + layout::DEVICE_SIZE).contains(&o) => {
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    self.common
                        .lock_device()
                        .write_config(o - layout::DEVICE, data);
                }
            }
            o if (layout::NOTIFY..layout::NOTIFY + layout::NOTIFY_SIZE).contains(&o) => {
                self.notify(o - layout::NOTIFY)
            }
            o if (layout::MSIX_TABLE..layout::MSIX_PBA).contains(&o) => self
                .common
                .interrupt
                .msix()
                .table_write(o - layout::MSIX_TABLE, data),
            _ => crate::debug_ratelimited!("virtio-pci: {}-byte write at {offset:#x}", data.len()),
        }
    }
}

#[cfg(test)]
mod tests;
