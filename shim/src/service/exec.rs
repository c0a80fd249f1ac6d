//! Exec'd processes (`ctr task exec`, `kubectl exec`): more processes in
//! a running container's microVM, each over its own vsock connection to
//! the guest init (`execio.rs`). This file holds their bookkeeping
//! ([`Execs`]: the OCI process and stdio FIFOs by exec id, their phase
//! and exit) and the task API calls that name an exec id.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskExecAdded, TaskExecStarted, TaskExit};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::TtrpcResult;
use exec_proto::{ExecSpec, HostMsg, MAX_SIGNAL};

use super::{no_container, rpc_error, timestamp, Phase, Service};
use crate::execio::{self, Sender};
use crate::process::{open_stdio, Stdio3};
use crate::spec;
use crate::stdin::StdinCloser;

/// Where an exec'd process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExecPhase {
    /// Added, not started.
    Created,
    /// Its start is under way (connecting to the guest).
    Starting,
    /// Running in the guest.
    Running,
    /// Ended (or failed to start).
    Stopped,
}

/// One exec'd process.
#[derive(Debug)]
pub(super) struct ExecProc {
    spec: ExecSpec,
    io: Stdio3,
    phase: ExecPhase,
    /// Its connection's sending side, while it runs (kill, close_io).
    sender: Option<Sender>,
    /// Closes its stdin (close_io), while it has a FIFO.
    stdin: Option<StdinCloser>,
    exit: Option<(u32, SystemTime)>,
}

/// What a call about an exec id cannot do.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum ExecsError {
    /// `exec` with an id in use.
    #[error("exec {0} exists")]
    Exists(String),
    /// No such exec id.
    #[error("no exec {0}")]
    NotFound(String),
    /// `start` twice.
    #[error("exec {0} was already started")]
    AlreadyStarted(String),
    /// `delete` while it runs.
    #[error("exec {0} is running: kill it first")]
    Running(String),
    /// `kill` or `close_io` of a process that does not run.
    #[error("exec {0} is not running")]
    NotRunning(String),
}

impl ExecsError {
    fn code(&self) -> Code {
        match self {
            Self::Exists(_) => Code::ALREADY_EXISTS,
            Self::NotFound(_) | Self::NotRunning(_) => Code::NOT_FOUND,
            Self::AlreadyStarted(_) | Self::Running(_) => Code::FAILED_PRECONDITION,
        }
    }
}

impl From<ExecsError> for ttrpc::Error {
    fn from(e: ExecsError) -> Self {
        rpc_error(e.code(), e.to_string())
    }
}

/// A container's exec'd processes by exec id.
#[derive(Debug, Default)]
pub(super) struct Execs(HashMap<String, ExecProc>);

impl Execs {
    /// Records a new exec, not started.
    pub(super) fn add(&mut self, id: &str, spec: ExecSpec, io: Stdio3) -> Result<(), ExecsError> {
        if self.0.contains_key(id) {
            return Err(ExecsError::Exists(id.into()));
        }
        self.0.insert(
            id.into(),
            ExecProc {
                spec,
                io,
                phase: ExecPhase::Created,
                sender: None,
                stdin: None,
                exit: None,
            },
        );
        Ok(())
    }

    fn get(&self, id: &str) -> Result<&ExecProc, ExecsError> {
        self.0
            .get(id)
            .ok_or_else(|| ExecsError::NotFound(id.into()))
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut ExecProc, ExecsError> {
        self.0
            .get_mut(id)
            .ok_or_else(|| ExecsError::NotFound(id.into()))
    }

    /// Marks `id` as starting; returns its process and stdio.
    pub(super) fn begin_start(&mut self, id: &str) -> Result<(ExecSpec, Stdio3), ExecsError> {
        let e = self.get_mut(id)?;
        if e.phase != ExecPhase::Created {
            return Err(ExecsError::AlreadyStarted(id.into()));
        }
        e.phase = ExecPhase::Starting;
        Ok((e.spec.clone(), e.io.clone()))
    }

    /// `id` runs in the guest.
    pub(super) fn running(&mut self, id: &str, sender: Sender, stdin: Option<StdinCloser>) {
        if let Some(e) = self.0.get_mut(id) {
            e.phase = ExecPhase::Running;
            e.sender = Some(sender);
            e.stdin = stdin;
        }
    }

    /// `id` ended (or could not start) with `code`. False if it is not
    /// known (any more).
    pub(super) fn exited(&mut self, id: &str, code: u32, at: SystemTime) -> bool {
        let Some(e) = self.0.get_mut(id) else {
            return false;
        };
        e.phase = ExecPhase::Stopped;
        e.exit = Some((code, at));
        // Ends the stdin copy, which may wait on the FIFO.
        e.stdin = None;
        true
    }

    /// The container ended: the execs never started can no longer be, and
    /// end with [`execio::STATUS_VM_GONE`] (the started ones learn it from
    /// their connections). Returns their ids.
    pub(super) fn end_unstarted(&mut self, at: SystemTime) -> Vec<String> {
        let ids: Vec<String> = self
            .0
            .iter()
            .filter(|(_, e)| e.phase == ExecPhase::Created)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.exited(id, execio::STATUS_VM_GONE, at);
        }
        ids
    }

    /// The connection to signal or end the stdin of running `id` through.
    pub(super) fn sender(&self, id: &str) -> Result<&Sender, ExecsError> {
        let e = self.get(id)?;
        match (&e.sender, e.phase) {
            (Some(s), ExecPhase::Running) => Ok(s),
            _ => Err(ExecsError::NotRunning(id.into())),
        }
    }

    /// Closes `id`'s stdin.
    pub(super) fn close_stdin(&mut self, id: &str) -> Result<(), ExecsError> {
        let e = self.get_mut(id)?;
        if let Some(mut closer) = e.stdin.take() {
            closer.close();
        }
        Ok(())
    }

    /// Forgets a stopped (or never started) `id`: its exit, if any.
    pub(super) fn remove(&mut self, id: &str) -> Result<Option<(u32, SystemTime)>, ExecsError> {
        let e = self.get(id)?;
        if matches!(e.phase, ExecPhase::Running | ExecPhase::Starting) {
            return Err(ExecsError::Running(id.into()));
        }
        Ok(self.0.remove(id).and_then(|e| e.exit))
    }
}

/// The task API status of an exec phase.
fn status(phase: ExecPhase) -> api::Status {
    match phase {
        ExecPhase::Created => api::Status::CREATED,
        ExecPhase::Starting | ExecPhase::Running => api::Status::RUNNING,
        ExecPhase::Stopped => api::Status::STOPPED,
    }
}

impl Service {
    /// `exec`: records the process (its OCI spec, JSON in `req.spec`).
    pub(super) fn exec_add(&self, req: &api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let value = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let process: oci_spec::runtime::Process = serde_json::from_slice(value).map_err(|e| {
            rpc_error(
                Code::INVALID_ARGUMENT,
                format!("exec {}: bad process spec: {e}", req.exec_id),
            )
        })?;
        let mut exec_spec = spec::exec_spec(&process)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("exec {}: {e}", req.exec_id)))?;
        if req.terminal && exec_spec.tty.is_none() {
            exec_spec.tty = Some(exec_proto::WinSize { rows: 24, cols: 80 });
        }
        let io = Stdio3 {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        {
            let mut st = self.state();
            let c = st
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| no_container(&req.id))?;
            if c.phase != Phase::Running {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if c.vsock.is_none() {
                return Err(rpc_error(
                    Code::UNIMPLEMENTED,
                    format!(
                        "container {} has no exec socket (see the shim's log)",
                        req.id
                    ),
                ));
            }
            c.execs.add(&req.exec_id, exec_spec, io)?;
        }
        let mut ev = TaskExecAdded::new();
        ev.container_id = req.id.clone();
        ev.exec_id = req.exec_id.clone();
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev));
        Ok(api::Empty::new())
    }

    /// `start` of an exec: connects to the guest, starts the process and
    /// its stdio threads.
    pub(super) fn exec_start(&self, id: &str, exec_id: &str) -> TtrpcResult<api::StartResponse> {
        let (spec, io, vsock, pid) = {
            let mut st = self.state();
            let c = st.containers.get_mut(id).ok_or_else(|| no_container(id))?;
            if c.phase != Phase::Running {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("container {id} is not running"),
                ));
            }
            let (spec, io) = c.execs.begin_start(exec_id)?;
            (spec, io, c.vsock.clone().unwrap_or_default(), c.pid)
        };
        match self.launch(id, exec_id, &spec, &io, &vsock) {
            Ok(()) => {}
            Err(msg) => {
                self.exec_ended(id, exec_id, pid, execio::STATUS_PROTOCOL);
                return Err(rpc_error(Code::FAILED_PRECONDITION, msg));
            }
        }
        let mut ev = TaskExecStarted::new();
        ev.container_id = id.into();
        ev.exec_id = exec_id.into();
        ev.pid = pid;
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev));
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    /// Opens the exec's FIFOs, starts it in the guest and its threads.
    fn launch(
        &self,
        id: &str,
        exec_id: &str,
        spec: &ExecSpec,
        io: &Stdio3,
        vsock: &Path,
    ) -> Result<(), String> {
        let fifo = |path: &str, input: bool| {
            open_stdio(path, input).map_err(|e| format!("exec {exec_id}: cannot open {path}: {e}"))
        };
        let (stdout, stderr) = (fifo(&io.stdout, false)?, fifo(&io.stderr, false)?);
        let stdin = if io.stdin.is_empty() {
            None
        } else {
            Some(fifo(&io.stdin, true)?)
        };
        let fail = |e: execio::Error| format!("exec {exec_id} in {id}: {e}");
        let mut stream = execio::connect(vsock, execio::CONNECT_WAIT).map_err(fail)?;
        let dec =
            execio::start(&mut stream, spec, stdin.is_some(), execio::START_WAIT).map_err(fail)?;
        let clone = |s: &std::os::unix::net::UnixStream| {
            s.try_clone()
                .map_err(|e| format!("exec {exec_id}: cannot share its connection: {e}"))
        };
        let sender = Sender::new(clone(&stream)?);
        let closer = match stdin {
            Some(f) => Some(self.copy_stdin(f, &sender, exec_id)?),
            None => None,
        };
        if let Some(c) = self.state().containers.get_mut(id) {
            c.execs.running(exec_id, sender, closer);
        }
        let this = self.clone();
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        std::thread::Builder::new()
            .name("exec-output".into())
            .spawn(move || {
                let code = execio::pump_output(stream, dec, stdout, stderr, &exec_id);
                let pid = this.state().containers.get(&id).map_or(0, |c| c.pid);
                this.exec_ended(&id, &exec_id, pid, code);
            })
            .map_err(|e| format!("cannot start the exec's output thread: {e}"))?;
        Ok(())
    }

    /// Copies the exec's stdin FIFO into frames, through a pipe the
    /// returned closer ends (close_io).
    fn copy_stdin(
        &self,
        fifo: File,
        sender: &Sender,
        exec_id: &str,
    ) -> Result<StdinCloser, String> {
        let (pipe, closer) = crate::stdin::copy(fifo)
            .map_err(|e| format!("exec {exec_id}: cannot copy its stdin: {e}"))?;
        let sender = sender.clone();
        std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || execio::pump_stdin(pipe, &sender))
            .map_err(|e| format!("cannot start the exec's stdin thread: {e}"))?;
        Ok(closer)
    }

    /// Records the exec's end and tells containerd (`TaskExit` with the
    /// exec id).
    fn exec_ended(&self, id: &str, exec_id: &str, pid: u32, code: u32) {
        let now = SystemTime::now();
        let known = self
            .state()
            .containers
            .get_mut(id)
            .is_some_and(|c| c.execs.exited(exec_id, code, now));
        if known {
            self.inner.stopped.notify_all();
            self.publish_exec_exit(id, exec_id, pid, code, now);
        }
    }

    /// `/tasks/exit` for an exec.
    pub(super) fn publish_exec_exit(
        &self,
        id: &str,
        exec_id: &str,
        pid: u32,
        code: u32,
        now: SystemTime,
    ) {
        let mut ev = TaskExit::new();
        ev.container_id = id.into();
        ev.id = exec_id.into();
        ev.pid = pid;
        ev.exit_status = code;
        ev.exited_at = Some(timestamp(now)).into();
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev));
    }

    /// `state` of an exec.
    pub(super) fn exec_state(&self, id: &str, exec_id: &str) -> TtrpcResult<api::StateResponse> {
        let st = self.state();
        let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
        let e = c.execs.get(exec_id)?;
        let mut resp = api::StateResponse::new();
        resp.id = exec_id.into();
        resp.exec_id = exec_id.into();
        resp.bundle = c.bundle.to_string_lossy().into_owned();
        resp.pid = c.pid;
        resp.status = status(e.phase).into();
        resp.stdin = e.io.stdin.clone();
        resp.stdout = e.io.stdout.clone();
        resp.stderr = e.io.stderr.clone();
        if let Some((code, at)) = e.exit {
            resp.exit_status = code;
            resp.exited_at = Some(timestamp(at)).into();
        }
        Ok(resp)
    }

    /// `kill` of an exec: any signal 1 to 64 goes to the process in the
    /// guest (the init delivers it; SIGKILL included).
    pub(super) fn exec_kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
    ) -> TtrpcResult<api::Empty> {
        let sig = u8::try_from(signal)
            .ok()
            .filter(|s| (1..=MAX_SIGNAL).contains(s))
            .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, format!("bad signal {signal}")))?;
        let sender = {
            let st = self.state();
            let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
            c.execs.sender(exec_id)?.clone()
        };
        sender
            .send(&HostMsg::Signal(sig))
            .map_err(|e| rpc_error(Code::NOT_FOUND, format!("exec {exec_id}: {e}")))?;
        Ok(api::Empty::new())
    }

    /// `close_io` of an exec: its stdin ends.
    pub(super) fn exec_close_io(&self, id: &str, exec_id: &str) -> TtrpcResult<api::Empty> {
        let mut st = self.state();
        let c = st.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        c.execs.close_stdin(exec_id)?;
        Ok(api::Empty::new())
    }

    /// `delete` of an exec: forgets it, answering its exit.
    pub(super) fn exec_delete(&self, id: &str, exec_id: &str) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = {
            let mut st = self.state();
            let c = st.containers.get_mut(id).ok_or_else(|| no_container(id))?;
            (c.pid, c.execs.remove(exec_id)?)
        };
        let (code, at) = exit.unwrap_or((0, SystemTime::now()));
        let mut resp = api::DeleteResponse::new();
        resp.pid = pid;
        resp.exit_status = code;
        resp.exited_at = Some(timestamp(at)).into();
        Ok(resp)
    }

    /// `wait` of an exec: until it has ended.
    pub(super) fn exec_wait(&self, id: &str, exec_id: &str) -> TtrpcResult<api::WaitResponse> {
        let mut st = self.state();
        loop {
            let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
            if let Some((code, at)) = c.execs.get(exec_id)?.exit {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn spec() -> ExecSpec {
        ExecSpec {
            argv: vec![b"sh".to_vec()],
            cwd: b"/".to_vec(),
            ..ExecSpec::default()
        }
    }

    #[test]
    fn an_exec_goes_from_added_to_started_to_ended_to_deleted() {
        let mut x = Execs::default();
        x.add("e1", spec(), Stdio3::default()).unwrap();
        assert_eq!(
            x.add("e1", spec(), Stdio3::default()),
            Err(ExecsError::Exists("e1".into()))
        );
        assert_eq!(x.get("e1").unwrap().phase, ExecPhase::Created);
        assert!(matches!(x.sender("e1"), Err(ExecsError::NotRunning(_))));
        let (s, _) = x.begin_start("e1").unwrap();
        assert_eq!(s, spec());
        assert_eq!(
            x.begin_start("e1").unwrap_err(),
            ExecsError::AlreadyStarted("e1".into())
        );
        assert_eq!(x.remove("e1"), Err(ExecsError::Running("e1".into())));
        let (a, _b) = UnixStream::pair().unwrap();
        x.running("e1", Sender::new(a), None);
        assert!(x.sender("e1").is_ok());
        assert_eq!(status(x.get("e1").unwrap().phase), api::Status::RUNNING);
        assert_eq!(x.remove("e1"), Err(ExecsError::Running("e1".into())));
        let at = SystemTime::now();
        assert!(x.exited("e1", 3, at));
        assert!(!x.exited("nope", 3, at));
        assert!(matches!(x.sender("e1"), Err(ExecsError::NotRunning(_))));
        assert_eq!(x.get("e1").unwrap().exit, Some((3, at)));
        assert_eq!(x.remove("e1"), Ok(Some((3, at))));
        assert_eq!(x.remove("e1"), Err(ExecsError::NotFound("e1".into())));
    }

    #[test]
    fn an_exec_never_started_can_be_deleted_and_errors_map_to_codes() {
        let mut x = Execs::default();
        x.add("e2", spec(), Stdio3::default()).unwrap();
        x.close_stdin("e2").unwrap();
        assert_eq!(x.remove("e2"), Ok(None));
        // A container that ends ends its execs that never started.
        x.add("e3", spec(), Stdio3::default()).unwrap();
        x.add("e4", spec(), Stdio3::default()).unwrap();
        x.begin_start("e4").unwrap();
        let at = SystemTime::now();
        assert_eq!(x.end_unstarted(at), ["e3"]);
        assert_eq!(
            x.get("e3").unwrap().exit,
            Some((execio::STATUS_VM_GONE, at))
        );
        assert_eq!(x.get("e4").unwrap().exit, None, "its start learns it");
        assert_eq!(
            ExecsError::Exists(String::new()).code(),
            Code::ALREADY_EXISTS
        );
        assert_eq!(ExecsError::NotFound(String::new()).code(), Code::NOT_FOUND);
        assert_eq!(
            ExecsError::Running(String::new()).code(),
            Code::FAILED_PRECONDITION
        );
    }
}
