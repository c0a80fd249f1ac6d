//! What capsule tells of a running guest it cannot see into: SIGUSR2 logs
//! every virtio queue's positions and where each vCPU is, and the VM runs
//! on; a guest booted with its console on COM1 that a signal stops before
//! it wrote a byte there gets the same account of its vCPUs
//! (`src/stall.rs`). On /dev/kvm with the tiny guests of tests/common.

use std::process::{Child, Output};
use std::time::Duration;

mod common;
use common::guest::*;
use common::run::{spawn_capsule, wait_or_kill};

/// Starts `capsule run` on `kernel`, with a virtio-blk disk.
fn start(kernel: &std::path::Path, disk: &std::path::Path) -> Child {
    let (kernel, disk) = (kernel.to_str().unwrap(), disk.to_str().unwrap());
    spawn_capsule(
        &["run", "--memory", "32M", "--kernel", kernel, "--disk", disk],
        &[],
    )
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the child this test started, still unreaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// Waits for `child` to end (failing after 20 s); its status and
/// stdout and stderr.
fn finish(child: Child) -> (Option<i32>, Option<i32>, String, String) {
    use std::os::unix::process::ExitStatusExt;
    let Output {
        status,
        stdout,
        stderr,
    } = wait_or_kill(child, 20);
    (
        status.code(),
        status.signal(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn disk(name: &str) -> std::path::PathBuf {
    let p = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

/// SIGUSR2 on a running VM: its state in the log, and it runs on until
/// SIGTERM. The guest never wrote to COM1, so SIGTERM adds the account
/// of its vCPUs after "never wrote to its serial console".
#[test]
fn sigusr2_logs_the_vms_state_and_a_silent_guest_is_described_when_stopped() {
    let mut a = Asm::default();
    a.halt_forever();
    let kernel = write_guest("silent.elf", &a);
    let child = start(&kernel, &disk("state-silent.img"));
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGUSR2);
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGTERM);
    let (code, sig, out, err) = finish(child);
    assert_eq!((code, sig), (None, Some(libc::SIGTERM)), "{err}");
    assert!(out.is_empty(), "{out}");
    let usr2 = err.find("SIGUSR2: the VM's state follows").expect(&err);
    let term = err.find("SIGTERM: stopping the VM").expect(&err);
    assert!(usr2 < term, "the VM ran on after SIGUSR2: {err}");
    let (state, stop) = err.split_at(term);
    for want in [
        // Its driver never started the disk.
        "state: virtio-blk: inactive",
        "state: sample 1: vCPU 0: rip 0x",
        "state: sample 2: vCPU 0: rip 0x",
    ] {
        assert!(state.contains(want), "no {want:?} after SIGUSR2: {err}");
    }
    assert!(
        stop.contains("the guest never wrote to its serial console"),
        "{err}"
    );
    assert!(
        stop.contains("silent guest: sample 2: vCPU 0: rip 0x"),
        "{err}"
    );
}

/// A guest that wrote to its console is stopped without that account.
#[test]
fn a_guest_that_wrote_to_its_console_is_stopped_without_its_state() {
    let mut a = Asm::default();
    a.print("up\n").halt_forever();
    let kernel = write_guest("state-up.elf", &a);
    let child = start(&kernel, &disk("state-up.img"));
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGTERM);
    let (code, sig, out, err) = finish(child);
    assert_eq!((code, sig), (None, Some(libc::SIGTERM)), "{err}");
    assert_eq!(out, "up\n");
    assert!(err.contains("SIGTERM: stopping the VM"), "{err}");
    assert!(!err.contains("silent guest"), "{err}");
}
