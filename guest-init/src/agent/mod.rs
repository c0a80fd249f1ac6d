//! The init as an agent: while the first command runs, more processes in
//! its root, one per host connection to vsock port
//! [`exec_proto::EXEC_VSOCK_PORT`] (the containerd shim's `exec`).
//!
//! Each connection first carries a `Spec` frame (argv, env, cwd as an
//! [`ExecSpec`]); the init sets the process up as it does the command
//! ([`Command`]: chroot, environment, `PATH` lookup), starts it and
//! answers `Started` (or `Error`, and closes), and from then on pumps its stdio over that
//! connection ([`Pump`]) and takes `Stdin`, `StdinEof` and `Signal`
//! frames for it. When the process has exited and its output is drained,
//! the init sends `Exit` and closes the connection. Frames to the host
//! are queued and written without blocking, and the process's output is
//! read only while less than `conn::OUTBOX_HIGH` (1 MiB) waits, so a slow host
//! reader slows that process down and nothing else. A host that closes
//! the connection or sends a malformed frame has its process killed.
//!
//! When the first command ends, [`Agent::end`] SIGKILLs every exec'd
//! process (and its process group), sends each connection its `Exit`
//! (137) and closes them, as runc kills a container's other processes
//! when its init dies.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use exec_proto::{ExecSpec, GuestMsg, HostMsg, EXEC_VSOCK_PORT};

use crate::command::{self, Command};
use crate::pump::{transient, Pump};
use crate::{sys, STDIN_HIGH_WATER};

mod conn;
use conn::Conn;

/// Most exec'd processes at once; more connections are closed at once.
const MAX_EXECS: usize = 32;
/// How long [`Agent::end`] waits for the killed processes' last frames.
const END_WAIT: Duration = Duration::from_secs(3);
/// Poll entries per exec: its socket, stdout, stderr, stdin.
const FDS_PER_EXEC: usize = 4;

/// Where an exec'd process is.
enum Phase {
    /// Waiting for the host's `Spec`; host frames that came first (stdin)
    /// are kept for the process.
    AwaitSpec(Vec<HostMsg>),
    /// Running, or exited with `status` and its output being drained;
    /// `settled`: the status was known before the current poll began.
    Running {
        pump: Pump,
        status: Option<u8>,
        settled: bool,
    },
    /// Its last frame is queued: closed once written.
    Closing,
    /// To be dropped (the connection broke, or everything was sent).
    Gone,
}

/// One exec'd process and its connection.
struct Exec {
    conn: Conn,
    phase: Phase,
}

impl Exec {
    /// The host's spec arrived: set up and start the process, or say why
    /// not.
    fn start(&mut self, bytes: &[u8], root: &Path, early: Vec<HostMsg>) {
        let command = ExecSpec::from_bytes(bytes)
            .map_err(|e| format!("bad exec spec from the host: {e}"))
            .and_then(|spec| Command::new(&spec, root));
        let command = match command {
            Ok(c) => c,
            Err(m) => {
                self.conn.queue(&GuestMsg::Error(m));
                self.phase = Phase::Closing;
                return;
            }
        };
        match command::spawn(&command) {
            Ok(mut pump) => {
                // Queued now, still ahead of any output (the pipes are
                // read in later rounds).
                self.conn.queue(&GuestMsg::Started);
                pump.take_host(early, false);
                self.phase = Phase::Running {
                    pump,
                    status: None,
                    settled: false,
                };
            }
            Err(e) => {
                self.conn
                    .queue(&GuestMsg::Error(format!("cannot start the process: {e}")));
                self.phase = Phase::Closing;
            }
        }
    }

    /// Poll entries: socket, then the pump's three.
    fn poll_fds(&mut self, out: &mut Vec<libc::pollfd>) {
        let room = self.conn.has_room();
        let (wants_input, pipes) = match &mut self.phase {
            Phase::AwaitSpec(early) => {
                let held: usize = early
                    .iter()
                    .map(|m| match m {
                        HostMsg::Stdin(d) => d.len(),
                        _ => 0,
                    })
                    .sum();
                (held < STDIN_HIGH_WATER, None)
            }
            Phase::Running {
                pump,
                status,
                settled,
            } => {
                *settled = status.is_some();
                (pump.wants_stdin(), Some(pump.poll_fds(room)))
            }
            Phase::Closing | Phase::Gone => (false, None),
        };
        let mut events = 0;
        if wants_input {
            events |= libc::POLLIN;
        }
        if self.conn.has_queued() {
            events |= libc::POLLOUT;
        }
        out.push(libc::pollfd {
            fd: self.conn.raw(),
            events,
            revents: 0,
        });
        let none = libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        };
        out.extend(pipes.unwrap_or([none; 3]));
    }

    /// Moves what is ready after a poll of [`Exec::poll_fds`]'s entries.
    fn move_ready(&mut self, fds: &[libc::pollfd], root: &Path) {
        if let Phase::Running {
            pump,
            status,
            settled,
        } = &mut self.phase
        {
            // Queuing into the outbox cannot fail.
            let got = pump.move_ready(&fds[1..], &mut self.conn).unwrap_or(false);
            if let (Some(code), true) = (*status, *settled) {
                if pump.drained() || !got {
                    self.conn.queue(&GuestMsg::Exit(code));
                    self.phase = Phase::Closing;
                }
            }
        }
        let readable = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if fds.first().is_some_and(|f| f.revents & readable != 0) {
            match self.conn.receive() {
                Ok(msgs) => self.take_host(msgs, root),
                Err(e) => {
                    eprintln!("capsule-init: exec connection dropped: {e}");
                    self.drop_process();
                    return;
                }
            }
        }
        if let Err(e) = self.conn.flush() {
            eprintln!("capsule-init: exec connection dropped: {e}");
            self.drop_process();
            return;
        }
        if self.conn.closed {
            // The host is gone: nobody will read the process's output.
            self.drop_process();
        } else if matches!(self.phase, Phase::Closing) && !self.conn.has_queued() {
            self.conn.shutdown_write();
            self.phase = Phase::Gone;
        }
    }

    fn take_host(&mut self, msgs: Vec<HostMsg>, root: &Path) {
        match &mut self.phase {
            Phase::AwaitSpec(early) => {
                let mut msgs = msgs.into_iter();
                for m in msgs.by_ref() {
                    match m {
                        HostMsg::Spec(bytes) => {
                            let early = std::mem::take(early);
                            let rest: Vec<HostMsg> = early.into_iter().chain(msgs).collect();
                            self.start(&bytes, root, rest);
                            return;
                        }
                        other => early.push(other),
                    }
                }
            }
            Phase::Running { pump, status, .. } => pump.take_host(msgs, status.is_some()),
            Phase::Closing | Phase::Gone => {}
        }
    }

    /// Kills the process if it still runs, and marks the exec gone.
    fn drop_process(&mut self) {
        if let Phase::Running {
            pump, status: None, ..
        } = &self.phase
        {
            kill_group(pump.pid());
        }
        self.phase = Phase::Gone;
    }
}

/// SIGKILL for process `pid` and the process group it leads.
fn kill_group(pid: libc::pid_t) {
    if sys::kill(pid, libc::SIGKILL, true).is_err() {
        let _ = sys::kill(pid, libc::SIGKILL, false);
    }
}

/// The listener and the exec'd processes.
pub(crate) struct Agent {
    listener: Option<OwnedFd>,
    root: PathBuf,
    execs: Vec<Exec>,
}

impl Agent {
    /// Listens on [`EXEC_VSOCK_PORT`]; without vsock (the console
    /// channel's kernel) there is no exec, which is only logged.
    pub(crate) fn listen(root: &Path) -> Self {
        let listener = match sys::vsock_listen(EXEC_VSOCK_PORT) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!(
                    "capsule-init: no exec: cannot listen on vsock port {EXEC_VSOCK_PORT}: {e}"
                );
                None
            }
        };
        // SAFETY: plain system call; a process that closes its stdin, or
        // a host that closes its connection, must not kill the init.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        Self {
            listener,
            root: root.to_path_buf(),
            execs: Vec::new(),
        }
    }

    /// Appends the poll entries: the listener, then
    /// [`FDS_PER_EXEC`] per exec.
    pub(crate) fn poll_fds(&mut self, out: &mut Vec<libc::pollfd>) {
        out.push(libc::pollfd {
            fd: self.listener.as_ref().map_or(-1, AsRawFd::as_raw_fd),
            events: libc::POLLIN,
            revents: 0,
        });
        for e in &mut self.execs {
            e.poll_fds(out);
        }
    }

    /// Moves what is ready after a poll of [`Agent::poll_fds`]'s entries,
    /// drops the execs that are done and accepts new connections.
    pub(crate) fn move_ready(&mut self, fds: &[libc::pollfd]) {
        let Some((listener, per_exec)) = fds.split_first() else {
            return;
        };
        for (e, f) in self.execs.iter_mut().zip(per_exec.chunks(FDS_PER_EXEC)) {
            e.move_ready(f, &self.root);
        }
        self.execs.retain(|e| !matches!(e.phase, Phase::Gone));
        if listener.fd >= 0 && listener.revents != 0 {
            self.accept();
        }
    }

    fn accept(&mut self) {
        let Some(l) = self.listener.as_ref() else {
            return;
        };
        loop {
            match sys::accept_nonblocking(l) {
                Ok(sock) if self.execs.len() < MAX_EXECS => self.execs.push(Exec {
                    conn: Conn::new(sock),
                    phase: Phase::AwaitSpec(Vec::new()),
                }),
                Ok(_) => {
                    eprintln!("capsule-init: {MAX_EXECS} exec'd processes run; connection refused")
                }
                Err(e) if transient(&e) => return,
                Err(e) => {
                    eprintln!("capsule-init: exec accept: {e}");
                    return;
                }
            }
        }
    }

    /// Process `pid` ended with `code` (if it is one of ours).
    pub(crate) fn reaped(&mut self, pid: libc::pid_t, code: u8) {
        for e in &mut self.execs {
            if let Phase::Running { pump, status, .. } = &mut e.phase {
                if pump.pid() == pid && status.is_none() {
                    *status = Some(code);
                }
            }
        }
    }

    /// The first command ended: no more execs; SIGKILL the running ones,
    /// and send each connection its process's end (137) before closing
    /// it, waiting at most [`END_WAIT`].
    pub(crate) fn end(&mut self) {
        self.listener = None;
        for e in &mut self.execs {
            match &e.phase {
                Phase::Running {
                    pump, status: None, ..
                } => kill_group(pump.pid()),
                Phase::AwaitSpec(_) => e.phase = Phase::Gone,
                _ => {}
            }
        }
        let deadline = Instant::now() + END_WAIT;
        while !self.execs.is_empty() && Instant::now() < deadline {
            let mut fds = Vec::new();
            self.poll_fds(&mut fds);
            if let Err(e) = sys::poll(&mut fds, 50) {
                eprintln!("capsule-init: poll: {e}");
                break;
            }
            self.move_ready(&fds);
            for (pid, code) in command::reap_all() {
                self.reaped(pid, code);
            }
        }
        for e in &self.execs {
            eprintln!(
                "capsule-init: exec connection closed with {} bytes unsent",
                e.conn.queued()
            );
        }
        self.execs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exec_proto::Decoder;
    use std::os::unix::net::UnixStream;

    /// An exec over one end of a socket pair (vsock's stand-in), and the
    /// host's end.
    fn exec_pair() -> (Exec, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let exec = Exec {
            conn: Conn::new(OwnedFd::from(ours)),
            phase: Phase::AwaitSpec(Vec::new()),
        };
        (exec, host)
    }

    fn host_frames(host: &mut UnixStream) -> Vec<GuestMsg> {
        use std::io::Read;
        host.set_nonblocking(true).unwrap();
        let mut d = Decoder::new();
        let mut buf = [0u8; 4096];
        loop {
            match host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => d.push(&buf[..n]),
                Err(_) => break,
            }
        }
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(GuestMsg::parse(f).unwrap());
        }
        out
    }

    fn send(host: &mut UnixStream, msgs: &[HostMsg]) {
        use std::io::Write;
        let mut b = Vec::new();
        for m in msgs {
            m.encode(&mut b);
        }
        host.write_all(&b).unwrap();
    }

    fn ready(exec: &mut Exec) -> Vec<libc::pollfd> {
        let mut fds = Vec::new();
        exec.poll_fds(&mut fds);
        assert_eq!(fds.len(), FDS_PER_EXEC);
        sys::poll(&mut fds, 1000).unwrap();
        fds
    }

    #[test]
    fn a_spec_whose_directory_is_missing_gets_an_error_and_the_end() {
        let (mut exec, mut host) = exec_pair();
        let spec = ExecSpec {
            argv: vec![b"true".to_vec()],
            cwd: b"/no/such/dir/here".to_vec(),
            ..ExecSpec::default()
        };
        send(&mut host, &[HostMsg::Spec(spec.to_bytes().unwrap())]);
        let fds = ready(&mut exec);
        exec.move_ready(&fds, Path::new("/"));
        assert!(matches!(exec.phase, Phase::Gone), "closed after the error");
        let got = host_frames(&mut host);
        assert!(
            matches!(&got[..], [GuestMsg::Error(m)] if m.contains("working directory")),
            "{got:?}"
        );
    }

    #[test]
    fn malformed_frames_and_bad_specs_never_start_anything() {
        let (mut exec, mut host) = exec_pair();
        // A host → guest frame of an unknown kind.
        std::io::Write::write_all(&mut host, &[0xee, 0, 0, 0, 0]).unwrap();
        let fds = ready(&mut exec);
        exec.move_ready(&fds, Path::new("/"));
        assert!(matches!(exec.phase, Phase::Gone));

        let (mut exec, mut host) = exec_pair();
        send(&mut host, &[HostMsg::Spec(b"no-equals\0".to_vec())]);
        let fds = ready(&mut exec);
        exec.move_ready(&fds, Path::new("/"));
        let got = host_frames(&mut host);
        assert!(
            matches!(&got[..], [GuestMsg::Error(m)] if m.starts_with("bad exec spec")),
            "{got:?}"
        );
    }

    #[test]
    fn stdin_before_the_spec_is_kept_and_a_host_that_leaves_is_dropped() {
        let _only = crate::TEST_CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut exec, mut host) = exec_pair();
        send(&mut host, &[HostMsg::Stdin(b"early".to_vec())]);
        let fds = ready(&mut exec);
        exec.move_ready(&fds, Path::new("/"));
        assert!(matches!(&exec.phase, Phase::AwaitSpec(e) if e.len() == 1));
        drop(host);
        let fds = ready(&mut exec);
        exec.move_ready(&fds, Path::new("/"));
        assert!(matches!(exec.phase, Phase::Gone));
    }

    #[test]
    fn a_process_runs_with_its_stdin_and_its_output_and_status_come_back() {
        let _only = crate::TEST_CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (exec, mut host) = exec_pair();
        let spec = ExecSpec {
            argv: vec![
                b"sh".to_vec(),
                b"-c".to_vec(),
                b"read x; echo got-$x; echo e >&2; exit 3".to_vec(),
            ],
            env: vec![b"PATH=/usr/bin:/bin".to_vec()],
            cwd: b"/".to_vec(),
            ..ExecSpec::default()
        };
        send(
            &mut host,
            &[
                HostMsg::Spec(spec.to_bytes().unwrap()),
                HostMsg::Stdin(b"in\n".to_vec()),
                HostMsg::StdinEof,
            ],
        );
        let mut agent = Agent {
            listener: None,
            root: PathBuf::from("/"),
            execs: vec![exec],
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.execs.is_empty() && Instant::now() < deadline {
            let mut fds = Vec::new();
            agent.poll_fds(&mut fds);
            sys::poll(&mut fds, 50).unwrap();
            agent.move_ready(&fds);
            for (pid, code) in command::reap_all() {
                agent.reaped(pid, code);
            }
        }
        assert!(agent.execs.is_empty(), "the exec ended and was closed");
        let got = host_frames(&mut host);
        assert_eq!(got.first(), Some(&GuestMsg::Started));
        assert_eq!(got.last(), Some(&GuestMsg::Exit(3)));
        let out: Vec<u8> = got
            .iter()
            .filter_map(|m| match m {
                GuestMsg::Stdout(d) => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(out, b"got-in\n");
        assert!(got.contains(&GuestMsg::Stderr(b"e\n".to_vec())));
    }

    #[test]
    fn when_the_command_ends_exec_d_processes_are_killed_and_told_137() {
        let _only = crate::TEST_CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (exec, mut host) = exec_pair();
        let spec = ExecSpec {
            argv: vec![b"sleep".to_vec(), b"600".to_vec()],
            env: vec![b"PATH=/usr/bin:/bin".to_vec()],
            cwd: b"/".to_vec(),
            ..ExecSpec::default()
        };
        send(&mut host, &[HostMsg::Spec(spec.to_bytes().unwrap())]);
        let mut agent = Agent {
            listener: None,
            root: PathBuf::from("/"),
            execs: vec![exec],
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(agent.execs[0].phase, Phase::Running { .. }) {
            assert!(Instant::now() < deadline, "the process never started");
            let mut fds = Vec::new();
            agent.poll_fds(&mut fds);
            sys::poll(&mut fds, 50).unwrap();
            agent.move_ready(&fds);
        }
        let started = Instant::now();
        agent.end();
        assert!(agent.execs.is_empty());
        assert!(
            started.elapsed() < END_WAIT,
            "ended by the kill, not the wait"
        );
        assert_eq!(
            host_frames(&mut host),
            [GuestMsg::Started, GuestMsg::Exit(137)]
        );
    }
}
