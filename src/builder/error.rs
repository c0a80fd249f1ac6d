//! Why building (or running) a VM failed: each message names what failed
//! and, for files, which file, with a hint where one helps.

use std::path::PathBuf;

use arch::layout;
use devices::virtio::block::BlockError;
use devices::virtio::net::{self, PasstError, TapError};
use linux_loader::loader;

use crate::config::format_size;
use crate::device_manager;
use crate::vstate::{vcpu, vm};

/// What to do when a kernel or initrd named by the user cannot be read.
fn file_hint(what: &str, e: &std::io::Error) -> &'static str {
    match (what, e.kind()) {
        ("initrd", std::io::ErrorKind::NotFound) => {
            "; check the path (capsule exec needs no --initrd: it makes its own initramfs)"
        }
        (_, std::io::ErrorKind::NotFound) => "; check the path",
        (_, std::io::ErrorKind::PermissionDenied) => "; make it readable by you",
        _ => "",
    }
}

/// Errors while building or running a VM. Each message names what failed
/// and, for files, which file.
#[derive(Debug, thiserror::Error)]
#[allow(clippy::large_enum_variant)]
pub enum Error {
    /// Dirty-page tracking could not be enabled.
    #[error(transparent)]
    DirtyLog(#[from] crate::vstate::dirty::Error),
    /// A user-supplied file could not be opened or read.
    #[error("cannot read {what} {path}: {source}{hint}", hint = file_hint(.what, .source))]
    File {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(PathBuf),
    /// The kernel could not be loaded into guest memory.
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        /// The kernel file.
        path: PathBuf,
        /// Underlying error.
        source: loader::Error,
    },
    /// The initrd could not be read into guest memory.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: vm_memory::GuestMemoryError,
    },
    /// The initrd does not fit in guest memory.
    #[error("initrd {path} ({}) does not fit in guest memory: {source}", format_size(*.size))]
    InitrdTooBig {
        /// The initrd file.
        path: PathBuf,
        /// Its size in bytes (with the generated initramfs).
        size: u64,
        /// Underlying error.
        source: arch::boot::Error,
    },
    /// The command line is malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line is too long.
    #[error("invalid kernel command line: {0} (at most {max} bytes)", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written to guest memory.
    #[error("invalid kernel command line: {0}")]
    LoadCmdline(#[source] loader::Error),
    /// More memory than the host has.
    #[error("cannot give the guest {}: the host has {} of RAM; ask for less (--memory, or mem_size_mib over the API)", format_size(*.asked), format_size(*.host))]
    HostMemory {
        /// Requested size in bytes.
        asked: u64,
        /// Host RAM in bytes.
        host: u64,
    },
    /// Guest memory could not be mapped.
    #[error("cannot allocate {} of guest memory: {source}", format_size(*.size))]
    GuestMemory {
        /// Bytes asked for.
        size: u64,
        /// Underlying error.
        source: crate::vstate::memory::Error,
    },
    /// KVM VM setup failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Device setup failed.
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    /// The MP table could not be written.
    #[error("cannot write MP table: {0}")]
    MpTable(#[source] arch::mptable::Error),
    /// The ACPI tables could not be written.
    #[error("cannot write ACPI tables: {0}")]
    Acpi(#[source] arch::acpi::Error),
    /// The zero page could not be written.
    #[error("cannot write zero page: {0}")]
    ZeroPage(#[source] arch::boot::Error),
    /// The generated initramfs could not be written.
    #[error("cannot write initramfs: {0}")]
    Initramfs(#[source] vm_memory::GuestMemoryError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(#[source] event_manager::Error),
    /// A rate limiter's timer could not be created.
    #[error("cannot create a rate limiter: {0}")]
    RateLimiter(#[source] std::io::Error),
    /// The entropy device could not be created.
    #[error("cannot create the entropy device: {0}")]
    Entropy(#[source] std::io::Error),
    /// The balloon device could not be created.
    #[error("cannot create the balloon device: {0}")]
    Balloon(#[source] std::io::Error),
    /// A balloon target larger than guest memory.
    #[error("balloon amount_mib {amount} is more than the guest's {mem} MiB of memory")]
    BalloonSize {
        /// The target asked for (MiB).
        amount: u32,
        /// Guest memory (MiB).
        mem: u64,
    },
    /// The kernel is mapped from its file, and the eventfd its lease
    /// breaks are signalled on could not be duplicated.
    #[error("cannot watch the kernel file's lease: {0}")]
    KernelLease(#[source] std::io::Error),
    /// The eventfd the VM's end is signalled on could not be created.
    #[error("event loop: {0}")]
    ExitEvent(#[source] std::io::Error),
    /// A disk image could not be attached.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A TAP device could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// passt could not be started.
    #[error(transparent)]
    Passt(#[from] PasstError),
    /// vhost-net could not be set up for a network device (`vhost=on`).
    #[error("network device {0}: {1}")]
    VhostNet(usize, #[source] net::VhostNetError),
    /// A network device with `vhost=on` was given what only capsule's
    /// own data path does.
    #[error("network device {0}: vhost=on cannot be combined with {1} (the frames do not pass through capsule)")]
    VhostNetConflict(usize, &'static str),
    /// The vsock socket cannot be created.
    #[error("vsock socket {}: {why}", path.display())]
    VsockSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        why: crate::unixsock::BindError,
    },
    /// The vsock device cannot be made.
    #[error("vsock device: {0}")]
    Vsock(#[source] devices::virtio::vsock::VsockError),
    /// A virtio-fs share could not be set up.
    #[error(transparent)]
    FsShare(#[from] crate::fs_share::Error),
    /// Two network devices have the same MAC address.
    #[error("network devices {0} and {1} have the same MAC address {mac}", mac = net::format_mac(.2))]
    DuplicateMac(usize, usize, net::MacAddr),
    /// A network device could not be created.
    #[error("cannot create network device {0}: {1}")]
    Net(usize, #[source] std::io::Error),
    /// The terminal could not be put in raw mode.
    #[error("cannot set up the terminal: {0}")]
    Terminal(#[source] std::io::Error),
    /// File access could not be restricted.
    #[error(transparent)]
    Landlock(#[from] crate::landlock::Error),
    /// The main thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
}
