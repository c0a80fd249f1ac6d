//! capsule as a drop-in for Firecracker: its command line (capsule invoked
//! as `firecracker` or as `capsule firecracker`), with the exit statuses
//! and messages observed from an unmodified Firecracker, and the API
//! additions Firecracker users rely on (`PATCH /machine-config`,
//! `PUT /metrics` + `FlushMetrics`, `PUT /entropy`, `PUT /cpu-config`
//! refused), against the real binary with a tiny guest on /dev/kvm.
//!
//! Where the reference Firecracker binary is available
//! (`$CAPSULE_FC_ANCHOR`, default `../shared/anchors/firecracker` next to
//! the repository) the command-line table is also run against it, so the
//! expectations here are checked to be Firecracker's own.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::api::{exit_or_kill, json, Vmm};
use common::{ctrl_alt_del_guest, elf, elf_with_symbols};

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fc-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A guest that resets the machine at once through the i8042.
fn reset_guest() -> Vec<u8> {
    elf(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]) // mov al, 0xfe; out 0x64, al; hlt
}

/// `firecracker ARGS` through a symlink named `firecracker` to capsule.
fn firecracker_link() -> PathBuf {
    let dir = tmp("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("firecracker");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_capsule"), &link).unwrap();
    link
}

fn run(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The reference Firecracker, if present.
/// (`$CAPSULE_FC_ANCHOR`, else `shared/anchors/firecracker` beside the
/// repository or beside its worktree directory).
fn anchor() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CAPSULE_FC_ANCHOR") {
        return Some(PathBuf::from(p));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    [repo.join("../shared"), repo.join("../../shared")]
        .into_iter()
        .map(|d| d.join("anchors/firecracker"))
        .find(|p| p.exists())
}

/// Command lines that end at once, with Firecracker's status and the words
/// of its message (observed from Firecracker v1.17).
const REFUSED: &[(&[&str], i32, &str)] = &[
    (
        &["--bogus"],
        153,
        "Found argument 'bogus' which wasn't expected",
    ),
    (
        &["extra"],
        153,
        "Found argument 'extra' which wasn't expected",
    ),
    (&["--api-sock=/x"], 153, "Found argument 'api-sock=/x'"),
    (
        &["--level"],
        153,
        "The argument 'level' requires a value, but none was supplied.",
    ),
    (
        &["--id", "a", "--id", "b"],
        153,
        "The argument 'id' was provided more than once.",
    ),
    (
        &["--no-api"],
        153,
        "Argument 'config-file' required, but not found.",
    ),
    (&["--level", "loud"], 152, "Invalid value for logger level"),
    (
        &["--describe-snapshot", "/nonexistent/state"],
        1,
        "Unable to open snapshot state file",
    ),
    (
        &["--log-path", "/nonexistent/dir/log"],
        1,
        "/nonexistent/dir/log",
    ),
    (
        &["--seccomp-filter", "/nonexistent/filter.bpf"],
        1,
        "Filter file open error",
    ),
    (&["--no-api", "--config-file", BAD_JSON], 1, BAD_JSON),
];

/// A configuration file that is not JSON (written by the test).
const BAD_JSON: &str = "/tmp/capsule-fc-test-bad-config.json";

#[test]
fn command_line_statuses_and_messages_are_firecrackers() {
    let link = firecracker_link();
    std::fs::write(BAD_JSON, "{bad").unwrap();
    for (args, status, words) in REFUSED {
        let (st, _, err) = run(&link, args);
        assert_eq!(st, *status, "firecracker {args:?}: {err}");
        assert!(err.contains(words), "firecracker {args:?}: {err}");
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("capsule: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "firecracker {args:?}: {err}");
        // The same through `capsule firecracker`.
        let mut sub = vec!["firecracker"];
        sub.extend_from_slice(args);
        let (st2, _, _) = run(Path::new(env!("CARGO_BIN_EXE_capsule")), &sub);
        assert_eq!(st2, *status, "capsule firecracker {args:?}");
    }
    for args in [
        &["--version"][..],
        &["--bogus", "--version"],
        &["--help"],
        &["-h"],
    ] {
        let (st, out, err) = run(&link, args);
        assert_eq!(st, 0, "{args:?}: {err}");
        assert!(out.starts_with("Firecracker v"), "{args:?}: {out}");
    }
    let (_, out, _) = run(&link, &["--help"]);
    for opt in [
        "--api-sock",
        "--id",
        "--config-file",
        "--no-api",
        "--log-path",
        "--level",
        "--module",
        "--show-level",
        "--show-log-origin",
        "--metrics-path",
        "--boot-timer",
        "--seccomp-filter",
        "--no-seccomp",
        "--http-api-max-payload-size",
        "--mmds-size-limit",
        "--start-time-us",
        "--start-time-cpu-us",
        "--parent-cpu-time-us",
        "--version",
        "--snapshot-version",
        "--describe-snapshot",
    ] {
        assert!(out.contains(opt), "--help does not list {opt}");
    }
    match anchor() {
        Some(fc) => {
            for (args, status, _) in REFUSED {
                let (st, _, _) = run(&fc, args);
                assert_eq!(st, *status, "reference firecracker {args:?}");
            }
        }
        None => eprintln!(
            "NOTE: no reference Firecracker binary: statuses checked against the table only"
        ),
    }
}

/// `firecracker --api-sock NAME.sock EXTRA...` (capsule through its
/// `firecracker` link), stderr piped.
fn start_fc(name: &str, extra: &[&str]) -> Vmm {
    let sock = tmp(&format!("{name}.sock"));
    let mut command = Command::new(firecracker_link());
    command
        .arg("--api-sock")
        .arg(&sock)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Vmm::spawn(command, sock)
}

#[test]
fn api_additions_through_the_firecracker_command_line() {
    let kernel = tmp("cad.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let metrics = tmp("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let log = tmp("fc.log");
    let _ = std::fs::remove_file(&log);
    let mut fc = start_fc(
        "additions",
        &[
            "--id",
            "vm-7",
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
            "--http-api-max-payload-size",
            "200",
        ],
    );
    let (st, body) = fc.req("GET", "/", None);
    assert_eq!(st, 200);
    assert_eq!(json(&body)["id"], "vm-7");
    // The body limit of --http-api-max-payload-size.
    let big = format!(r#"{{"kernel_image_path":"{}"}}"#, "x".repeat(300));
    assert_eq!(fc.req("PUT", "/boot-source", Some(&big)).0, 413);
    // PATCH /machine-config changes only what it names.
    assert_eq!(
        fc.req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":64}"#)
        )
        .0,
        204
    );
    assert_eq!(
        fc.req("PATCH", "/machine-config", Some(r#"{"vcpu_count":2}"#))
            .0,
        204
    );
    let (_, body) = fc.req("GET", "/machine-config", None);
    let m = json(&body);
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(2), Some(64))
    );
    for (bad, words) in [
        ("{}", "Empty PATCH request."),
        (r#"{"vcpu_count":0}"#, "vcpu_count"),
        (r#"{"vcpu_count":99}"#, "vcpu_count"),
        (r#"{"bogus":1}"#, "unknown field"),
    ] {
        let (st, body) = fc.req("PATCH", "/machine-config", Some(bad));
        assert_eq!(st, 400, "{bad}");
        assert!(
            json(&body)["fault_message"]
                .as_str()
                .unwrap()
                .contains(words),
            "{body}"
        );
    }
    assert_eq!(
        fc.req("PATCH", "/machine-config", Some(r#"{"vcpu_count":1}"#))
            .0,
        204
    );
    // A second PUT /metrics is refused; FlushMetrics needs a started VM.
    let (st, body) = fc.req("PUT", "/metrics", Some(r#"{"metrics_path":"/tmp/other"}"#));
    assert_eq!(st, 400);
    assert!(
        body.contains("Reinitialization of metrics not allowed."),
        "{body}"
    );
    let (st, body) = fc.req("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#));
    assert_eq!(st, 400);
    assert!(body.contains("not supported before starting"), "{body}");
    // CPU templates: refused with a fault_message, not "not implemented".
    let (st, body) = fc.req("PUT", "/cpu-config", Some(r#"{"kvm_capabilities":[]}"#));
    assert_eq!(st, 400);
    assert!(
        json(&body)["fault_message"]
            .as_str()
            .unwrap()
            .contains("cpu-config"),
        "{body}"
    );
    assert_eq!(fc.req("PUT", "/entropy", Some("{}")).0, 204);
    let (st, body) = fc.req(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter":{"bandwidth":{"size":1000}}}"#),
    );
    assert_eq!(st, 400);
    assert!(body.contains("refill_time"), "{body}");
    let limited = r#"{"rate_limiter":{"bandwidth":{"size":4096,"one_time_burst":8192,"refill_time":100},"ops":{"size":10,"refill_time":1000}}}"#;
    assert_eq!(fc.req("PUT", "/entropy", Some(limited)).0, 204);
    let (_, body) = fc.req("GET", "/vm/config", None);
    let c = json(&body);
    assert_eq!(c["metrics"]["metrics_path"], metrics.to_str().unwrap());
    assert_eq!(
        c["entropy"]["rate_limiter"]["bandwidth"]["one_time_burst"], 8192,
        "{body}"
    );
    assert_eq!(c["entropy"]["rate_limiter"]["ops"]["size"], 10, "{body}");
    let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    assert_eq!(fc.req("PUT", "/boot-source", Some(&boot)).0, 204);
    // A drive, swapped and limited once the VM runs.
    let (img1, img2) = (tmp("swap1.img"), tmp("swap2.img"));
    std::fs::write(&img1, vec![0u8; 4096]).unwrap();
    std::fs::write(&img2, vec![0u8; 8192]).unwrap();
    let drive = format!(
        r#"{{"drive_id":"data","path_on_host":"{}","is_root_device":false,"rate_limiter":{{"ops":{{"size":100,"refill_time":1000}}}}}}"#,
        img1.display()
    );
    assert_eq!(fc.req("PUT", "/drives/data", Some(&drive)).0, 204);
    let patch = format!(
        r#"{{"drive_id":"data","path_on_host":"{}"}}"#,
        img2.display()
    );
    let (st, body) = fc.req("PATCH", "/drives/data", Some(&patch));
    assert_eq!(st, 400);
    assert!(body.contains("not supported before starting"), "{body}");
    let (st, body) = fc.req(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(st, 204, "{body}");
    assert_eq!(
        fc.req("PATCH", "/machine-config", Some(r#"{"vcpu_count":2}"#))
            .0,
        400
    );
    // The guest writes to COM1 in a loop: port writes show in the metrics.
    std::thread::sleep(Duration::from_millis(300));
    let (st, body) = fc.req("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#));
    assert_eq!(st, 204, "{body}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let first = json(lines[0]);
    assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 0);
    assert!(first["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{text}");
    assert!(first["vcpu"]["exit_io_in"].as_u64().unwrap() > 0, "{text}");
    // PUT /actions: InstanceStart; the PATCH after it failed.
    assert!(
        first["put_api_requests"]["actions_count"].as_u64().unwrap() >= 2,
        "{text}"
    );
    assert!(
        first["patch_api_requests"]["machine_cfg_fails"]
            .as_u64()
            .unwrap()
            >= 3,
        "{text}"
    );
    assert_eq!(
        first["get_api_requests"]["instance_info_count"], 1,
        "{text}"
    );
    for group in ["block", "net", "entropy"] {
        assert!(first[group].is_object(), "{group} missing: {text}");
    }
    // Counters are deltas: the next line counts from the first.
    assert_eq!(
        fc.req("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#))
            .0,
        204
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let second = json(text.lines().nth(1).unwrap());
    assert_eq!(
        second["get_api_requests"]["instance_info_count"], 0,
        "{text}"
    );
    assert_eq!(second["put_api_requests"]["actions_count"], 1, "{text}");
    assert_eq!(
        fc.req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"SendCtrlAltDel"}"#)
        )
        .0,
        204
    );
    assert_eq!(fc.wait_exit(Duration::from_secs(20)), Some(0));
    // A last line when the VM ends.
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    // --log-path received capsule's log at --level Info.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("microVM started"), "{logged}");
}

#[test]
fn config_file_without_api_boots_at_once() {
    let kernel = tmp("reset.elf");
    std::fs::write(&kernel, reset_guest()).unwrap();
    let config = tmp("reset.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": [],
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let (st, _, err) = run(
        &firecracker_link(),
        &[
            "--no-api",
            "--config-file",
            config.to_str().unwrap(),
            "--no-seccomp",
            "--boot-timer",
        ],
    );
    assert_eq!(st, 0, "{err}");
}

/// Runs capsule on `guest` with `args`; returns its status, or `None` if
/// it was still running after `secs` (it is then killed), and its stderr.
fn run_for(guest: &[u8], name: &str, args: &[&str], secs: u64) -> (Option<i32>, String) {
    let kernel = tmp(name);
    std::fs::write(&kernel, guest).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["run", "--kernel", kernel.to_str().unwrap()])
        .args(args)
        .env("CAPSULE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_or_kill(&mut child, Duration::from_secs(secs));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// `cli; hlt; jmp hlt`: how Linux without ACPI ends `poweroff` on each CPU.
const CLI_HLT: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd];

#[test]
fn a_guest_without_acpi_that_halts_every_cpu_has_powered_off() {
    // acpi=off: the guest cannot power off through ACPI. vCPU 1 is never
    // started (it waits for a start-up IPI), vCPU 0 halts with interrupts
    // disabled: nothing can run again.
    let (status, err) = run_for(
        &elf(CLI_HLT),
        "cli-hlt.elf",
        &["--cpus", "2", "--cmdline", "acpi=off"],
        20,
    );
    assert_eq!(status, Some(0), "{err}");
    assert!(
        err.contains("every vCPU has halted with interrupts disabled: the guest powered off"),
        "{err}"
    );
    // With ACPI a halted machine stays on (as a PC does after `halt`).
    let (status, err) = run_for(
        &elf(CLI_HLT),
        "cli-hlt.elf",
        &["--cmdline", "console=ttyS0"],
        3,
    );
    assert_eq!(status, None, "{err}");
    // Interrupts enabled: the guest waits for one; it has not halted for good.
    let (status, err) = run_for(
        &elf(&[0xfb, 0xf4, 0xeb, 0xfd]),
        "sti-hlt.elf",
        &["--cmdline", "acpi=off"],
        3,
    );
    assert_eq!(status, None, "{err}");
}

/// Prints its kernel command line (at 0x20000) on COM1, then `cli; hlt`.
const PRINT_CMDLINE_THEN_HALT: &[u8] = &[
    0xbe, 0x00, 0x00, 0x02, 0x00, // mov esi, 0x20000
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xac, // loop: lodsb
    0x84, 0xc0, // test al, al
    0x74, 0x03, // jz done
    0xee, // out dx, al
    0xeb, 0xf8, // jmp loop
    0xb0, 0x0a, 0xee, // done: mov al, 10; out dx, al
    0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
];

/// Runs `guest` with a disk; returns (status or None if still running
/// after `secs`, stdout, stderr).
fn run_with_disk(guest: &[u8], name: &str, secs: u64) -> (Option<i32>, String, String) {
    let kernel = tmp(name);
    std::fs::write(&kernel, guest).unwrap();
    let disk = tmp(&format!("{name}.img"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["run", "--kernel", kernel.to_str().unwrap()])
        .args([
            "--disk",
            disk.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0",
        ])
        .env("CAPSULE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_or_kill(&mut child, Duration::from_secs(secs));
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}

#[test]
fn a_kernel_without_acpi_init_gets_its_devices_on_the_command_line_and_its_halt_ends_the_vm() {
    // No acpi_init in the symbol table: a kernel without ACPI.
    let guest = elf_with_symbols(
        PRINT_CMDLINE_THEN_HALT,
        &["start_kernel", "early_acpi_init_x"],
    );
    let (status, out, err) = run_with_disk(&guest, "noacpi.elf", 20);
    assert_eq!(status, Some(0), "{out}\n{err}");
    assert!(
        out.starts_with("console=ttyS0 pci=off virtio_mmio.device=4K@0xd0000000:"),
        "{out}"
    );
    assert!(
        err.contains("the kernel has no ACPI (its symbol table has no acpi_init)"),
        "{err}"
    );
    assert!(err.contains("the guest powered off"), "{err}");
    // With acpi_init: the devices are in the DSDT, and a halt is a halt.
    let guest = elf_with_symbols(PRINT_CMDLINE_THEN_HALT, &["start_kernel", "acpi_init"]);
    let (status, out, err) = run_with_disk(&guest, "acpi.elf", 3);
    assert_eq!(status, None, "{err}");
    assert_eq!(out, "console=ttyS0 pci=off\n", "{err}");
}
