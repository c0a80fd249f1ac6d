//! The CLI verbs on named, detached VMs against the real binary on
//! /dev/kvm: `run -d`, `ls`, `pause`, `resume`, `logs`, `wait`, `stop`
//! (with its SIGTERM fallback), a stale runtime directory cleaned, and a
//! VM still waiting for its API configuration stopped in order.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

mod common;
use common::api::*;
use common::run::{capsule, listed, ok, spawn_capsule, wait_or_kill};
use common::{ctrl_alt_del_guest, halting_guest};

#[test]
fn verbs_drive_a_detached_vm() {
    let kernel = tmp("verbs.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let name = format!("apitest-{}", std::process::id());
    let k = kernel.to_str().unwrap();
    let out = capsule(
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--kernel",
            k,
            "--cmdline",
            "console=ttyS0",
        ],
        None,
    );
    ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    // A second VM of the same name is refused.
    let out = capsule(&["run", "-d", "--name", &name, "--kernel", k], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(listed(&name)["state"], "Running");
    assert_eq!(capsule(&["pause", &name], None).status.code(), Some(0));
    let out = capsule(&["ls", "--json"], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paused"));
    assert_eq!(capsule(&["resume", &name], None).status.code(), Some(0));
    let out = capsule(&["logs", &name], None);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with('.'));
    let waiter = {
        let name = name.clone();
        std::thread::spawn(move || capsule(&["wait", &name], None).status.code())
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = capsule(&["stop", &name, "--timeout", "20"], None);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).is_empty(),
        "stop was not graceful"
    );
    assert_eq!(waiter.join().unwrap(), Some(0));
    // Gone: verbs say so with status 4.
    assert_eq!(capsule(&["pause", &name], None).status.code(), Some(4));
    assert_eq!(capsule(&["wait", &name], None).status.code(), Some(4));
    assert_eq!(capsule(&["stop", "bad/name"], None).status.code(), Some(2));
}

/// Starts `guest` as a detached VM named `PREFIX-PID` and returns the
/// name and its `ls --json` entry.
fn start_detached(prefix: &str, guest: Vec<u8>) -> (String, serde_json::Value) {
    let kernel = tmp(&format!("{prefix}.elf"));
    std::fs::write(&kernel, guest).unwrap();
    let name = format!("{prefix}-{}", std::process::id());
    let out = capsule(
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--kernel",
            kernel.to_str().unwrap(),
        ],
        None,
    );
    ok(&out);
    let entry = listed(&name);
    (name, entry)
}

/// `stop` on a guest that ignores Ctrl-Alt-Del falls back to SIGTERM,
/// which capsule handles: the VM is stopped in order, `wait` gets 143
/// (128 + SIGTERM) and the runtime directory is removed.
#[test]
fn stop_falls_back_to_sigterm_which_ends_the_vm_cleanly() {
    let (name, me) = start_detached("apiterm", halting_guest());
    let dir = PathBuf::from(me["dir"].as_str().unwrap());
    let waiter = {
        let name = name.clone();
        std::thread::spawn(move || capsule(&["wait", &name], None).status.code())
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = capsule(&["stop", &name, "--timeout", "1"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("did not end 1 s after Ctrl-Alt-Del: stopping it"),
        "{err}"
    );
    assert!(!err.contains("killing it"), "SIGTERM did not end it: {err}");
    assert_eq!(waiter.join().unwrap(), Some(143));
    assert!(!dir.exists(), "runtime directory left behind");
}

#[test]
fn stale_runtime_dir_is_cleaned() {
    let (name, me) = start_detached("apistale", ctrl_alt_del_guest());
    let pid = me["pid"].as_i64().unwrap();
    // SIGKILL behind capsule's back: the directory stays, stale.
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let d = PathBuf::from(me["dir"].as_str().unwrap());
    // (An `ls` of a test running in parallel may clean it first.)
    let out = capsule(&["ls", "--json"], None);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&name));
    assert!(!d.exists(), "stale directory not removed");
}

/// A named VM whose API is on a socket of the user's choosing (`--name N
/// --api-sock PATH`) is reachable by the verbs (its runtime directory's
/// `api.sock` leads there), and `stop` on it before any configuration came
/// (Ctrl-Alt-Del is refused, so SIGTERM follows) ends it in order: it dies
/// of SIGTERM and leaves neither its socket file nor its runtime
/// directory behind. (Such a signal used to kill capsule where it stood.)
#[test]
fn a_vm_waiting_for_its_api_is_reachable_and_stops_in_order() {
    let name = format!("apiwait-{}", std::process::id());
    let sock = tmp("apiwait.sock");
    let _ = std::fs::remove_file(&sock);
    let child = spawn_capsule(
        &["run", "--name", &name, "--api-sock", sock.to_str().unwrap()],
        &[],
    );
    wait_for_socket(&sock);
    let me = listed(&name);
    assert_eq!(me["state"], "Not started", "{me}");
    let dir = PathBuf::from(me["dir"].as_str().unwrap());
    let out = capsule(&["stop", &name, "--timeout", "1"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let out = wait_or_kill(child, 10);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGTERM),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists(), "API socket file left behind");
    assert!(!dir.exists(), "runtime directory left behind");
}
