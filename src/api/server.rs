//! The API thread: accepts connections on the Unix socket, reads requests
//! with [`http::parse`], routes them, hands each to the VMM thread and
//! writes the answer once the VMM has acted on it.
//!
//! Several connections may be open; each has its own buffer and deadline,
//! so a slow or silent client cannot hold up the others (it gets `408` when
//! its deadline passes). Requests are served one at a time. The VMM thread
//! is woken through an eventfd; the API thread never touches vCPUs.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::action::{VmmAction as Request, VmmActionError, VmmData};
use super::http::{self, Parsed, Response};
use super::types::{self, from_body};

/// Time a client has to send a whole request, from its first byte (or
/// from connecting).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle keep-alive connection is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most connections open at once; more are answered 429 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// Time to write a response before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the VMM thread answers to a [`Call`].
pub type Reply = Result<VmmData, VmmActionError>;

/// A request for the VMM thread and where its answer goes.
pub struct Call {
    /// The request.
    pub request: Request,
    /// The answer.
    pub reply: SyncSender<Reply>,
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
    receiving: bool,
    continue_sent: bool,
}

/// A 400 response with `e` as its `fault_message`.
fn bad(e: impl std::fmt::Display) -> Response {
    Response::fault(400, e.to_string())
}

/// The routes of one drive or network interface (`PUT`, `PATCH`), whose
/// body must name the id of the path; `None` for any other route.
fn device_route(method: &str, segments: &[&str], body: &[u8]) -> Option<Result<Request, Response>> {
    const PATCH_MISMATCH: &str = "The id from the path does not match the id from the body!";
    Some(match (method, segments) {
        ("PUT", ["drives", id]) => from_body(body).map_err(bad).and_then(|d: types::Drive| {
            if d.drive_id == *id {
                Ok(Request::PutDrive(d))
            } else {
                Err(bad(format!(
                    "drive_id '{}' does not match the path's '{id}'",
                    d.drive_id
                )))
            }
        }),
        ("PUT", ["network-interfaces", id]) => {
            from_body(body)
                .map_err(bad)
                .and_then(|n: types::NetworkInterface| {
                    if n.iface_id == *id {
                        Ok(Request::PutNetworkInterface(n))
                    } else {
                        Err(bad(format!(
                            "iface_id '{}' does not match the path's '{id}'",
                            n.iface_id
                        )))
                    }
                })
        }
        ("PATCH", ["drives", id]) => {
            from_body(body)
                .map_err(bad)
                .and_then(|d: types::PartialDrive| {
                    if d.drive_id == *id {
                        Ok(Request::PatchDrive(d))
                    } else {
                        Err(bad(PATCH_MISMATCH))
                    }
                })
        }
        ("PATCH", ["network-interfaces", id]) => {
            from_body(body)
                .map_err(bad)
                .and_then(|n: types::PartialNetworkInterface| {
                    if n.iface_id == *id {
                        Ok(Request::PatchNetworkInterface(n))
                    } else {
                        Err(bad(PATCH_MISMATCH))
                    }
                })
        }
        _ => return None,
    })
}

/// A router for one family of paths: `None` if the request is not one of
/// its routes.
type Router = fn(&str, &[&str], &[u8]) -> Option<Result<Request, Response>>;

/// Routes a parsed HTTP request to an API request, or answers it.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Request, Response> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let routers: [Router; 7] = [
        super::snapshot::route,
        device_route,
        machine_route,
        single_device_route,
        logger_and_metrics_route,
        mmds_route,
        balloon_route,
    ];
    for router in routers {
        if let Some(r) = router(method, &segments, body) {
            return r;
        }
    }
    Err(unrouted(method, path, &segments))
}

/// `r`, if the request has no body: a `GET` carries none.
fn no_body(body: &[u8], r: Request) -> Result<Request, Response> {
    if body.is_empty() {
        Ok(r)
    } else {
        Err(Response::fault(400, "this request takes no body"))
    }
}

/// The routes of the instance and the machine: information, version,
/// machine and CPU configuration, boot source, actions, the VM's state
/// and configuration.
fn machine_route(
    method: &str,
    segments: &[&str],
    body: &[u8],
) -> Option<Result<Request, Response>> {
    Some(match (method, segments) {
        ("GET", []) => no_body(body, Request::GetInstanceInfo),
        ("GET", ["version"]) => no_body(body, Request::GetVersion),
        ("GET", ["machine-config"]) => no_body(body, Request::GetMachineConfig),
        ("PUT", ["machine-config"]) => from_body(body).map(Request::PutMachineConfig).map_err(bad),
        ("PATCH", ["machine-config"]) => {
            from_body(body)
                .map_err(bad)
                .and_then(|u: types::MachineConfigUpdate| {
                    if u == types::MachineConfigUpdate::default() {
                        Err(bad("Empty PATCH request.".to_string()))
                    } else {
                        Ok(Request::PatchMachineConfig(u))
                    }
                })
        }
        ("PUT", ["boot-source"]) => from_body(body).map(Request::PutBootSource).map_err(bad),
        ("PUT", ["actions"]) => from_body(body)
            .map(|a: types::InstanceActionInfo| Request::Action(a.action_type))
            .map_err(bad),
        ("PATCH", ["vm"]) => from_body(body)
            .map(|v: types::Vm| Request::PatchVm(v.state))
            .map_err(bad),
        ("GET", ["vm", "config"]) => no_body(body, Request::GetVmConfig),
        // Checked as JSON, then refused as a whole.
        ("PUT", ["cpu-config"]) => from_body(body)
            .map(|_: serde_json::Value| Request::PutCpuConfig)
            .map_err(bad),
        _ => return None,
    })
}

/// The routes of the devices a VM has at most one of: vsock, entropy and
/// the serial console's output.
fn single_device_route(
    method: &str,
    segments: &[&str],
    body: &[u8],
) -> Option<Result<Request, Response>> {
    Some(match (method, segments) {
        ("PUT", ["vsock"]) => from_body(body).map(Request::PutVsock).map_err(bad),
        ("PUT", ["entropy"]) => from_body(body).map(Request::PutEntropy).map_err(bad),
        ("PUT", ["serial"]) => from_body(body).map(Request::PutSerial).map_err(bad),
        _ => return None,
    })
}

/// The routes of the logger and the metrics.
fn logger_and_metrics_route(
    method: &str,
    segments: &[&str],
    body: &[u8],
) -> Option<Result<Request, Response>> {
    Some(match (method, segments) {
        ("PUT", ["logger"]) => from_body(body).map(Request::PutLogger).map_err(bad),
        ("PUT", ["metrics"]) => from_body(body).map(Request::PutMetrics).map_err(bad),
        _ => return None,
    })
}

/// The routes of the metadata service: its data and its configuration.
fn mmds_route(method: &str, segments: &[&str], body: &[u8]) -> Option<Result<Request, Response>> {
    Some(match (method, segments) {
        ("PUT", ["mmds"]) => from_body(body).map(Request::PutMmds).map_err(bad),
        ("PATCH", ["mmds"]) => from_body(body).map(Request::PatchMmds).map_err(bad),
        ("GET", ["mmds"]) => no_body(body, Request::GetMmds),
        ("PUT", ["mmds", "config"]) => from_body(body).map(Request::PutMmdsConfig).map_err(bad),
        _ => return None,
    })
}

/// The routes of the balloon: the device, its statistics, and free page
/// hinting (which capsule refuses).
fn balloon_route(
    method: &str,
    segments: &[&str],
    body: &[u8],
) -> Option<Result<Request, Response>> {
    Some(match (method, segments) {
        ("PUT", ["balloon"]) => from_body(body).map(Request::PutBalloon).map_err(bad),
        ("PATCH", ["balloon"]) => from_body(body).map(Request::PatchBalloon).map_err(bad),
        ("GET", ["balloon"]) => no_body(body, Request::GetBalloon),
        ("PATCH", ["balloon", "statistics"]) => {
            from_body(body).map(Request::PatchBalloonStats).map_err(bad)
        }
        ("GET", ["balloon", "statistics"]) => no_body(body, Request::GetBalloonStats),
        ("PATCH", ["balloon", "hinting", "start" | "stop"])
        | ("GET", ["balloon", "hinting", "status"]) => Err(bad(super::balloon::Error::Hinting)),
        _ => return None,
    })
}

/// The answer to a request no router took: a known path with the wrong
/// method, or a path capsule does not implement.
fn unrouted(method: &str, path: &str, segments: &[&str]) -> Response {
    let known = matches!(
        segments,
        [] | ["version"]
            | ["machine-config"]
            | ["boot-source"]
            | ["drives", _]
            | ["network-interfaces", _]
            | ["vsock"]
            | ["actions"]
            | ["vm"]
            | ["vm", "config"]
            | ["logger"]
            | ["serial"]
            | ["metrics"]
            | ["entropy"]
            | ["mmds"]
            | ["mmds", "config"]
            | ["balloon"]
            | ["balloon", "statistics"]
            | ["balloon", "hinting", "start" | "stop" | "status"]
            | ["cpu-config"]
    );
    if known {
        Response::fault(
            400,
            format!("Invalid request method and/or path: {method} {path}"),
        )
    } else {
        Response::fault(
            400,
            format!(
                "Invalid request method and/or path: {method} {path} (not implemented by capsule)"
            ),
        )
    }
}

/// Serves the API on `listener` forever: each request is routed, sent to
/// `calls` (with `wake` signalled) and answered with the VMM's response.
/// Returns when the VMM side has gone away.
pub fn serve(listener: UnixListener, calls: Sender<Call>, wake: Arc<EventFd>) {
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("API: cannot make the socket non-blocking: {e}");
        return;
    }
    let mut conns: HashMap<i32, Conn> = HashMap::new();
    loop {
        let mut fds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for fd in conns.keys() {
            fds.push(libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let now = Instant::now();
        let next = conns
            .values()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1));
        let timeout = i32::try_from(next.as_millis().clamp(1, 1000)).unwrap_or(1000);
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                log::error!("API: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if fds[0].revents != 0 {
            accept_all(&listener, &mut conns);
        }
        for p in &fds[1..] {
            if p.revents == 0 {
                continue;
            }
            let Some(conn) = conns.get_mut(&p.fd) else {
                continue;
            };
            let keep = match read_and_serve(conn, &calls, &wake) {
                Ok(k) => k,
                Err(Gone) => return,
            };
            if !keep {
                conns.remove(&p.fd);
            }
        }
        let now = Instant::now();
        conns.retain(|_, c| {
            if c.deadline > now {
                return true;
            }
            if c.receiving {
                let r = Response::fault(408, "request not received in time");
                let _ = write_response(&mut c.stream, &r, true);
            }
            false
        });
    }
}

/// The VMM thread has ended.
struct Gone;

fn accept_all(listener: &UnixListener, conns: &mut HashMap<i32, Conn>) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if conns.len() >= MAX_CONNECTIONS {
                    let r = Response::fault(429, "too many open API connections");
                    let _ = write_response(&mut stream, &r, true);
                    continue;
                }
                if let Err(e) = stream.set_nonblocking(true) {
                    log::warn!("API: dropping a client: {e}");
                    continue;
                }
                conns.insert(
                    stream.as_raw_fd(),
                    Conn {
                        stream,
                        buf: Vec::new(),
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                        receiving: false,
                        continue_sent: false,
                    },
                );
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("API: accept failed: {e}");
                return;
            }
        }
    }
}

/// Reads what is there and serves every complete request; returns whether
/// to keep the connection.
fn read_and_serve(conn: &mut Conn, calls: &Sender<Call>, wake: &EventFd) -> Result<bool, Gone> {
    let mut chunk = [0u8; 4096];
    let mut eof = false;
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                if !conn.receiving {
                    conn.receiving = true;
                    conn.deadline = Instant::now() + REQUEST_TIMEOUT;
                }
                conn.buf.extend_from_slice(&chunk[..n]);
                if conn.buf.len() > http::MAX_HEAD + http::max_body() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    loop {
        if conn.buf.is_empty() {
            return Ok(!eof);
        }
        match http::parse(&conn.buf) {
            Ok(Parsed::Incomplete { continue_wanted }) => {
                if eof {
                    let r = Response::fault(400, "incomplete request (the client stopped sending)");
                    let _ = write_response(&mut conn.stream, &r, true);
                    return Ok(false);
                }
                if continue_wanted && !conn.continue_sent {
                    conn.continue_sent = true;
                    let _ = conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                return Ok(true);
            }
            Err(e) => {
                let r = Response::fault(e.status, e.message);
                let _ = write_response(&mut conn.stream, &r, true);
                return Ok(false);
            }
            Ok(Parsed::Complete(req, used)) => {
                conn.buf.drain(..used);
                conn.continue_sent = false;
                conn.receiving = !conn.buf.is_empty();
                conn.deadline = Instant::now()
                    + if conn.receiving {
                        REQUEST_TIMEOUT
                    } else {
                        IDLE_TIMEOUT
                    };
                log::debug!("API: {} {}", req.method, req.path);
                let resp = match route(&req.method, &req.path, &req.body) {
                    Ok(request) => response(call(calls, wake, request)?),
                    Err(r) => r,
                };
                if resp.status >= 400 {
                    log::info!(
                        "API: {} {} -> {}: {}",
                        req.method,
                        req.path,
                        resp.status,
                        resp.body.as_deref().unwrap_or("")
                    );
                }
                let close = req.close || eof;
                if write_response(&mut conn.stream, &resp, close).is_err() || close {
                    return Ok(false);
                }
            }
        }
    }
}

/// The HTTP response for the VMM's answer: 204 without data, 200 with
/// its JSON, 400 with the error as `fault_message`.
pub fn response(reply: Reply) -> Response {
    let json = |v: &dyn erased::Ser| Response::json(v.to_json());
    match reply {
        Ok(VmmData::Empty) => Response::no_content(),
        Ok(VmmData::InstanceInfo(i)) => json(&i),
        Ok(VmmData::Version(v)) => json(&v),
        Ok(VmmData::MachineConfig(m)) => json(&m),
        Ok(VmmData::VmConfig(c)) => json(&c),
        Ok(VmmData::Mmds(v)) => json(&v),
        Ok(VmmData::Balloon(b)) => json(&b),
        Ok(VmmData::BalloonStats(s)) => json(&s),
        Err(e) => Response::fault(400, e.to_string()),
    }
}

/// Serialization behind a trait object (to keep [`response`] short).
mod erased {
    /// Something that serializes to JSON.
    pub trait Ser {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
        }
    }
}

fn call(calls: &Sender<Call>, wake: &EventFd, request: Request) -> Result<Reply, Gone> {
    let (tx, rx) = sync_channel(1);
    calls.send(Call { request, reply: tx }).map_err(|_| Gone)?;
    let _ = wake.write(1);
    rx.recv().map_err(|_| Gone)
}

fn write_response(stream: &mut UnixStream, r: &Response, close: bool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let res = stream.write_all(&r.to_bytes(close));
    if close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    stream.set_nonblocking(true)?;
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/", b""), Ok(Request::GetInstanceInfo));
        assert_eq!(route("GET", "/vm/config", b""), Ok(Request::GetVmConfig));
        assert!(matches!(
            route("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#),
            Ok(Request::Action(types::ActionType::InstanceStart))
        ));
        assert!(matches!(
            route("PUT", "/drives/a", br#"{"drive_id":"b","is_root_device":false}"#),
            Err(r) if r.status == 400
        ));
        assert!(matches!(route("DELETE", "/", b""), Err(r) if r.status == 400));
        assert!(matches!(route("GET", "/pmem/p1", b""), Err(r) if r.status == 400));
        assert_eq!(route("GET", "/mmds", b""), Ok(Request::GetMmds));
        assert_eq!(route("GET", "/balloon", b""), Ok(Request::GetBalloon));
        assert!(matches!(
            route("PATCH", "/balloon/statistics", br#"{"stats_polling_interval_s":3}"#),
            Ok(Request::PatchBalloonStats(u)) if u.stats_polling_interval_s == 3
        ));
        let hinting = route("PATCH", "/balloon/hinting/start", b"{}").unwrap_err();
        assert!(hinting
            .body
            .unwrap_or_default()
            .contains("hinting is not supported"));
        assert!(matches!(route("DELETE", "/balloon", b""), Err(r) if r.status == 400));
        assert!(matches!(route("GET", "/version", b"x"), Err(r) if r.status == 400));
        assert!(matches!(route("PATCH", "/vm", b"[]"), Err(r) if r.status == 400));
    }
}
