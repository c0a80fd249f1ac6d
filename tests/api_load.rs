//! Load on the control plane: many concurrent API clients against a
//! running VM (a tiny guest on /dev/kvm that prints to its serial port),
//! a mix of `GET /`, pause/resume and `PUT /logger` with malformed
//! requests interleaved. Nothing may crash, no connection may stall, the
//! guest must keep running afterwards, and every well-formed request must
//! get its proper answer.
//!
//! The whole run (1,000 requests from 32 clients) takes about a second,
//! so it runs with every `cargo test`; `cargo test --test api_load --
//! --nocapture` prints the latencies (docs/fuzzing.md has the figures).
//! The server takes at most 16 connections at once and answers the rest
//! 429; such answers are counted and the request is sent again.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::elf;

const COM1: u16 = 0x3f8;
/// A response slower than this counts as a stuck connection.
const STUCK: Duration = Duration::from_secs(20);

/// The guest: prints '.' forever, with a short delay between characters.
fn printing_guest() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend([0x66, 0xba]);
    c.extend(COM1.to_le_bytes()); // mov dx, COM1
    c.extend([0xb0, b'.', 0xee]); // mov al, '.'; out dx, al
    c.extend([0xb9, 0x00, 0x10, 0x00, 0x00]); // mov ecx, 0x1000
    c.extend([0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz -4
    let back = -(i8::try_from(c.len()).expect("a short loop") + 2);
    c.extend([0xeb, back as u8]); // jmp top
    elf(&c)
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api-load");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Sends `bytes` on a new connection; returns the status of the answer.
/// Panics if the server does not answer within [`STUCK`].
fn exchange(sock: &std::path::Path, bytes: &[u8]) -> u16 {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(STUCK)).unwrap();
    s.set_write_timeout(Some(STUCK)).unwrap();
    // A server that answers (and closes) before reading everything is
    // fine: the answer is what counts.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad status line: {head:?}"));
            if status == 100 {
                buf.drain(..end + 4);
                continue;
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return status;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed without an answer: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!(
                "stuck connection ({e}) after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What a malformed request may be answered: a client error, or "not
/// implemented" / "version not supported".
const MALFORMED_ANSWERS: &[u16] = &[400, 404, 405, 408, 411, 413, 414, 415, 431, 501, 505];

/// Malformed requests, each answered 4xx without harm.
fn malformed() -> Vec<Vec<u8>> {
    vec![
        b"HELLO\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        request("PUT", "/logger", "{\"level\": "),
        request("PATCH", "/vm", r#"{"state":"Sleeping"}"#),
        request("PUT", "/machine-config", r#"{"vcpu_count":1e999}"#),
        request("PUT", "/actions", "[]"),
        b"PUT /actions HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n".to_vec(),
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
        [
            b"GET / HTTP/1.1\r\nX: ".as_slice(),
            &[0xff, 0xfe, 0],
            b"\r\n\r\n",
        ]
        .concat(),
        [
            b"GET / HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; 20_000],
            b"\r\n\r\n",
        ]
        .concat(),
        b"DELETE /vm HTTP/1.1\r\n\r\n".to_vec(),
        // Cut short: the client half-closes mid-body.
        b"PUT /logger HTTP/1.1\r\nContent-Length: 50\r\n\r\n{".to_vec(),
    ]
}

struct Capsule {
    child: Child,
    sock: PathBuf,
}

impl Drop for Capsule {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latencies and answers of one load run.
#[derive(Default)]
struct Report {
    latencies: Vec<Duration>,
    busy: usize,
    malformed: usize,
}

impl Report {
    /// The `p`th percentile (nearest rank below).
    fn percentile(&self, p: usize) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        v[(v.len() - 1) * p / 100]
    }
}

/// Starts a VM with the printing guest through the API and waits for its
/// first output.
fn running_vm(name: &str) -> (Capsule, PathBuf) {
    let kernel = tmp(&format!("{name}.elf"));
    std::fs::write(&kernel, printing_guest()).unwrap();
    let serial = tmp(&format!("{name}.serial"));
    let _ = std::fs::remove_file(&serial);
    let sock = tmp(&format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["run", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    let vm = Capsule { child, sock };
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&vm.sock).is_err() {
        assert!(Instant::now() < deadline, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let put = |path: &str, body: String| exchange(&vm.sock, &request("PUT", path, &body));
    assert_eq!(
        put(
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#.into()
        ),
        204
    );
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(put("/boot-source", boot), 204);
    let ser = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(put("/serial", ser), 204);
    assert_eq!(
        put("/actions", r#"{"action_type": "InstanceStart"}"#.into()),
        204
    );
    wait_for_output(&serial, 0);
    (vm, serial)
}

fn wait_for_output(serial: &std::path::Path, beyond: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while file_len(serial) <= beyond {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `total` requests from `clients` threads: every eighth one
/// malformed, the others `GET /`, pause, resume and `PUT /logger` in turn.
/// A 429 (more clients than the server's connection limit) is counted
/// and the request retried.
fn load(name: &str, total: usize, clients: usize) -> Report {
    let (mut vm, serial) = running_vm(name);
    let log = tmp(&format!("{name}.log"));
    let logger = format!(r#"{{"log_path": "{}", "level": "Warning"}}"#, log.display());
    let bad = Arc::new(malformed());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (sock, next, bad, logger) =
                (vm.sock.clone(), next.clone(), bad.clone(), logger.clone());
            std::thread::spawn(move || {
                let mut r = Report::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return r;
                    }
                    let (bytes, want): (Vec<u8>, &[u16]) = match i % 8 {
                        7 => (bad[(i / 8) % bad.len()].clone(), MALFORMED_ANSWERS),
                        0 | 3 | 5 => (request("GET", "/", ""), &[200]),
                        1 => (request("PATCH", "/vm", r#"{"state": "Paused"}"#), &[204]),
                        2 | 6 => (request("PATCH", "/vm", r#"{"state": "Resumed"}"#), &[204]),
                        _ => (request("PUT", "/logger", &logger), &[204]),
                    };
                    loop {
                        let t = Instant::now();
                        let status = exchange(&sock, &bytes);
                        if status == 429 {
                            r.busy += 1;
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        assert!(
                            want.contains(&status),
                            "request {i} ({:?}...): status {status}, expected {want:?}",
                            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
                        );
                        r.latencies.push(t.elapsed());
                        if i % 8 == 7 {
                            r.malformed += 1;
                        }
                        break;
                    }
                }
            })
        })
        .collect();
    let mut report = Report::default();
    for t in threads {
        let r = t.join().expect("a client failed");
        report.latencies.extend(r.latencies);
        report.busy += r.busy;
        report.malformed += r.malformed;
    }
    let elapsed = started.elapsed();

    // The VM is alive, answers, and its guest still runs once resumed.
    assert!(vm.child.try_wait().unwrap().is_none(), "capsule died");
    assert_eq!(
        exchange(
            &vm.sock,
            &request("PATCH", "/vm", r#"{"state": "Resumed"}"#)
        ),
        204
    );
    assert_eq!(exchange(&vm.sock, &request("GET", "/", "")), 200);
    let before = file_len(&serial);
    wait_for_output(&serial, before);
    let _ = vm.child.kill();
    let mut err = String::new();
    if let Some(mut e) = vm.child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(!err.contains("panicked"), "{err}");
    println!(
        "{name}: {total} requests ({} malformed) from {clients} clients in {:.2} s: \
         latency of the answers p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         {} attempts answered 429 (busy) and retried",
        report.malformed,
        elapsed.as_secs_f64(),
        report.percentile(50).as_secs_f64() * 1e3,
        report.percentile(99).as_secs_f64() * 1e3,
        report.percentile(100).as_secs_f64() * 1e3,
        report.busy
    );
    report
}

#[test]
fn control_plane_1000_requests_32_clients() {
    let r = load("load-1000", 1000, 32);
    assert_eq!(r.latencies.len(), 1000);
    assert_eq!(r.malformed, 1000 / 8);
}
