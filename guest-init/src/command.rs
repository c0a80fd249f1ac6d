//! The command: set up (environment, program on `PATH`, working
//! directory), spawn it with pipes for its stdio, pump bytes between those
//! pipes and the host until it has exited and its output is drained, and
//! reap it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use exec_proto::{ExecSpec, GuestMsg, HostMsg};

use crate::{
    in_root, sys, Channel, DEFAULT_PATH, OUTPUT_CHUNK, OUTPUT_PIPE_SIZE, STDIN_HIGH_WATER,
};

/// Resolves the program like a shell: names with a slash as they are,
/// others in PATH (inside `root`). `None`: not found.
fn resolve(root: &Path, program: &[u8], path_var: &[u8]) -> Option<Vec<u8>> {
    if program.contains(&b'/') {
        return Some(program.to_vec());
    }
    for dir in path_var.split(|&b| b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        let mut cand = dir.to_vec();
        cand.push(b'/');
        cand.extend_from_slice(program);
        let on_host = in_root(root, &cand);
        if let Ok(meta) = fs::metadata(&on_host) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Some(cand);
            }
        }
    }
    None
}

fn cstrings(items: &[Vec<u8>]) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|i| sys::cstr(i).map_err(|e| e.to_string()))
        .collect()
}

fn ptrs(items: &[CString]) -> Vec<*const libc::c_char> {
    items
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A pipe end we read from or write to, until it is closed.
struct Stream {
    fd: Option<OwnedFd>,
}

impl Stream {
    fn raw(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid descriptor and buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn write_fd(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: valid descriptor and buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Runs the command and forwards its stdio until it has exited and its
/// output is drained. Returns its shell-style exit status.
pub(crate) fn run_command(
    chan: &mut Channel,
    spec: &ExecSpec,
    root: &Path,
    early_stdin: Vec<HostMsg>,
) -> Result<u8, String> {
    let command = Command::new(spec, root)?;
    let (pid, mut pump) = spawn(chan, &command)?;
    pump.take_host(early_stdin, true, false);
    let mut status = None;
    loop {
        // Only a poll that started after the command was reaped can tell
        // that its output is drained: whatever it wrote is in the pipes by
        // then.
        let exited_before_poll = status.is_some();
        let got_output = pump.round(chan, status.is_some())?;
        if chan.heartbeat_due() {
            chan.send(&GuestMsg::Heartbeat)
                .map_err(|e| format!("port write: {e}"))?;
        }
        if let Some(code) = reap(pid) {
            status = Some(code);
        }
        if let (Some(code), true) = (status, exited_before_poll) {
            // Output still held open by a background process: stop once it
            // goes quiet, rather than wait for it.
            if pump.drained() || !got_output {
                return Ok(code);
            }
        }
    }
}

/// The command, ready for `execve`: everything allocated before `fork`.
struct Command {
    program: CString,
    /// What the child prints when the program is not found.
    not_found: Vec<u8>,
    cwd: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    chroot: Option<CString>,
}

impl Command {
    /// The command of `spec`, run in `root`: its environment (with a
    /// default `PATH` and `HOME`), its program found on that `PATH`, its
    /// working directory (which must exist).
    fn new(spec: &ExecSpec, root: &Path) -> Result<Self, String> {
        let mut env = spec.env.clone();
        let has = |env: &[Vec<u8>], k: &[u8]| env.iter().any(|e| e.starts_with(k));
        if !has(&env, b"PATH=") {
            env.push(format!("PATH={DEFAULT_PATH}").into_bytes());
        }
        if !has(&env, b"HOME=") {
            env.push(b"HOME=/root".to_vec());
        }
        let path_var = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix(b"PATH="))
            .unwrap_or(DEFAULT_PATH.as_bytes())
            .to_vec();
        let program = resolve(root, &spec.argv[0], &path_var);
        let not_found = match &program {
            Some(_) => Vec::new(),
            None => {
                let mut m = b"capsule-init: ".to_vec();
                m.extend_from_slice(&spec.argv[0]);
                m.extend_from_slice(b": command not found\n");
                m
            }
        };
        let program =
            sys::cstr(program.as_deref().unwrap_or(&spec.argv[0])).map_err(|e| e.to_string())?;
        let cwd = if spec.cwd.is_empty() {
            b"/".to_vec()
        } else {
            spec.cwd.clone()
        };
        if !in_root(root, &cwd).is_dir() {
            return Err(format!(
                "working directory {} does not exist in the guest",
                String::from_utf8_lossy(&cwd)
            ));
        }
        let cwd = sys::cstr(&cwd).map_err(|e| e.to_string())?;
        let argv = cstrings(&spec.argv)?;
        let envp = cstrings(&env)?;
        let chroot = if root == Path::new("/") {
            None
        } else {
            Some(sys::cstr(root.as_os_str().as_bytes()).map_err(|e| e.to_string())?)
        };
        Ok(Self {
            program,
            not_found,
            cwd,
            argv,
            envp,
            chroot,
        })
    }
}

/// Creates the command's stdio pipes, tells the host it starts and
/// starts it. Returns its pid and the pump for its stdio.
fn spawn(chan: &mut Channel, command: &Command) -> Result<(libc::pid_t, Pump), String> {
    let (argv_p, envp_p) = (ptrs(&command.argv), ptrs(&command.envp));
    let pipe = |what| sys::pipe().map_err(|e| format!("cannot create the {what} pipe: {e}"));
    let (in_r, in_w) = pipe("stdin")?;
    let (out_r, out_w) = pipe("stdout")?;
    let (err_r, err_w) = pipe("stderr")?;
    for fd in [&in_w, &out_r, &err_r] {
        sys::set_nonblocking(fd).map_err(|e| format!("fcntl: {e}"))?;
    }
    // Room for the command to go on writing while a frame is sent; the
    // default 64 KiB if the kernel refuses.
    for fd in [&out_r, &err_r] {
        let _ = sys::set_pipe_size(fd, OUTPUT_PIPE_SIZE);
    }
    // SAFETY: plain system call; the init must survive a command that
    // closes its stdin while we write to it.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    chan.send(&GuestMsg::Started)
        .map_err(|e| format!("port write: {e}"))?;
    let pid = sys::spawn(&sys::ChildSetup {
        chroot: command.chroot.as_deref(),
        cwd: &command.cwd,
        program: &command.program,
        argv: &argv_p,
        envp: &envp_p,
        stdio: [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
        not_found: &command.not_found,
    })
    .map_err(|e| format!("cannot start the command: {e}"))?;
    drop((in_r, out_w, err_w));
    let pump = Pump {
        pid,
        stdin: Stream { fd: Some(in_w) },
        stdout: Stream { fd: Some(out_r) },
        stderr: Stream { fd: Some(err_r) },
        stdin_buf: Vec::new(),
        stdin_eof: false,
        buf: vec![0u8; OUTPUT_CHUNK],
    };
    Ok((pid, pump))
}

/// Reaps every exited child (orphans of the command included); returns
/// the command's status if it was among them.
fn reap(pid: libc::pid_t) -> Option<u8> {
    let mut status = None;
    loop {
        match sys::reap_any() {
            sys::Reaped::Child(p, code) if p == pid => status = Some(code),
            sys::Reaped::Child(..) => {}
            sys::Reaped::None => return status,
        }
    }
}

/// Delivers the host's signal `sig` to the command's process alone, not
/// to its process group (the command leads one: it runs in a session of
/// its own): as `docker kill` and `runc kill` signal a container's first
/// process, which decides what its children get (a shell that traps
/// SIGTERM to stop its workers in order is given that chance). A failure
/// (the command has just exited) is only logged.
fn signal_command(pid: libc::pid_t, sig: u8) {
    // SAFETY: plain system call; `pid` is the command's, not yet reaped
    // (the caller drops signals once it is).
    if unsafe { libc::kill(pid, libc::c_int::from(sig)) } != 0 {
        eprintln!(
            "capsule-init: cannot deliver signal {sig} to the command: {}",
            io::Error::last_os_error()
        );
    }
}

/// Moves bytes between the command's pipes and the host: its stdout and
/// stderr out as frames, host stdin (buffered up to a high-water mark)
/// into its stdin.
struct Pump {
    /// The command, for the host's signals.
    pid: libc::pid_t,
    stdin: Stream,
    stdout: Stream,
    stderr: Stream,
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    buf: Vec<u8>,
}

/// A read or write that found nothing to do for now.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Pump {
    /// Host frames: stdin (`open`: the command's stdin is still open) and
    /// signals (dropped once the command has `exited`: its pid may be
    /// reused by then).
    fn take_host(&mut self, msgs: Vec<HostMsg>, open: bool, exited: bool) {
        for m in msgs {
            match m {
                HostMsg::Stdin(d) if open => self.stdin_buf.extend_from_slice(&d),
                HostMsg::StdinEof => self.stdin_eof = true,
                HostMsg::Signal(sig) if !exited => signal_command(self.pid, sig),
                _ => {}
            }
        }
    }

    /// Both output pipes are closed.
    fn drained(&self) -> bool {
        self.stdout.fd.is_none() && self.stderr.fd.is_none()
    }

    /// One poll over the host port and the pipes (shorter once the command
    /// has `exited`), then what is ready moves. Returns whether the
    /// command's output had anything.
    fn round(&mut self, chan: &mut Channel, exited: bool) -> Result<bool, String> {
        if self.stdin_eof && self.stdin_buf.is_empty() {
            self.stdin.fd = None;
        }
        let pollfd = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let mut fds = [
            pollfd(
                if self.stdin_buf.len() < STDIN_HIGH_WATER {
                    chan.rx.as_raw_fd()
                } else {
                    -1
                },
                libc::POLLIN,
            ),
            pollfd(self.stdout.raw(), libc::POLLIN),
            pollfd(self.stderr.raw(), libc::POLLIN),
            pollfd(
                if self.stdin_buf.is_empty() {
                    -1
                } else {
                    self.stdin.raw()
                },
                libc::POLLOUT,
            ),
        ];
        let timeout = if exited { 50 } else { 100 };
        sys::poll(&mut fds, timeout).map_err(|e| format!("poll: {e}"))?;
        let got_output = self.forward_output(chan, fds[1].revents != 0, fds[2].revents != 0)?;
        if fds[0].revents != 0 {
            let msgs = chan
                .receive()
                .map_err(|e| format!("bad message from the host: {e}"))?;
            let open = self.stdin.fd.is_some();
            self.take_host(msgs, open, exited);
        }
        if fds[3].revents != 0 {
            self.feed_stdin();
        }
        if self.stdin.fd.is_none() {
            self.stdin_buf.clear();
        }
        Ok(got_output)
    }

    /// Sends what the command wrote on the ready output pipes.
    fn forward_output(
        &mut self,
        chan: &mut Channel,
        out_ready: bool,
        err_ready: bool,
    ) -> Result<bool, String> {
        let mut got_output = false;
        for (stream, ready, stdout_kind) in [
            (&mut self.stdout, out_ready, true),
            (&mut self.stderr, err_ready, false),
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
                    let kind = if stdout_kind {
                        exec_proto::kind::STDOUT
                    } else {
                        exec_proto::kind::STDERR
                    };
                    chan.send_data(kind, &self.buf[..n])
                        .map_err(|e| format!("port write: {e}"))?;
                }
                Err(e) if transient(&e) => {}
                Err(_) => stream.fd = None,
            }
        }
        Ok(got_output)
    }

    /// Writes buffered host stdin into the command's stdin.
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
                // The command closed its stdin: drop the rest.
                self.stdin.fd = None;
                self.stdin_buf = Vec::new();
            }
        }
    }
}
