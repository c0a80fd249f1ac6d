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
    pub(super) fn pivot(&self) -> Result<(), Error> {
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
