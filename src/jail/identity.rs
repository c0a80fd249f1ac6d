//! Identity: the user namespace an unprivileged jail starts with, and,
//! last in the jailed process, its limits, uid and capabilities.

use super::{check, parse_rlimit, step, Error, Jail};

/// Moves this process (the keeper-to-be, before it forks the jailed
/// one) into a new user namespace in which it keeps its own uid and gid
/// (an identity map of one id each). The namespace's creator holds every
/// capability over it, which is what the mounts and pivot_root of an
/// unprivileged jail need; the jailed process drops them all at the end.
pub(super) fn enter_user_namespace(uid: u32, gid: u32) -> Result<(), Error> {
    // SAFETY: unshare has no memory-safety preconditions; capsule has no
    // thread yet, which CLONE_NEWUSER requires.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
    check(
        ret,
        "create a user namespace (are unprivileged user namespaces allowed? \
         sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces)",
    )?;
    // setgroups must be denied before an unprivileged gid_map is written.
    for (file, line) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{uid} {uid} 1")),
        ("/proc/self/gid_map", format!("{gid} {gid} 1")),
    ] {
        std::fs::write(file, line).map_err(step(format!("write {file}")))?;
    }
    Ok(())
}

/// Empties the bounding, ambient, effective, permitted and inheritable
/// capability sets: after this the jailed capsule holds no capability,
/// in its user namespace or anywhere.
fn drop_all_capabilities() -> Result<(), Error> {
    /// `struct __user_cap_header_struct`.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    /// `struct __user_cap_data_struct`.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    for cap in 0..64 {
        // SAFETY: prctl with plain values. Capabilities the kernel does
        // not know fail with EINVAL, which is fine.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: prctl with plain values.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(ret, "clear the ambient capabilities")?;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads a version 3 header and two data structs, both
    // valid for the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check(
        libc::c_int::try_from(ret).unwrap_or(-1),
        "drop the capabilities",
    )
}

impl Jail {
    /// rlimits, no descriptors but 0-2, the uid/gid (or, in a user
    /// namespace, no capability left), no_new_privs.
    pub(super) fn drop_privileges(&self) -> Result<(), Error> {
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
            // In a user namespace the uid and gid are the caller's already
            // (plan() refuses others), and setgroups is denied.
            if let (Some(gid), None) = (self.args.gid, self.user_ns) {
                check(
                    libc::setgroups(0, std::ptr::null()),
                    "drop supplementary groups",
                )?;
                check(libc::setgid(gid), "set the gid")?;
            }
            if let (Some(uid), None) = (self.args.uid, self.user_ns) {
                check(libc::setuid(uid), "set the uid")?;
            }
            if self.user_ns.is_some() {
                drop_all_capabilities()?;
            }
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "set no_new_privs",
            )?;
        }
        Ok(())
    }
}
