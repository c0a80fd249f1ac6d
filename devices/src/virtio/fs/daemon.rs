//! Starting and stopping virtiofsd, the process that serves a virtio-fs
//! device's FUSE requests on the host.
//!
//! capsule binds the vhost-user socket itself (owner-only, in a private
//! directory: see capsule's `unixsock`), connects to it and only then
//! starts virtiofsd with the listening socket as descriptor 3
//! (`--fd 3`), so there is no window in which another process could
//! connect first and no waiting for the daemon to create a socket.
//! virtiofsd gets stdin, stdout, stderr and that socket, nothing else
//! (like passt, see `crate::child`). Two daemons are understood:
//!
//! * the maintained Rust virtiofsd (`--shared-dir`, `--readonly`,
//!   `--sandbox`), which `resources/build-virtiofsd.sh` builds;
//! * QEMU's older C virtiofsd (`/usr/lib/qemu/virtiofsd` in Debian 12:
//!   `-o source=`), which cannot share read-only: a `,ro` share with it
//!   is refused rather than left to the guest's good will.

use std::ffi::OsString;
use std::io;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The descriptor number virtiofsd gets the listening socket under.
const DAEMON_FD: i32 = 3;

/// Why virtiofsd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No virtiofsd binary.
    #[error("virtiofsd not found (looked for {0}; install one, build one with resources/build-virtiofsd.sh, or set CAPSULE_VIRTIOFSD to its path)")]
    NotFound(String),
    /// Starting or asking the binary failed.
    #[error("cannot start virtiofsd ({path}): {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The binary cannot do what the share asks for.
    #[error("virtiofsd {path} cannot {what}")]
    Unsupported {
        /// The binary.
        path: PathBuf,
        /// What it cannot do.
        what: &'static str,
    },
}

/// Which virtiofsd command line the binary speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The Rust virtiofsd.
    Rust,
    /// QEMU's C virtiofsd.
    Qemu,
}

/// How to run virtiofsd for one share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The binary.
    pub binary: PathBuf,
    /// The host directory to share.
    pub dir: PathBuf,
    /// Refuse the guest's writes.
    pub read_only: bool,
    /// Show mount points under `dir` as submounts (the Rust daemon's
    /// default; QEMU's does not by default).
    pub submounts: bool,
    /// The daemon's sandbox (`namespace`, `chroot`, `none`), or its own
    /// default.
    pub sandbox: Option<String>,
    /// The daemon's messages on capsule's stderr.
    pub debug: bool,
}

/// The virtiofsd binary to use: `$CAPSULE_VIRTIOFSD`, else the first of
/// `virtiofsd` in `PATH`, `/usr/libexec/virtiofsd` (where distributions
/// put the Rust one) and `/usr/lib/qemu/virtiofsd` (Debian 12's C one).
pub fn find_binary() -> Result<PathBuf, DaemonError> {
    if let Some(p) = std::env::var_os("CAPSULE_VIRTIOFSD") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(DaemonError::NotFound(format!(
                "CAPSULE_VIRTIOFSD={}",
                p.display()
            )))
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("virtiofsd"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push("/usr/libexec/virtiofsd".into());
    candidates.push("/usr/lib/qemu/virtiofsd".into());
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        DaemonError::NotFound(
            "virtiofsd in PATH, /usr/libexec/virtiofsd, /usr/lib/qemu/virtiofsd".into(),
        )
    })
}

/// Which command line `binary` speaks: QEMU's says so in `--version`.
pub fn flavor(binary: &Path) -> Result<Flavor, DaemonError> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| spawn_error(binary, source))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(if text.contains("QEMU") {
        Flavor::Qemu
    } else {
        Flavor::Rust
    })
}

/// The arguments for `config` in `flavor`'s syntax.
pub fn arguments(config: &DaemonConfig, flavor: Flavor) -> Result<Vec<OsString>, DaemonError> {
    let mut args: Vec<OsString> = Vec::new();
    match flavor {
        Flavor::Rust => {
            args.push(format!("--fd={DAEMON_FD}").into());
            let mut dir = OsString::from("--shared-dir=");
            dir.push(&config.dir);
            args.push(dir);
            args.push("--cache=auto".into());
            if config.read_only {
                args.push("--readonly".into());
            }
            if !config.submounts {
                args.push("--no-announce-submounts".into());
            }
            if let Some(s) = &config.sandbox {
                args.push(format!("--sandbox={s}").into());
            }
            let level = if config.debug { "debug" } else { "error" };
            args.push(format!("--log-level={level}").into());
        }
        Flavor::Qemu => {
            if config.read_only {
                return Err(DaemonError::Unsupported {
                    path: config.binary.clone(),
                    what: "share read-only (QEMU's C virtiofsd has no read-only mode; use the Rust virtiofsd)",
                });
            }
            args.push(format!("--fd={DAEMON_FD}").into());
            args.push("-o".into());
            let mut source = OsString::from("source=");
            source.push(&config.dir);
            args.push(source);
            args.push("-o".into());
            args.push("cache=auto".into());
            if let Some(s) = &config.sandbox {
                if s != "none" {
                    args.push("-o".into());
                    args.push(format!("sandbox={s}").into());
                }
            }
            if config.debug {
                args.push("-d".into());
            }
        }
    }
    Ok(args)
}

fn spawn_error(binary: &Path, source: io::Error) -> DaemonError {
    if source.kind() == io::ErrorKind::NotFound {
        DaemonError::NotFound(binary.display().to_string())
    } else {
        DaemonError::Spawn {
            path: binary.to_path_buf(),
            source,
        }
    }
}

/// A running virtiofsd. Dropping it stops the process.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    status: Option<std::process::ExitStatus>,
}

impl Virtiofsd {
    /// Starts virtiofsd for `config` on the listening socket `listener`,
    /// which it gets as descriptor 3 and nothing else capsule holds.
    pub fn spawn(config: &DaemonConfig, listener: OwnedFd) -> Result<Self, DaemonError> {
        let flavor = flavor(&config.binary)?;
        let args = arguments(config, flavor)?;
        let mut cmd = Command::new(&config.binary);
        cmd.args(&args);
        let fd = listener.as_raw_fd();
        let max_fd = crate::child::max_fd();
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only async-signal-safe system calls; `listener` stays open
        // in the parent until after the spawn.
        unsafe {
            cmd.pre_exec(move || crate::child::hand_over(fd, DAEMON_FD, max_fd));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if !config.debug {
            cmd.stderr(Stdio::null());
        }
        let child = cmd
            .spawn()
            .map_err(|source| spawn_error(&config.binary, source))?;
        drop(listener);
        log::info!(
            "started virtiofsd (pid {}, {:?}) for {}{}",
            child.id(),
            flavor,
            config.dir.display(),
            if config.read_only { ", read-only" } else { "" }
        );
        Ok(Self {
            child,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `" (virtiofsd exited: STATUS)"` once the process ended (waits up
    /// to 100 ms for it), else `" (virtiofsd still runs)"`.
    pub fn describe_exit(&mut self) -> String {
        for _ in 0..20 {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                return format!(" (virtiofsd exited: {s})");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        " (virtiofsd still runs)".into()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}
