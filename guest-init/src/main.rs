//! `capsule-init`: PID 1 of a `capsule exec` guest.
//!
//! capsule puts this static binary in the initramfs it generates, at
//! [`exec_proto::INIT_PATH`], with the command description at
//! [`exec_proto::CONFIG_PATH`] and the shared host files under
//! [`exec_proto::SHARE_DIR`]. The init:
//!
//! 1. mounts `/proc`, `/sys`, `/dev` (devtmpfs) and `/tmp`;
//! 2. opens the virtio-console port `/dev/hvc0`, puts it in raw mode and
//!    says `Hello`; the host answers with the time, which sets the clock;
//! 3. with `--disk`, mounts `/dev/vda` as the command's root;
//! 4. bind-mounts each share on its guest directory (read-only ones
//!    remounted read-only) and notes the state of the writable ones;
//! 5. runs the command with pipes for stdin, stdout and stderr and forwards
//!    them over the port as frames, with a heartbeat every second;
//! 6. when the command has exited, sends back what changed in the writable
//!    shares, then the exit status, and powers off.
//!
//! If anything before the command fails, an `Error` frame says why (or,
//! without a port, a line on the serial console) and the VM powers off.

mod sys;

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use exec_proto::{Decoder, ExecSpec, GuestMsg, HostMsg, CONFIG_PATH, SHARE_DIR, VERSION};

/// Console port to the host.
const PORT: &str = "/dev/hvc0";
/// Where `--disk` is mounted.
const DISK_ROOT: &str = "/.capsule/root";
/// Read size for the command's output, and the data frame size.
const CHUNK: usize = 64 * 1024;
/// Stop reading host frames while this much stdin waits for the command.
const STDIN_HIGH_WATER: usize = 1 << 20;
/// Heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long to wait for the host's time after `Hello`.
const TIME_WAIT: Duration = Duration::from_secs(30);
/// File systems tried for `--disk`.
const DISK_FS: [&str; 5] = ["ext4", "ext3", "ext2", "xfs", "btrfs"];
/// PATH when the user gives none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The port, both ways.
struct Channel {
    /// Blocking writer: the host always drains, so writes only wait briefly.
    tx: File,
    /// Non-blocking reader.
    rx: File,
    decoder: Decoder,
    last_sent: Instant,
}

impl Channel {
    fn open() -> io::Result<Self> {
        // The port appears when virtio-console probes; normally before init.
        let deadline = Instant::now() + Duration::from_secs(5);
        let tx = loop {
            match OpenOptions::new().write(true).open(PORT) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline && e.kind() == io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        sys::make_raw(tx.as_raw_fd())?;
        let rx = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(PORT)?;
        Ok(Self {
            tx,
            rx,
            decoder: Decoder::new(),
            last_sent: Instant::now(),
        })
    }

    fn send(&mut self, msg: &GuestMsg) -> io::Result<()> {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        self.tx.write_all(&buf)?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Reads what the host sent; returns the complete messages.
    fn receive(&mut self) -> io::Result<Vec<HostMsg>> {
        let mut buf = [0u8; CHUNK];
        loop {
            match self.rx.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut msgs = Vec::new();
        while let Some(frame) = self.decoder.next_frame().map_err(io::Error::other)? {
            msgs.push(HostMsg::parse(frame).map_err(io::Error::other)?);
        }
        Ok(msgs)
    }

    fn heartbeat_due(&self) -> bool {
        self.last_sent.elapsed() >= HEARTBEAT
    }
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("capsule-init: this is the guest init of `capsule exec`; it runs as PID 1 only");
        std::process::exit(2);
    }
    let mut chan = None;
    match run(&mut chan) {
        Ok(()) => {}
        Err(msg) => {
            eprintln!("capsule-init: {msg}");
            if let Some(c) = chan.as_mut() {
                let _ = c.send(&GuestMsg::Error(msg));
            }
        }
    }
    sys::power_off();
}

fn run(chan_slot: &mut Option<Channel>) -> Result<(), String> {
    mount_basics("").map_err(|e| format!("cannot mount /proc, /sys, /dev: {e}"))?;
    let _ = sys::mount(Some("tmpfs"), b"/tmp", Some("tmpfs"), 0);
    let chan = chan_slot.insert(Channel::open().map_err(|e| format!("cannot open {PORT}: {e}"))?);
    chan.send(&GuestMsg::Hello { version: VERSION })
        .map_err(|e| format!("cannot write to {PORT}: {e}"))?;
    let early_stdin = wait_for_time(chan)?;

    let config = fs::read(CONFIG_PATH).map_err(|e| format!("cannot read {CONFIG_PATH}: {e}"))?;
    let spec = ExecSpec::from_bytes(&config).map_err(|e| format!("bad {CONFIG_PATH}: {e}"))?;

    let root = if spec.disk {
        mount_disk()?;
        PathBuf::from(DISK_ROOT)
    } else {
        PathBuf::from("/")
    };
    let snapshots = mount_shares(&spec, &root)?;
    let status = run_command(chan, &spec, &root, early_stdin)?;
    copy_back(chan, &spec, &snapshots).map_err(|e| format!("cannot copy shares back: {e}"))?;
    // SAFETY: plain system call.
    unsafe { libc::sync() };
    chan.send(&GuestMsg::Exit(status))
        .map_err(|e| format!("cannot report the exit status: {e}"))?;
    Ok(())
}

/// Mounts proc, sysfs and devtmpfs under `prefix` (creating the mount
/// points). devtmpfs may already be there (`CONFIG_DEVTMPFS_MOUNT`).
fn mount_basics(prefix: &str) -> io::Result<()> {
    for (fs, dir) in [("proc", "proc"), ("sysfs", "sys"), ("devtmpfs", "dev")] {
        let target = format!("{prefix}/{dir}");
        let _ = fs::create_dir_all(&target);
        match sys::mount(Some(fs), target.as_bytes(), Some(fs), 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits for the host's `Time` and sets the clock. Returns stdin messages
/// that arrived right behind it.
fn wait_for_time(chan: &mut Channel) -> Result<Vec<HostMsg>, String> {
    let deadline = Instant::now() + TIME_WAIT;
    loop {
        let mut fds = [libc::pollfd {
            fd: chan.rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(&mut fds, 200).map_err(|e| format!("poll: {e}"))?;
        let mut msgs = chan
            .receive()
            .map_err(|e| format!("bad message from the host: {e}"))?;
        if let Some(pos) = msgs.iter().position(|m| matches!(m, HostMsg::Time { .. })) {
            if let HostMsg::Time { secs, nanos } = msgs[pos] {
                if let Err(e) = sys::set_clock(secs, nanos) {
                    eprintln!("capsule-init: cannot set the clock: {e}");
                }
            }
            msgs.remove(pos);
            return Ok(msgs);
        }
        if Instant::now() > deadline {
            return Err("the host did not send the time".into());
        }
    }
}

fn mount_disk() -> Result<(), String> {
    fs::create_dir_all(DISK_ROOT).map_err(|e| format!("cannot create {DISK_ROOT}: {e}"))?;
    let mut last = None;
    // Read-write first; a read-only disk (`--disk IMG,ro`) then read-only.
    'outer: for flags in [0, libc::MS_RDONLY] {
        for fs in DISK_FS {
            match sys::mount(Some("/dev/vda"), DISK_ROOT.as_bytes(), Some(fs), flags) {
                Ok(()) => {
                    last = None;
                    break 'outer;
                }
                Err(e) => last = Some(e),
            }
        }
    }
    if let Some(e) = last {
        return Err(format!("cannot mount --disk (/dev/vda) as the root: {e}"));
    }
    mount_basics(DISK_ROOT).map_err(|e| format!("cannot mount /proc, /sys, /dev on --disk: {e}"))
}

/// What a file looked like before the command ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
    mode: u32,
}

type Snapshot = HashMap<PathBuf, Stamp>;

fn stamp(meta: &fs::Metadata) -> Stamp {
    Stamp {
        size: meta.size(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
        ino: meta.ino(),
        mode: meta.mode(),
    }
}

/// Every directory and regular file under `dir`, parents before children,
/// as (path relative to `dir`, metadata). Symlinks and special files are
/// not followed or listed.
fn walk(dir: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(dir.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let meta = entry.metadata()?; // does not follow symlinks
            let path = rel.join(entry.file_name());
            if meta.is_dir() {
                stack.push(path.clone());
                out.push((path, meta));
            } else if meta.is_file() {
                out.push((path, meta));
            }
        }
    }
    Ok(out)
}

fn share_source(index: usize) -> PathBuf {
    PathBuf::from(format!("{SHARE_DIR}/{index}"))
}

fn in_root(root: &Path, guest_path: &[u8]) -> PathBuf {
    let rel = Path::new(OsStr::from_bytes(guest_path));
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    root.join(rel)
}

fn mount_shares(spec: &ExecSpec, root: &Path) -> Result<Vec<Option<Snapshot>>, String> {
    let mut snaps = Vec::new();
    for (i, (dir, rw)) in spec.shares.iter().enumerate() {
        let src = share_source(i);
        let _ = fs::create_dir_all(&src);
        let target = in_root(root, dir);
        let shown = String::from_utf8_lossy(dir);
        fs::create_dir_all(&target).map_err(|e| format!("cannot create share {shown}: {e}"))?;
        sys::mount(
            src.to_str(),
            target.as_os_str().as_bytes(),
            None,
            libc::MS_BIND,
        )
        .map_err(|e| format!("cannot mount share {shown}: {e}"))?;
        if *rw {
            let snap = walk(&src)
                .map_err(|e| format!("cannot list share {shown}: {e}"))?
                .into_iter()
                .map(|(p, m)| (p, stamp(&m)))
                .collect();
            snaps.push(Some(snap));
        } else {
            sys::mount(
                None,
                target.as_os_str().as_bytes(),
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            )
            .map_err(|e| format!("cannot make share {shown} read-only: {e}"))?;
            snaps.push(None);
        }
    }
    Ok(snaps)
}

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
fn run_command(
    chan: &mut Channel,
    spec: &ExecSpec,
    root: &Path,
    early_stdin: Vec<HostMsg>,
) -> Result<u8, String> {
    let command = Command::new(spec, root)?;
    let (pid, mut pump) = spawn(chan, &command)?;
    pump.take_host(early_stdin, true);
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
        stdin: Stream { fd: Some(in_w) },
        stdout: Stream { fd: Some(out_r) },
        stderr: Stream { fd: Some(err_r) },
        stdin_buf: Vec::new(),
        stdin_eof: false,
        buf: vec![0u8; CHUNK],
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

/// Moves bytes between the command's pipes and the host: its stdout and
/// stderr out as frames, host stdin (buffered up to a high-water mark)
/// into its stdin.
struct Pump {
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
    /// Host stdin frames (`open`: the command's stdin is still open).
    fn take_host(&mut self, msgs: Vec<HostMsg>, open: bool) {
        for m in msgs {
            match m {
                HostMsg::Stdin(d) if open => self.stdin_buf.extend_from_slice(&d),
                HostMsg::StdinEof => self.stdin_eof = true,
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
            self.take_host(msgs, open);
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
                    let data = self.buf[..n].to_vec();
                    let msg = if stdout_kind {
                        GuestMsg::Stdout(data)
                    } else {
                        GuestMsg::Stderr(data)
                    };
                    chan.send(&msg).map_err(|e| format!("port write: {e}"))?;
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

/// Sends what the command created or changed in the writable shares.
fn copy_back(chan: &mut Channel, spec: &ExecSpec, snaps: &[Option<Snapshot>]) -> io::Result<()> {
    for (i, snap) in snaps.iter().enumerate() {
        let Some(snap) = snap else { continue };
        let src = share_source(i);
        debug_assert!(spec.shares.get(i).is_some_and(|s| s.1));
        for (rel, meta) in walk(&src)? {
            if snap.get(&rel) == Some(&stamp(&meta)) {
                continue;
            }
            let Some(path) = rel.to_str().map(str::to_string) else {
                eprintln!(
                    "capsule-init: not copying back {}: name is not UTF-8",
                    rel.display()
                );
                continue;
            };
            let share = i as u32;
            let mode = meta.mode() & 0o7777;
            if meta.is_dir() {
                chan.send(&GuestMsg::Dir { share, mode, path })?;
                continue;
            }
            let mut file = match File::open(src.join(&rel)) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("capsule-init: not copying back {path}: {e}");
                    continue;
                }
            };
            chan.send(&GuestMsg::File { share, mode, path })?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                chan.send(&GuestMsg::FileData(buf[..n].to_vec()))?;
            }
        }
    }
    Ok(())
}
