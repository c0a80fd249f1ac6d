//! What a VM restored from a snapshot keeps of the VM saved besides its
//! KVM and device state, against the real binary on /dev/kvm with tiny
//! guests: its halt watch (a guest without ACPI powers off by halting
//! every vCPU), from a snapshot that saves whether the guest reads ACPI
//! and from an older one that does not.

use std::io::Write;
use std::path::Path;

mod common;
use common::guest::{Asm, COM1};
use common::run::{spawn_capsule, wait_or_kill};
use common::snapshot::*;

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
