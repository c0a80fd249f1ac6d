//! ACPI table tests: the table chain and checksums, FADT, MADT, MCFG and
//! the DSDT's devices, read back from guest memory as the guest would.

use super::dsdt::VIRTIO_MMIO_HID;
use super::*;
use crate::layout::{
    addr32, ACPI_S5_SLEEP_TYPE, COM1_PORT, PCI_ECAM_SIZE, PCI_MMIO_SIZE, PCI_MMIO_START,
    PVPANIC_PORT,
};

const MEM_SIZE: usize = 16 << 20;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Reads a whole system description table (signature, bytes), checking
/// its checksum and that it lies in the ACPI region.
fn read_sdt(mem: &GuestMemoryMmap, addr: u64) -> ([u8; 4], Vec<u8>) {
    let len = read_u32(mem, addr + 4) as usize;
    assert!(len >= SDT_HEADER_LEN as usize);
    assert!(addr >= ACPI_TABLES_START && addr + len as u64 <= ACPI_TABLES_END);
    let bytes = read_bytes(mem, addr, len);
    assert_eq!(sum(&bytes), 0, "bad checksum at {addr:#x}");
    let mut sig = [0u8; 4];
    sig.copy_from_slice(&bytes[..4]);
    (sig, bytes)
}

struct Tables {
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    dsdt: Vec<u8>,
    madt: Vec<u8>,
    mcfg: Option<Vec<u8>>,
    addrs: Vec<(u64, usize)>,
}

fn walk(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
    assert_eq!(rsdp_addr.0, ACPI_TABLES_START);
    assert_eq!(rsdp_addr.0 % 16, 0);
    let rsdp = read_bytes(mem, rsdp_addr.0, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(&rsdp), 0);
    assert_eq!(u32::from_le_bytes(rsdp[20..24].try_into().unwrap()), 36);

    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let (sig, xsdt) = read_sdt(mem, xsdt_addr);
    assert_eq!(&sig, b"XSDT");
    let mut addrs = vec![(rsdp_addr.0, 36), (xsdt_addr, xsdt.len())];

    let mut fadt = None;
    let mut madt = None;
    let mut mcfg = None;
    for entry in xsdt[36..].chunks(8) {
        let addr = u64::from_le_bytes(entry.try_into().unwrap());
        let (sig, bytes) = read_sdt(mem, addr);
        addrs.push((addr, bytes.len()));
        match &sig {
            b"FACP" => fadt = Some(bytes),
            b"APIC" => madt = Some(bytes),
            b"MCFG" => mcfg = Some(bytes),
            other => panic!("unexpected table {other:?} in XSDT"),
        }
    }
    let fadt = fadt.expect("no FADT in XSDT");
    let madt = madt.expect("no MADT in XSDT");

    let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
    let (sig, dsdt) = read_sdt(mem, x_dsdt);
    assert_eq!(&sig, b"DSDT");
    addrs.push((x_dsdt, dsdt.len()));

    Tables {
        xsdt,
        fadt,
        dsdt,
        madt,
        mcfg,
        addrs,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn check_gas_io(fadt: &[u8], offset: usize, port: u16) {
    let gas = &fadt[offset..offset + 12];
    assert_eq!(gas[0], 1, "SystemIO address space");
    assert_eq!(gas[1], 8, "8-bit register");
    assert_eq!(gas[2], 0, "bit offset");
    assert_eq!(gas[3], 1, "byte access");
    assert_eq!(
        u64::from_le_bytes(gas[4..12].try_into().unwrap()),
        u64::from(port)
    );
}

#[test]
fn test_rejects_bad_cpu_counts() {
    let mem = guest_memory();
    assert!(matches!(
        create_acpi_tables(&mem, 0, &[]),
        Err(Error::NoCpus)
    ));
    assert!(matches!(
        create_acpi_tables(&mem, MAX_VCPUS + 1, &[]),
        Err(Error::TooManyCpus(_))
    ));
}

#[test]
fn test_write_failure() {
    // Guest memory that does not cover the ACPI region.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert!(matches!(
        create_acpi_tables(&mem, 1, &[]),
        Err(Error::WriteTable(_, _))
    ));
}

#[test]
fn test_table_chain_and_checksums() {
    for cpus in [1, 4, MAX_VCPUS] {
        let mem = guest_memory();
        let rsdp = create_acpi_tables(&mem, cpus, &[]).unwrap();
        let tables = walk(&mem, rsdp);
        assert_eq!(tables.xsdt.len(), 36 + 16);

        // No two tables overlap.
        let mut addrs = tables.addrs.clone();
        addrs.sort();
        for pair in addrs.windows(2) {
            assert!(pair[0].0 + pair[0].1 as u64 <= pair[1].0, "{addrs:x?}");
        }
    }
}

#[test]
fn test_fadt() {
    let mem = guest_memory();
    let tables = walk(&mem, create_acpi_tables(&mem, 2, &[]).unwrap());
    let fadt = &tables.fadt;
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "FADT major revision");

    let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON");
    assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON");

    let boot_arch = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
    // No 8042 flag: Linux finds the keyboard controller only through
    // its DSDT entry (PNP0303), never by blind port probing.
    assert_eq!(boot_arch & (1 << 1), 0, "8042 not announced");
    assert_ne!(boot_arch & (1 << 2), 0, "VGA not present");
    assert_eq!(boot_arch & (1 << 3), 0, "MSI supported");
    assert_ne!(boot_arch & (1 << 5), 0, "CMOS RTC not present");

    check_gas_io(fadt, 116, ACPI_RESET_PORT);
    assert_eq!(fadt[128], ACPI_RESET_VALUE);
    check_gas_io(fadt, 244, ACPI_SLEEP_CONTROL_PORT);
    check_gas_io(fadt, 256, ACPI_SLEEP_STATUS_PORT);
    assert_eq!(&fadt[268..276], b"CAPSULE\0");

    // Only the 64-bit DSDT pointer is used.
    assert_eq!(u32::from_le_bytes(fadt[40..44].try_into().unwrap()), 0);
}

#[test]
fn test_madt() {
    for cpus in [1u8, 4] {
        let mem = guest_memory();
        let tables = walk(&mem, create_acpi_tables(&mem, cpus, &[]).unwrap());
        let madt = &tables.madt;
        assert_eq!(
            u32::from_le_bytes(madt[36..40].try_into().unwrap()),
            APIC_START_32
        );

        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len());
            let entry = &madt[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    let flags = u32::from_le_bytes(entry[4..8].try_into().unwrap());
                    assert_eq!(flags & 1, 1, "enabled");
                    lapics.push((entry[2], entry[3]));
                }
                1 => {
                    assert_eq!(len, 12);
                    let addr = u32::from_le_bytes(entry[4..8].try_into().unwrap());
                    let gsi_base = u32::from_le_bytes(entry[8..12].try_into().unwrap());
                    ioapics.push((entry[2], addr, gsi_base));
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        let expected: Vec<(u8, u8)> = (0..cpus).map(|i| (i, i)).collect();
        assert_eq!(lapics, expected);
        assert_eq!(ioapics, vec![(cpus + 1, IOAPIC_START_32, 0)]);
    }
}

#[test]
fn test_dsdt() {
    let mem = guest_memory();
    let tables = walk(&mem, create_acpi_tables(&mem, 1, &[]).unwrap());
    let dsdt = &tables.dsdt;
    assert!(contains(dsdt, b"_S5_"));
    // Name(_S5_, Package(4) { ACPI_S5_SLEEP_TYPE, 0, 0, 0 })
    let pkg = [
        0x08,
        b'_',
        b'S',
        b'5',
        b'_',
        0x12, // PackageOp
        0x07, // PkgLength
        0x04, // NumElements
        0x0a,
        ACPI_S5_SLEEP_TYPE,
        0x00,
        0x00,
        0x00,
    ];
    assert!(contains(dsdt, &pkg));
    assert!(contains(dsdt, b"PEVT"));
    assert!(contains(dsdt, b"QEMU0001\0"));
    // IO(Decode16, PVPANIC_PORT, PVPANIC_PORT, 1, 1)
    let [lo, hi] = PVPANIC_PORT.to_le_bytes();
    assert!(contains(dsdt, &[0x47, 0x01, lo, hi, lo, hi, 0x01, 0x01]));
    // IO(Decode16, COM1_PORT, COM1_PORT, 1, 8)
    let [lo, hi] = COM1_PORT.to_le_bytes();
    assert!(contains(dsdt, &[0x47, 0x01, lo, hi, lo, hi, 0x01, 0x08]));
    assert!(!contains(dsdt, VIRTIO_MMIO_HID.as_bytes()));
}

#[test]
fn the_pci_root_bridge_is_described_only_with_pci() {
    let mem = guest_memory();
    let without = walk(&mem, create_acpi_tables(&mem, 1, &[]).unwrap());
    assert!(!contains(&without.dsdt, b"PCI0"));
    assert!(!contains(&without.dsdt, b"MBRD"));
    assert!(without.mcfg.is_none(), "no MCFG without PCI");
    let tables = walk(&mem, create_acpi_tables_with(&mem, 1, &[], true).unwrap());
    let dsdt = &tables.dsdt;
    assert!(contains(dsdt, b"PCI0"));
    // Name(_HID, EISAID("PNP0A08")), Name(_CID, EISAID("PNP0A03")): a
    // PCI Express root, compatible with a PCI one; _SEG and _BBN.
    assert!(contains(
        dsdt,
        &[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]
    ));
    assert!(contains(
        dsdt,
        &[0x08, b'_', b'C', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03]
    ));
    assert!(contains(dsdt, b"_SEG") && contains(dsdt, b"_BBN"));
    assert!(!contains(dsdt, b"_PRT"), "no INTx routing");
    // IO(Decode16, 0xCF8, 0xCF8, 1, 8)
    assert!(contains(
        dsdt,
        &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]
    ));
    // DWordMemory over the PCI window: min, max, translation, length.
    let mut window = Vec::new();
    for v in [
        addr32(PCI_MMIO_START),
        addr32(PCI_MMIO_START + PCI_MMIO_SIZE - 1),
        0,
        addr32(PCI_MMIO_SIZE),
    ] {
        window.extend_from_slice(&v.to_le_bytes());
    }
    assert!(contains(dsdt, &window));
    // The motherboard resource reserving the ECAM window: MBRD with
    // Name(_HID, EISAID("PNP0C02")) and Memory32Fixed(ReadWrite,
    // PCI_ECAM_START, PCI_ECAM_SIZE).
    assert!(contains(dsdt, b"MBRD"));
    assert!(contains(
        dsdt,
        &[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0c, 0x02]
    ));
    let mut ecam = vec![0x86, 0x09, 0x00, 0x01];
    ecam.extend(addr32(PCI_ECAM_START).to_le_bytes());
    ecam.extend(addr32(PCI_ECAM_SIZE).to_le_bytes());
    assert!(contains(dsdt, &ecam));
}

#[test]
fn the_mcfg_announces_the_ecam_window_of_bus_0() {
    let mem = guest_memory();
    let tables = walk(&mem, create_acpi_tables_with(&mem, 2, &[], true).unwrap());
    assert_eq!(tables.xsdt.len(), 36 + 3 * 8);
    // read_sdt checked the signature's table checksum.
    let mcfg = tables.mcfg.expect("no MCFG in the XSDT");
    assert_eq!(mcfg.len(), 36 + 8 + 16, "header, reserved, one entry");
    assert_eq!(mcfg[8], 1, "revision");
    assert_eq!(&mcfg[10..16], &OEM_ID);
    assert_eq!(mcfg[36..44], [0; 8], "reserved");
    let entry = &mcfg[44..60];
    assert_eq!(
        u64::from_le_bytes(entry[0..8].try_into().unwrap()),
        PCI_ECAM_START
    );
    assert_eq!(u16::from_le_bytes([entry[8], entry[9]]), 0, "segment 0");
    assert_eq!((entry[10], entry[11]), (0, 0), "buses 0-0");
    assert_eq!(entry[12..16], [0; 4]);
    // One bus of ECAM is the window's size.
    assert_eq!(u64::from(entry[11] - entry[10] + 1) << 20, PCI_ECAM_SIZE);
    // No two tables overlap, the MCFG included.
    let mut addrs = tables.addrs.clone();
    addrs.sort();
    for pair in addrs.windows(2) {
        assert!(pair[0].0 + pair[0].1 as u64 <= pair[1].0, "{addrs:x?}");
    }
}

#[test]
fn test_dsdt_virtio_mmio_devices() {
    let mem = guest_memory();
    let devs = [
        MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        },
        MmioDevice {
            base: 0xd000_1000,
            len: 0x1000,
            gsi: 6,
        },
    ];
    let tables = walk(&mem, create_acpi_tables(&mem, 2, &devs).unwrap());
    let dsdt = &tables.dsdt;
    assert_eq!(sum(dsdt), 0);
    for (i, d) in devs.iter().enumerate() {
        assert!(contains(dsdt, format!("V{i:03X}").as_bytes()));
        // Memory32Fixed(ReadWrite, base, len)
        let mut mem32 = vec![0x86, 0x09, 0x00, 0x01];
        mem32.extend((d.base as u32).to_le_bytes());
        mem32.extend((d.len as u32).to_le_bytes());
        assert!(contains(dsdt, &mem32), "device {i} window");
        // Extended interrupt: consumer, edge, active-high, one GSI.
        let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        irq.extend(d.gsi.to_le_bytes());
        assert!(contains(dsdt, &irq), "device {i} interrupt");
    }
    let hid = format!("{VIRTIO_MMIO_HID}\0");
    assert_eq!(
        dsdt.windows(hid.len())
            .filter(|w| *w == hid.as_bytes())
            .count(),
        devs.len()
    );

    let high = [MmioDevice {
        base: 1 << 32,
        len: 0x1000,
        gsi: 5,
    }];
    assert!(matches!(
        create_acpi_tables(&mem, 1, &high),
        Err(Error::DeviceAddress(_))
    ));
}
