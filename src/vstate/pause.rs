//! Pausing: the gate vCPU threads park at while the VM is paused, and
//! through which a snapshot has each parked vCPU save its own state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::vcpu_state::{self, VcpuState};

/// Why [`PauseGate::save_states`] has no state for a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The vCPU could not read its state.
    #[error("vCPU {index}: {source}")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// What failed.
        source: vcpu_state::Error,
    },
    /// The vCPU did not answer before the timeout.
    #[error("vCPU {0} did not save its state in time")]
    Timeout(usize),
}

/// Parks vCPU threads while the VM is paused.
///
/// The VMM sets the request and kicks every vCPU out of `KVM_RUN`; each
/// vCPU thread sees the request before its next `KVM_RUN` and waits here,
/// outside the guest, until the request is withdrawn (or the VM stops).
/// The VMM learns that all vCPUs are parked from [`Self::parked`].
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    /// A snapshot's request for every parked vCPU's state.
    save: Option<SaveRequest>,
}

/// What [`PauseGate::save_states`] asks of the parked vCPUs: the MSRs to
/// read, and a slot per vCPU (by index) for its state or error.
#[derive(Debug)]
struct SaveRequest {
    msr_indices: Arc<Vec<u32>>,
    results: Vec<Option<Result<VcpuState, SaveError>>>,
}

/// How often a parked vCPU re-checks the stop flag.
const PARK_POLL: Duration = Duration::from_millis(50);

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks (true) or stops asking (false) vCPUs to park.
    pub fn set_requested(&self, requested: bool) {
        self.lock().requested = requested;
        self.changed.notify_all();
    }

    /// Whether vCPUs are asked to park.
    pub fn requested(&self) -> bool {
        self.lock().requested
    }

    /// How many vCPU threads are parked now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Waits, on a vCPU thread, while a pause is requested and `stop` is
    /// not set; saves the vCPU's state (`fd`, vCPU `index`) when a
    /// snapshot asks for it meanwhile.
    pub(super) fn park(&self, stop: &AtomicBool, index: u8, fd: &VcpuFd) {
        let mut st = self.lock();
        st.parked += 1;
        self.changed.notify_all();
        while st.requested && !stop.load(Ordering::Acquire) {
            if let Some(req) = st.save.as_mut() {
                if let Some(slot @ None) = req.results.get_mut(usize::from(index)) {
                    let state = vcpu_state::save(fd, &req.msr_indices);
                    *slot = Some(state.map_err(|source| SaveError::Vcpu { index, source }));
                    self.changed.notify_all();
                }
            }
            st = match self.changed.wait_timeout(st, PARK_POLL) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        st.parked -= 1;
        self.changed.notify_all();
    }

    /// With every one of `count` vCPUs parked: has each save its state
    /// (reading the MSRs `msr_indices`) and returns them in vCPU order,
    /// or the first error; gives up after `timeout`.
    pub fn save_states(
        &self,
        count: usize,
        msr_indices: Arc<Vec<u32>>,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, SaveError> {
        let mut st = self.lock();
        st.save = Some(SaveRequest {
            msr_indices,
            results: (0..count).map(|_| None).collect(),
        });
        self.changed.notify_all();
        let deadline = Instant::now() + timeout;
        loop {
            let done = st
                .save
                .as_ref()
                .is_some_and(|r| r.results.iter().all(Option::is_some));
            if done || Instant::now() >= deadline {
                break;
            }
            st = match self.changed.wait_timeout(st, Duration::from_millis(5)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        let req = st.save.take().expect("the request is ours");
        drop(st);
        req.results
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or(Err(SaveError::Timeout(i))))
            .collect()
    }

    /// Waits until `cond(parked)` holds or `timeout` passes; returns
    /// whether it holds. `kick` is called every few milliseconds meanwhile
    /// (to knock vCPUs out of `KVM_RUN`).
    pub fn wait_parked(
        &self,
        timeout: Duration,
        cond: impl Fn(usize) -> bool,
        mut kick: impl FnMut(),
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self.parked()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            kick();
            let st = self.lock();
            let _ = self.changed.wait_timeout(st, Duration::from_millis(5));
        }
    }
}
