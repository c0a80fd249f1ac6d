//! Guest physical memory layout and fixed platform resources of a capsule VM.
//!
//! Everything that both the boot code and the device manager must agree on
//! (where tables live, which I/O ports and IRQ lines the platform devices
//! use) is defined here, once.

/// Start of the boot GDT (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity-mapped boot page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot page tables (identity maps the first 1 GiB
/// with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum kernel command line size, including the terminating NUL.
/// Linux on x86_64 accepts 2048 bytes.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the BIOS read-only area, where the ACPI tables live.
/// Linux scans 0xe0000..0x100000 for the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe0000;
/// End (exclusive) of the region reserved for ACPI tables.
pub const ACPI_TABLES_END: u64 = 0xf0000;
/// Where the MP table is written: the BIOS area Linux scans for the MP
/// floating pointer (0xf0000..0x100000). The EBDA would hold only ~37 CPUs.
pub const MPTABLE_START: u64 = ACPI_TABLES_END;
/// End (exclusive) of the area the MP table may occupy.
pub const MPTABLE_END: u64 = HIMEM_START;
/// Start of high memory: kernels are loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Where Firecracker's boot timer is (the start of its MMIO window on
/// x86_64): with `--boot-timer` capsule puts a boot marker there, for guests
/// that write 123 to it, when the guest has no RAM there (at most 3 GiB).
pub const FC_BOOT_TIMER_START: u64 = 0xc000_0000;
/// Size of the boot timer's window.
pub const FC_BOOT_TIMER_SIZE: u64 = 0x1000;

/// Start of the 32-bit MMIO hole below 4 GiB (no RAM is placed here).
pub const MMIO32_START: u64 = 0xd000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO32_SIZE: u64 = (1 << 32) - MMIO32_START;
/// First guest physical address above 4 GiB.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Base of the IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Base of the local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// [`IOAPIC_START`] as the 32-bit field firmware tables hold.
pub const IOAPIC_START_32: u32 = addr32(IOAPIC_START);
/// [`APIC_START`] as the 32-bit field firmware tables hold.
pub const APIC_START_32: u32 = addr32(APIC_START);
/// Address of the TSS that KVM needs on Intel hosts (three pages).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Start of the window in the MMIO hole where device MMIO regions
/// (virtio-mmio and friends) are allocated.
pub const MMIO_DEVICES_START: u64 = MMIO32_START;
/// Size of the device MMIO window (256 MiB: 65536 virtio-mmio windows).
pub const MMIO_DEVICES_SIZE: u64 = PCI_MMIO_START - MMIO_DEVICES_START;
/// Start of the PCI memory window, where capsule places the BARs of the
/// PCI functions (`--transport pci`), and which the PCI root bridge's
/// `_CRS` announces. It follows the device MMIO window.
pub const PCI_MMIO_START: u64 = 0xe000_0000;
/// Size of the PCI memory window (256 MiB; the rest of the hole, from
/// 0xf0000000, holds the ECAM window, the IOAPIC, the LAPIC and the TSS).
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// Start of the PCI Express enhanced configuration (ECAM) window of PCI
/// bus 0 (`--transport pci`): right after the PCI memory window, far
/// below the IOAPIC. The ACPI MCFG table announces it; the e820 map and
/// a motherboard resource device (PNP0C02) in the DSDT reserve it, which
/// Linux checks before it uses it.
pub const PCI_ECAM_START: u64 = PCI_MMIO_START + PCI_MMIO_SIZE;
/// Size of the ECAM window: one bus of 32 devices of 8 functions of
/// 4 KiB (1 MiB).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The last PCI bus number the ECAM window covers (bus 0 only).
pub const PCI_ECAM_LAST_BUS: u8 = 0;
/// First GSI of MSI-X vectors: past the IOAPIC's pins, routed by capsule.
pub const FIRST_MSI_GSI: u32 = IOAPIC_NUM_PINS;
/// Last GSI capsule hands to MSI-X vectors (KVM allows 4096 routes).
pub const LAST_MSI_GSI: u32 = 4095;

/// COM1 I/O port base and its ISA interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller data port (the command port is `+4`).
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 keyboard controller command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// IRQ line of the i8042 keyboard.
pub const I8042_KBD_IRQ: u32 = 1;
/// ACPI hardware-reduced sleep control register (1 byte, write-only).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI hardware-reduced sleep status register (1 byte).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// ACPI reset register (1 byte); writing [`ACPI_RESET_VALUE`] resets the VM.
pub const ACPI_RESET_PORT: u16 = 0x3c2;
/// Value the guest writes to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// ACPI `SLP_TYP` value that the DSDT's `_S5_` object announces.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// QEMU-compatible pvpanic I/O port; the guest writes here when it panics.
pub const PVPANIC_PORT: u16 = 0x505;
/// Boot-time marker I/O port (1 byte): the guest writes a stage number (1 =
/// userspace reached) and capsule logs the time since it started.
pub const BOOT_MARKER_PORT: u16 = 0x3c4;
/// Number of IOAPIC pins (GSIs) the in-kernel irqchip provides.
pub const IOAPIC_NUM_PINS: u32 = 24;
/// First GSI handed out to devices by the device manager; lower lines are
/// the legacy ISA ones.
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Last GSI usable for devices.
pub const LAST_DEVICE_IRQ: u32 = IOAPIC_NUM_PINS - 1;
/// Largest number of vCPUs capsule configures (APIC ids fit in 8 bits and
/// 255 is the broadcast id).
pub const MAX_VCPUS: u8 = 254;

// The ECAM window lies in the MMIO hole, past the PCI memory window and
// below the IOAPIC, with no other device in between.
const _: () = assert!(
    PCI_ECAM_START >= PCI_MMIO_START + PCI_MMIO_SIZE
        && PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START
        && PCI_ECAM_START.is_multiple_of(PCI_ECAM_SIZE)
);

/// `addr` as a 32-bit address, for the 32-bit fields of firmware tables
/// and boot structures. Used in `const` items, so an address at or past
/// 4 GiB fails the build instead of being truncated.
#[expect(
    clippy::cast_possible_truncation,
    reason = "checked by the assert above it, at compile time for constants"
)]
pub const fn addr32(addr: u64) -> u32 {
    assert!(addr <= u32::MAX as u64, "address does not fit in 32 bits");
    addr as u32
}
