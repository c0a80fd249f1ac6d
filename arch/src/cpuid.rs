//! CPUID filtering: exposes the host CPU (as supported by KVM) with the
//! topology of the VM (one socket, `num_cpus` cores, one thread per core)
//! and the hypervisor bit set.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_xcr, kvm_xcrs, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

/// Basic feature information leaf.
const LEAF_FEATURES: u32 = 0x1;
/// Deterministic cache parameters leaf (Intel).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Thermal and power management leaf.
const LEAF_THERMAL_POWER: u32 = 0x6;
/// Architectural performance monitoring leaf.
const LEAF_PMU: u32 = 0xa;
/// Extended topology enumeration leaf.
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// V2 extended topology enumeration leaf.
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// Address sizes and core count leaf (AMD).
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// Extended processor features leaf (AMD).
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// Processor extended state enumeration leaf (XSAVE).
const LEAF_XSTATE: u32 = 0xd;

/// Leaf 1 EBX: initial APIC id shift.
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
/// Leaf 1 EBX: logical processor count shift.
const LEAF1_EBX_CPU_COUNT_SHIFT: u32 = 16;
/// Leaf 1 EBX: CLFLUSH line size shift (in 8-byte units).
const LEAF1_EBX_CLFLUSH_SHIFT: u32 = 8;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_SIZE: u32 = 8;
/// Leaf 1 ECX: TSC-deadline timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: VMX (Intel virtualization).
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX: XSAVE/XRSTOR and XCR0 are supported.
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// Leaf 0x8000_0001 ECX: SVM (AMD virtualization).
const LEAF_EXT_ECX_SVM: u32 = 1 << 2;
/// XCR0 components that every XSAVE-capable guest kernel manages itself:
/// x87, SSE and AVX state. (Others, like AVX-512 and AMX, are enabled by the
/// guest when it wants them.)
const XCR0_USER_BASIC: u64 = 0b111;
/// Leaf 1 EDX: hyper-threading (multiple logical processors per package).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Leaf 6 EAX: Intel Turbo Boost.
const LEAF6_EAX_TURBO: u32 = 1 << 1;
/// Leaf 6 ECX: energy performance bias.
const LEAF6_ECX_EPB: u32 = 1 << 3;

/// Extended topology level type: SMT.
const LEVEL_TYPE_SMT: u32 = 1;
/// Extended topology level type: core.
const LEVEL_TYPE_CORE: u32 = 2;

/// Errors while configuring CPUID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("failed to get the supported CPUID: {0}")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("failed to set CPUID: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_XCRS failed.
    #[error("failed to set XCR0: {0}")]
    SetXcrs(#[source] kvm_ioctls::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Number of bits needed to hold an id in `0..count`: `ceil(log2(count))`.
fn id_bits(count: u8) -> u32 {
    match count {
        0 | 1 => 0,
        n => u32::BITS - u32::from(n - 1).leading_zeros(),
    }
}

/// Extended topology subleaves (0: SMT, 1: core, 2: invalid terminator)
/// for leaf `function`.
fn topology_entries(function: u32, cpu_index: u8, num_cpus: u8) -> [kvm_cpuid_entry2; 3] {
    let x2apic_id = u32::from(cpu_index);
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: x2apic_id,
        ..Default::default()
    };
    [
        // One thread per core: no bits of the APIC id select the thread.
        entry(0, 0, 1, LEVEL_TYPE_SMT),
        // All vCPUs are cores of one package.
        entry(1, id_bits(num_cpus), u32::from(num_cpus), LEVEL_TYPE_CORE),
        entry(2, 0, 0, 0),
    ]
}

/// Adjusts the entries KVM reports as supported for vCPU `cpu_index` of a
/// VM with `num_cpus` vCPUs.
///
/// Sets the APIC ids and the topology (leaves 1, 4, 0xb, 0x1f and
/// 0x8000_0008), the hypervisor bit, and hides the PMU (leaf 0xa) and
/// power-management features a guest cannot use. Other leaves are left as
/// KVM gives them.
pub fn filter_cpuid(cpuid: &mut CpuId, cpu_index: u8, num_cpus: u8) {
    let num_cpus = num_cpus.max(1);
    let apic_id = u32::from(cpu_index);
    let mut has_topology_v2 = false;

    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0xff)
                    | (apic_id << LEAF1_EBX_APIC_ID_SHIFT)
                    | (u32::from(num_cpus) << LEAF1_EBX_CPU_COUNT_SHIFT)
                    | (CLFLUSH_SIZE << LEAF1_EBX_CLFLUSH_SHIFT);
                // Nested virtualization is not offered to the guest.
                entry.ecx = (entry.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_VMX;
                if num_cpus > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[4:0] == 0: no more caches.
                if entry.eax & 0x1f == 0 {
                    continue;
                }
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    u32::from(num_cpus) - 1
                } else {
                    0
                };
                // EAX[31:26] has 6 bits.
                let cores = (u32::from(num_cpus) - 1).min(0x3f);
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | (cores << 26);
            }
            LEAF_THERMAL_POWER => {
                entry.eax &= !LEAF6_EAX_TURBO;
                entry.ecx &= !LEAF6_ECX_EPB;
            }
            LEAF_PMU => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_TOPOLOGY_V2 => has_topology_v2 = true,
            LEAF_EXT_FEATURES => entry.ecx &= !LEAF_EXT_ECX_SVM,
            LEAF_AMD_SIZES => {
                // NC = num_cpus - 1; ApicIdCoreIdSize = 0 (derive from NC).
                entry.ecx = (entry.ecx & !0xf0ff) | (u32::from(num_cpus) - 1);
            }
            _ => {}
        }
    }

    // KVM reports the topology leaves with only a zeroed subleaf 0, so they
    // are rebuilt from scratch.
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_EXT_TOPOLOGY && e.function != LEAF_EXT_TOPOLOGY_V2)
        .copied()
        .collect();
    let max_basic = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(u32::MAX, |e| e.eax);
    if max_basic >= LEAF_EXT_TOPOLOGY {
        entries.extend(topology_entries(LEAF_EXT_TOPOLOGY, cpu_index, num_cpus));
    }
    if has_topology_v2 {
        entries.extend(topology_entries(LEAF_EXT_TOPOLOGY_V2, cpu_index, num_cpus));
    }
    match CpuId::from_entries(&entries) {
        Ok(new) => *cpuid = new,
        Err(e) => log::warn!("cannot rebuild CPUID topology leaves: {e:?}"),
    }
}

/// Sets CPUID of `vcpu` (number `cpu_index` of `num_cpus`) to what KVM
/// supports, filtered by [`filter_cpuid`]. The TSC-deadline timer is
/// advertised when KVM supports it.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, cpu_index: u8, num_cpus: u8) -> Result<()> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    filter_cpuid(&mut cpuid, cpu_index, num_cpus);
    if cpu_index == 0 && log::log_enabled!(log::Level::Trace) {
        for e in cpuid.as_slice() {
            log::trace!(
                "cpuid {:#x}.{:#x}: eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}",
                e.function,
                e.index,
                e.eax,
                e.ebx,
                e.ecx,
                e.edx
            );
        }
    }
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        for entry in cpuid.as_mut_slice() {
            if entry.function == LEAF_FEATURES {
                entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
            }
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
    if let Some(xcr0) = initial_xcr0(&cpuid) {
        setup_xcr0(vcpu, xcr0)?;
    }
    Ok(())
}

/// The XCR0 value a vCPU with `cpuid` starts with: the basic user state
/// components it supports, or `None` without XSAVE.
///
/// Starting with these enabled (rather than with x87 only, as at reset)
/// matters because KVM computes the XSAVE area size that CPUID leaf 0xd
/// reports from the current XCR0, and some KVM versions (seen in nested
/// setups) do not recompute it when the guest first writes XCR0: the guest
/// then sees a size for x87 state only and disables XSAVE altogether
/// ("XSAVE consistency problem"). With these bits already set, the guest's
/// own XSETBV changes nothing and the reported size stays right.
pub fn initial_xcr0(cpuid: &CpuId) -> Option<u64> {
    let entries = cpuid.as_slice();
    let has_xsave = entries
        .iter()
        .any(|e| e.function == LEAF_FEATURES && e.ecx & LEAF1_ECX_XSAVE != 0);
    let xstate = entries
        .iter()
        .find(|e| e.function == LEAF_XSTATE && e.index == 0)?;
    let supported = u64::from(xstate.eax) | (u64::from(xstate.edx) << 32);
    // x87 is architecturally always on; AVX needs SSE.
    let mut xcr0 = (supported & XCR0_USER_BASIC) | 1;
    if xcr0 & 0b010 == 0 {
        xcr0 &= !0b100;
    }
    has_xsave.then_some(xcr0)
}

/// Loads `xcr0` into the vCPU's XCR0.
fn setup_xcr0(vcpu: &VcpuFd, xcr0: u64) -> Result<()> {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0] = kvm_xcr {
        xcr: 0,
        reserved: 0,
        value: xcr0,
    };
    vcpu.set_xcrs(&xcrs).map_err(Error::SetXcrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A CPUID as KVM typically reports it on an Intel host.
    fn sample_cpuid() -> CpuId {
        let mut topo = leaf(0xb, 0, 0, 0, 0, 0);
        topo.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        CpuId::from_entries(&[
            leaf(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(
                1,
                0,
                0x000a_0655,
                0xff00_0800,
                LEAF1_ECX_TSC_DEADLINE | 1,
                0x0f8b_fbff,
            ),
            // L1d, L1i, L2, L3, terminator.
            leaf(4, 0, 0x1c00_4121, 0, 0, 0),
            leaf(4, 1, 0x1c00_4122, 0, 0, 0),
            leaf(4, 2, 0x1c00_4143, 0, 0, 0),
            leaf(4, 3, 0x1c03_c163, 0, 0, 0),
            leaf(4, 4, 0, 0, 0, 0),
            leaf(6, 0, 0x6, 0, 0x8, 0),
            leaf(0xa, 0, 0x0730_0805, 0, 0, 0x603),
            topo,
            leaf(0x1f, 0, 0, 0, 0, 0),
            leaf(0x4000_0001, 0, 0x1234, 0, 0, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("missing leaf {function:#x}.{index}"))
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
    }

    fn check(cpu_index: u8, num_cpus: u8, shift: u32) {
        let mut cpuid = sample_cpuid();
        filter_cpuid(&mut cpuid, cpu_index, num_cpus);
        let n = u32::from(num_cpus);
        let id = u32::from(cpu_index);

        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, id);
        assert_eq!((l1.ebx >> 16) & 0xff, n);
        assert_eq!((l1.ebx >> 8) & 0xff, 8);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT != 0, num_cpus > 1);

        for sub in 0..4 {
            let l4 = find(&cpuid, 4, sub);
            assert_eq!(l4.eax >> 26, n - 1);
            let sharing = (l4.eax >> 14) & 0xfff;
            assert_eq!(sharing, if sub == 3 { n - 1 } else { 0 });
            // Cache type and level are untouched.
            assert_eq!(
                l4.eax & 0xff,
                sample_cpuid().as_slice()[2 + sub as usize].eax & 0xff
            );
        }
        assert_eq!(find(&cpuid, 4, 4).eax, 0);

        for function in [0xb, 0x1f] {
            let smt = find(&cpuid, function, 0);
            assert_eq!(smt.eax & 0x1f, 0);
            assert_eq!(smt.ebx & 0xffff, 1);
            assert_eq!(smt.ecx, 1 << 8);
            assert_eq!(smt.edx, id);
            let core = find(&cpuid, function, 1);
            assert_eq!(core.eax & 0x1f, shift);
            assert_eq!(core.ebx & 0xffff, n);
            assert_eq!(core.ecx, (2 << 8) | 1);
            assert_eq!(core.edx, id);
            let end = find(&cpuid, function, 2);
            assert_eq!((end.ecx >> 8) & 0xff, 0);
            assert_eq!(end.ecx & 0xff, 2);
            assert_eq!(end.edx, id);
            assert_eq!(
                cpuid
                    .as_slice()
                    .iter()
                    .filter(|e| e.function == function)
                    .count(),
                3
            );
        }

        let pmu = find(&cpuid, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        let l6 = find(&cpuid, 6, 0);
        assert_eq!((l6.eax, l6.ecx), (0x4, 0));
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx, n - 1);
        assert_eq!(find(&cpuid, 0x4000_0001, 0).eax, 0x1234);
    }

    /// A CPUID with XSAVE (or not) and the given XCR0 components in leaf 0xd.
    fn xsave_cpuid(xsave: bool, components: u32) -> CpuId {
        let ecx = if xsave { LEAF1_ECX_XSAVE } else { 0 };
        CpuId::from_entries(&[
            leaf(1, 0, 0, 0, ecx, 0),
            leaf(0xd, 0, components, 0x340, 0x340, 0),
        ])
        .unwrap()
    }

    #[test]
    fn initial_xcr0_enables_basic_user_state() {
        assert_eq!(initial_xcr0(&xsave_cpuid(true, 0x7)), Some(0x7));
        // AVX-512 and others are left for the guest to enable.
        assert_eq!(initial_xcr0(&xsave_cpuid(true, 0xe7)), Some(0x7));
        assert_eq!(initial_xcr0(&xsave_cpuid(true, 0x3)), Some(0x3));
        // AVX without SSE is not a valid XCR0.
        assert_eq!(initial_xcr0(&xsave_cpuid(true, 0x5)), Some(0x1));
        assert_eq!(initial_xcr0(&xsave_cpuid(false, 0x7)), None);
    }

    #[test]
    fn nested_virtualization_hidden() {
        let mut cpuid = CpuId::from_entries(&[
            leaf(1, 0, 0, 0, LEAF1_ECX_VMX | 1, 0),
            leaf(0x8000_0001, 0, 0, 0, LEAF_EXT_ECX_SVM | 1, 0),
        ])
        .unwrap();
        filter_cpuid(&mut cpuid, 0, 1);
        assert_eq!(find(&cpuid, 1, 0).ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(find(&cpuid, 1, 0).ecx & 1, 1);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).ecx, 1);
    }

    #[test]
    fn one_vcpu() {
        check(0, 1, 0);
    }

    #[test]
    fn two_vcpus() {
        check(0, 2, 1);
        check(1, 2, 1);
    }

    #[test]
    fn four_vcpus() {
        for i in 0..4 {
            check(i, 4, 2);
        }
    }

    #[test]
    fn no_topology_v2_leaf_not_added() {
        let entries: Vec<_> = sample_cpuid()
            .as_slice()
            .iter()
            .filter(|e| e.function != 0x1f)
            .copied()
            .collect();
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut cpuid, 0, 2);
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0x1f));
        assert_eq!(find(&cpuid, 0xb, 1).ebx, 2);
    }

    #[test]
    fn setup_on_kvm() {
        // /dev/kvm exists wherever the tests run (CI and dev machines):
        // without it this test fails rather than pass having checked nothing.
        let kvm = Kvm::new().expect("this test needs a usable /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_cpuid(&kvm, &vcpu, 0, 2).unwrap();
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        assert_eq!(find(&cpuid, 0xb, 1).ebx & 0xffff, 2);
        // XCR0 itself is not checked: PVM (a software KVM) accepts
        // KVM_SET_XCRS but keeps x87 only. The boot tests check its effect
        // on a real guest (no "XSAVE consistency problem").
    }
}
