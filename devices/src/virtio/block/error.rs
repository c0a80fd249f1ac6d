//! Why a block device could not be set up.

use std::io;
use std::path::PathBuf;

/// Errors from setting up a block device. Each names the image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// Another process (or another disk of this VM) holds a conflicting lock.
    #[error(
        "disk image {path} is in use by another process (cannot take {} lock): {}",
        if *.exclusive { "an exclusive" } else { "a shared" },
        if *.exclusive {
            "stop the VM that has it, or give it to each VM with ,ro or ,ephemeral to share it read-only"
        } else {
            "a VM is writing to it; stop that VM first"
        }
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// Whether an exclusive lock was requested.
        exclusive: bool,
    },
    /// Locking failed for another reason.
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The size of the image cannot be determined.
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The ephemeral overlay cannot be created.
    #[error("cannot create the ephemeral overlay for disk image {path}: {source}")]
    Overlay {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The serial number does not fit the 20-byte GET_ID answer.
    #[error("disk serial {serial:?} is longer than 20 bytes")]
    SerialTooLong {
        /// The serial.
        serial: String,
    },
    /// `engine=io_uring` on an ephemeral disk, whose copy-on-write
    /// overlay only the synchronous engine serves.
    #[error("disk image {0}: engine=io_uring does not support ephemeral (copy-on-write) disks; use engine=sync")]
    UringEphemeral(PathBuf),
    /// The io_uring engine cannot start: `io_uring_setup` (or registering
    /// its eventfd) failed, e.g. an old kernel, `kernel.io_uring_disabled`
    /// or a seccomp policy.
    #[error("disk image {path}: engine=io_uring is unavailable on this host ({source}); use engine=sync")]
    Uring {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating an eventfd failed.
    #[error("cannot create eventfd for disk image {path}: {source}")]
    EventFd {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}
