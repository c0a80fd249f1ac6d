//! The host paths capsule is given, against the real binary on /dev/kvm:
//! `--api-sock` never replaces what is not a stale socket, the sockets it
//! binds are private whatever the umask, a FIFO as an input file fails at
//! once, and a FIFO as a log path never stalls a running VM.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::api::*;
use common::run::{capsule, listed, ok};
use common::{ctrl_alt_del_guest, halting_guest};

/// Runs `capsule ARGS` and waits at most `timeout` for it to exit;
/// returns its status and stderr (a capsule still running is killed and
/// counts as `None`).
fn capsule_within(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    let code = exit_or_kill(&mut child, timeout);
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (code, err)
}

/// `--api-sock` never deletes what is not a stale socket: a regular file
/// (or a directory, or a FIFO) there makes capsule exit 1 with one clear
/// line, and the file is left as it was.
#[test]
fn api_sock_refuses_a_path_that_is_not_a_stale_socket() {
    let file = tmp("precious.txt");
    let _ = std::fs::remove_file(&file);
    std::fs::write(&file, "precious data").unwrap();
    let (code, err) = capsule_within(
        &["run", "--api-sock", file.to_str().unwrap()],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("capsule: error: ") && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious data");

    let fifo = tmp("api-fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (code, err) = capsule_within(
        &["run", "--api-sock", fifo.to_str().unwrap()],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(err.contains("a FIFO"), "{err}");
    assert!(std::fs::symlink_metadata(&fifo).is_ok(), "FIFO removed");

    // A socket someone listens on is in use; once nobody does, it is stale
    // and replaced.
    let sock = tmp("taken.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (code, err) = capsule_within(
        &["run", "--api-sock", sock.to_str().unwrap()],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(err.contains("another process is serving on it"), "{err}");
    drop(listener);
    let _vmm = Vmm::start("taken");
}

/// Under `umask 000` the API socket is still 0600, and so are a named
/// VM's sockets and logs (its directory 0700).
#[test]
fn sockets_are_private_whatever_the_umask() {
    let sock = tmp("umask.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" run --api-sock \"$1\"")
        .arg(env!("CARGO_BIN_EXE_capsule"))
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let mode = mode_of(&sock);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");

    let kernel = tmp("umask.elf");
    std::fs::write(&kernel, halting_guest()).unwrap();
    let name = format!("apiumask-{}", std::process::id());
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" run -d --name \"$1\" --kernel \"$2\"")
        .arg(env!("CARGO_BIN_EXE_capsule"))
        .arg(&name)
        .arg(&kernel)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ok(&out);
    let me = listed(&name);
    let dir = PathBuf::from(me["dir"].as_str().unwrap());
    let modes: Vec<(&str, Option<u32>)> = [
        "",
        "api.sock",
        "wait.sock",
        "console.log",
        "console.in",
        "vmm.log",
        "pid",
    ]
    .iter()
    .map(|f| {
        let p = dir.join(f);
        (*f, std::fs::symlink_metadata(&p).ok().map(|_| mode_of(&p)))
    })
    .collect();
    assert_eq!(capsule(&["kill", &name], None).status.code(), Some(0));
    for (f, m) in modes {
        let want = if f.is_empty() { 0o700 } else { 0o600 };
        assert_eq!(m, Some(want), "{f}: mode {:o}", m.unwrap_or(0));
    }
}

fn mkfifo(name: &str) -> PathBuf {
    let p = tmp(name);
    let _ = std::fs::remove_file(&p);
    assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
    p
}

/// A FIFO named as a kernel, initrd, configuration file or read-only /
/// ephemeral disk is refused at once (an open of a FIFO for reading would
/// wait for a writer forever): status 1 within a second, one clear line.
#[test]
fn fifo_as_an_input_file_fails_at_once() {
    let fifo = mkfifo("input.fifo");
    let f = fifo.to_str().unwrap();
    let kernel = tmp("fifo-test.elf");
    std::fs::write(&kernel, halting_guest()).unwrap();
    let k = kernel.to_str().unwrap();
    let ro = format!("{f},ro");
    let eph = format!("{f},ephemeral");
    let cases: [&[&str]; 5] = [
        &["run", "--kernel", f],
        &["run", "--kernel", k, "--initrd", f],
        &["run", "--config-file", f, "--no-api"],
        &["run", "--kernel", k, "--disk", &ro],
        &["run", "--kernel", k, "--disk", &eph],
    ];
    for args in cases {
        let t = Instant::now();
        let (code, err) = capsule_within(args, Duration::from_secs(1));
        assert_eq!(code, Some(1), "{args:?} ({:?}): {err}", t.elapsed());
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("capsule: error: ")
                && (err.contains("FIFO") || err.contains("not a regular file")),
            "{args:?}: {err}"
        );
    }
}

/// `PUT /logger` with a FIFO as `log_path` on a running VM: without a
/// reader it is refused (400) at once; with a reader that never reads,
/// it is accepted and logging never stalls — the API keeps answering
/// within a second while the log overflows the FIFO, the guest keeps
/// running, and the dropped lines are counted in the log once the FIFO
/// has room again. A FIFO `serial_out_path` nobody reads is refused at
/// InstanceStart.
#[test]
fn fifo_log_path_never_stalls_a_running_vm() {
    use std::os::unix::fs::OpenOptionsExt;
    let kernel = tmp("fifo-log.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let serial = tmp("fifo-log.serial");
    let _ = std::fs::remove_file(&serial);
    let fifo = mkfifo("log.fifo");
    // The logs are put in place after the VM started: Landlock must be
    // told where they may go.
    let dir = format!("{}:rw", tmp("").display());
    let mut vmm = Vmm::start_with("fifo-log", &["--landlock-allow", &dir]);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(vmm.req("PUT", "/boot-source", Some(&boot)).0, 204);
    let start = Some(r#"{"action_type": "InstanceStart"}"#);
    let ser = format!(r#"{{"serial_out_path": "{}"}}"#, fifo.display());
    assert_eq!(vmm.req("PUT", "/serial", Some(&ser)).0, 204);
    let t = Instant::now();
    let (st, body) = vmm.req("PUT", "/actions", start);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("no process is reading it"), "{body}");
    let ser = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(vmm.req("PUT", "/serial", Some(&ser)).0, 204);
    assert_eq!(vmm.req("PUT", "/actions", start).0, 204);
    let grows = |what: &str| {
        let before = file_len(&serial);
        let deadline = Instant::now() + Duration::from_secs(20);
        while file_len(&serial) == before {
            assert!(Instant::now() < deadline, "guest stalled {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    grows("after start");

    let logger = format!(r#"{{"log_path": "{}", "level": "Debug"}}"#, fifo.display());
    let t = Instant::now();
    let (st, body) = vmm.req("PUT", "/logger", Some(&logger));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("no process is reading it"), "{body}");
    grows("after a refused FIFO log_path");

    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    assert_eq!(vmm.req("PUT", "/logger", Some(&logger)).0, 204);
    // Each request logs its ~7 KiB path (debug, and info for the 400):
    // far more than a pipe holds.
    let long = format!("/{}", "x".repeat(7000));
    for i in 0..40 {
        let t = Instant::now();
        let (st, _) = vmm.req("GET", &long, None);
        assert_eq!(st, 400);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "request {i} took {took:?}");
    }
    grows("while its log FIFO was full");
    let mut drained = Vec::new();
    let _ = reader.read_to_end(&mut drained);
    assert!(drained.len() >= 4096, "{} bytes logged", drained.len());
    assert_eq!(vmm.req("GET", "/", None).0, 200);
    let mut after = String::new();
    let _ = reader.read_to_string(&mut after);
    assert!(after.contains("log lines dropped"), "{after}");

    let plain = tmp("fifo-log.log");
    let logger = format!(r#"{{"log_path": "{}", "level": "Info"}}"#, plain.display());
    assert_eq!(vmm.req("PUT", "/logger", Some(&logger)).0, 204);
    let (st, _) = vmm.req(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(st, 204);
    assert_eq!(vmm.wait_exit(Duration::from_secs(30)), Some(0));
}
