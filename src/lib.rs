//! capsule: a virtual machine monitor on Linux KVM.
//!
//! The data flow is: the CLI builds a [`config::VmConfig`];
//! [`builder::build`] turns it into a running [`vmm::Vmm`] (KVM VM,
//! guest memory, loaded kernel, devices, vCPU threads); [`vmm::Vmm::run`]
//! drives the device event loop until the guest ends the VM.

#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        reason = "test fixtures cast small, known values"
    )
)]

pub mod api;
pub mod balloon;
pub mod builder;
pub mod config;
pub mod confine;
pub mod device_manager;
pub mod doctor;
pub mod exec;
pub mod failstop;
pub mod fs_share;
pub mod hostfile;
pub mod jail;
mod kernel_load;
mod kernel_map;
pub mod kernel_probe;
pub mod landlock;
pub mod logfile;
pub mod logger;
pub mod runtime;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
mod stall;
pub mod terminal;
pub mod unixsock;
pub mod vmm;
pub mod vstate;

// For the kernel_image fuzz target only (fuzz/): loading a kernel file.
#[doc(hidden)]
pub use kernel_load::{load_kernel_image, LoadedKernel};

use std::sync::OnceLock;
use std::time::Instant;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// When this process started, as far as capsule can tell: the first call
/// of this function, which `main` makes before anything else. Boot times
/// (the boot-time marker) are measured from here.
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Logs (at debug level, target `capsule::setup`) that a step of setting
/// up a VM is done and when: `CAPSULE_LOG=capsule::setup=debug` shows
/// where the time before the guest runs goes.
pub fn setup_step(step: &str) {
    log::debug!(
        target: "capsule::setup",
        "{step} at {:.1} ms",
        process_start().elapsed().as_secs_f64() * 1000.0
    );
}
