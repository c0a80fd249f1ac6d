//! What the VMM tests share: the tiny hand-assembled guests they boot.

/// Where the test guests are loaded and entered (2 MiB).
pub const LOAD_ADDR: u64 = 0x20_0000;

/// Wraps code in a minimal ELF64 executable loaded and entered at
/// [`LOAD_ADDR`].
pub fn elf(code: &[u8]) -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let off = u64::from(EHDR + PHDR);
    let mut f = Vec::new();
    f.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend([0u8; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(LOAD_ADDR.to_le_bytes()); // entry
    f.extend(u64::from(EHDR).to_le_bytes()); // phoff
    f.extend(0u64.to_le_bytes()); // shoff
    f.extend(0u32.to_le_bytes()); // flags
    f.extend(EHDR.to_le_bytes());
    f.extend(PHDR.to_le_bytes());
    f.extend(1u16.to_le_bytes()); // phnum
    f.extend(64u16.to_le_bytes()); // shentsize
    f.extend(0u16.to_le_bytes());
    f.extend(0u16.to_le_bytes());
    assert_eq!(f.len(), usize::from(EHDR));
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(5u32.to_le_bytes()); // R+X
    f.extend(off.to_le_bytes());
    f.extend(LOAD_ADDR.to_le_bytes());
    f.extend(LOAD_ADDR.to_le_bytes());
    f.extend((code.len() as u64).to_le_bytes());
    f.extend((code.len() as u64).to_le_bytes());
    f.extend(0x1000u64.to_le_bytes());
    assert_eq!(f.len(), usize::from(EHDR + PHDR));
    f.extend(code);
    f
}
