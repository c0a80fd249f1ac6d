//! Which signals `capsule exec` hands to the command, and the
//! [`HostMsg::Signal`] frame's checks.

#[cfg(doc)]
use crate::HostMsg;

/// The largest signal number [`HostMsg::Signal`] carries (Linux's
/// `SIGRTMAX`).
pub const MAX_SIGNAL: u8 = 64;

/// The signals `capsule exec` forwards to the command instead of acting
/// on them itself (Linux numbers, the same on x86_64 and aarch64):
/// SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM and
/// SIGWINCH. Not forwarded: SIGKILL and SIGSTOP (they cannot be caught),
/// the fault signals (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS,
/// SIGABRT: capsule's own), SIGCHLD and SIGPIPE (capsule's own children
/// and writes) and SIGTSTP, SIGTTIN, SIGTTOU, SIGCONT (job control of
/// capsule in a terminal). The containerd shim delivers exactly these
/// (and SIGKILL, which ends the microVM).
pub const FORWARDED_SIGNALS: [u8; 8] = [1, 2, 3, 10, 12, 14, 15, 28];

/// Of [`FORWARDED_SIGNALS`], those that ask the command to end (SIGHUP,
/// SIGINT, SIGQUIT, SIGTERM): a second one, or the command's not ending
/// within capsule's stop timeout, stops the microVM instead.
pub const STOPPING_SIGNALS: [u8; 4] = [1, 2, 3, 15];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kind, DecodeError, Frame, GuestMsg, HostMsg};

    #[test]
    fn signal_frames_carry_a_signal_number_and_nothing_else() {
        let f = |payload: &[u8]| Frame {
            kind: kind::SIGNAL,
            payload: payload.to_vec(),
        };
        assert_eq!(HostMsg::parse(f(&[15, 0, 0, 0])), Ok(HostMsg::Signal(15)));
        let mut out = Vec::new();
        HostMsg::Signal(10).encode(&mut out);
        assert_eq!(out, [kind::SIGNAL, 4, 0, 0, 0, 10, 0, 0, 0]);
        for bad_payload in [
            &[0u8, 0, 0, 0][..], // signal 0 only probes: not a delivery
            &[65, 0, 0, 0],
            &[10, 0, 0, 1],
            &[10, 0, 0],
            &[10, 0, 0, 0, 0],
            &[],
        ] {
            assert!(
                matches!(
                    HostMsg::parse(f(bad_payload)),
                    Err(DecodeError::BadPayload {
                        kind: kind::SIGNAL,
                        ..
                    })
                ),
                "{bad_payload:?}"
            );
        }
        // A host message, not a guest one.
        assert!(GuestMsg::parse(f(&[15, 0, 0, 0])).is_err());
    }

    #[test]
    fn stopping_signals_are_forwarded_ones() {
        for s in STOPPING_SIGNALS {
            assert!(FORWARDED_SIGNALS.contains(&s), "{s}");
        }
        assert!(FORWARDED_SIGNALS
            .iter()
            .all(|&s| (1..=MAX_SIGNAL).contains(&s)));
    }
}
