//! The balloon API (`/balloon`, `/balloon/statistics`) against the real
//! binary on /dev/kvm, with a tiny guest that has no balloon driver: what
//! the host side answers before and after start, the limits it enforces,
//! `--balloon` on the command line, and the snapshot refusal. A real
//! guest's driver is exercised by the boot suite (`cases.d/balloon.sh`).

use std::time::{Duration, Instant};

mod common;
use common::api::*;
use common::ctrl_alt_del_guest;

fn fault(body: &str) -> String {
    json(body)["fault_message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Status and `fault_message` (or body) of a request.
fn ask(vmm: &Vmm, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let (st, b) = vmm.req(method, path, body);
    if st >= 400 {
        (st, fault(&b))
    } else {
        (st, b)
    }
}

#[test]
fn balloon_before_and_after_start() {
    let kernel = tmp("balloon.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let serial = tmp("balloon.serial");
    let _ = std::fs::remove_file(&serial);
    let vmm = Vmm::start("balloon");
    let mc = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(vmm.req("PUT", "/machine-config", Some(mc)).0, 204);
    let (st, msg) = ask(&vmm, "GET", "/balloon", None);
    assert_eq!(st, 400);
    assert!(msg.contains("no balloon device"), "{msg}");
    let too_big = r#"{"amount_mib": 65, "deflate_on_oom": false}"#;
    let (st, msg) = ask(&vmm, "PUT", "/balloon", Some(too_big));
    assert_eq!(st, 400);
    assert!(msg.contains("more than the guest's 64 MiB"), "{msg}");
    let hinting = r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#;
    assert_eq!(ask(&vmm, "PUT", "/balloon", Some(hinting)).0, 400);
    let missing = r#"{"amount_mib": 0}"#;
    assert_eq!(ask(&vmm, "PUT", "/balloon", Some(missing)).0, 400);
    let ok = r#"{"amount_mib": 4, "deflate_on_oom": true, "stats_polling_interval_s": 1,
                 "free_page_reporting": true}"#;
    assert_eq!(ask(&vmm, "PUT", "/balloon", Some(ok)), (204, String::new()));
    let (st, msg) = ask(&vmm, "GET", "/balloon/statistics", None);
    assert_eq!(st, 400);
    assert!(msg.contains("start the microVM"), "{msg}");
    let patch = r#"{"amount_mib": 8}"#;
    assert_eq!(vmm.req("PATCH", "/balloon", Some(patch)).0, 204);
    let (st, body) = vmm.req("GET", "/balloon", None);
    assert_eq!(st, 200);
    let b = json(&body);
    assert_eq!(
        (b["amount_mib"].as_u64(), b["deflate_on_oom"].as_bool()),
        (Some(8), Some(true))
    );
    assert_eq!(b["stats_polling_interval_s"], 1);
    assert_eq!(b["free_page_reporting"], true);
    assert_eq!(
        json(&vmm.req("GET", "/vm/config", None).1)["balloon"]["amount_mib"],
        8
    );

    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(vmm.req("PUT", "/boot-source", Some(&boot)).0, 204);
    let ser = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(vmm.req("PUT", "/serial", Some(&ser)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vmm.req("PUT", "/actions", Some(start)).0, 204);
    running_balloon(&vmm, ok);

    // A VM with a balloon cannot be snapshotted (yet): a clear refusal.
    assert_eq!(
        vmm.req("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        tmp("balloon.snap").display(),
        tmp("balloon.mem").display()
    );
    let (st, msg) = ask(&vmm, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(st, 400);
    assert!(msg.contains("balloon"), "{msg}");
    assert!(!tmp("balloon.snap").exists());
    assert_eq!(
        vmm.req("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vmm.req("PUT", "/actions", Some(cad)).0, 204);
    let mut vmm = vmm;
    assert_eq!(
        vmm.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        vmm.stderr()
    );
}

/// The running VM's balloon: the device answers (its target in pages;
/// nothing inflated by a guest without a driver).
fn running_balloon(vmm: &Vmm, put: &str) {
    let (st, msg) = ask(vmm, "PUT", "/balloon", Some(put));
    assert_eq!(st, 400);
    assert!(msg.contains("after starting"), "{msg}");
    let (st, body) = vmm.req("GET", "/balloon/statistics", None);
    assert_eq!(st, 200, "{body}");
    let s = json(&body);
    assert_eq!(
        (s["target_pages"].as_u64(), s["target_mib"].as_u64()),
        (Some(2048), Some(8))
    );
    assert_eq!(
        (s["actual_pages"].as_u64(), s["actual_mib"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        s.get("free_memory").is_none(),
        "no driver, no guest numbers: {s}"
    );
    assert_eq!(
        vmm.req("PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#))
            .0,
        204
    );
    let s = json(&vmm.req("GET", "/balloon/statistics", None).1);
    assert_eq!(s["target_pages"], 4096);
    assert_eq!(json(&vmm.req("GET", "/balloon", None).1)["amount_mib"], 16);
    assert_eq!(
        ask(vmm, "PATCH", "/balloon", Some(r#"{"amount_mib": 65}"#)).0,
        400
    );
    let (st, msg) = ask(
        vmm,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    assert_eq!(st, 400);
    assert!(msg.contains("cannot be turned off"), "{msg}");
    let every2 = r#"{"stats_polling_interval_s": 2}"#;
    assert_eq!(vmm.req("PATCH", "/balloon/statistics", Some(every2)).0, 204);
    assert_eq!(
        json(&vmm.req("GET", "/balloon", None).1)["stats_polling_interval_s"],
        2
    );
    let (st, msg) = ask(vmm, "PATCH", "/balloon/hinting/start", Some("{}"));
    assert_eq!(st, 400);
    assert!(msg.contains("hinting is not supported"), "{msg}");
}

#[test]
fn balloon_from_the_command_line() {
    let kernel = tmp("balloon-cli.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let k = kernel.to_str().unwrap();
    let mut vmm = Vmm::start_with(
        "balloon-cli",
        &[
            "--kernel",
            k,
            "--memory",
            "64M",
            "--balloon",
            "amount_mib=2,deflate_on_oom=on",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while json(&vmm.req("GET", "/", None).1)["state"] != "Running" {
        assert!(Instant::now() < deadline, "never running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = json(&vmm.req("GET", "/balloon", None).1);
    assert_eq!(
        (b["amount_mib"].as_u64(), b["deflate_on_oom"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(b["free_page_reporting"], false);
    let (st, msg) = ask(&vmm, "GET", "/balloon/statistics", None);
    assert_eq!(st, 400);
    assert!(msg.contains("not enabled"), "{msg}");
    assert_eq!(
        vmm.req("PATCH", "/balloon", Some(r#"{"amount_mib": 1}"#)).0,
        204
    );
    assert_eq!(json(&vmm.req("GET", "/balloon", None).1)["amount_mib"], 1);
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vmm.req("PUT", "/actions", Some(cad)).0, 204);
    assert_eq!(
        vmm.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        vmm.stderr()
    );

    // Bad values are usage errors (status 2, one line naming the option).
    for (bad, says) in [
        ("amount_mib=x", "invalid balloon amount_mib"),
        ("colour=red", "unknown balloon option"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsule"))
            .args(["run", "--kernel", k, "--balloon", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(says), "{bad}: {err}");
    }
    // More than the guest's memory: refused at start (status 1).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args([
            "run",
            "--kernel",
            k,
            "--memory",
            "64M",
            "--balloon",
            "amount_mib=100",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("balloon amount_mib 100 is more than the guest's 64 MiB"),
        "{err}"
    );
}

/// The config file's `balloon` section makes the device (the same action
/// as `PUT /balloon`), and its errors are the action's.
#[test]
fn balloon_from_the_config_file() {
    let kernel = tmp("balloon-cfg.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let config = tmp("balloon-cfg.json");
    let write = |balloon: &str| {
        let body = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}},
                "balloon": {balloon}}}"#,
            kernel.display()
        );
        std::fs::write(&config, body).unwrap();
    };
    write(r#"{"amount_mib": 3, "deflate_on_oom": false, "free_page_reporting": true}"#);
    let c = config.to_str().unwrap();
    let mut vmm = Vmm::start_with("balloon-cfg", &["--config-file", c]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while json(&vmm.req("GET", "/", None).1)["state"] != "Running" {
        assert!(Instant::now() < deadline, "never running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = json(&vmm.req("GET", "/balloon", None).1);
    assert_eq!(b["amount_mib"], 3);
    assert_eq!(b["free_page_reporting"], true);
    assert_eq!(
        json(&vmm.req("GET", "/vm/config", None).1)["balloon"]["amount_mib"],
        3
    );
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vmm.req("PUT", "/actions", Some(cad)).0, 204);
    assert_eq!(
        vmm.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        vmm.stderr()
    );

    write(r#"{"amount_mib": 65, "deflate_on_oom": false}"#);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["run", "--no-api", "--config-file", c])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        "capsule: error: balloon amount_mib 65 is more than the guest's 64 MiB of memory\n"
    );
}
