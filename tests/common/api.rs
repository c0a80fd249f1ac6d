//! A minimal HTTP/1.1 client over the API's Unix socket, as the API tests
//! use it: one request per connection, `Connection: close`, the response
//! read up to its Content-Length (interim `100 Continue` answers skipped).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

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
