//! The Firecracker-compatible HTTP API on a Unix socket, and the VMM loop
//! that serves it.
//!
//! Threads: the API thread ([`server::serve`]) owns the socket and the
//! HTTP side; the VMM thread (the caller of [`run`]) owns the
//! [`controller::Controller`] and the VM's event loop. Requests cross over
//! a channel; an eventfd in the event loop wakes the VMM thread, which
//! answers each request after it took effect.

pub mod action;
pub mod balloon;
pub mod controller;
pub mod http;
pub mod metrics;
pub mod mmds;
pub mod resources;
pub mod server;
pub mod snapshot;
pub mod types;

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::exit::GuestExit;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::Console;
use crate::vmm::{RunEnd, Vmm};
use action::{VmmAction, VmmActionError};
use controller::Controller;
use server::Call;

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path is taken (a live server, a file that is not a
    /// stale socket), or binding failed.
    #[error("cannot serve the API on {path}: {why}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        why: crate::unixsock::BindError,
    },
    /// The configuration file could not be used.
    #[error(transparent)]
    Config(VmmActionError),
    /// The VM could not be started from the configuration file or the
    /// command line.
    #[error(transparent)]
    Start(VmmActionError),
    /// The eventfd that wakes the VMM thread could not be created.
    #[error("cannot create the API's wake-up eventfd: {0}")]
    Wake(#[source] std::io::Error),
    /// The API thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Neither a VM to start nor an API to configure one.
    #[error("no configuration and no API")]
    NothingToRun,
    /// The API thread ended before the VM was started.
    #[error("the API thread ended")]
    ApiGone,
    /// The VM's event loop failed.
    #[error(transparent)]
    Run(#[from] crate::builder::Error),
}

/// Why a `--config-file` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("invalid configuration {}: {source}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// How [`run`] runs.
pub struct Options {
    /// Serve the API here (`--api-sock`).
    pub api_sock: Option<PathBuf>,
    /// Configuration to apply and boot at once (`--config-file`).
    pub config: Option<types::FullVmConfig>,
    /// Instance id (`GET /`).
    pub id: String,
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// The guest console.
    pub console: Console,
    /// A VM configured on the command line, started at once.
    pub vm: Option<crate::config::VmConfig>,
    /// A snapshot to restore at once (`run --restore`).
    pub restore: Option<crate::snapshot::restore::RestoreConfig>,
    /// Called once the VM is running.
    pub on_started: Option<Box<dyn FnOnce()>>,
    /// Actions applied first, before the configuration file (the
    /// Firecracker command line's logger and metrics options).
    pub setup: Vec<VmmAction>,
    /// The virtio transport of a VM whose machine configuration (from
    /// the file or the API) names none (`--transport`).
    pub transport: Option<crate::config::Transport>,
}

/// Reads a Firecracker configuration file.
pub fn read_config_file(path: &Path) -> Result<types::FullVmConfig, ConfigFileError> {
    let text = crate::hostfile::read_regular(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| ConfigFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Binds the API socket (mode 0600). A leftover socket file that nobody
/// listens on is replaced; a live one, or any other kind of file, is an
/// error (see [`crate::unixsock`]). The file is removed when the returned
/// guard is dropped.
pub fn bind(path: &Path) -> Result<(UnixListener, crate::unixsock::SocketFile), Error> {
    crate::unixsock::bind(path).map_err(|why| Error::Socket {
        path: path.to_path_buf(),
        why,
    })
}

/// Wakes the event loop when API requests are waiting.
struct Waker(Arc<EventFd>);

impl MutEventSubscriber for Waker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            log::error!("API: cannot watch for requests: {e}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// How often the VMM loop looks at the API channel while the VM runs (a
/// request also wakes it at once).
const TICK: Duration = Duration::from_millis(200);

/// Runs a VM configured over the API, from a configuration file and/or on
/// the command line; returns how the guest ended it. All three reach the
/// VM through the same typed actions of [`Controller::handle`].
pub fn run(mut opts: Options) -> Result<GuestExit, Error> {
    let wake = Arc::new(devices::eventfd().map_err(Error::Wake)?);
    let _socket_file;
    let rx: Option<Receiver<Call>> = match &opts.api_sock {
        Some(path) => {
            let (rx, file) = start_api(path, &wake)?;
            _socket_file = file;
            Some(rx)
        }
        None => None,
    };
    let on_started = opts.on_started.take();
    let mut ctl = configured(opts)?;
    let mut vmm = match ctl.take_started() {
        Some(vmm) => vmm,
        None => match wait_for_start(&mut ctl, rx.as_ref(), &wake)? {
            Some(vmm) => vmm,
            // The socket file (and a named VM's runtime directory) go as
            // this returns; main then dies of the signal.
            None => return Ok(GuestExit::Stopped),
        },
    };
    vmm.add_subscriber(Arc::new(Mutex::new(Waker(wake))));
    if let Some(f) = on_started {
        f();
    }
    run_started(&mut ctl, vmm, rx.as_ref())
}

/// Binds the API socket at `path` and starts the API thread serving it;
/// returns the channel its calls come on and the socket file's guard.
fn start_api(
    path: &Path,
    wake: &Arc<EventFd>,
) -> Result<(Receiver<Call>, crate::unixsock::SocketFile), Error> {
    let (tx, rx) = channel::<Call>();
    let (listener, file) = bind(path)?;
    // The socket file is removed when the VM ends.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::landlock::allow(dir, crate::landlock::Reach::RemoveEntries);
    }
    let wake = wake.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Confined before it reads the first request.
            if let Err(e) = crate::confine::helper_thread(crate::seccomp::ThreadKind::Api) {
                log::error!("API: {e}");
                return;
            }
            crate::seccomp::test_forbidden_call("api");
            server::serve(listener, tx, wake)
        })
        .map_err(Error::Thread)?;
    log::info!(
        "API ready on {}, {:.1} ms after capsule started",
        path.display(),
        crate::process_start().elapsed().as_secs_f64() * 1000.0
    );
    Ok((rx, file))
}

/// The controller of `opts`' VM: the command line's setup actions
/// applied, then the VM started if the configuration file or the command
/// line describe one, or restored if the command line names a snapshot.
fn configured(mut opts: Options) -> Result<Controller, Error> {
    let mut ctl = Controller::new(opts.id, opts.kvm_path, opts.console);
    if let Some(t) = opts.transport {
        ctl.set_default_transport(t);
    }
    for action in std::mem::take(&mut opts.setup) {
        ctl.handle(action, None).map_err(Error::Config)?;
    }
    let config = opts.config.take();
    let direct = opts.vm.take();
    if config.is_some() || direct.is_some() {
        if let Some(config) = config {
            ctl.apply_config(config).map_err(Error::Config)?;
        }
        if let Some(vm) = direct {
            ctl.set_direct(vm);
        }
        let start = VmmAction::Action(types::ActionType::InstanceStart);
        ctl.handle(start, None).map_err(Error::Start)?;
    } else if let Some(cfg) = opts.restore.take() {
        ctl.restore_direct(&cfg).map_err(Error::Start)?;
    }
    Ok(ctl)
}

/// Runs the started VM until the guest ends it, answering API calls
/// between rounds of its event loop, then writes a last metrics line.
fn run_started(
    ctl: &mut Controller,
    vmm: Vmm,
    rx: Option<&Receiver<Call>>,
) -> Result<GuestExit, Error> {
    // Without an API nothing but the guest ends the VM: each round waits
    // for events as long as it takes.
    let tick = rx.map(|_| TICK);
    let end = vmm.run(tick, |vmm| {
        serve_running(ctl, vmm, rx);
        None::<Infallible>
    })?;
    // As Firecracker does, a last metrics line when the VM ends.
    if let Err(e) = metrics::flush_if_configured() {
        log::warn!("{e}");
    }
    match end {
        RunEnd::Guest(exit) => Ok(exit),
    }
}

/// Serves API calls until one starts the VM; returns it, or `None` if a
/// termination signal (SIGTERM, SIGINT, SIGHUP) came first. Such a signal
/// used to kill capsule where it stood, leaving the API socket file and a
/// named VM's runtime directory behind; now it ends the wait in order.
fn wait_for_start(
    ctl: &mut Controller,
    rx: Option<&Receiver<Call>>,
    calls: &EventFd,
) -> Result<Option<Vmm>, Error> {
    let rx = rx.ok_or(Error::NothingToRun)?;
    let stop = devices::eventfd().map_err(Error::Wake)?;
    let _signal_wake = crate::signals::wake_on_signal(&stop);
    loop {
        if let Some(sig) = crate::signals::pending() {
            log::info!(
                "{} before the VM started: stopping",
                crate::signals::name(sig)
            );
            return Ok(None);
        }
        let call = match rx.try_recv() {
            Ok(call) => call,
            Err(TryRecvError::Disconnected) => return Err(Error::ApiGone),
            Err(TryRecvError::Empty) => {
                wait_readable(calls, &stop).map_err(Error::Wake)?;
                continue;
            }
        };
        let reply = ctl.handle(call.request, None);
        let started = ctl.take_started();
        if started.is_some() {
            log::info!("API: InstanceStart done");
        }
        let _ = call.reply.send(reply);
        if started.is_some() {
            return Ok(started);
        }
    }
}

/// Blocks until `calls` (the API thread's "a call is queued") or `stop`
/// (a termination signal) is readable, or for a second (so an API thread
/// that ended is noticed: its channel is then disconnected), and consumes
/// `calls`' count. The API thread queues a call before it writes the
/// eventfd, so the caller's next look at the channel finds every call the
/// count stood for.
fn wait_readable(calls: &EventFd, stop: &EventFd) -> std::io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: calls.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll(2) on two pollfd structs that live across the call,
    // with their count; it writes only their `revents`.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(())
        } else {
            Err(e)
        };
    }
    if fds[0].revents & libc::POLLIN != 0 {
        let _ = calls.read();
    }
    Ok(())
}

/// Answers the API calls waiting for the running VM.
fn serve_running(ctl: &mut Controller, vmm: &mut Vmm, rx: Option<&Receiver<Call>>) {
    let Some(rx) = rx else { return };
    while let Ok(call) = rx.try_recv() {
        let _ = call.reply.send(ctl.handle(call.request, Some(vmm)));
    }
}
