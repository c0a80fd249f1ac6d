//! The runtime root (the directory holding every named VM's directory):
//! where it is, and making sure it is ours alone before trusting anything
//! in it.
//!
//! A pid file or socket in a directory another user can write could be
//! planted to make `capsule kill` signal an arbitrary process, or to
//! intercept API calls. So the root and every VM directory must be a real
//! directory (not a symbolic link) owned by the effective user, with no
//! permissions for group or others. That matters most for the
//! `/tmp/capsule-UID` fallback, which anyone can create first.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::Error;

/// Environment variable that overrides the runtime root.
pub const ENV: &str = "CAPSULE_RUNTIME_DIR";

fn euid() -> u32 {
    // SAFETY: geteuid has no failure modes or side effects.
    unsafe { libc::geteuid() }
}

/// The directory holding all VMs' directories: `$CAPSULE_RUNTIME_DIR`,
/// else `/run/capsule` as root, else `$XDG_RUNTIME_DIR/capsule`, else
/// `$TMPDIR/capsule-UID`.
pub fn path() -> PathBuf {
    if let Some(d) = std::env::var_os(ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let euid = euid();
    if euid == 0 {
        return PathBuf::from("/run/capsule");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("capsule"),
        _ => std::env::temp_dir().join(format!("capsule-{euid}")),
    }
}

/// Checks that `dir` is a directory (not a link to one) owned by us with
/// no group or other permissions.
pub fn check_private(dir: &Path) -> Result<(), Error> {
    let m = std::fs::symlink_metadata(dir).map_err(Error::io("runtime directory", dir))?;
    if !m.file_type().is_dir() {
        return Err(Error::NotDirectory(dir.to_path_buf()));
    }
    let me = euid();
    if m.uid() != me {
        return Err(Error::NotOwner {
            dir: dir.to_path_buf(),
            owner: m.uid(),
            me,
        });
    }
    let mode = m.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::OpenMode {
            dir: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The runtime root, created (0700) if missing, and checked.
pub fn ensure() -> Result<PathBuf, Error> {
    let root = path();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(Error::io("cannot create", &root))?;
    check_private(&root)?;
    Ok(root)
}

/// The runtime root if it exists (checked); `None` if it does not.
pub fn existing() -> Result<Option<PathBuf>, Error> {
    let root = path();
    match std::fs::symlink_metadata(&root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => check_private(&root).map(|()| Some(root)),
    }
}

/// An exclusive lock on the runtime root (`flock` on the directory),
/// held while a VM directory is claimed or a stale one removed, so two
/// capsules never act on the same name at once.
pub struct Lock {
    _dir: File,
}

impl Lock {
    /// Waits for the lock.
    pub fn take(root: &Path) -> Result<Self, Error> {
        let f = File::open(root).map_err(Error::io("cannot open", root))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self { _dir: f });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("cannot lock", root)(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_private_directories_of_ours_pass() {
        let d = std::env::temp_dir().join(format!("capsule-root-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_private(&d).unwrap();
        for mode in [0o777, 0o755, 0o750, 0o701] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check_private(&d).unwrap_err().to_string();
            assert!(e.contains("open to other users"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = d.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(check_private(&link)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir(&d).unwrap();
    }
}
