//! `--fs` and `exec --host-root`/`--share` without a virtiofsd: one clear
//! `capsule: error: virtiofsd not found ...` line and the documented
//! status (1 for `run`, 125 for `exec`), before any KVM work; `exec
//! --share` falls back to copying and says so (a warning in the log).

use std::process::{Command, Output};

fn capsule(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .env("CAPSULE_VIRTIOFSD", "/nonexistent/virtiofsd")
        .env("CAPSULE_LOG", "error")
        .output()
        .expect("capsule runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Any existing regular file stands in for a kernel: the share checks
/// come before the kernel is loaded.
const KERNEL: &str = env!("CARGO_MANIFEST_PATH");

#[test]
fn run_fs_without_virtiofsd_is_status_1() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let o = capsule(&["run", "--kernel", KERNEL, "--fs", &format!("{dir}:src")]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("capsule: error: virtiofsd not found"),
        "{err}"
    );
}

#[test]
fn run_fs_with_a_missing_directory_is_status_1() {
    let o = capsule(&["run", "--kernel", KERNEL, "--fs", "/nonexistent/dir:t"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("capsule: error: --fs /nonexistent/dir:"),
        "{err}"
    );
}

#[test]
fn malformed_fs_is_usage_status_2() {
    let o = capsule(&["run", "--kernel", KERNEL, "--fs", "/tmp"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn exec_host_root_without_virtiofsd_is_status_125() {
    let o = capsule(&["exec", "--kernel", KERNEL, "--host-root", "--", "true"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("capsule: error: virtiofsd not found"),
        "{err}"
    );
}

/// `capsule exec --share` of this crate's `exec-proto` directory with no
/// virtiofsd, at log level `level`. The VM itself cannot start here (the
/// "kernel" is not one): what matters is what comes before that.
fn exec_share_at_level(level: &str) -> Output {
    let dir = env!("CARGO_MANIFEST_DIR");
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args([
            "exec",
            "--kernel",
            KERNEL,
            "--share",
            &format!("{dir}/exec-proto:/s:ro"),
            "--",
            "true",
        ])
        .env("CAPSULE_VIRTIOFSD", "/nonexistent/virtiofsd")
        .env("CAPSULE_LOG", level)
        .output()
        .expect("capsule runs")
}

#[test]
fn exec_share_without_virtiofsd_says_it_copies() {
    let o = exec_share_at_level("warn");
    let err = stderr(&o);
    assert!(
        err.contains("capsule: warn: virtiofsd not found") && err.contains("falls back to copying"),
        "{err}"
    );
    assert_eq!(o.status.code(), Some(125), "{err}");
}

/// The fallback's warning is a log message: `CAPSULE_LOG=error` keeps it
/// out of stderr, which then carries the command's stderr alone (the
/// boot suite's `exec_output` compares it byte for byte).
#[test]
fn exec_share_fallback_warning_follows_the_log_level() {
    let o = exec_share_at_level("error");
    let err = stderr(&o);
    assert!(!err.contains("falls back to copying"), "{err}");
    assert_eq!(err.lines().count(), 1, "only the error: {err}");
    assert!(err.starts_with("capsule: error: "), "{err}");
    assert_eq!(o.status.code(), Some(125), "{err}");
}

/// A `--share` whose host path is missing fails at once with one line
/// naming it (as a bind mount of a missing source fails under runc),
/// whether a directory or a file was meant; a file share and a tmpfs get
/// past the checks to the kernel (which is not one here).
#[test]
fn exec_share_of_a_missing_path_is_status_125_and_a_file_is_taken() {
    let o = capsule(&[
        "exec",
        "--kernel",
        KERNEL,
        "--share",
        "/nonexistent/capsule-resolv.conf:/etc/resolv.conf:ro",
        "--",
        "true",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--share /nonexistent/capsule-resolv.conf: No such file"),
        "{err}"
    );
    let o = capsule(&[
        "exec",
        "--kernel",
        KERNEL,
        "--share",
        &format!("{KERNEL}:/etc/resolv.conf:ro"),
        "--tmpfs",
        "/run:size=1m",
        "--",
        "true",
    ]);
    let err = stderr(&o);
    assert!(!err.contains("--share"), "{err}");
    assert!(!err.contains("--tmpfs"), "{err}");
    assert_eq!(o.status.code(), Some(125), "{err}");
    // exec's usage errors are its own status, 125.
    let o = capsule(&["exec", "--kernel", KERNEL, "--tmpfs", "run", "--", "true"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("GUESTDIR an absolute path"), "{err}");
}
