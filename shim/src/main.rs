//! `containerd-shim-capsule-v2`: a containerd runtime (shim v2) that runs
//! each container in its own capsule microVM.
//!
//! containerd starts this binary for runtime `io.containerd.capsule.v2`
//! and drives it over ttrpc with the task API (`service.rs`). For each
//! container the shim runs `capsule exec` (`process.rs`): a fresh microVM
//! whose root is the bundle's rootfs over virtio-fs, in which capsule's
//! guest init runs the OCI process (`spec.rs`) and carries its stdio and
//! exit status over vsock. Processes exec'd in a running container go
//! to the guest init over vsock connections of their own (`execio.rs`).
//! See docs/kubernetes.md.

mod config;
mod console;
mod execio;
mod mounts;
mod podnet;
mod process;
mod service;
mod spec;
mod stats;
mod status;
mod stdin;

/// The runtime name containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.capsule.v2";

fn main() {
    let config = containerd_shim::Config {
        // The shim waits for its own children (`capsule exec`) with
        // `Child::wait`; the library's SIGCHLD reaper would race it.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>(RUNTIME_ID, Some(config));
}
