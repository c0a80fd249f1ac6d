//! One exec'd process's connection to the guest init (`ctr task exec`,
//! `kubectl exec`): the shim connects to the microVM's vsock socket
//! (`--vsock-socket`, Firecracker's hybrid vsock: `CONNECT 10001` and an
//! `OK` line), sends the process as a `Spec` frame, waits for `Started`
//! (or the init's `Error`), then moves containerd's FIFOs to and from
//! `Stdin`/`Stdout`/`Stderr` frames until `Exit`. Kill and close_io are a
//! `Signal` and a `StdinEof` frame on the same connection.
//!
//! Nothing the guest sends is trusted: frames are decoded with
//! `exec-proto`'s bounded decoder, and a malformed or unexpected one ends
//! the process's connection with [`STATUS_PROTOCOL`] rather than a panic.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exec_proto::{Decoder, ExecSpec, GuestMsg, HostMsg, EXEC_VSOCK_PORT};

/// How long to keep trying the exec port (the microVM may still be
/// booting, or its init not yet listening).
pub const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// How long the init may take to answer the `Spec`.
pub const START_WAIT: Duration = Duration::from_secs(30);
/// The status of an exec whose connection ended without an `Exit`: the
/// microVM is gone, and the process was killed with it (SIGKILL, as
/// runc's exec'd processes die with the container's init).
pub const STATUS_VM_GONE: u32 = 128 + 9;
/// The status of an exec whose guest sent a malformed frame.
pub const STATUS_PROTOCOL: u32 = 255;
/// Longest `OK ...` line the vsock device answers with.
const MAX_REPLY: usize = 64;
/// Read size for the connection and the stdin pipe.
const CHUNK: usize = 64 * 1024;

/// Why an exec could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected to, for a reason waiting does
    /// not mend.
    #[error("cannot connect to the microVM's vsock socket {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The exec port did not accept within the wait.
    #[error("the microVM's exec port did not answer within {0:?} (last: {1})")]
    NotReady(Duration, String),
    /// The init could not set the process up (no such directory, ...).
    #[error("the guest cannot run the process: {0}")]
    Refused(String),
    /// The guest sent something it should not have.
    #[error("the guest broke the exec protocol: {0}")]
    Protocol(String),
    /// Writing to the guest failed.
    #[error("cannot send to the guest: {0}")]
    Send(#[source] io::Error),
    /// The process cannot be described to the init (a NUL byte).
    #[error("the process cannot be passed to the guest: {0}")]
    Spec(#[from] exec_proto::SpecError),
}

/// Whether a failed attempt is worth repeating: no socket yet, no
/// listener in the guest yet (the device closes the connection), or no
/// answer yet.
fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// One `CONNECT` attempt: the stream after the device's `OK` line.
fn try_connect(path: &Path) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {EXEC_VSOCK_PORT}\n").as_bytes())?;
    // Byte by byte: the guest's frames follow the line at once.
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "overlong reply to CONNECT",
            ));
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Connects to the init's exec port through the vsock socket at `path`,
/// trying again for up to `wait` while it is not there yet.
pub fn connect(path: &Path, wait: Duration) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + wait;
    loop {
        match try_connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if retryable(&e) => {
                if Instant::now() >= deadline {
                    return Err(Error::NotReady(wait, e.to_string()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Writes one host frame.
fn send(stream: &mut UnixStream, msg: &HostMsg) -> io::Result<()> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    stream.write_all(&buf)
}

/// Sends the process and waits (at most `wait`) for the init to start
/// it. Returns the decoder holding whatever followed `Started`. Without
/// a stdin, the process's stdin is ended at once (as `/dev/null`).
pub fn start(
    stream: &mut UnixStream,
    spec: &ExecSpec,
    has_stdin: bool,
    wait: Duration,
) -> Result<Decoder, Error> {
    send(stream, &HostMsg::Spec(spec.to_bytes()?)).map_err(Error::Send)?;
    if !has_stdin {
        send(stream, &HostMsg::StdinEof).map_err(Error::Send)?;
    }
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        while let Some(frame) = dec
            .next_frame()
            .map_err(|e| Error::Protocol(e.to_string()))?
        {
            match GuestMsg::parse(frame).map_err(|e| Error::Protocol(e.to_string()))? {
                GuestMsg::Started => {
                    stream
                        .set_read_timeout(None)
                        .map_err(|e| Error::Protocol(e.to_string()))?;
                    return Ok(dec);
                }
                GuestMsg::Error(m) => return Err(Error::Refused(m)),
                GuestMsg::Heartbeat => {}
                other => {
                    return Err(Error::Protocol(format!(
                        "{} before the process started",
                        name(&other)
                    )))
                }
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(Error::Protocol("the guest closed the connection".into())),
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::NotReady(wait, "no answer to the process".into()))
            }
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
    }
}

/// A message's name for the logs (never its payload).
fn name(m: &GuestMsg) -> &'static str {
    match m {
        GuestMsg::Hello { .. } => "Hello",
        GuestMsg::Stdout(_) => "Stdout",
        GuestMsg::Stderr(_) => "Stderr",
        GuestMsg::Started => "Started",
        GuestMsg::Heartbeat => "Heartbeat",
        GuestMsg::Exit(_) => "Exit",
        GuestMsg::Error(_) => "Error",
        GuestMsg::File { .. } => "File",
        GuestMsg::FileData(_) => "FileData",
        GuestMsg::Dir { .. } => "Dir",
        GuestMsg::Oom(_) => "Oom",
    }
}

/// Reads an events watch ([`ExecSpec::watch`], started with [`start`])
/// until the guest closes it (the microVM ends): `on_oom` with each
/// `Oom` frame's count. A malformed or unexpected frame ends the watch.
pub fn watch_events(
    mut stream: impl Read,
    mut dec: Decoder,
    id: &str,
    mut on_oom: impl FnMut(u32),
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        loop {
            let msg = match dec.next_frame().map(|f| f.map(GuestMsg::parse)) {
                Ok(Some(Ok(m))) => m,
                Ok(None) => break,
                Ok(Some(Err(e))) | Err(e) => {
                    log::warn!("events of {id}: bad frame from the guest: {e}");
                    return;
                }
            };
            match msg {
                GuestMsg::Oom(n) => on_oom(n),
                GuestMsg::Heartbeat => {}
                other => {
                    log::warn!("events of {id}: unexpected {} frame", name(&other));
                    return;
                }
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("events of {id}: {e}");
                return;
            }
        }
    }
}

/// Writes `data` to an output FIFO; once its reader is gone, output is
/// dropped (the process goes on, as with runc when `ctr` detaches).
fn write_out(out: &mut Option<File>, data: &[u8], what: &str) {
    if let Some(f) = out.as_mut() {
        if let Err(e) = f.write_all(data) {
            log::debug!("exec {what}: {e}; dropping its output from now on");
            *out = None;
        }
    }
}

/// Moves the guest's frames to the process's stdout and stderr FIFOs
/// until `Exit`; returns the process's status ([`STATUS_VM_GONE`] if the
/// connection ends without one, [`STATUS_PROTOCOL`] on a bad frame).
pub fn pump_output(
    mut stream: impl Read,
    mut dec: Decoder,
    stdout: File,
    stderr: File,
    id: &str,
) -> u32 {
    let (mut stdout, mut stderr) = (Some(stdout), Some(stderr));
    let mut buf = vec![0u8; CHUNK];
    loop {
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("exec {id}: bad frame from the guest: {e}");
                    return STATUS_PROTOCOL;
                }
            };
            match GuestMsg::parse(frame) {
                Ok(GuestMsg::Stdout(d)) => write_out(&mut stdout, &d, "stdout"),
                Ok(GuestMsg::Stderr(d)) => write_out(&mut stderr, &d, "stderr"),
                Ok(GuestMsg::Exit(code)) => return u32::from(code),
                Ok(GuestMsg::Heartbeat) => {}
                Ok(GuestMsg::Error(m)) => log::warn!("exec {id}: the guest init says: {m}"),
                Ok(other) => {
                    log::warn!(
                        "exec {id}: unexpected {} frame from the guest",
                        name(&other)
                    );
                    return STATUS_PROTOCOL;
                }
                Err(e) => {
                    log::warn!("exec {id}: bad frame from the guest: {e}");
                    return STATUS_PROTOCOL;
                }
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                log::info!("exec {id}: the microVM ended before the process did");
                return STATUS_VM_GONE;
            }
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::info!("exec {id}: connection to the guest: {e}");
                return STATUS_VM_GONE;
            }
        }
    }
}

/// The sending side of an exec's connection, shared by its stdin copy,
/// kill and close_io: one frame at a time.
#[derive(Debug, Clone)]
pub struct Sender(Arc<Mutex<UnixStream>>);

impl Sender {
    /// Sends on `stream` (a clone of the connection).
    pub fn new(stream: UnixStream) -> Self {
        Self(Arc::new(Mutex::new(stream)))
    }

    /// Sends one frame.
    pub fn send(&self, msg: &HostMsg) -> io::Result<()> {
        let mut s = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        send(&mut s, msg)
    }
}

/// Copies the process's stdin (the read end of [`crate::stdin::copy`]'s
/// pipe) into `Stdin` frames, and its end into `StdinEof`.
pub fn pump_stdin(mut from: File, to: &Sender) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = to.send(&HostMsg::Stdin(buf[..n].to_vec())) {
                    log::debug!("exec stdin: {e}");
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("exec stdin: {e}");
                break;
            }
        }
    }
    if let Err(e) = to.send(&HostMsg::StdinEof) {
        log::debug!("exec stdin end: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn frames(msgs: &[GuestMsg]) -> Vec<u8> {
        let mut b = Vec::new();
        for m in msgs {
            m.encode(&mut b);
        }
        b
    }

    fn host_msgs(bytes: &[u8]) -> Vec<HostMsg> {
        let mut d = Decoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(HostMsg::parse(f).unwrap());
        }
        out
    }

    /// A fresh temporary path (tests run in parallel).
    fn temp(name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("capsule-shim-{name}-{}-{n}", std::process::id()))
    }

    /// Reads host frames from `s` until `want` have come.
    fn read_host(s: &mut UnixStream, want: usize) -> Vec<HostMsg> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while out.len() < want {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {out:?}");
            d.push(&buf[..n]);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(HostMsg::parse(f).unwrap());
            }
        }
        out
    }

    /// Output to a file, read back.
    fn outputs(stream: &[u8]) -> (u32, Vec<u8>, Vec<u8>) {
        let (o, e) = (temp("out"), temp("err"));
        let status = pump_output(
            stream,
            Decoder::new(),
            File::create(&o).unwrap(),
            File::create(&e).unwrap(),
            "t",
        );
        let got = (
            status,
            std::fs::read(&o).unwrap(),
            std::fs::read(&e).unwrap(),
        );
        std::fs::remove_file(o).unwrap();
        std::fs::remove_file(e).unwrap();
        got
    }

    #[test]
    fn output_frames_reach_the_fifos_and_exit_is_the_status() {
        let s = frames(&[
            GuestMsg::Stdout(b"from-exec\n".to_vec()),
            GuestMsg::Heartbeat,
            GuestMsg::Stderr(b"warn\n".to_vec()),
            GuestMsg::Exit(3),
            GuestMsg::Stdout(b"after the end".to_vec()),
        ]);
        assert_eq!(
            outputs(&s),
            (3, b"from-exec\n".to_vec(), b"warn\n".to_vec())
        );
    }

    #[test]
    fn hostile_or_cut_streams_end_the_exec_without_a_panic() {
        // Cut short: the microVM went away.
        let s = frames(&[GuestMsg::Stdout(b"x".to_vec())]);
        assert_eq!(outputs(&s).0, STATUS_VM_GONE);
        assert_eq!(outputs(&s[..3]).0, STATUS_VM_GONE);
        // A frame announcing 4 GiB, an unknown kind, a host kind, a
        // copy-back frame (not for an exec), a bad Exit.
        for bad in [
            vec![exec_proto::kind::STDOUT, 0xff, 0xff, 0xff, 0xff],
            vec![0x7e, 0, 0, 0, 0],
            vec![exec_proto::kind::STDIN, 0, 0, 0, 0],
            frames(&[GuestMsg::FileData(vec![1])]),
            vec![exec_proto::kind::EXIT, 1, 0, 0, 0, 9],
        ] {
            assert_eq!(outputs(&bad).0, STATUS_PROTOCOL, "{bad:?}");
        }
    }

    /// A fake vsock device: accepts one client, checks its CONNECT line,
    /// answers `reply`, then runs `then` on the stream.
    fn device(
        path: &Path,
        reply: &'static [u8],
        then: impl FnOnce(UnixStream) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = [0u8; 14];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 10001\n");
            s.write_all(reply).unwrap();
            then(s);
        })
    }

    #[test]
    fn start_sends_the_spec_and_waits_for_started() {
        let path = temp("dev1");
        let _ = std::fs::remove_file(&path);
        let dev = device(&path, b"OK 1073741824\n", |mut s| {
            let msgs = read_host(&mut s, 2);
            assert!(
                matches!(&msgs[..], [HostMsg::Spec(_), HostMsg::StdinEof]),
                "{msgs:?}"
            );
            s.write_all(&frames(&[
                GuestMsg::Started,
                GuestMsg::Stdout(b"early".to_vec()),
            ]))
            .unwrap();
        });
        let mut s = connect(&path, Duration::from_secs(5)).unwrap();
        let spec = ExecSpec {
            argv: vec![b"true".to_vec()],
            cwd: b"/".to_vec(),
            ..ExecSpec::default()
        };
        let mut dec = start(&mut s, &spec, false, Duration::from_secs(5)).unwrap();
        dev.join().unwrap();
        // What came right behind Started is kept for the output pump.
        let f = dec.next_frame().unwrap().unwrap();
        assert_eq!(
            GuestMsg::parse(f).unwrap(),
            GuestMsg::Stdout(b"early".to_vec())
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_init_s_error_refuses_the_exec_and_no_socket_is_not_ready() {
        let path = temp("dev2");
        let _ = std::fs::remove_file(&path);
        let dev = device(&path, b"OK 5\n", |mut s| {
            let msgs = read_host(&mut s, 1);
            assert!(matches!(&msgs[..], [HostMsg::Spec(_)]), "{msgs:?}");
            s.write_all(&frames(&[GuestMsg::Error("no such dir".into())]))
                .unwrap();
        });
        let mut s = connect(&path, Duration::from_secs(5)).unwrap();
        let spec = ExecSpec {
            argv: vec![b"x".to_vec()],
            ..ExecSpec::default()
        };
        let e = start(&mut s, &spec, true, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(&e, Error::Refused(m) if m == "no such dir"), "{e}");
        dev.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = connect(&path, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, Error::NotReady(..)), "{e}");
        // A device that answers something else is not retried.
        let dev = device(&path, b"NO\n", |_| {});
        let e = connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, Error::Connect { .. }), "{e}");
        dev.join().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn stdin_becomes_frames_then_its_end() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (r, mut w) = {
            let (r, w) = UnixStream::pair().unwrap();
            (File::from(std::os::fd::OwnedFd::from(r)), w)
        };
        w.write_all(b"line\n").unwrap();
        drop(w);
        pump_stdin(r, &Sender::new(a));
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(
            host_msgs(&got),
            [HostMsg::Stdin(b"line\n".to_vec()), HostMsg::StdinEof]
        );
    }

    #[test]
    fn an_events_watch_reports_each_oom_until_the_guest_closes_it() {
        let mut got = Vec::new();
        let stream = frames(&[GuestMsg::Heartbeat, GuestMsg::Oom(1), GuestMsg::Oom(3)]);
        watch_events(&stream[..], Decoder::new(), "c", |n| got.push(n));
        assert_eq!(got, [1, 3]);
        // Anything else ends it.
        let mut got = Vec::new();
        let stream = frames(&[GuestMsg::Stdout(b"x".to_vec()), GuestMsg::Oom(1)]);
        watch_events(&stream[..], Decoder::new(), "c", |n| got.push(n));
        assert!(got.is_empty());
    }
}
