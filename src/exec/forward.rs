//! Signals for the command: capsule's handler records the signals of
//! [`exec_proto::FORWARDED_SIGNALS`] and wakes the session's subscriber
//! (the vsock link or the console's stdin pump), which sends each to the
//! guest as a [`HostMsg::Signal`] once the command has started; the init
//! delivers it to the command's process.
//!
//! A stopping signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT) is forwarded
//! once: the command's exit status is then capsule's, as for `docker run`
//! or a runc container whose first process got it. A second one stops the
//! VM (capsule dies of it), and so does the stop timeout
//! ([`super::ExecConfig::stop_timeout`]) if the command ignores the first.
//! Before the command started a stopping signal stops the VM at once;
//! the others wait for the command. SIGKILL kills capsule, and the VM
//! with it.

use std::time::Instant;

use exec_proto::HostMsg;
use vmm_sys_util::eventfd::EventFd;

use super::session::Session;
use super::Error;
use crate::signals;

/// Starts forwarding signals to `session`'s subscriber, which `wake`
/// (the session's hello eventfd, watched by that subscriber) wakes.
pub(super) fn start(session: &mut Session, wake: &EventFd) -> Result<signals::ForwardGuard, Error> {
    let evt = wake.try_clone().map_err(|e| Error::Host("eventfd", e))?;
    session.forwarding = true;
    Ok(signals::forward_to(evt))
}

impl Session {
    /// The command started: stopping signals are forwarded from now on;
    /// the subscriber is woken to send those that came before.
    pub(super) fn command_started(&mut self) {
        self.command_running = true;
        if self.forwarding {
            signals::set_command_running(true);
        }
        let _ = self.wake.write(1);
    }

    /// The command ended: no more signals for it.
    pub(super) fn command_ended(&mut self) {
        self.command_running = false;
        if self.forwarding {
            signals::set_command_running(false);
        }
        self.stop_deadline = None;
    }

    /// Appends a [`HostMsg::Signal`] frame to `out` for each signal
    /// received for the command, once it runs (until then they wait), and
    /// starts the stop timeout at the first stopping one.
    pub(super) fn forward_signals(&mut self, out: &mut Vec<u8>) {
        if !self.command_running || !self.forwarding {
            return;
        }
        if self.tty && !self.tty_sized {
            // The size may have changed between the spec and the start
            // of forwarding (a SIGWINCH then was not forwarded).
            self.tty_sized = true;
            self.send_signal(libc::SIGWINCH, out);
        }
        for sig in signals::take_forwarded() {
            self.send_signal(sig, out);
        }
    }

    /// `sig`'s frame, and the stop timeout if `sig` is a stopping one.
    fn send_signal(&mut self, sig: libc::c_int, out: &mut Vec<u8>) {
        let Ok(n) = u8::try_from(sig) else { return };
        if sig == libc::SIGWINCH && self.tty {
            // The guest's terminal takes the new size and signals its
            // foreground processes itself.
            if let Some(size) = crate::terminal::window_size() {
                log::info!("terminal resized to {}x{}", size.cols, size.rows);
                HostMsg::Resize(size).encode(out);
            }
            return;
        }
        log::info!("{}: forwarded to the command", signals::name(sig));
        HostMsg::Signal(n).encode(out);
        if signals::is_stopping(sig) && self.stop_deadline.is_none() {
            if let Some(t) = self.stop_timeout {
                self.stop_deadline = Some((Instant::now() + t, sig));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use exec_proto::{Decoder, GuestMsg};

    use super::*;
    use crate::exec::session::{tests::session, Stop};

    fn frames(bytes: &[u8]) -> Vec<HostMsg> {
        let mut d = Decoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(HostMsg::parse(f).unwrap());
        }
        out
    }

    /// Without the process-wide state (the session's `forwarding` is off;
    /// `signals.rs` tests that part): a stopping signal sent starts the stop timeout,
    /// whose end stops the run loop; the command's exit clears it; the
    /// session's Started and Exit messages switch forwarding on and off.
    #[test]
    fn a_forwarded_stopping_signal_starts_the_stop_timeout() {
        let mut s = session(vec![]);
        s.stop_timeout = Some(Duration::ZERO);
        s.handle(GuestMsg::Started);
        assert!(s.command_running);
        assert_eq!(s.wake.read().unwrap(), 1, "the subscriber is woken");
        let mut out = Vec::new();
        s.send_signal(libc::SIGUSR1, &mut out);
        assert!(s.stop_deadline.is_none(), "SIGUSR1 asks nothing to end");
        assert!(s.check().is_none());
        s.send_signal(libc::SIGTERM, &mut out);
        assert_eq!(
            frames(&out),
            [
                HostMsg::Signal(libc::SIGUSR1 as u8),
                HostMsg::Signal(libc::SIGTERM as u8)
            ]
        );
        assert!(matches!(
            s.check(),
            Some(Stop::Unanswered(libc::SIGTERM, Duration::ZERO))
        ));
        // Answered in time: the command's status wins.
        s.handle(GuestMsg::Exit(3));
        assert!(!s.command_running);
        assert!(s.stop_deadline.is_none());
        assert!(matches!(s.check(), Some(Stop::Finished)));
        // No stop timeout: the session waits for the command.
        let mut s = session(vec![]);
        s.handle(GuestMsg::Started);
        s.send_signal(libc::SIGINT, &mut Vec::new());
        assert!(s.stop_deadline.is_none());
        // Before the command runs nothing is taken or sent.
        let mut s = session(vec![]);
        let mut out = Vec::new();
        s.forward_signals(&mut out);
        assert!(out.is_empty());
    }

    /// With a terminal, SIGWINCH is the terminal's new size, never the
    /// signal itself (the guest's terminal signals its processes); it is
    /// the size of capsule's stdin, so none when that is no terminal.
    #[test]
    fn sigwinch_with_a_tty_is_a_resize() {
        let mut s = session(vec![]);
        s.handle(GuestMsg::Started);
        let mut out = Vec::new();
        s.send_signal(libc::SIGWINCH, &mut out);
        assert_eq!(frames(&out), [HostMsg::Signal(libc::SIGWINCH as u8)]);
        s.tty = true;
        let mut out = Vec::new();
        s.send_signal(libc::SIGWINCH, &mut out);
        let expected: Vec<HostMsg> = crate::terminal::window_size()
            .map(HostMsg::Resize)
            .into_iter()
            .collect();
        assert_eq!(frames(&out), expected);
    }
}
