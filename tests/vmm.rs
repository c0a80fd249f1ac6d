//! End-to-end tests of the VMM on /dev/kvm with tiny hand-assembled 64-bit
//! guests: ELF loading, long-mode vCPU setup, port I/O dispatch, the serial
//! console in both directions and the terminal around it, devices
//! attaching, `--config-file`, every way a guest ends the VM, and a
//! panicking vCPU thread ending capsule (fail-stop).
//!
//! These run on any KVM, including PVM hosts where a Linux guest cannot
//! boot (Linux guests are covered by the boot tests in tests/boot). They
//! fail, never skip, when /dev/kvm is unusable.
//!
//! Beside this file, on the same guests (tests/common/guest.rs, run by
//! tests/common/run.rs): bad_inputs.rs (what a bad command line or host
//! setup answers), hostile_guest.rs (guests that try to exhaust capsule)
//! and confinement.rs (seccomp, Landlock, `--jail`, inherited descriptors).

use std::path::PathBuf;
use std::process::{Command, Stdio};

mod common;
use common::guest::*;
use common::rel8;
use common::run::*;

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
    a.short_jump(0x74, poll); // jz poll
    a.mov_dx(COM1).in_al_dx();
    a.0.extend([0x3c, b'\n']); // cmp al, '\n'
    a.0.extend([0x74, 0x00]); // je done (patched below)
    let je = a.0.len();
    a.0.extend([0xfe, 0xc0]); // inc al
    a.out_dx_al();
    a.jmp(poll);
    let done = a.0.len();
    a.0[je - 1] = rel8(done, je);
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
    a.jmp(top); // prints for ever
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
            format!(r#"{{{boot}, "pmem": [{{"id": "p1", "path_on_host": "/p"}}]}}"#),
            1,
            "capsule: error: capsule does not support: pmem\n",
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
