//! The Firecracker-compatible HTTP API on a Unix socket, and the VMM loop
//! that serves it.
//!
//! Threads: the API thread ([`server::serve`]) owns the socket and the
//! HTTP side; the VMM thread (the caller of [`run`]) owns the
//! [`controller::Controller`] and the VM's event loop. Requests cross over
//! a channel; an eventfd in the event loop wakes the VMM thread, which
//! answers each request after it took effect.

pub mod controller;
pub mod http;
pub mod server;
pub mod types;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::exit::GuestExit;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::builder::Console;
use controller::{Controller, Effect, Request, State};
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
        why: String,
    },
    /// The configuration file could not be used.
    #[error("{0}")]
    Config(String),
    /// The VM could not be started from the configuration file.
    #[error("{0}")]
    Start(String),
    /// The event loop or the API thread failed.
    #[error("{0}")]
    Vmm(String),
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
    /// Called once the VM is running.
    pub on_started: Option<Box<dyn FnOnce()>>,
}

/// Reads a Firecracker configuration file.
pub fn read_config_file(path: &Path) -> Result<types::FullVmConfig, String> {
    let text = crate::hostfile::read_regular(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("invalid configuration {}: {e}", path.display()))
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

/// Runs a VM configured over the API and/or from a configuration file;
/// returns how the guest ended it.
pub fn run(mut opts: Options) -> Result<GuestExit, Error> {
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Vmm(e.to_string()))?);
    let (tx, rx) = channel::<Call>();
    let _socket_file;
    let rx: Option<Receiver<Call>> = match &opts.api_sock {
        Some(path) => {
            let (listener, file) = bind(path)?;
            _socket_file = file;
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || server::serve(listener, tx, wake))
                .map_err(|e| Error::Vmm(format!("cannot start the API thread: {e}")))?;
            log::info!(
                "API ready on {}, {:.1} ms after capsule started",
                path.display(),
                crate::process_start().elapsed().as_secs_f64() * 1000.0
            );
            Some(rx)
        }
        None => {
            drop(tx);
            None
        }
    };
    let mut ctl = Controller::new(opts.id.clone(), opts.kvm_path.clone(), opts.console);
    let config = opts.config.take();
    let direct = opts.vm.take();
    if config.is_some() || direct.is_some() {
        if let Some(config) = config {
            ctl.apply_config(config).map_err(Error::Config)?;
        }
        if let Some(vm) = direct {
            ctl.set_direct(vm);
        }
        let (resp, _) = ctl.handle(Request::Action(types::ActionType::InstanceStart));
        if resp.status >= 300 {
            let msg = resp
                .body
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["fault_message"].as_str().map(str::to_string))
                .unwrap_or_default();
            return Err(Error::Start(msg));
        }
    }
    let mut on_started = opts.on_started.take();
    let mut waker_added = false;
    loop {
        if ctl.state() != State::NotStarted && !waker_added {
            if let Some(vmm) = ctl.vmm_mut() {
                vmm.add_subscriber(Arc::new(Mutex::new(Waker(wake.clone()))));
                waker_added = true;
            }
            if let Some(f) = on_started.take() {
                f();
            }
        }
        if ctl.state() == State::NotStarted {
            let Some(rx) = &rx else {
                return Err(Error::Vmm("no configuration and no API".to_string()));
            };
            let call = rx
                .recv()
                .map_err(|_| Error::Vmm("the API thread ended".to_string()))?;
            let (resp, effect) = ctl.handle(call.request);
            if effect == Effect::Started {
                log::info!("API: InstanceStart done");
            }
            let _ = call.reply.send(resp);
            continue;
        }
        if let Some(exit) = ctl.run_once(TICK).map_err(Error::Vmm)? {
            return Ok(exit);
        }
        if let Some(rx) = &rx {
            while let Ok(call) = rx.try_recv() {
                let (resp, _) = ctl.handle(call.request);
                let _ = call.reply.send(resp);
            }
        }
    }
}
