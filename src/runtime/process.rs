//! Telling a VM's capsule process from whatever else later got its pid.
//!
//! A pid alone is not an identity: after a capsule is SIGKILLed its pid
//! can be reused by any process, and `kill(pid, 0)` would happily say it
//! is alive. So the pid file records the process's start time (field 22
//! of `/proc/PID/stat`, clock ticks since boot) and the boot id
//! (`/proc/sys/kernel/random/boot_id`, since start times restart at every
//! boot and a `/tmp` runtime directory can outlive one). A process is the
//! VM's capsule only if all three match. Signals go through a pidfd opened
//! *before* that check, so the pid cannot be reused between the check and
//! the signal.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Who a VM's capsule process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its pid.
    pub pid: i32,
    /// Its start time in clock ticks since boot.
    pub start: u64,
    /// The boot it started in.
    pub boot: String,
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
}

/// Start time of a live (not zombie) process, from `/proc/PID/stat`.
fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?; // field 3
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok() // field 22
}

impl Identity {
    /// This process.
    pub fn current() -> Option<Self> {
        let pid = std::process::id() as i32;
        Some(Self {
            pid,
            start: start_time(pid)?,
            boot: boot_id()?,
        })
    }

    /// The pid file's text.
    pub fn to_pid_file(&self) -> String {
        format!("{} {} {}\n", self.pid, self.start, self.boot)
    }

    /// Parses a pid file; `None` if it is not of this form (e.g. a bare pid
    /// written by an older capsule, which cannot be verified).
    pub fn parse(text: &str) -> Option<Self> {
        let mut f = text.split_whitespace();
        let id = Self {
            pid: f.next()?.parse().ok().filter(|p| *p > 0)?,
            start: f.next()?.parse().ok()?,
            boot: f.next()?.to_string(),
        };
        f.next().is_none().then_some(id)
    }

    /// Whether the process is still running (same pid, start time and
    /// boot, not a zombie).
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start) && boot_id().as_deref() == Some(&self.boot)
    }

    /// Sends `sig` to the process if it is still this one; `Ok(false)` if
    /// it is gone (or its pid now belongs to another process).
    pub fn signal(&self, sig: i32) -> std::io::Result<bool> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; nothing else is touched.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(false),
                // Kernels before 5.3: check, then kill (a tiny window
                // remains in which the pid could be reused).
                Some(libc::ENOSYS) => {
                    if !self.is_alive() {
                        return Ok(false);
                    }
                    // SAFETY: sends a signal to a pid just verified.
                    if unsafe { libc::kill(self.pid, sig) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(true)
                }
                _ => Err(e),
            };
        }
        let raw = RawFd::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
        // SAFETY: pidfd_open returned a new descriptor that we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The pidfd pins the process it was opened for: if that is ours
        // now, the signal below reaches ours, never a successor.
        if !self.is_alive() {
            return Ok(false);
        }
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_round_trips_and_is_alive() {
        let me = Identity::current().unwrap();
        assert!(me.is_alive());
        assert_eq!(Identity::parse(&me.to_pid_file()), Some(me.clone()));
        let other_start = Identity {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!other_start.is_alive());
        let other_boot = Identity {
            boot: "not-this-boot".into(),
            ..me.clone()
        };
        assert!(!other_boot.is_alive());
        // Signal 0 only checks.
        assert!(me.signal(0).unwrap());
        assert!(!other_start.signal(0).unwrap());
    }

    #[test]
    fn bare_or_malformed_pid_files_are_not_identities() {
        for bad in [
            "", "123", "123\n", "x 1 b", "1 x b", "0 1 b", "1 2 b c", "-5 1 b",
        ] {
            assert_eq!(Identity::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn dead_process_is_not_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let id = Identity {
            pid,
            start: start_time(pid).expect("a running child has a start time"),
            boot: boot_id().unwrap(),
        };
        assert!(id.is_alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!id.is_alive());
        assert!(!id.signal(libc::SIGKILL).unwrap());
    }
}
