//! A minimal HTTP/1.1 client over the API's Unix socket, as the API tests
//! use it: one request per connection, `Connection: close`, the response
//! read up to its Content-Length (interim `100 Continue` answers skipped);
//! and [`Vmm`], a process serving the API that the test owns.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `name` in the API tests' scratch directory.
pub fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A process serving the API on `sock` (capsule, or capsule as
/// `firecracker`), killed when dropped (a failing assertion included).
pub struct Vmm {
    /// The process.
    pub child: Child,
    /// Its API socket.
    pub sock: PathBuf,
}

impl Vmm {
    /// `capsule run --api-sock` on `NAME.sock` in [`tmp`].
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts capsule serving the API, with more `run` arguments; stdout
    /// and stderr piped.
    pub fn start_with(name: &str, more: &[&str]) -> Self {
        let sock = tmp(&format!("{name}.sock"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_capsule"));
        command
            .args(["run", "--api-sock"])
            .arg(&sock)
            .args(more)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self::spawn(command, sock)
    }

    /// Spawns `command` (stdin null), which serves the API on `sock` (a
    /// file left there by an earlier run is removed first); waits for the
    /// socket.
    pub fn spawn(mut command: Command, sock: PathBuf) -> Self {
        let _ = std::fs::remove_file(&sock);
        let child = command.stdin(Stdio::null()).spawn().expect("run the VMM");
        wait_for_socket(&sock);
        Self { child, sock }
    }

    /// A new connection to the API.
    pub fn connect(&self) -> UnixStream {
        connect(&self.sock)
    }

    /// Sends raw bytes on a new connection, returns (status, body).
    pub fn raw(&self, bytes: &[u8]) -> (u16, String) {
        raw(&self.sock, bytes)
    }

    /// One request; returns (status, body).
    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.sock, method, path, body)
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The exit code once the process ends, or `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_exit(&mut self.child, timeout)
    }

    /// What the process wrote to its (piped) stderr, once it has ended.
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to 10 s) until something accepts connections on `sock`.
pub fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new connection to `sock` whose reads give up after 20 s.
pub fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// The bytes of one request with a body (possibly empty).
pub fn request_bytes(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends raw bytes on a new connection; returns (status, body).
pub fn raw(sock: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = connect(sock);
    s.write_all(bytes).unwrap();
    read_response(&mut s)
}

/// One request on a new connection; returns (status, body).
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    raw(sock, &request_bytes(method, path, body.unwrap_or("")))
}

/// Reads one response (until Content-Length is met); panics if the
/// server closes the connection first.
pub fn read_response(s: &mut UnixStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                if status == 100 {
                    buf.drain(..end + 4);
                    continue;
                }
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return (status, body);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => panic!("connection ended: {:?}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A response body as JSON; panics, quoting it, if it is not JSON.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The exit code of `child` once it ends, or `None` after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The exit code of `child` once it ends; after `timeout` it is killed
/// and `None` returned (as for a death by signal).
pub fn exit_or_kill(child: &mut Child, timeout: Duration) -> Option<i32> {
    let code = wait_exit(child, timeout);
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    code
}

/// The size of `p`, 0 if it does not exist (yet).
pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The permission bits of `p` itself (not of what a link points at).
pub fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}
