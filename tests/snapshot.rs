//! Snapshots against the real binary on /dev/kvm, with a tiny
//! hand-assembled guest that prints the alphabet in a loop (its next
//! letter lives in a register): a VM is paused, snapshotted and killed,
//! and VMs restored from the snapshot must go on with the very next
//! letter, which only happens if registers, memory and the UART come back
//! as saved. Damaged snapshots must be refused with exit status 1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

mod common;
use common::snapshot::*;

/// Boots the alphabet guest as `name`, lets it print, pauses it and
/// snapshots it into `dir` with `--stop`; returns the last letter it
/// printed.
fn snapshot_of_a_running_guest(name: &str, dir: &Path) -> char {
    let kernel = tmp(&format!("{name}.elf"));
    std::fs::write(&kernel, alphabet_guest()).unwrap();
    run_detached(name, &kernel, &[]);
    wait_output(name, 30);
    let last = pause_after_a_letter(name);
    snapshot_into(name, dir, &["--stop"]);
    assert_eq!(
        capsule(&["pause", name]).status.code(),
        Some(4),
        "--stop left the VM running"
    );
    last
}

#[test]
fn clones_go_on_where_the_snapshot_was_taken() {
    let pid = std::process::id();
    let name = format!("snaporig-{pid}");
    let dir = tmp(&format!("snap-{pid}"));
    let last = snapshot_of_a_running_guest(&name, &dir);
    assert!(dir.join("snapshot").exists() && dir.join("memory").exists());
    // Two clones at once.
    let prefix = format!("snapclone-{pid}");
    ok(&capsule(&[
        "clone",
        dir.to_str().unwrap(),
        "2",
        "--name",
        &prefix,
    ]));
    for i in 1..=2 {
        let clone = format!("{prefix}-{i}");
        let out = wait_output(&clone, 5);
        let first = out.chars().next().unwrap();
        assert_eq!(
            first,
            next_letter(last),
            "{clone} printed {out:?}; the original's last letter was {last:?}"
        );
        let _ = capsule(&["kill", &clone]);
    }
}

#[test]
fn damaged_snapshots_are_refused() {
    let pid = std::process::id();
    let name = format!("snapdmg-{pid}");
    let dir = tmp(&format!("dmg-{pid}"));
    snapshot_of_a_running_guest(&name, &dir);
    let variant = |tag: &str, damage: &dyn Fn(&Path)| -> String {
        let d = tmp(&format!("dmg-{pid}-{tag}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["snapshot", "memory"] {
            std::fs::copy(dir.join(f), d.join(f)).unwrap();
        }
        damage(&d);
        let out = capsule(&["run", "--restore", d.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{tag}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.starts_with("capsule: error: "), "{tag}: {err}");
        err
    };
    let patch = |p: PathBuf, at: u64, bytes: &[u8]| {
        let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(at)).unwrap();
        f.write_all(bytes).unwrap();
    };
    let e = variant("flip", &|d| patch(d.join("snapshot"), 200, b"#"));
    assert!(e.contains("corrupted"), "{e}");
    let e = variant("cut", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("snapshot"))
            .unwrap();
        f.set_len(1000).unwrap();
    });
    assert!(e.contains("truncated"), "{e}");
    let e = variant("version", &|d| {
        patch(d.join("snapshot"), 8, &99u32.to_le_bytes())
    });
    assert!(e.contains("format version 99"), "{e}");
    let e = variant("memsize", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("memory"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
    });
    assert!(e.contains("memory file"), "{e}");
    let e = variant("magic", &|d| patch(d.join("snapshot"), 0, b"XX"));
    assert!(e.contains("not a capsule snapshot"), "{e}");
}

/// Over the API: create needs a paused VM, load needs a VM that is not
/// configured yet; a load with `resume_vm` runs the guest.
#[test]
fn api_snapshot_rules() {
    let pid = std::process::id();
    let name = format!("snapapi-{pid}");
    let dir = tmp(&format!("api-{pid}"));
    let last = snapshot_of_a_running_guest(&name, &dir);
    let sock = tmp(&format!("api-{pid}.sock"));
    let log = tmp(&format!("api-{pid}.out"));
    let vm = api_vm(
        sock.clone(),
        &[],
        std::fs::File::create(&log).unwrap().into(),
        Stdio::null(),
    );
    let snap = dir.join("snapshot");
    let mem = dir.join("memory");
    // Create before anything runs.
    let create = format!(
        r#"{{"snapshot_path": "{}/x", "mem_file_path": "{}/y"}}"#,
        dir.display(),
        dir.display()
    );
    let (st, body) = vm.req("PUT", "/snapshot/create", Some(&create));
    assert_eq!(st, 400, "{body}");
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        snap.display(),
        mem.display()
    );
    let (st, body) = vm.req("PUT", "/snapshot/load", Some(&load));
    assert_eq!(st, 204, "{body}");
    // Loaded and running: no second load, no create while running.
    assert_eq!(vm.req("PUT", "/snapshot/load", Some(&load)).0, 400);
    let (st, body) = vm.req("PUT", "/snapshot/create", Some(&create));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("paused"), "{body}");
    assert!(wait_file_len(&log, 3), "the restored guest printed nothing");
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out.chars().next(), Some(next_letter(last)), "{out:?}");
    // Paused, a snapshot of the restored VM can be made.
    assert_eq!(vm.req("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
    let (st, body) = vm.req("PUT", "/snapshot/create", Some(&create));
    assert_eq!(st, 204, "{body}");
    assert!(dir.join("x").exists());
    drop(vm);

    // A configured VM takes no snapshot.
    let vm = api_vm(sock, &[], Stdio::null(), Stdio::null());
    let (st, _) = vm.req(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
    );
    assert_eq!(st, 204);
    let (st, body) = vm.req("PUT", "/snapshot/load", Some(&load));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("before any other configuration"), "{body}");
}

/// A VM with an entropy device (virtio-rng, from a config file) can be
/// snapshotted; its clone has the device again (at the same place, the
/// transport's state put back) and goes on.
#[test]
fn a_vm_with_an_entropy_device_is_snapshotted() {
    let pid = std::process::id();
    let name = format!("snaprng-{pid}");
    let dir = tmp(&format!("rng-{pid}"));
    let kernel = tmp(&format!("{name}.elf"));
    std::fs::write(&kernel, alphabet_guest()).unwrap();
    let cfg = tmp(&format!("{name}.json"));
    let body = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "entropy": {},
    });
    std::fs::write(&cfg, body.to_string()).unwrap();
    ok(&capsule(&[
        "run",
        "-d",
        "--name",
        &name,
        "--config-file",
        cfg.to_str().unwrap(),
    ]));
    wait_output(&name, 30);
    let last = pause_after_a_letter(&name);
    snapshot_into(&name, &dir, &["--stop"]);
    let st = state_json(&dir);
    assert!(st["entropy"].is_object(), "{}", st["entropy"]);
    let types: Vec<u64> = st["transports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["device_type"].as_u64().unwrap())
        .collect();
    assert_eq!(types, vec![4], "virtio-rng is device type 4");
    let clone = format!("snaprngc-{pid}");
    restore_detached(&dir, &clone, &[]);
    let out = wait_output(&clone, 3);
    let _ = capsule(&["kill", &clone]);
    assert_eq!(out.chars().next(), Some(next_letter(last)), "{out:?}");
}

/// A VM with a vsock device can be snapshotted; a clone gets the device
/// again on the socket `--vsock` names (with a new CID), or on the saved
/// one, and goes on. (The TRANSPORT_RESET event a restored device sends
/// an active driver is the device's unit test: this guest has no driver.)
#[test]
fn a_vm_with_a_vsock_device_is_snapshotted() {
    let pid = std::process::id();
    let name = format!("snapvsock-{pid}");
    let dir = tmp(&format!("vsock-{pid}"));
    let kernel = tmp(&format!("{name}.elf"));
    std::fs::write(&kernel, alphabet_guest()).unwrap();
    let sock = tmp(&format!("v-{pid}.sock"));
    let vsock = format!("cid=3,uds={}", sock.display());
    run_detached(&name, &kernel, &["--vsock", &vsock]);
    wait_output(&name, 30);
    let last = pause_after_a_letter(&name);
    snapshot_into(&name, &dir, &["--stop"]);
    let st = state_json(&dir);
    assert_eq!(st["vsock"]["device"]["guest_cid"], 3, "{}", st["vsock"]);
    // A clone on a socket of its own, with another CID.
    let sock2 = tmp(&format!("v2-{pid}.sock"));
    let _ = std::fs::remove_file(&sock2);
    let clone = format!("snapvsockc-{pid}");
    let vsock2 = format!("cid=7,uds={}", sock2.display());
    restore_detached(&dir, &clone, &["--vsock", &vsock2]);
    let out = wait_output(&clone, 3);
    assert!(
        std::os::unix::net::UnixStream::connect(&sock2).is_ok(),
        "no socket {sock2:?}"
    );
    let _ = capsule(&["kill", &clone]);
    assert_eq!(out.chars().next(), Some(next_letter(last)), "{out:?}");
    // A clone on the saved socket (the original's is gone with it).
    let clone = format!("snapvsockd-{pid}");
    restore_detached(&dir, &clone, &[]);
    wait_output(&clone, 3);
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        "no socket {sock:?}"
    );
    let _ = capsule(&["kill", &clone]);
}

/// `PUT /snapshot/load` with `network_overrides`: the restored VM's
/// network device is on the new TAP (capsule creates it), not the saved
/// one, and the guest goes on. Needs root and /dev/net/tun (this
/// project's hosts have both): without them it fails, loudly.
#[test]
fn load_with_network_overrides_uses_the_new_tap() {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (and root)"
    );
    let pid = std::process::id();
    let name = format!("snapnet-{pid}");
    let dir = tmp(&format!("net-{pid}"));
    let kernel = tmp(&format!("{name}.elf"));
    std::fs::write(&kernel, alphabet_guest()).unwrap();
    let (tap, tap2) = (
        format!("csa{}", pid % 100_000),
        format!("csb{}", pid % 100_000),
    );
    let net = format!("tap={tap}");
    run_detached(&name, &kernel, &["--net", &net]);
    wait_output(&name, 30);
    let last = pause_after_a_letter(&name);
    snapshot_into(&name, &dir, &["--stop"]);
    assert_eq!(state_json(&dir)["nets"][0]["iface_id"], "eth0");

    let (out, err) = (
        tmp(&format!("net-{pid}.out")),
        tmp(&format!("net-{pid}.err")),
    );
    let vm = api_vm(
        tmp(&format!("net-{pid}.sock")),
        &[("CAPSULE_LOG", "info")],
        std::fs::File::create(&out).unwrap().into(),
        std::fs::File::create(&err).unwrap().into(),
    );
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "resume_vm": true,
            "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "{tap2}"}}]}}"#,
        dir.join("snapshot").display(),
        dir.join("memory").display()
    );
    let (status, resp) = vm.req("PUT", "/snapshot/load", Some(&body));
    let printed = wait_file_len(&out, 3);
    let on_new = std::path::Path::new("/sys/class/net").join(&tap2).exists();
    let on_old = std::path::Path::new("/sys/class/net").join(&tap).exists();
    drop(vm);
    let log = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status, 204, "{resp}\n{log}");
    assert!(printed, "the restored guest printed nothing\n{log}");
    assert!(
        on_new && !on_old,
        "new TAP {on_new}, old TAP {on_old}\n{log}"
    );
    assert!(log.contains(&format!("created TAP device {tap2}")), "{log}");
    let printed = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        printed.chars().next(),
        Some(next_letter(last)),
        "{printed:?}"
    );
}

/// Pauses the VM `vm` serves and snapshots it into the directory `name`
/// in [`tmp`]; returns the snapshot's state.
fn snapshot_again(vm: &common::api::Vmm, name: &str) -> serde_json::Value {
    let dir = tmp(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (st, body) = vm.req("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(st, 204, "{body}");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.join("snapshot").display(),
        dir.join("memory").display()
    );
    let (st, body) = vm.req("PUT", "/snapshot/create", Some(&create));
    assert_eq!(st, 204, "{body}");
    state_json(&dir)
}

/// Whether process `pid` has `path` open.
fn holds_open(pid: u32, path: &Path) -> bool {
    let path = path.canonicalize().unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

/// A VM restored over the API answers for its drive as the VM it was
/// saved from did: `PATCH /drives/{id}` swaps the image (capsule then
/// holds the new file open and the old one no more) and sets new limits,
/// `GET /vm/config` reports the drive as it now is, and the guest goes on.
#[test]
fn a_restored_vm_swaps_its_drive_and_takes_new_limits() {
    let pid = std::process::id();
    let name = format!("swap-{pid}");
    let (disk, disk2) = (tmp(&format!("{name}.img")), tmp(&format!("{name}-new.img")));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk2, vec![1u8; 2 << 20]).unwrap();
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false,
            "rate_limiter": {{"ops": {{"size": 1000, "refill_time": 1000}}}}}}"#,
        disk.display()
    );
    let dir = snapshot_over_api(&name, &[("/drives/data", drive)], &[]);

    let (out, err) = (tmp(&format!("{name}.out")), tmp(&format!("{name}.err")));
    let vm = load_over_api(&dir, &format!("{name}-restored"), &out, &err);
    let capsule_pid = vm.child.id();
    assert!(
        holds_open(capsule_pid, &disk),
        "the restored VM has no disk"
    );
    let swap = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
        disk2.display()
    );
    let (st, body) = vm.req("PATCH", "/drives/data", Some(&swap));
    assert_eq!(st, 204, "PATCH /drives/data (new image): {body}");
    assert!(
        holds_open(capsule_pid, &disk2) && !holds_open(capsule_pid, &disk),
        "the restored VM's drive is not on the new image"
    );
    let limits = r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}"#;
    let (st, body) = vm.req("PATCH", "/drives/data", Some(limits));
    assert_eq!(st, 204, "PATCH /drives/data (limits): {body}");
    let (st, body) = vm.req("GET", "/vm/config", None);
    assert_eq!(st, 200, "{body}");
    let drive = &common::api::json(&body)["drives"][0];
    assert_eq!(drive["drive_id"], "data", "{body}");
    assert_eq!(drive["path_on_host"], disk2.to_str().unwrap(), "{body}");
    assert_eq!(drive["rate_limiter"]["bandwidth"]["size"], 4096, "{body}");
    assert!(wait_file_len(&out, 3), "the restored guest printed nothing");
    // Its own snapshot names the drive as the first one did.
    let state = snapshot_again(&vm, &format!("{name}-again"));
    assert_eq!(
        state["disks"][0]["drive"]["id"], "data",
        "{}",
        state["disks"]
    );
}

/// A snapshot taken after `PATCH /drives/{id}` saves the drive as it then
/// is: the VM restored from it is on the new image (of the old one's
/// size, which a restore cannot tell apart) with the new limits.
#[test]
fn a_snapshot_after_a_drive_swap_keeps_the_new_image_and_limits() {
    let pid = std::process::id();
    let name = format!("swapsnap-{pid}");
    let (disk, disk2) = (tmp(&format!("{name}.img")), tmp(&format!("{name}-new.img")));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk2, vec![1u8; 1 << 20]).unwrap();
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}"#,
        disk.display()
    );
    let swap = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}",
            "rate_limiter": {{"bandwidth": {{"size": 4096, "refill_time": 100}}}}}}"#,
        disk2.display()
    );
    let dir = snapshot_over_api(&name, &[("/drives/data", drive)], &[("/drives/data", swap)]);

    let (out, err) = (tmp(&format!("{name}.out")), tmp(&format!("{name}.err")));
    let vm = load_over_api(&dir, &format!("{name}-restored"), &out, &err);
    let capsule_pid = vm.child.id();
    assert!(
        holds_open(capsule_pid, &disk2) && !holds_open(capsule_pid, &disk),
        "the VM restored after a drive swap is not on the new image"
    );
    let (st, body) = vm.req("GET", "/vm/config", None);
    assert_eq!(st, 200, "{body}");
    let drive = &common::api::json(&body)["drives"][0];
    assert_eq!(drive["path_on_host"], disk2.to_str().unwrap(), "{body}");
    assert_eq!(drive["rate_limiter"]["bandwidth"]["size"], 4096, "{body}");
}

/// A VM restored over the API answers for its network interface as the
/// VM it was saved from did: it keeps the limits it was saved with,
/// `PATCH /network-interfaces/{id}` sets new ones and `GET /vm/config`
/// reports both. Needs root and
/// /dev/net/tun, like the tests above.
#[test]
fn a_restored_vm_takes_new_network_limits() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (and root)"
    );
    let pid = std::process::id();
    let name = format!("netlim-{pid}");
    let tap = format!("csr{}", pid % 100_000);
    let nic = format!(
        r#"{{"iface_id": "eth0", "host_dev_name": "{tap}",
            "tx_rate_limiter": {{"ops": {{"size": 1000, "refill_time": 1000}}}}}}"#
    );
    let dir = snapshot_over_api(&name, &[("/network-interfaces/eth0", nic)], &[]);

    let (out, err) = (tmp(&format!("{name}.out")), tmp(&format!("{name}.err")));
    let vm = load_over_api(&dir, &format!("{name}-restored"), &out, &err);
    let limits = r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 65536, "refill_time": 100}}}"#;
    let (st, body) = vm.req("PATCH", "/network-interfaces/eth0", Some(limits));
    assert_eq!(st, 204, "PATCH /network-interfaces/eth0: {body}");
    let (st, body) = vm.req("GET", "/vm/config", None);
    assert_eq!(st, 200, "{body}");
    let nic = &common::api::json(&body)["network-interfaces"][0];
    assert_eq!(nic["iface_id"], "eth0", "{body}");
    assert_eq!(nic["host_dev_name"], tap.as_str(), "{body}");
    assert_eq!(nic["rx_rate_limiter"]["bandwidth"]["size"], 65536, "{body}");
    assert_eq!(nic["tx_rate_limiter"]["ops"]["size"], 1000, "{body}");
    // Its own snapshot keeps the interface's name and its new limits.
    let state = snapshot_again(&vm, &format!("{name}-again"));
    let net = &state["nets"][0];
    assert_eq!(net["iface_id"], "eth0", "{net}");
    assert_eq!(net["rx_limits"]["bandwidth"]["size"], 65536, "{net}");
}

/// A VM whose network device answers for the metadata service keeps
/// doing so when restored (`PUT /snapshot/load`): the snapshot holds the
/// service's settings (V2, its address), not its data, as Firecracker's
/// do; the restored VM's store starts empty and takes `PUT /mmds`. Needs
/// root and /dev/net/tun, like the test above.
#[test]
fn a_restored_vm_keeps_its_metadata_service_settings() {
    let pid = std::process::id();
    let tap = format!("csm{}", pid % 100_000);
    let nic = format!(r#"{{"iface_id": "eth0", "host_dev_name": "{tap}"}}"#);
    let config =
        r#"{"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2"}"#;
    let dir = snapshot_over_api(
        &format!("mmds-{pid}"),
        &[
            ("/network-interfaces/eth0", nic),
            ("/mmds/config", config.to_string()),
            ("/mmds", r#"{"id": "original"}"#.to_string()),
        ],
        &[],
    );
    assert_eq!(
        state_json(&dir)["nets"][0]["mmds"],
        serde_json::json!({"v2": true, "ipv4": "169.254.170.2", "imds_compat": false})
    );

    let (out, err) = (
        tmp(&format!("mmds-{pid}.out")),
        tmp(&format!("mmds-{pid}.err")),
    );
    let vm = load_over_api(&dir, &format!("mmds2-{pid}"), &out, &err);
    let empty = vm.req("GET", "/mmds", None);
    let put = vm.req("PUT", "/mmds", Some(r#"{"id": "clone"}"#)).0;
    let data = vm.req("GET", "/mmds", None);
    let config = vm.req("GET", "/vm/config", None).1;
    drop(vm);
    let log = std::fs::read_to_string(&err).unwrap();
    assert!(
        log.contains(&format!(
            "TAP {tap}, with the metadata service at 169.254.170.2"
        )),
        "{log}"
    );
    assert_eq!(empty, (200, "{}".to_string()));
    assert_eq!(put, 204);
    assert_eq!(data, (200, r#"{"id":"clone"}"#.to_string()));
    // GET /vm/config reports the settings the snapshot kept.
    let want = serde_json::json!({"version": "V2", "network_interfaces": ["eth0"],
        "ipv4_address": "169.254.170.2", "imds_compat": false});
    assert_eq!(common::api::json(&config)["mmds-config"], want, "{config}");
}
