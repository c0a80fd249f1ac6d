//! Guests that try to exhaust capsule, and must not: millions of distinct
//! unbacked MMIO exits leave its memory bounded, a flood of refused
//! virtio handshakes leaves its log small (rate-limited, with counts of
//! what was suppressed), and a detached VM's console and VMM logs stay
//! under their cap. Runs on any /dev/kvm, PVM included.

use std::path::PathBuf;
use std::process::{Command, Stdio};

mod common;
use common::guest::*;
use common::run::*;

/// Distinct unbacked MMIO reads in `distinct_mmio_reads_do_not_grow_memory`.
/// Each is a full exit to capsule, about 20 000-40 000 a second on the PVM
/// development hosts (debug build): the 10 million took 506 s
/// there (VmHWM unchanged, `CAPSULE_TEST_MMIO_SWEEP=10000000`), far too
/// long for the suite. 300 000 take about 10 s and grew the former
/// per-address map by 25 MiB, well past the 8 MiB bound.
const MMIO_SWEEP_READS: u32 = 300_000;

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
    a.short_jump(0x75, top); // jnz top
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
    a.map_fourth_gib(VIRTIO_MMIO0);
    let top = a.0.len();
    a.store_rbx_u32(VIRTIO_MMIO_STATUS, 0) // reset
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 1) // ACKNOWLEDGE
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 3) // DRIVER
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 0xb); // FEATURES_OK, no features
    a.short_jump(0xeb, top); // jmp top
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
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
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
    a.map_fourth_gib(VIRTIO_MMIO0);
    let top = a.0.len();
    a.print("console flood 0123456789\n")
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 0)
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 1)
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 3)
        .store_rbx_u32(VIRTIO_MMIO_STATUS, 0xb);
    a.jmp(top);
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
    ok(&out);
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
    // Its status and stderr too: once (2026-12-05, host load 6) `logs`
    // printed nothing, and why was not kept.
    eprintln!(
        "cap {CAP}: {sizes:?}; `logs` gave {} bytes, status {:?}, stderr {:?}",
        logs.stdout.len(),
        logs.status.code(),
        String::from_utf8_lossy(&logs.stderr)
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
