//! `capsule run --jail`: the VM's capsule runs as PID 1 of a new PID
//! namespace, in a new mount namespace whose root (`pivot_root`) is a
//! per-VM directory holding exactly its kernel, initrd and disks (bind
//! mounts, read-only ones read-only) and the `/dev/kvm` and
//! `/dev/net/tun` nodes; optionally in a network namespace and a cgroup
//! v2 group with limits; with rlimits, no inherited descriptors but
//! stdin/stdout/stderr, `no_new_privs`, and the uid/gid dropped. Needs
//! root (the unprivileged, user-namespace mode is not built yet).
//!
//! The process that was started stays outside as the jail's keeper: it
//! forwards SIGTERM, SIGINT and SIGHUP, waits, and removes the jail
//! directory and cgroup when the VM ends, exiting with its status.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

mod options;
use self::options::{check_limits, parse_rlimit};
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
    kvm: PathBuf,
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
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::Usage(
                "needs root (an unprivileged jail is not built yet)".into(),
            ));
        }
        check_limits(args, mem_size)?;
        let dir = args.chroot_base.join("capsule").join(id);
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
                kvm: kvm.to_path_buf(),
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

    /// The jail directory: `root/` (owned by the jailed user, 0700) with
    /// an empty file per VM file to mount over, and `dev/`.
    fn build_dir(&self) -> Result<(), Error> {
        if self.dir.exists() {
            return Err(Error::Usage(format!(
                "{} exists: another VM with this --id is jailed (or one was killed: remove it)",
                self.dir.display()
            )));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.root.join("dev/net"))
            .map_err(step(format!("create {}", self.root.display())))?;
        self.made.set((true, false));
        // `,ephemeral` overlays go to $TMPDIR, which is /tmp in the jail.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(self.root.join("tmp"))
            .map_err(step("create the jail's /tmp"))?;
        // This PID namespace's own /proc (capsule binds sockets through
        // /proc/self/fd): it shows only the jail's processes.
        fs::DirBuilder::new()
            .mode(0o555)
            .create(self.root.join("proc"))
            .map_err(step("create the jail's /proc"))?;
        for f in &self.files {
            let at = self
                .root
                .join(f.inside.strip_prefix("/").unwrap_or(&f.inside));
            fs::File::create(&at).map_err(step(format!("create {}", at.display())))?;
        }
        self.node(&self.kvm, "dev/kvm")?;
        if self.tun {
            self.node(Path::new("/dev/net/tun"), "dev/net/tun")?;
        }
        let (uid, gid) = (self.args.uid.unwrap_or(0), self.args.gid.unwrap_or(0));
        for d in [
            &self.root,
            &self.root.join("dev"),
            &self.root.join("dev/net"),
            &self.root.join("tmp"),
        ] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(step(format!("give {} to the jailed user", d.display())))?;
        }
        Ok(())
    }

    /// A device node in the jail like `host`'s, owned by the jailed user.
    fn node(&self, host: &Path, inside: &str) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(host).map_err(step(format!("stat {}", host.display())))?;
        let at = self.root.join(inside);
        // SAFETY: mknod with a valid path; mode and device copied from a
        // real character device.
        let ret = unsafe { libc::mknod(cstr(&at).as_ptr(), libc::S_IFCHR | 0o600, m.rdev()) };
        check(ret, &format!("create {}", at.display()))?;
        std::os::unix::fs::chown(&at, self.args.uid, self.args.gid)
            .map_err(step(format!("give {} to the jailed user", at.display())))
    }

    /// /sys/fs/cgroup/capsule/ID with the limits.
    fn make_cgroup(&self, cg: &Path) -> Result<(), Error> {
        let base = Path::new("/sys/fs/cgroup");
        // SAFETY: statfs fills a plain struct for a valid path.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let ok = unsafe { libc::statfs(cstr(base).as_ptr(), &mut st) } == 0;
        if !ok || st.f_type != libc::CGROUP2_SUPER_MAGIC {
            return Err(Error::Usage(
                "--cgroup needs cgroup v2 mounted at /sys/fs/cgroup".into(),
            ));
        }
        let parent = base.join("capsule");
        let _ = fs::create_dir(&parent);
        // Let the groups below use the controllers the limits name.
        let controllers: std::collections::BTreeSet<&str> = self
            .args
            .cgroup
            .iter()
            .filter_map(|kv| kv.split('.').next())
            .collect();
        for dir in [base, parent.as_path()] {
            for c in &controllers {
                let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
            }
        }
        fs::create_dir(cg).map_err(step(format!("create {}", cg.display())))?;
        self.made.set((true, true));
        for kv in &self.args.cgroup {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            fs::write(cg.join(k), v).map_err(step(format!("set {k}={v} in {}", cg.display())))?;
        }
        Ok(())
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
        log::info!(
            "jailed in {} (uid {}, gid {})",
            self.root.display(),
            self.args.uid.unwrap_or(0),
            self.args.gid.unwrap_or(0)
        );
        Ok(())
    }

    /// A private mount namespace in which the jail root holds the VM's
    /// files (bind mounts; read-only unless writable) and is a mount
    /// point itself (pivot_root needs one).
    fn mount_root(&self) -> Result<(), Error> {
        // SAFETY: unshare has no memory-safety preconditions.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        check(ret, "create a mount namespace")?;
        mount(
            None,
            c"/",
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            "make mounts private",
        )?;
        for f in &self.files {
            let at = cstr(
                &self
                    .root
                    .join(f.inside.strip_prefix("/").unwrap_or(&f.inside)),
            );
            let src = cstr(&f.host);
            mount(
                Some(&src),
                &at,
                None,
                libc::MS_BIND,
                &format!("bind {}", f.host.display()),
            )?;
            if !f.writable {
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                mount(
                    None,
                    &at,
                    None,
                    flags,
                    &format!("make {} read-only", f.host.display()),
                )?;
            }
        }
        let root = cstr(&self.root);
        mount(
            Some(&root),
            &root,
            None,
            libc::MS_BIND | libc::MS_REC,
            "bind the jail root",
        )
    }

    /// Makes the jail root `/`, detaches the host's tree, mounts /proc.
    fn pivot(&self) -> Result<(), Error> {
        // SAFETY: chdir, pivot_root, umount2 and chroot on valid,
        // NUL-terminated paths.
        unsafe {
            check(
                libc::chdir(cstr(&self.root).as_ptr()),
                "enter the jail root",
            )?;
            let pivoted = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0;
            if pivoted {
                check(
                    libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                    "detach the old root",
                )?;
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                // The root is the initial ramfs (an initramfs-only system),
                // which cannot be pivoted away: move the jail over it and
                // chroot, as switch_root does. The old tree is shadowed;
                // leaving a chroot needs CAP_SYS_CHROOT, which goes with
                // the uid.
                mount(
                    Some(c"."),
                    c"/",
                    None,
                    libc::MS_MOVE,
                    "move the jail root over /",
                )?;
                check(libc::chroot(c".".as_ptr()), "chroot into the jail")?;
                log::debug!("jail: / is the initial ramfs: moved and chrooted, not pivoted");
            } else {
                return Err(step("pivot_root")(std::io::Error::last_os_error()));
            }
            check(libc::chdir(c"/".as_ptr()), "enter /")?;
        }
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(Some(c"proc"), c"/proc", Some(c"proc"), flags, "mount /proc")?;
        let _ = fs::set_permissions("/", fs::Permissions::from_mode(0o700));
        Ok(())
    }

    /// rlimits, no descriptors but 0-2, the uid/gid, no_new_privs.
    fn drop_privileges(&self) -> Result<(), Error> {
        for r in &self.args.rlimit {
            let (res, value) = parse_rlimit(r)?;
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: a valid rlimit struct.
            check(unsafe { libc::setrlimit(res, &lim) }, &format!("set {r}"))?;
        }
        // SAFETY: close_range on descriptors capsule owns nothing of yet
        // (no thread runs; std keeps no descriptors above 2).
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        // SAFETY: identity syscalls with plain values.
        unsafe {
            if let Some(gid) = self.args.gid {
                check(
                    libc::setgroups(0, std::ptr::null()),
                    "drop supplementary groups",
                )?;
                check(libc::setgid(gid), "set the gid")?;
            }
            if let Some(uid) = self.args.uid {
                check(libc::setuid(uid), "set the uid")?;
            }
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "set no_new_privs",
            )?;
        }
        Ok(())
    }
}

/// `mount(2)` with optional source and file system type.
fn mount(
    src: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    what: &str,
) -> Result<(), Error> {
    let ptr = |c: Option<&std::ffi::CStr>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: NUL-terminated strings or null, no data argument.
    let ret = unsafe {
        libc::mount(
            ptr(src),
            target.as_ptr(),
            ptr(fstype),
            flags,
            std::ptr::null(),
        )
    };
    check(ret, what)
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}
