//! The command: set up (environment, program on `PATH`, working
//! directory), spawn it with pipes for its stdio, pump bytes between those
//! pipes and the host (`pump.rs`) until it has exited and its output is
//! drained, and reap it; the same poll loop serves the processes exec'd
//! beside it (`agent.rs`).

use std::ffi::{CStr, CString};
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
    /// A terminal of this size, and the `/dev/ptmx` (in the root) it
    /// comes from.
    tty: Option<(exec_proto::WinSize, CString)>,
    /// Who the process runs as: uid, gid, supplementary groups.
    user: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
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
        let tty = match spec.tty {
            Some(size) => {
                let ptmx = in_root(root, b"/dev/ptmx");
                let ptmx = sys::cstr(ptmx.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
                Some((size, ptmx))
            }
            None => None,
        };
        let user = spec.user.as_ref().map(|u| (u.uid, u.gid, u.groups.clone()));
        Ok(Self {
            program,
            not_found,
            cwd,
            argv,
            envp,
            chroot,
            tty,
            user,
        })
    }
}

/// Starts the command in a session of its own with its stdio on pipes,
/// or on a pseudo-terminal (its controlling terminal, stderr merged into
/// stdout as runc does). Returns the pump for its stdio.
pub(crate) fn spawn(command: &Command) -> io::Result<Pump> {
    // SAFETY: plain system call; the init must survive a process that
    // closes its stdin while we write to it.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    match &command.tty {
        Some((size, ptmx)) => spawn_on_tty(command, ptmx, *size),
        None => spawn_on_pipes(command),
    }
}

/// The child's setup, with `stdio` as its descriptors 0 to 2.
fn child_setup<'a>(
    command: &'a Command,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    stdio: [libc::c_int; 3],
) -> sys::ChildSetup<'a> {
    sys::ChildSetup {
        chroot: command.chroot.as_deref(),
        cwd: &command.cwd,
        program: &command.program,
        argv,
        envp,
        stdio,
        not_found: &command.not_found,
        tty: command.tty.is_some(),
        user: command
            .user
            .as_ref()
            .map(|(u, g, groups)| (*u, *g, groups.as_slice())),
    }
}

fn spawn_on_tty(command: &Command, ptmx: &CStr, size: exec_proto::WinSize) -> io::Result<Pump> {
    let (argv_p, envp_p) = (ptrs(&command.argv), ptrs(&command.envp));
    let (master, slave) = sys::open_pty(ptmx, size)?;
    sys::set_nonblocking(&master)?;
    let input = master.try_clone()?;
    let s = slave.as_raw_fd();
    let pid = sys::spawn(&child_setup(command, &argv_p, &envp_p, [s, s, s]))?;
    // Our copy closed: the master reads EIO once the process's are.
    drop(slave);
    Ok(Pump::new(pid, input, master, None).on_tty())
}

fn spawn_on_pipes(command: &Command) -> io::Result<Pump> {
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
    let stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let pid = sys::spawn(&child_setup(command, &argv_p, &envp_p, stdio))?;
    drop((in_r, out_w, err_w));
    Ok(Pump::new(pid, in_w, out_r, Some(err_r)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use exec_proto::{User, WinSize};
    use std::time::{Duration, Instant};

    /// Frames collected in memory.
    #[derive(Default)]
    struct Frames(Vec<(u8, Vec<u8>)>);

    impl crate::pump::Output for Frames {
        fn send_data(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
            self.0.push((kind, payload.to_vec()));
            Ok(())
        }
    }

    /// Runs `script` under `sh` as `spec` says, with `host` frames given
    /// once it printed `ready`; returns its output frames and status.
    fn run(
        script: &str,
        tty: Option<WinSize>,
        user: Option<User>,
        host: Vec<HostMsg>,
    ) -> (Frames, u8) {
        let spec = ExecSpec {
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), script.as_bytes().to_vec()],
            env: vec![b"PATH=/usr/bin:/bin".to_vec()],
            cwd: b"/".to_vec(),
            tty,
            user,
            ..ExecSpec::default()
        };
        let command = Command::new(&spec, Path::new("/")).unwrap();
        let mut pump = spawn(&command).unwrap();
        let mut frames = Frames::default();
        let mut host = Some(host);
        let mut status = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let mut fds = pump.poll_fds(true);
            sys::poll(&mut fds, 50).unwrap();
            let got = pump.move_ready(&fds, &mut frames).unwrap();
            let said_ready = frames
                .0
                .iter()
                .any(|(_, d)| d.windows(5).any(|w| w == b"ready"));
            if said_ready {
                if let Some(h) = host.take() {
                    pump.take_host(h, false);
                }
            }
            if let Some(code) = status {
                if pump.drained() || !got {
                    return (frames, code);
                }
            }
            if let sys::Reaped::Child(pid, code) = sys::reap_any() {
                assert_eq!(pid, pump.pid());
                status = Some(code);
            }
        }
        panic!("the command did not end: {:?}", frames.0);
    }

    fn text(frames: &Frames, kind: u8) -> String {
        let bytes: Vec<u8> = frames
            .0
            .iter()
            .filter(|(k, _)| *k == kind)
            .flat_map(|(_, d)| d.clone())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn a_tty_process_has_a_terminal_of_its_size_that_resizes() {
        let _only = crate::TEST_CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let size = WinSize {
            rows: 33,
            cols: 101,
        };
        let script =
            "tty; stty size; echo err >&2; echo ready; read x; stty size; echo got-$x; exit 4";
        let (frames, code) = run(
            script,
            Some(size),
            None,
            vec![
                HostMsg::Resize(WinSize {
                    rows: 50,
                    cols: 160,
                }),
                HostMsg::Stdin(b"line\n".to_vec()),
            ],
        );
        assert_eq!(code, 4);
        let out = text(&frames, exec_proto::kind::STDOUT);
        assert!(out.starts_with("/dev/pts/"), "{out:?}");
        // The terminal's output processing: CR LF; stderr merged; the
        // input echoed.
        assert!(out.contains("\r\n33 101\r\nerr\r\nready\r\n"), "{out:?}");
        assert!(out.contains("line\r\n50 160\r\ngot-line\r\n"), "{out:?}");
        assert!(text(&frames, exec_proto::kind::STDERR).is_empty());
    }

    #[test]
    fn without_a_tty_stdio_are_pipes_and_the_user_is_taken() {
        let _only = crate::TEST_CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let user = User {
            uid: 1234,
            gid: 567,
            groups: vec![89, 1011],
        };
        let script = "tty; echo $?; id -u; id -g; id -G; echo e >&2";
        let (frames, code) = run(script, None, Some(user), Vec::new());
        assert_eq!(code, 0);
        let out = text(&frames, exec_proto::kind::STDOUT);
        // `tty` fails without a terminal.
        assert_eq!(out, "not a tty\n1\n1234\n567\n567 89 1011\n");
        assert_eq!(text(&frames, exec_proto::kind::STDERR), "e\n");
    }
}
