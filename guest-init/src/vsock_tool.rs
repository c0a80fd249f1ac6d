//! `capsule-vsock`: a small static vsock and Unix-socket relay for the
//! boot tests (busybox has no vsock client or server, nor Unix sockets in
//! its nc). It runs on both sides:
//!
//! ```text
//! capsule-vsock connect CID PORT           guest → host: stdin to the
//!                                          connection, the connection to stdout
//! capsule-vsock listen PORT CMD            guest: serve each connection on PORT
//!                                          with `sh -c CMD` (connection on 0 and 1);
//!                                          prints `listening on port PORT` on stderr
//!                                          once connections can come
//! capsule-vsock unix-connect PATH PORT     host → guest through capsule's socket:
//!                                          `CONNECT PORT`, expect `OK`, then relay
//! capsule-vsock unix-listen PATH CMD       host: serve each connection on PATH
//!                                          with `sh -c CMD`
//! ```
//!
//! A client ends when the peer has closed its side and all of stdin was
//! sent (shutting down its sending side at stdin's end). Statuses: 0 done,
//! 1 connection refused or failed, 3 connection reset while sending or
//! receiving, 2 usage.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

/// Read and write size of the relay (the size of Linux's default vsock
/// receive buffer, so one read can take what a full credit delivered).
const BUF: usize = 256 * 1024;

fn die(status: i32, msg: &str) -> ! {
    eprintln!("capsule-vsock: {msg}");
    std::process::exit(status);
}

fn socket(domain: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vm_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: plain old data; all-zero is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn check(r: i32) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let s = socket(libc::AF_VSOCK)?;
    let a = vm_addr(cid, port);
    let len = vm_len();
    // SAFETY: a is a valid sockaddr_vm of len bytes.
    check(unsafe { libc::connect(s.as_raw_fd(), std::ptr::addr_of!(a).cast(), len) })?;
    Ok(s)
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let s = socket(libc::AF_VSOCK)?;
    let a = vm_addr(libc::VMADDR_CID_ANY, port);
    let len = vm_len();
    // SAFETY: a is a valid sockaddr_vm of len bytes.
    check(unsafe { libc::bind(s.as_raw_fd(), std::ptr::addr_of!(a).cast(), len) })?;
    // SAFETY: plain system call on an owned socket.
    check(unsafe { libc::listen(s.as_raw_fd(), 64) })?;
    Ok(s)
}

fn accept(fd: RawFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: null address pointers are allowed.
        let c = unsafe { libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if c >= 0 {
            // SAFETY: a fresh descriptor owned here.
            return Ok(unsafe { OwnedFd::from_raw_fd(c) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Serves each connection on `listener` with `sh -c cmd` in a child whose
/// stdin and stdout are the connection.
fn serve(listener: RawFd, cmd: &str) -> ! {
    // SAFETY: reaping children automatically; no handler runs.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let sh = CString::new("/bin/sh").unwrap_or_default();
    let args = [
        CString::new("sh").unwrap_or_default(),
        CString::new("-c").unwrap_or_default(),
        CString::new(cmd).unwrap_or_else(|_| die(2, "NUL in the command")),
    ];
    loop {
        let conn = match accept(listener) {
            Ok(c) => c,
            Err(e) => die(1, &format!("accept: {e}")),
        };
        // SAFETY: fork in a single-threaded process.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
            argv.push(std::ptr::null());
            // SAFETY: dup2 of owned descriptors, then execv with
            // NUL-terminated strings and a null-terminated vector.
            unsafe {
                libc::dup2(conn.as_raw_fd(), 0);
                libc::dup2(conn.as_raw_fd(), 1);
                libc::signal(libc::SIGCHLD, libc::SIG_DFL);
                libc::execv(sh.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
        }
        if pid < 0 {
            die(1, &format!("fork: {}", io::Error::last_os_error()));
        }
    }
}

fn reset_like(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    )
}

/// Relays stdin to `conn` (then shuts its sending side) and `conn` to
/// stdout; returns when both are done.
fn relay(conn: OwnedFd) -> ! {
    let mut rx = std::fs::File::from(conn);
    let mut tx = rx
        .try_clone()
        .unwrap_or_else(|e| die(1, &format!("dup: {e}")));
    let sender = std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => die(1, &format!("stdin: {e}")),
            };
            if let Err(e) = tx.write_all(&buf[..n]) {
                if reset_like(&e) {
                    die(3, &format!("connection reset while sending: {e}"));
                }
                die(1, &format!("send: {e}"));
            }
        }
        // SAFETY: plain system call on an owned socket.
        unsafe { libc::shutdown(tx.as_raw_fd(), libc::SHUT_WR) };
    });
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; BUF];
    loop {
        match rx.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stdout.write_all(&buf[..n]).is_err() {
                    die(1, "stdout closed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if reset_like(&e) => die(3, &format!("connection reset while receiving: {e}")),
            Err(e) => die(1, &format!("receive: {e}")),
        }
    }
    let _ = stdout.flush();
    let _ = sender.join();
    std::process::exit(0);
}

/// `CONNECT port` on capsule's socket; the `OK` line is consumed a byte at
/// a time so that no stream byte is lost.
fn unix_connect(path: &str, port: u32) -> OwnedFd {
    let mut s = UnixStream::connect(path).unwrap_or_else(|e| die(1, &format!("{path}: {e}")));
    if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        die(1, &format!("{path}: {e}"));
    }
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) if line.len() < 64 => line.push(b[0]),
            Ok(_) => die(1, &format!("port {port}: connection refused (no OK)")),
            Err(e) => die(1, &format!("port {port}: {e}")),
        }
    }
    if !line.starts_with(b"OK ") {
        die(
            1,
            &format!(
                "port {port}: unexpected reply {:?}",
                String::from_utf8_lossy(&line)
            ),
        );
    }
    OwnedFd::from(s)
}

fn num(s: Option<&String>) -> u32 {
    s.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| die(2, "expected a number"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("connect") => {
            let (cid, port) = (num(args.get(2)), num(args.get(3)));
            match vsock_connect(cid, port) {
                Ok(s) => relay(s),
                Err(e) => die(1, &format!("connect to {cid}:{port}: {e}")),
            }
        }
        Some("listen") if args.len() == 4 => {
            let port = num(args.get(2));
            let l = vsock_listen(port).unwrap_or_else(|e| die(1, &format!("listen {port}: {e}")));
            // Scripts wait for this line before connecting (the shell's
            // echo of the command line cannot be taken for it). One
            // write(2): eprintln! writes its pieces one by one, and two
            // listeners started together interleaved them on the console
            // ("listening on port capsule-vsock: listening on port 5010",
            // then "5002"), so the line a script waited for never came.
            let line = format!("capsule-vsock: listening on port {port}\n");
            let _ = io::stderr().write_all(line.as_bytes());
            serve(l.as_raw_fd(), &args[3]);
        }
        Some("unix-connect") if args.len() == 4 => {
            let s = unix_connect(&args[2], num(args.get(3)));
            relay(s)
        }
        Some("unix-listen") if args.len() == 4 => {
            let l = UnixListener::bind(&args[2])
                .unwrap_or_else(|e| die(1, &format!("{}: {e}", args[2])));
            serve(l.as_raw_fd(), &args[3]);
        }
        _ => die(
            2,
            "usage: capsule-vsock connect CID PORT | listen PORT CMD | unix-connect PATH PORT | unix-listen PATH CMD",
        ),
    }
}

/// The size of `sockaddr_vm` (16 bytes) as a `socklen_t`.
fn vm_len() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap_or(16)
}
