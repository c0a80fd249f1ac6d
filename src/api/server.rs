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

/// Routes a parsed HTTP request to an API request, or answers it.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Request, Response> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let no_body = |r: Request| {
        if body.is_empty() {
            Ok(r)
        } else {
            Err(Response::fault(400, "this request takes no body"))
        }
    };
    if let Some(r) = super::snapshot::route(method, &segments, body) {
        return r;
    }
    if let Some(r) = device_route(method, &segments, body) {
        return r;
    }
    let r = match (method, segments.as_slice()) {
        ("GET", []) => no_body(Request::GetInstanceInfo)?,
        ("GET", ["version"]) => no_body(Request::GetVersion)?,
        ("GET", ["machine-config"]) => no_body(Request::GetMachineConfig)?,
        ("PUT", ["machine-config"]) => Request::PutMachineConfig(from_body(body).map_err(bad)?),
        ("PUT", ["boot-source"]) => Request::PutBootSource(from_body(body).map_err(bad)?),
        ("PUT", ["vsock"]) => Request::PutVsock(from_body(body).map_err(bad)?),
        ("PUT", ["actions"]) => {
            let a: types::InstanceActionInfo = from_body(body).map_err(bad)?;
            Request::Action(a.action_type)
        }
        ("PATCH", ["vm"]) => {
            let v: types::Vm = from_body(body).map_err(bad)?;
            Request::PatchVm(v.state)
        }
        ("GET", ["vm", "config"]) => no_body(Request::GetVmConfig)?,
        ("PUT", ["logger"]) => Request::PutLogger(from_body(body).map_err(bad)?),
        ("PUT", ["serial"]) => Request::PutSerial(from_body(body).map_err(bad)?),
        ("PATCH", ["machine-config"]) => {
            let u: types::MachineConfigUpdate = from_body(body).map_err(bad)?;
            if u == types::MachineConfigUpdate::default() {
                return Err(bad("Empty PATCH request.".to_string()));
            }
            Request::PatchMachineConfig(u)
        }
        ("PUT", ["metrics"]) => Request::PutMetrics(from_body(body).map_err(bad)?),
        ("PUT", ["entropy"]) => Request::PutEntropy(from_body(body).map_err(bad)?),
        ("PUT", ["mmds"]) => Request::PutMmds(from_body(body).map_err(bad)?),
        ("PATCH", ["mmds"]) => Request::PatchMmds(from_body(body).map_err(bad)?),
        ("GET", ["mmds"]) => no_body(Request::GetMmds)?,
        ("PUT", ["mmds", "config"]) => Request::PutMmdsConfig(from_body(body).map_err(bad)?),
        ("PUT", ["balloon"]) => Request::PutBalloon(from_body(body).map_err(bad)?),
        ("PATCH", ["balloon"]) => Request::PatchBalloon(from_body(body).map_err(bad)?),
        ("GET", ["balloon"]) => no_body(Request::GetBalloon)?,
        ("PATCH", ["balloon", "statistics"]) => {
            Request::PatchBalloonStats(from_body(body).map_err(bad)?)
        }
        ("GET", ["balloon", "statistics"]) => no_body(Request::GetBalloonStats)?,
        ("PATCH", ["balloon", "hinting", "start" | "stop"])
        | ("GET", ["balloon", "hinting", "status"]) => {
            return Err(bad(super::balloon::Error::Hinting))
        }
        ("PUT", ["cpu-config"]) => {
            // Checked as JSON, then refused as a whole.
            let _: serde_json::Value = from_body(body).map_err(bad)?;
            Request::PutCpuConfig
        }
        (
            _,
            []
            | ["version"]
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
            | ["cpu-config"],
        ) => {
            return Err(Response::fault(
                400,
                format!("Invalid request method and/or path: {method} {path}"),
            ))
        }
        _ => {
            return Err(Response::fault(
                400,
                format!(
                "Invalid request method and/or path: {method} {path} (not implemented by capsule)"
            ),
            ))
        }
    };
    Ok(r)
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
