//! `capsule exec`: run one command in a fresh VM and hand back its output
//! and exit status.
//!
//! The pieces, one file each:
//!
//! * `initramfs.rs`: a cpio archive ([`cpio`]) generated here with the
//!   embedded guest init (`capsule-init`, built from `guest-init/` by
//!   `build.rs`), the command description, the `--rootfs` tree and the
//!   `--share` directories. The kernel runs the init with `rdinit=`.
//! * The channel is a vsock stream: the VM gets a virtio-vsock device
//!   whose sockets live in a private directory (`link.rs`), the init
//!   connects to host port [`exec_proto::VSOCK_PORT`] and speaks the framed
//!   protocol of the `exec-proto` crate; `link.rs`'s `VsockLink` accepts
//!   the connection, decodes guest → host frames with `session.rs`'s
//!   `Sink` and sends the time and stdin. `CAPSULE_EXEC_CHANNEL=console`
//!   selects the fallback for kernels without vsock instead: a
//!   virtio-console port, `/dev/hvc0`, fed by `stdin.rs`'s `StdinPump`
//!   (the same frames, far slower: one page per round trip).
//! * The serial console stays the kernel console (`quiet`), captured in a
//!   [`ConsoleTail`] whose last lines are shown when the guest fails.
//! * `session.rs`'s `Session` holds what the guest reported; the VMM's run
//!   loop asks `Session::check` whether to stop: command finished, init
//!   error, `--timeout`, no boot, or no heartbeat (a stuck guest).
//! * `copyback.rs`: in copy mode (no virtiofsd), what the command wrote in
//!   a writable share comes back into the share's host directory, and
//!   nowhere else. With a virtiofsd, shares are live virtio-fs mounts
//!   instead (nothing copied, deletions and renames seen both ways), and
//!   `--host-root` boots on the host's `/` over virtio-fs.
//! * `share.rs`: `--share` and `--tmpfs` as given; `files.rs`: the
//!   shared single files (hard links or copies in private directories
//!   shared over virtio-fs, bound over their guest paths by the init).
//! * `modules.rs`: kernel modules a distribution kernel needs, packed into
//!   the initramfs and loaded by the init first.
//! * `prepare.rs`: before the VM is built, the environment and working
//!   directory checked, live shares or copies decided (`--share`,
//!   `--host-root`, `--fs-root`), the initramfs and command line made.
//! * `warm.rs`: the warm path, a template guest snapshotted where its init
//!   waits for a command (`--make-snapshot DIR`) and each command run in
//!   a clone of it (`--snapshot DIR`).
//!
//! This file holds the arguments ([`ExecConfig`]) and [`run`]:
//! prepare, wire the session, boot, map the end to an [`Outcome`].

mod copyback;
pub mod cpio;
mod files;
mod forward;
mod initramfs;
mod link;
pub mod modules;
mod netcfg;
mod prepare;
mod session;
mod share;
mod stdin;
pub mod warm;

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::exit::GuestExit;
use devices::virtio::console::Console as VirtioConsole;
use exec_proto::Decoder;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{self, Console, Extras};
use crate::config::VmConfig;
use crate::vmm::RunEnd;

pub use self::netcfg::Error as UserNetError;
pub use self::netcfg::{ExecNet, TapIpv4};
pub use self::share::{Share, Tmpfs};

use self::copyback::ShareBack;
use self::cpio::CpioError;
pub use self::initramfs::build_initramfs;
pub use self::session::ConsoleTail;
use self::session::{EndWatch, Session, Sink, Stop};
use self::stdin::{spawn_stdin_reader, StdinPump};

/// Kernel command line of an exec guest (before `--append`).
pub const EXEC_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1";
/// Without a message from the guest for this long, it is taken as stuck
/// (its init sends a heartbeat every second).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the kernel console shown when the guest fails.
pub const CONSOLE_TAIL_LINES: usize = 30;
/// `--stop-timeout`'s default: as `docker stop`'s.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the run loop checks deadlines.
const TICK: Duration = Duration::from_millis(100);
/// Bytes of kernel console kept.
pub(super) const CONSOLE_KEEP: usize = 16 * 1024;
/// Host stdin read size.
pub(super) const STDIN_CHUNK: usize = 64 * 1024;

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
    /// The command, environment or a module name cannot be passed to the
    /// guest init (a NUL byte, a '/').
    #[error("{0}")]
    Spec(#[from] exec_proto::SpecError),
    /// `--modules`: the tree's `modules.dep` could not be read.
    #[error("--modules {}: cannot read modules.dep: {source}", .dir.display())]
    ModuleDeps {
        /// The module tree.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A kernel module could not be read.
    #[error("cannot read kernel module {}: {source}", .path.display())]
    Module {
        /// The module file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `--net user` cannot be configured on this host.
    #[error(transparent)]
    UserNet(#[from] UserNetError),
    /// Setting up host-side plumbing failed.
    #[error("{0}: {1}")]
    Host(&'static str, #[source] io::Error),
    /// An exec template could not be written or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Kernel, initrd, vCPUs, memory, KVM device; `disks` holds `--disk`.
    pub vm: VmConfig,
    /// The static IPv4 configuration of `vm.nets[i]` (`--net
    /// tap=NAME,ip=...`), by index; missing or `None`: none.
    pub net_ipv4: Vec<Option<TapIpv4>>,
    /// Host directory packed as the guest's root.
    pub rootfs: Option<PathBuf>,
    /// Shared directories, and files (`--share` takes both; `prepare`
    /// moves the files to [`Self::files`]).
    pub shares: Vec<Share>,
    /// Shared single files, bound over their guest path (from `shares`).
    pub files: Vec<Share>,
    /// tmpfs mounts in the guest.
    pub tmpfs: Vec<Tmpfs>,
    /// Boot on the host's `/` (read-only over virtio-fs, tmpfs overlay),
    /// with the current directory shared writable.
    pub host_root: bool,
    /// The command's root: this host directory, live and writable over
    /// virtio-fs (`--fs-root`; what the containerd shim uses for a
    /// container's rootfs).
    pub fs_root: Option<PathBuf>,
    /// A `/lib/modules/RELEASE` tree to load modules from.
    pub modules: Option<PathBuf>,
    /// Environment, `K=V`.
    pub env: Vec<String>,
    /// Working directory in the guest.
    pub workdir: String,
    /// Program and arguments (none: an exec template's, whose init
    /// awaits each clone's command).
    pub argv: Vec<OsString>,
    /// Kill the VM after this long.
    pub timeout: Option<Duration>,
    /// After a forwarded SIGTERM, SIGINT, SIGHUP or SIGQUIT, stop the VM
    /// if the command has not ended within this long (`None`: wait for
    /// it).
    pub stop_timeout: Option<Duration>,
    /// Give up if the guest init has not said hello after this long.
    pub boot_timeout: Duration,
    /// The vsock device's host socket at this path rather than in the
    /// private directory (`--vsock-socket`): the containerd shim connects
    /// there (`CONNECT 10001`) to run more processes in the guest. The
    /// session's listener is then `PATH_10000`, beside it.
    pub vsock_socket: Option<PathBuf>,
    /// Run the command on a pseudo-terminal in the guest (`--tty`): its
    /// stdin, stdout and stderr, sized as capsule's stdin's terminal
    /// (24x80 if it is none) and resized at each SIGWINCH; capsule's
    /// terminal is raw meanwhile.
    pub tty: bool,
    /// Run the command as this user (`--user`; root when `None`).
    pub user: Option<exec_proto::User>,
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

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dup_file(fd: std::os::fd::BorrowedFd<'_>, what: &'static str) -> Result<File, Error> {
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|e| Error::Host(what, e))
}

/// The command's output, where capsule writes it: a pipe is widened to
/// [`OUTPUT_PIPE_SIZE`] (Linux's limit for unprivileged users), so
/// capsule's event loop, which also runs the devices, rarely waits for
/// a reader that takes little at a time (busybox `wc` reads 4 KiB).
fn output_file(fd: std::os::fd::BorrowedFd<'_>, what: &'static str) -> Result<File, Error> {
    let f = dup_file(fd, what)?;
    if f.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        // SAFETY: F_SETPIPE_SZ takes an int, no pointers; on failure (a
        // size over the user's limit) the pipe keeps its size.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, OUTPUT_PIPE_SIZE) };
    }
    Ok(f)
}

/// See [`output_file`]: 1 MiB, `/proc/sys/fs/pipe-max-size`'s default.
const OUTPUT_PIPE_SIZE: libc::c_int = 1 << 20;

/// The guest's CID in an exec VM.
const EXEC_GUEST_CID: u64 = 3;

/// How the init and capsule talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    /// A vsock stream (the default).
    Vsock,
    /// A virtio-console port (`CAPSULE_EXEC_CHANNEL=console`): the
    /// fallback for a kernel without vsock, one page per round trip.
    Console,
}

impl Channel {
    fn from_env() -> Result<Self, Error> {
        match std::env::var("CAPSULE_EXEC_CHANNEL").as_deref() {
            Err(_) | Ok("vsock") => Ok(Self::Vsock),
            Ok("console") => Ok(Self::Console),
            Ok(other) => Err(Error::Usage(format!(
                "CAPSULE_EXEC_CHANNEL='{other}': expected vsock or console"
            ))),
        }
    }
}

/// Boots the VM, runs the command and returns how it ended.
pub fn run(mut config: ExecConfig) -> Result<Outcome, Error> {
    let channel = Channel::from_env()?;
    if channel == Channel::Console && config.vsock_socket.is_some() {
        return Err(Error::Usage(
            "--vsock-socket needs the vsock channel (CAPSULE_EXEC_CHANNEL=console gives the VM no vsock device)".into(),
        ));
    }
    // A host without usable KVM is told so at once, not after the shares
    // were packed (a CI job without KVM fails in a second).
    drop(
        crate::vstate::vm::Vm::open_kvm(&config.vm.kvm_path)
            .map_err(|e| Error::Vm(builder::Error::from(e)))?,
    );
    // Kept until the VM is gone: the directories of the shared files.
    let _file_stages = prepare::prepare(&mut config, channel)?;
    // Copy-back writes into the writable shares after setup.
    for s in config.shares.iter().filter(|s| s.writable) {
        crate::landlock::allow(&s.host, crate::landlock::Reach::ReadWrite);
    }
    let wake = devices::eventfd().map_err(|e| Error::Host("eventfd", e))?;
    let session = Arc::new(Mutex::new(new_session(&config, &wake)?));
    let _forwarding = forward::start(&mut lock(&session), &wake)?;
    let tail = ConsoleTail::default();
    let serial = Console {
        out: Box::new(tail.clone()),
        input: None,
        // With --tty the keys go to the guest's terminal as they are.
        raw_terminal: config.tty,
    };
    // Kept until the VM is gone: the sockets' directory and listener.
    let mut _sockets = None;
    // Stopped and joined when dropped (below, or on an early return).
    let mut link_thread = None;
    let extras = match channel {
        Channel::Console => {
            let (console, pump) = console_and_pump(&session, wake)?;
            Extras {
                devices: vec![console],
                subscribers: vec![Arc::new(Mutex::new(pump))],
            }
        }
        Channel::Vsock => {
            let (link, dir, file) = vsock_link(&mut config, &session, wake)?;
            _sockets = Some((file, dir));
            link_thread = Some(
                link::LinkThread::spawn(link)
                    .map_err(|e| Error::Host("cannot start the session's thread", e))?,
            );
            let ended = lock(&session)
                .ended
                .try_clone()
                .map_err(|e| Error::Host("eventfd", e))?;
            Extras {
                devices: vec![],
                subscribers: vec![Arc::new(Mutex::new(EndWatch(ended)))],
            }
        }
    };
    let vmm = builder::build_with(&config.vm, serial, extras)?;
    let end = vmm.run(Some(TICK), |vmm| check(vmm, &session));
    // The session's decoding ends with the VM: nothing is written after
    // the outcome is known.
    drop(link_thread);
    let end = end?;
    let session = lock(&session);
    Ok(match outcome(end, &session, &tail) {
        // The init never spoke: the usual cause is a kernel that cannot
        // see capsule's devices; say so when its configuration tells.
        Outcome::GuestFailed(why, lines) if !session.hello => {
            let modules = config.modules.is_some() || config.host_root;
            let console = channel == Channel::Console;
            match crate::doctor::exec_kernel_problem(&config.vm.kernel, console, modules) {
                Some(problem) => Outcome::GuestFailed(format!("{why}; {problem}"), lines),
                None => Outcome::GuestFailed(why, lines),
            }
        }
        other => other,
    })
}

/// The session's check, once per run-loop round ([`log_if_quiet`]).
fn check(vmm: &mut crate::vmm::Vmm, session: &Mutex<Session>) -> Option<Stop> {
    let stop = lock(session).check();
    log_if_quiet(vmm, stop)
}

/// `stop`, after logging the guest's state if it went quiet
/// ([`crate::stall`]); called without the session's lock held.
fn log_if_quiet(vmm: &mut crate::vmm::Vmm, stop: Option<Stop>) -> Option<Stop> {
    if let Some(Stop::Quiet(why)) = &stop {
        log::info!("{why}; the guest's state follows");
        crate::stall::log_quiet_guest(vmm);
    }
    stop
}

/// The session's vsock link: a private directory for the device's
/// socket and for the listener of the init's port (bound now, so the
/// init's connection cannot come too early), and the VM's vsock device.
/// With `--vsock-socket PATH`, both sockets are at PATH and PATH_10000
/// instead (removed at the end like the device's own socket) and there is
/// no private directory.
fn vsock_link(
    config: &mut ExecConfig,
    session: &Arc<Mutex<Session>>,
    wake: EventFd,
) -> Result<
    (
        link::VsockLink,
        Option<link::PrivateDir>,
        crate::unixsock::SocketFile,
    ),
    Error,
> {
    let (dir, uds) = match &config.vsock_socket {
        Some(path) => (None, path.clone()),
        None => {
            let dir = link::PrivateDir::new()
                .map_err(|e| Error::Host("cannot create a directory for the vsock sockets", e))?;
            let uds = dir.join("vsock");
            (Some(dir), uds)
        }
    };
    let port = link::port_path(&uds, exec_proto::VSOCK_PORT);
    let (listener, file) = crate::unixsock::bind(&port)
        .map_err(|why| Error::Host("cannot bind the session's socket", io::Error::other(why)))?;
    config.vm.vsock = Some(crate::config::VsockConfig {
        guest_cid: EXEC_GUEST_CID,
        uds_path: uds,
    });
    let data_ready = devices::eventfd().map_err(|e| Error::Host("eventfd", e))?;
    let chunks = spawn_stdin_reader(
        data_ready
            .try_clone()
            .map_err(|e| Error::Host("eventfd", e))?,
    )
    .map_err(|e| Error::Host("cannot start the stdin reader", e))?;
    let sink = Sink {
        session: session.clone(),
        decoder: Decoder::new(),
    };
    let link = link::VsockLink::new(listener, sink, session.clone(), wake, data_ready, chunks)
        .map_err(|e| Error::Host("cannot set up the session's socket", e))?;
    Ok((link, dir, file))
}

/// A session that has heard nothing yet, writing to capsule's stdout and
/// stderr; `wake` is signalled when the init says hello.
fn new_session(config: &ExecConfig, wake: &EventFd) -> Result<Session, Error> {
    Ok(Session {
        started: config.started,
        timeout: config.timeout,
        boot_timeout: config.boot_timeout,
        hello: false,
        last_message: Instant::now(),
        last_check: Instant::now(),
        exit: None,
        error: None,
        broken: None,
        copy_error: None,
        stdout: output_file(io::stdout().as_fd(), "cannot duplicate stdout")?,
        stderr: output_file(io::stderr().as_fd(), "cannot duplicate stderr")?,
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
        ended: devices::eventfd().map_err(|e| Error::Host("eventfd", e))?,
        forwarding: false,
        command_running: false,
        stop_timeout: config.stop_timeout,
        stop_deadline: None,
        tty: config.tty,
        tty_sized: false,
    })
}

/// The virtio console whose output feeds `session`, and the pump that
/// feeds it host stdin once `wake` says the init is up.
fn console_and_pump(
    session: &Arc<Mutex<Session>>,
    wake: EventFd,
) -> Result<(Arc<Mutex<VirtioConsole>>, StdinPump), Error> {
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
    let data_ready = devices::eventfd().map_err(|e| Error::Host("eventfd", e))?;
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
    Ok((console, pump))
}

/// How the exec ended, from how the run loop ended and what the guest
/// reported.
fn outcome(end: RunEnd<Stop>, session: &Session, tail: &ConsoleTail) -> Outcome {
    let failed = |why: String| Outcome::GuestFailed(why, tail.lines(CONSOLE_TAIL_LINES));
    match (end, session.exit, &session.error) {
        (_, _, Some(e)) => Outcome::SetupFailed(e.clone()),
        (_, Some(status), _) => match &session.copy_error {
            Some(e) => Outcome::SetupFailed(e.clone()),
            None => Outcome::Exited(status),
        },
        (RunEnd::Host(Stop::TimedOut(t)), ..) => Outcome::TimedOut(t),
        (RunEnd::Host(Stop::Unanswered(sig, t)), ..) => Outcome::SetupFailed(format!(
            "the command did not end within {} s of {}: the VM was stopped",
            t.as_secs_f64(),
            crate::signals::name(sig)
        )),
        (RunEnd::Host(Stop::Failed(why) | Stop::Quiet(why)), ..) => failed(why),
        (RunEnd::Host(Stop::Finished), ..) => failed("the guest init stopped".into()),
        (RunEnd::Guest(GuestExit::Panic), ..) => failed("the guest kernel panicked".into()),
        (RunEnd::Guest(GuestExit::Fault), ..) => {
            failed("the VM stopped on a vCPU fault (see the log above)".into())
        }
        (RunEnd::Guest(GuestExit::Stopped), ..) => Outcome::SetupFailed(format!(
            "stopped by {}",
            crate::signals::name(crate::signals::pending().unwrap_or(libc::SIGTERM))
        )),
        (RunEnd::Guest(how), ..) => {
            // A reset (a triple fault, or a reboot the command asked for)
            // reads differently from a power-off: it is rarely the
            // command's own doing, and the log above names the fault.
            let what = if how == GuestExit::Reset {
                "the guest reset"
            } else {
                "the guest shut down"
            };
            failed(if session.hello {
                format!("{what} before the command's exit status arrived")
            } else {
                format!("{what} before capsule's init started")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain configuration for the tests of this module and its
    /// children: `true` in `/`, no shares, no root of its own.
    pub(super) fn exec_config() -> ExecConfig {
        ExecConfig {
            vm: VmConfig {
                mem_size: 256 << 20,
                ..VmConfig::bare("/k")
            },
            net_ipv4: vec![],
            rootfs: None,
            shares: vec![],
            files: vec![],
            tmpfs: vec![],
            host_root: false,
            fs_root: None,
            modules: None,
            env: vec![],
            workdir: "/".into(),
            argv: vec!["true".into()],
            timeout: None,
            stop_timeout: Some(DEFAULT_STOP_TIMEOUT),
            boot_timeout: Duration::from_secs(60),
            vsock_socket: None,
            tty: false,
            user: None,
            started: Instant::now(),
        }
    }
}
