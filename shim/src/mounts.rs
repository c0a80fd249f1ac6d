//! The OCI spec's `mounts` as `capsule exec` options: what a Kubernetes
//! pod's volumes, ConfigMaps, Secrets and CRI's `/etc/resolv.conf`,
//! `/etc/hosts` and `/etc/hostname` come as.
//!
//! - A bind mount (`type: bind`, or `bind`/`rbind` among its options)
//!   of a host directory is `--share SRC:DEST[:ro]`: a live virtio-fs
//!   share at DEST inside the container's root; of a regular file, the
//!   same option, which capsule shares as a single file (a hard link or
//!   copy in a directory of its own) that the guest init binds over DEST.
//!   `ro` among the options makes it read-only.
//! - A `tmpfs` is `--tmpfs DEST:OPTIONS` (the guest init honours `size=`,
//!   `mode=`, `nr_inodes=`, `uid=`, `gid=` and the `ro`, `nosuid`,
//!   `nodev`, `noexec` flags).
//! - The runtime's own mounts that every `config.json` lists (`/proc`,
//!   `/sys`, `/dev`, `/dev/pts`, `/dev/mqueue`, `/sys/fs/cgroup`, by
//!   destination or by type) are skipped: the guest init mounts proc,
//!   sysfs, devtmpfs and devpts in each root itself; no mqueue, no cgroup
//!   file system. A bind mount on `/dev/shm` (CRI's pod-wide shm
//!   directory, which a microVM cannot share with the pod's other
//!   containers anyway) becomes a tmpfs of the guest's own.
//! - Anything else (another file system type) is refused at create with
//!   the mount's destination, rather than left out silently.
//!
//! Destinations are normalised here (`..` never above `/`) and resolved
//! again by the guest init inside the container's root (symlinks read
//! from the root). A source that does not exist fails create, as under
//! runc.

use std::ffi::OsString;
use std::path::{Component, Path};

use oci_spec::runtime::{Mount, Spec};

use crate::spec::SpecError;

/// The most mounts a spec may have (the runtime's own, skipped, aside).
pub const MAX_MOUNTS: usize = 64;
/// The most directory bind mounts: each is a virtio-fs device, and a
/// microVM has 19 interrupt lines for devices, of which the vsock
/// device, the root, a network device and the two devices of the shared
/// files take five.
pub const MAX_DIR_SHARES: usize = 14;

/// Destinations the guest init provides itself.
const RUNTIME_DESTINATIONS: [&str; 6] = [
    "/proc",
    "/sys",
    "/dev",
    "/dev/pts",
    "/dev/mqueue",
    "/sys/fs/cgroup",
];
/// File system types the guest init provides itself, or that a microVM
/// has no use for.
const RUNTIME_TYPES: [&str; 6] = ["proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"];

/// What one of the spec's mounts becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Planned {
    /// Left to the guest init (or not provided): the runtime's own.
    Skipped,
    /// `--share SRC:DEST[:ro]`; `dir`: the source is a directory.
    Share { arg: String, dir: bool },
    /// `--tmpfs DEST[:OPTIONS]`.
    Tmpfs(String),
}

/// The `capsule exec` options for the spec's mounts, in the spec's order;
/// a relative source is taken from `bundle`, as runc does.
pub fn mount_args(spec: &Spec, bundle: &Path) -> Result<Vec<OsString>, SpecError> {
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    let mut out = Vec::new();
    let (mut count, mut dirs) = (0, 0);
    for m in mounts {
        let planned = plan(m, bundle)?;
        if planned != Planned::Skipped {
            count += 1;
        }
        match planned {
            Planned::Skipped => {
                log::debug!("mount on {} left to the guest", m.destination().display());
            }
            Planned::Share { arg, dir } => {
                dirs += usize::from(dir);
                out.extend(["--share".into(), arg.into()]);
            }
            Planned::Tmpfs(arg) => out.extend(["--tmpfs".into(), arg.into()]),
        }
    }
    if count > MAX_MOUNTS {
        return Err(SpecError::TooManyMounts {
            count,
            max: MAX_MOUNTS,
        });
    }
    if dirs > MAX_DIR_SHARES {
        return Err(SpecError::TooManyDirectories {
            count: dirs,
            max: MAX_DIR_SHARES,
        });
    }
    Ok(out)
}

/// What mount `m` becomes.
fn plan(m: &Mount, bundle: &Path) -> Result<Planned, SpecError> {
    let typ = m.typ().as_deref().unwrap_or("");
    let options = m.options().as_deref().unwrap_or_default();
    let has = |o: &str| options.iter().any(|x| x == o);
    let shown = m.destination().display().to_string();
    let dest = normalise(m.destination()).map_err(|why| SpecError::Destination {
        destination: shown.clone(),
        why,
    })?;
    if RUNTIME_TYPES.contains(&typ) || RUNTIME_DESTINATIONS.contains(&dest.as_str()) {
        return Ok(Planned::Skipped);
    }
    let bind = typ == "bind" || has("bind") || has("rbind");
    if bind && dest == "/dev/shm" {
        return Ok(Planned::Tmpfs(format!("{dest}:mode=1777,nosuid,nodev")));
    }
    if bind {
        let source = m.source().as_ref().ok_or_else(|| SpecError::MountSource {
            destination: shown.clone(),
            why: "no source".into(),
        })?;
        let source = bundle.join(source);
        let bad = |why: String| SpecError::MountSource {
            destination: shown.clone(),
            why: format!("{}: {why}", source.display()),
        };
        let meta = std::fs::metadata(&source).map_err(|e| bad(e.to_string()))?;
        if !meta.is_dir() && !meta.is_file() {
            return Err(bad("neither a directory nor a regular file".into()));
        }
        let text = source
            .to_str()
            .filter(|s| !s.contains(':'))
            .ok_or_else(|| bad("a path with ':' or not UTF-8 cannot be shared".into()))?;
        let mut arg = format!("{text}:{dest}");
        if has("ro") {
            arg.push_str(":ro");
        }
        return Ok(Planned::Share {
            arg,
            dir: meta.is_dir(),
        });
    }
    if typ == "tmpfs" {
        // Options are passed on whole, but a ':' would end capsule's
        // GUESTDIR:OPTIONS early: such an option (none that tmpfs knows)
        // is left out.
        let kept: Vec<&str> = options
            .iter()
            .map(String::as_str)
            .filter(|o| !o.contains(':'))
            .collect();
        return Ok(Planned::Tmpfs(if kept.is_empty() {
            dest
        } else {
            format!("{dest}:{}", kept.join(","))
        }));
    }
    Err(SpecError::UnsupportedMount {
        destination: shown,
        typ: typ.to_string(),
    })
}

/// `dest` as an absolute path in the container's root: `.` and empty
/// components dropped, `..` never above `/` (the guest init resolves it
/// again in the root, with its symlinks). A relative destination is taken
/// from `/`, as runc does. The root itself, a name that is not UTF-8 or
/// holds ':' (capsule's option separator) or NUL is refused.
pub fn normalise(dest: &Path) -> Result<String, String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in dest.components() {
        match c {
            Component::Normal(n) => {
                parts.push(n.to_str().ok_or("not UTF-8")?);
            }
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if parts.is_empty() {
        return Err("the container's root itself".into());
    }
    let out = format!("/{}", parts.join("/"));
    if out.contains(':') || out.contains('\0') {
        return Err("':' or NUL in a destination cannot be passed to capsule".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
