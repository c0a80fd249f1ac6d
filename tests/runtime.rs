//! The runtime directories of named VMs against the real binary: a pid
//! file is not trusted on the pid alone, directories that are not ours
//! alone are refused, and a directory is never removed while it is being
//! set up.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures cast small, known values"
)]

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn capsule_env(args: &[&str], root: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsule"));
    c.args(args).stdin(Stdio::null());
    if let Some(r) = root {
        c.env("CAPSULE_RUNTIME_DIR", r);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The runtime root capsule uses when `CAPSULE_RUNTIME_DIR` is not set
/// (the same rule as `capsule::runtime::root::path`).
fn default_root() -> PathBuf {
    if let Some(d) = std::env::var_os("CAPSULE_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no failure modes.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return PathBuf::from("/run/capsule");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("capsule"),
        _ => std::env::temp_dir().join(format!("capsule-{euid}")),
    }
}

fn private_dir(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
}

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("runtime-tests")
        .join(format!("{name}-{}", std::process::id()))
}

/// After a capsule was SIGKILLed its pid may belong to any process: a
/// directory whose pid file names a live `sleep` (as a bare pid, as older
/// capsules wrote it, or with another start time) is stale. `kill` and
/// `stop` say there is no such VM (status 4), remove the directory, and
/// the sleep lives on.
#[test]
fn a_reused_pid_is_never_signalled() {
    // A root of its own: in the shared default root, another test's
    // `capsule ls` may be removing this stale directory (pid file first,
    // then the directory) just as `kill` looks, finds no pid file, and
    // leaves it to that `ls`: the check below then saw it still there.
    let root = scratch("reused-root");
    private_dir(&root);
    let mut sleep = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleep.id();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let cases = [
        ("bare", format!("{pid}\n"), "kill"),
        ("restarted", format!("{pid} 1 {}\n", boot.trim()), "kill"),
        ("stop", format!("{pid}\n"), "stop"),
    ];
    for (tag, pid_file, verb) in cases {
        let name = format!("rtreused-{tag}-{}", std::process::id());
        let dir = root.join(&name);
        private_dir(&dir);
        std::fs::write(dir.join("pid"), pid_file).unwrap();
        let out = capsule_env(
            &[verb, &name, "--timeout", "1"][..if verb == "stop" { 4 } else { 2 }],
            Some(&root),
        );
        let alive = sleep.try_wait().unwrap().is_none();
        assert!(alive, "{tag}: `capsule {verb}` killed an unrelated process");
        assert_eq!(out.status.code(), Some(4), "{tag}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("no VM named"),
            "{tag}: {}",
            text(&out.stderr)
        );
        assert!(!dir.exists(), "{tag}: stale directory left");
    }
    let _ = sleep.kill();
    let _ = sleep.wait();
    let _ = std::fs::remove_dir_all(&root);
}

/// A runtime root open to others (0777) or owned by another user is
/// refused by every verb and by `run --name`: status 1, one clear line.
/// So is a VM directory open to others inside a good root.
#[test]
fn runtime_dirs_not_ours_alone_are_refused() {
    let kernel = scratch("kernel");
    std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
    std::fs::write(&kernel, b"not used").unwrap();
    let k = kernel.to_str().unwrap();

    let open = scratch("open-root");
    private_dir(&open);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();

    // A foreign-owned root: as root, chown a directory to nobody; otherwise
    // use a directory root owns.
    // SAFETY: geteuid has no failure modes.
    let foreign = if unsafe { libc::geteuid() } == 0 {
        let d = scratch("foreign-root");
        private_dir(&d);
        let c = std::ffi::CString::new(d.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; chown changes only its owner.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
        d
    } else {
        let d = PathBuf::from("/root");
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&d).expect("no foreign-owned directory to test with");
        assert!(
            m.uid() == 0 && m.mode() & 0o077 == 0,
            "/root is not a private root-owned dir"
        );
        d
    };

    for (what, root, why) in [
        ("0777 root", &open, "open to other users"),
        ("foreign root", &foreign, "not by you"),
    ] {
        for args in [
            &["ls"][..],
            &["kill", "x"],
            &["stop", "x"],
            &["run", "--name", "x", "--kernel", k],
        ] {
            let out = capsule_env(args, Some(root));
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what} {args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{what} {args:?}: {err}");
            assert!(
                err.starts_with("capsule: error: runtime directory") && err.contains(why),
                "{what} {args:?}: {err}"
            );
        }
    }
    // Nothing was created in them.
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);

    let good = scratch("good-root");
    private_dir(&good);
    let vm = good.join("wide");
    private_dir(&vm);
    std::fs::set_permissions(&vm, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(vm.join("pid"), format!("{}\n", std::process::id())).unwrap();
    let out = capsule_env(&["kill", "wide"], Some(&good));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("open to other users"));
    assert!(vm.join("pid").exists(), "a foreign directory was touched");

    for d in [&open, &foreign, &good] {
        if d.starts_with(env!("CARGO_TARGET_TMPDIR")) {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}

/// A VM directory without a pid file that is not old may be one being set
/// up: `run --name` refuses the name instead of deleting it, and `ls`
/// leaves it alone.
#[test]
fn a_directory_being_set_up_is_not_deleted() {
    let root = default_root();
    let name = format!("rtunfinished-{}", std::process::id());
    let dir = root.join(&name);
    private_dir(&dir);
    let kernel = scratch("unfinished.elf");
    std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let out = capsule_env(
        &["run", "--name", &name, "--kernel", kernel.to_str().unwrap()],
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("without a pid file"), "{err}");
    assert!(dir.exists(), "a directory being set up was deleted");
    let _ = capsule_env(&["ls"], None);
    assert!(dir.exists(), "`ls` deleted a directory being set up");
    std::fs::remove_dir(&dir).unwrap();
}
