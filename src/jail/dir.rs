//! The jail on the host's side, built before anything is confined: the
//! per-VM directory with a placeholder for each file and device node, and
//! the cgroup with its limits.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::{check, cstr, step, Error, Jail};

impl Jail {
    /// The jail directory: `root/` (owned by the jailed user, 0700) with
    /// an empty file per VM file to mount over, and `dev/`.
    pub(super) fn build_dir(&self) -> Result<(), Error> {
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
        if self.vhost {
            self.node(Path::new("/dev/vhost-net"), "dev/vhost-net")?;
        }
        if self.user_ns.is_some() {
            // Everything is the caller's already.
            return Ok(());
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
    /// In a user namespace no node can be made: an empty file instead,
    /// which the jailed process bind-mounts the host's node over.
    fn node(&self, host: &Path, inside: &str) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        if self.user_ns.is_some() {
            let at = self.root.join(inside);
            return fs::File::create(&at)
                .map(drop)
                .map_err(step(format!("create {}", at.display())));
        }
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
    pub(super) fn make_cgroup(&self, cg: &Path) -> Result<(), Error> {
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
}
