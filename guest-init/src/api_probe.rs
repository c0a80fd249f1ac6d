//! `capsule-api-probe`: how long a VMM takes from being started to its API
//! socket's first answer, for bench-boot.
//!
//! ```text
//! capsule-api-probe [--stderr FILE] SOCKET URL_PATH COMMAND [ARGS...]
//! capsule-api-probe --serve SOCKET
//! ```
//!
//! Starts `COMMAND ARGS...` (output discarded, or its stderr written to
//! `FILE`) and, from just before the
//! start, tries every 100 µs to connect to the Unix socket `SOCKET` and
//! `GET URL_PATH`. Prints `socket_ms=S api_ms=A`: when a connection was
//! first accepted and when a `2xx` answer was first read, in milliseconds
//! since the start. The VMM is then sent `SIGTERM` and waited for.
//!
//! The bench used to poll with `curl`, whose own start-up (tens of
//! milliseconds in the nested harness) set the resolution; this measures
//! every VMM the same way to a fraction of a millisecond. Statuses: 0 an
//! answer was read, 1 none within 20 s or the command could not start, 2
//! usage.
//!
//! `--serve SOCKET` is the smallest server the probe can time: it binds
//! `SOCKET` and answers every request `200 OK` until killed. Timed as a
//! VMM (`capsule-api-probe SOCKET / capsule-api-probe --serve SOCKET`), it
//! is the bench's floor for this row: starting a static program that
//! answers on a Unix socket, and nothing else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How long to wait for an answer before giving up.
const GIVE_UP: Duration = Duration::from_secs(20);
/// The pause between attempts: short next to any VMM's start-up, long
/// enough that the probe does not take a vCPU of a small machine from the
/// VMM it measures.
const PAUSE: Duration = Duration::from_micros(100);

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 2 && args[0] == "--serve" {
        return serve(&args[1]);
    }
    let mut stderr = Stdio::null();
    if args.len() > 1 && args[0] == "--stderr" {
        match std::fs::File::create(&args[1]) {
            Ok(f) => stderr = f.into(),
            Err(e) => {
                eprintln!("capsule-api-probe: {}: {e}", args[1]);
                return ExitCode::from(2);
            }
        }
        args.drain(..2);
    }
    if args.len() < 3 {
        eprintln!("usage: capsule-api-probe [--stderr FILE] SOCKET URL_PATH COMMAND [ARGS...]");
        return ExitCode::from(2);
    }
    let (socket, path, command) = (&args[0], &args[1], &args[2..]);
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
    let start = Instant::now();
    let mut child = match Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("capsule-api-probe: cannot start {}: {e}", command[0]);
            return ExitCode::from(1);
        }
    };
    let mut connected = None;
    let mut answered = None;
    while answered.is_none() && start.elapsed() < GIVE_UP {
        if let Ok(mut s) = UnixStream::connect(socket) {
            connected.get_or_insert_with(|| start.elapsed());
            if is_2xx(&mut s, &request) {
                answered = Some(start.elapsed());
                break;
            }
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(PAUSE);
    }
    // SAFETY: kill(2) on the child's pid, which has not been reaped yet (it
    // is waited for below), so the pid still names this child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    match answered {
        Some(a) => {
            let c = connected.unwrap_or(a);
            println!("socket_ms={} api_ms={}", ms(c), ms(a));
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("capsule-api-probe: no 2xx answer on {socket}");
            ExitCode::from(1)
        }
    }
}

/// Answers `200 OK` to each request on a socket bound at `path`, one
/// connection at a time, until killed.
fn serve(path: &str) -> ExitCode {
    let listener = match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("capsule-api-probe: cannot bind {path}: {e}");
            return ExitCode::from(1);
        }
    };
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let mut buf = [0u8; 4096];
        // One read holds a probe's whole request.
        if matches!(s.read(&mut buf), Ok(n) if n > 0) {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    }
    ExitCode::SUCCESS
}

/// Sends `request` on `s` and reads the status line: true for `2xx`.
fn is_2xx(s: &mut UnixStream, request: &str) -> bool {
    if s.set_read_timeout(Some(Duration::from_secs(5))).is_err() {
        return false;
    }
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match s.read(&mut head[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    head.starts_with(b"HTTP/1.") && head[9] == b'2'
}
