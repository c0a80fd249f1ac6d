//! The tiny hand-assembled 64-bit guests the VMM tests boot: a few
//! x86-64 instructions ([`Asm`]) in a minimal ELF ([`super::elf`]),
//! written where the capsule under test can load them.
use std::path::PathBuf;

use super::elf;

pub const COM1: u16 = 0x3f8;

pub const ACPI_SLEEP_CONTROL: u16 = 0x3c0;

pub const PVPANIC: u16 = 0x505;

pub const I8042_COMMAND: u16 = 0x64;

/// A few x86-64 instructions, assembled by hand.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.0.extend([0x66, 0xba]);
        self.0.extend(port.to_le_bytes());
        self
    }
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.0.extend([0xb0, v]);
        self
    }
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.0.push(0xee);
        self
    }
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.0.push(0xec);
        self
    }
    pub fn outb(&mut self, port: u16, v: u8) -> &mut Self {
        self.mov_dx(port).mov_al(v).out_dx_al()
    }
    pub fn print(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.outb(COM1, b);
        }
        self
    }
    /// A short jump (`opcode`: 0xeb jmp, 0x74 jz, 0x75 jnz, ...) to the
    /// code at offset `target`.
    pub fn short_jump(&mut self, opcode: u8, target: usize) -> &mut Self {
        let next = self.0.len() + 2;
        self.0.extend([opcode, super::rel8(target, next)]);
        self
    }
    /// A near jump (`jmp rel32`) to the code at offset `target`.
    pub fn jmp(&mut self, target: usize) -> &mut Self {
        let next = i32::try_from(self.0.len() + 5).expect("a small guest");
        let target = i32::try_from(target).expect("a small guest");
        self.0.push(0xe9);
        self.0.extend((target - next).to_le_bytes());
        self
    }
    pub fn halt_forever(&mut self) -> &mut Self {
        self.0.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
        self
    }
    /// mov rax, imm64; mov rbx, imm64; mov [rbx], rax
    pub fn store_u64(&mut self, addr: u64, v: u64) -> &mut Self {
        self.0.extend([0x48, 0xb8]);
        self.0.extend(v.to_le_bytes());
        self.0.extend([0x48, 0xbb]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend([0x48, 0x89, 0x03]);
        self
    }
    /// Maps the 2 MiB page holding `addr`, in the fourth GiB (capsule's
    /// boot page tables cover only the first): a page directory for that
    /// GiB at 0xc000 (zeroed RAM), one 2 MiB entry in it, and the PDPT
    /// entry for it; then reloads CR3. Leaves rbx = `addr`.
    pub fn map_fourth_gib(&mut self, addr: u32) -> &mut Self {
        assert!(addr >= 0xc000_0000, "{addr:#x} is not in the fourth GiB");
        let pd = 0xc000u64;
        let index = (u64::from(addr) - 0xc000_0000) >> 21;
        self.store_u64(pd + index * 8, (u64::from(addr) & !0x1f_ffff) | 0x83)
            .store_u64(0xa000 + 3 * 8, pd | 0x3);
        self.0.extend([0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]); // mov rax, cr3; mov cr3, rax
        self.0.push(0xbb); // mov ebx, addr
        self.0.extend(addr.to_le_bytes());
        self
    }
}

pub fn write_guest(name: &str, code: &Asm) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vmm-guests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    // Tests run in parallel and several boot the same guest: written
    // whole under a name of its own, then renamed, so that no capsule
    // reads a half-written file.
    let tmp = dir.join(format!("{name}.{:?}", std::thread::current().id()));
    std::fs::write(&tmp, elf(&code.0)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Polls COM1 until a byte arrives, then powers off.
pub fn poweroff_on_input_guest() -> PathBuf {
    let mut a = Asm::default();
    let poll = a.0.len();
    a.mov_dx(COM1 + 5).in_al_dx();
    a.0.extend([0xa8, 0x01]); // test al, 1 (data ready)
    a.short_jump(0x74, poll); // jz poll
    a.outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    write_guest("poweroff-on-input.elf", &a)
}

pub fn poweroff_guest() -> PathBuf {
    let mut a = Asm::default();
    a.outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    write_guest("net-poweroff.elf", &a)
}
