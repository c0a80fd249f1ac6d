//! Bad command lines, files and host setups through the real binary, on
//! the tiny test guests: each ends in one `capsule: error:` line and a
//! documented status, and leaves nothing behind (`run`, `exec`,
//! `--net`, `--vsock`). Runs on any /dev/kvm, PVM included.

use std::path::PathBuf;

mod common;
use common::guest::*;
use common::run::*;

#[test]
fn bad_inputs_get_one_line_and_a_status() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-inputs");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let junk = junk.to_str().unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["run", "--kernel", junk], 1, "is not a Linux kernel"),
        (&["run", "--kernel", empty.to_str().unwrap()], 1, "kernel"),
        (
            &["run", "--kernel", "/nonexistent/vmlinux"],
            1,
            "cannot read kernel",
        ),
        (&["run", "--kernel", "/"], 1, "not a regular file"),
        (
            &["run", "--kernel", junk, "--initrd", "/nonexistent"],
            1,
            "cannot read initrd",
        ),
        (
            &["run", "--kernel", junk, "--kvm", "/nonexistent/kvm"],
            1,
            "cannot open /nonexistent/kvm",
        ),
        (
            &["run", "--kernel", junk, "--memory", "1000T"],
            1,
            "host has",
        ),
        (&["run", "--kernel", junk, "--cpus", "0"], 2, "--cpus"),
        (&["run", "--kernel", junk, "--cpus", "255"], 2, "--cpus"),
        (
            &["run", "--kernel", junk, "--memory", "lots"],
            2,
            "invalid size",
        ),
        (&["run", "--kernel", junk, "--memory", "1M"], 2, "at least"),
        (
            &["run", "--kernel", junk, "--net", "bridge=br0"],
            2,
            "tap=NAME or user",
        ),
        (
            &["run", "--kernel", junk, "--net", "tap=a/b"],
            2,
            "TAP device name",
        ),
        (
            &["run", "--kernel", junk, "--net", "user,publish=0:80"],
            2,
            "invalid port",
        ),
        (
            &["run", "--kernel", junk, "--net", "user,vhost=on"],
            2,
            "vhost= needs --net tap=",
        ),
        (
            &["run", "--kernel", junk, "--net", "tap=t0,vhost=1"],
            2,
            "expected on or off",
        ),
        (
            &[
                "run",
                "--kernel",
                junk,
                "--net",
                "tap=t0,mac=01:00:00:00:00:01",
            ],
            2,
            "multicast",
        ),
        (
            &["run", "--kernel", junk, "--vsock", "cid=2,uds=/tmp/v"],
            2,
            "invalid vsock CID 2",
        ),
        (
            &["run", "--kernel", junk, "--vsock", "cid=3"],
            2,
            "uds=PATH",
        ),
        (&["run"], 2, "--kernel"),
        (&["frobnicate"], 2, "unrecognized"),
    ];
    for (args, code, needle) in cases {
        let out = capsule(args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if *code == 1 {
            assert_eq!(err.lines().count(), 1, "{args:?}: want one line, got {err}");
            assert!(err.starts_with("capsule: error: "), "{args:?}: {err}");
        }
    }
}

#[test]
fn exec_bad_inputs_get_one_line_and_status_125() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("exec-bad-inputs");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    let file = junk.to_str().unwrap();
    let d = dir.to_str().unwrap();
    // A regular file is a share now (bound over its guest path); a
    // device is neither kind.
    let share_file = "/dev/null:/x".to_string();
    let share_missing = format!("{d}/missing:/x");
    let share_rel = format!("{d}:relative");
    let template = format!("{d}/template");
    let share_tmpl = format!("{d}:/x");
    let cases: &[(&[&str], &str)] = &[
        (
            &["exec", "--kernel", "/nonexistent/k", "--", "true"],
            "cannot read kernel",
        ),
        (
            &["exec", "--kernel", file, "--", "true"],
            "is not a Linux kernel",
        ),
        (
            &[
                "exec",
                "--kernel",
                file,
                "--share",
                &share_file,
                "--",
                "true",
            ],
            "neither a directory nor a regular file",
        ),
        (
            &[
                "exec",
                "--kernel",
                file,
                "--share",
                &share_missing,
                "--",
                "true",
            ],
            "No such file or directory",
        ),
        (
            &[
                "exec", "--kernel", file, "--share", &share_rel, "--", "true",
            ],
            "absolute",
        ),
        (
            &["exec", "--kernel", file, "--rootfs", file, "--", "true"],
            "not a directory",
        ),
        (
            &["exec", "--kernel", file, "-w", "rel", "--", "true"],
            "--workdir",
        ),
        (
            &["exec", "--kernel", file, "--env", "=v", "--", "true"],
            "--env",
        ),
        (
            &[
                "exec",
                "--kernel",
                file,
                "--env",
                "CAPSULE_SURELY_UNSET_VAR",
                "--",
                "true",
            ],
            "not set",
        ),
        (
            &["exec", "--kernel", file, "--timeout", "0", "--", "true"],
            "--timeout",
        ),
        (
            &["exec", "--kernel", file, "--timeout", "-3", "--", "true"],
            "'-3'",
        ),
        // A TAP's static address (the containerd shim's pod network).
        (
            &[
                "exec",
                "--kernel",
                file,
                "--net",
                "tap=t0,ip=10.0.0.2",
                "--",
                "true",
            ],
            "ADDRESS/PREFIX",
        ),
        (
            &[
                "exec",
                "--kernel",
                file,
                "--net",
                "tap=t0,gw=10.0.0.1",
                "--",
                "true",
            ],
            "need ip=",
        ),
        (
            &[
                "exec",
                "--kernel",
                file,
                "--net",
                "tap=t0,ip=10.0.0.2/24,mtu=9",
                "--",
                "true",
            ],
            "68 to 65535",
        ),
        (
            &[
                "exec",
                "--kernel",
                file,
                "--net",
                "user,ip=10.0.0.2/24",
                "--",
                "true",
            ],
            "ip= needs --net tap=",
        ),
        // The warm path: a directory that is no exec template, and a
        // template's options that cannot be (before any VM is built).
        (
            &["exec", "--snapshot", d, "--", "true"],
            "not an exec template",
        ),
        (
            &[
                "exec",
                "--make-snapshot",
                &template,
                "--kernel",
                file,
                "--share",
                &share_tmpl,
            ],
            "--make-snapshot does not take --share",
        ),
        (
            &[
                "exec",
                "--make-snapshot",
                &template,
                "--kernel",
                file,
                "--env",
                "A=b",
            ],
            "takes no command, --env or --workdir",
        ),
    ];
    for (args, needle) in cases {
        let out = capsule(args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: want one line, got {err}");
        assert!(err.starts_with("capsule: error: "), "{args:?}: {err}");
    }
    // Usage errors (clap) exit 125 for exec too.
    for args in [
        &["exec"][..],
        &["exec", "--kernel", file],
        &[
            "exec", "--kernel", file, "--disk", file, "--rootfs", d, "--", "x",
        ],
        // A template takes no command; a clone needs one.
        &["exec", "--make-snapshot", d, "--kernel", file, "--", "x"],
        &["exec", "--snapshot", d],
    ] {
        let out = capsule(args, None);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
    }
    // An unknown exec channel is bad usage too, before anything boots.
    let out = capsule_env(
        &["exec", "--kernel", file, "--", "true"],
        &[("CAPSULE_EXEC_CHANNEL", "carrier-pigeon")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("CAPSULE_EXEC_CHANNEL='carrier-pigeon'"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // --vsock-socket (the containerd shim's exec) needs the vsock
    // channel, and is not for the warm path.
    let sock = format!("{d}/capsule.vsock");
    let out = capsule_env(
        &[
            "exec",
            "--kernel",
            file,
            "--vsock-socket",
            &sock,
            "--",
            "true",
        ],
        &[("CAPSULE_EXEC_CHANNEL", "console")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("--vsock-socket needs the vsock channel"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = capsule(
        &["exec", "--snapshot", d, "--vsock-socket", &sock, "--", "x"],
        None,
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(!std::path::Path::new(&sock).exists(), "nothing bound");
}

#[test]
fn network_setup_errors_get_one_line() {
    let kernel = poweroff_guest();
    let k = kernel.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--kernel", k, "--net", "user"], "passt"),
        (
            &[
                "run",
                "--kernel",
                k,
                "--net",
                "user,mac=02:00:00:00:00:01",
                "--net",
                "user,mac=02:00:00:00:00:01",
            ],
            "same MAC address",
        ),
    ];
    for (args, needle) in cases {
        let out = capsule_env(args, &[("CAPSULE_PASST", "/nonexistent/passt")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: want one line, got {err}");
        assert!(err.starts_with("capsule: error: "), "{args:?}: {err}");
    }
}

/// A vsock socket path that cannot be bound (missing directory, a
/// regular file in the way, too long) is one error line and status 1,
/// and a file in the way is left alone; a good one is created 0600 and
/// removed when the VM ends.
#[test]
fn vsock_socket_errors_get_one_line_and_a_good_socket_is_private() {
    let kernel = poweroff_guest();
    let k = kernel.to_str().unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vsock-sock");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let long = format!("uds=/tmp/{}", "x".repeat(120));
    let cases: &[(String, &str)] = &[
        (
            "uds=/nonexistent/dir/v.sock".into(),
            "vsock socket /nonexistent/dir/v.sock",
        ),
        (format!("uds={}", file.display()), "regular file"),
        (long, "vsock socket"),
    ];
    for (uds, needle) in cases {
        let spec = format!("cid=3,{uds}");
        let out = capsule(&["run", "--kernel", k, "--vsock", &spec], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{spec}: {err}");
        assert!(err.contains(needle), "{spec}: {err}");
        assert_eq!(err.lines().count(), 1, "{spec}: want one line, got {err}");
        assert!(err.starts_with("capsule: error: "), "{spec}: {err}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A good path: the socket exists (0600) while the VM runs, which a
    // guest that waits for input lets the test see, and is gone after.
    let sock = dir.join("v.sock");
    let spec = format!("cid=3,uds={}", sock.display());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args([
            "run",
            "--kernel",
            poweroff_on_input_guest().to_str().unwrap(),
        ])
        .args(["--vsock", &spec])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket at {}",
            sock.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::symlink_metadata(&sock)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o600);
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"q").unwrap();
    let out = child.wait_with_output().unwrap();
    ok(&out);
    assert!(!sock.exists(), "the socket is removed when the VM ends");
}
