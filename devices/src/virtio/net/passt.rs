//! The passt process behind `--net user`: started on one end of a socket
//! pair (`passt --fd 3 --foreground`; with `--fd` passt serves that one
//! connection and exits when it closes), spoken to through a
//! [`StreamBackend`], stopped when dropped. passt answers the guest's
//! DHCP, forwards its outbound connections through host sockets and, for
//! `-t HOST:GUEST`, host ports to the guest.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::backend::{NetBackend, SendStatus};
use super::stream::StreamBackend;
use crate::child::{hand_over, max_fd};

/// Errors from starting passt.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// The passt binary is not there.
    #[error("cannot start passt for --net user: {0} not found (install the Debian package passt, or set CAPSULE_PASST to its path)")]
    NotInstalled(PathBuf),
    /// Starting the process failed otherwise.
    #[error("cannot start passt ({path}): {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket pair could not be created.
    #[error("cannot create the socket pair for passt: {0}")]
    Socket(#[source] io::Error),
    /// A host port to publish is taken or may not be bound.
    #[error("cannot publish host port {host} (publish={host}:{guest}): {why}")]
    Publish {
        /// The host port.
        host: u16,
        /// The guest port.
        guest: u16,
        /// Why, and what to do.
        #[source]
        why: PublishError,
    },
}

/// Why a host port cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Another program listens on the port.
    #[error("another program is listening on it (ss -ltnp 'sport = {0}' shows which); pick another host port")]
    InUse(u16),
    /// The port is below the unprivileged limit.
    #[error("ports below 1024 need privileges; pick a port from 1024 on (e.g. publish={instead}:{guest})")]
    Privileged {
        /// A port to use instead.
        instead: u32,
        /// The guest port.
        guest: u16,
    },
    /// Binding failed otherwise.
    #[error("{0}")]
    Bind(#[source] io::Error),
}

/// Checks that every host port to publish can be bound, as passt will try
/// to (it would otherwise fail in the background, after the VM started):
/// a port another program listens on, or one below the unprivileged
/// limit, is refused with what to do. The probe socket is closed at once.
fn check_publish(publish: &[(u16, u16)]) -> Result<(), PasstError> {
    for &(host, guest) in publish {
        let why = match std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, host)) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => PublishError::InUse(host),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => PublishError::Privileged {
                instead: u32::from(host) + 8000,
                guest,
            },
            Err(e) => PublishError::Bind(e),
        };
        return Err(PasstError::Publish { host, guest, why });
    }
    Ok(())
}

/// How to run passt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasstConfig {
    /// The passt binary (looked up in `PATH` if it has no `/`).
    pub binary: PathBuf,
    /// TCP ports to forward: (host port, guest port).
    pub publish: Vec<(u16, u16)>,
    /// Extra log output from passt on capsule's stderr.
    pub debug: bool,
}

/// The descriptor number passt gets its end of the socket pair under.
const PASST_FD: RawFd = 3;

/// A running passt process and the stream socket to it. Dropping it stops
/// passt.
#[derive(Debug)]
pub struct Passt {
    stream: StreamBackend,
    child: Child,
}

impl Passt {
    /// Starts passt connected to a new socket pair. passt gets exactly
    /// stdin, stdout, stderr and its end of the pair as descriptor
    /// `PASST_FD` (3); nothing else capsule holds (KVM, other devices'
    /// eventfds, disk images, TAP devices) reaches it.
    pub fn spawn(config: &PasstConfig) -> Result<Self, PasstError> {
        check_publish(&config.publish)?;
        let (ours, theirs) = socket_pair().map_err(PasstError::Socket)?;
        let mut cmd = Command::new(&config.binary);
        cmd.arg("--fd")
            .arg(PASST_FD.to_string())
            .arg("--foreground");
        let theirs_fd = theirs.as_raw_fd();
        let max_fd = max_fd();
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only async-signal-safe system calls (no allocation, no
        // locks); `theirs` stays open in the parent until after the spawn.
        unsafe {
            cmd.pre_exec(move || hand_over(theirs_fd, PASST_FD, max_fd));
        }
        if config.debug {
            // passt's messages (its address choices, errors) on our
            // stderr, but not its own --debug: the passt of Debian 12
            // (0.0~git20230309) dies of SIGSEGV in its debug logging on the
            // guest's first TCP connection.
            cmd.arg("--stderr");
        } else {
            cmd.arg("--quiet");
        }
        if !config.publish.is_empty() {
            let spec: Vec<String> = config
                .publish
                .iter()
                .map(|(h, g)| format!("{h}:{g}"))
                .collect();
            cmd.arg("--tcp-ports").arg(spec.join(","));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if !config.debug {
            cmd.stderr(Stdio::null());
        }
        let child = cmd.spawn().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                PasstError::NotInstalled(config.binary.clone())
            } else {
                PasstError::Spawn {
                    path: config.binary.clone(),
                    source,
                }
            }
        })?;
        drop(theirs);
        log::info!(
            "started passt (pid {}) for user-mode networking",
            child.id()
        );
        let stream =
            StreamBackend::new(UnixStream::from(ours), "passt").map_err(PasstError::Socket)?;
        Ok(Self { stream, child })
    }

    /// The passt process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Adds to an error that ends the connection how passt ended, so that
    /// the one `link problem` line says why (passt is run with `--quiet`
    /// and its stderr closed unless capsule logs at debug level).
    fn explain(&mut self, e: io::Error) -> io::Error {
        if !matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
        ) {
            return e;
        }
        // passt's end of the socket closes as it exits: give it a moment to
        // become reapable (at most 100 ms, once per link failure).
        let mut status = None;
        for _ in 0..20 {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    break;
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                Err(_) => break,
            }
        }
        let how = match status {
            Some(s) => format!("passt exited ({s})"),
            None => "passt is still running".to_string(),
        };
        io::Error::new(
            e.kind(),
            format!("{e}; {how}; CAPSULE_LOG=debug shows passt's own messages"),
        )
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl NetBackend for Passt {
    fn raw_fd(&self) -> RawFd {
        self.stream.raw_fd()
    }
    fn describe(&self) -> String {
        format!("passt (pid {})", self.child.id())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.stream.recv(buf).map_err(|e| self.explain(e))
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<SendStatus> {
        self.stream.send(frame).map_err(|e| self.explain(e))
    }
    fn has_pending_output(&self) -> bool {
        self.stream.has_pending_output()
    }
    fn flush(&mut self) -> io::Result<bool> {
        self.stream.flush().map_err(|e| self.explain(e))
    }
}

/// A connected Unix stream socket pair, both ends close-on-exec (so no
/// other child inherits either); passt's end is handed over explicitly by
/// [`hand_over`]. Theirs is numbered above stderr, where the child's stdio
/// set-up cannot overwrite it.
fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into the array we pass.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (ours, mut theirs) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if theirs.as_raw_fd() <= libc::STDERR_FILENO {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; the result is new.
        let fd = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PASST_FD) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        theirs = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok((ours, theirs))
}

/// The passt binary to use: `$CAPSULE_PASST`, else `passt` from `PATH`.
pub fn default_passt_binary() -> PathBuf {
    std::env::var_os("CAPSULE_PASST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("passt").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::{MAX_FRAME_LEN, VNET_HDR_LEN};

    #[test]
    fn missing_passt_binary_is_a_clear_error() {
        let cfg = PasstConfig {
            binary: PathBuf::from("/nonexistent/passt"),
            publish: vec![],
            debug: false,
        };
        let e = Passt::spawn(&cfg).unwrap_err();
        assert!(matches!(e, PasstError::NotInstalled(_)));
        assert!(e.to_string().contains("passt"));
    }

    /// A stand-in passt that records its arguments in `out` and exits.
    fn recording_passt(out: &Path) -> PathBuf {
        let script = out.with_extension("sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$@\" >'{}'\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        script
    }

    fn passt_args(debug: bool, publish: Vec<(u16, u16)>) -> String {
        let out = std::env::temp_dir().join(format!(
            "capsule-passt-args-{}-{debug}-{}",
            std::process::id(),
            publish.len()
        ));
        let _ = std::fs::remove_file(&out);
        let cfg = PasstConfig {
            binary: recording_passt(&out),
            publish,
            debug,
        };
        let passt = Passt::spawn(&cfg).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let args = loop {
            match std::fs::read_to_string(&out) {
                Ok(a) if a.ends_with('\n') => break a,
                _ => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "passt stand-in did not run"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        };
        drop(passt);
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(out.with_extension("sh"));
        args
    }

    #[test]
    fn passt_arguments() {
        let quiet = passt_args(false, vec![(8080, 80), (2222, 22)]);
        assert!(
            quiet.starts_with("--fd ") && quiet.contains(" --foreground --quiet"),
            "{quiet}"
        );
        assert!(quiet.contains("--tcp-ports 8080:80,2222:22"), "{quiet}");
        // Debug logging shows passt's messages but never passes --debug,
        // with which Debian 12's passt crashes on the first TCP connection.
        let debug = passt_args(true, vec![]);
        assert!(debug.contains(" --foreground --stderr"), "{debug}");
        assert!(
            !debug.contains("--debug") && !debug.contains("--quiet"),
            "{debug}"
        );
    }

    /// passt gets exactly 0, 1, 2 and its socket as 3: not capsule's
    /// eventfds nor a descriptor capsule itself inherited without
    /// close-on-exec.
    #[test]
    fn passt_inherits_only_its_socket() {
        let out = std::env::temp_dir().join(format!("capsule-passt-fds-{}", std::process::id()));
        let script = out.with_extension("sh");
        // What an exec'd program gets: the list of an exec'd ls, without
        // ls's own directory descriptor.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n(exec ls -l /proc/self/fd/) >'{0}.tmp'; mv '{0}.tmp' '{0}'\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let _ = std::fs::remove_file(&out);
        let evt = crate::eventfd().unwrap();
        // A descriptor without close-on-exec, as if capsule's parent leaked it.
        // SAFETY: dup of a descriptor we own; the copy is owned by `leaked`.
        let leaked = unsafe { OwnedFd::from_raw_fd(libc::dup(evt.as_raw_fd())) };
        let cfg = PasstConfig {
            binary: script.clone(),
            publish: vec![],
            debug: false,
        };
        let passt = Passt::spawn(&cfg).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let list = loop {
            if let Ok(l) = std::fs::read_to_string(&out) {
                break l;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the stand-in did not run"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        drop(passt);
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(&script);
        let fds: Vec<(String, String)> = list
            .lines()
            .filter_map(|l| {
                let (left, target) = l.split_once(" -> ")?;
                let n = left.rsplit(' ').next()?.to_string();
                Some((n, target.to_string()))
            })
            .filter(|(_, t)| !(t.starts_with("/proc/") && t.ends_with("/fd")))
            .collect();
        let numbers: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(numbers, ["0", "1", "2", "3"], "{list}");
        assert!(fds[3].1.starts_with("socket:"), "{list}");
        drop(leaked);
    }

    #[test]
    fn passt_exiting_at_once_is_explained() {
        // `false` stands in for a passt that fails to start (as when it
        // cannot sandbox itself) and exits with status 1.
        let cfg = PasstConfig {
            binary: PathBuf::from("false"),
            publish: vec![],
            debug: false,
        };
        let mut p = Passt::spawn(&cfg).unwrap();
        let mut buf = vec![0; VNET_HDR_LEN + MAX_FRAME_LEN];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            match p.recv(&mut buf) {
                Ok(None) => {
                    assert!(std::time::Instant::now() < deadline, "no EOF from passt");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Ok(Some(n)) => panic!("a {n}-byte frame from `false`"),
                Err(e) => break e,
            }
        };
        assert!(crate::virtio::net::is_fatal(&e));
        let msg = e.to_string();
        assert!(msg.contains("passt closed the connection"), "{msg}");
        assert!(msg.contains("passt exited (exit status: 1)"), "{msg}");
        assert!(msg.contains("CAPSULE_LOG=debug"), "{msg}");
    }
}
