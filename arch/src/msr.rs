//! Model specific registers of a vCPU at boot.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast string operations enabled.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back, as used in the MTRR default type field.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;
/// STAR: SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR: 64-bit SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR: compatibility-mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL_MASK (FMASK): RFLAGS mask applied by SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE: value swapped in by SWAPGS.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Errors while setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MSR list could not be built (too many entries).
    #[error("failed to build the MSR list")]
    CreateMsrs,
    /// KVM_SET_MSRS failed.
    #[error("failed to set MSRs: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM accepted only part of the MSRs.
    #[error("KVM set only {set} of {requested} MSRs")]
    PartialSet {
        /// Number of MSRs KVM set.
        set: usize,
        /// Number of MSRs requested.
        requested: usize,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSRs (and values) a Linux guest expects at boot.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Programs the boot MSRs of a vCPU; fails unless KVM sets all of them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::CreateMsrs)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if set != entries.len() {
        return Err(Error::PartialSet {
            set,
            requested: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs() {
        let entries = boot_msr_entries();
        let get = |index: u32| {
            entries
                .iter()
                .find(|e| e.index == index)
                .map(|e| e.data)
                .unwrap()
        };
        assert_eq!(get(MSR_MTRR_DEF_TYPE), (1 << 11) | 6);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        for index in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_KERNEL_GS_BASE,
            MSR_SYSCALL_MASK,
            MSR_IA32_TSC,
        ] {
            assert_eq!(get(index), 0);
        }
        assert_eq!(entries.len(), 11);
        // No duplicates.
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), entries.len());
        assert!(Msrs::from_entries(&entries).is_ok());
    }

    #[test]
    fn set_on_kvm() {
        // /dev/kvm exists wherever the tests run (CI and dev machines):
        // without it this test fails rather than pass having checked nothing.
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs a usable /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_msrs(&vcpu).unwrap();
    }
}
