//! General purpose, FPU and special register setup of the boot vCPU for
//! the Linux 64-bit boot protocol.

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::gdt::{
    self, boot_gdt, kvm_segment_from_gdt, CODE_SEGMENT_INDEX, DATA_SEGMENT_INDEX, TSS_SEGMENT_INDEX,
};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

/// Limit (size - 1) of the boot GDT: four 8-byte descriptors.
const GDT_LIMIT: u16 = 4 * 8 - 1;
const _: () = assert!(boot_gdt().len() * 8 == GDT_LIMIT as usize + 1);
/// Limit (size - 1) of the boot IDT: one (empty) 8-byte entry.
const IDT_LIMIT: u16 = 8 - 1;

/// CR0: protection enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Page table entry flags: present and writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry flag: 2 MiB page.
const PDE_PAGE_SIZE: u64 = 0x80;
/// Number of 2 MiB pages identity-mapped at boot (1 GiB).
const BOOT_2M_PAGES: u64 = 512;

/// Errors while setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_SET_REGS failed.
    #[error("failed to set general purpose registers: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("failed to set FPU registers: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("failed to get special registers: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("failed to set special registers: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// The GDT or IDT could not be written.
    #[error("failed to write descriptor tables: {0}")]
    DescriptorTables(#[source] gdt::Error),
    /// The PML4 could not be written.
    #[error("failed to write the PML4: {0}")]
    WritePml4(#[source] vm_memory::GuestMemoryError),
    /// The PDPT could not be written.
    #[error("failed to write the PDPT: {0}")]
    WritePdpte(#[source] vm_memory::GuestMemoryError),
    /// The page directory could not be written.
    #[error("failed to write the page directory: {0}")]
    WritePde(#[source] vm_memory::GuestMemoryError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Computes the general purpose registers of the boot vCPU.
fn boot_regs(entry_point: u64) -> kvm_regs {
    kvm_regs {
        // Bit 1 of RFLAGS is reserved and must be 1.
        rflags: 0x2,
        rip: entry_point,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        // The 64-bit boot protocol passes the zero page in RSI.
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Sets the general purpose registers for the Linux 64-bit boot protocol:
/// RIP at `entry_point`, stack at [`BOOT_STACK_POINTER`], RSI pointing to
/// the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry_point: u64) -> Result<()> {
    vcpu.set_regs(&boot_regs(entry_point))
        .map_err(Error::SetRegs)
}

/// Computes the initial FPU state (the state after FNINIT, with SSE
/// exceptions masked).
fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Sets the initial FPU state of a vCPU.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    vcpu.set_fpu(&boot_fpu()).map_err(Error::SetFpu)
}

/// Puts the vCPU in 64-bit long mode with identity-mapped paging for the
/// first 1 GiB, writing the GDT, IDT and page tables into `mem`.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    configure_segments_and_sregs(mem, &mut sregs)?;
    setup_page_tables(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)
}

/// Writes the boot GDT and IDT and loads flat 64-bit segments, protected
/// mode and long mode (EFER) into `sregs`.
fn configure_segments_and_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<()> {
    let gdt_table = boot_gdt();
    let code = kvm_segment_from_gdt(gdt_table[CODE_SEGMENT_INDEX as usize], CODE_SEGMENT_INDEX);
    let data = kvm_segment_from_gdt(gdt_table[DATA_SEGMENT_INDEX as usize], DATA_SEGMENT_INDEX);
    let tss = kvm_segment_from_gdt(gdt_table[TSS_SEGMENT_INDEX as usize], TSS_SEGMENT_INDEX);

    gdt::write_gdt_table(&gdt_table, mem).map_err(Error::DescriptorTables)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;

    gdt::write_idt_value(0, mem).map_err(Error::DescriptorTables)?;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = IDT_LIMIT;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Writes identity-mapped page tables for the first 1 GiB (2 MiB pages)
/// at [`PML4_START`], [`PDPTE_START`] and [`PDE_START`], and enables paging
/// with PAE in `sregs`.
fn setup_page_tables(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<()> {
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(Error::WritePml4)?;
    mem.write_obj(PDE_START | PTE_PRESENT_RW, GuestAddress(PDPTE_START))
        .map_err(Error::WritePdpte)?;
    for i in 0..BOOT_2M_PAGES {
        mem.write_obj(
            (i << 21) | PDE_PAGE_SIZE | PTE_PRESENT_RW,
            GuestAddress(PDE_START + i * 8),
        )
        .map_err(Error::WritePde)?;
    }

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn regs_follow_boot_protocol() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rbp, BOOT_STACK_POINTER);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn segments_and_sregs() {
        let mem = guest_mem();
        let mut sregs = kvm_sregs::default();
        configure_segments_and_sregs(&mem, &mut sregs).unwrap();

        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.idt.base, BOOT_IDT_START);
        assert_eq!(sregs.idt.limit, 7);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.cs.l, 1);
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
            assert_eq!(seg.type_, 3);
        }
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);

        let gdt = boot_gdt();
        for (i, e) in gdt.iter().enumerate() {
            let v: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(v, *e);
        }
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn page_tables() {
        let mem = guest_mem();
        let mut sregs = kvm_sregs::default();
        setup_page_tables(&mem, &mut sregs).unwrap();

        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 0x3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 0x3);
        for i in 0..512u64 {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83);
        }
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.cr0 & X86_CR0_PG, X86_CR0_PG);
    }

    #[test]
    fn full_sregs_bits() {
        let mem = guest_mem();
        let mut sregs = kvm_sregs::default();
        configure_segments_and_sregs(&mem, &mut sregs).unwrap();
        setup_page_tables(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr4, X86_CR4_PAE);
    }

    #[test]
    fn too_small_memory_fails() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut sregs = kvm_sregs::default();
        assert!(matches!(
            setup_page_tables(&mem, &mut sregs),
            Err(Error::WritePml4(_))
        ));
    }

    #[test]
    fn vcpu_setup_on_kvm() {
        // /dev/kvm exists wherever the tests run (CI and dev machines):
        // without it this test fails rather than pass having checked nothing.
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs a usable /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mem = guest_mem();
        setup_regs(&vcpu, 0x100_0000).unwrap();
        setup_fpu(&vcpu).unwrap();
        setup_sregs(&mem, &vcpu).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x100_0000);
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }
}
