//! A device behind a virtio-pci function, reached the way a guest reaches
//! it under capsule's `--transport pci`.
//!
//! [`Pci`] builds what `DeviceManager::attach_virtio_pci` builds, minus
//! KVM: bus 0 ([`PciRoot`], host bridge in slot 0, the function in slot
//! [`SLOT`]) on a port-I/O [`Bus`] at 0xCF8, and on an MMIO [`Bus`] the
//! ECAM window at [`ECAM`] and the function's BAR at [`BAR`]. Every guest
//! access goes through those buses, as a vCPU's exits do. Two things KVM
//! would do are stood in for: a queue's notification address is an
//! ioeventfd there, here the write reaches the BAR, which signals the same
//! eventfd; and the MSI-X routes KVM would hold are recorded by
//! [`Routes`], which panics (a crash for the fuzzer) if the function ever
//! routes a GSI that is not one of its own.
//!
//! [`run`] is the `virtio_pci` target. Its input: `kind: u8 | image_len:
//! u16 | image | opts: [u8; 8] | setup: u8 | [features: u64, if setup
//! bit 0] | ops`: the device type ([`Kind::from_byte`]), guest memory
//! from address 0, the device's options ([`Rig::new`]); bit 0 of `setup`
//! brings the driver up first ([`Pci::set_up_driver`]), so that the
//! operations start from a running device. Each operation is an `op` byte
//! (low nibble: what, listed at `step`; high nibble: the access width,
//! from [`WIDTHS`]) and its operands, at most [`MAX_OPS`] of them.
//!
//! Checks a target can make: [`Pci::take_interrupts`] (every interrupt
//! went out on a GSI the function had routed to a message),
//! [`Pci::compare_mechanisms`] (the configuration ports and ECAM read the
//! same bytes) and [`Pci::check`] (the function's identity and BAR are
//! as capsule built them).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::Bus;
use devices::pci::config::overlaps;
use devices::pci::ecam::{PciEcam, BUS_SIZE};
use devices::pci::msix::{MsiMessage, MsiRouter, CONTROL_ENABLE, CONTROL_FUNCTION_MASK};
use devices::pci::{PciRoot, CONFIG_ADDRESS_PORT, CONFIG_PORTS};
use devices::virtio::pci::{layout, VirtioPci};
use devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;

use super::{queue_layout, Kind, Rig, TransportKind, QUEUE_SIZE};
use crate::Input;

/// Where capsule puts the first function's BAR.
pub const BAR: u64 = arch::layout::PCI_MMIO_START;
/// Where the ECAM window of bus 0 is.
pub const ECAM: u64 = arch::layout::PCI_ECAM_START;
/// The first MSI-X vector's GSI.
pub const FIRST_GSI: u32 = arch::layout::FIRST_MSI_GSI;
/// The function's device number on bus 0 (the host bridge is 0).
pub const SLOT: u8 = 1;
/// The first data port of configuration mechanism #1.
pub const DATA_PORT: u64 = CONFIG_ADDRESS_PORT as u64 + 4;

/// Offsets in the common configuration structure (virtio 1.2 §4.1.4.3).
pub mod common {
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

    /// Every register with its width, for driver-like accesses; the
    /// 64-bit queue addresses also as their two halves.
    pub const REGISTERS: [(u64, usize); 22] = [
        (DEVICE_FEATURE_SELECT, 4),
        (DEVICE_FEATURE, 4),
        (DRIVER_FEATURE_SELECT, 4),
        (DRIVER_FEATURE, 4),
        (CONFIG_MSIX_VECTOR, 2),
        (NUM_QUEUES, 2),
        (DEVICE_STATUS, 1),
        (CONFIG_GENERATION, 1),
        (QUEUE_SELECT, 2),
        (QUEUE_SIZE, 2),
        (QUEUE_MSIX_VECTOR, 2),
        (QUEUE_ENABLE, 2),
        (QUEUE_NOTIFY_OFF, 2),
        (QUEUE_DESC, 8),
        (QUEUE_DESC, 4),
        (QUEUE_DESC + 4, 4),
        (QUEUE_DRIVER, 8),
        (QUEUE_DRIVER, 4),
        (QUEUE_DRIVER + 4, 4),
        (QUEUE_DEVICE, 8),
        (QUEUE_DEVICE, 4),
        (QUEUE_DEVICE + 4, 4),
    ];
}

/// Configuration-space offsets the harness uses.
const COMMAND: u8 = 0x04;
const CAPABILITIES: u8 = 0x34;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
/// `cfg_type` of the `VIRTIO_PCI_CAP_PCI_CFG` capability.
const CFG_PCI: u8 = 5;
/// Where, in that capability, its fields are.
pub mod pci_cfg {
    pub const BAR: u64 = 4;
    pub const OFFSET: u64 = 8;
    pub const LENGTH: u64 = 12;
    pub const DATA: u64 = 16;
}

/// The GSI routes KVM would hold for the function's vectors.
pub struct Routes {
    vectors: usize,
    table: Mutex<Vec<Option<MsiMessage>>>,
}

impl Routes {
    fn new(vectors: usize) -> Self {
        Self {
            vectors,
            table: Mutex::new(vec![None; vectors]),
        }
    }

    /// The route of vector `i`'s GSI, if the function set one.
    pub fn route_of(&self, i: usize) -> Option<MsiMessage> {
        self.table.lock().unwrap().get(i).copied().flatten()
    }
}

impl MsiRouter for Routes {
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        // A GSI outside the function's would re-route another device's
        // interrupt (or an IOAPIC pin) in a real VM.
        let i = gsi
            .checked_sub(FIRST_GSI)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < self.vectors)
            .unwrap_or_else(|| panic!("MSI-X routed GSI {gsi}, not one of the function's"));
        self.table.lock().unwrap()[i] = message;
        Ok(())
    }
}

/// Bus 0 with one virtio-pci function, and the buses a guest reaches it
/// through.
pub struct Pci {
    pio: Bus,
    mmio: Bus,
    function: Arc<Mutex<VirtioPci>>,
    routes: Arc<Routes>,
    vectors: usize,
    msix_cap: u8,
    pci_cfg_cap: u8,
    /// The function's vendor and device id, as first read.
    identity: u32,
}

impl Pci {
    /// `device` behind a function at [`SLOT`] with its BAR at [`BAR`],
    /// over `mem`; the capabilities a driver looks for are found the way
    /// a driver finds them, by walking the list.
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let queues = device.lock().unwrap().queue_max_sizes().len();
        let vectors = queues + 1;
        let routes = Arc::new(Routes::new(vectors));
        let router: Arc<dyn MsiRouter> = routes.clone();
        let function = VirtioPci::new(mem, device, BAR, FIRST_GSI, router).expect("function");
        let function = Arc::new(Mutex::new(function));
        let mut root = PciRoot::new();
        assert_eq!(root.add(function.clone()).expect("slot"), SLOT);
        let root = Arc::new(Mutex::new(root));
        let mut pio = Bus::new();
        pio.insert(root.clone(), u64::from(CONFIG_ADDRESS_PORT), CONFIG_PORTS)
            .expect("ports");
        let mut mmio = Bus::new();
        mmio.insert(Arc::new(Mutex::new(PciEcam::new(root))), ECAM, BUS_SIZE)
            .expect("ECAM");
        mmio.insert(function.clone(), BAR, layout::BAR_SIZE)
            .expect("BAR");
        let mut pci = Self {
            pio,
            mmio,
            function,
            routes,
            vectors,
            msix_cap: 0,
            pci_cfg_cap: 0,
            identity: 0,
        };
        pci.identity = pci.conf_read(SLOT, 0, 4) as u32;
        let mut cap = pci.conf_read(SLOT, CAPABILITIES, 1) as u8;
        // A chain longer than 256 bytes can hold would be a loop.
        for _ in 0..64 {
            if cap == 0 {
                break;
            }
            let id = pci.conf_read(SLOT, cap, 1) as u8;
            if id == CAP_MSIX {
                pci.msix_cap = cap;
            } else if id == CAP_VENDOR && pci.conf_read(SLOT, cap + 3, 1) as u8 == CFG_PCI {
                pci.pci_cfg_cap = cap;
            }
            cap = pci.conf_read(SLOT, cap + 1, 1) as u8;
        }
        assert!(pci.msix_cap != 0 && pci.pci_cfg_cap != 0, "capabilities");
        pci
    }

    /// The function.
    pub fn function(&self) -> MutexGuard<'_, VirtioPci> {
        self.function.lock().unwrap()
    }

    /// MSI-X vectors of the function (one per queue, one for the
    /// configuration).
    pub fn vectors(&self) -> usize {
        self.vectors
    }

    /// Offset of the MSI-X capability in configuration space.
    pub fn msix_cap(&self) -> u8 {
        self.msix_cap
    }

    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability.
    pub fn pci_cfg_cap(&self) -> u8 {
        self.pci_cfg_cap
    }

    /// A port read (a vCPU's `in`); ports nothing decodes are left alone.
    pub fn port_read(&mut self, port: u64, data: &mut [u8]) {
        self.pio.read(port, data);
    }

    /// A port write (a vCPU's `out`).
    pub fn port_write(&mut self, port: u64, data: &[u8]) {
        self.pio.write(port, data);
    }

    /// A guest-physical memory read (a vCPU's MMIO exit).
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }

    /// A guest-physical memory write.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }

    /// The configuration address of register `reg` of `slot` on bus 0
    /// (function 0, enabled).
    pub fn conf1_address(slot: u8, reg: u8) -> u32 {
        1 << 31 | u32::from(slot & 0x1f) << 11 | u32::from(reg & 0xfc)
    }

    /// Reads `data.len()` bytes of `slot`'s register `reg` through
    /// mechanism #1: the address to 0xCF8, the data from 0xCFC + the low
    /// bits of `reg`, as Linux's `pci_conf1_read` does.
    pub fn conf1_read(&mut self, slot: u8, reg: u8, data: &mut [u8]) {
        let address = Self::conf1_address(slot, reg).to_le_bytes();
        self.port_write(u64::from(CONFIG_ADDRESS_PORT), &address);
        self.port_read(DATA_PORT + u64::from(reg & 3), data);
    }

    /// Writes `data` to `slot`'s register `reg` through mechanism #1.
    pub fn conf1_write(&mut self, slot: u8, reg: u8, data: &[u8]) {
        let address = Self::conf1_address(slot, reg).to_le_bytes();
        self.port_write(u64::from(CONFIG_ADDRESS_PORT), &address);
        self.port_write(DATA_PORT + u64::from(reg & 3), data);
    }

    /// Register `reg` of `slot` (width `len`, at most 8) through
    /// mechanism #1, as a number.
    pub fn conf_read(&mut self, slot: u8, reg: u8, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.conf1_read(slot, reg, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// The ECAM offset of register `reg` of `function` of `slot`.
    pub fn ecam_offset(slot: u8, function: u8, reg: u16) -> u64 {
        u64::from(slot & 0x1f) << 15 | u64::from(function & 7) << 12 | u64::from(reg)
    }

    /// A read at offset `offset` of the ECAM window.
    pub fn ecam_read(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio_read(ECAM + offset, data);
    }

    /// A write at offset `offset` of the ECAM window.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        self.mmio_write(ECAM + offset, data);
    }

    /// A read at `offset` of the function's BAR.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio_read(BAR + offset, data);
    }

    /// A write at `offset` of the function's BAR.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        self.mmio_write(BAR + offset, data);
    }

    /// Writes the low `len` bytes of `value` to the common configuration
    /// at `offset`.
    pub fn common_write(&mut self, offset: u64, value: u64, len: usize) {
        self.bar_write(layout::COMMON + offset, &value.to_le_bytes()[..len]);
    }

    /// Reads `len` bytes of the common configuration at `offset`.
    pub fn common_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.bar_read(layout::COMMON + offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Writes the device status.
    pub fn write_status(&mut self, status: u32) {
        self.common_write(common::DEVICE_STATUS, u64::from(status), 1);
    }

    /// Writes MSI-X table entry `vector`: message address and data, and
    /// whether it is masked.
    pub fn program_vector(&mut self, vector: usize, address: u64, data: u32, masked: bool) {
        let entry = layout::MSIX_TABLE + 16 * vector as u64;
        self.bar_write(entry, &address.to_le_bytes());
        let control = u64::from(data) | u64::from(masked) << 32;
        self.bar_write(entry + 8, &control.to_le_bytes());
    }

    /// The status handshake and feature negotiation up to FEATURES_OK,
    /// as Linux's `virtio_pci_modern` does it (`VERSION_1` always acked).
    pub fn negotiate(&mut self, features: u64) {
        self.write_status(ACKNOWLEDGE);
        self.write_status(ACKNOWLEDGE | DRIVER);
        for select in 0..2 {
            self.common_write(common::DEVICE_FEATURE_SELECT, select, 4);
            self.common_read(common::DEVICE_FEATURE, 4);
        }
        self.common_write(common::DRIVER_FEATURE_SELECT, 0, 4);
        self.common_write(common::DRIVER_FEATURE, features & 0xffff_ffff, 4);
        self.common_write(common::DRIVER_FEATURE_SELECT, 1, 4);
        self.common_write(common::DRIVER_FEATURE, (features >> 32) | 1, 4);
        self.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.common_read(common::DEVICE_STATUS, 1);
    }

    /// A driver's whole bring-up: memory decoding and bus mastering on,
    /// MSI-X on with every vector programmed and unmasked, the
    /// negotiation, vector 0 for configuration changes, queue `i` at
    /// [`queue_layout`]`(i)` with vector `i + 1`, then DRIVER_OK.
    pub fn set_up_driver(&mut self, features: u64, queues: u32) {
        self.conf1_write(SLOT, COMMAND, &0x0006u16.to_le_bytes());
        let control = self.msix_cap + 2;
        let masked = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        self.conf1_write(SLOT, control, &masked.to_le_bytes());
        for v in 0..self.vectors {
            // x86's MSI address window, one vector each.
            self.program_vector(v, 0xfee0_0000, 0x30 + v as u32, false);
        }
        self.conf1_write(SLOT, control, &CONTROL_ENABLE.to_le_bytes());
        self.negotiate(features);
        self.common_write(common::CONFIG_MSIX_VECTOR, 0, 2);
        for q in 0..queues {
            let (desc, avail, used) = queue_layout(q);
            self.common_write(common::QUEUE_SELECT, u64::from(q), 2);
            self.common_write(common::QUEUE_SIZE, u64::from(QUEUE_SIZE), 2);
            self.common_write(common::QUEUE_MSIX_VECTOR, u64::from(q) + 1, 2);
            // Linux writes the addresses as two 32-bit halves.
            for (reg, addr) in [
                (common::QUEUE_DESC, desc),
                (common::QUEUE_DRIVER, avail),
                (common::QUEUE_DEVICE, used),
            ] {
                self.common_write(reg, addr & 0xffff_ffff, 4);
                self.common_write(reg + 4, addr >> 32, 4);
            }
            self.common_write(common::QUEUE_ENABLE, 1, 2);
        }
        self.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Notifies queue `q` at its notification address (Linux writes the
    /// queue index, 16 bits).
    pub fn notify(&mut self, q: u32) {
        let at = layout::NOTIFY + u64::from(layout::NOTIFY_MULTIPLIER) * u64::from(q);
        let index = u16::try_from(q).unwrap_or(u16::MAX);
        self.bar_write(at, &index.to_le_bytes());
    }

    /// Reads (and so clears) the ISR status byte.
    pub fn read_isr(&mut self) -> u8 {
        let mut b = [0u8; 1];
        self.bar_read(layout::ISR, &mut b);
        b[0]
    }

    /// Takes the interrupts the function raised (the vectors whose
    /// eventfd, KVM's irqfd, was signalled) and checks each went out on
    /// a GSI the function had routed to a message: an irqfd on a GSI
    /// with no route would deliver nothing, or whatever the GSI meant
    /// before.
    pub fn take_interrupts(&mut self) -> Vec<usize> {
        let fired: Vec<usize> = {
            let f = self.function.lock().unwrap();
            let msix = f.interrupt().msix();
            msix.irqs()
                .iter()
                .enumerate()
                .filter(|(_, evt)| evt.read().is_ok())
                .map(|(i, _)| i)
                .collect()
        };
        for &i in &fired {
            assert!(
                self.routes.route_of(i).is_some(),
                "MSI-X vector {i} raised its irqfd with no route"
            );
        }
        fired
    }

    /// Reads register `reg` (a naturally aligned access of 1, 2 or 4
    /// bytes) of `slot` through both mechanisms and checks they agree.
    /// Skipped where the read itself has an effect: the
    /// `VIRTIO_PCI_CAP_PCI_CFG` data field reads the BAR (the ISR clears
    /// on read).
    pub fn compare_mechanisms(&mut self, slot: u8, reg: u8, len: usize) {
        let len = match len {
            1 | 2 | 4 => len,
            _ => 4,
        };
        let reg = reg & !(len as u8 - 1);
        let data = usize::from(self.pci_cfg_cap) + pci_cfg::DATA as usize;
        if slot == SLOT && overlaps(u64::from(reg), len, data, 4) {
            return;
        }
        let mut ports = [0u8; 4];
        self.conf1_read(slot, reg, &mut ports[..len]);
        let mut ecam = [0u8; 4];
        self.ecam_read(Self::ecam_offset(slot, 0, u16::from(reg)), &mut ecam[..len]);
        assert_eq!(
            ports, ecam,
            "slot {slot} register {reg:#x}: the ports and ECAM differ"
        );
    }

    /// What must hold whatever the guest did: the function still decodes
    /// its BAR where capsule put it, both mechanisms still find it with
    /// its identity, and interrupts went out on routed GSIs.
    pub fn check(&mut self) {
        self.take_interrupts();
        assert_eq!(self.function().bar(), BAR, "the BAR moved");
        assert_eq!(self.conf_read(SLOT, 0, 4) as u32, self.identity);
        let mut id = [0u8; 4];
        self.ecam_read(Self::ecam_offset(SLOT, 0, 0), &mut id);
        assert_eq!(u32::from_le_bytes(id), self.identity);
    }
}

/// Most operations run per input, so one input cannot take long.
pub const MAX_OPS: usize = 512;
/// Access widths: what KVM reports, and two it never does.
pub const WIDTHS: [usize; 6] = [1, 2, 4, 8, 3, 0];
/// Bytes past the BAR's end an access may reach (nothing decodes them).
const PAST_BAR: u64 = 0x100;

/// Runs one input of the `virtio_pci` target (see the module
/// documentation); returns the rig afterwards, for tests to look at.
pub fn run(data: &[u8]) -> Rig {
    let mut input = Input::new(data);
    let kind = Kind::from_byte(input.u8());
    let image_len = usize::from(input.u16() % 4096);
    let image = input.bytes(image_len);
    let mut opts = Input::new(input.bytes(8));
    let mut rig = Rig::new_over(TransportKind::Pci, kind, &mut opts, image);
    if input.u8() & 1 != 0 {
        rig.set_up_driver(input.u64());
    }
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        step(&mut rig, &mut input);
    }
    rig.run_events();
    rig.pci().expect("a PCI rig").check();
    rig
}

/// One guest operation: 0/1 a configuration read/write through the
/// ports (`slot: u8 | reg: u8 [| value: u64]`), 2/3 any port near them
/// (`port: u8 [| value]`), 4/5 an ECAM read/write (`sel: u8 | reg: u16
/// [| value]`), 6/7 a BAR read/write (`offset: u16 [| value]`), 8 a
/// common configuration register at its width (`index: u8 | value:
/// u64`), 9 an MSI-X table entry (`vector: u8 | address: u64 | data: u32
/// | masked: u8`), 10 the MSI-X message control (`bits: u8`), 11 the
/// `PCI_CFG` window (`pci_cfg_access`), 12 a queue notification (`q:
/// u8`), 13 a memory patch (`addr: u16 | len: u8 | bytes`), 14 by the
/// next byte: take interrupts, driver reset, bring-up (`features: u64`),
/// or the two mechanisms compared (`slot: u8 | reg: u8`), 15 an
/// event-loop run.
fn step(rig: &mut Rig, input: &mut Input<'_>) {
    let op = input.u8();
    let width = WIDTHS[usize::from(op >> 4) % WIDTHS.len()];
    let queues = rig.queues;
    let pci = rig.pci().expect("a PCI rig");
    let mut buf = [0u8; 8];
    match op & 0xf {
        // Mechanism #1, the way a driver uses it: an address, then data.
        0 => {
            let (slot, reg) = (input.u8() % 4, input.u8());
            pci.conf1_read(slot, reg, &mut buf[..width]);
        }
        1 => {
            let (slot, reg) = (input.u8() % 4, input.u8());
            let v = input.u64().to_le_bytes();
            pci.conf1_write(slot, reg, &v[..width]);
        }
        // Any port around the eight of mechanism #1, any value: another
        // bus, disabled addresses, byte writes to 0xCF8.
        2 => {
            let port = 0xcf6 + u64::from(input.u8() % 12);
            pci.port_read(port, &mut buf[..width]);
        }
        3 => {
            let port = 0xcf6 + u64::from(input.u8() % 12);
            let v = input.u64().to_le_bytes();
            pci.port_write(port, &v[..width]);
        }
        // ECAM: any of the first four slots, any function, registers in
        // and just past the 4 KiB space; or anywhere in the window.
        4 | 5 => {
            let sel = input.u8();
            let reg = input.u16();
            let offset = if sel & 0x80 != 0 {
                u64::from(reg) << 4 | u64::from(sel & 0xf)
            } else {
                Pci::ecam_offset(sel % 4, (sel >> 2) & 7, reg % 0x1004)
            };
            if op & 0xf == 4 {
                pci.ecam_read(offset, &mut buf[..width]);
            } else {
                let v = input.u64().to_le_bytes();
                pci.ecam_write(offset, &v[..width]);
            }
        }
        // The BAR at any offset and width.
        6 => {
            let offset = u64::from(input.u16()) % (layout::BAR_SIZE + PAST_BAR);
            pci.bar_read(offset, &mut buf[..width]);
        }
        7 => {
            let offset = u64::from(input.u16()) % (layout::BAR_SIZE + PAST_BAR);
            let v = input.u64().to_le_bytes();
            pci.bar_write(offset, &v[..width]);
        }
        // A common configuration register at its own width, as a driver
        // writes it.
        8 => {
            let regs = common::REGISTERS;
            let (reg, len) = regs[usize::from(input.u8()) % regs.len()];
            let v = input.u64();
            pci.common_write(reg, v, len);
        }
        // An MSI-X table entry, or one past the table.
        9 => {
            let vector = usize::from(input.u8()) % (pci.vectors() + 1);
            let (address, data, control) = (input.u64(), input.u32(), input.u8());
            pci.program_vector(vector, address, data, control & 1 != 0);
        }
        // The message control register: enable and function mask.
        10 => {
            let control = u16::from(input.u8() & 0xc0) << 8;
            let reg = pci.msix_cap() + 2;
            pci.conf1_write(SLOT, reg, &control.to_le_bytes());
        }
        // The PCI_CFG window: BAR, offset and length into the capability,
        // then its data read or written, through the ports or ECAM.
        11 => pci_cfg_access(pci, input, width),
        12 => {
            let q = u32::from(input.u8()) % (queues + 1);
            rig.notify(q);
        }
        13 => {
            let addr = u64::from(input.u16());
            let len = usize::from(input.u8());
            let bytes = input.bytes(len);
            rig.poke(addr, bytes);
            rig.run_events();
        }
        14 => match input.u8() % 4 {
            0 => rig.ack_interrupts(),
            1 => rig.reset_driver(),
            2 => rig.set_up_driver(input.u64()),
            _ => {
                let (slot, reg) = (input.u8() % 4, input.u8());
                pci.compare_mechanisms(slot, reg, width);
            }
        },
        _ => rig.run_events(),
    }
}

/// One access through the `VIRTIO_PCI_CAP_PCI_CFG` window.
fn pci_cfg_access(pci: &mut Pci, input: &mut Input<'_>, width: usize) {
    let flags = input.u8();
    let cap = pci.pci_cfg_cap();
    // Mostly BAR 0 and an offset inside it, sometimes anything.
    let bar = if flags & 1 != 0 { input.u8() } else { 0 };
    let offset = if flags & 2 != 0 {
        input.u32()
    } else {
        u32::from(input.u16()) % (layout::BAR_SIZE as u32 + 8)
    };
    let length = [1u32, 2, 4, 0, 3, 8][usize::from((flags >> 2) & 7) % 6];
    let via_ecam = flags & 0x20 != 0;
    let put = |pci: &mut Pci, field: u64, bytes: &[u8]| {
        let reg = u64::from(cap) + field;
        if via_ecam {
            pci.ecam_write(Pci::ecam_offset(SLOT, 0, reg as u16), bytes);
        } else {
            pci.conf1_write(SLOT, reg as u8, bytes);
        }
    };
    put(pci, pci_cfg::BAR, &[bar]);
    put(pci, pci_cfg::OFFSET, &offset.to_le_bytes());
    put(pci, pci_cfg::LENGTH, &length.to_le_bytes());
    let data = u64::from(cap) + pci_cfg::DATA;
    let width = width.clamp(1, 4);
    if flags & 0x40 != 0 {
        let v = input.u32().to_le_bytes();
        put(pci, pci_cfg::DATA, &v[..width]);
    } else {
        let mut b = [0u8; 4];
        if via_ecam {
            pci.ecam_read(Pci::ecam_offset(SLOT, 0, data as u16), &mut b[..width]);
        } else {
            pci.conf1_read(SLOT, data as u8, &mut b[..width]);
        }
    }
}
