//! One process's stdio pump: its stdout and stderr pipes read into data
//! frames for the host, host stdin (buffered up to a high-water mark)
//! written into its stdin pipe, and the host's signals delivered to it.
//! The caller owns the poll: [`Pump::poll_fds`] says what to wait for,
//! and the ready ends are moved by [`Pump::forward_output`] and
//! [`Pump::feed_stdin`]. The first command's frames go to the session's
//! [`crate::Channel`], an exec'd process's to its own connection
//! ([`crate::agent`]); both are an [`Output`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use exec_proto::HostMsg;

use crate::{sys, OUTPUT_CHUNK, STDIN_HIGH_WATER};

/// Where a process's output frames go.
pub(crate) trait Output {
    /// Sends (or queues) a data frame of `kind`.
    fn send_data(&mut self, kind: u8, payload: &[u8]) -> io::Result<()>;
}

impl Output for crate::Channel {
    fn send_data(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        crate::Channel::send_data(self, kind, payload)
    }
}

/// A pipe end we read from or write to, until it is closed.
struct Stream {
    fd: Option<OwnedFd>,
}

impl Stream {
    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid descriptor and buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn write_fd(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: valid descriptor and buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A read or write that found nothing to do for now.
pub(crate) fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Delivers the host's signal `sig` to the process alone, not to its
/// process group (it leads one: it runs in a session of its own): as
/// `docker kill` and `runc kill` signal a container's process, which
/// decides what its children get (a shell that traps SIGTERM to stop its
/// workers in order is given that chance). A failure (the process has
/// just exited) is only logged.
fn signal_process(pid: libc::pid_t, sig: u8) {
    if let Err(e) = sys::kill(pid, libc::c_int::from(sig), false) {
        eprintln!("capsule-init: cannot deliver signal {sig} to process {pid}: {e}");
    }
}

/// The pipes of one running process.
pub(crate) struct Pump {
    /// The process, for the host's signals.
    pid: libc::pid_t,
    stdin: Stream,
    stdout: Stream,
    stderr: Stream,
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    buf: Vec<u8>,
    /// stdin and stdout are a pseudo-terminal's master: the host's
    /// `Resize` sets its size.
    tty: bool,
}

impl Pump {
    /// The pump of process `pid` whose stdin is written through `stdin`
    /// and whose output is read from `stdout` and `stderr` (all three
    /// non-blocking).
    pub(crate) fn new(
        pid: libc::pid_t,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: Option<OwnedFd>,
    ) -> Self {
        Self {
            pid,
            stdin: Stream { fd: Some(stdin) },
            stdout: Stream { fd: Some(stdout) },
            stderr: Stream { fd: stderr },
            stdin_buf: Vec::new(),
            stdin_eof: false,
            buf: vec![0u8; OUTPUT_CHUNK],
            tty: false,
        }
    }

    /// The process's stdin and stdout are a pseudo-terminal's master.
    pub(crate) fn on_tty(mut self) -> Self {
        self.tty = true;
        self
    }

    /// Sets the terminal's size (the kernel tells the process with
    /// SIGWINCH); nothing without a terminal.
    fn resize(&self, size: exec_proto::WinSize) {
        let fd = [&self.stdout, &self.stdin]
            .iter()
            .map(|s| s.raw())
            .find(|&fd| fd >= 0);
        if let (true, Some(fd)) = (self.tty, fd) {
            if let Err(e) = sys::set_winsize(fd, size) {
                eprintln!("capsule-init: cannot resize the terminal: {e}");
            }
        }
    }

    /// The process's pid.
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Host frames: stdin (dropped once the process closed its stdin) and
    /// signals (dropped once the process has `exited`: its pid may be
    /// reused by then).
    pub(crate) fn take_host(&mut self, msgs: Vec<HostMsg>, exited: bool) {
        for m in msgs {
            match m {
                HostMsg::Stdin(d) if self.stdin.fd.is_some() => {
                    self.stdin_buf.extend_from_slice(&d);
                }
                HostMsg::StdinEof => self.stdin_eof = true,
                HostMsg::Signal(sig) if !exited => signal_process(self.pid, sig),
                HostMsg::Resize(size) => self.resize(size),
                _ => {}
            }
        }
        if self.stdin.fd.is_none() {
            self.stdin_buf.clear();
        }
    }

    /// Whether more host stdin may be read for now.
    pub(crate) fn wants_stdin(&self) -> bool {
        self.stdin_buf.len() < STDIN_HIGH_WATER
    }

    /// Both output pipes are closed.
    pub(crate) fn drained(&self) -> bool {
        self.stdout.fd.is_none() && self.stderr.fd.is_none()
    }

    /// What to poll: `[stdout, stderr, stdin]` (`-1` where there is
    /// nothing to wait for; the output pipes only with `read_output`,
    /// while the output's receiver has room). Closes stdin once the host
    /// ended it and everything buffered was written.
    pub(crate) fn poll_fds(&mut self, read_output: bool) -> [libc::pollfd; 3] {
        if self.stdin_eof && self.stdin_buf.is_empty() {
            self.stdin.fd = None;
        }
        let pollfd = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let out = |s: &Stream| if read_output { s.raw() } else { -1 };
        [
            pollfd(out(&self.stdout), libc::POLLIN),
            pollfd(out(&self.stderr), libc::POLLIN),
            pollfd(
                if self.stdin_buf.is_empty() {
                    -1
                } else {
                    self.stdin.raw()
                },
                libc::POLLOUT,
            ),
        ]
    }

    /// Moves what is ready after a poll of [`Pump::poll_fds`]'s entries:
    /// output frames into `out`, buffered stdin into the process. Returns
    /// whether the process's output had anything.
    pub(crate) fn move_ready(
        &mut self,
        fds: &[libc::pollfd],
        out: &mut impl Output,
    ) -> io::Result<bool> {
        let ready = |i: usize| fds.get(i).is_some_and(|f| f.fd >= 0 && f.revents != 0);
        let got = self.forward_output(out, ready(0), ready(1))?;
        if ready(2) {
            self.feed_stdin();
        }
        Ok(got)
    }

    /// Sends what the process wrote on the ready output pipes.
    fn forward_output(
        &mut self,
        out: &mut impl Output,
        out_ready: bool,
        err_ready: bool,
    ) -> io::Result<bool> {
        let mut got_output = false;
        for (stream, ready, kind) in [
            (&mut self.stdout, out_ready, exec_proto::kind::STDOUT),
            (&mut self.stderr, err_ready, exec_proto::kind::STDERR),
        ] {
            if !ready {
                continue;
            }
            let Some(fd) = stream.fd.as_ref() else {
                continue;
            };
            match read_fd(fd, &mut self.buf) {
                Ok(0) => stream.fd = None,
                Ok(n) => {
                    got_output = true;
                    out.send_data(kind, &self.buf[..n])?;
                }
                Err(e) if transient(&e) => {}
                Err(_) => stream.fd = None,
            }
        }
        Ok(got_output)
    }

    /// Writes buffered host stdin into the process's stdin.
    fn feed_stdin(&mut self) {
        let Some(fd) = self.stdin.fd.as_ref() else {
            return;
        };
        match write_fd(fd, &self.stdin_buf) {
            Ok(n) => {
                self.stdin_buf.drain(..n);
            }
            Err(e) if transient(&e) => {}
            Err(_) => {
                // The process closed its stdin: drop the rest.
                self.stdin.fd = None;
                self.stdin_buf = Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames collected in memory.
    #[derive(Default)]
    struct Frames(Vec<(u8, Vec<u8>)>);

    impl Output for Frames {
        fn send_data(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
            self.0.push((kind, payload.to_vec()));
            Ok(())
        }
    }

    fn nonblocking_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = sys::pipe().unwrap();
        sys::set_nonblocking(&r).unwrap();
        sys::set_nonblocking(&w).unwrap();
        (r, w)
    }

    #[test]
    fn output_becomes_frames_and_stdin_reaches_the_pipe_until_eof() {
        let _only = crate::TEST_CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (in_r, in_w) = nonblocking_pipe();
        let (out_r, out_w) = nonblocking_pipe();
        let (err_r, err_w) = nonblocking_pipe();
        // pid 0 is never signalled here: no Signal frame is given.
        let mut pump = Pump::new(0, in_w, out_r, Some(err_r));
        write_fd(&out_w, b"hello").unwrap();
        write_fd(&err_w, b"oops").unwrap();
        pump.take_host(
            vec![HostMsg::Stdin(b"in".to_vec()), HostMsg::StdinEof],
            false,
        );
        let mut fds = pump.poll_fds(true);
        assert!(fds.iter().all(|f| f.fd >= 0), "all three ends polled");
        sys::poll(&mut fds, 1000).unwrap();
        let mut frames = Frames::default();
        assert!(pump.move_ready(&fds, &mut frames).unwrap());
        assert_eq!(
            frames.0,
            vec![
                (exec_proto::kind::STDOUT, b"hello".to_vec()),
                (exec_proto::kind::STDERR, b"oops".to_vec())
            ]
        );
        let mut buf = [0u8; 8];
        assert_eq!(read_fd(&in_r, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"in");
        // Stdin was ended and is written out: the next round closes it.
        let fds = pump.poll_fds(false);
        assert_eq!(fds[0].fd, -1, "output not read while the receiver is full");
        assert_eq!(read_fd(&in_r, &mut buf).unwrap(), 0, "end-of-file");
        drop((out_w, err_w));
        let mut fds = pump.poll_fds(true);
        sys::poll(&mut fds, 1000).unwrap();
        assert!(!pump.move_ready(&fds, &mut frames).unwrap());
        assert!(pump.drained());
    }
}
