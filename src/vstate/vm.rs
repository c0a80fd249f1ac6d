//! The KVM VM: guest memory registration, in-kernel irqchip and PIT.

use arch::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// KVM API version capsule is written against.
pub const KVM_API_VERSION: i32 = 12;

/// The KVM capabilities capsule cannot run without (also checked by
/// `capsule doctor`).
pub const REQUIRED_CAPS: [Cap; 5] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::Irqfd,
    Cap::Pit2,
    Cap::SetTssAddr,
];

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the KVM device failed.
    #[error("cannot open {path}: {source}{hint}")]
    OpenKvm {
        /// Device path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
        /// Advice for the user (empty, or starting with "; ").
        hint: String,
    },
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability capsule relies on is missing.
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
}

/// What to do when the KVM device cannot be opened: a missing device
/// means no KVM on this host; a refused one names the group to join.
fn open_hint(path: &std::path::Path, e: &std::io::Error) -> String {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match e.kind() {
        std::io::ErrorKind::NotFound => "; this host has no KVM: load kvm_intel or kvm_amd, \
            enable virtualization in the firmware, or use a VM with nested virtualization \
            (capsule doctor checks the host)"
            .to_string(),
        std::io::ErrorKind::PermissionDenied => {
            let Ok(meta) = std::fs::metadata(path) else {
                return "; fix the device's permissions (capsule doctor checks the host)".into();
            };
            let group = group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
            format!(
                "; it is group {group}, mode {:o}: add yourself to that group (sudo usermod \
                 -aG {group} $USER, then log in again), or on a CI runner open it with a \
                 udev rule (docs/ci.md)",
                meta.permissions().mode() & 0o777
            )
        }
        _ => String::new(),
    }
}

/// The name of group `gid` from /etc/group.
pub fn group_name(gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next();
        (f.next()? == gid.to_string()).then(|| name.to_string())
    })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// A KVM VM with its memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `kvm_path` and checks the capabilities capsule needs.
    pub fn open_kvm(kvm_path: &std::path::Path) -> Result<Kvm, Error> {
        let path = kvm_path.display().to_string();
        let c_path =
            std::ffi::CString::new(kvm_path.as_os_str().as_encoded_bytes()).map_err(|_| {
                Error::OpenKvm {
                    path: path.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                    hint: String::new(),
                }
            })?;
        let kvm = Kvm::new_with_path(&c_path).map_err(|e| {
            let source = std::io::Error::from_raw_os_error(e.errno());
            let hint = open_hint(kvm_path, &source);
            Error::OpenKvm { path, source, hint }
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(Error::ApiVersion(version));
        }
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(cap));
            }
        }
        Ok(kvm)
    }

    /// Creates the VM, its irqchip and PIT, and registers `mem` with KVM.
    pub fn new(kvm: Kvm, mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(kvm_err("cannot create VM"))?;
        fd.set_tss_address(arch::usize_from(arch::layout::KVM_TSS_ADDRESS))
            .map_err(kvm_err("cannot set TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("cannot create in-kernel irqchip"))?;
        // The dummy speaker makes KVM handle port 0x61, which Linux pokes
        // while calibrating the TSC against the PIT.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("cannot create PIT"))?;
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("region has a host mapping") as u64;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a live mmap of `region.len()`
            // bytes owned by `mem`, which outlives the VM (the VMM keeps it
            // until exit).
            unsafe { fd.set_user_memory_region(r) }
                .map_err(kvm_err("cannot register guest memory"))?;
        }
        Ok(Self { kvm, fd })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM handle.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Makes KVM signal `evt`, instead of exiting to userspace, when the
    /// guest writes `datamatch` to the MMIO address `addr`.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), Error> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("cannot register ioeventfd"))
    }

    /// Makes KVM signal `evt`, instead of exiting to userspace, when the
    /// guest writes anything, of any width, to the MMIO address `addr`.
    pub fn register_mmio_ioevent_any(&self, evt: &EventFd, addr: u64) -> Result<(), Error> {
        self.fd
            .register_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(kvm_err("cannot register ioeventfd"))
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("cannot register irqfd"))
    }
}
