//! PCI Express enhanced configuration access mechanism (ECAM) for bus 0.
//!
//! [`PciEcam`] is an MMIO [`BusDevice`] of [`BUS_SIZE`] bytes: function
//! `f` of device `d` has its 4 KiB configuration space at
//! `(d << 15) | (f << 12)`, the 256 bytes of the conventional space then
//! the PCI Express extended space (which capsule's functions leave empty:
//! it reads zeros). It reaches the same functions as configuration
//! mechanism #1 on [`super::PciRoot`], whose lock it takes, so a guest
//! may mix both (Linux on x86 does: the ports below offset 0x100, ECAM
//! above). The firmware tables announce it (ACPI MCFG).

use std::sync::{Arc, Mutex};

use super::PciRoot;
use crate::bus::BusDevice;

/// Size of one bus's ECAM window: 32 devices of 8 functions of 4 KiB.
pub const BUS_SIZE: u64 = 1 << 20;
/// Size of one function's configuration space in the window.
pub const FUNCTION_SIZE: u64 = 1 << 12;

/// The ECAM window of bus 0.
#[derive(Debug)]
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    /// The ECAM window of `root`'s bus.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }
}

/// The device, function and register an access of `len` bytes at
/// `offset` addresses; `None` unless it is a naturally aligned 1-, 2- or
/// 4-byte access inside the window (so it never crosses a register or a
/// function), which is all PCI Express allows.
fn decode(offset: u64, len: usize) -> Option<(u32, u32, u64)> {
    let width = match len {
        1 | 2 | 4 => u64::try_from(len).ok()?,
        _ => return None,
    };
    if offset >= BUS_SIZE || !offset.is_multiple_of(width) {
        return None;
    }
    // Below BUS_SIZE (2^20): the device is 5 bits, the function 3.
    let slot = u32::try_from(offset >> 15).ok()?;
    let function = u32::try_from((offset >> 12) & 0x7).ok()?;
    Some((slot, function, offset & (FUNCTION_SIZE - 1)))
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((slot, function, reg)) = decode(offset, data.len()) else {
            data.fill(0xff);
            crate::debug_ratelimited!("PCI ECAM: {}-byte read at {offset:#x}", data.len());
            return;
        };
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        root.function_read(slot, function, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((slot, function, reg)) = decode(offset, data.len()) else {
            crate::debug_ratelimited!("PCI ECAM: {}-byte write at {offset:#x}", data.len());
            return;
        };
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        root.function_write(slot, function, reg, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::ConfigSpace;
    use crate::pci::PciDevice;

    /// A function with a 32 KiB memory BAR at 0xe000_8000.
    struct Function(ConfigSpace);

    impl PciDevice for Function {
        fn config_read(&mut self, offset: u64, data: &mut [u8]) {
            self.0.read(offset, data);
        }
        fn config_write(&mut self, offset: u64, data: &[u8]) {
            self.0.write(offset, data);
        }
    }

    fn ecam() -> PciEcam {
        let mut c = ConfigSpace::new(&crate::pci::tests::id());
        c.set_memory_bar(0, 0xe000_8000, 0x8000).unwrap();
        let mut root = PciRoot::new();
        assert_eq!(root.add(Arc::new(Mutex::new(Function(c)))).unwrap(), 1);
        PciEcam::new(Arc::new(Mutex::new(root)))
    }

    fn addr(dev: u64, function: u64, reg: u64) -> u64 {
        dev << 15 | function << 12 | reg
    }

    fn read(e: &mut PciEcam, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        e.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn ecam_reaches_the_host_bridge_and_the_functions() {
        let mut e = ecam();
        assert_eq!(read(&mut e, addr(0, 0, 0), 4), 0x0d57_8086, "host bridge");
        assert_eq!(read(&mut e, addr(0, 0, 0x0a), 2), 0x0600, "class 0600");
        assert_eq!(read(&mut e, addr(0, 0, 0x0b), 1), 0x06);
        assert_eq!(read(&mut e, addr(1, 0, 0), 4), 0x1042_1af4);
        assert_eq!(read(&mut e, addr(1, 0, 0x10), 4), 0xe000_8000, "BAR 0");
        // BAR sizing through ECAM, then the address back.
        e.write(addr(1, 0, 0x10), &[0xff; 4]);
        assert_eq!(read(&mut e, addr(1, 0, 0x10), 4), 0xffff_8000);
        e.write(addr(1, 0, 0x10), &0xe000_8000u32.to_le_bytes());
        assert_eq!(read(&mut e, addr(1, 0, 0x10), 4), 0xe000_8000);
        // The extended space of a present function: zeros, writes dropped.
        assert_eq!(read(&mut e, addr(1, 0, 0x100), 4), 0);
        e.write(addr(1, 0, 0x100), &[0xff; 4]);
        assert_eq!(read(&mut e, addr(1, 0, 0x100), 4), 0);
        assert_eq!(read(&mut e, addr(0, 0, 0xffc), 4), 0);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let mut e = ecam();
        for (dev, function) in [(2, 0), (31, 0), (0, 1), (1, 7)] {
            assert_eq!(read(&mut e, addr(dev, function, 0), 4), 0xffff_ffff);
            assert_eq!(read(&mut e, addr(dev, function, 0x100), 2), 0xffff);
            e.write(addr(dev, function, 4), &[0xff; 4]);
        }
    }

    #[test]
    fn misaligned_oversized_and_outside_accesses_are_harmless() {
        let mut e = ecam();
        let command = addr(1, 0, 4);
        for (offset, len) in [
            (command + 1, 2),
            (command + 1, 4),
            (command + 2, 4),
            (command, 8),
            (command, 3),
            (command, 0),
            (BUS_SIZE, 4),
            (BUS_SIZE - 2, 4),
            (u64::MAX, 1),
            (u64::MAX - 3, 4),
        ] {
            let mut b = vec![0u8; len];
            e.read(offset, &mut b);
            assert!(b.iter().all(|&x| x == 0xff), "{offset:#x} {len}");
            e.write(offset, &vec![0xff; len]);
        }
        assert_eq!(read(&mut e, command, 2), 0, "command register untouched");
        // Every aligned width at every offset of a function and past it.
        for len in [1usize, 2, 4] {
            for reg in (0..FUNCTION_SIZE + 8).step_by(len) {
                let mut b = vec![0u8; len];
                e.read(addr(1, 0, 0) + reg, &mut b);
                e.read(addr(0, 0, 0) + reg, &mut b);
            }
        }
        assert_eq!(read(&mut e, addr(1, 0, 0), 4), 0x1042_1af4);
    }
}
