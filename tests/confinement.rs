//! What confines a running capsule, checked from outside the process:
//! the descriptors its children inherit, one seccomp filter per thread
//! (and `--seccomp-filter` files) and Landlock (`run --jail`: tests/jail.rs).
//! Runs on any /dev/kvm, PVM included.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

mod common;
use common::guest::*;
use common::run::*;

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
