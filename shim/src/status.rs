//! Exit statuses and signals as containerd expects them from runc.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The status containerd reports for a process that ended with `status`,
/// as runc's shim does: its exit code, or 128+N when a signal N killed it.
///
/// The process the shim waits for is `capsule exec`, which exits with the
/// container process's own status (128+N if the guest process died of
/// signal N), and dies of SIGTERM, SIGINT or SIGHUP itself after stopping
/// the VM in order when the shim forwards one of those (see [`forwarded`]).
pub fn exit_code(status: ExitStatus) -> u32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code.try_into().unwrap_or(255),
        (None, Some(sig)) => 128 + u32::try_from(sig).unwrap_or(0),
        (None, None) => 255,
    }
}

/// Whether signal `sig` can reach the container: sent to `capsule exec`,
/// SIGTERM, SIGINT and SIGHUP stop the microVM in order and SIGKILL at
/// once, so the container ends as it would under runc with the default
/// disposition. Other signals cannot be delivered to the process inside
/// the guest yet.
pub fn forwarded(sig: u32) -> bool {
    matches!(
        i32::try_from(sig),
        Ok(libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGKILL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(script: &str) -> ExitStatus {
        Command::new("/bin/sh")
            .args(["-c", script])
            .status()
            .unwrap()
    }

    #[test]
    fn codes_and_signals_map_as_runc() {
        assert_eq!(exit_code(run("exit 0")), 0);
        assert_eq!(exit_code(run("exit 7")), 7);
        assert_eq!(exit_code(run("exit 255")), 255);
        assert_eq!(exit_code(run("kill -TERM $$")), 143);
        assert_eq!(exit_code(run("kill -KILL $$")), 137);
        // Not SIGINT or SIGHUP: a shell started in the background (or by
        // nohup) inherits them ignored and cannot reset them, and the
        // test then saw status 0 in a CI run.
        assert_eq!(exit_code(run("kill -USR1 $$")), 138);
    }

    #[test]
    fn only_stopping_signals_are_forwarded() {
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGKILL] {
            assert!(forwarded(s as u32), "{s}");
        }
        for s in [0, libc::SIGUSR1, libc::SIGSTOP, libc::SIGWINCH, 1000] {
            assert!(!forwarded(s as u32), "{s}");
        }
    }
}
