//! capsule: a virtual machine monitor on Linux KVM.
//!
//! The data flow is: the CLI builds a [`config::VmConfig`];
//! [`builder::build`] turns it into a running [`builder::Vmm`] (KVM VM,
//! guest memory, loaded kernel, devices, vCPU threads); [`builder::Vmm::run`]
//! drives the device event loop until the guest ends the VM.

pub mod builder;
pub mod config;
pub mod device_manager;
pub mod exec;
pub mod terminal;
pub mod vstate;
