//! The container's microVM while it runs: its end (the waiter thread),
//! and the task API calls around it:
//! `resize_pty` (its terminal, or an exec'd process's), `pause`/`resume`
//! (the whole microVM), and the guest's OOM kills as `/tasks/oom`
//! events (an events watch on the guest init's exec port).

use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskExit, TaskOOM, TaskPaused, TaskResumed};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use exec_proto::{ExecSpec, HostMsg, WinSize};

use super::{no_container, rpc_error, timestamp, Phase, Service};
use crate::{execio, status};

/// How long the events watch tries to reach the guest init: the microVM
/// boots meanwhile (its exec port opens once the process runs), which
/// under nested emulation takes far longer than an exec's wait.
const WATCH_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// A terminal size from containerd's `resize_pty` (`u32`s, clamped).
fn win_size(height: u32, width: u32) -> WinSize {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    WinSize {
        rows: clamp(height),
        cols: clamp(width),
    }
}

impl Service {
    /// Waits for the `capsule exec` of container `id` and records its end.
    /// With a terminal, `copied` hears when its output is all copied.
    pub(super) fn watch(
        &self,
        id: String,
        mut child: std::process::Child,
        copied: Option<std::sync::mpsc::Receiver<()>>,
    ) {
        let this = self.clone();
        std::thread::spawn(move || {
            let code = match child.wait() {
                Ok(s) => status::exit_code(s),
                Err(e) => {
                    log::error!("cannot wait for the microVM of {id}: {e}");
                    255
                }
            };
            if let Some(c) = &copied {
                crate::console::drain(c, std::time::Duration::from_secs(2));
            }
            if (123..=125).contains(&code) {
                log::warn!("capsule exec for {id} ended with {code}: the microVM failed (see capsule's stderr in the container's log)");
            }
            let now = SystemTime::now();
            let (pid, unstarted) = {
                let mut st = this.state();
                let Some(c) = st.containers.get_mut(&id) else {
                    return;
                };
                c.phase = Phase::Stopped;
                c.exit = Some((code, now));
                // Ends the stdin copy, which may wait on the FIFO.
                c.stdin = None;
                (c.pid, c.execs.end_unstarted(now))
            };
            this.inner.stopped.notify_all();
            for exec_id in unstarted {
                this.publish_exec_exit(&id, &exec_id, pid, crate::execio::STATUS_VM_GONE, now);
            }
            let mut ev = TaskExit::new();
            ev.container_id = id.clone();
            ev.id = id;
            ev.pid = pid;
            ev.exit_status = code;
            ev.exited_at = Some(timestamp(now)).into();
            this.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev));
        });
    }

    /// `resize_pty`: the container's terminal (its master's size, and
    /// SIGWINCH for capsule, which passes it on) or an exec'd process's
    /// (a `Resize` frame on its connection).
    pub(super) fn resize(
        &self,
        id: &str,
        exec_id: &str,
        height: u32,
        width: u32,
    ) -> TtrpcResult<api::Empty> {
        let size = win_size(height, width);
        let st = self.state();
        let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
        if !exec_id.is_empty() {
            let sender = c.execs.sender(exec_id)?.clone();
            drop(st);
            sender
                .send(&HostMsg::Resize(size))
                .map_err(|e| rpc_error(Code::NOT_FOUND, format!("exec {exec_id}: {e}")))?;
            return Ok(api::Empty::new());
        }
        let Some(master) = c.console.as_ref().filter(|_| c.phase == Phase::Running) else {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {id} has no running terminal"),
            ));
        };
        crate::console::resize(master, size, c.pid)
            .map_err(|e| rpc_error(Code::INTERNAL, format!("resize of {id}: {e}")))?;
        Ok(api::Empty::new())
    }

    /// `pause` / `resume`: stops or continues the whole `capsule exec`
    /// process (SIGSTOP/SIGCONT): its vCPUs and devices stand still, the
    /// guest with them, as runc freezes a container's cgroup. virtiofsd
    /// and the shim's connections wait meanwhile.
    pub(super) fn set_paused(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let (from, to, sig) = if pause {
            (Phase::Running, Phase::Paused, libc::SIGSTOP)
        } else {
            (Phase::Paused, Phase::Running, libc::SIGCONT)
        };
        {
            let mut st = self.state();
            let c = st.containers.get_mut(id).ok_or_else(|| no_container(id))?;
            if c.phase != from {
                let what = if pause { "running" } else { "paused" };
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("container {id} is not {what}"),
                ));
            }
            let pid =
                libc::pid_t::try_from(c.pid).map_err(|_| rpc_error(Code::INTERNAL, "bad pid"))?;
            // SAFETY: kill has no memory arguments; the pid is the shim's
            // own child, not yet waited for (its phase would be Stopped).
            if unsafe { libc::kill(pid, sig) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(rpc_error(Code::INTERNAL, format!("kill {pid}: {e}")));
            }
            c.phase = to;
        }
        if pause {
            let mut ev = TaskPaused::new();
            ev.container_id = id.into();
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev));
        } else {
            let mut ev = TaskResumed::new();
            ev.container_id = id.into();
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev));
        }
        Ok(api::Empty::new())
    }

    /// Watches container `id`'s guest for OOM kills through the microVM's
    /// vsock socket `vsock`: each becomes a `/tasks/oom` event. The watch
    /// ends with the microVM.
    pub(super) fn watch_events(&self, id: &str, vsock: PathBuf) {
        let this = self.clone();
        let id = id.to_string();
        let spawned = std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || {
                let spec = ExecSpec {
                    watch: true,
                    ..ExecSpec::default()
                };
                let started = execio::connect(&vsock, WATCH_CONNECT_WAIT).and_then(|mut s| {
                    let dec = execio::start(&mut s, &spec, true, execio::START_WAIT)?;
                    Ok((s, dec))
                });
                let (stream, dec) = match started {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("no OOM events for {id}: {e}");
                        return;
                    }
                };
                execio::watch_events(stream, dec, &id, |kills| {
                    log::info!("container {id}: the guest's OOM killer killed {kills} processes");
                    let mut ev = TaskOOM::new();
                    ev.container_id = id.clone();
                    this.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
                });
            });
        if let Err(e) = spawned {
            log::warn!("no OOM events: cannot start a thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_clamped_to_the_terminal_s_u16() {
        assert_eq!(
            win_size(40, 120),
            WinSize {
                rows: 40,
                cols: 120
            }
        );
        assert_eq!(
            win_size(70_000, 0),
            WinSize {
                rows: u16::MAX,
                cols: 0
            }
        );
    }
}
