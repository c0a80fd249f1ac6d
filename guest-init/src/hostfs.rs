//! What the init does before the command for host files reached over
//! virtio-fs: load the kernel modules a distribution kernel keeps out of
//! its image, mount the host's root (`--host-root`) and the live shares.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use exec_proto::{share_tag, ExecSpec, FS_ROOT_TAG, HOST_ROOT_TAG, MODULE_DIR};

use crate::sys;

/// The host's root, read-only.
const LOWER: &str = "/.capsule/lower";
/// The tmpfs holding the overlay's upper and work directories.
const RW: &str = "/.capsule/rw";
/// The merged root the command runs in.
pub const HOST_ROOT: &str = "/.capsule/root";

/// Loads the spec's modules in order. A module already there (built in,
/// or loaded) is fine; any other failure is an error naming it.
pub fn load_modules(spec: &ExecSpec) -> Result<(), String> {
    for name in &spec.modules {
        let name = OsStr::from_bytes(name);
        let path = Path::new(MODULE_DIR).join(name);
        let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let compressed = !name.as_bytes().ends_with(b".ko");
        match sys::finit_module(file.as_raw_fd(), compressed) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(format!(
                    "cannot load kernel module {}: {e}",
                    name.to_string_lossy()
                ))
            }
        }
    }
    Ok(())
}

/// Mounts the host's `/` (virtio-fs, read-only) under a tmpfs overlay at
/// [`HOST_ROOT`], with the guest's own /proc, /sys and /dev on top.
pub fn mount_host_root() -> Result<PathBuf, String> {
    for d in [LOWER, RW, HOST_ROOT] {
        fs::create_dir_all(d).map_err(|e| format!("cannot create {d}: {e}"))?;
    }
    sys::mount(
        Some(HOST_ROOT_TAG),
        LOWER.as_bytes(),
        Some("virtiofs"),
        libc::MS_RDONLY,
    )
    .map_err(|e| format!("cannot mount the host root (virtio-fs {HOST_ROOT_TAG}): {e}"))?;
    sys::mount(Some("tmpfs"), RW.as_bytes(), Some("tmpfs"), 0)
        .map_err(|e| format!("cannot mount the overlay's tmpfs: {e}"))?;
    for d in ["upper", "work"] {
        fs::create_dir_all(format!("{RW}/{d}")).map_err(|e| format!("cannot create {d}: {e}"))?;
    }
    let data = format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work");
    sys::mount_data("overlay", HOST_ROOT.as_bytes(), "overlay", 0, &data)
        .map_err(|e| format!("cannot mount the overlay on the host root: {e}"))?;
    crate::mount_basics(HOST_ROOT)
        .map_err(|e| format!("cannot mount /proc, /sys, /dev on the host root: {e}"))?;
    // The host's /tmp is the host's: the command gets its own.
    let tmp = format!("{HOST_ROOT}/tmp");
    let _ = fs::create_dir_all(&tmp);
    sys::mount(Some("tmpfs"), tmp.as_bytes(), Some("tmpfs"), 0)
        .map_err(|e| format!("cannot mount /tmp on the host root: {e}"))?;
    Ok(PathBuf::from(HOST_ROOT))
}

/// Mounts the host directory of `--fs-root` (virtio-fs, read-write) at
/// [`HOST_ROOT`], with the guest's own /proc, /sys, /dev and /tmp on top
/// (a container's rootfs has the directories, empty).
pub fn mount_fs_root() -> Result<PathBuf, String> {
    fs::create_dir_all(HOST_ROOT).map_err(|e| format!("cannot create {HOST_ROOT}: {e}"))?;
    sys::mount(Some(FS_ROOT_TAG), HOST_ROOT.as_bytes(), Some("virtiofs"), 0)
        .map_err(|e| format!("cannot mount the root (virtio-fs {FS_ROOT_TAG}): {e}"))?;
    crate::mount_basics(HOST_ROOT)
        .map_err(|e| format!("cannot mount /proc, /sys, /dev on the root: {e}"))?;
    let tmp = format!("{HOST_ROOT}/tmp");
    let _ = fs::create_dir_all(&tmp);
    sys::mount(Some("tmpfs"), tmp.as_bytes(), Some("tmpfs"), 0)
        .map_err(|e| format!("cannot mount /tmp on the root: {e}"))?;
    Ok(PathBuf::from(HOST_ROOT))
}

/// Mounts live share `index` (virtio-fs) at `target`, read-only unless
/// `rw` (virtiofsd refuses writes to a read-only share anyway).
pub fn mount_live_share(index: usize, target: &Path, rw: bool) -> Result<(), String> {
    let shown = target.display();
    fs::create_dir_all(target).map_err(|e| format!("cannot create share {shown}: {e}"))?;
    let flags = if rw { 0 } else { libc::MS_RDONLY };
    sys::mount(
        Some(&share_tag(index)),
        target.as_os_str().as_bytes(),
        Some("virtiofs"),
        flags,
    )
    .map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::ENODEV) {
            " (the guest kernel has no virtio-fs: CONFIG_VIRTIO_FS, or the virtiofs module; capsule shares live whenever it finds a virtiofsd)"
        } else {
            ""
        };
        format!(
            "cannot mount share {shown} (virtio-fs {}): {e}{hint}",
            share_tag(index)
        )
    })
}
