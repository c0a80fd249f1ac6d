//! A guest that halts for good: every vCPU stopped in `HLT` with interrupts
//! disabled (or never started, waiting for a start-up IPI). Nothing can
//! wake such a machine, and it is how Linux ends `poweroff` when it has no
//! way to power off (a kernel without ACPI: `reboot(POWER_OFF)` becomes a
//! halt, which stops every CPU with `cli; hlt`). capsule ends the VM then,
//! as a power-off.
//!
//! With the in-kernel irqchip a `HLT` never leaves `KVM_RUN`, so the
//! event loop kicks every vCPU out of it now and then ([`CHECK_EVERY`]);
//! each vCPU thread, on its way back in, looks at its own state
//! (`KVM_GET_MP_STATE`, `RFLAGS.IF`) and reports it here.

use std::sync::Mutex;
use std::time::Duration;

/// How often the vCPUs are kicked to look at their state.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);

/// What a vCPU found about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// It runs (or may run again): the VM is alive.
    Live,
    /// Halted with interrupts disabled.
    HaltedForGood,
    /// Never started (waits for INIT/SIPI from another CPU).
    WaitingForStart,
}

impl VcpuState {
    /// The state from KVM's `mp_state` and the vCPU's RFLAGS.
    pub fn of(mp_state: u32, rflags: impl FnOnce() -> Option<u64>) -> Self {
        const IF: u64 = 1 << 9;
        match mp_state {
            kvm_bindings::KVM_MP_STATE_HALTED => match rflags() {
                Some(f) if f & IF == 0 => VcpuState::HaltedForGood,
                _ => VcpuState::Live,
            },
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => {
                VcpuState::WaitingForStart
            }
            _ => VcpuState::Live,
        }
    }
}

/// The last state each vCPU reported.
#[derive(Debug)]
pub struct HaltWatch {
    states: Mutex<Vec<VcpuState>>,
}

impl HaltWatch {
    /// A watch over `n` vCPUs, all live.
    pub fn new(n: usize) -> Self {
        Self {
            states: Mutex::new(vec![VcpuState::Live; n]),
        }
    }

    /// Records vCPU `index`'s state; returns true when the whole machine
    /// has halted for good: no vCPU live and at least one halted.
    pub fn report(&self, index: usize, state: VcpuState) -> bool {
        let mut s = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = s.get_mut(index) {
            *slot = state;
        }
        !s.contains(&VcpuState::Live) && s.contains(&VcpuState::HaltedForGood)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::*;

    #[test]
    fn states() {
        assert_eq!(
            VcpuState::of(KVM_MP_STATE_HALTED, || Some(0x2)),
            VcpuState::HaltedForGood
        );
        assert_eq!(
            VcpuState::of(KVM_MP_STATE_HALTED, || Some(0x202)),
            VcpuState::Live
        );
        assert_eq!(VcpuState::of(KVM_MP_STATE_HALTED, || None), VcpuState::Live);
        assert_eq!(
            VcpuState::of(KVM_MP_STATE_RUNNABLE, || Some(0x2)),
            VcpuState::Live
        );
        assert_eq!(
            VcpuState::of(KVM_MP_STATE_UNINITIALIZED, || None),
            VcpuState::WaitingForStart
        );
    }

    #[test]
    fn the_machine_halts_when_no_vcpu_is_live() {
        let w = HaltWatch::new(3);
        assert!(!w.report(0, VcpuState::HaltedForGood));
        assert!(!w.report(1, VcpuState::WaitingForStart));
        assert!(w.report(2, VcpuState::HaltedForGood));
        // One woke up again: alive.
        assert!(!w.report(1, VcpuState::Live));
        let w = HaltWatch::new(2);
        assert!(!w.report(0, VcpuState::WaitingForStart));
        assert!(!w.report(1, VcpuState::WaitingForStart));
    }
}
