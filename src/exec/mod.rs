//! `capsule exec`: run one command in a fresh VM and hand back its output
//! and exit status.
//!
//! The pieces:
//!
//! * [`initramfs`](build_initramfs): a cpio archive generated here with
//!   the embedded guest init (`capsule-init`, built from `guest-init/` by
//!   `build.rs`), the command description, the `--rootfs` tree and the
//!   `--share` directories. The kernel runs the init with `rdinit=`.
//! * A virtio-console device whose single port is the channel: the init
//!   speaks the framed protocol of the `exec-proto` crate over `/dev/hvc0`.
//!   Guest → host frames are decoded by [`Sink`] as the device hands over
//!   transmitted bytes; host → guest frames (time, stdin) are queued by
//!   [`StdinPump`], an event-loop subscriber.
//! * The serial console stays the kernel console (`quiet`), captured in a
//!   [`ConsoleTail`] whose last lines are shown when the guest fails.
//! * [`Session`] holds what the guest reported; the VMM's run loop asks
//!   [`Session::check`] whether to stop: command finished, init error,
//!   `--timeout`, no boot, or no heartbeat (a stuck guest).

pub mod cpio;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devices::exit::GuestExit;
use devices::virtio::console::{Console as VirtioConsole, INPUT_HIGH_WATER};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use exec_proto::{Decoder, ExecSpec, GuestMsg, HostMsg, MAX_PAYLOAD};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::builder::{self, Console, Extras, RunEnd};
use crate::config::VmConfig;

use self::cpio::{CpioError, CpioWriter};

/// The guest init, built by `build.rs`.
static INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/capsule-init"));

/// Kernel command line of an exec guest (before `--append`).
pub const EXEC_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1";
/// Without a message from the guest for this long, it is taken as stuck
/// (its init sends a heartbeat every second).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the kernel console shown when the guest fails.
pub const CONSOLE_TAIL_LINES: usize = 30;
/// How often the run loop checks deadlines.
const TICK: Duration = Duration::from_millis(100);
/// Bytes of kernel console kept.
const CONSOLE_KEEP: usize = 16 * 1024;
/// Host stdin read size.
const STDIN_CHUNK: usize = 64 * 1024;

/// Errors of `capsule exec` itself (not of the command or the guest).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building or running the VM failed.
    #[error(transparent)]
    Vm(#[from] builder::Error),
    /// A `--rootfs` or `--share` tree could not be packed.
    #[error(transparent)]
    Initramfs(#[from] CpioError),
    /// Bad `--share`, `--rootfs`, `--env` or `--workdir`.
    #[error("{0}")]
    Usage(String),
    /// Setting up host-side plumbing failed.
    #[error("{0}: {1}")]
    Host(&'static str, io::Error),
}

/// A host directory shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Host directory.
    pub host: PathBuf,
    /// Absolute guest directory.
    pub guest: String,
    /// Copy what the command writes back to `host` when it exits.
    pub writable: bool,
}

impl std::str::FromStr for Share {
    type Err = String;

    /// Parses `HOSTDIR:GUESTDIR[:ro|:rw]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, writable) = match s.rsplit_once(':') {
            Some((r, "ro")) => (r, false),
            Some((r, "rw")) => (r, true),
            _ => (s, true),
        };
        let Some((host, guest)) = rest.split_once(':') else {
            return Err(format!("'{s}': expected HOSTDIR:GUESTDIR[:ro]"));
        };
        if host.is_empty() {
            return Err(format!("'{s}': empty host directory"));
        }
        if !guest.starts_with('/') || guest.contains(':') {
            return Err(format!(
                "'{s}': the guest directory must be an absolute path without ':'"
            ));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            writable,
        })
    }
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Kernel, initrd, vCPUs, memory, KVM device; `disks` holds `--disk`.
    pub vm: VmConfig,
    /// Host directory packed as the guest's root.
    pub rootfs: Option<PathBuf>,
    /// Shared directories.
    pub shares: Vec<Share>,
    /// Environment, `K=V`.
    pub env: Vec<String>,
    /// Working directory in the guest.
    pub workdir: String,
    /// Program and arguments.
    pub argv: Vec<OsString>,
    /// Kill the VM after this long.
    pub timeout: Option<Duration>,
    /// Give up if the guest init has not said hello after this long.
    pub boot_timeout: Duration,
    /// When `capsule` started, for the start-up measurement.
    pub started: Instant,
}

/// How an exec ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command ended with this status (128+N: signal N).
    Exited(u8),
    /// `--timeout` expired.
    TimedOut(Duration),
    /// The guest failed: the message and the last kernel console lines.
    GuestFailed(String, Vec<String>),
    /// The guest init could not run the command (bad `--disk`, missing
    /// working directory, ...), or the result could not be copied back.
    SetupFailed(String),
}

/// Packs the initramfs: `/dev/console`, the init, the command description,
/// the `--rootfs` tree and the shares.
pub fn build_initramfs(config: &ExecConfig) -> Result<Vec<u8>, Error> {
    let spec = ExecSpec {
        argv: config.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: config.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        cwd: config.workdir.as_bytes().to_vec(),
        disk: !config.vm.disks.is_empty(),
        shares: config
            .shares
            .iter()
            .map(|s| (s.guest.as_bytes().to_vec(), s.writable))
            .collect(),
    };
    let spec = spec.to_bytes().map_err(Error::Usage)?;
    let mut w = CpioWriter::new();
    if let Some(root) = &config.rootfs {
        if !root.is_dir() {
            return Err(Error::Usage(format!(
                "--rootfs {}: not a directory",
                root.display()
            )));
        }
        w.tree(root, "")?;
    }
    // Directories may repeat entries of the rootfs tree; the kernel keeps
    // the existing directory.
    w.dir("dev", 0o755)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    for d in ["proc", "sys", "tmp", ".capsule", ".capsule/share"] {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    w.file(
        exec_proto::INIT_PATH.trim_start_matches('/'),
        0o755,
        INIT_BINARY,
    )?;
    w.file(
        exec_proto::CONFIG_PATH.trim_start_matches('/'),
        0o644,
        &spec,
    )?;
    for (i, share) in config.shares.iter().enumerate() {
        if !share.host.is_dir() {
            return Err(Error::Usage(format!(
                "--share {}: not a directory",
                share.host.display()
            )));
        }
        let dest = format!("{}/{i}", exec_proto::SHARE_DIR.trim_start_matches('/'));
        w.dir(&dest, 0o755)?;
        w.tree(&share.host, &dest)?;
    }
    Ok(w.finish())
}

/// The kernel console's recent output.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    /// The last `n` non-empty lines.
    pub fn lines(&self, n: usize) -> Vec<String> {
        let buf = lock(&self.0);
        let bytes: Vec<u8> = buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> = text
            .split(['\n', '\r'])
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut buf = lock(&self.0);
        buf.extend(data);
        let excess = buf.len().saturating_sub(CONSOLE_KEEP);
        buf.drain(..excess);
        if log::log_enabled!(log::Level::Debug) {
            let _ = io::stderr().write_all(data);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A writable share's host side, for copy-back.
#[derive(Debug)]
struct ShareBack {
    host: PathBuf,
    writable: bool,
}

/// What the guest has reported so far.
struct Session {
    started: Instant,
    timeout: Option<Duration>,
    boot_timeout: Duration,
    hello: bool,
    last_message: Instant,
    exit: Option<u8>,
    error: Option<String>,
    broken: Option<String>,
    copy_error: Option<String>,
    stdout: File,
    stderr: File,
    output_failed: bool,
    shares: Vec<ShareBack>,
    current_file: Option<(File, PathBuf)>,
    /// Wakes the [`StdinPump`] when the init said hello.
    wake: EventFd,
}

/// Why the run loop stopped on the host's initiative.
#[derive(Debug)]
enum Stop {
    Finished,
    TimedOut(Duration),
    Failed(String),
}

impl Session {
    fn check(&self) -> Option<Stop> {
        if self.exit.is_some() || self.error.is_some() {
            return Some(Stop::Finished);
        }
        if let Some(why) = &self.broken {
            return Some(Stop::Failed(why.clone()));
        }
        let elapsed = self.started.elapsed();
        if let Some(t) = self.timeout {
            if elapsed >= t {
                return Some(Stop::TimedOut(t));
            }
        }
        if !self.hello && elapsed >= self.boot_timeout {
            return Some(Stop::Failed(format!(
                "the guest did not start capsule's init within {} s (kernel boot failed or hung)",
                self.boot_timeout.as_secs()
            )));
        }
        if self.hello && self.last_message.elapsed() >= STALL_TIMEOUT {
            return Some(Stop::Failed(format!(
                "the guest stopped responding: no message from its init for {} s",
                STALL_TIMEOUT.as_secs()
            )));
        }
        None
    }

    fn write_out(&mut self, stderr: bool, data: &[u8]) {
        let f = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        if let Err(e) = f.write_all(data) {
            if !self.output_failed {
                log::warn!("cannot write the command's output: {e}");
                self.output_failed = true;
            }
        }
    }

    fn handle(&mut self, msg: GuestMsg) {
        self.last_message = Instant::now();
        match msg {
            GuestMsg::Hello { version } => {
                if version != exec_proto::VERSION {
                    self.broken = Some(format!(
                        "the guest init speaks protocol {version}, not {}",
                        exec_proto::VERSION
                    ));
                    return;
                }
                log::info!(
                    "guest init up {} ms after capsule started",
                    self.started.elapsed().as_millis()
                );
                self.hello = true;
                let _ = self.wake.write(1);
            }
            GuestMsg::Stdout(d) => self.write_out(false, &d),
            GuestMsg::Stderr(d) => self.write_out(true, &d),
            GuestMsg::Started => log::info!(
                "command started {} ms after capsule started",
                self.started.elapsed().as_millis()
            ),
            GuestMsg::Heartbeat => {}
            GuestMsg::Exit(status) => {
                self.current_file = None;
                self.exit = Some(status);
            }
            GuestMsg::Error(m) => self.error = Some(m),
            GuestMsg::File { share, mode, path } => {
                self.current_file = None;
                match self.create(share, &path, false, mode) {
                    Ok(Some(f)) => self.current_file = Some((f, PathBuf::from(path))),
                    Ok(None) => {}
                    Err(e) => self.copy_failed(&path, e),
                }
            }
            GuestMsg::FileData(d) => {
                if let Some((f, path)) = self.current_file.as_mut() {
                    if let Err(e) = f.write_all(&d) {
                        let path = path.display().to_string();
                        self.current_file = None;
                        self.copy_failed(&path, e);
                    }
                }
            }
            GuestMsg::Dir { share, mode, path } => {
                self.current_file = None;
                if let Err(e) = self.create(share, &path, true, mode) {
                    self.copy_failed(&path, e);
                }
            }
        }
    }

    fn copy_failed(&mut self, path: &str, e: io::Error) {
        log::warn!("cannot copy back {path}: {e}");
        self.copy_error
            .get_or_insert_with(|| format!("cannot copy {path} back from the guest: {e}"));
    }

    /// Creates `path` in writable share `share`, refusing anything that
    /// would leave the share's host directory.
    fn create(&self, share: u32, path: &str, dir: bool, mode: u32) -> io::Result<Option<File>> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        let root = match self.shares.get(share as usize) {
            Some(s) if s.writable => &s.host,
            _ => return Err(invalid("not a writable share")),
        };
        let target = safe_join(root, path).ok_or_else(|| invalid("unsafe path"))?;
        let perm = mode & 0o777;
        if dir {
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(invalid("exists and is not a directory")),
                Err(_) => fs::DirBuilder::new().mode(perm | 0o700).create(&target)?,
            }
            return Ok(None);
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(perm)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)?;
        f.set_permissions(fs::Permissions::from_mode(perm))?;
        Ok(Some(f))
    }
}

/// `root/rel` if `rel` is a plain relative path whose existing parents
/// under `root` are real directories (no symlinks, no `..`).
fn safe_join(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    if rel.as_os_str().is_empty() {
        return None;
    }
    let mut path = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        let Component::Normal(name) = c else {
            return None;
        };
        path.push(name);
        if i + 1 < comps.len() {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => return None,
            }
        }
    }
    Some(path)
}

/// The virtio-console output: decodes frames and hands them to the session.
struct Sink {
    session: Arc<Mutex<Session>>,
    decoder: Decoder,
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.decoder.push(data);
        let mut session = lock(&self.session);
        loop {
            match self
                .decoder
                .next_frame()
                .and_then(|f| f.map(GuestMsg::parse).transpose())
            {
                Ok(Some(msg)) => session.handle(msg),
                Ok(None) => break,
                Err(e) => {
                    self.decoder.fail(e.clone());
                    if session.broken.is_none() {
                        session.broken =
                            Some(format!("the guest init sent a malformed message: {e}"));
                    }
                    break;
                }
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the stdin reader thread sends.
enum StdinChunk {
    Data(Vec<u8>),
    Eof,
}

/// Feeds the time and then host stdin to the guest, at the pace it takes
/// them: a thread reads stdin (any kind of file) into a small bounded
/// channel; this subscriber moves chunks into the console only while the
/// console's pending input is below its high-water mark.
struct StdinPump {
    console: Arc<Mutex<VirtioConsole>>,
    session: Arc<Mutex<Session>>,
    wake: EventFd,
    data_ready: EventFd,
    room: EventFd,
    chunks: Receiver<StdinChunk>,
    time_sent: bool,
    done: bool,
}

impl StdinPump {
    fn pump(&mut self) {
        if !self.time_sent {
            if !lock(&self.session).hello {
                return;
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let mut frame = Vec::new();
            HostMsg::Time {
                secs: now.as_secs(),
                nanos: now.subsec_nanos(),
            }
            .encode(&mut frame);
            lock(&self.console).queue_input(&frame);
            self.time_sent = true;
        }
        let mut console = lock(&self.console);
        while !self.done && console.pending_input() < INPUT_HIGH_WATER {
            let mut frame = Vec::new();
            match self.chunks.try_recv() {
                Ok(StdinChunk::Data(d)) => {
                    for part in d.chunks(MAX_PAYLOAD) {
                        HostMsg::Stdin(part.to_vec()).encode(&mut frame);
                    }
                }
                Ok(StdinChunk::Eof) | Err(TryRecvError::Disconnected) => {
                    HostMsg::StdinEof.encode(&mut frame);
                    self.done = true;
                }
                Err(TryRecvError::Empty) => break,
            }
            console.queue_input(&frame);
        }
    }
}

impl MutEventSubscriber for StdinPump {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in [&self.wake, &self.data_ready, &self.room] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("exec: cannot watch stdin events: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        for evt in [&self.wake, &self.data_ready, &self.room] {
            if events.fd() == std::os::fd::AsRawFd::as_raw_fd(evt) {
                let _ = evt.read();
            }
        }
        self.pump();
    }
}

/// Starts the thread that reads host stdin.
fn spawn_stdin_reader(ready: EventFd) -> io::Result<Receiver<StdinChunk>> {
    let (tx, rx): (SyncSender<StdinChunk>, _) = mpsc::sync_channel(8);
    let mut stdin = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => {
            // No usable stdin (e.g. closed): the command gets end of file.
            log::debug!("stdin unavailable ({e}); the command gets end of file");
            let _ = tx.send(StdinChunk::Eof);
            let _ = ready.write(1);
            return Ok(rx);
        }
    };
    std::thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                let chunk = match stdin.read(&mut buf) {
                    Ok(0) => StdinChunk::Eof,
                    Ok(n) => StdinChunk::Data(buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("cannot read stdin: {e}");
                        StdinChunk::Eof
                    }
                };
                let eof = matches!(chunk, StdinChunk::Eof);
                if tx.send(chunk).is_err() {
                    return;
                }
                let _ = ready.write(1);
                if eof {
                    return;
                }
            }
        })?;
    Ok(rx)
}

fn dup_file(fd: std::os::fd::BorrowedFd<'_>, what: &'static str) -> Result<File, Error> {
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|e| Error::Host(what, e))
}

/// Boots the VM, runs the command and returns how it ended.
pub fn run(mut config: ExecConfig) -> Result<Outcome, Error> {
    for e in &config.env {
        if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(Error::Usage(format!("--env '{e}': expected KEY=VALUE")));
        }
    }
    if !config.workdir.starts_with('/') {
        return Err(Error::Usage(format!(
            "--workdir '{}': must be an absolute guest path",
            config.workdir
        )));
    }
    config.vm.initramfs = Some(build_initramfs(&config)?);
    config.vm.cmdline = format!(
        "{} rdinit={} {}",
        EXEC_CMDLINE,
        exec_proto::INIT_PATH,
        config.vm.cmdline
    )
    .trim_end()
    .to_string();

    let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Host("eventfd", e))?;
    let session = Arc::new(Mutex::new(Session {
        started: config.started,
        timeout: config.timeout,
        boot_timeout: config.boot_timeout,
        hello: false,
        last_message: Instant::now(),
        exit: None,
        error: None,
        broken: None,
        copy_error: None,
        stdout: dup_file(io::stdout().as_fd(), "cannot duplicate stdout")?,
        stderr: dup_file(io::stderr().as_fd(), "cannot duplicate stderr")?,
        output_failed: false,
        shares: config
            .shares
            .iter()
            .map(|s| ShareBack {
                host: s.host.clone(),
                writable: s.writable,
            })
            .collect(),
        current_file: None,
        wake: wake.try_clone().map_err(|e| Error::Host("eventfd", e))?,
    }));
    let console = VirtioConsole::new(Box::new(Sink {
        session: session.clone(),
        decoder: Decoder::new(),
    }))
    .map_err(|e| Error::Host("cannot create the virtio console", e))?;
    let room = console
        .input_ready_evt()
        .try_clone()
        .map_err(|e| Error::Host("eventfd", e))?;
    let console = Arc::new(Mutex::new(console));
    let data_ready = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Host("eventfd", e))?;
    let chunks = spawn_stdin_reader(
        data_ready
            .try_clone()
            .map_err(|e| Error::Host("eventfd", e))?,
    )
    .map_err(|e| Error::Host("cannot start the stdin reader", e))?;
    let pump = StdinPump {
        console: console.clone(),
        session: session.clone(),
        wake,
        data_ready,
        room,
        chunks,
        time_sent: false,
        done: false,
    };

    let tail = ConsoleTail::default();
    let serial = Console {
        out: Box::new(tail.clone()),
        input: None,
        raw_terminal: false,
    };
    let extras = Extras {
        devices: vec![console],
        subscribers: vec![Arc::new(Mutex::new(pump))],
    };
    let vmm = builder::build_with(&config.vm, serial, extras)?;
    let end = vmm.run_with(TICK, || lock(&session).check())?;

    let session = lock(&session);
    let failed = |why: String| Outcome::GuestFailed(why, tail.lines(CONSOLE_TAIL_LINES));
    Ok(match (end, session.exit, &session.error) {
        (_, _, Some(e)) => Outcome::SetupFailed(e.clone()),
        (_, Some(status), _) => match &session.copy_error {
            Some(e) => Outcome::SetupFailed(e.clone()),
            None => Outcome::Exited(status),
        },
        (RunEnd::Host(Stop::TimedOut(t)), ..) => Outcome::TimedOut(t),
        (RunEnd::Host(Stop::Failed(why)), ..) => failed(why),
        (RunEnd::Host(Stop::Finished), ..) => failed("the guest init stopped".into()),
        (RunEnd::Guest(GuestExit::Panic), ..) => failed("the guest kernel panicked".into()),
        (RunEnd::Guest(GuestExit::Fault), ..) => {
            failed("the VM stopped on a vCPU fault (see the log above)".into())
        }
        (RunEnd::Guest(GuestExit::Stopped), ..) => Outcome::SetupFailed(format!(
            "stopped by {}",
            crate::signals::name(crate::signals::pending().unwrap_or(libc::SIGTERM))
        )),
        (RunEnd::Guest(_), ..) => failed(if session.hello {
            "the guest shut down before the command's exit status arrived".into()
        } else {
            "the guest shut down before capsule's init started".into()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse() {
        let s: Share = "/host/in:/in:ro".parse().unwrap();
        assert_eq!(
            s,
            Share {
                host: "/host/in".into(),
                guest: "/in".into(),
                writable: false
            }
        );
        let s: Share = "out:/work/out".parse().unwrap();
        assert!(s.writable);
        assert_eq!(s.host, PathBuf::from("out"));
        let s: Share = "out:/o:rw".parse().unwrap();
        assert!(s.writable);
        assert!("nocolon".parse::<Share>().is_err());
        assert!(":/x".parse::<Share>().is_err());
        assert!("h:relative".parse::<Share>().is_err());
        assert!("h:/a:b:ro".parse::<Share>().is_err());
    }

    #[test]
    fn safe_join_stays_inside() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = dir.as_path();
        fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        assert_eq!(safe_join(root, "d/f"), Some(root.join("d/f")));
        assert_eq!(safe_join(root, "f"), Some(root.join("f")));
        assert_eq!(safe_join(root, "../f"), None);
        assert_eq!(safe_join(root, "d/../../f"), None);
        assert_eq!(safe_join(root, "/etc/passwd"), None);
        assert_eq!(safe_join(root, "evil/passwd"), None);
        assert_eq!(safe_join(root, "missing/f"), None);
        assert_eq!(safe_join(root, ""), None);
    }

    fn session(shares: Vec<ShareBack>) -> Session {
        let null = || File::options().write(true).open("/dev/null").unwrap();
        Session {
            started: Instant::now(),
            timeout: None,
            boot_timeout: Duration::from_secs(60),
            hello: false,
            last_message: Instant::now(),
            exit: None,
            error: None,
            broken: None,
            copy_error: None,
            stdout: null(),
            stderr: null(),
            output_failed: false,
            shares,
            current_file: None,
            wake: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    #[test]
    fn copy_back_writes_only_inside_writable_shares() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = dir.as_path().to_path_buf();
        std::os::unix::fs::symlink("/etc/hostname", root.join("link")).unwrap();
        let s = Arc::new(Mutex::new(session(vec![
            ShareBack {
                host: root.clone(),
                writable: true,
            },
            ShareBack {
                host: root.clone(),
                writable: false,
            },
        ])));
        let mut sink = Sink {
            session: s.clone(),
            decoder: Decoder::new(),
        };
        let mut stream = Vec::new();
        let msgs = [
            GuestMsg::Hello {
                version: exec_proto::VERSION,
            },
            GuestMsg::Dir {
                share: 0,
                mode: 0o755,
                path: "sub".into(),
            },
            GuestMsg::File {
                share: 0,
                mode: 0o640,
                path: "sub/result.bin".into(),
            },
            GuestMsg::FileData(vec![1, 2, 3]),
            GuestMsg::FileData(vec![4]),
            // Hostile or not allowed: none of these may write anything.
            GuestMsg::File {
                share: 0,
                mode: 0o644,
                path: "../escape".into(),
            },
            GuestMsg::FileData(b"x".to_vec()),
            GuestMsg::File {
                share: 0,
                mode: 0o644,
                path: "link".into(),
            },
            GuestMsg::File {
                share: 1,
                mode: 0o644,
                path: "ro".into(),
            },
            GuestMsg::File {
                share: 7,
                mode: 0o644,
                path: "nope".into(),
            },
            GuestMsg::Exit(42),
        ];
        for m in &msgs {
            m.encode(&mut stream);
        }
        for chunk in stream.chunks(3) {
            sink.write_all(chunk).unwrap();
        }
        let s = lock(&s);
        assert_eq!(s.exit, Some(42));
        assert!(s.copy_error.is_some());
        assert_eq!(fs::read(root.join("sub/result.bin")).unwrap(), [1, 2, 3, 4]);
        assert!(!dir.as_path().parent().unwrap().join("escape").exists());
        assert!(!root.join("ro").exists());
        assert!(!root.join("nope").exists());
        assert!(fs::symlink_metadata(root.join("link"))
            .unwrap()
            .is_symlink());
    }

    #[test]
    fn malformed_stream_breaks_the_session() {
        let s = Arc::new(Mutex::new(session(vec![])));
        let mut sink = Sink {
            session: s.clone(),
            decoder: Decoder::new(),
        };
        sink.write_all(&[0x7e, 0, 0, 0, 0]).unwrap();
        sink.write_all(&[0x02, 1, 0, 0, 0, b'x']).unwrap();
        let s = lock(&s);
        assert!(matches!(s.check(), Some(Stop::Failed(_))));
    }

    #[test]
    fn deadlines() {
        let mut s = session(vec![]);
        assert!(s.check().is_none());
        s.boot_timeout = Duration::ZERO;
        assert!(matches!(s.check(), Some(Stop::Failed(m)) if m.contains("init")));
        s.hello = true;
        s.timeout = Some(Duration::ZERO);
        assert!(matches!(s.check(), Some(Stop::TimedOut(_))));
        s.timeout = None;
        s.last_message = Instant::now() - STALL_TIMEOUT;
        assert!(matches!(s.check(), Some(Stop::Failed(m)) if m.contains("stopped responding")));
        s.exit = Some(0);
        assert!(matches!(s.check(), Some(Stop::Finished)));
    }

    #[test]
    fn stdin_waits_for_hello_then_time_then_flows_with_back_pressure() {
        let s = Arc::new(Mutex::new(session(vec![])));
        let console = Arc::new(Mutex::new(
            VirtioConsole::new(Box::new(io::sink())).unwrap(),
        ));
        let (tx, rx) = mpsc::sync_channel(8);
        let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
        let mut pump = StdinPump {
            console: console.clone(),
            session: s.clone(),
            wake: evt(),
            data_ready: evt(),
            room: evt(),
            chunks: rx,
            time_sent: false,
            done: false,
        };
        tx.send(StdinChunk::Data(b"early".to_vec())).unwrap();
        pump.pump();
        // Nothing before the init said hello (the console is not active,
        // so queued input stays pending and can be inspected).
        assert_eq!(lock(&console).pending_input(), 0);
        lock(&s).hello = true;
        pump.pump();
        // The time frame (5 + 12 bytes), then stdin (5 + 5 bytes).
        assert_eq!(lock(&console).pending_input(), 17 + 10);
        // Above the high-water mark the channel is no longer drained.
        tx.send(StdinChunk::Data(vec![0; INPUT_HIGH_WATER]))
            .unwrap();
        pump.pump();
        let high = lock(&console).pending_input();
        assert_eq!(
            high,
            27 + INPUT_HIGH_WATER + 5 * INPUT_HIGH_WATER.div_ceil(MAX_PAYLOAD)
        );
        tx.send(StdinChunk::Eof).unwrap();
        pump.pump();
        assert_eq!(lock(&console).pending_input(), high);
        assert!(!pump.done);
    }

    #[test]
    fn initramfs_has_init_and_config() {
        let config = ExecConfig {
            vm: VmConfig {
                kernel: "k".into(),
                initrd: None,
                initramfs: None,
                cmdline: String::new(),
                vcpus: 1,
                mem_size: 256 << 20,
                kvm_path: "/dev/kvm".into(),
                disks: vec![],
                nets: vec![],
            },
            rootfs: None,
            shares: vec![],
            env: vec!["A=b".into()],
            workdir: "/".into(),
            argv: vec!["true".into()],
            timeout: None,
            boot_timeout: Duration::from_secs(60),
            started: Instant::now(),
        };
        let a = build_initramfs(&config).unwrap();
        assert!(a.len() > INIT_BINARY.len());
        let find = |needle: &[u8]| a.windows(needle.len()).any(|w| w == needle);
        assert!(find(b".capsule/init\0"));
        assert!(find(b"arg=true\0env=A=b\0"));
        assert!(find(b"dev/console\0"));
    }
}
