//! The command's mounts inside its root, before it runs: the shared
//! directories (`--share HOSTDIR:GUESTDIR`), the single files (`--share
//! HOSTFILE:GUESTFILE`, the containerd shim's file bind mounts such as
//! `/etc/resolv.conf`) and the tmpfs mounts (`--tmpfs`).
//!
//! Every guest path is resolved inside the root ([`resolve_in_root`]):
//! `..` stops at the root and a symlink in the root's tree is followed as
//! if the root were `/`, as runc resolves a container's mount
//! destinations, so a spec's `/../../x` or a root whose `/etc` links to
//! `/../../..` cannot put a mount outside the command's root (on the
//! init's own files). Mounts go on in order of their depth (parents
//! before what is mounted inside them), as containerd's CRI sorts them.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use exec_proto::{ExecSpec, FILES_DIR, FILES_RW_DIR, FILES_RW_TAG, FILES_TAG};

use crate::{hostfs, share_source, stamp, sys, walk, Snapshot};

/// Symlinks followed while resolving one path (the kernel's own limit).
const MAX_SYMLINKS: u32 = 40;

/// `path`, a guest path (absolute or not), inside `root`: `.` and empty
/// components dropped, `..` never above `root`, and each symlink met on
/// the way replaced by its target read as a path inside `root` (an
/// absolute target starts again at `root`). Components that do not exist
/// are kept as they are (the caller creates them). More than
/// [`MAX_SYMLINKS`] links is `ELOOP`.
pub fn resolve_in_root(root: &Path, path: &[u8]) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = components(path).rev().collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        resolved.push(c);
        let here = joined(root, &resolved);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&here)?;
                resolved.pop();
                let target = target.as_os_str().as_bytes();
                if target.starts_with(b"/") {
                    resolved.clear();
                }
                pending.extend(components(target).rev());
            }
            Ok(_) => {}
            // Not there (yet): created later, as a directory or file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(joined(root, &resolved))
}

/// The components of a path, without empty ones and `.`.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| OsStr::from_bytes(c).to_owned())
}

fn joined(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// What a mount point must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory (a share, a tmpfs).
    Dir,
    /// Anything but a directory (a file bound over it).
    File,
}

/// Resolves `guest` inside `root` and makes sure a mount point of `kind`
/// is there: missing directories are created, a missing file is created
/// empty (in the root, as runc creates a bind mount's destination in a
/// container's rootfs: a mount needs something to go on). The root
/// itself is refused.
pub fn mount_point(root: &Path, guest: &[u8], kind: Kind) -> Result<PathBuf, String> {
    let shown = String::from_utf8_lossy(guest);
    let target =
        resolve_in_root(root, guest).map_err(|e| format!("cannot resolve {shown}: {e}"))?;
    if target == root {
        return Err(format!("{shown}: cannot mount over the root itself"));
    }
    let made = match kind {
        Kind::Dir => fs::create_dir_all(&target),
        Kind::File => target
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => Err(io::Error::other(
                    "a directory is there, and the source is a file",
                )),
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map(drop),
                Err(e) => Err(e),
            }),
    };
    made.map_err(|e| format!("cannot create the mount point {shown}: {e}"))?;
    Ok(target)
}

/// One of the spec's mounts, by index in its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planned {
    Share(usize),
    File(usize),
    Tmpfs(usize),
}

/// The spec's mounts in the order they go on: by the depth of their guest
/// path, and in the spec's order (shares, files, tmpfs) at equal depth.
fn plan(spec: &ExecSpec) -> Vec<(Planned, &[u8])> {
    let mut all: Vec<(Planned, &[u8])> = Vec::new();
    all.extend(
        spec.shares
            .iter()
            .enumerate()
            .map(|(i, s)| (Planned::Share(i), s.0.as_slice())),
    );
    all.extend(
        spec.files
            .iter()
            .enumerate()
            .map(|(i, f)| (Planned::File(i), f.0.as_slice())),
    );
    all.extend(
        spec.tmpfs
            .iter()
            .enumerate()
            .map(|(i, t)| (Planned::Tmpfs(i), t.0.as_slice())),
    );
    all.sort_by_key(|(_, path)| components(path).count());
    all
}

/// Mounts the spec's shares, files and tmpfs mounts in `root`; returns,
/// for each share, the snapshot copy-back compares with (writable copied
/// shares only).
pub fn mount_all(spec: &ExecSpec, root: &Path) -> Result<Vec<Option<Snapshot>>, String> {
    let mut snaps = vec![None; spec.shares.len()];
    if spec.live {
        for (rw, tag, dir) in [
            (false, FILES_TAG, FILES_DIR),
            (true, FILES_RW_TAG, FILES_RW_DIR),
        ] {
            if spec.files.iter().any(|f| f.1 == rw) {
                mount_files_dir(tag, dir, rw)?;
            }
        }
    }
    for (what, guest) in plan(spec) {
        match what {
            Planned::Share(i) => {
                let rw = spec.shares[i].1;
                snaps[i] = mount_share(spec.live, i, root, guest, rw)?;
            }
            Planned::File(i) => mount_file(spec.live, i, root, guest, spec.files[i].1)?,
            Planned::Tmpfs(i) => mount_tmpfs(root, guest, &spec.tmpfs[i].1)?,
        }
    }
    Ok(snaps)
}

/// The virtio-fs device `tag` holding file shares, at `dir`.
fn mount_files_dir(tag: &str, dir: &str, rw: bool) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    let flags = if rw { 0 } else { libc::MS_RDONLY };
    sys::mount(Some(tag), dir.as_bytes(), Some("virtiofs"), flags)
        .map_err(|e| format!("cannot mount the shared files (virtio-fs {tag}): {e}"))
}

/// Share `i` on `guest`: its virtio-fs tag when live, else its copy in the
/// initramfs bound there (read-only ones remounted read-only).
fn mount_share(
    live: bool,
    i: usize,
    root: &Path,
    guest: &[u8],
    rw: bool,
) -> Result<Option<Snapshot>, String> {
    let target = mount_point(root, guest, Kind::Dir)?;
    if live {
        hostfs::mount_live_share(i, &target, rw)?;
        return Ok(None);
    }
    let src = share_source(i);
    let _ = fs::create_dir_all(&src);
    let shown = String::from_utf8_lossy(guest);
    bind(&src, &target, rw).map_err(|e| format!("cannot mount share {shown}: {e}"))?;
    if !rw {
        return Ok(None);
    }
    let snap = walk(&src)
        .map_err(|e| format!("cannot list share {shown}: {e}"))?
        .into_iter()
        .map(|(p, m)| (p, stamp(&m)))
        .collect();
    Ok(Some(snap))
}

/// File `i` ([`FILES_DIR`]`/i`, or [`FILES_RW_DIR`]`/i` for a live
/// writable one) bound on `guest`, read-only unless `rw`.
fn mount_file(live: bool, i: usize, root: &Path, guest: &[u8], rw: bool) -> Result<(), String> {
    let shown = String::from_utf8_lossy(guest);
    let dir = if live && rw { FILES_RW_DIR } else { FILES_DIR };
    let src = Path::new(dir).join(i.to_string());
    let meta = fs::metadata(&src).map_err(|e| format!("file for {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("file for {shown}: {} is not a file", src.display()));
    }
    let target = mount_point(root, guest, Kind::File)?;
    bind(&src, &target, rw).map_err(|e| format!("cannot mount the file on {shown}: {e}"))
}

/// Binds `src` on `target`; read-only (a second, remounting call: a bind
/// mount takes no flags of its own) unless `rw`.
fn bind(src: &Path, target: &Path, rw: bool) -> io::Result<()> {
    sys::mount(
        src.to_str(),
        target.as_os_str().as_bytes(),
        None,
        libc::MS_BIND,
    )?;
    if rw {
        return Ok(());
    }
    sys::mount(
        None,
        target.as_os_str().as_bytes(),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
    )
}

/// A tmpfs on `guest` with `options` (see [`tmpfs_options`]).
fn mount_tmpfs(root: &Path, guest: &[u8], options: &[u8]) -> Result<(), String> {
    let shown = String::from_utf8_lossy(guest);
    let (flags, data) = tmpfs_options(options);
    let target = mount_point(root, guest, Kind::Dir)?;
    sys::mount_data(
        "tmpfs",
        target.as_os_str().as_bytes(),
        "tmpfs",
        flags,
        &data,
    )
    .map_err(|e| format!("cannot mount a tmpfs on {shown} ({data}): {e}"))
}

/// A tmpfs's comma-separated options as mount flags (`ro`, `nosuid`,
/// `nodev`, `noexec`, `noatime`) and the data tmpfs itself takes
/// (`size=`, `nr_blocks=`, `nr_inodes=`, `mode=`, `uid=`, `gid=`); others
/// (`rw`, propagation, `tmpcopyup`, ...) are left out: they change
/// nothing on a fresh tmpfs in a VM of its own.
pub fn tmpfs_options(options: &[u8]) -> (libc::c_ulong, String) {
    const DATA: [&str; 6] = ["size", "nr_blocks", "nr_inodes", "mode", "uid", "gid"];
    let mut flags = 0;
    let mut data = Vec::new();
    for o in String::from_utf8_lossy(options).split(',') {
        match o {
            "ro" => flags |= libc::MS_RDONLY,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "noatime" => flags |= libc::MS_NOATIME,
            _ => {
                if o.split_once('=').is_some_and(|(k, _)| DATA.contains(&k)) {
                    data.push(o.to_string());
                }
            }
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests;
