//! The ten errors a new user is most likely to meet first, through the
//! real binary: each is one `capsule: error:` line on stderr that says
//! what to do, with a documented status (README.md, "Troubleshooting").
//!
//! The guest is a tiny hand-made ELF that halts (or powers off), so this
//! runs on any /dev/kvm, PVM included. Where a case needs a missing
//! privilege (a KVM device one cannot open, no CAP_NET_ADMIN), a test run
//! as root drops it from the capability bounding set of the capsule it
//! starts, so that root sees what an ordinary user sees.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};

mod common;
use common::elf;

fn scratch() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("first-errors");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A guest that halts for ever (`hlt; jmp hlt`).
fn halting_guest() -> PathBuf {
    let p = scratch().join("halt");
    // Tests run in parallel: written whole under another name, then
    // renamed, so no test reads a half-written file.
    let tmp = scratch().join(format!("halt.{:?}", std::thread::current().id()));
    std::fs::write(&tmp, common::halting_guest()).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

/// Capabilities a test run as root takes away from capsule.
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;

fn capsule(args: &[&str], env: &[(&str, &str)], drop_caps: &[u32]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsule"));
    cmd.args(args).envs(env.iter().copied());
    let caps = drop_caps.to_vec();
    // SAFETY: runs in the child between fork and exec and only calls
    // prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for &c in &caps {
                if libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) != 0
                    && libc::geteuid() == 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // Each case fails before the VM runs; a capsule still running after
    // a minute (a VM started despite the error) is killed and fails here.
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run capsule");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
            // SAFETY: kill(2) on the child we started, still unreaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("wait for capsule");
    let _ = tx.send(());
    assert!(
        out.status.code().is_some(),
        "capsule {args:?} ran on after its error and was killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One line, `capsule: error: ` first, containing each of `wants`.
fn assert_one_line(out: &Output, status: i32, wants: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(status), "{err}");
    assert_eq!(err.lines().count(), 1, "want one line, got:\n{err}");
    assert!(err.starts_with("capsule: error: "), "{err}");
    for w in wants {
        assert!(err.contains(w), "no {w:?} in: {err}");
    }
    err
}

#[test]
fn no_kvm_device() {
    let k = halting_guest();
    let out = capsule(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--kvm",
            "/nonexistent/kvm",
        ],
        &[],
        &[],
    );
    assert_one_line(
        &out,
        1,
        &[
            "cannot open /nonexistent/kvm",
            "this host has no KVM: load kvm_intel or kvm_amd",
            "capsule doctor",
        ],
    );
}

/// `capsule exec` says so before it packs any share (a CI runner without
/// KVM fails at once, whatever it shares).
#[test]
fn exec_without_kvm_fails_before_packing_shares() {
    let k = halting_guest();
    let share = scratch().join("unreadable-share");
    std::fs::create_dir_all(&share).unwrap();
    // A FIFO in the share: packing it would log a warning first.
    let fifo = share.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = capsule(
        &[
            "exec",
            "--kernel",
            k.to_str().unwrap(),
            "--kvm",
            "/nonexistent/kvm",
            "--share",
            &format!("{}:/s", share.display()),
            "--",
            "true",
        ],
        &[],
        &[],
    );
    assert_one_line(
        &out,
        125,
        &["cannot open /nonexistent/kvm", "this host has no KVM"],
    );
}

#[test]
fn kvm_device_not_accessible() {
    use std::os::unix::fs::PermissionsExt;
    let k = halting_guest();
    let dev = scratch().join("kvm-no-access");
    std::fs::write(&dev, b"").unwrap();
    std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = capsule(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--kvm",
            dev.to_str().unwrap(),
        ],
        &[],
        &[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH],
    );
    assert_one_line(
        &out,
        1,
        &[
            "Permission denied",
            "add yourself to that group (sudo usermod -aG",
        ],
    );
}

/// `capsule exec` with a kernel that lacks the session's channel: vsock
/// by default, where the line names the console fallback; virtio-console
/// with `CAPSULE_EXEC_CHANNEL=console`.
#[test]
fn kernel_without_the_exec_channel() {
    for (i, (config, channel, wants)) in [
        (
            "CONFIG_VIRTIO_CONSOLE=y\n",
            None,
            &[
                "the kernel has no vsock (CONFIG_VSOCKETS is not set)",
                "or set CAPSULE_EXEC_CHANNEL=console",
            ][..],
        ),
        (
            "CONFIG_VSOCKETS=y\nCONFIG_VIRTIO_VSOCKETS=m\n",
            None,
            &["the kernel has virtio-vsock only as a module", "--modules"][..],
        ),
        (
            "CONFIG_VSOCKETS=y\nCONFIG_VIRTIO_VSOCKETS=y\n",
            Some("console"),
            &["the kernel has no virtio-console (CONFIG_VIRTIO_CONSOLE is not set)"][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = scratch().join(format!("no-channel-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("vmlinux");
        std::fs::copy(halting_guest(), &k).unwrap();
        std::fs::write(
            dir.join("config"),
            format!("CONFIG_X86_64=y\nCONFIG_VIRTIO_MMIO=y\n{config}"),
        )
        .unwrap();
        let env: Vec<(&str, &str)> = channel
            .map(|c| ("CAPSULE_EXEC_CHANNEL", c))
            .into_iter()
            .collect();
        let out = capsule(
            &[
                "exec",
                "--kernel",
                k.to_str().unwrap(),
                "--boot-timeout",
                "1",
                "--",
                "true",
            ],
            &env,
            &[],
        );
        let err = assert_one_line(&out, 123, wants);
        if channel.is_some() {
            assert!(!err.contains("CAPSULE_EXEC_CHANNEL"), "{err}");
        }
    }
}

/// `capsule exec` with a kernel whose init never starts because it has no
/// virtio-mmio: the boot-time-out line says why and what to do.
#[test]
fn kernel_without_virtio_mmio() {
    for (setting, want) in [
        (
            "# CONFIG_VIRTIO_MMIO is not set",
            "the kernel has no virtio-mmio (CONFIG_VIRTIO_MMIO is not set)",
        ),
        (
            "CONFIG_VIRTIO_MMIO=m",
            "the kernel has virtio-mmio only as a module",
        ),
    ] {
        let dir = scratch().join(format!("no-mmio-{}", want.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("vmlinux");
        std::fs::copy(halting_guest(), &k).unwrap();
        std::fs::write(
            dir.join("config"),
            format!("CONFIG_X86_64=y\n{setting}\nCONFIG_VIRTIO_CONSOLE=y\n"),
        )
        .unwrap();
        let out = capsule(
            &[
                "exec",
                "--kernel",
                k.to_str().unwrap(),
                "--boot-timeout",
                "1",
                "--",
                "true",
            ],
            &[],
            &[],
        );
        assert_one_line(
            &out,
            123,
            &[want, "use a kernel built with CONFIG_VIRTIO_MMIO=y"],
        );
    }
}

/// `capsule run --disk` with a kernel that panics (here at once, through
/// pvpanic) and whose configuration lacks virtio-blk: after the panic
/// line, the probable cause and what to do.
#[test]
fn run_panic_with_a_kernel_without_virtio_blk() {
    let dir = scratch().join("no-blk");
    std::fs::create_dir_all(&dir).unwrap();
    let k = dir.join("vmlinux");
    // mov dx, 0x505; mov al, 1; out dx, al (pvpanic); hlt; jmp hlt
    std::fs::write(
        &k,
        elf(&[0x66, 0xba, 0x05, 0x05, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd]),
    )
    .unwrap();
    std::fs::write(
        dir.join("config"),
        "CONFIG_VIRTIO_MMIO=y\n# CONFIG_VIRTIO_BLK is not set\n",
    )
    .unwrap();
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let args = [
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
    ];
    let out = capsule(&args, &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    // (after capsule's own log line about the pvpanic write)
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[lines.len().saturating_sub(2)..],
        [
            "capsule: the guest kernel panicked",
            &*format!(
                "capsule: probable cause: the kernel has no virtio-blk (CONFIG_VIRTIO_BLK is not \
                 set): use a kernel built with CONFIG_VIRTIO_BLK=y (capsule doctor --kernel {} \
                 lists what else it lacks)",
                k.display()
            ),
        ],
    );
    // Without the disk, the panic has nothing to do with it: no guess.
    let out = capsule(&["run", "--kernel", k.to_str().unwrap()], &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.ends_with("capsule: the guest kernel panicked\n"),
        "{err}"
    );
    assert!(!err.contains("probable cause"), "{err}");
}

#[test]
fn initramfs_not_found() {
    let k = halting_guest();
    let out = capsule(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd.img",
        ],
        &[],
        &[],
    );
    assert_one_line(
        &out,
        1,
        &[
            "cannot read initrd /nonexistent/initrd.img",
            "check the path",
        ],
    );
}

#[test]
fn disk_in_use() {
    use std::os::fd::AsRawFd;
    let k = halting_guest();
    let img = scratch().join("in-use.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    // Another VM has it: an open file description lock on the whole file,
    // as Cloud Hypervisor (or a read-only capsule/QEMU, on its bytes) takes.
    let holder = std::fs::File::open(&img).unwrap();
    // SAFETY: flock is a plain C struct; all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::c_short::try_from(libc::F_RDLCK).unwrap();
    fl.l_whence = libc::c_short::try_from(libc::SEEK_SET).unwrap();
    // SAFETY: a valid descriptor and a valid flock.
    let r = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let out = capsule(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--disk",
            img.to_str().unwrap(),
        ],
        &[],
        &[],
    );
    assert_one_line(
        &out,
        1,
        &[
            "is in use by another process",
            "stop the VM that has it",
            ",ro or ,ephemeral",
        ],
    );
    drop(holder);
}

#[test]
fn passt_missing() {
    let k = halting_guest();
    let out = capsule(
        &["run", "--kernel", k.to_str().unwrap(), "--net", "user"],
        &[("CAPSULE_PASST", "/nonexistent/passt")],
        &[],
    );
    assert_one_line(
        &out,
        1,
        &[
            "passt",
            "install the Debian package passt, or set CAPSULE_PASST",
        ],
    );
}

#[test]
fn tap_without_cap_net_admin() {
    let k = halting_guest();
    let name = format!("capnotap{}", std::process::id() % 10000);
    let out = capsule(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--net",
            &format!("tap={name}"),
        ],
        &[],
        &[CAP_NET_ADMIN],
    );
    assert_one_line(
        &out,
        1,
        &[
            "needs CAP_NET_ADMIN",
            &format!("ip tuntap add {name} mode tap user $USER"),
        ],
    );
    assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
}

#[test]
fn publish_port_in_use() {
    let k = halting_guest();
    let taken = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = capsule(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--net",
            &format!("user,publish={port}:80"),
        ],
        // passt is never started: the port is checked first.
        &[("CAPSULE_PASST", "/bin/false")],
        &[],
    );
    assert_one_line(
        &out,
        1,
        &[
            &format!("cannot publish host port {port} (publish={port}:80)"),
            "another program is listening on it",
            "pick another host port",
        ],
    );
    drop(taken);
}

#[test]
fn memory_too_large() {
    let k = halting_guest();
    let out = capsule(
        &["run", "--kernel", k.to_str().unwrap(), "--memory", "1000T"],
        &[],
        &[],
    );
    assert_one_line(
        &out,
        1,
        &["cannot give the guest 1000 TiB", "ask for less (--memory"],
    );
}

#[test]
fn api_socket_path_taken() {
    let k = halting_guest();
    let sock = scratch().join("api.sock");
    std::fs::write(&sock, b"not a socket").unwrap();
    let out = capsule(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        &[],
        &[],
    );
    assert_one_line(
        &out,
        1,
        &[
            "cannot serve the API on",
            "is a regular file",
            "remove it or choose another path",
        ],
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
}
