//! What the VMM tests share: the tiny hand-assembled guests they boot
//! (here and in [`guest`]), running capsule on them ([`run`]), an HTTP
//! client for the API socket ([`api`]) and the snapshot tests' fixtures
//! ([`snapshot`]). Each test binary uses a part of it.
#![allow(
    dead_code,
    reason = "each test binary uses a part of the shared helpers"
)]

pub mod api;
pub mod guest;
pub mod run;
pub mod snapshot;

/// A guest that only halts (`hlt; jmp hlt`): it ignores Ctrl-Alt-Del.
pub fn halting_guest() -> Vec<u8> {
    elf(&[0xf4, 0xeb, 0xfd])
}

/// Where the test guests are loaded and entered (2 MiB).
pub const LOAD_ADDR: u64 = 0x20_0000;

/// Wraps code in a minimal ELF64 executable loaded and entered at
/// [`LOAD_ADDR`]. The code starts a page into the file, as a vmlinux's
/// segments are page aligned: capsule maps such a kernel from its file
/// (src/kernel_map.rs) instead of copying it.
pub fn elf(code: &[u8]) -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    const CODE: usize = 0x1000;
    let off = CODE as u64;
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
    f.resize(CODE, 0);
    f.extend(code);
    f
}

/// `elf(code)` with a symbol table naming `symbols` (and section headers
/// for it), as a kernel built with symbols has.
pub fn elf_with_symbols(code: &[u8], symbols: &[&str]) -> Vec<u8> {
    let mut f = elf(code);
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; 24];
    for s in symbols {
        let mut sym = [0u8; 24];
        let name = u32::try_from(strtab.len()).expect("a short string table");
        sym[..4].copy_from_slice(&name.to_le_bytes());
        sym[4] = 0x12; // global function
        strtab.extend(s.as_bytes());
        strtab.push(0);
        symtab.extend(sym);
    }
    let shstrtab = b"\0.symtab\0.strtab\0.shstrtab\0".to_vec();
    let mut place = |data: &[u8]| {
        let at = f.len() as u64;
        f.extend(data);
        (at, data.len() as u64)
    };
    let sym = place(&symtab);
    let str_ = place(&strtab);
    let shstr = place(&shstrtab);
    let shoff = f.len() as u64;
    let header = |name: u32, kind: u32, (off, size): (u64, u64), link: u32, entsize: u64| {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&name.to_le_bytes());
        h[4..8].copy_from_slice(&kind.to_le_bytes());
        h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
        h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
        h[0x28..0x2c].copy_from_slice(&link.to_le_bytes());
        h[0x38..0x40].copy_from_slice(&entsize.to_le_bytes());
        h
    };
    f.extend([0u8; 64]);
    f.extend(header(1, 2, sym, 2, 24)); // .symtab, strings in section 2
    f.extend(header(9, 3, str_, 0, 0)); // .strtab
    f.extend(header(17, 3, shstr, 0, 0)); // .shstrtab
    f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    f[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
    f[0x3e..0x40].copy_from_slice(&3u16.to_le_bytes());
    f
}

/// A guest that prints '.' on COM1 (with a short delay) until it reads
/// Ctrl-Alt-Del's Delete make code (set 1, 0x53) from the i8042, then
/// resets through it.
pub fn ctrl_alt_del_guest() -> Vec<u8> {
    let mut c = Vec::new();
    let top = c.len();
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8 (COM1)
    c.extend([0xb0, b'.', 0xee]); // mov al, '.'; out dx, al
    c.extend([0xb9, 0x00, 0x10, 0x00, 0x00]); // mov ecx, 0x1000
    c.extend([0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz -4
    c.extend([0x66, 0xba, 0x64, 0x00, 0xec]); // mov dx, 0x64; in al, dx
    c.extend([0xa8, 0x01]); // test al, 1
    let jz = c.len();
    c.extend([0x74, 0x00]); // jz top
    c.extend([0x66, 0xba, 0x60, 0x00, 0xec]); // mov dx, 0x60; in al, dx
    c.extend([0x3c, 0x53]); // cmp al, 0x53
    let jne = c.len();
    c.extend([0x75, 0x00]); // jne top
    c.extend([0x66, 0xba, 0x64, 0x00, 0xb0, 0xfe, 0xee]); // out 0x64, 0xfe
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c[jz + 1] = rel8(top, jz + 2);
    c[jne + 1] = rel8(top, jne + 2);
    elf(&c)
}

/// The rel8 displacement of a short jump to `target` from `next` (the
/// offset of the instruction after the jump).
pub fn rel8(target: usize, next: usize) -> u8 {
    let d = i8::try_from(target as isize - next as isize).expect("short jump in range");
    d.to_ne_bytes()[0]
}
