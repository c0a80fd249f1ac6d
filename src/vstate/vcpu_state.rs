//! A vCPU's complete architectural state, for snapshots: what KVM holds
//! for it (registers, segments, FPU/XSAVE, XCRs, debug registers, the
//! local APIC, MSRs including the kvmclock and TSC ones, the MP state,
//! pending exceptions/interrupts/NMIs) and the CPUID it was given.
//!
//! [`save`] runs on the vCPU's own thread while it is parked (outside
//! `KVM_RUN`); [`restore`] on a vCPU that has not run yet. The restore
//! order follows the dependencies between the pieces: CPUID first (it
//! decides which XSAVE features and MSRs exist), the MP state before the
//! registers, the LAPIC before the MSRs (the TSC deadline timer MSR is
//! checked against the LAPIC's mode), the events last (they refer to the
//! state set before them).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Errors while saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// A list too long for KVM.
    #[error("too many {0} entries")]
    TooMany(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// At most this many MSRs go to KVM in one call.
const MSR_CHUNK: usize = 64;

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSR (index, value) pairs.
    pub msrs: Vec<(u32, u64)>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The vCPU's TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The MSRs worth saving: every MSR KVM can read or write for a guest.
pub fn msr_indices(kvm_sys: &Kvm) -> Result<Vec<u32>, Error> {
    let list = kvm_sys
        .get_msr_index_list()
        .map_err(kvm("cannot list MSRs"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads the MSRs `indices`. KVM stops at the first MSR it cannot read
/// for this vCPU (one the host lists but this CPU model lacks); that one
/// is left out and reading goes on after it.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooMany("MSR"))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("cannot read MSRs"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            log::trace!("MSR {:#x} not readable, not saved", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// Writes `msrs`; one KVM refuses (an MSR that reads but cannot be
/// written back, e.g. a read-only status MSR) is logged and skipped.
fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), Error> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|_| Error::TooMany("MSR"))?;
        let n = fd.set_msrs(&list).map_err(kvm("cannot restore MSRs"))?;
        if n < chunk.len() {
            log::debug!(
                "MSR {:#x} = {:#x} not restored (KVM refused it)",
                chunk[n].0,
                chunk[n].1
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(())
}

/// Saves the state of a vCPU that is not in `KVM_RUN`.
pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("cannot read CPUID"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: fd.get_mp_state().map_err(kvm("cannot read the MP state"))?,
        regs: fd.get_regs().map_err(kvm("cannot read registers"))?,
        sregs: fd.get_sregs().map_err(kvm("cannot read segments"))?,
        xsave: fd.get_xsave().map_err(kvm("cannot read XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm("cannot read XCRs"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(kvm("cannot read debug registers"))?,
        lapic: fd.get_lapic().map_err(kvm("cannot read the LAPIC"))?,
        msrs: read_msrs(fd, msr_indices)?,
        vcpu_events: fd
            .get_vcpu_events()
            .map_err(kvm("cannot read vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Restores `state` into a vCPU that has not run yet.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| Error::TooMany("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("cannot set CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        // Same frequency as the saving host: nothing to scale. Another
        // frequency needs TSC scaling, which not every host has.
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz)
                .map_err(kvm("cannot set the TSC frequency"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("cannot set the MP state"))?;
    fd.set_regs(&state.regs)
        .map_err(kvm("cannot set registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm("cannot set segments"))?;
    // SAFETY: `state.xsave` is a whole kvm_xsave (the legacy 4 KiB
    // layout, which is what KVM_GET_XSAVE produced); KVM reads no more.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("cannot set XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("cannot set XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("cannot set debug registers"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm("cannot set the LAPIC"))?;
    write_msrs(fd, &state.msrs)?;
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm("cannot set vCPU events"))?;
    Ok(())
}
