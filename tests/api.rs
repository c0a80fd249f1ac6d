//! The API against the real binary on /dev/kvm, with a tiny hand-assembled
//! guest: a whole lifecycle over the socket, a corpus of bad requests (the
//! VMM must answer 4xx and keep running), and conformance of every
//! implemented path's bodies to Firecracker's OpenAPI schemas.
//!
//! Conformance reads the spec from `$CAPSULE_FC_SPEC`, by default from
//! `../shared/reference/firecracker-api.yaml` next to the repository (it is
//! not part of it). Without it that test prints why and passes, unless
//! `CAPSULE_REQUIRE_FC_SPEC=1` (set by `.ci/run` wherever the spec exists),
//! which makes a missing spec a failure.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures cast small, known values"
)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::api::{json, read_response, wait_for_socket};
use common::{ctrl_alt_del_guest, elf};

/// A guest that only halts: it ignores Ctrl-Alt-Del.
fn halting_guest() -> Vec<u8> {
    elf(&[0xf4, 0xeb, 0xfd]) // hlt; jmp hlt
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

struct Vmm {
    child: Child,
    sock: PathBuf,
}

impl Vmm {
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts capsule serving the API, with more `run` arguments.
    fn start_with(name: &str, more: &[&str]) -> Self {
        let sock = tmp(&format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(env!("CARGO_BIN_EXE_capsule"))
            .args(["run", "--api-sock"])
            .arg(&sock)
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run capsule");
        wait_for_socket(&sock);
        Self { child, sock }
    }

    fn connect(&self) -> UnixStream {
        common::api::connect(&self.sock)
    }

    /// Sends raw bytes on a new connection, returns (status, body).
    fn raw(&self, bytes: &[u8]) -> (u16, String) {
        common::api::raw(&self.sock, bytes)
    }

    fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        common::api::request(&self.sock, method, path, body)
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        common::api::wait_exit(&mut self.child, timeout)
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn lifecycle_over_the_api() {
    let kernel = tmp("cad.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let serial = tmp("lifecycle.serial");
    let _ = std::fs::remove_file(&serial);
    let disk = tmp("lifecycle.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut vmm = Vmm::start("lifecycle");

    let (st, body) = vmm.req("GET", "/", None);
    assert_eq!(st, 200);
    assert_eq!(json(&body)["state"], "Not started");
    let (st, _) = vmm.req(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
    );
    assert_eq!(st, 204);
    let (st, body) = vmm.req("GET", "/machine-config", None);
    assert_eq!((st, json(&body)["vcpu_count"].as_u64()), (200, Some(2)));
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(vmm.req("PUT", "/boot-source", Some(&boot)).0, 204);
    let ser = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(vmm.req("PUT", "/serial", Some(&ser)).0, 204);
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
        disk.display()
    );
    assert_eq!(vmm.req("PUT", "/drives/data", Some(&drive)).0, 204);
    let (st, body) = vmm.req("GET", "/vm/config", None);
    assert_eq!(st, 200);
    assert_eq!(json(&body)["drives"][0]["drive_id"], "data");

    let (st, body) = vmm.req(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(st, 204, "{body}");
    assert_eq!(json(&vmm.req("GET", "/", None).1)["state"], "Running");
    let (st, body) = vmm.req("PUT", "/boot-source", Some(&boot));
    assert_eq!(st, 400);
    assert!(json(&body)["fault_message"]
        .as_str()
        .unwrap()
        .contains("after starting"));

    // Output flows, stops while paused, flows again after resume.
    let deadline = Instant::now() + Duration::from_secs(20);
    while file_len(&serial) < 10 {
        assert!(Instant::now() < deadline, "no guest output");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        vmm.req("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    assert_eq!(json(&vmm.req("GET", "/", None).1)["state"], "Paused");
    let paused_at = file_len(&serial);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(file_len(&serial), paused_at, "the guest ran while paused");
    assert_eq!(
        vmm.req("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while file_len(&serial) == paused_at {
        assert!(Instant::now() < deadline, "no output after resume");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Ctrl-Alt-Del: the guest reads the keys and resets; capsule exits 0.
    let (st, body) = vmm.req(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(st, 204, "{body}");
    let code = vmm.wait_exit(Duration::from_secs(30));
    let err = vmm.stderr();
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!vmm.sock.exists(), "socket file left behind");
}

#[test]
fn bad_request_corpus() {
    let mut vmm = Vmm::start("corpus");
    let put = |path: &str, body: &str| {
        format!(
            "PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        (
            "malformed JSON",
            put("/boot-source", "{\"kernel_image_path\": "),
        ),
        ("not JSON", put("/machine-config", "vcpu_count=2")),
        (
            "unknown field",
            put("/boot-source", r#"{"kernel_image_path":"/k","kernel":"x"}"#),
        ),
        (
            "wrong type",
            put("/machine-config", r#"{"vcpu_count":"2","mem_size_mib":64}"#),
        ),
        (
            "negative number",
            put("/machine-config", r#"{"vcpu_count":-1,"mem_size_mib":64}"#),
        ),
        (
            "huge number",
            put(
                "/machine-config",
                r#"{"vcpu_count":1e999,"mem_size_mib":64}"#,
            ),
        ),
        (
            "missing field",
            put("/machine-config", r#"{"vcpu_count":1}"#),
        ),
        (
            "zero vCPUs",
            put("/machine-config", r#"{"vcpu_count":0,"mem_size_mib":64}"#),
        ),
        ("array body", put("/actions", "[]")),
        (
            "unknown action",
            put("/actions", r#"{"action_type":"Explode"}"#),
        ),
        ("empty body", put("/actions", "")),
        (
            "pause before start",
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}".to_vec(),
        ),
        (
            "start without kernel",
            put("/actions", r#"{"action_type":"InstanceStart"}"#),
        ),
        (
            "id mismatch",
            put("/drives/a", r#"{"drive_id":"b","is_root_device":false}"#),
        ),
        ("unknown path", b"GET /balloon HTTP/1.1\r\n\r\n".to_vec()),
        (
            "wrong method",
            b"DELETE /machine-config HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "body on GET",
            b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ),
        ("bad request line", b"HELLO\r\n\r\n".to_vec()),
        ("bad version", b"GET / HTTP/9.9\r\n\r\n".to_vec()),
        (
            "chunked",
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "huge Content-Length",
            b"PUT /actions HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n".to_vec(),
        ),
        (
            "bad Content-Length",
            b"PUT /actions HTTP/1.1\r\nContent-Length: 1x\r\n\r\n".to_vec(),
        ),
        (
            "binary garbage",
            [
                b"GET / HTTP/1.1\r\nX: ".as_slice(),
                &[0xff, 0xfe, 0],
                b"\r\n\r\n",
            ]
            .concat(),
        ),
        (
            "huge head",
            [
                b"GET / HTTP/1.1\r\nX: ".as_slice(),
                &vec![b'a'; 20_000],
                b"\r\n\r\n",
            ]
            .concat(),
        ),
        (
            "network interface with a malformed MAC",
            put(
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:zz:00:00:00:01"}"#,
            ),
        ),
        (
            "network interface with a malformed rate limiter",
            put(
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0","rx_rate_limiter":{"bandwidth":{"size":"x","refill_time":1}}}"#,
            ),
        ),
        (
            "vsock with a reserved CID",
            put("/vsock", r#"{"guest_cid":2,"uds_path":"/tmp/v.sock"}"#),
        ),
        (
            "vsock with a CID past 32 bits",
            put(
                "/vsock",
                r#"{"guest_cid":4294967296,"uds_path":"/tmp/v.sock"}"#,
            ),
        ),
        (
            "vsock without uds_path",
            put("/vsock", r#"{"guest_cid":3}"#),
        ),
        (
            "vsock with an unknown field",
            put(
                "/vsock",
                r#"{"guest_cid":3,"uds_path":"/tmp/v.sock","mode":1}"#,
            ),
        ),
        (
            "network interface id not matching the path",
            put(
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#,
            ),
        ),
        (
            "malformed rate limiter",
            put(
                "/drives/d",
                r#"{"drive_id":"d","path_on_host":"/x","is_root_device":false,"rate_limiter":{"ops":{"size":1}}}"#,
            ),
        ),
    ];
    for (what, bytes) in &corpus {
        let (st, body) = vmm.raw(bytes);
        assert!(
            (400..500).contains(&st) || st == 501 || st == 505,
            "{what}: status {st}"
        );
        assert!(
            json(&body)["fault_message"].is_string(),
            "{what}: no fault_message in {body}"
        );
        assert!(vmm.alive(), "capsule died on: {what}");
    }

    // Half-closed mid-request: 400, and the VMM goes on.
    let mut s = vmm.connect();
    s.write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_response(&mut s).0, 400);

    // A slow client holds a half-sent request; a second client is served
    // meanwhile; the slow one gets 408 when its time is up.
    let mut slow = vmm.connect();
    slow.write_all(b"GET / HT").unwrap();
    let t = Instant::now();
    let (st, _) = vmm.req("GET", "/version", None);
    assert_eq!(st, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "second client waited");
    assert_eq!(read_response(&mut slow).0, 408);

    // Several requests on one keep-alive connection, with 100-continue.
    let mut s = vmm.connect();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).0, 200);
    s.write_all(
        b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 37\r\n\r\n",
    )
    .unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"vcpu_count": 1, "mem_size_mib": 64}"#)
        .unwrap();
    assert_eq!(read_response(&mut s).0, 204);

    assert!(vmm.alive());
    assert_eq!(vmm.req("GET", "/", None).0, 200);
    let _ = vmm.child.kill();
    let err = vmm.stderr();
    assert!(!err.contains("panicked"), "{err}");
}

// ---- conformance against Firecracker's OpenAPI (swagger 2.0) spec ----

/// A schema from the spec: required fields, and each property's type and
/// enum (if any). Read with a tiny reader for the spec's indentation-based
/// `definitions:` layout (no YAML crate is available offline).
#[derive(Debug, Default)]
struct Schema {
    required: Vec<String>,
    props: Vec<(String, Option<String>, Vec<String>)>,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

fn load_definitions(text: &str) -> std::collections::HashMap<String, Schema> {
    let mut defs = std::collections::HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "definitions:")
        .expect("definitions:");
    let mut i = start + 1;
    while i < lines.len() {
        let l = lines[i];
        if indent(l) == 2 && l.trim_end().ends_with(':') && !l.trim().starts_with('#') {
            let name = l.trim().trim_end_matches(':').to_string();
            let mut s = Schema::default();
            let mut j = i + 1;
            let mut section = "";
            while j < lines.len() && (lines[j].trim().is_empty() || indent(lines[j]) > 2) {
                let m = lines[j];
                let t = m.trim();
                if indent(m) == 4 {
                    section = t.trim_end_matches(':');
                } else if section == "required" && indent(m) == 6 && t.starts_with("- ") {
                    s.required.push(t[2..].trim().to_string());
                } else if section == "properties"
                    && indent(m) == 6
                    && t.ends_with(':')
                    && !t.starts_with('#')
                {
                    s.props
                        .push((t.trim_end_matches(':').to_string(), None, Vec::new()));
                } else if section == "properties" && indent(m) == 8 {
                    if let Some(p) = s.props.last_mut() {
                        if let Some(ty) = t.strip_prefix("type: ") {
                            p.1 = Some(ty.trim().to_string());
                        } else if let Some(list) = t.strip_prefix("enum: [") {
                            p.2 = list
                                .trim_end_matches(']')
                                .split(',')
                                .map(|v| v.trim().trim_matches('"').to_string())
                                .collect();
                        }
                    }
                } else if section == "properties" && indent(m) == 10 && t.starts_with("- ") {
                    if let Some(p) = s.props.last_mut() {
                        p.2.push(t[2..].trim().trim_matches('"').to_string());
                    }
                }
                j += 1;
            }
            defs.insert(name, s);
            i = j;
        } else {
            i += 1;
        }
    }
    defs
}

/// Checks `v` against schema `name`: required fields present, no unknown
/// fields, scalar types and enums right.
fn conforms(
    defs: &std::collections::HashMap<String, Schema>,
    name: &str,
    v: &serde_json::Value,
) -> Result<(), String> {
    let s = defs.get(name).ok_or(format!("no schema {name}"))?;
    let obj = v.as_object().ok_or(format!("{name}: not an object: {v}"))?;
    for r in &s.required {
        if !obj.contains_key(r) {
            return Err(format!("{name}: required field {r} missing in {v}"));
        }
    }
    for (k, val) in obj {
        let Some((_, ty, en)) = s.props.iter().find(|p| &p.0 == k) else {
            return Err(format!("{name}: field {k} is not in the spec"));
        };
        let ok = match ty.as_deref() {
            Some("string") => val.is_string(),
            Some("integer") => val.is_u64() || val.is_i64(),
            Some("boolean") => val.is_boolean(),
            Some("array") => val.is_array(),
            Some("object") => val.is_object(),
            _ => true,
        };
        if !ok {
            return Err(format!("{name}.{k}: {val} is not a {ty:?}"));
        }
        if !en.is_empty() && !en.iter().any(|e| val.as_str() == Some(e.as_str())) {
            return Err(format!("{name}.{k}: {val} not in {en:?}"));
        }
    }
    Ok(())
}

#[test]
fn conformance_with_the_firecracker_spec() {
    let path = std::env::var("CAPSULE_FC_SPEC").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/reference/firecracker-api.yaml"
        )
        .into()
    });
    let Ok(text) = std::fs::read_to_string(&path) else {
        let msg = format!("Firecracker API spec not found at {path}: conformance not checked");
        if std::env::var("CAPSULE_REQUIRE_FC_SPEC").as_deref() == Ok("1") {
            panic!("{msg} (CAPSULE_REQUIRE_FC_SPEC=1)");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    };
    let defs = load_definitions(&text);
    // Every path and method capsule implements is in the spec.
    for (p, m) in [
        ("/", "get"),
        ("/version", "get"),
        ("/machine-config", "get"),
        ("/machine-config", "put"),
        ("/boot-source", "put"),
        ("/drives/{drive_id}", "put"),
        ("/network-interfaces/{iface_id}", "put"),
        ("/vsock", "put"),
        ("/actions", "put"),
        ("/vm", "patch"),
        ("/vm/config", "get"),
        ("/logger", "put"),
        ("/serial", "put"),
        ("/machine-config", "patch"),
        ("/metrics", "put"),
        ("/entropy", "put"),
        ("/cpu-config", "put"),
        ("/drives/{drive_id}", "patch"),
        ("/network-interfaces/{iface_id}", "patch"),
    ] {
        let at = text
            .find(&format!("\n  {p}:\n"))
            .unwrap_or_else(|| panic!("path {p} not in the spec"));
        let block = &text[at + 1..];
        let end = block[1..]
            .find("\n  /")
            .map(|e| e + 1)
            .unwrap_or(block.len());
        assert!(
            block[..end].contains(&format!("\n    {m}:")),
            "{m} {p} not in the spec"
        );
    }

    let kernel = tmp("conf.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let vsock = tmp("conf.vsock");
    let _ = std::fs::remove_file(&vsock);
    let vmm = Vmm::start("conformance");
    let k = kernel.display();
    // Request bodies (checked against the spec, then sent: 204 expected).
    let requests = [
        ("PUT", "/machine-config", "MachineConfiguration", r#"{"vcpu_count":1,"mem_size_mib":64,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#.to_string()),
        ("PUT", "/boot-source", "BootSource", format!(r#"{{"kernel_image_path":"{k}","boot_args":"console=ttyS0"}}"#)),
        ("PUT", "/drives/rootfs", "Drive", format!(r#"{{"drive_id":"rootfs","path_on_host":"{k}","is_root_device":true,"is_read_only":true,"cache_type":"Unsafe","io_engine":"Sync"}}"#)),
        ("PUT", "/logger", "Logger", r#"{"level":"Warning","show_level":true,"show_log_origin":false}"#.to_string()),
        ("PUT", "/serial", "SerialDevice", format!(r#"{{"serial_out_path":"{}"}}"#, tmp("conf.serial").display())),
        ("PUT", "/vsock", "Vsock", format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, vsock.display())),
        ("PATCH", "/machine-config", "MachineConfiguration", r#"{"vcpu_count":1,"mem_size_mib":64}"#.to_string()),
        ("PUT", "/metrics", "Metrics", format!(r#"{{"metrics_path":"{}"}}"#, tmp("conf.metrics").display())),
        ("PUT", "/entropy", "EntropyDevice", r#"{"rate_limiter":{"bandwidth":{"size":4096,"one_time_burst":0,"refill_time":100},"ops":{"size":10,"refill_time":100}}}"#.to_string()),
    ];
    for (m, p, schema, body) in &requests {
        conforms(&defs, schema, &json(body)).unwrap();
        let (st, b) = vmm.req(m, p, Some(body));
        assert_eq!(st, 204, "{m} {p}: {b}");
    }
    // Every property the spec gives these request schemas is a known field
    // (accepted or refused with a clear message, never "unknown field").
    for schema in [
        "MachineConfiguration",
        "BootSource",
        "Drive",
        "NetworkInterface",
        "Logger",
        "SerialDevice",
        "Vsock",
        "InstanceActionInfo",
        "Vm",
        "SnapshotCreateParams",
        "SnapshotLoadParams",
        "Metrics",
        "EntropyDevice",
    ] {
        for (prop, _, _) in &defs[schema].props {
            let path = match schema {
                "MachineConfiguration" => "/machine-config",
                "BootSource" => "/boot-source",
                "Drive" => "/drives/x",
                "NetworkInterface" => "/network-interfaces/x",
                "Logger" => "/logger",
                "SerialDevice" => "/serial",
                "Vsock" => "/vsock",
                "InstanceActionInfo" => "/actions",
                "SnapshotCreateParams" => "/snapshot/create",
                "SnapshotLoadParams" => "/snapshot/load",
                "Metrics" => "/metrics",
                "EntropyDevice" => "/entropy",
                _ => "/vm",
            };
            let body = format!(r#"{{"{prop}": null}}"#);
            let (_, b) = vmm.req(
                if schema == "Vm" { "PATCH" } else { "PUT" },
                path,
                Some(&body),
            );
            assert!(!b.contains("unknown field"), "{schema}.{prop}: {b}");
        }
    }
    // Responses.
    for (p, schema) in [
        ("/", "InstanceInfo"),
        ("/version", "FirecrackerVersion"),
        ("/machine-config", "MachineConfiguration"),
        ("/vm/config", "FullVmConfiguration"),
    ] {
        let (st, body) = vmm.req("GET", p, None);
        assert_eq!(st, 200);
        conforms(&defs, schema, &json(&body)).unwrap_or_else(|e| panic!("GET {p}: {e}"));
    }
    let (_, body) = vmm.req("GET", "/vm/config", None);
    let full = json(&body);
    conforms(&defs, "BootSource", &full["boot-source"]).unwrap();
    conforms(&defs, "Drive", &full["drives"][0]).unwrap();
    conforms(&defs, "MachineConfiguration", &full["machine-config"]).unwrap();
    conforms(&defs, "Vsock", &full["vsock"]).unwrap();
    let (st, body) = vmm.req("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(st, 400);
    conforms(&defs, "Error", &json(&body)).unwrap();
    // Start, then the running-state responses.
    let (st, body) = vmm.req(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(st, 204, "{body}");
    // The vsock device's socket exists once the VM runs, owner-only.
    assert_eq!(mode_of(&vsock), 0o600);
    let (_, body) = vmm.req("GET", "/", None);
    conforms(&defs, "InstanceInfo", &json(&body)).unwrap();
    let patch = r#"{"drive_id":"rootfs","rate_limiter":{"ops":{"size":100,"refill_time":1000}}}"#;
    conforms(&defs, "PartialDrive", &json(patch)).unwrap();
    let (st, body) = vmm.req("PATCH", "/drives/rootfs", Some(patch));
    assert_eq!(st, 204, "{body}");
    let (st, body) = vmm.req("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#));
    assert_eq!(st, 204, "{body}");
    conforms(&defs, "Vm", &json(r#"{"state":"Paused"}"#)).unwrap();
    assert_eq!(
        vmm.req("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0,
        204
    );
    let (_, body) = vmm.req("GET", "/", None);
    assert_eq!(json(&body)["state"], "Paused");
    conforms(&defs, "InstanceInfo", &json(&body)).unwrap();
}

fn capsule(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run capsule")
}

#[test]
fn verbs_drive_a_detached_vm() {
    let kernel = tmp("verbs.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let name = format!("apitest-{}", std::process::id());
    let k = kernel.to_str().unwrap();
    let out = capsule(&[
        "run",
        "-d",
        "--name",
        &name,
        "--kernel",
        k,
        "--cmdline",
        "console=ttyS0",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    // A second VM of the same name is refused.
    let out = capsule(&["run", "-d", "--name", &name, "--kernel", k]);
    assert_eq!(out.status.code(), Some(1));
    let out = capsule(&["ls", "--json"]);
    let list = json(&String::from_utf8_lossy(&out.stdout));
    let me = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name.as_str())
        .expect("listed");
    assert_eq!(me["state"], "Running");
    assert_eq!(capsule(&["pause", &name]).status.code(), Some(0));
    let out = capsule(&["ls", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paused"));
    assert_eq!(capsule(&["resume", &name]).status.code(), Some(0));
    let out = capsule(&["logs", &name]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with('.'));
    let waiter = {
        let name = name.clone();
        std::thread::spawn(move || capsule(&["wait", &name]).status.code())
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = capsule(&["stop", &name, "--timeout", "20"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).is_empty(),
        "stop was not graceful"
    );
    assert_eq!(waiter.join().unwrap(), Some(0));
    // Gone: verbs say so with status 4.
    assert_eq!(capsule(&["pause", &name]).status.code(), Some(4));
    assert_eq!(capsule(&["wait", &name]).status.code(), Some(4));
    assert_eq!(capsule(&["stop", "bad/name"]).status.code(), Some(2));
}

/// Starts `guest` as a detached VM named `PREFIX-PID` and returns the
/// name and its `ls --json` entry.
fn start_detached(prefix: &str, guest: Vec<u8>) -> (String, serde_json::Value) {
    let kernel = tmp(&format!("{prefix}.elf"));
    std::fs::write(&kernel, guest).unwrap();
    let name = format!("{prefix}-{}", std::process::id());
    let out = capsule(&[
        "run",
        "-d",
        "--name",
        &name,
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = json(&String::from_utf8_lossy(&capsule(&["ls", "--json"]).stdout));
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name.as_str())
        .expect("listed")
        .clone();
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
        std::thread::spawn(move || capsule(&["wait", &name]).status.code())
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = capsule(&["stop", &name, "--timeout", "1"]);
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
    let out = capsule(&["ls", "--json"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&name));
    assert!(!d.exists(), "stale directory not removed");
}

/// Runs `capsule ARGS` and waits at most `timeout` for it to exit;
/// returns its status and stderr (a capsule still running is killed and
/// counts as `None`).
fn capsule_within(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (code, err)
}

/// `--api-sock` never deletes what is not a stale socket: a regular file
/// (or a directory, or a FIFO) there makes capsule exit 1 with one clear
/// line, and the file is left as it was.
#[test]
fn api_sock_refuses_a_path_that_is_not_a_stale_socket() {
    let file = tmp("precious.txt");
    let _ = std::fs::remove_file(&file);
    std::fs::write(&file, "precious data").unwrap();
    let (code, err) = capsule_within(
        &["run", "--api-sock", file.to_str().unwrap()],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("capsule: error: ") && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious data");

    let fifo = tmp("api-fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (code, err) = capsule_within(
        &["run", "--api-sock", fifo.to_str().unwrap()],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(err.contains("a FIFO"), "{err}");
    assert!(std::fs::symlink_metadata(&fifo).is_ok(), "FIFO removed");

    // A socket someone listens on is in use; once nobody does, it is stale
    // and replaced.
    let sock = tmp("taken.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (code, err) = capsule_within(
        &["run", "--api-sock", sock.to_str().unwrap()],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(err.contains("another process is serving on it"), "{err}");
    drop(listener);
    let _vmm = Vmm::start("taken");
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Under `umask 000` the API socket is still 0600, and so are a named
/// VM's sockets and logs (its directory 0700).
#[test]
fn sockets_are_private_whatever_the_umask() {
    let sock = tmp("umask.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" run --api-sock \"$1\"")
        .arg(env!("CARGO_BIN_EXE_capsule"))
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = mode_of(&sock);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");

    let kernel = tmp("umask.elf");
    std::fs::write(&kernel, halting_guest()).unwrap();
    let name = format!("apiumask-{}", std::process::id());
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" run -d --name \"$1\" --kernel \"$2\"")
        .arg(env!("CARGO_BIN_EXE_capsule"))
        .arg(&name)
        .arg(&kernel)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = json(&String::from_utf8_lossy(&capsule(&["ls", "--json"]).stdout));
    let me = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name.as_str())
        .expect("listed")
        .clone();
    let dir = PathBuf::from(me["dir"].as_str().unwrap());
    let modes: Vec<(&str, Option<u32>)> = [
        "",
        "api.sock",
        "wait.sock",
        "console.log",
        "console.in",
        "vmm.log",
        "pid",
    ]
    .iter()
    .map(|f| {
        let p = dir.join(f);
        (*f, std::fs::symlink_metadata(&p).ok().map(|_| mode_of(&p)))
    })
    .collect();
    assert_eq!(capsule(&["kill", &name]).status.code(), Some(0));
    for (f, m) in modes {
        let want = if f.is_empty() { 0o700 } else { 0o600 };
        assert_eq!(m, Some(want), "{f}: mode {:o}", m.unwrap_or(0));
    }
}

fn mkfifo(name: &str) -> PathBuf {
    let p = tmp(name);
    let _ = std::fs::remove_file(&p);
    assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
    p
}

/// A FIFO named as a kernel, initrd, configuration file or read-only /
/// ephemeral disk is refused at once (an open of a FIFO for reading would
/// wait for a writer forever): status 1 within a second, one clear line.
#[test]
fn fifo_as_an_input_file_fails_at_once() {
    let fifo = mkfifo("input.fifo");
    let f = fifo.to_str().unwrap();
    let kernel = tmp("fifo-test.elf");
    std::fs::write(&kernel, halting_guest()).unwrap();
    let k = kernel.to_str().unwrap();
    let ro = format!("{f},ro");
    let eph = format!("{f},ephemeral");
    let cases: [&[&str]; 5] = [
        &["run", "--kernel", f],
        &["run", "--kernel", k, "--initrd", f],
        &["run", "--config-file", f, "--no-api"],
        &["run", "--kernel", k, "--disk", &ro],
        &["run", "--kernel", k, "--disk", &eph],
    ];
    for args in cases {
        let t = Instant::now();
        let (code, err) = capsule_within(args, Duration::from_secs(1));
        assert_eq!(code, Some(1), "{args:?} ({:?}): {err}", t.elapsed());
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("capsule: error: ")
                && (err.contains("FIFO") || err.contains("not a regular file")),
            "{args:?}: {err}"
        );
    }
}

/// `PUT /logger` with a FIFO as `log_path` on a running VM: without a
/// reader it is refused (400) at once; with a reader that never reads,
/// it is accepted and logging never stalls — the API keeps answering
/// within a second while the log overflows the FIFO, the guest keeps
/// running, and the dropped lines are counted in the log once the FIFO
/// has room again. A FIFO `serial_out_path` nobody reads is refused at
/// InstanceStart.
#[test]
fn fifo_log_path_never_stalls_a_running_vm() {
    use std::os::unix::fs::OpenOptionsExt;
    let kernel = tmp("fifo-log.elf");
    std::fs::write(&kernel, ctrl_alt_del_guest()).unwrap();
    let serial = tmp("fifo-log.serial");
    let _ = std::fs::remove_file(&serial);
    let fifo = mkfifo("log.fifo");
    // The logs are put in place after the VM started: Landlock must be
    // told where they may go.
    let dir = format!("{}:rw", tmp("").display());
    let mut vmm = Vmm::start_with("fifo-log", &["--landlock-allow", &dir]);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(vmm.req("PUT", "/boot-source", Some(&boot)).0, 204);
    let start = Some(r#"{"action_type": "InstanceStart"}"#);
    let ser = format!(r#"{{"serial_out_path": "{}"}}"#, fifo.display());
    assert_eq!(vmm.req("PUT", "/serial", Some(&ser)).0, 204);
    let t = Instant::now();
    let (st, body) = vmm.req("PUT", "/actions", start);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("no process is reading it"), "{body}");
    let ser = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(vmm.req("PUT", "/serial", Some(&ser)).0, 204);
    assert_eq!(vmm.req("PUT", "/actions", start).0, 204);
    let grows = |what: &str| {
        let before = file_len(&serial);
        let deadline = Instant::now() + Duration::from_secs(20);
        while file_len(&serial) == before {
            assert!(Instant::now() < deadline, "guest stalled {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    grows("after start");

    let logger = format!(r#"{{"log_path": "{}", "level": "Debug"}}"#, fifo.display());
    let t = Instant::now();
    let (st, body) = vmm.req("PUT", "/logger", Some(&logger));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("no process is reading it"), "{body}");
    grows("after a refused FIFO log_path");

    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    assert_eq!(vmm.req("PUT", "/logger", Some(&logger)).0, 204);
    // Each request logs its ~7 KiB path (debug, and info for the 400):
    // far more than a pipe holds.
    let long = format!("/{}", "x".repeat(7000));
    for i in 0..40 {
        let t = Instant::now();
        let (st, _) = vmm.req("GET", &long, None);
        assert_eq!(st, 400);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "request {i} took {took:?}");
    }
    grows("while its log FIFO was full");
    let mut drained = Vec::new();
    let _ = reader.read_to_end(&mut drained);
    assert!(drained.len() >= 4096, "{} bytes logged", drained.len());
    assert_eq!(vmm.req("GET", "/", None).0, 200);
    let mut after = String::new();
    let _ = reader.read_to_string(&mut after);
    assert!(after.contains("log lines dropped"), "{after}");

    let plain = tmp("fifo-log.log");
    let logger = format!(r#"{{"log_path": "{}", "level": "Info"}}"#, plain.display());
    assert_eq!(vmm.req("PUT", "/logger", Some(&logger)).0, 204);
    let (st, _) = vmm.req(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(st, 204);
    assert_eq!(vmm.wait_exit(Duration::from_secs(30)), Some(0));
}
