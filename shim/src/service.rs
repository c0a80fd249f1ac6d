//! The task service containerd drives: one entry per container, each
//! running in its own microVM (`capsule exec`), with the events containerd
//! expects (create, start, exit, delete). `create` and `start` are
//! `service/lifecycle.rs`'s, the running microVM's calls
//! `service/control.rs`'s, and calls that name an exec id (a process
//! exec'd in a running container) `service/exec.rs`'s.

mod control;
mod exec;
mod lifecycle;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::protos::events::task::TaskDelete;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    mount, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};

use crate::podnet::PodNet;
use crate::process::Stdio3;
use crate::stdin::StdinCloser;
use crate::{spec, stats, status};

fn rpc_error(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    let msg = msg.into();
    log::warn!("{msg}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    ts
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    /// Running, its microVM stopped (`pause`).
    Paused,
    Stopped,
}

/// One container.
#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// The `capsule` arguments that run it.
    args: Vec<OsString>,
    io: Stdio3,
    /// Closes the process's stdin (`close_io`), while it has a FIFO.
    stdin: Option<StdinCloser>,
    /// containerd's rootfs mounts were mounted on this (unmounted at delete).
    mounted: Option<PathBuf>,
    phase: Phase,
    /// The `capsule exec` process, once started.
    pid: u32,
    exit: Option<(u32, SystemTime)>,
    /// The microVM's vsock socket (`--vsock-socket`), for exec'd
    /// processes; `None`: no exec for this container.
    vsock: Option<PathBuf>,
    /// Its exec'd processes.
    execs: exec::Execs,
    /// `process.terminal`: the process runs on a terminal.
    terminal: bool,
    /// The terminal's master (host side), once started with one.
    console: Option<std::fs::File>,
    /// Its pod network (`podnet.rs`): capsule runs in that namespace.
    net: Option<PodNet>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
}

/// The shim: its state is shared by the ttrpc threads and the waiters.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    /// The bundle of the `delete` action (containerd runs it in the bundle).
    bundle: String,
    exit: ExitSignal,
    state: Mutex<State>,
    /// Notified whenever a container stops.
    stopped: Condvar,
    publisher: Mutex<Option<RemotePublisher>>,
}

impl Service {
    fn state(&self) -> MutexGuard<'_, State> {
        // No thread panics while holding it (the shim aborts on panic).
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let guard = self
            .inner
            .publisher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = guard.as_ref() {
            let ctx = containerd_shim::Context::default();
            if let Err(e) = p.publish(ctx, topic, &self.inner.namespace, event) {
                log::warn!("cannot publish {topic}: {e}");
            }
        }
    }

    /// Unmounts what `create` mounted on the bundle's rootfs.
    fn unmount(target: &Path) {
        if let Some(t) = target.to_str() {
            if let Err(e) = mount::umount_recursive(Some(t), libc::MNT_DETACH) {
                log::warn!("cannot unmount {t}: {e}");
            }
        }
    }
}

/// The answer for a request naming a container this shim does not hold.
fn no_container(id: &str) -> ttrpc::Error {
    rpc_error(Code::NOT_FOUND, format!("no container {id}"))
}

/// Removes what a `capsule exec` killed before its clean-up (SIGKILL) left
/// of its vsock sockets: `PATH` and its session listener `PATH_10000`.
/// Only sockets are removed.
fn remove_stale_sockets(vsock: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let mut listener = vsock.as_os_str().to_owned();
    listener.push(format!("_{}", exec_proto::VSOCK_PORT));
    for p in [vsock.to_path_buf(), PathBuf::from(listener)] {
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_socket()) {
            if let Err(e) = std::fs::remove_file(&p) {
                log::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Service {
            inner: Arc::new(Inner {
                namespace: args.namespace.clone(),
                bundle: args.bundle.clone(),
                exit: ExitSignal::default(),
                state: Mutex::new(State::default()),
                stopped: Condvar::new(),
                publisher: Mutex::new(None),
            }),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // One shim per container for now (no pod grouping yet).
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// containerd's clean-up after a shim that died: its VM died with it
    /// (`capsule exec` ends when its parent's pipes close or on its own),
    /// so only the rootfs mount, and perhaps the VM's vsock sockets, are
    /// left.
    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let bundle = if self.inner.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.inner.bundle)
        };
        let rootfs = bundle.join("rootfs");
        if rootfs.is_dir() {
            Self::unmount(&rootfs);
        }
        if let Some(v) = spec::vsock_socket(&bundle) {
            remove_stale_sockets(&v);
        }
        let mut resp = DeleteResponse::new();
        resp.exit_status = 128 + 9;
        resp.exited_at = Some(timestamp(SystemTime::now())).into();
        Ok(resp)
    }

    fn wait(&mut self) {
        self.inner.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        *self
            .inner
            .publisher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(publisher);
        self.clone()
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        self.create_container(&req)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if !req.exec_id.is_empty() {
            return self.exec_start(&req.id, &req.exec_id);
        }
        self.start_container(req.id)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        if !req.exec_id.is_empty() {
            return self.exec_state(&req.id, &req.exec_id);
        }
        let st = self.state();
        let c = st
            .containers
            .get(&req.id)
            .ok_or_else(|| no_container(&req.id))?;
        let mut resp = api::StateResponse::new();
        resp.id = req.id.clone();
        resp.bundle = c.bundle.to_string_lossy().into_owned();
        resp.pid = c.pid;
        resp.status = match c.phase {
            Phase::Created => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Paused => api::Status::PAUSED,
            Phase::Stopped => api::Status::STOPPED,
        }
        .into();
        resp.stdin = c.io.stdin.clone();
        resp.stdout = c.io.stdout.clone();
        resp.stderr = c.io.stderr.clone();
        if let Some((code, at)) = c.exit {
            resp.exit_status = code;
            resp.exited_at = Some(timestamp(at)).into();
        }
        Ok(resp)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let st = self.state();
        let c = st
            .containers
            .get(&req.id)
            .ok_or_else(|| no_container(&req.id))?;
        let mut resp = api::PidsResponse::new();
        if matches!(c.phase, Phase::Running | Phase::Paused) {
            let mut info = containerd_shim::protos::api::ProcessInfo::new();
            info.pid = c.pid;
            resp.processes.push(info);
        }
        Ok(resp)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        if !req.exec_id.is_empty() {
            return self.exec_kill(&req.id, &req.exec_id, req.signal);
        }
        let st = self.state();
        let c = st
            .containers
            .get(&req.id)
            .ok_or_else(|| no_container(&req.id))?;
        if !matches!(c.phase, Phase::Running | Phase::Paused) {
            return Err(rpc_error(
                Code::NOT_FOUND,
                format!("container {} is not running", req.id),
            ));
        }
        if !status::deliverable(req.signal) {
            return Err(rpc_error(
                Code::UNIMPLEMENTED,
                format!(
                    "signal {} cannot reach a process inside a capsule microVM yet (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGWINCH and SIGKILL can)",
                    req.signal
                ),
            ));
        }
        let pid = libc::pid_t::try_from(c.pid).map_err(|_| rpc_error(Code::INTERNAL, "bad pid"))?;
        let sig = libc::c_int::try_from(req.signal)
            .map_err(|_| rpc_error(Code::INVALID_ARGUMENT, "bad signal"))?;
        // SAFETY: kill has no memory arguments. The pid is our own child,
        // not yet waited for (its phase would be Stopped), so it cannot
        // have been reused.
        if unsafe { libc::kill(pid, sig) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(rpc_error(Code::INTERNAL, format!("kill {pid}: {e}")));
        }
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if !req.exec_id.is_empty() {
            return self.exec_close_io(&req.id, &req.exec_id);
        }
        let mut st = self.state();
        let c = st
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| no_container(&req.id))?;
        if req.stdin {
            if let Some(mut closer) = c.stdin.take() {
                closer.close();
            }
        }
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pid = {
            let st = self.state();
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| no_container(&req.id))?;
            if c.phase != Phase::Running {
                return Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("container {} is not running", req.id),
                ));
            }
            c.pid
        };
        let metrics = stats::collect(pid).ok_or_else(|| {
            rpc_error(
                Code::NOT_FOUND,
                format!("the microVM of {} has ended", req.id),
            )
        })?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| rpc_error(Code::INTERNAL, format!("cannot encode the stats: {e}")))?;
        let mut resp = api::StatsResponse::new();
        resp.stats = Some(any).into();
        Ok(resp)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            return self.exec_delete(&req.id, &req.exec_id);
        }
        let mut st = self.state();
        let c = st
            .containers
            .get(&req.id)
            .ok_or_else(|| no_container(&req.id))?;
        if matches!(c.phase, Phase::Running | Phase::Paused) {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {} is running: kill it first", req.id),
            ));
        }
        let c = st.containers.remove(&req.id).expect("checked above");
        drop(st);
        if let Some(target) = &c.mounted {
            Self::unmount(target);
        }
        if let Some(v) = &c.vsock {
            remove_stale_sockets(v);
        }
        if let Some(n) = &c.net {
            n.teardown();
        }
        let (code, at) = c.exit.unwrap_or((0, SystemTime::now()));
        let mut resp = api::DeleteResponse::new();
        resp.pid = c.pid;
        resp.exit_status = code;
        resp.exited_at = Some(timestamp(at)).into();
        let mut ev = TaskDelete::new();
        ev.container_id = req.id.clone();
        ev.id = req.id;
        ev.pid = c.pid;
        ev.exit_status = code;
        ev.exited_at = Some(timestamp(at)).into();
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev));
        Ok(resp)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        if !req.exec_id.is_empty() {
            return self.exec_wait(&req.id, &req.exec_id);
        }
        let mut st = self.state();
        loop {
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| no_container(&req.id))?;
            if let Some((code, at)) = c.exit {
                let mut resp = api::WaitResponse::new();
                resp.exit_status = code;
                resp.exited_at = Some(timestamp(at)).into();
                return Ok(resp);
            }
            st = self
                .inner
                .stopped
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.exec_add(&req)
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.resize(&req.id, &req.exec_id, req.height, req.width)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, true)
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let st = self.state();
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = st.containers.get(&req.id).map_or(0, |c| c.pid);
        Ok(resp)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.state().containers.is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
