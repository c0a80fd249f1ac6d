//! PCI: one bus (bus 0) behind a host bridge, reached through
//! configuration mechanism #1 (I/O ports 0xCF8 and 0xCFC-0xCFF) and
//! through PCI Express enhanced configuration access (ECAM, memory).
//!
//! [`PciRoot`] is the port-I/O [`BusDevice`] for the eight ports from
//! [`CONFIG_ADDRESS_PORT`]: the guest writes a function's address to
//! 0xCF8 and reads or writes its configuration space through 0xCFC-0xCFF.
//! [`ecam::PciEcam`] is the MMIO [`BusDevice`] for the same bus's ECAM
//! window, which reaches the whole 4 KiB of each function's space.
//! Device 0 is the host bridge; the others are [`PciDevice`]s added in
//! slot order. Every function is function 0 of its device; accesses to
//! absent functions read all ones and writes to them are dropped.
//!
//! Memory BARs are assigned by capsule (firmware-style) when the VM is
//! built; the devices decode their BAR at that address whatever the guest
//! writes later (it reads back what it wrote, so the sizing protocol
//! works, but moving a BAR is not supported).

pub mod config;
pub mod ecam;
pub mod msix;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
pub use config::{ConfigSpace, Identity};

/// The configuration address port (4 bytes); the data ports follow it.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports of configuration mechanism #1: address (4) and data (4).
pub const CONFIG_PORTS: u64 = 8;
/// Devices on bus 0.
pub const SLOTS: usize = 32;

/// Configuration address: enable bit.
const ADDRESS_ENABLE: u32 = 1 << 31;

/// A PCI function on bus 0: its configuration space as the guest sees it.
///
/// `offset` is below 0x100 through the configuration ports and below
/// 0x1000 through ECAM (0x100-0xFFF is the PCI Express extended space).
pub trait PciDevice: Send {
    /// Reads `data.len()` bytes at `offset` of the configuration space.
    fn config_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` of the configuration space.
    fn config_write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not join the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// All 31 device slots are taken.
    #[error("PCI bus 0 is full ({SLOTS} devices)")]
    BusFull,
}

/// The host bridge at 00:00.0: a header the OS recognises, nothing more.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

/// Vendor and device id of the host bridge (Intel's id for a virtual
/// host bridge, as other VMMs report it).
const HOST_BRIDGE_VENDOR: u16 = 0x8086;
const HOST_BRIDGE_DEVICE: u16 = 0x0d57;

impl Default for HostBridge {
    fn default() -> Self {
        Self {
            config: ConfigSpace::new(&Identity {
                vendor: HOST_BRIDGE_VENDOR,
                device: HOST_BRIDGE_DEVICE,
                revision: 0,
                // Bridge device, host bridge.
                class: [0x06, 0x00, 0x00],
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset, data);
    }
}

/// Bus 0 and configuration mechanism #1.
pub struct PciRoot {
    address: u32,
    slots: Vec<Arc<Mutex<dyn PciDevice>>>,
    /// The guest has read or written a configuration space (through
    /// either mechanism): its kernel knows PCI. A guest that never does
    /// cannot find a virtio-pci device, and the VMM says so when it ends.
    probed: AtomicBool,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("address", &self.address)
            .field("devices", &self.slots.len())
            .finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// Bus 0 with the host bridge in slot 0.
    pub fn new() -> Self {
        Self {
            address: 0,
            slots: vec![Arc::new(Mutex::new(HostBridge::default()))],
            probed: AtomicBool::new(false),
        }
    }

    /// Whether the guest has read or written any function's
    /// configuration space (present or not) since the bus was built.
    pub fn probed(&self) -> bool {
        self.probed.load(Ordering::Relaxed)
    }

    /// Marks the bus as probed: a restored guest found it before its
    /// snapshot was taken.
    pub fn set_probed(&self) {
        self.probed.store(true, Ordering::Relaxed);
    }

    /// Puts `device` in the next free slot; returns the slot.
    pub fn add(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, Error> {
        let slot = u8::try_from(self.slots.len())
            .ok()
            .filter(|&s| usize::from(s) < SLOTS)
            .ok_or(Error::BusFull)?;
        self.slots.push(device);
        Ok(slot)
    }

    /// The configuration address register (for a snapshot).
    pub fn address(&self) -> u32 {
        self.address
    }

    /// Puts back a saved configuration address register.
    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    /// Function `function` of device `slot` on bus 0, if there is one.
    fn function(&self, slot: u32, function: u32) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if function != 0 {
            return None;
        }
        self.slots.get(usize::try_from(slot).ok()?)
    }

    /// The device, function and dword offset the address register
    /// selects; `None` if it is disabled or names another bus.
    fn selected(&self) -> Option<(u32, u32, u64)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        if a & ADDRESS_ENABLE == 0 || bus != 0 {
            return None;
        }
        Some(((a >> 11) & 0x1f, (a >> 8) & 0x7, u64::from(a & 0xfc)))
    }

    /// Reads `data.len()` bytes at `reg` of function `function` of device
    /// `slot` (bus 0); all ones if there is no such function.
    pub fn function_read(&self, slot: u32, function: u32, reg: u64, data: &mut [u8]) {
        self.set_probed();
        data.fill(0xff);
        if let Some(dev) = self.function(slot, function) {
            let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
            dev.config_read(reg, data);
        }
    }

    /// Writes `data` at `reg` of function `function` of device `slot`
    /// (bus 0); dropped if there is no such function.
    pub fn function_write(&self, slot: u32, function: u32, reg: u64, data: &[u8]) {
        self.set_probed();
        if let Some(dev) = self.function(slot, function) {
            let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
            dev.config_write(reg, data);
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset)
                    .ok()
                    .and_then(|o| bytes.get(o + i))
                    .copied()
                    .unwrap_or(0xff);
            }
            return;
        }
        data.fill(0xff);
        if offset >= CONFIG_PORTS || offset + data.len() as u64 > CONFIG_PORTS {
            return;
        }
        if let Some((slot, function, reg)) = self.selected() {
            self.function_read(slot, function, reg + (offset - 4), data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            // Only a full dword sets the address (a byte write to 0xCFB is
            // a type-2 probe, which this bus does not answer).
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(b);
            }
            return;
        }
        if !(4..CONFIG_PORTS).contains(&offset) || offset + data.len() as u64 > CONFIG_PORTS {
            return;
        }
        if let Some((slot, function, reg)) = self.selected() {
            self.function_write(slot, function, reg + (offset - 4), data);
        }
    }
}

#[cfg(test)]
mod tests;
