//! In the jailed process, last: its limits and identity.

use super::{check, parse_rlimit, Error, Jail};

impl Jail {
    /// rlimits, no descriptors but 0-2, the uid/gid, no_new_privs.
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
