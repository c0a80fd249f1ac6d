//! Single files shared with the guest (`--share HOSTFILE:GUESTFILE`, what
//! the containerd shim gives for a container's `/etc/resolv.conf`,
//! `/etc/hosts` or a Secret's key mounted by `subPath`).
//!
//! virtio-fs shares directories, and sharing a file's parent would show
//! the guest its siblings (a kubelet pod directory holds every volume of
//! the pod). So capsule puts each file, as `INDEX`, in a private
//! directory of its own and shares that: read-only files in one
//! (read-only for virtiofsd too), writable ones in another, so that a
//! guest that mounts the device itself still cannot write a file it was
//! given read-only. Each is a hard link to the host file where it can be
//! (same file system): changes made to the file in place on either side
//! show on the other. Elsewhere it is a copy taken at start; a writable
//! copy's changes stay in the VM (logged). Without live shares the files
//! are packed into the initramfs (`initramfs.rs`) instead. The guest init
//! binds each one over its guest path (`guest-init/src/mounts.rs`).

use std::fs;
use std::io;
use std::path::Path;

use super::link::PrivateDir;
use super::{Error, ExecConfig};
use crate::config::FsConfig;

/// Moves the `--share`s whose host path is a regular file to
/// `config.files`; refuses a host path that is missing or neither a
/// directory nor a regular file (a socket, a device), as runc refuses a
/// bind mount whose source is missing.
pub(super) fn split_files(config: &mut ExecConfig) -> Result<(), Error> {
    let mut dirs = Vec::new();
    for share in config.shares.drain(..) {
        let meta = fs::metadata(&share.host)
            .map_err(|e| Error::Usage(format!("--share {}: {e}", share.host.display())))?;
        if meta.is_dir() {
            dirs.push(share);
        } else if meta.is_file() {
            config.files.push(share);
        } else {
            return Err(Error::Usage(format!(
                "--share {}: neither a directory nor a regular file",
                share.host.display()
            )));
        }
    }
    config.shares = dirs;
    Ok(())
}

/// The directories of the live file shares: one for the read-only files
/// ([`exec_proto::FILES_TAG`]), one for the writable ones
/// ([`exec_proto::FILES_RW_TAG`]), each only if it has files, added to
/// the VM as virtio-fs devices. Kept until the VM is gone (removed when
/// dropped).
pub(super) fn stage(config: &mut ExecConfig) -> Result<Vec<PrivateDir>, Error> {
    let mut stages = Vec::new();
    for (writable, tag) in [
        (false, exec_proto::FILES_TAG),
        (true, exec_proto::FILES_RW_TAG),
    ] {
        let files: Vec<_> = config
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.writable == writable)
            .collect();
        if files.is_empty() {
            continue;
        }
        let dir = PrivateDir::new()
            .map_err(|e| Error::Host("cannot create a directory for the shared files", e))?;
        for (i, f) in files {
            let how = place(&f.host, &dir.join(&i.to_string())).map_err(|e| {
                Error::Usage(format!(
                    "--share {}: cannot share it: {e}",
                    f.host.display()
                ))
            })?;
            if how == Placed::Copied && writable {
                log::warn!(
                    "--share {}: on another file system than {}, so copied: what the command writes to {} stays in the VM",
                    f.host.display(),
                    dir.0.display(),
                    f.guest
                );
            }
        }
        config.vm.fs.push(FsConfig {
            dir: dir.0.clone(),
            tag: tag.into(),
            read_only: !writable,
            submounts: false,
        });
        stages.push(dir);
    }
    Ok(stages)
}

/// How a file got into its stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// A hard link: the same file.
    Linked,
    /// A copy of its contents and mode.
    Copied,
}

/// Puts `host` (a symlink followed to its file) at `dest`: a hard link,
/// else (another file system, or a link refused) a copy.
fn place(host: &Path, dest: &Path) -> io::Result<Placed> {
    // `link` would link a symlink itself, which the guest could not
    // follow: the file it names is the one shared.
    let real = fs::canonicalize(host)?;
    if !fs::metadata(&real)?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    match fs::hard_link(&real, dest) {
        Ok(()) => Ok(Placed::Linked),
        Err(e)
            if e.raw_os_error() == Some(libc::EXDEV) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            fs::copy(&real, dest)?;
            Ok(Placed::Copied)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::tests::exec_config;
    use crate::exec::Share;

    fn share(host: &Path, guest: &str, writable: bool) -> Share {
        Share {
            host: host.to_path_buf(),
            guest: guest.into(),
            writable,
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("capsule-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_are_told_from_directories_and_a_missing_source_is_refused() {
        let d = scratch("split");
        fs::write(d.join("resolv.conf"), "nameserver 10.0.0.53\n").unwrap();
        let mut c = exec_config();
        c.shares = vec![
            share(&d, "/data", true),
            share(&d.join("resolv.conf"), "/etc/resolv.conf", false),
        ];
        split_files(&mut c).unwrap();
        assert_eq!(c.shares, [share(&d, "/data", true)]);
        assert_eq!(
            c.files,
            [share(&d.join("resolv.conf"), "/etc/resolv.conf", false)]
        );
        let mut c = exec_config();
        c.shares = vec![share(&d.join("nothing"), "/x", false)];
        let e = split_files(&mut c).unwrap_err().to_string();
        assert!(e.contains("nothing") && e.contains("No such file"), "{e}");
        let mut c = exec_config();
        c.shares = vec![share(Path::new("/dev/null"), "/x", false)];
        let e = split_files(&mut c).unwrap_err().to_string();
        assert!(e.contains("neither a directory nor a regular file"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_are_staged_by_index_read_only_apart_from_writable() {
        let d = scratch("stage");
        fs::write(d.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        fs::write(d.join("log"), "").unwrap();
        // A symlinked file (a kubelet volume's key) is shared as its file.
        std::os::unix::fs::symlink("hosts", d.join("link")).unwrap();
        let mut c = exec_config();
        c.files = vec![
            share(&d.join("link"), "/etc/hosts", false),
            share(&d.join("log"), "/dev/termination-log", true),
        ];
        let stages = stage(&mut c).unwrap();
        assert_eq!(stages.len(), 2);
        assert_eq!(c.vm.fs.len(), 2);
        assert_eq!(c.vm.fs[0].tag, exec_proto::FILES_TAG);
        assert!(c.vm.fs[0].read_only);
        assert_eq!(c.vm.fs[1].tag, exec_proto::FILES_RW_TAG);
        assert!(!c.vm.fs[1].read_only);
        let ro = stages[0].join("0");
        assert!(!ro.is_symlink());
        assert_eq!(fs::read(&ro).unwrap(), b"127.0.0.1 localhost\n");
        assert!(!stages[0].join("1").exists(), "the writable file is apart");
        // Same file system here: a link, so a write on one side shows on
        // the other.
        fs::write(stages[1].join("1"), "done\n").unwrap();
        assert_eq!(fs::read(d.join("log")).unwrap(), b"done\n");
        let dirs: Vec<_> = stages.iter().map(|s| s.0.clone()).collect();
        drop(stages);
        assert!(dirs.iter().all(|d| !d.exists()), "removed when dropped");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_copy_is_made_where_a_link_cannot_be() {
        let d = scratch("copy");
        fs::write(d.join("f"), "x").unwrap();
        // /proc's files are not regular files to link or copy.
        assert!(place(Path::new("/proc/self"), &d.join("p")).is_err());
        assert_eq!(place(&d.join("f"), &d.join("g")).unwrap(), Placed::Linked);
        // A file on another file system (/dev/shm is a tmpfs where the
        // temporary directory often is not) is copied; either way the
        // contents are there.
        if let Ok(()) = fs::write("/dev/shm/capsule-files-test", "y") {
            let how = place(Path::new("/dev/shm/capsule-files-test"), &d.join("h")).unwrap();
            assert_eq!(fs::read(d.join("h")).unwrap(), b"y");
            let _ = fs::remove_file("/dev/shm/capsule-files-test");
            log::info!("{how:?}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
