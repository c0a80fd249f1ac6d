//! The commands around running VMs, through the real binary: `doctor`
//! (against this host and the project's real guest kernel),
//! `completions` and the man pages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn capsule(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .output()
        .expect("run capsule")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The project's guest kernel (`resources/build-guest-kernel.sh`, cached
/// under ~/.cache/capsule; built on first use), or
/// `$CAPSULE_GUEST_KERNEL_DIR`. Fails the test when there is none.
fn guest_kernel_dir() -> PathBuf {
    // Built once per test binary: tests run in parallel, and two cold
    // builds of the same kernel would each take the machine's cores.
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("CAPSULE_GUEST_KERNEL_DIR") {
            return PathBuf::from(d);
        }
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/build-guest-kernel.sh");
        let out = Command::new(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run resources/build-guest-kernel.sh");
        assert!(
            out.status.success(),
            "resources/build-guest-kernel.sh failed: the doctor's kernel tests need the guest kernel"
        );
        PathBuf::from(text(&out.stdout).trim())
    })
    .clone()
}

#[test]
fn doctor_without_kvm_device_says_what_to_do() {
    let out = capsule(&["doctor", "--kvm", "/nonexistent/kvm"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .starts_with("✗ /nonexistent/kvm does not exist"),
        "{stdout}"
    );
    assert!(stdout.contains("modprobe kvm_intel"), "{stdout}");
    assert!(stdout.contains("capsule cannot run VMs here"), "{stdout}");
}

/// On this host: every line is a check, the KVM kind line matches what
/// the library detects, and the status is 0 exactly when no required
/// check failed (on the PVM development hosts: 1, with the PVM line).
#[test]
fn doctor_on_this_host() {
    let out = capsule(&["doctor"]);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let (summary, checks) = lines.split_last().unwrap();
    assert!(checks.len() >= 12, "{stdout}");
    for l in checks {
        assert!(l.starts_with("✓ ") || l.starts_with("✗ "), "{l}");
    }
    let required_failed = checks
        .iter()
        .any(|l| l.starts_with("✗ ") && !l.contains("(optional; "));
    assert_eq!(
        out.status.code(),
        Some(i32::from(required_failed)),
        "{stdout}"
    );
    assert_eq!(
        *summary == "capsule can run VMs here.",
        !required_failed,
        "{stdout}"
    );
    for want in [
        "/dev/kvm exists",
        "KVM API version 12",
        "transparent huge pages",
        "passt",
        "virtiofsd",
        "TAP",
        "user namespaces",
        "cgroup v2",
        "seccomp",
        "Landlock",
    ] {
        assert!(stdout.contains(want), "no line about {want}:\n{stdout}");
    }
    if capsule::doctor::Kind::detect() == capsule::doctor::Kind::Pvm {
        assert!(
            stdout.contains("✗ KVM here is PVM")
                && stdout.contains("stock Linux guests cannot run"),
            "{stdout}"
        );
        assert_eq!(out.status.code(), Some(1));
    }
}

#[test]
fn doctor_passt_from_capsule_passt() {
    let out = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["doctor", "--kvm", "/nonexistent/kvm"])
        .env("CAPSULE_PASST", "/bin/true")
        .output()
        .unwrap();
    assert!(text(&out.stdout).contains("✓ passt: /bin/true"));
    let out = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["doctor", "--kvm", "/nonexistent/kvm"])
        .env("CAPSULE_PASST", "/nonexistent/passt")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("✗ passt: /nonexistent/passt not found (optional; to fix:"),
        "{stdout}"
    );
}

/// gzip of `data`, as the kernel's build compresses its configuration.
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The real guest kernel: its xz-compressed bzImage is decompressed to the
/// vmlinux whose banner names the release it was built as, and its
/// configuration is the `config` file beside it (it is built without
/// CONFIG_IKCONFIG, which the doctor reports).
#[test]
fn real_guest_kernel_release_and_config_beside_it() {
    use capsule::doctor::kernel::{inspect, BzImage, Source};
    let dir = guest_kernel_dir();
    let config = std::fs::read_to_string(dir.join("config")).unwrap();
    let release = std::fs::read_to_string(dir.join("kernelrelease")).unwrap();
    let bz = std::fs::read(dir.join("bzImage")).unwrap();
    let parsed = BzImage::parse(&bz).expect("a bzImage header");
    let vmlinux = parsed.decompress().expect("the payload decompresses");
    assert_eq!(
        capsule::doctor::kernel::banner_release(&vmlinux).as_deref(),
        Some(release.trim())
    );
    for name in ["bzImage", "vmlinux"] {
        let info = inspect(&dir.join(name)).unwrap();
        assert_eq!(info.release.as_deref(), Some(release.trim()), "{name}");
        let (source, found) = info.config.expect("the config beside it");
        assert_eq!(source, Source::File(dir.join("config")), "{name}");
        assert_eq!(found, config, "{name}");
    }
    let out = capsule(&["doctor", "--kernel", dir.join("bzImage").to_str().unwrap()]);
    let stdout = text(&out.stdout);
    for want in [
        "✓ kernel: virtio-mmio",
        "✓ kernel: virtio-blk",
        "✓ kernel: virtio-net",
        "✓ kernel: virtio-console",
        "✓ kernel: 8250 serial console",
        "✓ kernel: ACPI",
    ] {
        assert!(stdout.contains(want), "no {want}:\n{stdout}");
    }
    // Alone, without its config: the doctor says where it looked.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("doctor-alone");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir.join("bzImage"), tmp.join("bzImage")).unwrap();
    let out = capsule(&["doctor", "--kernel", tmp.join("bzImage").to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("cannot find its configuration (tried the embedded copy (built without CONFIG_IKCONFIG)"),
        "{stdout}"
    );
}

/// The embedded configuration, found in a real kernel image: the real
/// vmlinux with the real config stored as kernel/configs.c stores it
/// (`IKCFG_ST`, gzip, `IKCFG_ED`), both as an ELF vmlinux and inside a
/// bzImage (the real one's header, the payload gzip-compressed).
#[test]
fn embedded_config_in_a_real_kernel_image() {
    use capsule::doctor::kernel::{inspect, Source};
    let dir = guest_kernel_dir();
    let config = std::fs::read_to_string(dir.join("config")).unwrap();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("doctor-ikconfig");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    vmlinux.extend(b"IKCFG_ST");
    vmlinux.extend(gzip(config.as_bytes()));
    vmlinux.extend(b"IKCFG_ED");
    std::fs::write(tmp.join("vmlinux"), &vmlinux).unwrap();
    // The bzImage: the real setup code and header, a gzip payload.
    let bz = std::fs::read(dir.join("bzImage")).unwrap();
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm = (setup_sects + 1) * 512;
    let payload = gzip(&vmlinux);
    let mut image = bz[..pm].to_vec();
    image[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    image.extend(&payload);
    std::fs::write(tmp.join("bzImage"), &image).unwrap();
    for name in ["vmlinux", "bzImage"] {
        let info = inspect(&tmp.join(name)).unwrap();
        let (source, found) = info
            .config
            .unwrap_or_else(|| panic!("{name}: no embedded config found (tried {:?})", info.tried));
        assert_eq!(source, Source::Embedded, "{name}");
        assert_eq!(found, config, "{name}");
    }
    let out = capsule(&["doctor", "--kernel", tmp.join("bzImage").to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("configuration embedded in the image (CONFIG_IKCONFIG)"),
        "{stdout}"
    );
    assert!(stdout.contains("✓ kernel: virtio-mmio"), "{stdout}");
}

/// A kernel without the options capsule needs: a real image whose
/// configuration (beside it) lacks virtio-mmio fails the doctor.
#[test]
fn doctor_rejects_a_kernel_without_virtio_mmio() {
    let dir = guest_kernel_dir();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("doctor-no-mmio");
    std::fs::create_dir_all(&tmp).unwrap();
    // A vmlinux from which the embedded copy is gone (its marker renamed),
    // with a config beside it that lacks virtio-mmio.
    let mut image = std::fs::read(dir.join("vmlinux")).unwrap();
    let mut from = 0;
    while let Some(p) = image[from..].windows(8).position(|w| w == b"IKCFG_ST") {
        image[from + p] = b'X';
        from += p + 8;
    }
    std::fs::write(tmp.join("vmlinux"), &image).unwrap();
    let config = std::fs::read_to_string(dir.join("config"))
        .unwrap()
        .replace("CONFIG_VIRTIO_MMIO=y", "# CONFIG_VIRTIO_MMIO is not set");
    std::fs::write(tmp.join("config"), config).unwrap();
    let out = capsule(&[
        "doctor",
        "--kvm",
        "/nonexistent/kvm",
        "--kernel",
        tmp.join("vmlinux").to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("configuration {}", tmp.join("config").display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("✗ kernel: no virtio-mmio (CONFIG_VIRTIO_MMIO not set) (to fix:"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn doctor_refuses_a_fifo_as_kernel_at_once() {
    let fifo = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("doctor-fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let started = std::time::Instant::now();
    let out = capsule(&[
        "doctor",
        "--kvm",
        "/nonexistent/kvm",
        "--kernel",
        fifo.to_str().unwrap(),
    ]);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("✗ kernel: cannot read"), "{stdout}");
}

#[test]
fn doctor_rejects_a_file_that_is_not_a_kernel() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-a-kernel");
    std::fs::write(&path, "hello\n").unwrap();
    let out = capsule(&[
        "doctor",
        "--kvm",
        "/nonexistent/kvm",
        "--kernel",
        path.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "✗ kernel: {} is not a Linux kernel",
            path.display()
        )),
        "{stdout}"
    );
}

/// The subcommands a user types, which every completion script must offer.
const SUBCOMMANDS: &[&str] = &[
    "run",
    "exec",
    "ls",
    "stop",
    "kill",
    "pause",
    "resume",
    "wait",
    "logs",
    "console",
    "doctor",
    "completions",
];

#[test]
fn completions_for_each_shell_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = capsule(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
        // Options of a subcommand, too.
        assert!(
            script.contains("boot-timeout"),
            "{shell}: no exec --boot-timeout"
        );
    }
    // The scripts are valid for their shell, where the shell is here.
    let bash = capsule(&["completions", "bash"]);
    let check = Command::new("bash")
        .args(["-n", "-c", &text(&bash.stdout)])
        .output();
    if let Ok(check) = check {
        assert!(check.status.success(), "bash -n: {}", text(&check.stderr));
    }
    let out = capsule(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_pages_for_capsule_and_each_subcommand() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("man");
    let _ = std::fs::remove_dir_all(&dir);
    let out = capsule(&["man", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let top = std::fs::read_to_string(dir.join("capsule.1")).unwrap();
    assert!(
        top.starts_with(".ie") || top.contains(".TH capsule 1"),
        "{top}"
    );
    for sub in SUBCOMMANDS {
        let page = std::fs::read_to_string(dir.join(format!("capsule-{sub}.1")))
            .unwrap_or_else(|e| panic!("capsule-{sub}.1: {e}"));
        assert!(page.contains(&format!(".TH capsule-{sub} 1")), "{page}");
        assert!(top.contains(sub), "capsule.1 does not list {sub}");
    }
    assert!(!dir.join("capsule-man.1").exists());
    let exec = std::fs::read_to_string(dir.join("capsule-exec.1")).unwrap();
    assert!(exec.contains("boot\\-timeout"), "{exec}");
}

/// The GitHub Action's steps, run by resources/run-action-locally.sh on a
/// runner without KVM: every step in order, then capsule's own one-line
/// error and status 125, which fails the step (docs/ci.md shows this
/// output). The boot case `action_exec` runs a command through it on KVM.
#[test]
fn action_steps_run_locally_and_fail_without_kvm() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernel = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("action-kernel");
    std::fs::write(&kernel, b"not booted: KVM is checked first").unwrap();
    let out = Command::new(root.join("resources/run-action-locally.sh"))
        .arg("--input")
        .arg(format!("kernel={}", kernel.display()))
        .args([
            "--input",
            "command=make test",
            "--input",
            "kvm=/nonexistent/kvm",
        ])
        .arg("--input")
        .arg(format!("capsule-binary={}", env!("CARGO_BIN_EXE_capsule")))
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(125), "{stdout}{stderr}");
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("==> ")).collect();
    assert_eq!(
        steps,
        [
            "==> Enable /dev/kvm for the runner user",
            "==> Choose the capsule to install",
            "==> Cache capsule: skipped (uses: actions/cache@v4 runs only on GitHub)",
            "==> Install capsule",
            "==> Run the command in a VM",
            "==> Run the command in a VM: failed with status 125",
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains("::error title=capsule exec::exit status 125"),
        "{stdout}"
    );
    assert_eq!(
        stderr.trim_end(),
        "capsule: error: cannot open /nonexistent/kvm: No such file or directory (os error 2); \
         this host has no KVM: load kvm_intel or kvm_amd, enable virtualization in the firmware, \
         or use a VM with nested virtualization (capsule doctor checks the host)"
    );
    // A required input left out stops the run before any step.
    let out = Command::new(root.join("resources/run-action-locally.sh"))
        .args(["--input", "kernel=/k"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("input 'command' is required"));
    assert!(!text(&out.stdout).contains("==>"));
}
