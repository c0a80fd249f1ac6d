//! Landlock: once a VM is set up, capsule's threads can reach only the
//! files it was configured with — kernel and initrd (read), disk images
//! (read, or read-write for writable disks), the API socket's directory
//! (to remove the socket at the end), the runtime directory, log files,
//! `capsule exec`'s writable shares and what `--landlock-allow` adds.
//! Everything else (`/etc/shadow`, the user's home, other VMs' images)
//! fails with `EACCES`, whatever a compromised capsule tries.
//!
//! The places that learn of such a path at setup register it with
//! [`allow`]; [`restrict`] applies the ruleset to the main thread just
//! before the vCPU threads start, so they inherit it. Threads started
//! earlier (API, exec stdin, wait.sock) are not covered by Landlock;
//! their seccomp filters allow no call that opens a file.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use crate::config::{DiskMode, VmConfig};

/// How much of a path capsule may use after setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Read the file, or the files beneath the directory.
    Read,
    /// Read, write, create, rename and remove beneath it.
    ReadWrite,
    /// Only remove entries of the directory (the API socket's).
    RemoveEntries,
}

/// Errors applying the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused the ruleset.
    #[error("cannot restrict file access with Landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    /// A `--landlock-allow` value is malformed.
    #[error("--landlock-allow {0}: expected PATH or PATH:rw")]
    BadAllow(String),
}

/// The newest ABI capsule knows; older kernels get what they support.
const ABI_USED: ABI = ABI::V5;

static ENABLED: OnceLock<bool> = OnceLock::new();
static RULES: Mutex<Vec<(PathBuf, Reach)>> = Mutex::new(Vec::new());

/// Turns Landlock on (or off, `--no-landlock`) for this process, with the
/// operator's extra paths. Without it [`restrict`] does nothing (library
/// use, in-process tests).
pub fn configure(enabled: bool, extra: &[String]) -> Result<(), Error> {
    for e in extra {
        let (path, reach) = parse_allow(e)?;
        allow(&path, reach);
    }
    if !enabled {
        log::warn!("Landlock is off (--no-landlock): capsule may open any file its user can");
    }
    let _ = ENABLED.set(enabled);
    Ok(())
}

/// Leaves Landlock off for this process without a warning: a VM with an
/// API names files after it started (snapshot directories, log and
/// metrics paths), which a policy fixed at start would refuse. Call
/// before [`configure`], which then keeps it off.
pub fn off_for_api() {
    log::info!("Landlock: off for a VM with an API (it names files after start); seccomp stays on");
    let _ = ENABLED.set(false);
}

/// A `--landlock-allow` value: `PATH`, `PATH:ro` or `PATH:rw`.
fn parse_allow(e: &str) -> Result<(PathBuf, Reach), Error> {
    let (path, reach) = match e.rsplit_once(':') {
        Some((p, "rw")) => (p, Reach::ReadWrite),
        Some((p, "ro")) => (p, Reach::Read),
        _ => (e, Reach::Read),
    };
    if path.is_empty() {
        return Err(Error::BadAllow(e.to_string()));
    }
    Ok((PathBuf::from(path), reach))
}

/// Lets capsule reach `path` after setup.
pub fn allow(path: &Path, reach: Reach) {
    RULES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path.to_path_buf(), reach));
}

/// The rights `reach` gives on `path` (a file takes only file rights).
fn rights(reach: Reach, is_dir: bool) -> landlock::BitFlags<AccessFs> {
    let all = match reach {
        Reach::Read => AccessFs::from_read(ABI_USED),
        Reach::ReadWrite => AccessFs::from_all(ABI_USED),
        Reach::RemoveEntries => AccessFs::RemoveFile | AccessFs::RemoveDir,
    };
    if is_dir {
        all
    } else {
        all & AccessFs::from_file(ABI_USED)
    }
}

/// Every path the VM's configuration names, with the registered ones.
fn rules(config: &VmConfig) -> Vec<(PathBuf, Reach)> {
    let mut v = vec![
        (config.kernel.clone(), Reach::Read),
        // The process's own /proc entries (/proc/self resolves to
        // /proc/PID): the boot-time marker sums the threads' CPU time
        // from /proc/self/task/*/schedstat.
        (PathBuf::from("/proc/self"), Reach::Read),
    ];
    // The kernel's configuration, read after a failed boot to say why
    // (`capsule doctor`'s checks: a `config` beside the kernel, /boot).
    if let Some(dir) = config.kernel.parent() {
        v.push((dir.join("config"), Reach::Read));
        v.push((dir.join(".config"), Reach::Read));
    }
    v.push((PathBuf::from("/boot"), Reach::Read));
    v.extend(config.initrd.iter().map(|p| (p.clone(), Reach::Read)));
    for d in &config.disks {
        let reach = match d.mode {
            DiskMode::ReadWrite => Reach::ReadWrite,
            _ => Reach::Read,
        };
        v.push((d.path.clone(), reach));
    }
    v.extend(
        RULES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned(),
    );
    v
}

/// Restricts the calling thread (and the threads it starts later) to the
/// paths of `config` and those registered with [`allow`].
pub fn restrict(config: &VmConfig) -> Result<(), Error> {
    match ENABLED.get() {
        None => return Ok(()),
        Some(false) => {
            test_open_shadow();
            return Ok(());
        }
        Some(true) => {}
    }
    let (status, count) = apply(rules(config))?;
    match status {
        RulesetStatus::NotEnforced => log::info!(
            "Landlock: not supported by this kernel; capsule's file access is not restricted"
        ),
        RulesetStatus::PartiallyEnforced => log::info!(
            "Landlock: partly enforced (an older kernel ABI): capsule can reach only {count} paths, some rights unrestricted"
        ),
        RulesetStatus::FullyEnforced => {
            log::debug!("Landlock: capsule can reach only {count} paths")
        }
    }
    test_open_shadow();
    Ok(())
}

/// Restricts a helper thread started before the VM (API, exec stdin,
/// wait.sock) to the paths registered so far: the runtime directory and
/// the API socket's, where its log lines may rotate `vmm.log`.
pub fn restrict_helper() -> Result<(), Error> {
    if ENABLED.get() != Some(&true) {
        return Ok(());
    }
    let rules = RULES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    apply(rules)?;
    Ok(())
}

/// Applies a ruleset of `rules` to the calling thread.
fn apply(rules: Vec<(PathBuf, Reach)>) -> Result<(RulesetStatus, usize), Error> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_USED))?
        .create()?;
    let mut count = 0;
    for (path, reach) in rules {
        // A path that is gone (a socket directory removed meanwhile) just
        // gets no rule: nothing can be reached through it.
        let Ok(fd) = PathFd::new(&path) else {
            log::debug!("Landlock: {} is gone; no rule", path.display());
            continue;
        };
        let is_dir = path.is_dir();
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rights(reach, is_dir)))?;
        count += 1;
    }
    let status = ruleset.restrict_self()?;
    Ok((status.ruleset, count))
}

/// Test hook (debug builds only): `CAPSULE_TEST_LANDLOCK=shadow` opens
/// `/etc/shadow` once the ruleset is in place and logs the result.
fn test_open_shadow() {
    if !cfg!(debug_assertions)
        || std::env::var_os("CAPSULE_TEST_LANDLOCK").is_none_or(|v| v != "shadow")
    {
        return;
    }
    match std::fs::File::open("/etc/shadow") {
        Ok(_) => log::warn!("CAPSULE_TEST_LANDLOCK: opened /etc/shadow"),
        Err(e) => log::warn!("CAPSULE_TEST_LANDLOCK: cannot open /etc/shadow: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_values_parse() {
        assert_eq!(
            parse_allow("/srv/vm:rw").unwrap(),
            (PathBuf::from("/srv/vm"), Reach::ReadWrite)
        );
        assert_eq!(
            parse_allow("/srv/vm:ro").unwrap(),
            (PathBuf::from("/srv/vm"), Reach::Read)
        );
        assert_eq!(
            parse_allow("/a:b").unwrap(),
            (PathBuf::from("/a:b"), Reach::Read)
        );
        assert!(parse_allow(":rw").is_err());
    }

    /// A file gets only the rights a file can have (Landlock refuses
    /// directory rights on a file); removal is only removal.
    #[test]
    fn rights_fit_files_and_directories() {
        let file = rights(Reach::ReadWrite, false);
        assert!(file.contains(AccessFs::WriteFile) && file.contains(AccessFs::ReadFile));
        assert!(!file.contains(AccessFs::MakeReg) && !file.contains(AccessFs::ReadDir));
        assert!(rights(Reach::ReadWrite, true).contains(AccessFs::MakeReg));
        let read = rights(Reach::Read, true);
        assert!(!read.contains(AccessFs::WriteFile) && !read.contains(AccessFs::RemoveFile));
        let remove = rights(Reach::RemoveEntries, true);
        assert!(remove.contains(AccessFs::RemoveFile) && !remove.contains(AccessFs::ReadFile));
    }
}
