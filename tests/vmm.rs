//! End-to-end tests of the VMM on /dev/kvm with tiny hand-assembled 64-bit
//! guests: ELF loading, long-mode vCPU setup, port I/O dispatch, the serial
//! console in both directions, and every way a guest ends the VM.
//!
//! These run on any KVM, including PVM hosts where a Linux guest cannot
//! boot (Linux guests are covered by the boot tests in tests/boot). They
//! fail, never skip, when /dev/kvm is unusable.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures cast small, known values"
)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

mod common;
use common::elf;

const COM1: u16 = 0x3f8;
const ACPI_SLEEP_CONTROL: u16 = 0x3c0;
const PVPANIC: u16 = 0x505;
const I8042_COMMAND: u16 = 0x64;
/// Distinct unbacked MMIO reads in `distinct_mmio_reads_do_not_grow_memory`.
/// Each is a full exit to capsule, about 20 000-40 000 a second on the PVM
/// development hosts (debug build): the issue's 10 million took 506 s
/// there (VmHWM unchanged, `CAPSULE_TEST_MMIO_SWEEP=10000000`), far too
/// long for the suite. 300 000 take about 10 s and grew the former
/// per-address map by 25 MiB, well past the 8 MiB bound.
const MMIO_SWEEP_READS: u32 = 300_000;

/// A few x86-64 instructions, assembled by hand.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.0.extend([0x66, 0xba]);
        self.0.extend(port.to_le_bytes());
        self
    }
    fn mov_al(&mut self, v: u8) -> &mut Self {
        self.0.extend([0xb0, v]);
        self
    }
    fn out_dx_al(&mut self) -> &mut Self {
        self.0.push(0xee);
        self
    }
    fn in_al_dx(&mut self) -> &mut Self {
        self.0.push(0xec);
        self
    }
    fn outb(&mut self, port: u16, v: u8) -> &mut Self {
        self.mov_dx(port).mov_al(v).out_dx_al()
    }
    fn print(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.outb(COM1, b);
        }
        self
    }
    fn halt_forever(&mut self) -> &mut Self {
        self.0.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
        self
    }
}

fn write_guest(name: &str, code: &Asm) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vmm-guests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, elf(&code.0)).unwrap();
    path
}

fn capsule(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(input).unwrap();
        // Keep the pipe open until capsule exits: EOF must not matter.
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(120));
            drop(s);
        });
    }
    child.wait_with_output().unwrap()
}

fn run_guest(name: &str, code: &Asm, extra: &[&str], stdin: Option<&[u8]>) -> Output {
    let kernel = write_guest(name, code);
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap()];
    args.extend(extra);
    let out = capsule(&args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked at"),
        "capsule panicked: {stderr}"
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn acpi_poweroff_exits_zero_with_console_output() {
    let mut a = Asm::default();
    // What follows the power-off write must never run.
    a.print("hello from the guest\n")
        .outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .print("still running\n")
        .halt_forever();
    let out = run_guest("poweroff.elf", &a, &[], None);
    assert_eq!(stdout(&out), "hello from the guest\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn i8042_reset_exits_zero() {
    let mut a = Asm::default();
    a.print("r")
        .outb(I8042_COMMAND, 0xfe)
        .print("still running")
        .halt_forever();
    let out = run_guest("reset.elf", &a, &["--cpus", "2"], None);
    assert_eq!(stdout(&out), "r");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn pvpanic_exits_with_panic_status() {
    let mut a = Asm::default();
    a.print("Kernel panic\n").outb(PVPANIC, 1).halt_forever();
    let out = run_guest("panic.elf", &a, &[], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// The guest polls the UART, echoes each byte plus one, and powers off at
/// a newline: piped stdin reaches the guest and its answer comes back.
#[test]
fn serial_input_reaches_the_guest() {
    let mut a = Asm::default();
    let poll = a.0.len();
    a.mov_dx(COM1 + 5).in_al_dx();
    a.0.extend([0xa8, 0x01]); // test al, 1 (data ready)
    a.0.extend([0x74, 0x00]); // jz poll (patched below)
    let jz = a.0.len();
    a.0[jz - 1] = (poll as isize - jz as isize) as i8 as u8;
    a.mov_dx(COM1).in_al_dx();
    a.0.extend([0x3c, b'\n']); // cmp al, '\n'
    a.0.extend([0x74, 0x00]); // je done (patched below)
    let je = a.0.len();
    a.0.extend([0xfe, 0xc0]); // inc al
    a.out_dx_al();
    a.0.push(0xe9); // jmp poll (rel32)
    let after = a.0.len() as i32 + 4;
    a.0.extend((poll as i32 - after).to_le_bytes());
    let done = a.0.len();
    a.0[je - 1] = (done - je) as u8;
    a.outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();

    let input: Vec<u8> = b"HAL 9000, open the pod bay doors ".repeat(4);
    let mut line = input.clone();
    line.push(b'\n');
    let out = run_guest("echo.elf", &a, &[], Some(&line));
    let expected: Vec<u8> = input.iter().map(|b| b + 1).collect();
    assert_eq!(out.stdout, expected);
    assert_eq!(out.status.code(), Some(0));
}

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
    let share_file = format!("{file}:/x");
    let share_missing = format!("{d}/missing:/x");
    let share_rel = format!("{d}:relative");
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
            "not a directory",
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
            "not a directory",
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
}

/// Raw mode is on while the guest runs and the terminal comes back cooked
/// both after a normal exit and after SIGTERM. Runs capsule on a pseudo
/// terminal made by util-linux `script`.
#[test]
fn terminal_is_raw_while_running_and_restored_on_exit_and_signal() {
    let mut a = Asm::default();
    a.print("up\n").halt_forever();
    let hang = write_guest("hang.elf", &a);
    let mut b = Asm::default();
    b.outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    let off = write_guest("off.elf", &b);
    let bin = env!("CARGO_BIN_EXE_capsule");
    let script = format!(
        "stty -a | grep -o -- ' icanon' | sed 's/^/before:/'; \
         {bin} run --kernel {off}; echo exit=$?; \
         stty -a | grep -o -- ' icanon' | sed 's/^/after-exit:/'; \
         (sleep 2; stty -a </dev/tty | grep -o -- '-icanon' | sed 's/^/during:/'; \
          kill -TERM $(cat {pidfile})) & \
         sh -c 'echo $$ > {pidfile}; exec {bin} run --kernel {hang}'; echo killed=$?; wait; \
         stty -a | grep -o -- ' icanon' | sed 's/^/after-signal:/'",
        off = off.display(),
        hang = hang.display(),
        pidfile = hang.with_extension("pid").display(),
    );
    let out = Command::new("script")
        .args(["-qec", &script, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("util-linux script must be installed");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    for want in [
        "before: icanon",
        "exit=0",
        "after-exit: icanon",
        "during:-icanon",
        "killed=143",
        // The signal stopped the VM in order (vCPUs, devices) before
        // capsule died of it.
        "capsule: warn: SIGTERM: stopping the VM",
        "after-signal: icanon",
    ] {
        assert!(text.contains(want), "missing '{want}' in:\n{text}");
    }
}

/// capsule with extra environment variables.
fn capsule_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run capsule")
}

/// Polls COM1 until a byte arrives, then powers off.
fn poweroff_on_input_guest() -> PathBuf {
    let mut a = Asm::default();
    let poll = a.0.len();
    a.mov_dx(COM1 + 5).in_al_dx();
    a.0.extend([0xa8, 0x01]); // test al, 1 (data ready)
    a.0.extend([0x74, 0x00]); // jz poll (patched below)
    let jz = a.0.len();
    a.0[jz - 1] = (poll as isize - jz as isize) as i8 as u8;
    a.outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    write_guest("poweroff-on-input.elf", &a)
}

fn poweroff_guest() -> PathBuf {
    let mut a = Asm::default();
    a.outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    write_guest("net-poweroff.elf", &a)
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
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists(), "the socket is removed when the VM ends");
}

/// The descriptors a program started by capsule (here a stand-in for
/// passt, twice, so the second sees the first device's descriptors and the
/// disk's) inherits: exactly 0, 1, 2 and its socket as 3. Neither KVM's,
/// nor the devices' eventfds, nor the disk image, nor descriptors capsule
/// itself was started with.
#[test]
fn children_inherit_only_what_they_need() {
    let kernel = poweroff_on_input_guest();
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let script = dir.join("passt.sh");
    // What an exec'd program gets: the list of an exec'd ls.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n(exec ls -l /proc/self/fd/) >'{0}'/tmp-$$; mv '{0}'/tmp-$$ '{0}'/fds-$$\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The guest powers off on its first console byte, sent once both
    // stand-ins have written their lists (capsule stops passt on exit).
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--net",
            "user",
            "--net",
            "user",
        ])
        .env("CAPSULE_PASST", &script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    let listed = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let e = e.as_ref().unwrap();
                e.file_name().to_string_lossy().starts_with("fds-")
            })
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while listed() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b"\n");
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let lists: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("fds-"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(lists.len(), 2, "two stand-ins ran: {err}");
    for list in lists {
        let fds: Vec<(&str, &str)> = list
            .lines()
            .filter_map(|l| {
                let (left, target) = l.split_once(" -> ")?;
                Some((left.rsplit(' ').next()?, target))
            })
            // ls's own directory descriptor.
            .filter(|(_, t)| !(t.starts_with("/proc/") && t.ends_with("/fd")))
            .collect();
        let numbers: Vec<&str> = fds.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, ["0", "1", "2", "3"], "{list}");
        assert!(fds[3].1.starts_with("socket:"), "{list}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// With passt installed and CAP_NET_ADMIN: a guest with a TAP and a
/// user-mode device runs and ends normally, the TAP capsule created is
/// gone afterwards and so is passt.
#[test]
fn network_devices_attach_and_passt_is_stopped() {
    let has_passt = Command::new("passt")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !has_passt || !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: needs passt, root and /dev/net/tun");
        return;
    }
    let kernel = poweroff_guest();
    let tap = format!("capst{}", std::process::id() % 100_000);
    let out = capsule_env(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            &format!("tap={tap}"),
            "--net",
            "user,publish=45678:80",
        ],
        &[("CAPSULE_LOG", "info")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains(&format!("created TAP device {tap}")), "{err}");
    assert!(err.contains("MAC 02:ca:75:00:00:00"), "{err}");
    assert!(err.contains("MAC 02:ca:75:00:00:01"), "{err}");
    assert!(!std::path::Path::new("/sys/class/net").join(&tap).exists());
    let pid: u32 = err
        .split("started passt (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no passt pid in: {err}"));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "passt {pid} still runs"
    );
}

/// A guest that reads `count` distinct unbacked guest-physical addresses
/// (8 bytes each, 8 apart, from 64 MiB up, inside the identity-mapped
/// first GiB but above the 32 MiB of RAM it runs with: every read is an
/// MMIO exit to capsule), then powers off.
fn mmio_sweep_guest(name: &str, count: u32) -> PathBuf {
    let mut a = Asm::default();
    a.0.extend([0xb8]); // mov eax, 0x0400_0000
    a.0.extend(0x0400_0000u32.to_le_bytes());
    a.0.push(0xb9); // mov ecx, count
    a.0.extend(count.to_le_bytes());
    let top = a.0.len();
    a.0.extend([0x48, 0x8b, 0x10]); // mov rdx, [rax]
    a.0.extend([0x48, 0x83, 0xc0, 0x08]); // add rax, 8
    a.0.extend([0xff, 0xc9]); // dec ecx
    a.0.extend([0x75, 0x00]); // jnz top
    let end = a.0.len();
    a.0[end - 1] = (top as isize - end as isize) as i8 as u8;
    a.print("swept\n")
        .outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    write_guest(name, &a)
}

/// kB of a `VmHWM:`-style line in /proc/PID/status.
fn status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Runs capsule with `kernel` and 32 MiB of RAM to completion, polling its
/// peak resident set (VmHWM, a high-water mark, so the last reading before
/// exit is the run's peak up to the polling interval). Returns (peak kB,
/// stdout, status, seconds).
fn run_measuring_hwm(kernel: &std::path::Path) -> (u64, String, Option<i32>, f64) {
    let start = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["run", "--memory", "32M", "--kernel"])
        .arg(kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run capsule");
    let pid = child.id();
    let mut hwm = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = status_kb(&s, "VmHWM:") {
                hwm = hwm.max(kb);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(900),
            "the MMIO sweep did not finish in 15 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    (hwm, out, status.code(), start.elapsed().as_secs_f64())
}

/// A guest touching millions of distinct unbacked MMIO addresses must not
/// grow capsule's memory: the per-vCPU exit statistics are bounded.
/// `CAPSULE_TEST_MMIO_SWEEP` sets the number of reads (default below).
#[test]
fn distinct_mmio_reads_do_not_grow_memory() {
    let count: u32 = std::env::var("CAPSULE_TEST_MMIO_SWEEP")
        .ok()
        .map(|v| v.parse().expect("CAPSULE_TEST_MMIO_SWEEP: a number"))
        .unwrap_or(MMIO_SWEEP_READS);
    let small = mmio_sweep_guest("mmio-sweep-small.elf", 1000);
    let big = mmio_sweep_guest("mmio-sweep-big.elf", count);
    let (base, out, code, _) = run_measuring_hwm(&small);
    assert_eq!((out.as_str(), code), ("swept\n", Some(0)));
    let (peak, out, code, secs) = run_measuring_hwm(&big);
    eprintln!(
        "{count} distinct MMIO reads: {secs:.1} s ({:.0} exits/s); VmHWM {base} kB -> {peak} kB",
        f64::from(count) / secs
    );
    assert_eq!((out.as_str(), code), ("swept\n", Some(0)));
    assert!(
        peak.saturating_sub(base) < 8 * 1024,
        "capsule's peak RSS grew from {base} kB to {peak} kB over {count} distinct MMIO reads"
    );
}

/// The first virtio-mmio device's window (the first `--disk`).
const VIRTIO_MMIO0: u32 = 0xd000_0000;
/// The virtio-mmio status register.
const VIRTIO_MMIO_STATUS: u8 = 0x70;

impl Asm {
    /// mov rax, imm64; mov rbx, imm64; mov [rbx], rax
    fn store_u64(&mut self, addr: u64, v: u64) -> &mut Self {
        self.0.extend([0x48, 0xb8]);
        self.0.extend(v.to_le_bytes());
        self.0.extend([0x48, 0xbb]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend([0x48, 0x89, 0x03]);
        self
    }
    /// Maps the 2 MiB page holding the virtio-mmio windows (capsule's boot
    /// page tables cover only the first GiB): a page directory for the
    /// fourth GiB at 0xc000 (zeroed RAM), one 2 MiB entry in it, and the
    /// PDPT entry for it; then reloads CR3. Leaves rbx = VIRTIO_MMIO0.
    fn map_virtio_mmio(&mut self) -> &mut Self {
        let pd = 0xc000u64;
        let index = (u64::from(VIRTIO_MMIO0) - 0xc000_0000) >> 21;
        self.store_u64(pd + index * 8, u64::from(VIRTIO_MMIO0) | 0x83)
            .store_u64(0xa000 + 3 * 8, pd | 0x3);
        self.0.extend([0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]); // mov rax, cr3; mov cr3, rax
        self.0.push(0xbb); // mov ebx, VIRTIO_MMIO0
        self.0.extend(VIRTIO_MMIO0.to_le_bytes());
        self
    }
    /// mov dword [rbx + off], v
    fn store_rbx_u32(&mut self, off: u8, v: u32) -> &mut Self {
        self.0.extend([0xc7, 0x43, off]);
        self.0.extend(v.to_le_bytes());
        self
    }
}

/// A guest that loops forever over a virtio-mmio handshake the device must
/// refuse (FEATURES_OK without VIRTIO_F_VERSION_1), each a warning.
fn features_ok_flood_guest() -> PathBuf {
    let mut a = Asm::default();
    a.map_virtio_mmio();
    let top = a.0.len();
    a.store_rbx_u32(VIRTIO_MMIO_STATUS, 0) // reset
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 1) // ACKNOWLEDGE
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 3) // DRIVER
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 0xb); // FEATURES_OK, no features
    a.0.extend([0xeb, 0x00]); // jmp top
    let end = a.0.len();
    a.0[end - 1] = (top as isize - end as isize) as i8 as u8;
    write_guest("features-ok-flood.elf", &a)
}

/// Runs capsule with `args` for `secs` seconds, its stderr in a file,
/// then stops it with SIGTERM; returns (stderr, the signal it died of:
/// capsule stops the VM in order and then dies of the same signal).
fn run_for(args: &[&str], secs: u64, log: &std::path::Path) -> (String, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("run capsule");
    std::thread::sleep(std::time::Duration::from_secs(secs));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    (std::fs::read_to_string(log).unwrap(), status.signal())
}

/// Sum of the N in "[N more suppressed]" in `log`.
fn suppressed_total(log: &str) -> u64 {
    log.split('[')
        .filter_map(|p| p.split_once(" more suppressed]"))
        .filter_map(|(n, _)| n.parse::<u64>().ok())
        .sum()
}

/// Seconds a log-flood test lets its guest run (`CAPSULE_TEST_FLOOD_SECS`).
/// The rate limit is per 5 s interval, so 15 s cover three intervals; the
/// issue's 60 s would only multiply the same bound by four.
fn flood_secs() -> u64 {
    std::env::var("CAPSULE_TEST_FLOOD_SECS")
        .ok()
        .map(|v| v.parse().expect("CAPSULE_TEST_FLOOD_SECS: a number"))
        .unwrap_or(15)
}

/// A guest repeating a refused FEATURES_OK as fast as it can produces many
/// thousands of warnings; capsule's log stays small and says how many it
/// suppressed.
#[test]
fn guest_log_flood_is_rate_limited() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("log-flood");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let kernel = features_ok_flood_guest();
    let secs = flood_secs();
    let (log, code) = run_for(
        &[
            "run",
            "--memory",
            "32M",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
        ],
        secs,
        &dir.join("stderr"),
    );
    assert_eq!(code, Some(libc::SIGTERM), "{}", &log[..log.len().min(4000)]);
    let warnings = log.matches("VIRTIO_F_VERSION_1").count() as u64;
    let suppressed = suppressed_total(&log);
    eprintln!(
        "{secs} s of refused FEATURES_OK: {} bytes of log, {warnings} warnings logged, at least {suppressed} suppressed",
        log.len()
    );
    assert!(log.len() < 1 << 20, "{} bytes of log", log.len());
    assert!(log.contains("more suppressed]"), "{log}");
    // The guest really flooded: thousands of warnings were triggered.
    assert!(
        warnings + suppressed > 5000,
        "only {warnings} warnings and {suppressed} suppressed: {log}"
    );
    // At most a burst of 10 per 5 s interval.
    assert!(
        warnings <= 10 * (secs / 5 + 2),
        "{warnings} warnings: {log}"
    );
}

/// A detached VM whose guest prints to the serial console and floods the
/// log without end keeps `console.log` and `vmm.log` under the cap
/// (`CAPSULE_DETACHED_LOG_MAX`): each is rotated to NAME.1 at the cap.
#[test]
fn detached_logs_are_capped() {
    const CAP: u64 = 1024;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("log-cap");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut a = Asm::default();
    a.map_virtio_mmio();
    let top = a.0.len();
    a.print("console flood 0123456789\n")
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 0)
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 1)
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 3)
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 0xb);
    a.0.push(0xe9); // jmp top (rel32)
    let after = a.0.len() as i32 + 4;
    a.0.extend((top as i32 - after).to_le_bytes());
    let kernel = write_guest("log-cap.elf", &a);
    let name = format!("logcap-{}", std::process::id());
    let cap = CAP.to_string();
    let out = capsule_env(
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--memory",
            "32M",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
        ],
        &[("CAPSULE_DETACHED_LOG_MAX", &cap)],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = capsule_env(&["ls", "--json"], &[]);
    let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
    let list: serde_json::Value = serde_json::from_str(&ls).expect("ls --json");
    let vm_dir = list
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == name.as_str()))
        .and_then(|v| v["dir"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} not in ls: {ls}"));
    let size = |f: &str| std::fs::metadata(vm_dir.join(f)).map(|m| m.len()).ok();
    // Wait until both logs have rotated at least once (several rate-limit
    // intervals of warnings, many KiB of console output: about 6 s on an
    // idle machine), however slow a loaded machine runs the guest.
    let t = std::time::Instant::now();
    while (size("console.log.1").is_none() || size("vmm.log.1").is_none())
        && t.elapsed() < std::time::Duration::from_secs(90)
    {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let sizes: Vec<_> = ["console.log", "console.log.1", "vmm.log", "vmm.log.1"]
        .iter()
        .map(|f| (*f, size(f)))
        .collect();
    let logs = capsule_env(&["logs", &name], &[]);
    let kill = capsule_env(&["kill", &name], &[]);
    eprintln!(
        "cap {CAP}: {sizes:?}; `logs` gave {} bytes",
        logs.stdout.len()
    );
    assert_eq!(kill.status.code(), Some(0));
    for (f, s) in &sizes {
        let s = s.unwrap_or_else(|| panic!("no {f} in {}: {sizes:?}", vm_dir.display()));
        // One write (a console byte, a log line) past the cap at most.
        assert!(s <= CAP + 256, "{f} has {s} bytes: {sizes:?}");
    }
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("console flood 0123456789\n"), "{text}");
    assert!(
        logs.stdout.len() as u64 <= 2 * CAP + 256,
        "{}",
        logs.stdout.len()
    );
}

/// Fail-stop: a panicking vCPU thread (injected through the debug-build
/// test hook `CAPSULE_TEST_PANIC=vcpu`, at its 10th exit) ends capsule at
/// once with status 70 and a line saying which thread panicked, instead of
/// leaving the VMM running without it.
#[test]
fn vcpu_panic_stops_capsule_at_once() {
    use std::io::Read;
    let mut a = Asm::default();
    let top = a.0.len();
    a.print("up\n").print(".");
    a.0.push(0xe9); // jmp top (rel32): prints for ever
    let after = a.0.len() as i32 + 4;
    a.0.extend((top as i32 - after).to_le_bytes());
    let kernel = write_guest("vcpu-panic.elf", &a);
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["run", "--memory", "32M", "--kernel"])
        .arg(&kernel)
        .env("CAPSULE_TEST_PANIC", "vcpu")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    // The guest runs: its first line arrives (the panic comes 7 exits
    // later), then the clock starts.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"up\n") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "no output: {seen:?}");
        seen.push(byte[0]);
    }
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("capsule still runs 10 s after its vCPU thread panicked");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let took = t.elapsed();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    eprintln!("capsule exited {took:?} after the guest's first line: {err}");
    assert_eq!(status.code(), Some(70), "{err}");
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    assert!(
        err.starts_with("capsule: error: internal error: thread 'vcpu0' panicked at "),
        "{err}"
    );
    assert!(err.contains("injected panic"), "{err}");
}

/// `--config-file` reaches the VM through the API's typed actions, with no
/// HTTP or JSON in between: a refused section, a refused value and a
/// failed start each give one `capsule: error:` line carrying the action's
/// own message (status 1), and a good file boots the guest.
#[test]
fn config_file_goes_through_the_api_actions() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("config-file");
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = poweroff_guest();
    let kernel = kernel.to_str().unwrap();
    let boot = format!(
        r#""boot-source": {{"kernel_image_path": "{kernel}", "boot_args": "console=ttyS0"}}"#
    );
    let cases: &[(&str, String, i32, &str)] = &[
        (
            "section",
            format!(r#"{{{boot}, "balloon": {{"amount_mib": 1}}}}"#),
            1,
            "capsule: error: capsule does not support: balloon\n",
        ),
        (
            "value",
            format!(r#"{{{boot}, "machine-config": {{"vcpu_count": 0, "mem_size_mib": 128}}}}"#),
            1,
            "capsule: error: vcpu_count must be between 1 and 32, not 0\n",
        ),
        (
            "mac",
            format!(
                r#"{{{boot}, "network-interfaces": [{{"iface_id": "eth0",
                    "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}}]}}"#
            ),
            1,
            "capsule: error: network interface eth0: MAC address '01:00:00:00:00:01' \
             is a multicast address (the lowest bit of the first byte is set)\n",
        ),
        (
            "start",
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#.to_string(),
            1,
            "capsule: error: cannot read kernel /nonexistent/vmlinux: No such file or directory (os error 2); check the path\n",
        ),
        ("good", format!("{{{boot}}}"), 0, ""),
    ];
    for (name, json, status, stderr) in cases {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, json).unwrap();
        let out = capsule(
            &["run", "--no-api", "--config-file", path.to_str().unwrap()],
            None,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*status), "{name}: stderr: {err}");
        if *status != 0 {
            assert_eq!(err, *stderr, "{name}");
        }
    }
}

/// Starts capsule on `kernel` with stdin piped (the guest of
/// [`poweroff_on_input_guest`] runs until a byte arrives).
fn spawn_capsule(args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule")
}

/// Waits up to `secs` for `child` to end; kills it and fails otherwise.
fn wait_or_kill(mut child: std::process::Child, secs: u64) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "capsule still running after {secs} s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// (thread name, Seccomp mode, filter count) of every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(0),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    out.sort();
    out
}

/// Every thread of a running capsule — main, vCPUs, API, wait.sock —
/// has exactly one seccomp filter (its own: none stacked on another's)
/// by default; `--no-seccomp` runs none and says so.
#[test]
fn every_thread_is_confined_by_default() {
    let kernel = poweroff_on_input_guest();
    let runtime = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("seccomp-runtime");
    let _ = std::fs::remove_dir_all(&runtime);
    let env = [("CAPSULE_RUNTIME_DIR", runtime.to_str().unwrap())];
    for (extra, want) in [(None, 2), (Some("--no-seccomp"), 0)] {
        let mut args = vec!["run", "--kernel", kernel.to_str().unwrap(), "--cpus", "2"];
        args.extend(["--name", "confined"]);
        args.extend(extra);
        let mut child = spawn_capsule(&args, &env);
        let pid = child.id();
        let names = ["api", "capsule", "vcpu0", "vcpu1", "waiters"];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let threads = loop {
            // Threads install their filters as they start; the main
            // thread last, once the VM runs. KVM's own worker task in the
            // process (kvm-nx-lpage-recovery) is the kernel's.
            let mut t = thread_seccomp(pid);
            t.retain(|(name, ..)| !name.starts_with("kvm-"));
            let all_there = names.iter().all(|n| t.iter().any(|(name, ..)| name == n));
            if all_there && t.iter().all(|(_, mode, _)| *mode == want) {
                break t;
            }
            assert!(std::time::Instant::now() < deadline, "threads: {t:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        for (name, mode, filters) in &threads {
            assert_eq!(*mode, want, "{extra:?}: thread {name}: {threads:?}");
            assert_eq!(*filters, want / 2, "{extra:?}: thread {name}: {threads:?}");
        }
        child.stdin.take().unwrap().write_all(b"x").unwrap();
        let out = wait_or_kill(child, 20);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {err}");
        assert_eq!(
            err.contains("seccomp is off (--no-seccomp)"),
            extra.is_some(),
            "{extra:?}: {err}"
        );
    }
}

/// A forbidden call (the debug-build hook `CAPSULE_TEST_SECCOMP`) kills
/// capsule with SIGSYS by default; with `CAPSULE_SECCOMP=trap` capsule
/// names the thread and the call, then exits 159. Argument filters hold:
/// an executable mapping is a forbidden call too.
#[test]
fn forbidden_call_kills_capsule() {
    use std::os::unix::process::ExitStatusExt;
    let kernel = poweroff_on_input_guest();
    let sock = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("seccomp-api.sock");
    let run = |hook: &str, mode: &str| {
        let _ = std::fs::remove_file(&sock);
        let args = [
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ];
        let child = spawn_capsule(
            &args,
            &[("CAPSULE_TEST_SECCOMP", hook), ("CAPSULE_SECCOMP", mode)],
        );
        wait_or_kill(child, 20)
    };
    let out = run("vcpu", "kill");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    let out = run("api", "");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    for (hook, thread, nr) in [
        ("vcpu", "vcpu0", libc::SYS_ptrace),
        ("vcpu-exec-mmap", "vcpu0", libc::SYS_mmap),
        ("api", "api", libc::SYS_ptrace),
    ] {
        let out = run(hook, "trap");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(159), "{hook}: {err}");
        let line = format!(
            "capsule: error: seccomp: thread '{thread}' made a forbidden system call {nr}; stopping (status 159)"
        );
        assert!(err.contains(&line), "{hook}: want {line:?} in {err}");
    }
    let out = capsule_env(
        &["run", "--kernel", "/nonexistent"],
        &[("CAPSULE_SECCOMP", "sometimes")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("capsule: error: CAPSULE_SECCOMP=sometimes: expected kill, trap or log"),
        "{err}"
    );
}

/// `--seccomp-filter` takes compiled filters in Firecracker's format
/// (`capsule seccomp --compile` writes capsule's own); a file that is not
/// one is refused with one line and status 1.
#[test]
fn seccomp_filter_file_is_loaded() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let file = dir.join("capsule-filters.bpf");
    let out = capsule(&["seccomp", "--compile", file.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let kernel = poweroff_guest();
    let out = capsule(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--seccomp-filter",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let junk = dir.join("junk-filters.bpf");
    std::fs::write(&junk, b"not a filter").unwrap();
    let out = capsule(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--seccomp-filter",
            junk.to_str().unwrap(),
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not a compiled seccomp filter file"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Landlock leaves capsule its own /proc entries: the boot-time marker
/// still reports the process's CPU time (read from
/// /proc/self/task/*/schedstat on the vCPU thread; the boot suite's
/// `boot_marker` found it missing once Landlock was on).
#[test]
fn boot_marker_reports_cpu_time_under_landlock() {
    let mut a = Asm::default();
    a.outb(0x3c4, 1)
        .outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    let kernel = write_guest("boot-marker.elf", &a);
    let out = capsule_env(
        &["run", "--kernel", kernel.to_str().unwrap()],
        &[("CAPSULE_LOG", "info")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("boot marker 1:"))
        .unwrap_or_default();
    assert!(line.contains(" ms CPU"), "no CPU time in {line:?}: {err}");
}

/// Once the VM runs capsule cannot open files it was not configured with:
/// the debug-build hook `CAPSULE_TEST_LANDLOCK=shadow` opens /etc/shadow
/// from inside capsule and gets EACCES (without Landlock, as root, it
/// opens).
#[test]
fn landlock_keeps_capsule_out_of_etc_shadow() {
    let kernel = poweroff_guest();
    let env = [("CAPSULE_TEST_LANDLOCK", "shadow"), ("CAPSULE_LOG", "warn")];
    let out = capsule_env(&["run", "--kernel", kernel.to_str().unwrap()], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "CAPSULE_TEST_LANDLOCK: cannot open /etc/shadow: Permission denied (os error 13)"
        ),
        "{err}"
    );
    if std::fs::File::open("/etc/shadow").is_ok() {
        let out = capsule_env(
            &["run", "--kernel", kernel.to_str().unwrap(), "--no-landlock"],
            &env,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("CAPSULE_TEST_LANDLOCK: opened /etc/shadow"),
            "{err}"
        );
    }
}

/// `run --jail` (as root): the VM's capsule runs as the given uid/gid,
/// as PID 1 of its own PID namespace, in its own mount namespace whose
/// root holds only the kernel (read-only), /dev/kvm, /proc, /tmp and the
/// API socket, with the rlimit, no_new_privs and seccomp; the API answers
/// on the socket inside the jail; the jail directory goes when the VM
/// ends. A `memory.max` below guest RAM is refused before anything starts;
/// `--cgroup` needs cgroup v2 at /sys/fs/cgroup (this development host
/// has v1 controllers: there the clear refusal is checked instead).
#[test]
fn jailed_vm_runs_confined_and_cleans_up() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the jail test needs root");
    let kernel = poweroff_on_input_guest();
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jail-base");
    let _ = std::fs::remove_dir_all(&base);
    let jail = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--jail",
            "--chroot-base",
            base.to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--id",
            "jailtest",
            "--kernel",
            kernel.to_str().unwrap(),
        ];
        args.extend(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let args = jail(&["--rlimit", "nofile=128", "--api-sock", "/api.sock"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut keeper = spawn_capsule(&args, &[]);
    let root = base.join("capsule/jailtest/root");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let jailed = loop {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", keeper.id()))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if status.contains("Seccomp:\t2") && root.join("api.sock").exists() {
                break pid.to_string();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the jailed capsule never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let status = std::fs::read_to_string(format!("/proc/{jailed}/status")).unwrap();
    for want in [
        "Uid:\t65534\t65534\t65534\t65534",
        "Gid:\t65534\t65534",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(status.contains(want), "want {want:?} in {status}");
    }
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid.ends_with("\t1"),
        "not PID 1 of its own namespace: {nspid}"
    );
    let ns = |p: &str, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).unwrap();
    assert_ne!(
        ns(&jailed, "mnt"),
        ns("self", "mnt"),
        "same mount namespace"
    );
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{jailed}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["api.sock", "dev", "poweroff-on-input.elf", "proc", "tmp"]
    );
    let mounts = std::fs::read_to_string(format!("/proc/{jailed}/mountinfo")).unwrap();
    let kernel_mount = mounts
        .lines()
        .find(|l| l.contains(" /poweroff-on-input.elf "))
        .unwrap();
    assert!(
        kernel_mount.contains(" ro,"),
        "kernel not read-only: {kernel_mount}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{jailed}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 128 ")),
        "{limits}"
    );
    let mut api = std::os::unix::net::UnixStream::connect(root.join("api.sock")).unwrap();
    api.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = std::io::Read::read(&mut api, &mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("\"id\":\"jailtest\""));
    keeper.stdin.take().unwrap().write_all(b"x").unwrap();
    let out = wait_or_kill(keeper, 20);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !base.join("capsule/jailtest").exists(),
        "jail directory left behind"
    );

    // Refused before anything starts: memory.max below guest RAM.
    let args = jail(&["--memory", "256M", "--cgroup", "memory.max=64M"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = capsule(&args, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(
            "capsule: error: --jail: --cgroup memory.max=64M is below the guest's memory (256 MiB)"
        ),
        "{err}"
    );
    assert!(!base.join("capsule/jailtest").exists());

    // cgroup v2 limits.
    let args = jail(&["--cgroup", "pids.max=64"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v2 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/sys/fs/cgroup") && l.contains(" - cgroup2 "));
    let mut keeper = spawn_capsule(&args, &[]);
    if v2 {
        let cg = std::path::Path::new("/sys/fs/cgroup/capsule/jailtest");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cg.join("cgroup.procs").exists()
            || std::fs::read_to_string(cg.join("cgroup.procs"))
                .unwrap_or_default()
                .trim()
                .is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the cgroup never got the jailed capsule"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            std::fs::read_to_string(cg.join("pids.max")).unwrap().trim(),
            "64"
        );
        let pid = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
        let pid = pid.split_whitespace().next().unwrap();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(cgroup.contains("/capsule/jailtest"), "{cgroup}");
        keeper.stdin.take().unwrap().write_all(b"x").unwrap();
        let out = wait_or_kill(keeper, 20);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!cg.exists(), "cgroup left behind");
    } else {
        let out = wait_or_kill(keeper, 20);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--cgroup needs cgroup v2 mounted at /sys/fs/cgroup"),
            "{err}"
        );
    }
    assert!(!base.join("capsule/jailtest").exists());
}
