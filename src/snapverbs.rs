//! The CLI verbs of snapshots: `snapshot NAME DIR` (a running named VM to
//! a snapshot directory) and `clone DIR N` (N named VMs restored from
//! one). `run --restore DIR` is `run`'s own.
//!
//! A snapshot directory holds `snapshot` (the state), `memory` (guest
//! RAM) and, for `,ephemeral` disks, `snapshot.vdX.overlay`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use capsule::runtime::{api_request, fault_message};

use crate::status;
use crate::verbs::{err, find};

/// Writing a large guest's memory takes a while.
const CREATE_TIMEOUT: Duration = Duration::from_secs(600);
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The state file of snapshot directory `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("snapshot")
}

/// The memory file of snapshot directory `dir`.
pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join("memory")
}

/// `snapshot NAME DIR [--stop] [--diff]`: pauses the VM, writes the
/// snapshot (Full, or Diff with `diff`) into DIR (created if missing),
/// then resumes it, or with `stop` kills it.
pub fn snapshot(name: &str, dir: &Path, stop: bool, diff: bool) -> u8 {
    let e = match find(name) {
        Ok(e) => e,
        Err(c) => return c,
    };
    if let Err(er) = std::fs::create_dir_all(dir) {
        return err(format!("cannot create {}: {er}", dir.display()));
    }
    // The VM process has its own working directory: give it absolute paths.
    let dir = match std::fs::canonicalize(dir) {
        Ok(d) => d,
        Err(er) => return err(format!("{}: {er}", dir.display())),
    };
    let sock = e.dir.join("api.sock");
    let patch = |state: &str| {
        let body = format!(r#"{{"state":"{state}"}}"#);
        match api_request(&sock, "PATCH", "/vm", Some(&body), API_TIMEOUT) {
            Ok((204, _)) => Ok(()),
            Ok((_, b)) => Err(fault_message(&b)),
            Err(m) => Err(m.to_string()),
        }
    };
    if let Err(m) = patch("Paused") {
        return err(format!("cannot pause '{name}': {m}"));
    }
    let body = serde_json::json!({
        "snapshot_type": if diff { "Diff" } else { "Full" },
        "snapshot_path": state_path(&dir),
        "mem_file_path": memory_path(&dir),
    })
    .to_string();
    let created = match api_request(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&body),
        CREATE_TIMEOUT,
    ) {
        Ok((204, _)) => Ok(()),
        Ok((_, b)) => Err(fault_message(&b)),
        Err(m) => Err(m.to_string()),
    };
    if stop && created.is_ok() {
        return crate::verbs::kill(name);
    }
    let resumed = patch("Resumed");
    if let Err(m) = created {
        return err(format!("cannot snapshot '{name}': {m}"));
    }
    if let Err(m) = resumed {
        return err(format!("snapshot written, but cannot resume '{name}': {m}"));
    }
    status::OK
}

/// `clone DIR N --name PREFIX`: N VMs restored from DIR, named
/// PREFIX-1 ... PREFIX-N, in the background (each a `run --restore DIR
/// --name PREFIX-i -d`); returns once all run, or exits 1 naming those
/// that did not start.
pub fn clone(dir: &Path, count: u32, prefix: &str, extra: &[String]) -> u8 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return err(format!("cannot find the capsule binary: {e}")),
    };
    let children: Vec<_> = (1..=count)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            let child = Command::new(&exe)
                .arg("run")
                .arg("--restore")
                .arg(dir)
                .args(["--name", &name, "-d"])
                .args(extra)
                .stdin(Stdio::null())
                .spawn();
            (name, child)
        })
        .collect();
    let mut failed = Vec::new();
    for (name, child) in children {
        match child.and_then(|mut c| c.wait()) {
            Ok(st) if st.success() => {}
            _ => failed.push(name),
        }
    }
    if failed.is_empty() {
        status::OK
    } else {
        err(format!("clones that did not start: {}", failed.join(", ")))
    }
}
