//! ACPI tables for a hardware-reduced x86_64 platform.
//!
//! capsule describes its platform with a minimal set of ACPI tables:
//!
//! * RSDP (revision 2) at [`ACPI_TABLES_START`], pointing to the XSDT;
//! * XSDT listing the FADT, the MADT and, with PCI, the MCFG;
//! * FADT declaring a hardware-reduced platform whose sleep control, sleep
//!   status and reset registers are single I/O ports, and pointing to the
//!   DSDT;
//! * DSDT with the `\_S5_` sleep-type package (power off), the COM1 serial
//!   port and a QEMU-compatible pvpanic device;
//! * MADT with one local APIC per vCPU and the IOAPIC;
//! * with PCI, MCFG with one allocation: the ECAM window of segment 0,
//!   bus 0 ([`PCI_ECAM_START`]).
//!
//! All tables are written into `[ACPI_TABLES_START, ACPI_TABLES_END)`, which
//! lies in the BIOS area Linux scans for the RSDP.

use crate::GuestMemoryMmap;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    ACPI_TABLES_END, ACPI_TABLES_START, APIC_START_32, IOAPIC_START_32, MAX_VCPUS,
    PCI_ECAM_LAST_BUS, PCI_ECAM_START,
};

mod dsdt;

use dsdt::build_dsdt;
pub use dsdt::MmioDevice;

/// OEM ID written into every table header.
const OEM_ID: [u8; 6] = *b"CAPSUL";
/// OEM table ID written into every table header.
const OEM_TABLE_ID: [u8; 8] = *b"CAPSULE ";
/// OEM revision written into every table header.
const OEM_REVISION: u32 = 1;
/// Revision of the DSDT; 2 or higher selects 64-bit AML integers.
const DSDT_REVISION: u8 = 6;
/// Hypervisor vendor identity reported in the FADT.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"CAPSULE\0";
/// Alignment of each table in guest memory (the RSDP needs 16 bytes).
const TABLE_ALIGNMENT: u64 = 16;
/// Size of the standard ACPI system description table header.
const SDT_HEADER_LEN: u32 = 36;

/// FADT IA-PC boot architecture flag: legacy (ISA) devices such as the
/// COM1 serial port are present.
const IAPC_BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// FADT IA-PC boot architecture flag: VGA must not be probed.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT IA-PC boot architecture flag: there is no CMOS RTC.
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Errors while building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM has no vCPU.
    #[error("cannot build ACPI tables for 0 vCPUs")]
    NoCpus,
    /// More vCPUs than APIC ids capsule can hand out.
    #[error("too many vCPUs for the MADT: {0} (maximum {MAX_VCPUS})")]
    TooManyCpus(u8),
    /// The tables do not fit in the region reserved for them.
    #[error("ACPI tables need {0} bytes, more than the reserved region")]
    TablesTooLarge(u64),
    /// Writing a table into guest memory failed.
    #[error("failed to write the {0} table to guest memory: {1}")]
    WriteTable(&'static str, #[source] GuestMemoryError),
    /// A described device lies above 4 GiB (Memory32Fixed cannot say it).
    #[error("device at {0:#x} cannot be described with a 32-bit address")]
    DeviceAddress(u64),
    /// More devices than DSDT names can be made for.
    #[error("too many devices for the DSDT: {0}")]
    TooManyDevices(usize),
}

/// Serializes an [`Aml`] object (a table built by `acpi_tables`) to bytes.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Rounds `addr` up to [`TABLE_ALIGNMENT`].
fn align_up(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGNMENT)
}

/// A single-byte register in I/O port space, as a Generic Address Structure.
fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the FADT for a hardware-reduced platform whose DSDT is at
/// `dsdt_addr`.
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_LEGACY_DEVICES
        | IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.reset_reg = io_port_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_port_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}

/// Builds the MADT: one enabled local APIC per vCPU (ACPI processor UID
/// and APIC id equal the vCPU index) and the IOAPIC.
fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START_32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // Same IOAPIC id as in the MP table; `num_cpus <= MAX_VCPUS` keeps it
    // within u8.
    madt.add_structure(IoApic::new(num_cpus + 1, IOAPIC_START_32, 0));
    to_bytes(&madt)
}

/// Builds the MCFG: one ECAM allocation, segment 0, buses 0 to
/// [`PCI_ECAM_LAST_BUS`] at [`PCI_ECAM_START`].
fn build_mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, PCI_ECAM_LAST_BUS);
    to_bytes(&mcfg)
}

/// Writes `bytes` at `addr` in guest memory.
fn write_table(
    mem: &GuestMemoryMmap,
    name: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| Error::WriteTable(name, e))
}

/// Writes RSDP, XSDT, FADT, DSDT and MADT into guest memory inside
/// `[ACPI_TABLES_START, ACPI_TABLES_END)`; returns the RSDP address.
///
/// The RSDP is placed at [`ACPI_TABLES_START`] (16-byte aligned, inside the
/// range Linux scans), followed by the other tables, each 16-byte aligned.
/// `num_cpus` must be between 1 and [`MAX_VCPUS`]; `virtio_mmio` lists the
/// virtio-mmio devices to describe in the DSDT.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio_mmio: &[MmioDevice],
) -> Result<GuestAddress, Error> {
    create_acpi_tables_with(mem, num_cpus, virtio_mmio, false)
}

/// [`create_acpi_tables`], with the PCI root bridge (and its ECAM
/// window's reservation) in the DSDT and an MCFG table if `pci`.
pub fn create_acpi_tables_with(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio_mmio: &[MmioDevice],
    pci: bool,
) -> Result<GuestAddress, Error> {
    if num_cpus == 0 {
        return Err(Error::NoCpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }

    // Lay the tables out one after the other.
    let rsdp_addr = ACPI_TABLES_START;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64);
    let xsdt_entries: u64 = if pci { 3 } else { 2 };
    let xsdt_len = u64::from(SDT_HEADER_LEN) + xsdt_entries * 8;
    let fadt_addr = align_up(xsdt_addr + xsdt_len);
    let dsdt_addr = align_up(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt = build_dsdt(virtio_mmio, pci)?;
    let madt_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let madt = build_madt(num_cpus);
    let mcfg_addr = align_up(madt_addr + madt.len() as u64);
    let mcfg = if pci { build_mcfg() } else { Vec::new() };
    let end = mcfg_addr + mcfg.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(Error::TablesTooLarge(end - ACPI_TABLES_START));
    }

    let fadt = build_fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if pci {
        xsdt.add_entry(mcfg_addr);
    }
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    write_table(mem, "DSDT", dsdt_addr, &dsdt)?;
    write_table(mem, "FADT", fadt_addr, &fadt)?;
    write_table(mem, "MADT", madt_addr, &madt)?;
    if pci {
        write_table(mem, "MCFG", mcfg_addr, &mcfg)?;
    }
    write_table(mem, "XSDT", xsdt_addr, &xsdt)?;
    write_table(mem, "RSDP", rsdp_addr, &rsdp)?;

    log::debug!(
        "ACPI tables for {num_cpus} vCPU(s) at {ACPI_TABLES_START:#x}..{end:#x}, RSDP at {rsdp_addr:#x}"
    );
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests;
