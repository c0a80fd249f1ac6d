//! In the jailed process: the private mount namespace whose root holds
//! only the VM's files, and the move into it.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::{check, cstr, step, Error, Jail};

impl Jail {
    /// A private mount namespace in which the jail root holds the VM's
    /// files (bind mounts; read-only unless writable) and is a mount
    /// point itself (pivot_root needs one).
    pub(super) fn mount_root(&self) -> Result<(), Error> {
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
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(&at);
                mount(
                    None,
                    &at,
                    None,
                    flags,
                    &format!("make {} read-only", f.host.display()),
                )?;
            }
        }
        if self.user_ns.is_some() {
            // The node files dir.rs left empty: the host's nodes over them
            // (a user namespace cannot make device nodes, but may open one
            // bound from a mount that allows devices).
            let mut nodes = vec![(self.kvm.as_path(), "dev/kvm")];
            if self.tun {
                nodes.push((std::path::Path::new("/dev/net/tun"), "dev/net/tun"));
            }
            if self.vhost {
                nodes.push((std::path::Path::new("/dev/vhost-net"), "dev/vhost-net"));
            }
            for (host, inside) in nodes {
                mount(
                    Some(&cstr(host)),
                    &cstr(&self.root.join(inside)),
                    None,
                    libc::MS_BIND,
                    &format!("bind {}", host.display()),
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

    /// Mounts the jail's /proc, makes the jail root `/`, detaches the
    /// host's tree.
    pub(super) fn pivot(&self) -> Result<(), Error> {
        // SAFETY: chdir, pivot_root, umount2 and chroot on valid,
        // NUL-terminated paths.
        unsafe {
            check(
                libc::chdir(cstr(&self.root).as_ptr()),
                "enter the jail root",
            )?;
            // /proc first: in a user namespace the kernel lets a new proc
            // be mounted only while a full one is visible in the mount
            // namespace, which it no longer is once the old root is gone.
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            mount(Some(c"proc"), c"proc", Some(c"proc"), flags, "mount /proc")?;
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
        let _ = fs::set_permissions("/", fs::Permissions::from_mode(0o700));
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

/// The flags a read-only remount of the bind mount at `at` must keep: in
/// a user namespace, those of a mount inherited from the host (nosuid,
/// nodev, noexec, atime) are locked, and a remount that drops one fails.
fn kept_flags(at: &std::ffi::CStr) -> libc::c_ulong {
    // SAFETY: statvfs fills a plain struct for a valid path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(at.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ]
    .iter()
    .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
    .fold(0, |acc, (_, ms)| acc | ms)
}
