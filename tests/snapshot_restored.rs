//! What a VM restored from a snapshot keeps of the VM saved besides its
//! KVM and device state, against the real binary on /dev/kvm with tiny
//! guests: its shape and devices as the API reports them
//! (`GET /machine-config`, `GET /vm/config`), and its halt watch (a
//! guest without ACPI powers off by halting every vCPU), from a snapshot
//! that saves whether the guest reads ACPI and from an older one that
//! does not.

use std::io::Write;
use std::path::Path;

mod common;
use common::api::json;
use common::guest::{Asm, COM1};
use common::run::{spawn_capsule, wait_or_kill};
use common::snapshot::*;

/// A VM snapshotted over the API and loaded into a new capsule reports
/// the saved VM's vCPUs, memory and transport, the restored VM's dirty
/// page tracking, the boot source it booted from, its root drive's
/// `partuuid`, its vsock (on the socket the load named) and entropy
/// devices: not the defaults of a VM nothing configured.
#[test]
fn a_restored_vm_reports_the_saved_vms_configuration() {
    let pid = std::process::id();
    let name = format!("shape-{pid}");
    let disk = tmp(&format!("{name}.img"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (vsock, vsock2) = (tmp(&format!("{name}.v")), tmp(&format!("{name}.v2")));
    let _ = std::fs::remove_file(&vsock2);
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": true}"#;
    let root = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true,
            "partuuid": "0eaa91a0-01"}}"#,
        disk.display()
    );
    let puts = [
        ("/machine-config", machine.to_string()),
        ("/drives/rootfs", root),
        (
            "/vsock",
            format!(r#"{{"guest_cid": 7, "uds_path": "{}"}}"#, vsock.display()),
        ),
        (
            "/entropy",
            r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#.to_string(),
        ),
    ];
    let dir = snapshot_over_api(&name, &puts, &[]);

    let (out, err) = (tmp(&format!("{name}.out")), tmp(&format!("{name}.err")));
    let more = format!(
        r#", "track_dirty_pages": true, "vsock_override": {{"uds_path": "{}"}}"#,
        vsock2.display()
    );
    let vm = load_over_api_with(&dir, &format!("{name}-restored"), &out, &err, &more);
    let (st, body) = vm.req("GET", "/machine-config", None);
    assert_eq!(st, 200, "{body}");
    let want = serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
        "track_dirty_pages": true, "huge_pages": "None"});
    assert_eq!(json(&body), want, "GET /machine-config");
    let (st, body) = vm.req("GET", "/vm/config", None);
    assert_eq!(st, 200, "{body}");
    let full = json(&body);
    assert_eq!(full["machine-config"], want, "{body}");
    let kernel = tmp(&format!("{name}.elf"));
    assert_eq!(
        full["boot-source"]["kernel_image_path"],
        kernel.to_str().unwrap(),
        "{body}"
    );
    let args = full["boot-source"]["boot_args"]
        .as_str()
        .unwrap_or_default();
    assert!(args.starts_with("console=ttyS0 "), "{body}");
    let drive = &full["drives"][0];
    assert_eq!(
        (
            &drive["drive_id"],
            &drive["is_root_device"],
            &drive["partuuid"]
        ),
        (&"rootfs".into(), &true.into(), &"0eaa91a0-01".into()),
        "{body}"
    );
    let want = serde_json::json!({"guest_cid": 7, "uds_path": vsock2});
    assert_eq!(full["vsock"], want, "{body}");
    assert_eq!(full["entropy"]["rate_limiter"]["ops"]["size"], 10, "{body}");
    assert!(wait_file_len(&out, 3), "the restored guest printed nothing");
}

/// Polls COM1 until a byte arrives, then halts with interrupts disabled
/// (`cli; hlt`): how Linux without ACPI ends `poweroff`.
fn halt_on_input_guest() -> Vec<u8> {
    let mut a = Asm::default();
    let poll = a.0.len();
    a.mov_dx(COM1 + 5).in_al_dx();
    a.0.extend([0xa8, 0x01]); // test al, 1 (data ready)
    a.short_jump(0x74, poll); // jz poll
    a.0.extend([0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp hlt
    a.0
}

/// Boots `kernel` detached as `name` with kernel command line `cmdline`,
/// lets it run and snapshots it into `dir` (`--stop`).
fn snapshot_polling_guest(name: &str, kernel: &Path, cmdline: &str, dir: &Path) {
    let k = kernel.to_str().unwrap();
    let args = [
        "run",
        "-d",
        "--name",
        name,
        "--kernel",
        k,
        "--cmdline",
        cmdline,
    ];
    ok(&capsule(&args));
    std::thread::sleep(std::time::Duration::from_millis(200));
    ok(&capsule(&["pause", name]));
    snapshot_into(name, dir, &["--stop"]);
}

/// Restores `dir` in the foreground, sends its guest a byte (it halts
/// every vCPU), and asserts that capsule saw a power-off and exited 0.
fn restored_guest_powers_off(dir: &Path, what: &str) {
    let mut child = spawn_capsule(
        &["run", "--restore", dir.to_str().unwrap()],
        &[("CAPSULE_LOG", "info")],
    );
    child.stdin.take().unwrap().write_all(b"x").unwrap();
    let out = wait_or_kill(child, 20);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{what}: {err}");
    assert!(err.contains("the guest powered off"), "{what}: {err}");
}

/// A guest whose kernel has no ACPI (no `acpi_init` in its symbol table)
/// powers off by halting every vCPU; restored, it still does: the
/// snapshot saves that the guest cannot read ACPI, and the restored VM
/// watches for the halt as the saved one did. A snapshot without that
/// field (older files) takes it from the saved command line's `acpi=off`.
#[test]
fn a_restored_guest_without_acpi_powers_off_by_halting() {
    let pid = std::process::id();
    let kernel = tmp(&format!("noacpi-{pid}.elf"));
    let guest = halt_on_input_guest();
    std::fs::write(&kernel, common::elf_with_symbols(&guest, &["start_kernel"])).unwrap();
    let dir = tmp(&format!("noacpi-{pid}"));
    snapshot_polling_guest(&format!("noacpi-{pid}"), &kernel, "console=ttyS0", &dir);
    restored_guest_powers_off(&dir, "a kernel without ACPI");
    assert_eq!(state_json(&dir)["no_acpi"], true);

    // An older snapshot (no `no_acpi`) of a guest booted with acpi=off.
    let kernel = tmp(&format!("acpioff-{pid}.elf"));
    std::fs::write(&kernel, common::elf(&guest)).unwrap();
    let dir = tmp(&format!("acpioff-{pid}"));
    let cmdline = "console=ttyS0 acpi=off";
    snapshot_polling_guest(&format!("acpioff-{pid}"), &kernel, cmdline, &dir);
    let version = capsule::snapshot::format::FORMAT_VERSION;
    let old = edited(&dir, &format!("acpioff-{pid}-old"), version, &|s| {
        s.as_object_mut().unwrap().remove("no_acpi");
    });
    restored_guest_powers_off(&old, "an older snapshot of an acpi=off guest");
}
