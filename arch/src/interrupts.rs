//! Local APIC setup: wires LINT0 to the legacy PIC (ExtINT) and LINT1 to
//! NMI, as a PC BIOS would.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Offset of the LVT LINT0 register in the local APIC page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the local APIC page.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode: fixed.
pub const APIC_MODE_FIXED: u32 = 0x0;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode: external interrupt (8259 PIC).
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors while programming the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_GET_LAPIC failed.
    #[error("failed to get the local APIC state: {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("failed to set the local APIC state: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Reads the 32-bit register at `offset` of a local APIC state.
///
/// # Panics
///
/// If `offset + 4` exceeds the 1 KiB register page.
pub fn get_klapic_reg(klapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| klapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

/// Writes the 32-bit register at `offset` of a local APIC state.
///
/// # Panics
///
/// If `offset + 4` exceeds the 1 KiB register page.
pub fn set_klapic_reg(klapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        klapic.regs[offset + i] = b as _;
    }
}

/// Returns LVT register value `reg` with its delivery mode (bits 10:8)
/// replaced by `mode`.
pub const fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | ((mode & 0x7) << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI delivery in `klapic`.
fn configure_lint(klapic: &mut kvm_lapic_state) {
    let lvt0 = get_klapic_reg(klapic, APIC_LVT0);
    set_klapic_reg(
        klapic,
        APIC_LVT0,
        set_apic_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_klapic_reg(klapic, APIC_LVT1);
    set_klapic_reg(
        klapic,
        APIC_LVT1,
        set_apic_delivery_mode(lvt1, APIC_MODE_NMI),
    );
}

/// Configures the LAPIC of `vcpu`: LVT LINT0 delivers ExtINT, LVT LINT1
/// delivers NMI. Requires the in-kernel irqchip.
pub fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut klapic = vcpu.get_lapic().map_err(Error::GetLapic)?;
    configure_lint(&mut klapic);
    vcpu.set_lapic(&klapic).map_err(Error::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_roundtrip() {
        let mut klapic = kvm_lapic_state::default();
        set_klapic_reg(&mut klapic, 0x20, 0xdead_beef);
        assert_eq!(get_klapic_reg(&klapic, 0x20), 0xdead_beef);
        assert_eq!(klapic.regs[0x20] as u8, 0xef);
        assert_eq!(klapic.regs[0x23] as u8, 0xde);
        assert_eq!(get_klapic_reg(&klapic, 0x30), 0);
    }

    #[test]
    fn delivery_mode() {
        assert_eq!(
            set_apic_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(
            set_apic_delivery_mode(0x0001_0700, APIC_MODE_NMI),
            0x0001_0400
        );
        assert_eq!(
            set_apic_delivery_mode(0xffff_ffff, APIC_MODE_FIXED),
            0xffff_f8ff
        );
    }

    #[test]
    fn lint_configuration() {
        let mut klapic = kvm_lapic_state::default();
        // Masked, as after reset.
        set_klapic_reg(&mut klapic, APIC_LVT0, 0x1_0000);
        set_klapic_reg(&mut klapic, APIC_LVT1, 0x1_0000);
        configure_lint(&mut klapic);
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT0), 0x1_0700);
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT1), 0x1_0400);
    }

    #[test]
    fn set_lint_on_kvm() {
        // /dev/kvm exists wherever the tests run (CI and dev machines):
        // without it this test fails rather than pass having checked nothing.
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs a usable /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        set_lint(&vcpu).unwrap();
        let klapic = vcpu.get_lapic().unwrap();
        assert_eq!(
            (get_klapic_reg(&klapic, APIC_LVT0) >> 8) & 7,
            APIC_MODE_EXTINT
        );
        assert_eq!((get_klapic_reg(&klapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
