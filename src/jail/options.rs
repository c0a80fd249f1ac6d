//! What `--jail` takes: the options, and the checks of its cgroup limits
//! and rlimits made before anything is set up.

use std::path::PathBuf;

use super::Error;

/// The jail options of `run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JailArgs {
    /// Run the VM jailed: new mount and PID namespaces, a pivot_root into
    /// CHROOT_BASE/capsule/ID/root holding only the VM's files and device
    /// nodes, rlimits, no_new_privs, then --uid/--gid. Without root, in a
    /// user namespace of its own, ending with no capability (--uid,
    /// --gid, --cgroup and --netns then need root). --api-sock is then a
    /// path inside the jail.
    #[arg(long, conflicts_with_all = ["name", "config_file", "detach"])]
    pub jail: bool,
    /// The user the jailed capsule runs as (it must be able to read the
    /// kernel and initrd and read or write the disks).
    #[arg(long, value_name = "UID", requires = "jail")]
    pub uid: Option<u32>,
    /// The group the jailed capsule runs as.
    #[arg(long, value_name = "GID", requires = "jail")]
    pub gid: Option<u32>,
    /// Where per-VM jail directories are made [default: /srv/capsule as
    /// root; otherwise $XDG_RUNTIME_DIR, or /tmp/capsule-jail-UID, which
    /// must be yours and closed to others].
    #[arg(long, value_name = "DIR", requires = "jail")]
    pub chroot_base: Option<PathBuf>,
    /// cgroup v2 limits, e.g. `cpu.max=50000,memory.max=512M,pids.max=64`
    /// (repeatable): the jailed capsule runs in /sys/fs/cgroup/capsule/ID.
    #[arg(
        long,
        value_name = "FILE=VALUE,...",
        requires = "jail",
        value_delimiter = ','
    )]
    pub cgroup: Vec<String>,
    /// Join this network namespace (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH", requires = "jail")]
    pub netns: Option<PathBuf>,
    /// Resource limits, e.g. `nofile=1024,fsize=1G` (repeatable).
    #[arg(
        long,
        value_name = "nofile=N,fsize=N",
        requires = "jail",
        value_delimiter = ','
    )]
    pub rlimit: Vec<String>,
}

/// Bytes in a cgroup size such as `512M` (`max`: no limit).
pub fn parse_cgroup_size(v: &str) -> Option<u64> {
    if v == "max" {
        return Some(u64::MAX);
    }
    let (num, mult) = match v.as_bytes().last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&v[..v.len() - 1], 1 << 20),
        b'G' | b'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Checks `--cgroup` and `--rlimit` values; a `memory.max` below guest
/// RAM (`mem_size`) is refused: the guest would be killed once it used
/// its memory.
pub(super) fn check_limits(args: &JailArgs, mem_size: u64) -> Result<(), Error> {
    for kv in &args.cgroup {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(Error::Usage(format!("--cgroup {kv}: expected FILE=VALUE")));
        };
        if k.contains('/') || k.starts_with('.') || k.starts_with("cgroup.") || k.is_empty() {
            return Err(Error::Usage(format!(
                "--cgroup {kv}: not a cgroup file name"
            )));
        }
        if k == "memory.max" {
            let limit = parse_cgroup_size(v)
                .ok_or_else(|| Error::Usage(format!("--cgroup {kv}: not a size")))?;
            if limit < mem_size {
                return Err(Error::Usage(format!(
                    "--cgroup memory.max={v} is below the guest's memory ({}): the VM would be killed once the guest uses it",
                    crate::config::format_size(mem_size)
                )));
            }
        }
    }
    for r in &args.rlimit {
        parse_rlimit(r)?;
    }
    Ok(())
}

/// What an unprivileged jail (run by uid `uid`, gid `gid`) cannot do.
pub(super) fn check_unprivileged(args: &JailArgs, uid: u32, gid: u32) -> Result<(), Error> {
    let refuse = |what: &str, why: &str| {
        Err(Error::Usage(format!(
            "{what} needs root: {why} (an unprivileged jail runs as uid {uid}, gid {gid})"
        )))
    };
    if args.uid.is_some_and(|u| u != uid) || args.gid.is_some_and(|g| g != gid) {
        return refuse("--uid/--gid", "only root may run the VM as another user");
    }
    if !args.cgroup.is_empty() {
        return refuse("--cgroup", "the jail cannot create cgroups");
    }
    if args.netns.is_some() {
        return refuse(
            "--netns",
            "joining a network namespace takes CAP_SYS_ADMIN over it",
        );
    }
    Ok(())
}

/// The default CHROOT_BASE: /srv/capsule for root; for user `uid`,
/// $XDG_RUNTIME_DIR, else /tmp/capsule-jail-UID (made if missing). The
/// base must be the user's own directory, closed to group and others: in
/// a shared /tmp, someone else could otherwise have made it first.
pub(super) fn default_base(uid: u32) -> Result<PathBuf, Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if uid == 0 {
        return Ok(PathBuf::from("/srv/capsule"));
    }
    let base = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => {
            let dir = PathBuf::from(format!("/tmp/capsule-jail-{uid}"));
            let made = std::fs::DirBuilder::new().mode(0o700).create(&dir);
            if let Err(e) = made {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(Error::Step {
                        what: format!("create {}", dir.display()),
                        source: e,
                    });
                }
            }
            dir
        }
    };
    let meta = std::fs::symlink_metadata(&base).map_err(|source| Error::Step {
        what: format!("stat {}", base.display()),
        source,
    })?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(Error::Usage(format!(
            "{} must be a directory of yours that no one else can open (mode 0700); \
             or give --chroot-base",
            base.display()
        )));
    }
    Ok(base)
}

/// `nofile=N` or `fsize=N` (sizes as for cgroups).
pub(super) fn parse_rlimit(r: &str) -> Result<(libc::__rlimit_resource_t, u64), Error> {
    let bad = || Error::Usage(format!("--rlimit {r}: expected nofile=N or fsize=SIZE"));
    let (k, v) = r.split_once('=').ok_or_else(bad)?;
    let res = match k {
        "nofile" => libc::RLIMIT_NOFILE,
        "fsize" => libc::RLIMIT_FSIZE,
        _ => return Err(bad()),
    };
    Ok((res, parse_cgroup_size(v).ok_or_else(bad)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_limits_parse() {
        assert_eq!(parse_cgroup_size("512M"), Some(512 << 20));
        assert_eq!(parse_cgroup_size("4096"), Some(4096));
        assert_eq!(parse_cgroup_size("max"), Some(u64::MAX));
        assert_eq!(parse_cgroup_size("lots"), None);
        assert_eq!(parse_rlimit("nofile=64").unwrap().1, 64);
        assert!(parse_rlimit("cpu=1").is_err());
        let limits = |kv: &str| JailArgs {
            cgroup: vec![kv.to_string()],
            ..Default::default()
        };
        assert!(check_limits(&limits("pids.max=64"), 1 << 30).is_ok());
        assert!(check_limits(&limits("memory.max=512M"), 1 << 30).is_err());
        assert!(check_limits(&limits("memory.max=max"), 1 << 30).is_ok());
        // The jail writes the limits itself; no one may move processes
        // or controllers through them.
        assert!(check_limits(&limits("cgroup.procs=1"), 0).is_err());
        assert!(check_limits(&limits("../x=1"), 0).is_err());
    }

    #[test]
    fn an_unprivileged_jail_refuses_what_needs_root() {
        let ok = JailArgs {
            uid: Some(1000),
            gid: Some(1000),
            rlimit: vec!["nofile=64".into()],
            ..Default::default()
        };
        assert!(check_unprivileged(&ok, 1000, 1000).is_ok());
        let other_uid = JailArgs {
            uid: Some(0),
            ..Default::default()
        };
        let cgroup = JailArgs {
            cgroup: vec!["pids.max=64".into()],
            ..Default::default()
        };
        let netns = JailArgs {
            netns: Some("/var/run/netns/x".into()),
            ..Default::default()
        };
        for (args, what) in [
            (other_uid, "--uid"),
            (cgroup, "--cgroup"),
            (netns, "--netns"),
        ] {
            let e = check_unprivileged(&args, 1000, 1000)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("--jail: {what}")), "{e}");
            assert!(e.contains("needs root"), "{e}");
        }
    }
}
