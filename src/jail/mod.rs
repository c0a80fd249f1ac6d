//! `capsule run --jail`: the VM's capsule runs as PID 1 of a new PID
//! namespace, in a new mount namespace whose root (`pivot_root`) is a
//! per-VM directory holding exactly its kernel, initrd and disks (bind
//! mounts, read-only ones read-only) and the `/dev/kvm` and
//! `/dev/net/tun` nodes; optionally in a network namespace and a cgroup
//! v2 group with limits; with rlimits, no inherited descriptors but
//! stdin/stdout/stderr, `no_new_privs`, and the uid/gid dropped.
//!
//! As root it can run the VM as any uid/gid, in a cgroup and in a
//! network namespace. Run by another user it is unprivileged: the jail
//! starts with a user namespace of its own in which the caller keeps its
//! uid and gid, device nodes are bind-mounted instead of made, and the
//! jailed capsule ends with no capability at all; cgroups, other uids and
//! joining a network namespace then need root and are refused.
//!
//! The process that was started stays outside as the jail's keeper: it
//! forwards SIGTERM, SIGINT and SIGHUP, waits, and removes the jail
//! directory and cgroup when the VM ends, exiting with its status.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

mod dir;
mod identity;
mod mounts;
mod options;
use self::options::{check_limits, check_unprivileged, default_base, parse_rlimit};
pub use self::options::{parse_cgroup_size, JailArgs};

/// Errors setting up a jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the user asked cannot be done.
    #[error("--jail: {0}")]
    Usage(String),
    /// A step failed.
    #[error("--jail: cannot {what}: {source}")]
    Step {
        /// The step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Step { what, source }
}

/// Turns a libc return value into a result.
fn check(ret: libc::c_int, what: &str) -> Result<(), Error> {
    if ret < 0 {
        return Err(step(what)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// A file the VM uses: where it is on the host, its name in the jail,
/// and whether the VM writes it.
#[derive(Debug, Clone)]
pub struct JailFile {
    /// Host path.
    pub host: PathBuf,
    /// Path inside the jail (`/NAME`).
    pub inside: PathBuf,
    /// Mounted read-write.
    pub writable: bool,
}

/// A prepared jail.
#[derive(Debug)]
pub struct Jail {
    args: JailArgs,
    dir: PathBuf,
    root: PathBuf,
    files: Vec<JailFile>,
    cgroup: Option<PathBuf>,
    tun: bool,
    /// `/dev/vhost-net` too (a `vhost=on` network device).
    vhost: bool,
    kvm: PathBuf,
    /// Unprivileged: the caller's uid and gid, kept in a user namespace
    /// of its own.
    user_ns: Option<(u32, u32)>,
    /// What this jail created (and so may remove): the directory, the
    /// cgroup.
    made: std::cell::Cell<(bool, bool)>,
}

impl Jail {
    /// Checks the options and plans the jail for VM `id`, whose files are
    /// `files` (host path, writable); returns the jail and each file's
    /// path inside it, in order.
    pub fn plan(
        args: &JailArgs,
        id: &str,
        files: &[(PathBuf, bool)],
        mem_size: u64,
        kvm: &Path,
        tun: bool,
        vhost: bool,
    ) -> Result<(Self, Vec<PathBuf>), Error> {
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Usage(format!(
                "the VM's --id '{id}' must be 1 to 64 letters, digits, '-' or '_' (it names the jail)"
            )));
        }
        // SAFETY: geteuid and getegid have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let user_ns = (euid != 0).then_some((euid, egid));
        if user_ns.is_some() {
            check_unprivileged(args, euid, egid)?;
        }
        check_limits(args, mem_size)?;
        let base = match &args.chroot_base {
            Some(base) => base.clone(),
            None => default_base(euid)?,
        };
        let dir = base.join("capsule").join(id);
        let root = dir.join("root");
        let mut planned = Vec::new();
        let mut inside = Vec::new();
        for (host, writable) in files {
            let name = host
                .file_name()
                .ok_or_else(|| Error::Usage(format!("{} is not a file", host.display())))?;
            let p = Path::new("/").join(name);
            if inside.contains(&p) || p == Path::new("/dev") {
                return Err(Error::Usage(format!(
                    "two of the VM's files are named {}: give them different names",
                    name.to_string_lossy()
                )));
            }
            inside.push(p.clone());
            planned.push(JailFile {
                host: host.clone(),
                inside: p,
                writable: *writable,
            });
        }
        let cgroup =
            (!args.cgroup.is_empty()).then(|| Path::new("/sys/fs/cgroup/capsule").join(id));
        Ok((
            Self {
                args: args.clone(),
                dir,
                root,
                files: planned,
                cgroup,
                tun,
                vhost,
                kvm: kvm.to_path_buf(),
                user_ns,
                made: std::cell::Cell::new((false, false)),
            },
            inside,
        ))
    }

    /// Builds the jail and moves into it. Returns `None` in the jailed
    /// process (go on and run the VM), `Some(status)` in the keeper once
    /// the VM has ended.
    pub fn enter(self) -> Result<Option<u8>, Error> {
        let pid = match self.prepare() {
            Ok(pid) => pid,
            Err(e) => {
                self.clean_up();
                return Err(e);
            }
        };
        if pid > 0 {
            return Ok(Some(self.keep(pid)));
        }
        if let Err(e) = self.confine() {
            eprintln!("capsule: error: {e}");
            // SAFETY: leave the child at once; the keeper reports.
            unsafe { libc::_exit(1) };
        }
        Ok(None)
    }

    /// Builds the jail directory and cgroup, then forks the process that
    /// will be jailed (PID 1 of a new PID namespace); returns fork's value.
    fn prepare(&self) -> Result<libc::pid_t, Error> {
        self.build_dir()?;
        if let Some(cg) = &self.cgroup {
            self.make_cgroup(cg)?;
        }
        if let Some((uid, gid)) = self.user_ns {
            identity::enter_user_namespace(uid, gid)?;
        }
        // SAFETY: unshare has no memory-safety preconditions; the new PID
        // namespace applies to the child forked next.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWPID) };
        check(ret, "create a PID namespace")?;
        // SAFETY: capsule has started no thread yet (the jail is entered
        // before any), so the child may run any code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(step("fork")(std::io::Error::last_os_error()));
        }
        Ok(pid)
    }

    /// Removes the jail directory and cgroup (the jailed process is gone,
    /// and its mount namespace with the bind mounts).
    fn clean_up(&self) {
        let (dir, cgroup) = self.made.get();
        if dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
        if let (true, Some(cg)) = (cgroup, &self.cgroup) {
            let _ = fs::remove_dir(cg);
        }
    }

    /// The keeper: forwards termination signals to the jailed capsule,
    /// waits for it, cleans up and returns its status.
    fn keep(self, pid: libc::pid_t) -> u8 {
        CHILD.store(pid, Ordering::SeqCst);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: the handler only calls kill, which is async-signal-safe.
            unsafe {
                libc::signal(
                    sig,
                    forward as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
        }
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid
                || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
            {
                break;
            }
        }
        self.clean_up();
        if libc::WIFEXITED(status) {
            u8::try_from(libc::WEXITSTATUS(status)).unwrap_or(u8::MAX)
        } else {
            128u8.saturating_add(u8::try_from(libc::WTERMSIG(status)).unwrap_or(0))
        }
    }

    /// In the child: namespaces and mounts, pivot_root, then the
    /// process's own limits and identity.
    fn confine(&self) -> Result<(), Error> {
        if let Some(ns) = &self.args.netns {
            let f = fs::File::open(ns).map_err(step(format!("open {}", ns.display())))?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns with a namespace descriptor we hold.
            let ret = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            check(ret, "join the network namespace")?;
        }
        self.mount_root()?;
        if let Some(cg) = &self.cgroup {
            fs::write(cg.join("cgroup.procs"), "0")
                .map_err(step(format!("join {}", cg.display())))?;
        }
        self.pivot()?;
        self.drop_privileges()?;
        std::env::set_var("TMPDIR", "/tmp");
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        log::info!(
            "jailed in {} (uid {uid}, gid {gid}{})",
            self.root.display(),
            if self.user_ns.is_some() {
                ", unprivileged: own user namespace, no capabilities"
            } else {
                ""
            }
        );
        Ok(())
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}
