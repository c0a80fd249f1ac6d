//! The boot Global Descriptor Table used to enter 64-bit long mode.

use crate::GuestMemoryMmap;
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};

/// Errors while writing the descriptor tables into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GDT does not fit in guest memory.
    #[error("failed to write the GDT to guest memory: {0}")]
    WriteGdt(#[source] vm_memory::GuestMemoryError),
    /// The IDT does not fit in guest memory.
    #[error("failed to write the IDT to guest memory: {0}")]
    WriteIdt(#[source] vm_memory::GuestMemoryError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Access/flags word of the 64-bit code segment (present, DPL 0, execute/read,
/// accessed; granularity 4 KiB, long mode).
pub const CODE_SEGMENT_FLAGS: u16 = 0xa09b;
/// Access/flags word of the data segment (present, DPL 0, read/write,
/// accessed; granularity 4 KiB, 32-bit default size).
pub const DATA_SEGMENT_FLAGS: u16 = 0xc093;
/// Access/flags word of the TSS (present, busy 64-bit TSS; granularity 4 KiB).
pub const TSS_SEGMENT_FLAGS: u16 = 0x808b;

/// Index of the code segment in [`boot_gdt`].
pub const CODE_SEGMENT_INDEX: u16 = 1;
/// Index of the data segment in [`boot_gdt`].
pub const DATA_SEGMENT_INDEX: u16 = 2;
/// Index of the TSS descriptor in [`boot_gdt`].
pub const TSS_SEGMENT_INDEX: u16 = 3;

/// Encodes a GDT descriptor.
///
/// `flags` holds the access byte in bits 7:0 and the G/DB/L/AVL nibble in
/// bits 15:12 (bits 11:8 are ignored, they are the limit's high nibble in
/// the descriptor). `limit` is the raw 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Base address stored in a descriptor.
#[expect(clippy::cast_possible_truncation, reason = "the mask keeps 32 bits")]
pub const fn entry_base(entry: u64) -> u32 {
    (((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)) as u32
}

/// Raw 20-bit limit stored in a descriptor.
#[expect(clippy::cast_possible_truncation, reason = "the mask keeps 20 bits")]
pub const fn entry_raw_limit(entry: u64) -> u32 {
    ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32
}

/// Byte-granular limit of a descriptor (scaled by 4 KiB when G is set), as
/// KVM expects it in `kvm_segment::limit`.
pub const fn entry_limit(entry: u64) -> u32 {
    let raw = entry_raw_limit(entry);
    if entry_g(entry) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

const fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// Segment type (4 bits).
pub const fn entry_type(entry: u64) -> u8 {
    ((entry >> 40) & 0xf) as u8
}
/// Descriptor type bit: 1 for code/data, 0 for system segments.
pub const fn entry_s(entry: u64) -> u8 {
    bit(entry, 44)
}
/// Descriptor privilege level.
pub const fn entry_dpl(entry: u64) -> u8 {
    ((entry >> 45) & 0x3) as u8
}
/// Present bit.
pub const fn entry_p(entry: u64) -> u8 {
    bit(entry, 47)
}
/// Available-for-software bit.
pub const fn entry_avl(entry: u64) -> u8 {
    bit(entry, 52)
}
/// Long-mode (64-bit code) bit.
pub const fn entry_l(entry: u64) -> u8 {
    bit(entry, 53)
}
/// Default operation size bit.
pub const fn entry_db(entry: u64) -> u8 {
    bit(entry, 54)
}
/// Granularity bit.
pub const fn entry_g(entry: u64) -> u8 {
    bit(entry, 55)
}

/// The boot GDT: null, 64-bit code, data and TSS descriptors, all flat
/// (base 0, limit 4 GiB).
pub const fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(CODE_SEGMENT_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_SEGMENT_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_SEGMENT_FLAGS, 0, 0xfffff),
    ]
}

/// Converts GDT entry `table_index` into the `kvm_segment` KVM loads into a
/// segment register; the selector is `table_index * 8` (TI = 0, RPL = 0).
pub fn kvm_segment_from_gdt(entry: u64, table_index: u16) -> kvm_segment {
    let present = entry_p(entry);
    kvm_segment {
        base: u64::from(entry_base(entry)),
        limit: entry_limit(entry),
        selector: table_index * 8,
        type_: entry_type(entry),
        present,
        dpl: entry_dpl(entry),
        db: entry_db(entry),
        s: entry_s(entry),
        l: entry_l(entry),
        g: entry_g(entry),
        avl: entry_avl(entry),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes `table` (the GDT) at [`BOOT_GDT_START`].
pub fn write_gdt_table(table: &[u64], mem: &GuestMemoryMmap) -> Result<()> {
    for (i, entry) in table.iter().enumerate() {
        let addr = GuestAddress(BOOT_GDT_START + (i as u64) * 8);
        mem.write_obj(*entry, addr).map_err(Error::WriteGdt)?;
    }
    Ok(())
}

/// Writes a single (empty) IDT entry `value` at [`BOOT_IDT_START`].
pub fn write_idt_value(value: u64, mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_obj(value, GuestAddress(BOOT_IDT_START))
        .map_err(Error::WriteIdt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_known_values() {
        assert_eq!(gdt_entry(0, 0, 0), 0);
        assert_eq!(
            gdt_entry(CODE_SEGMENT_FLAGS, 0, 0xfffff),
            0x00af_9b00_0000_ffff
        );
        assert_eq!(
            gdt_entry(DATA_SEGMENT_FLAGS, 0, 0xfffff),
            0x00cf_9300_0000_ffff
        );
        assert_eq!(
            gdt_entry(TSS_SEGMENT_FLAGS, 0, 0xfffff),
            0x008f_8b00_0000_ffff
        );
    }

    #[test]
    fn roundtrip_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(entry_base(e), 0x1234_5678);
        assert_eq!(entry_raw_limit(e), 0xabcde);
        // G clear: limit is byte-granular.
        assert_eq!(entry_limit(e), 0xabcde);
        let e = gdt_entry(0x8093, 0, 0xfffff);
        assert_eq!(entry_limit(e), 0xffff_ffff);
    }

    #[test]
    fn code_segment_decodes() {
        let seg = kvm_segment_from_gdt(boot_gdt()[1], CODE_SEGMENT_INDEX);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.avl, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_and_tss_decode() {
        let gdt = boot_gdt();
        let data = kvm_segment_from_gdt(gdt[2], DATA_SEGMENT_INDEX);
        assert_eq!(data.selector, 0x10);
        assert_eq!(
            (data.type_, data.s, data.db, data.l, data.g),
            (3, 1, 1, 0, 1)
        );
        let tss = kvm_segment_from_gdt(gdt[3], TSS_SEGMENT_INDEX);
        assert_eq!(tss.selector, 0x18);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
        let null = kvm_segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn write_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt_table(&boot_gdt(), &mem).unwrap();
        write_idt_value(0, &mem).unwrap();
        for (i, e) in boot_gdt().iter().enumerate() {
            let v: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + i as u64 * 8))
                .unwrap();
            assert_eq!(v, *e);
        }
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).unwrap();
        assert!(write_gdt_table(&boot_gdt(), &small).is_err());
        assert!(write_idt_value(0, &small).is_err());
    }
}
