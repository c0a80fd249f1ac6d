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
mod oom;
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
    /// An events watch ([`ExecSpec::watch`]): no process; `Oom` frames
    /// when the OOM killer's count (`seen` so far; `None` until the
    /// watch's first reading) grows.
    Watch { seen: Option<u64> },
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
        let spec = ExecSpec::from_bytes(bytes);
        if spec.as_ref().is_ok_and(|s| s.watch) {
            self.conn.queue(&GuestMsg::Started);
            self.phase = Phase::Watch { seen: None };
            return;
        }
        let command = spec
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
            // Read to see the host leave.
            Phase::Watch { .. } => (true, None),
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
            Phase::Watch { .. } | Phase::Closing | Phase::Gone => {}
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
    /// When the watches last compared the OOM kill count.
    oom_checked: Instant,
    /// The OOM kill count.
    oom: oom::OomCounter,
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
            oom_checked: Instant::now(),
            oom: oom::OomCounter::default(),
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
        self.report_ooms(false);
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
        // An OOM kill that ended the command is reported before its end.
        self.report_ooms(true);
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
mod tests;
