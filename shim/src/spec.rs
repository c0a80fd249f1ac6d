//! An OCI runtime spec (`config.json`) as a `capsule exec` command line:
//! the container's process (args, env, cwd) run by capsule's guest init in
//! a fresh microVM whose root is the bundle's rootfs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::config::{RootfsMode, ShimConfig};

/// Why a spec cannot run under capsule (yet).
#[derive(Debug, PartialEq, Eq)]
pub enum SpecError {
    /// No `process`, or no `process.args`.
    NoProcess,
    /// `process.terminal`: the guest init has no pseudo-terminal yet.
    Terminal,
    /// A user other than root: the guest init runs the process as root.
    User(u32, u32),
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoProcess => write!(f, "the OCI spec has no process arguments"),
            Self::Terminal => write!(
                f,
                "process.terminal is not supported by the capsule runtime yet (run without -t)"
            ),
            Self::User(u, g) => write!(
                f,
                "process.user {u}:{g}: the capsule runtime runs container processes as root (0:0) only, so far"
            ),
        }
    }
}

impl std::error::Error for SpecError {}

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
/// with `rootfs` as its root.
pub fn exec_args(cfg: &ShimConfig, spec: &Spec, rootfs: &Path) -> Result<Vec<OsString>, SpecError> {
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let args = process
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or(SpecError::NoProcess)?;
    if process.terminal().unwrap_or(false) {
        return Err(SpecError::Terminal);
    }
    let user = process.user();
    if user.uid() != 0 || user.gid() != 0 {
        return Err(SpecError::User(user.uid(), user.gid()));
    }
    let mut out: Vec<OsString> = vec!["exec".into(), "--kernel".into(), cfg.kernel.clone().into()];
    out.extend(["--cpus".into(), cfg.cpus.to_string().into()]);
    out.extend(["--memory".into(), cfg.memory.clone().into()]);
    let root_flag = match cfg.rootfs {
        RootfsMode::Virtiofs => "--fs-root",
        RootfsMode::Copy => "--rootfs",
    };
    out.extend([root_flag.into(), rootfs.as_os_str().to_owned()]);
    // Signals go to the process; ending it when it ignores SIGTERM is
    // containerd's or the kubelet's decision (their SIGKILL after a grace
    // period), as under runc, not capsule's.
    out.extend(["--stop-timeout".into(), "never".into()]);
    let cwd = process.cwd();
    let cwd = if cwd.as_os_str().is_empty() {
        Path::new("/")
    } else {
        cwd.as_path()
    };
    out.extend(["--workdir".into(), cwd.as_os_str().to_owned()]);
    // `--env K` (no `=`) would take K from the shim's own environment:
    // the container must never see that, so such entries are dropped.
    for e in process.env().iter().flatten().filter(|e| e.contains('=')) {
        out.extend(["--env".into(), e.into()]);
    }
    if let Some(a) = &cfg.append {
        out.extend(["--append".into(), a.into()]);
    }
    out.push("--".into());
    out.extend(args.iter().map(OsString::from));
    Ok(out)
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
        let a = exec_args(&cfg(RootfsMode::Virtiofs), &s, Path::new("/b/rootfs")).unwrap();
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
        let a = exec_args(&c, &s, Path::new("/r")).unwrap();
        let a = strings(&a);
        assert!(a.windows(2).any(|w| w == ["--rootfs", "/r"]));
        assert!(a.windows(2).any(|w| w == ["--append", "loglevel=7"]));
    }

    #[test]
    fn root_path_is_bundle_relative_unless_absolute() {
        let s = spec(SH);
        assert_eq!(rootfs_dir(&s, Path::new("/b")), PathBuf::from("/b/rootfs"));
        let s = spec(r#"{"ociVersion":"1.0.2","root":{"path":"/srv/root"}}"#);
        assert_eq!(rootfs_dir(&s, Path::new("/b")), PathBuf::from("/srv/root"));
    }

    #[test]
    fn empty_cwd_is_root_and_unsupported_specs_are_refused() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["true"],"cwd":""}}"#,
        );
        let a = exec_args(&cfg(RootfsMode::Virtiofs), &s, Path::new("/r")).unwrap();
        assert!(strings(&a).windows(2).any(|w| w == ["--workdir", "/"]));
        let c = cfg(RootfsMode::Virtiofs);
        let no_args = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}}"#,
        );
        assert_eq!(
            exec_args(&c, &no_args, Path::new("/r")),
            Err(SpecError::NoProcess)
        );
        let tty = spec(
            r#"{"ociVersion":"1.0.2","process":{"terminal":true,"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#,
        );
        assert_eq!(
            exec_args(&c, &tty, Path::new("/r")),
            Err(SpecError::Terminal)
        );
        let user = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":1000,"gid":100},"args":["sh"],"cwd":"/"}}"#,
        );
        assert_eq!(
            exec_args(&c, &user, Path::new("/r")),
            Err(SpecError::User(1000, 100))
        );
    }
}
