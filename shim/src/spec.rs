//! An OCI runtime spec (`config.json`) as a `capsule exec` command line:
//! the container's process (args, env, cwd, user, terminal) run by
//! capsule's guest init in a fresh microVM whose root is the bundle's
//! rootfs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;

use exec_proto::{ExecSpec, User, WinSize};
use oci_spec::runtime::{Process, Spec};

use crate::config::{RootfsMode, ShimConfig};

/// Why a spec cannot run under capsule.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// No `process`, or no `process.args`.
    #[error("the OCI spec has no process arguments")]
    NoProcess,
    /// More mounts than [`crate::mounts::MAX_MOUNTS`].
    #[error("the OCI spec has {count} mounts; capsule carries at most {max}")]
    TooManyMounts {
        /// The spec's mounts (the runtime's own aside).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More directory bind mounts than [`crate::mounts::MAX_DIR_SHARES`].
    #[error("the OCI spec bind-mounts {count} directories; capsule carries at most {max} (each is a virtio-fs device of the microVM)")]
    TooManyDirectories {
        /// The spec's directory bind mounts.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A mount destination that cannot be used.
    #[error("mount on {destination}: {why}")]
    Destination {
        /// The destination, as the spec gave it.
        destination: String,
        /// Why not.
        why: String,
    },
    /// A bind mount's source that is missing or cannot be shared.
    #[error("mount on {destination}: bad source {why}")]
    MountSource {
        /// The destination, as the spec gave it.
        destination: String,
        /// The source and why not.
        why: String,
    },
    /// A mount of a type capsule does not carry.
    #[error("mount on {destination}: type {typ:?} is not supported (capsule carries bind mounts of directories and files, and tmpfs)")]
    UnsupportedMount {
        /// The destination, as the spec gave it.
        destination: String,
        /// The mount's type.
        typ: String,
    },
}

/// The terminal size before containerd's first `resize_pty`: the spec's
/// `consoleSize`, else 24x80.
fn console_size(process: &Process) -> WinSize {
    let clamp = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
    process
        .console_size()
        .as_ref()
        .map(|b| WinSize {
            rows: clamp(b.height()),
            cols: clamp(b.width()),
        })
        .filter(|w| w.rows > 0 && w.cols > 0)
        .unwrap_or(WinSize { rows: 24, cols: 80 })
}

/// The process's user, `None` for root with no supplementary groups.
fn user(process: &Process) -> Option<User> {
    let u = process.user();
    let groups = u.additional_gids().clone().unwrap_or_default();
    (u.uid() != 0 || u.gid() != 0 || !groups.is_empty()).then(|| User {
        uid: u.uid(),
        gid: u.gid(),
        groups,
    })
}

/// `--user`'s value: `UID:GID[:GID,...]`.
fn user_arg(u: &User) -> String {
    let mut s = format!("{}:{}", u.uid, u.gid);
    if !u.groups.is_empty() {
        let groups: Vec<String> = u.groups.iter().map(u32::to_string).collect();
        s.push(':');
        s.push_str(&groups.join(","));
    }
    s
}

/// Whether the process wants a terminal (`process.terminal`).
pub fn terminal(spec: &Spec) -> bool {
    spec.process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false)
}

/// The container's root directory: `root.path` of the spec, relative to
/// the bundle unless absolute (`ctr run --rootfs DIR` gives an absolute
/// one), else the bundle's `rootfs/`.
pub fn rootfs_dir(spec: &Spec, bundle: &Path) -> PathBuf {
    match spec.root() {
        Some(root) if root.path().is_absolute() => root.path().clone(),
        Some(root) => bundle.join(root.path()),
        None => bundle.join("rootfs"),
    }
}

/// The arguments of `capsule` (from `exec` on) that run `spec`'s process
/// with `rootfs` as its root, and its mounts (relative sources from
/// `bundle`).
pub fn exec_args(
    cfg: &ShimConfig,
    spec: &Spec,
    rootfs: &Path,
    bundle: &Path,
    vsock: Option<&Path>,
) -> Result<Vec<OsString>, SpecError> {
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let args = runnable_args(process)?;
    let mounts = crate::mounts::mount_args(spec, bundle)?;
    let mut out: Vec<OsString> = vec!["exec".into(), "--kernel".into(), cfg.kernel.clone().into()];
    if let Some(v) = vsock {
        out.extend(["--vsock-socket".into(), v.as_os_str().to_owned()]);
    }
    out.extend(["--cpus".into(), cfg.cpus.to_string().into()]);
    out.extend(["--memory".into(), cfg.memory.clone().into()]);
    let root_flag = match cfg.rootfs {
        RootfsMode::Virtiofs => "--fs-root",
        RootfsMode::Copy => "--rootfs",
    };
    out.extend([root_flag.into(), rootfs.as_os_str().to_owned()]);
    out.extend(mounts);
    // Signals go to the process; ending it when it ignores SIGTERM is
    // containerd's or the kubelet's decision (their SIGKILL after a grace
    // period), as under runc, not capsule's.
    out.extend(["--stop-timeout".into(), "never".into()]);
    let cwd = working_dir(process);
    out.extend(["--workdir".into(), cwd.as_os_str().to_owned()]);
    // `--env K` (no `=`) would take K from the shim's own environment:
    // the container must never see that, so such entries are dropped.
    for e in env_entries(process) {
        out.extend(["--env".into(), e.into()]);
    }
    if process.terminal().unwrap_or(false) {
        out.push("--tty".into());
    }
    if let Some(u) = user(process) {
        out.extend(["--user".into(), user_arg(&u).into()]);
    }
    if let Some(a) = &cfg.append {
        out.extend(["--append".into(), a.into()]);
    }
    out.push("--".into());
    out.extend(args.iter().map(OsString::from));
    Ok(out)
}

/// The process's arguments, if it has some.
fn runnable_args(process: &Process) -> Result<&Vec<String>, SpecError> {
    process
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or(SpecError::NoProcess)
}

/// The working directory (`/` when the spec leaves it empty).
fn working_dir(process: &Process) -> &Path {
    let cwd = process.cwd();
    if cwd.as_os_str().is_empty() {
        Path::new("/")
    } else {
        cwd.as_path()
    }
}

/// The `K=V` entries of the environment (others are dropped).
fn env_entries(process: &Process) -> impl Iterator<Item = &String> {
    process.env().iter().flatten().filter(|e| e.contains('='))
}

/// An exec'd process (`ctr task exec`, `kubectl exec`): its OCI process
/// as the [`ExecSpec`] the guest init runs beside the container's first
/// process (argv, env, cwd, user, terminal).
pub fn exec_spec(process: &Process) -> Result<ExecSpec, SpecError> {
    let args = runnable_args(process)?;
    Ok(ExecSpec {
        argv: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: env_entries(process)
            .map(|e| e.as_bytes().to_vec())
            .collect(),
        cwd: working_dir(process).as_os_str().as_bytes().to_vec(),
        tty: process
            .terminal()
            .unwrap_or(false)
            .then(|| console_size(process)),
        user: user(process),
        ..ExecSpec::default()
    })
}

/// Where the microVM's vsock socket goes, through which the shim runs
/// exec'd processes: `BUNDLE/capsule.vsock`, unless that (with the
/// `_10000` capsule adds for its own listener) is too long for a Unix
/// socket address (a Kubernetes bundle's 64-character id can make it
/// so): then `/run/capsule-shim/HASH.vsock`, HASH of the bundle's path.
/// `None` if neither can be had: the container then runs without exec.
pub fn vsock_socket(bundle: &Path) -> Option<PathBuf> {
    vsock_socket_in(bundle, Path::new(SHORT_SOCKET_DIR))
}

/// [`vsock_socket`] with the short directory `short_dir`.
fn vsock_socket_in(bundle: &Path, short_dir: &Path) -> Option<PathBuf> {
    const SUN_PATH_MAX: usize = 107;
    let fits = |p: &Path| p.as_os_str().len() + "_10000".len() <= SUN_PATH_MAX;
    let in_bundle = bundle.join("capsule.vsock");
    if fits(&in_bundle) {
        return Some(in_bundle);
    }
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(short_dir)
    {
        log::warn!(
            "no exec for the container in {}: cannot create {}: {e}",
            bundle.display(),
            short_dir.display()
        );
        return None;
    }
    let p = short_dir.join(format!(
        "{:016x}.vsock",
        fnv1a(bundle.as_os_str().as_bytes())
    ));
    fits(&p).then_some(p)
}

/// The short directory for vsock sockets whose bundle path is too long.
const SHORT_SOCKET_DIR: &str = "/run/capsule-shim";

/// FNV-1a, 64 bits: a short, stable name for a bundle's path.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rootfs: RootfsMode) -> ShimConfig {
        ShimConfig {
            capsule: "capsule".into(),
            kernel: "/k/bzImage".into(),
            cpus: 2,
            memory: "256M".into(),
            rootfs,
            append: None,
        }
    }

    /// Loads a spec through oci-spec's file loader, as the shim does.
    /// Each call gets its own directory: tests run in parallel, and two
    /// specs of the same length once shared one (a flaky EOF).
    fn spec(json: &str) -> Spec {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("capsule-shim-spec-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        let s = Spec::load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        s
    }

    fn strings(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|s| s.to_str().unwrap()).collect()
    }

    const SH: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"user":{"uid":0,"gid":0},"args":["/bin/sh","-c","echo hi; exit 7"],
        "env":["PATH=/usr/bin:/bin","TERM=xterm","NOEQUALS"],"cwd":"/work dir"}}"#;

    #[test]
    fn process_maps_to_capsule_exec() {
        let s = spec(SH);
        let a = exec_args(
            &cfg(RootfsMode::Virtiofs),
            &s,
            Path::new("/b/rootfs"),
            Path::new("/b"),
            None,
        )
        .unwrap();
        assert_eq!(
            strings(&a),
            [
                "exec",
                "--kernel",
                "/k/bzImage",
                "--cpus",
                "2",
                "--memory",
                "256M",
                "--fs-root",
                "/b/rootfs",
                "--stop-timeout",
                "never",
                "--workdir",
                "/work dir",
                "--env",
                "PATH=/usr/bin:/bin",
                "--env",
                "TERM=xterm",
                "--",
                "/bin/sh",
                "-c",
                "echo hi; exit 7"
            ]
        );
        let mut c = cfg(RootfsMode::Copy);
        c.append = Some("loglevel=7".into());
        let a = exec_args(
            &c,
            &s,
            Path::new("/r"),
            Path::new("/b"),
            Some(Path::new("/b/capsule.vsock")),
        )
        .unwrap();
        let a = strings(&a);
        assert!(a.windows(2).any(|w| w == ["--rootfs", "/r"]));
        assert!(a.windows(2).any(|w| w == ["--append", "loglevel=7"]));
        assert!(a
            .windows(2)
            .any(|w| w == ["--vsock-socket", "/b/capsule.vsock"]));
    }

    #[test]
    fn mounts_go_before_the_command() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                      {"destination":"/scratch","type":"tmpfs","options":["size=1m"]},
                      {"destination":"/tmp-host","type":"bind","source":"/tmp","options":["rbind","ro"]}]}"#,
        );
        let a = exec_args(
            &cfg(RootfsMode::Virtiofs),
            &s,
            Path::new("/r"),
            Path::new("/b"),
            None,
        )
        .unwrap();
        let a = strings(&a);
        let dashes = a.iter().position(|x| *x == "--").unwrap();
        let at = |w: [&str; 2]| a.windows(2).position(|x| x == w).unwrap();
        assert!(at(["--tmpfs", "/scratch:size=1m"]) < dashes, "{a:?}");
        assert!(at(["--share", "/tmp:/tmp-host:ro"]) < dashes, "{a:?}");
        assert_eq!(a.iter().filter(|x| **x == "--tmpfs").count(), 1);
        let missing = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "mounts":[{"destination":"/d","type":"bind","source":"/nonexistent/capsule"}]}"#,
        );
        let c = cfg(RootfsMode::Virtiofs);
        assert!(matches!(
            exec_args(&c, &missing, Path::new("/r"), Path::new("/b"), None),
            Err(SpecError::MountSource { .. })
        ));
    }

    #[test]
    fn root_path_is_bundle_relative_unless_absolute() {
        let s = spec(SH);
        assert_eq!(rootfs_dir(&s, Path::new("/b")), PathBuf::from("/b/rootfs"));
        let s = spec(r#"{"ociVersion":"1.0.2","root":{"path":"/srv/root"}}"#);
        assert_eq!(rootfs_dir(&s, Path::new("/b")), PathBuf::from("/srv/root"));
    }

    #[test]
    fn empty_cwd_is_root_and_a_spec_without_args_is_refused() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["true"],"cwd":""}}"#,
        );
        let a = exec_args(
            &cfg(RootfsMode::Virtiofs),
            &s,
            Path::new("/r"),
            Path::new("/b"),
            None,
        )
        .unwrap();
        assert!(strings(&a).windows(2).any(|w| w == ["--workdir", "/"]));
        let c = cfg(RootfsMode::Virtiofs);
        let no_args = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}}"#,
        );
        assert_eq!(
            exec_args(&c, &no_args, Path::new("/r"), Path::new("/b"), None),
            Err(SpecError::NoProcess)
        );
    }

    #[test]
    fn terminal_and_user_become_tty_and_user_options() {
        let c = cfg(RootfsMode::Virtiofs);
        let tty = spec(
            r#"{"ociVersion":"1.0.2","process":{"terminal":true,"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#,
        );
        assert!(terminal(&tty));
        let a = exec_args(&c, &tty, Path::new("/r"), Path::new("/b"), None).unwrap();
        let a = strings(&a);
        let dashes = a.iter().position(|x| *x == "--").unwrap();
        assert!(a[..dashes].contains(&"--tty"), "{a:?}");
        assert!(!a.contains(&"--user"), "root needs no --user");
        let user = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":1000,"gid":100,"additionalGids":[10,20]},"args":["sh"],"cwd":"/"}}"#,
        );
        assert!(!terminal(&user));
        let a = exec_args(&c, &user, Path::new("/r"), Path::new("/b"), None).unwrap();
        let a = strings(&a);
        assert!(
            a.windows(2).any(|w| w == ["--user", "1000:100:10,20"]),
            "{a:?}"
        );
        assert!(!a.contains(&"--tty"));
        let group_only = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":5},"args":["sh"],"cwd":"/"}}"#,
        );
        let a = exec_args(&c, &group_only, Path::new("/r"), Path::new("/b"), None).unwrap();
        assert!(strings(&a).windows(2).any(|w| w == ["--user", "0:5"]));
    }

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_exec_process_becomes_the_init_s_spec() {
        let p = process(
            r#"{"user":{"uid":0,"gid":0},"args":["/bin/sh","-c","echo x"],"env":["A=1","BARE"],"cwd":"/tmp"}"#,
        );
        let s = exec_spec(&p).unwrap();
        assert_eq!(s.argv, [&b"/bin/sh"[..], b"-c", b"echo x"]);
        assert_eq!(s.env, [b"A=1".to_vec()]);
        assert_eq!(s.cwd, b"/tmp");
        // What the init reads back is the same process.
        let back = ExecSpec::from_bytes(&s.to_bytes().unwrap()).unwrap();
        assert_eq!(back, s);
        let p = process(r#"{"user":{"uid":0,"gid":0},"args":["ls"],"cwd":""}"#);
        assert_eq!(exec_spec(&p).unwrap().cwd, b"/");
        assert_eq!(exec_spec(&p).unwrap().tty, None);
        assert_eq!(exec_spec(&p).unwrap().user, None);
        let tty = process(r#"{"terminal":true,"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}"#);
        assert_eq!(
            exec_spec(&tty).unwrap().tty,
            Some(WinSize { rows: 24, cols: 80 })
        );
        let sized = process(
            r#"{"terminal":true,"consoleSize":{"height":50,"width":200},"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}"#,
        );
        assert_eq!(
            exec_spec(&sized).unwrap().tty,
            Some(WinSize {
                rows: 50,
                cols: 200
            })
        );
        let none = process(r#"{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}"#);
        assert_eq!(exec_spec(&none), Err(SpecError::NoProcess));
        let user =
            process(r#"{"user":{"uid":5,"gid":6,"additionalGids":[7]},"args":["sh"],"cwd":"/"}"#);
        assert_eq!(
            exec_spec(&user).unwrap().user,
            Some(User {
                uid: 5,
                gid: 6,
                groups: vec![7]
            })
        );
    }

    #[test]
    fn the_vsock_socket_is_in_the_bundle_unless_too_long() {
        let short = std::env::temp_dir().join(format!("csh-{}", std::process::id()));
        assert_eq!(
            vsock_socket_in(
                Path::new("/run/containerd/io.containerd.runtime.v2.task/default/c1"),
                &short
            ),
            Some(PathBuf::from(
                "/run/containerd/io.containerd.runtime.v2.task/default/c1/capsule.vsock"
            ))
        );
        assert!(
            !short.exists(),
            "the short directory is made only when needed"
        );
        // A Kubernetes bundle: its 64-character id makes the path too long.
        let long = format!(
            "/run/containerd/io.containerd.runtime.v2.task/k8s.io/{}",
            "a".repeat(64)
        );
        let p = vsock_socket_in(Path::new(&long), &short).unwrap();
        assert!(p.starts_with(&short), "{}", p.display());
        assert!(p.as_os_str().len() + "_10000".len() <= 107);
        let other = vsock_socket_in(Path::new(&format!("{long}b")), &short).unwrap();
        assert_ne!(p, other, "each bundle its own socket");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&short).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir(&short).unwrap();
    }
}
