//! The Linux zero page (`struct boot_params`) and the e820 memory map.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{EBDA_START, HIMEM_START, PCI_ECAM_SIZE, PCI_ECAM_START, ZERO_PAGE_START};
use crate::GuestMemoryMmap;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Smallest guest memory capsule boots: the first MiB plus room for a
/// kernel.
pub const MIN_MEM_SIZE: u64 = HIMEM_START + (8 << 20);

/// Page size used to align the initrd.
const PAGE_SIZE: u64 = 4096;

/// `type_of_loader` value for an undefined boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Magic value of `boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS", magic value of `header`.
const HEADER_MAGIC: u32 = 0x5372_6448;
/// Physical alignment required by the kernel (16 MiB).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Errors while building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory is smaller than [`MIN_MEM_SIZE`] or has no region at 0.
    #[error(
        "guest memory is too small to boot (minimum {MIN_MEM_SIZE:#x} bytes below the MMIO hole)"
    )]
    MemoryTooSmall,
    /// The e820 table is full.
    #[error("too many e820 entries")]
    E820Overflow,
    /// The initrd does not fit in the first RAM region.
    #[error("initrd of {0} bytes does not fit in guest memory")]
    InitrdTooLarge(usize),
    /// An address does not fit in a 32-bit zero page field.
    #[error("{0} at {1:#x} does not fit in a 32-bit boot parameter")]
    AddressTooHigh(&'static str, u64),
    /// The zero page could not be written.
    #[error("failed to write the zero page: {0}")]
    WriteZeroPage(#[source] vm_memory::GuestMemoryError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Location of an initrd loaded into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdConfig {
    /// Guest physical address of the initrd.
    pub address: GuestAddress,
    /// Size of the initrd in bytes.
    pub size: usize,
}

/// `boot_params` as a byte-valued type, so it can be written to and read
/// from guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParams(boot_params);

// SAFETY: `boot_params` is a `repr(C, packed)` struct made only of integers
// and arrays of integers (and nested such structs), so it has no padding and
// any byte pattern is a valid value.
unsafe impl ByteValued for BootParams {}

/// End (exclusive) of the RAM region starting at guest address 0.
fn low_mem_end(mem: &GuestMemoryMmap) -> Result<u64> {
    let region = mem
        .find_region(GuestAddress(0))
        .ok_or(Error::MemoryTooSmall)?;
    Ok(region.start_addr().raw_value() + region.len())
}

/// Returns the highest page-aligned address at which an initrd of
/// `initrd_size` bytes fits inside the first RAM region (below the MMIO
/// hole), above [`HIMEM_START`].
pub fn initrd_load_addr(mem: &GuestMemoryMmap, initrd_size: usize) -> Result<GuestAddress> {
    let end = low_mem_end(mem)?;
    let size = initrd_size as u64;
    let addr = end
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= HIMEM_START)
        .ok_or(Error::InitrdTooLarge(initrd_size))?;
    Ok(GuestAddress(addr))
}

fn add_e820_entry(params: &mut boot_params, addr: u64, size: u64, mem_type: u32) -> Result<()> {
    let index = usize::from(params.e820_entries);
    if index >= params.e820_table.len() {
        return Err(Error::E820Overflow);
    }
    params.e820_table[index] = boot_e820_entry {
        addr,
        size,
        r#type: mem_type,
    };
    params.e820_entries += 1;
    Ok(())
}

fn to_u32(what: &'static str, value: u64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::AddressTooHigh(what, value))
}

/// Builds the zero page contents.
fn build_boot_params(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<&InitrdConfig>,
    setup_header: Option<setup_header>,
    rsdp_addr: Option<GuestAddress>,
) -> Result<boot_params> {
    let low_end = low_mem_end(mem)?;
    if low_end < MIN_MEM_SIZE {
        return Err(Error::MemoryTooSmall);
    }

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HEADER_MAGIC;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    params.hdr.cmd_line_ptr = to_u32("command line", cmdline_addr.raw_value())?;
    params.hdr.cmdline_size = to_u32("command line size", cmdline_size as u64)?;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = to_u32("initrd", initrd.address.raw_value())?;
        params.hdr.ramdisk_size = to_u32("initrd size", initrd.size as u64)?;
    }
    if let Some(rsdp) = rsdp_addr {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }

    // Low memory, then the EBDA, MP table, VGA hole, ACPI tables and BIOS
    // area up to 1 MiB, which the guest must not use.
    add_e820_entry(&mut params, 0, EBDA_START, E820_RAM)?;
    add_e820_entry(
        &mut params,
        EBDA_START,
        HIMEM_START - EBDA_START,
        E820_RESERVED,
    )?;
    add_e820_entry(&mut params, HIMEM_START, low_end - HIMEM_START, E820_RAM)?;
    // The PCI ECAM window, reserved as firmware does (and other VMMs):
    // Linux uses the window the ACPI MCFG table announces only if it is
    // reserved here (or by an ACPI motherboard resource). Harmless
    // without PCI: nothing else is ever placed there.
    add_e820_entry(&mut params, PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED)?;
    // Any further regions (above the MMIO hole).
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        if start != 0 {
            add_e820_entry(&mut params, start, region.len(), E820_RAM)?;
        }
    }
    Ok(params)
}

/// Writes the zero page (`boot_params`) at [`ZERO_PAGE_START`].
///
/// `setup_header` is the header of a bzImage, copied in before the loader
/// fields are set. The command line is at `cmdline_addr` (`cmdline_size`
/// bytes including the NUL). The e820 map describes usable RAM below the
/// EBDA, a reserved area up to 1 MiB (MP table, ACPI tables, BIOS), RAM
/// from 1 MiB to the MMIO hole, the reserved PCI ECAM window in the hole
/// and RAM above 4 GiB.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<&InitrdConfig>,
    setup_header: Option<setup_header>,
    rsdp_addr: Option<GuestAddress>,
) -> Result<()> {
    let params = build_boot_params(
        mem,
        cmdline_addr,
        cmdline_size,
        initrd,
        setup_header,
        rsdp_addr,
    )?;
    mem.write_obj(BootParams(params), GuestAddress(ZERO_PAGE_START))
        .map_err(Error::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{CMDLINE_START, FIRST_ADDR_PAST_32BITS, MMIO32_START};
    use crate::memory::ram_regions;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    fn e820(params: &boot_params) -> Vec<(u64, u64, u32)> {
        let table = params.e820_table;
        table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    fn read_params(mem: &GuestMemoryMmap) -> boot_params {
        let p: BootParams = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        p.0
    }

    #[test]
    fn boot_params_size() {
        assert_eq!(std::mem::size_of::<BootParams>(), 4096);
    }

    #[test]
    fn e820_small_memory() {
        let size = 128u64 << 20;
        let m = mem(size);
        configure_system(&m, GuestAddress(CMDLINE_START), 10, None, None, None).unwrap();
        let params = read_params(&m);
        assert_eq!(
            e820(&params),
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, size - HIMEM_START, E820_RAM),
                (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn e820_above_4g() {
        let size = MMIO32_START + (1 << 30);
        let m = mem(size);
        let params =
            build_boot_params(&m, GuestAddress(CMDLINE_START), 10, None, None, None).unwrap();
        assert_eq!(
            e820(&params),
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, MMIO32_START - HIMEM_START, E820_RAM),
                (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
                (FIRST_ADDR_PAST_32BITS, 1 << 30, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_overflow() {
        let mut params = boot_params::default();
        for _ in 0..params.e820_table.len() {
            add_e820_entry(&mut params, 0, 1, E820_RAM).unwrap();
        }
        assert!(matches!(
            add_e820_entry(&mut params, 0, 1, E820_RAM),
            Err(Error::E820Overflow)
        ));
    }

    #[test]
    fn too_small_memory() {
        let m = mem(MIN_MEM_SIZE - 4096);
        assert!(matches!(
            configure_system(&m, GuestAddress(CMDLINE_START), 10, None, None, None),
            Err(Error::MemoryTooSmall)
        ));
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000_0000), 0x100_0000)]).unwrap();
        assert!(matches!(
            configure_system(&m, GuestAddress(CMDLINE_START), 10, None, None, None),
            Err(Error::MemoryTooSmall)
        ));
    }

    #[test]
    fn initrd_address() {
        let size = 128u64 << 20;
        let m = mem(size);
        let addr = initrd_load_addr(&m, 0x1000).unwrap();
        assert_eq!(addr, GuestAddress(size - 0x1000));
        let addr = initrd_load_addr(&m, 0x1234).unwrap();
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + 0x1234 <= size);
        assert_eq!(addr, GuestAddress(size - 0x2000));
        assert!(initrd_load_addr(&m, size as usize).is_err());
        assert!(initrd_load_addr(&m, (size - HIMEM_START) as usize).is_ok());
        assert!(initrd_load_addr(&m, (size - HIMEM_START) as usize + 1).is_err());

        // Above 4 GiB the initrd still goes below the MMIO hole.
        let m = mem(MMIO32_START + (1 << 30));
        let addr = initrd_load_addr(&m, 0x10_0001).unwrap();
        assert_eq!(addr, GuestAddress(MMIO32_START - 0x10_1000));
    }

    #[test]
    fn zero_page_fields() {
        let m = mem(256 << 20);
        let initrd = InitrdConfig {
            address: GuestAddress(0x0f00_0000),
            size: 0x12345,
        };
        let hdr = setup_header {
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        configure_system(
            &m,
            GuestAddress(CMDLINE_START),
            42,
            Some(&initrd),
            Some(hdr),
            Some(GuestAddress(0xe0000)),
        )
        .unwrap();
        let p = read_params(&m);
        let h = p.hdr;
        assert_eq!({ h.version }, 0x020f);
        assert_eq!(h.type_of_loader, 0xff);
        assert_eq!({ h.boot_flag }, 0xaa55);
        assert_eq!({ h.header }, 0x5372_6448);
        assert_eq!({ h.kernel_alignment }, 0x0100_0000);
        assert_eq!({ h.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ h.cmdline_size }, 42);
        assert_eq!({ h.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ h.ramdisk_size }, 0x12345);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 4);
    }

    #[test]
    fn zero_page_without_optional_parts() {
        let m = mem(64 << 20);
        configure_system(&m, GuestAddress(CMDLINE_START), 1, None, None, None).unwrap();
        let p = read_params(&m);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0);
        assert_eq!({ p.hdr.header }, HEADER_MAGIC);
    }
}
