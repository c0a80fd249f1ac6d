//! PCI configuration space, configuration mechanism #1 and MSI-X tests.

use std::sync::Mutex as StdMutex;

use super::config::{CONFIG_SIZE, EXTENDED_CONFIG_SIZE};
use super::msix::{MsiMessage, MsiRouter, Msix, CONTROL_ENABLE, CONTROL_FUNCTION_MASK};
use super::*;

/// A virtio function's identity (also for the ECAM tests).
pub(super) fn id() -> Identity {
    Identity {
        vendor: 0x1af4,
        device: 0x1042,
        revision: 1,
        class: [0xff, 0, 0],
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    }
}

fn read32(c: &ConfigSpace, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.read(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn the_header_says_who_the_function_is_and_offers_no_intx() {
    let c = ConfigSpace::new(&id());
    assert_eq!(read32(&c, 0), 0x1042_1af4);
    assert_eq!(read32(&c, 8), 0xff00_0001, "class ff0000, revision 1");
    assert_eq!(read32(&c, 0x2c), 0x0040_1af4);
    assert_eq!(read32(&c, 0x0c) >> 16 & 0xff, 0, "header type 0");
    let mut pin = [0u8];
    c.read(0x3d, &mut pin);
    assert_eq!(pin[0], 0, "no interrupt pin");
}

#[test]
fn read_only_bits_stay_and_writable_ones_change_at_any_width() {
    let mut c = ConfigSpace::new(&id());
    c.write(0, &[0xff; 4]);
    assert_eq!(read32(&c, 0), 0x1042_1af4, "ids are read-only");
    c.write(4, &[0xff, 0xff]);
    assert_eq!(
        c.read_u16(4),
        0x0407,
        "only decode, bus master, INTx disable"
    );
    c.write(0x3c, &[0x0b]);
    let mut b = [0u8; 2];
    c.read(0x3c, &mut b);
    assert_eq!(b, [0x0b, 0], "line is scratch, pin stays 0");
    // Unaligned and odd widths are fine; the extended space reads zeros
    // (an empty list) and drops writes, past it reads all ones.
    c.write(0x3b, &[1, 2, 3]);
    let mut tail = [0u8; 4];
    c.read(CONFIG_SIZE as u64 - 2, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    c.write(0x100, &[0xff; 4]);
    c.read(0x100, &mut tail);
    assert_eq!(tail, [0; 4]);
    c.read(EXTENDED_CONFIG_SIZE as u64 - 2, &mut tail);
    assert_eq!(tail, [0, 0, 0xff, 0xff]);
    c.write(u64::MAX - 1, &[1, 2, 3, 4]);
    c.read(u64::MAX, &mut tail);
    assert_eq!(tail, [0xff; 4]);
}

#[test]
fn bar_sizing_returns_the_size_mask_and_the_address_comes_back() {
    let mut c = ConfigSpace::new(&id());
    c.set_memory_bar(0, 0xe000_8000, 0x8000).unwrap();
    assert_eq!(read32(&c, 0x10), 0xe000_8000);
    c.write(0x10, &[0xff; 4]);
    assert_eq!(read32(&c, 0x10), 0xffff_8000, "size 32 KiB, 32-bit memory");
    c.write(0x10, &0xe000_8000u32.to_le_bytes());
    assert_eq!(c.bar_address(0), Some(0xe000_8000));
    // Unimplemented BARs read zero whatever is written.
    c.write(0x14, &[0xff; 4]);
    assert_eq!(read32(&c, 0x14), 0);
    // Bogus values keep the type bits.
    c.write(0x10, &0x1234_5677u32.to_le_bytes());
    assert_eq!(read32(&c, 0x10) & 0xf, 0);
    assert!(
        c.set_memory_bar(0, 0xe000_1000, 0x8000).is_err(),
        "misaligned"
    );
    assert!(c.set_memory_bar(6, 0, 0x1000).is_err());
    assert!(
        c.set_memory_bar(0, 0, 0x1800).is_err(),
        "not a power of two"
    );
    assert!(c.set_memory_bar(0, 1 << 32, 0x1000).is_err());
}

#[test]
fn capabilities_form_a_chain_from_0x34() {
    let mut c = ConfigSpace::new(&id());
    assert_eq!(c.read_u16(6) & 0x10, 0, "no list yet");
    let a = c.add_capability(0x09, &[4, 1], &[0, 0]).unwrap();
    let b = c
        .add_capability(0x11, &[0, 0, 1, 2, 3, 4], &[0, 0xc0, 0, 0, 0, 0])
        .unwrap();
    assert_eq!(c.read_u16(6) & 0x10, 0x10, "capability list bit");
    let mut walk = Vec::new();
    let mut p = [0u8];
    c.read(0x34, &mut p);
    while p[0] != 0 {
        let mut cap = [0u8; 2];
        c.read(u64::from(p[0]), &mut cap);
        walk.push((p[0], cap[0]));
        p[0] = cap[1];
    }
    assert_eq!(walk, vec![(a as u8, 0x09), (b as u8, 0x11)]);
    // Only the writable bits of a capability change.
    c.write(b as u64 + 2, &[0xff, 0xff]);
    assert_eq!(c.read_u16(b + 2), 0xc000);
    c.write(a as u64, &[0; 4]);
    assert_eq!(
        c.read_u16(a),
        0x0009 | (b as u16) << 8,
        "id and next are read-only"
    );
    let big = vec![0u8; 250];
    assert!(c.add_capability(0x09, &big, &big).is_err());
}

fn config_read(root: &mut PciRoot, slot: u32, reg: u32, len: usize) -> Vec<u8> {
    root.write(0, &(0x8000_0000 | slot << 11 | (reg & 0xfc)).to_le_bytes());
    let mut d = vec![0u8; len];
    root.read(4 + u64::from(reg & 3), &mut d);
    d
}

#[test]
fn a_configuration_access_marks_the_bus_probed() {
    let mut root = PciRoot::new();
    assert!(!root.probed());
    // Setting and reading back the address register is not a look at
    // any function.
    root.write(0, &0x8000_0000u32.to_le_bytes());
    root.read(0, &mut [0u8; 4]);
    assert!(!root.probed());
    // A read of an absent function is one.
    config_read(&mut root, 7, 0, 4);
    assert!(root.probed());
    // Through ECAM, a write counts too.
    let root = PciRoot::new();
    root.function_write(0, 0, 4, &[0; 2]);
    assert!(root.probed());
    let root = PciRoot::new();
    root.set_probed();
    assert!(root.probed());
}

#[test]
fn mechanism_1_reaches_the_host_bridge_and_added_devices_only() {
    let mut root = PciRoot::new();
    // Linux's probe: the address register reads back what was written.
    root.write(0, &0x8000_0000u32.to_le_bytes());
    let mut a = [0u8; 4];
    root.read(0, &mut a);
    assert_eq!(u32::from_le_bytes(a), 0x8000_0000);
    root.write(3, &[1]); // a byte to 0xCFB changes nothing
    root.read(0, &mut a);
    assert_eq!(u32::from_le_bytes(a), 0x8000_0000);
    // Host bridge: class 0600 at 0x0a, as Linux's sanity check reads it.
    assert_eq!(config_read(&mut root, 0, 0x0a, 2), vec![0x00, 0x06]);
    // Empty slot, function 1, bus 1, disabled: all ones.
    assert_eq!(config_read(&mut root, 1, 0, 4), vec![0xff; 4]);
    root.write(0, &(0x8000_0100u32).to_le_bytes());
    let mut d = [0u8; 4];
    root.read(4, &mut d);
    assert_eq!(d, [0xff; 4], "function 1");
    root.write(0, &(0x8001_0000u32).to_le_bytes());
    root.read(4, &mut d);
    assert_eq!(d, [0xff; 4], "bus 1");
    root.write(0, &0u32.to_le_bytes());
    root.read(4, &mut d);
    assert_eq!(d, [0xff; 4], "not enabled");

    let dev = Arc::new(Mutex::new(HostBridge::default()));
    assert_eq!(root.add(dev).unwrap(), 1);
    assert_eq!(config_read(&mut root, 1, 0, 2), vec![0x86, 0x80]);
    // Accesses crossing the data ports' end or at odd offsets are dropped.
    root.read(7, &mut d);
    assert_eq!(d, [0xff; 4]);
    root.write(7, &[0; 4]);
    root.read(100, &mut d);
    for _ in 2..SLOTS {
        root.add(Arc::new(Mutex::new(HostBridge::default())))
            .unwrap();
    }
    assert_eq!(
        root.add(Arc::new(Mutex::new(HostBridge::default()))),
        Err(Error::BusFull)
    );
}

#[derive(Default)]
struct Routes(StdMutex<Vec<(u32, Option<MsiMessage>)>>);

impl MsiRouter for Routes {
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
        self.0.lock().unwrap().push((gsi, message));
        Ok(())
    }
}

fn fired(m: &Msix, i: usize) -> bool {
    m.irqs()[i].read().is_ok()
}

fn program(m: &mut Msix, i: u64, addr: u64, data: u32) {
    m.table_write(i * 16, &(addr as u32).to_le_bytes());
    m.table_write(i * 16 + 4, &((addr >> 32) as u32).to_le_bytes());
    m.table_write(i * 16 + 8, &data.to_le_bytes());
}

#[test]
fn msix_routes_live_vectors_and_holds_masked_ones_pending() {
    let routes = Arc::new(Routes::default());
    let mut m = Msix::new(3, 24, routes.clone()).unwrap();
    assert_eq!((m.len(), m.gsi(2), m.gsi(3)), (3, Some(26), None));
    // Vectors start masked: a signal is pending, nothing fires.
    program(&mut m, 1, 0xfee0_0000, 0x41);
    assert!(m.signal(1));
    assert!(!fired(&m, 1) && m.is_pending(1));
    let mut pba = [0u8; 8];
    m.pba_read(0, &mut pba);
    assert_eq!(pba[0], 0b10);
    assert!(
        routes.0.lock().unwrap().is_empty(),
        "nothing routed while masked"
    );
    // Enabled, but the function mask holds everything.
    m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
    m.table_write(16 + 12, &0u32.to_le_bytes());
    assert!(!fired(&m, 1));
    // Function unmasked: routed, then the pending interrupt fires.
    m.set_control(CONTROL_ENABLE);
    let want = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert_eq!(*routes.0.lock().unwrap(), vec![(25, Some(want))]);
    assert!(fired(&m, 1) && !m.is_pending(1));
    m.signal(1);
    assert!(fired(&m, 1));
    // Re-targeting a live vector re-routes it; the same message does not.
    program(&mut m, 1, 0xfee0_1000, 0x42);
    program(&mut m, 1, 0xfee0_1000, 0x42);
    assert_eq!(
        routes.0.lock().unwrap().len(),
        3,
        "lo, hi (same), data writes"
    );
    // Vector mask: pending again, fires on unmask.
    m.table_write(16 + 12, &1u32.to_le_bytes());
    m.signal(1);
    assert!(!fired(&m, 1) && m.is_pending(1));
    m.table_write(16 + 12, &0u32.to_le_bytes());
    assert!(fired(&m, 1));
    // Disabling MSI-X holds interrupts too.
    m.set_control(0);
    m.signal(1);
    assert!(!fired(&m, 1));
    assert_eq!(m.control(), 0);
}

#[test]
fn msix_table_accesses_of_any_shape_are_safe() {
    let routes = Arc::new(Routes::default());
    let mut m = Msix::new(2, 24, routes).unwrap();
    let mut d = [0u8; 8];
    m.table_read(12, &mut d[..4]);
    assert_eq!(d[..4], [1, 0, 0, 0], "masked at reset");
    // Odd widths, misaligned, past the table, huge offsets: ignored.
    for off in [0u64, 1, 3, 31, 32, 4096, u64::MAX - 3, u64::MAX] {
        for len in [1usize, 2, 3, 4, 8] {
            let mut buf = vec![0xaau8; len];
            m.table_read(off, &mut buf);
            m.table_write(off, &buf);
            m.pba_read(off, &mut buf);
        }
    }
    // A qword write sets address low and high at once; control keeps
    // only the mask bit.
    m.table_write(0, &0x0000_0001_fee0_0000u64.to_le_bytes());
    m.table_write(8, &0xffff_ffff_0000_0030u64.to_le_bytes());
    m.table_read(0, &mut d);
    assert_eq!(u64::from_le_bytes(d), 0x0000_0001_fee0_0000);
    m.table_read(8, &mut d);
    assert_eq!(u64::from_le_bytes(d), 0x0000_0001_0000_0030);
    assert!(!m.signal(2), "no vector 2");
    assert!(!m.signal(u16::MAX));
}
