//! The DSDT: the AML that describes capsule's devices to the guest (the
//! `\_S5_` power-off package, COM1, the i8042, pvpanic, each virtio-mmio
//! device and, with virtio-pci, the PCI root bridge). The other tables,
//! which are fixed-layout structures rather than AML, are in the parent
//! module.

use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, Aml, AmlSink};

use super::{Error, DSDT_REVISION, OEM_ID, OEM_REVISION, OEM_TABLE_ID, SDT_HEADER_LEN};
use crate::layout::{
    addr32, ACPI_S5_SLEEP_TYPE, COM1_IRQ, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT,
    I8042_KBD_IRQ, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START, PVPANIC_PORT,
};

/// A memory-mapped device that the DSDT describes to the guest (virtio-mmio
/// devices: on a hardware-reduced platform Linux only maps the interrupt
/// of a device that firmware describes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base address of the register window.
    pub base: u64,
    /// Length of the register window.
    pub len: u64,
    /// Interrupt line (GSI), edge-triggered, active-high.
    pub gsi: u32,
}

/// ACPI hardware id of virtio-mmio devices, as Linux's virtio_mmio driver
/// matches it.
pub(super) const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Configuration mechanism #1's ports (address, then data).
const PCI_CONFIG_PORT: u16 = 0xcf8;

/// The PCI root bridge of bus 0 (`--transport pci`): a PCI Express root
/// (PNP0A08, compatible with the conventional PNP0A03), segment 0, bus 0
/// only, configuration through ports 0xCF8-0xCFF and through the ECAM
/// window the MCFG table announces, BARs in the PCI memory window. No
/// `_PRT`: the functions have no INTx (their interrupt pin is 0) and
/// interrupt through MSI-X. Beside it a motherboard resource device
/// (PNP0C02) holds the ECAM window in its `_CRS`: Linux uses an MCFG
/// window only once it finds it reserved there (or in the e820 map).
fn write_pci_root(body: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8);
    let mem = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        addr32(PCI_MMIO_START),
        addr32(PCI_MMIO_START + PCI_MMIO_SIZE - 1),
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&bus, &cfg, &mem]),
    );
    let dev = aml::Device::new("PCI0".into(), vec![&hid, &cid, &seg, &bbn, &uid, &crs]);

    let mbrd_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let ecam = aml::Memory32Fixed::new(true, addr32(PCI_ECAM_START), addr32(PCI_ECAM_SIZE));
    let mbrd_crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam]));
    let mbrd = aml::Device::new("MBRD".into(), vec![&mbrd_hid, &uid, &mbrd_crs]);
    aml::Scope::new("\\_SB_".into(), vec![&dev, &mbrd]).to_aml_bytes(body);
}

/// Builds the DSDT: `\_S5_`, COM1, the pvpanic device and `virtio_mmio`
/// devices, and with `pci` the PCI root bridge.
pub(super) fn build_dsdt(virtio_mmio: &[MmioDevice], pci: bool) -> Result<Vec<u8>, Error> {
    let mut body = Vec::new();
    write_s5(&mut body);
    write_system_bus(&mut body, virtio_mmio)?;
    if pci {
        write_pci_root(&mut body);
    }
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// AML already serialized, as a child of an `aml` object. The `aml`
/// objects borrow their parts, so a function cannot return a device it
/// built from its own locals; it serializes it instead, and the scope
/// takes the bytes.
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Appends the `\_S5_` package: the sleep type that powers the VM off.
fn write_s5(body: &mut Vec<u8>) {
    // \_S5_: SLP_TYP for the sleep control register; the second value would
    // be for PM1b, which does not exist.
    let s5_type = ACPI_S5_SLEEP_TYPE;
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_type, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );
    s5.to_aml_bytes(body);
}

/// Appends the `\_SB_` scope: COM1, the i8042 keyboard, pvpanic and the
/// `virtio_mmio` devices, each with the same always-present `_STA`.
fn write_system_bus(body: &mut Vec<u8>, virtio_mmio: &[MmioDevice]) -> Result<(), Error> {
    // _STA: present, enabled, shown in UI, functioning.
    let sta_value = 0x0fu8;
    let sta_return = aml::Return::new(&sta_value);
    let sta = aml::Method::new("_STA".into(), 0, false, vec![&sta_return]);

    let mut devices = Vec::new();
    write_com1(&mut devices, &sta);
    write_keyboard(&mut devices, &sta);
    write_pvpanic(&mut devices, &sta);
    write_virtio_mmio_devices(&mut devices, &sta, virtio_mmio)?;
    let devices = Encoded(devices);
    aml::Scope::new("\\_SB_".into(), vec![&devices]).to_aml_bytes(body);
    Ok(())
}

/// Appends COM1 (PNP0501): its ports and IRQ.
fn write_com1(sb: &mut Vec<u8>, sta: &dyn Aml) {
    // COM1. Describing it lets Linux map its GSI: on a hardware-reduced
    // platform there is no legacy PIC, so ISA IRQs are not pre-mapped.
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]),
    );
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, sta, &com1_crs]);
    com1.to_aml_bytes(sb);
}

/// Appends the i8042 keyboard (PNP0303): its data and command ports and
/// IRQ 1.
fn write_keyboard(sb: &mut Vec<u8>, sta: &dyn Aml) {
    // The i8042 keyboard (PNP0303): data and command ports and IRQ 1, so
    // Linux maps the keyboard interrupt (ISA IRQs are not pre-mapped here)
    // and takes the device to have no auxiliary (mouse) port.
    let kbd_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let kbd_data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let kbd_cmd = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let kbd_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]),
    );
    let kbd = aml::Device::new("PS2K".into(), vec![&kbd_hid, sta, &kbd_crs]);
    kbd.to_aml_bytes(sb);
}

/// Appends the pvpanic device (QEMU0001): its I/O port.
fn write_pvpanic(sb: &mut Vec<u8>, sta: &dyn Aml) {
    // QEMU-compatible pvpanic device (Linux's pvpanic-mmio driver matches
    // the ACPI id QEMU0001 and accepts an I/O port resource).
    let pvpanic_hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&pvpanic_io]),
    );
    let pvpanic = aml::Device::new("PEVT".into(), vec![&pvpanic_hid, sta, &pvpanic_crs]);
    pvpanic.to_aml_bytes(sb);
}

/// Appends the `virtio_mmio` devices, `V000` on; fails on a window above
/// 4 GiB or more than 0x1000 devices (three hex digits name them).
fn write_virtio_mmio_devices(
    sb: &mut Vec<u8>,
    sta: &dyn Aml,
    virtio_mmio: &[MmioDevice],
) -> Result<(), Error> {
    for (i, dev) in virtio_mmio.iter().enumerate() {
        let base = u32::try_from(dev.base).map_err(|_| Error::DeviceAddress(dev.base))?;
        let len = u32::try_from(dev.len).map_err(|_| Error::DeviceAddress(dev.base))?;
        if i > 0xfff {
            return Err(Error::TooManyDevices(virtio_mmio.len()));
        }
        // Below 0x1000, checked above.
        let uid = u32::try_from(i).map_err(|_| Error::TooManyDevices(virtio_mmio.len()))?;
        write_virtio_mmio(sb, sta, uid, base, len, dev.gsi);
    }
    Ok(())
}

/// Appends virtio-mmio device number `uid` (`V` and `uid` in three hex
/// digits): its register window `base`, `len` and its interrupt `gsi`.
fn write_virtio_mmio(sb: &mut Vec<u8>, sta: &dyn Aml, uid: u32, base: u32, len: u32, gsi: u32) {
    // Memory window plus an edge interrupt (the irqfd pulses the line).
    let mem = aml::Memory32Fixed::new(true, base, len);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq]));
    let name = format!("V{uid:03X}");
    let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid_name, sta, &crs]);
    dev.to_aml_bytes(sb);
}
