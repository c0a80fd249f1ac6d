//! The command: set up (environment, program on `PATH`, working
//! directory), spawn it with pipes for its stdio, pump bytes between those
//! pipes and the host (`pump.rs`) until it has exited and its output is
//! drained, and reap it; the same poll loop serves the processes exec'd
//! beside it (`agent.rs`).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use exec_proto::{ExecSpec, GuestMsg, HostMsg};

use crate::agent::Agent;
use crate::pump::Pump;
use crate::{in_root, sys, Channel, DEFAULT_PATH, OUTPUT_PIPE_SIZE};

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

/// Runs the command and forwards its stdio until it has exited and its
/// output is drained, serving the processes exec'd beside it meanwhile
/// ([`Agent`]: killed when the command ends). Returns its shell-style exit
/// status.
pub(crate) fn run_command(
    chan: &mut Channel,
    spec: &ExecSpec,
    root: &Path,
    early_stdin: Vec<HostMsg>,
) -> Result<u8, String> {
    let command = Command::new(spec, root)?;
    let mut agent = Agent::listen(root);
    chan.send(&GuestMsg::Started)
        .map_err(|e| format!("port write: {e}"))?;
    let mut pump = spawn(&command).map_err(|e| format!("cannot start the command: {e}"))?;
    pump.take_host(early_stdin, false);
    let mut status = None;
    loop {
        // Only a poll that started after the command was reaped can tell
        // that its output is drained: whatever it wrote is in the pipes by
        // then.
        let exited_before_poll = status.is_some();
        let got_output = round(chan, &mut pump, &mut agent, status.is_some())?;
        if chan.heartbeat_due() {
            chan.send(&GuestMsg::Heartbeat)
                .map_err(|e| format!("port write: {e}"))?;
        }
        for (pid, code) in reap_all() {
            if pid == pump.pid() {
                status = Some(code);
            } else {
                agent.reaped(pid, code);
            }
        }
        if let (Some(code), true) = (status, exited_before_poll) {
            // Output still held open by a background process: stop once it
            // goes quiet, rather than wait for it.
            if pump.drained() || !got_output {
                agent.end();
                return Ok(code);
            }
        }
    }
}

/// One poll over the host channel, the command's pipes and the exec'd
/// processes (shorter once the command has `exited`), then what is ready
/// moves. Returns whether the command's output had anything.
fn round(
    chan: &mut Channel,
    pump: &mut Pump,
    agent: &mut Agent,
    exited: bool,
) -> Result<bool, String> {
    let host = if pump.wants_stdin() {
        chan.rx.as_raw_fd()
    } else {
        -1
    };
    let mut fds = vec![libc::pollfd {
        fd: host,
        events: libc::POLLIN,
        revents: 0,
    }];
    fds.extend(pump.poll_fds(true));
    let ours = fds.len();
    agent.poll_fds(&mut fds);
    let timeout = if exited { 50 } else { 100 };
    sys::poll(&mut fds, timeout).map_err(|e| format!("poll: {e}"))?;
    let got_output = pump
        .move_ready(&fds[1..ours], chan)
        .map_err(|e| format!("port write: {e}"))?;
    if fds[0].fd >= 0 && fds[0].revents != 0 {
        let msgs = chan
            .receive()
            .map_err(|e| format!("bad message from the host: {e}"))?;
        pump.take_host(msgs, exited);
    }
    agent.move_ready(&fds[ours..]);
    Ok(got_output)
}

/// A process, ready for `execve`: everything allocated before `fork`.
pub(crate) struct Command {
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
    pub(crate) fn new(spec: &ExecSpec, root: &Path) -> Result<Self, String> {
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

/// Creates the command's stdio pipes and starts it in a session of its
/// own. Returns the pump for its stdio.
pub(crate) fn spawn(command: &Command) -> io::Result<Pump> {
    let (argv_p, envp_p) = (ptrs(&command.argv), ptrs(&command.envp));
    let (in_r, in_w) = sys::pipe()?;
    let (out_r, out_w) = sys::pipe()?;
    let (err_r, err_w) = sys::pipe()?;
    for fd in [&in_w, &out_r, &err_r] {
        sys::set_nonblocking(fd)?;
    }
    // Room for the command to go on writing while a frame is sent; the
    // default 64 KiB if the kernel refuses.
    for fd in [&out_r, &err_r] {
        let _ = sys::set_pipe_size(fd, OUTPUT_PIPE_SIZE);
    }
    // SAFETY: plain system call; the init must survive a process that
    // closes its stdin while we write to it.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let pid = sys::spawn(&sys::ChildSetup {
        chroot: command.chroot.as_deref(),
        cwd: &command.cwd,
        program: &command.program,
        argv: &argv_p,
        envp: &envp_p,
        stdio: [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
        not_found: &command.not_found,
    })?;
    drop((in_r, out_w, err_w));
    Ok(Pump::new(pid, in_w, out_r, err_r))
}

/// Reaps every exited child (orphans of the processes included): their
/// pids and shell-style statuses.
pub(crate) fn reap_all() -> Vec<(libc::pid_t, u8)> {
    let mut out = Vec::new();
    while let sys::Reaped::Child(pid, code) = sys::reap_any() {
        out.push((pid, code));
    }
    out
}
