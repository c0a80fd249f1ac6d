//! A container's microVM before it runs: `create` (containerd's rootfs
//! mounted on the bundle, the pod network set up, the `capsule exec`
//! arguments from the OCI spec) and `start` (capsule spawned, in the pod's
//! network namespace, on a terminal or with the FIFOs).

use std::path::{Path, PathBuf};

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskStart};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::mount::Mount;
use containerd_shim::{mount, TtrpcResult};

use super::{exec, no_container, rpc_error, Container, Phase, Service};
use crate::config::ShimConfig;
use crate::podnet::{self, PodNet};
use crate::process::{self, Stdio3};
use crate::spec;

impl Service {
    /// `create`: the container is recorded, its microVM not yet started.
    pub(super) fn create_container(
        &self,
        req: &api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let cfg = ShimConfig::load().map_err(|e| rpc_error(Code::FAILED_PRECONDITION, e))?;
        let bundle = PathBuf::from(&req.bundle);
        let oci = oci_spec::runtime::Spec::load(bundle.join("config.json")).map_err(|e| {
            rpc_error(
                Code::INVALID_ARGUMENT,
                format!("{}/config.json: {e}", req.bundle),
            )
        })?;
        let rootfs = spec::rootfs_dir(&oci, &bundle);
        let vsock = spec::vsock_socket(&bundle);
        let args = spec::exec_args(&cfg, &oci, &rootfs, &bundle, vsock.as_deref())
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let mounted = Self::mount_rootfs(&bundle, &req.rootfs)?;
        let net = Self::pod_net(&oci).inspect_err(|_| {
            if let Some(t) = &mounted {
                Self::unmount(t);
            }
        })?;
        let args = match &net {
            Some(n) => podnet::with_net_arg(args, &n.iface.net_arg()),
            None => args,
        };
        let io = Stdio3 {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        {
            let mut st = self.state();
            if st.containers.contains_key(&req.id) {
                if let Some(n) = &net {
                    n.teardown();
                }
                return Err(rpc_error(
                    Code::ALREADY_EXISTS,
                    format!("container {} exists", req.id),
                ));
            }
            st.containers.insert(
                req.id.clone(),
                Container {
                    bundle,
                    args,
                    io,
                    stdin: None,
                    mounted,
                    phase: Phase::Created,
                    pid: 0,
                    exit: None,
                    vsock,
                    execs: exec::Execs::default(),
                    terminal: spec::terminal(&oci) || req.terminal,
                    console: None,
                    net,
                },
            );
        }
        // The process only exists once started: until then the shim stands
        // for it (containerd needs a live pid).
        let pid = std::process::id();
        let mut ev = TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        ev.pid = pid;
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev));
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    /// `start` of the container itself (not of an exec'd process).
    pub(super) fn start_container(&self, id: String) -> TtrpcResult<api::StartResponse> {
        let cfg = ShimConfig::load().map_err(|e| rpc_error(Code::FAILED_PRECONDITION, e))?;
        let mut st = self.state();
        let c = st
            .containers
            .get_mut(&id)
            .ok_or_else(|| no_container(&id))?;
        if c.phase != Phase::Created {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {id} was already started"),
            ));
        }
        let failed = |e: std::io::Error| {
            rpc_error(
                Code::INTERNAL,
                format!("cannot start {}: {e}", cfg.capsule.display()),
            )
        };
        let (child, copied) = if c.terminal {
            let (child, master, copied) = in_pod_net(c.net.as_ref(), || {
                crate::console::spawn(&cfg.capsule, &c.args, &c.bundle, &c.io)
            })?
            .map_err(failed)?;
            c.console = Some(master);
            (child, Some(copied))
        } else {
            let (child, stdin) = in_pod_net(c.net.as_ref(), || {
                process::spawn(&cfg.capsule, &c.args, &c.bundle, &c.io)
            })?
            .map_err(failed)?;
            c.stdin = stdin;
            (child, None)
        };
        c.pid = child.id();
        c.phase = Phase::Running;
        let pid = c.pid;
        let vsock = c.vsock.clone();
        drop(st);
        self.watch(id.clone(), child, copied);
        if let Some(v) = vsock {
            self.watch_events(&id, v);
        }
        let mut ev = TaskStart::new();
        ev.container_id = id;
        ev.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev));
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    /// Mounts containerd's rootfs `mounts` on the bundle's `rootfs`
    /// (none: the bundle's rootfs is used as it is); on failure, unmounts
    /// what it mounted.
    fn mount_rootfs(bundle: &Path, mounts: &[Mount]) -> TtrpcResult<Option<PathBuf>> {
        if mounts.is_empty() {
            return Ok(None);
        }
        let target = bundle.join("rootfs");
        for m in mounts {
            mount::mount_rootfs(Some(&m.type_), Some(&m.source), &m.options, &target).map_err(
                |e| {
                    Self::unmount(&target);
                    rpc_error(Code::INTERNAL, format!("cannot mount the rootfs: {e}"))
                },
            )?;
        }
        Ok(Some(target))
    }

    /// The pod network of a spec that names a network namespace (set up
    /// now: the TAP and its redirects), if it has one.
    fn pod_net(oci: &oci_spec::runtime::Spec) -> TtrpcResult<Option<PodNet>> {
        match podnet::netns_path(oci) {
            Some(path) => PodNet::setup(&path)
                .map_err(|e| rpc_error(Code::FAILED_PRECONDITION, e.to_string())),
            None => Ok(None),
        }
    }
}

/// Runs `f` (which starts capsule) in the container's pod network
/// namespace, if it has one.
fn in_pod_net<T: Send>(net: Option<&PodNet>, f: impl FnOnce() -> T + Send) -> TtrpcResult<T> {
    match net {
        Some(n) => n
            .run_in(f)
            .map_err(|e| rpc_error(Code::INTERNAL, e.to_string())),
        None => Ok(f()),
    }
}
