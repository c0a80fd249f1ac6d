//! The API against the real binary on /dev/kvm, with a tiny hand-assembled
//! guest: a whole lifecycle over the socket and a corpus of bad requests
//! (the VMM must answer 4xx and keep running). Beside it: conformance to
//! Firecracker's schemas (api_conformance.rs), the CLI verbs on named VMs
//! (verbs.rs), the host paths capsule is given (host_paths.rs) and load
//! (api_load.rs).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

mod common;
use common::api::*;
use common::ctrl_alt_del_guest;

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

/// Requests the API must refuse with a 4xx (or 501, 505) and a
/// `fault_message`, keeping the VMM alive: (what, the raw bytes).
fn bad_requests() -> Vec<(&'static str, Vec<u8>)> {
    let put = |path: &str, body: &str| {
        format!(
            "PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    vec![
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
        ("unknown path", b"GET /pmem/p1 HTTP/1.1\r\n\r\n".to_vec()),
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
    ]
}

/// Every request of [`bad_requests`] is refused with a fault message and
/// the VMM goes on.
#[test]
fn bad_request_corpus() {
    let mut vmm = Vmm::start("corpus");
    for (what, bytes) in &bad_requests() {
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
    assert!(vmm.alive());
    assert_eq!(vmm.req("GET", "/", None).0, 200);
    let _ = vmm.child.kill();
    let err = vmm.stderr();
    assert!(!err.contains("panicked"), "{err}");
}

/// Clients that misbehave on the connection itself: one half-closed
/// mid-request gets 400, a slow one holding a half-sent request delays
/// only itself (408 when its time is up), and one connection carries
/// several keep-alive requests, with `100 Continue`.
#[test]
fn slow_half_closed_and_keep_alive_clients() {
    let mut vmm = Vmm::start("clients");
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

/// The metadata service's API with Firecracker's routes and statuses:
/// `PUT`/`PATCH`/`GET /mmds` (merge patch, the size limit), `PUT
/// /mmds/config` refused for an interface that does not exist or a
/// non-link-local address, accepted for one that does, and reported by
/// `GET /vm/config`.
#[test]
fn mmds_data_and_config() {
    let vmm = Vmm::start("mmds");
    assert_eq!(vmm.req("GET", "/mmds", None), (200, "{}".to_string()));
    // Found by Schemathesis (resources/api-schemathesis.sh): data that is
    // not an object was taken, and GET /mmds then broke the schema.
    let (code, body) = vmm.req("PUT", "/mmds", Some("false"));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("must be a JSON object"), "{body}");
    let (code, body) = vmm.req("PATCH", "/mmds", Some(r#"{"a": 1}"#));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("PUT /mmds before PATCH"), "{body}");
    let put = r#"{"latest": {"meta-data": {"instance-id": "i-1", "drop": "x"}}}"#;
    assert_eq!(vmm.req("PUT", "/mmds", Some(put)).0, 204);
    let patch = r#"{"latest": {"meta-data": {"hostname": "h", "drop": null}}}"#;
    assert_eq!(vmm.req("PATCH", "/mmds", Some(patch)).0, 204);
    let (code, body) = vmm.req("GET", "/mmds", None);
    assert_eq!(code, 200);
    assert_eq!(
        json(&body),
        serde_json::json!({"latest": {"meta-data": {"instance-id": "i-1", "hostname": "h"}}})
    );
    // The store's limit (51200 bytes, as the request's): two halves that
    // fit one by one do not fit together.
    let half = |k: &str| format!(r#"{{"{k}": "{}"}}"#, "x".repeat(30_000));
    assert_eq!(vmm.req("PATCH", "/mmds", Some(&half("k1"))).0, 204);
    let (code, body) = vmm.req("PATCH", "/mmds", Some(&half("k2")));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("over its limit"), "{body}");
    assert_eq!(vmm.req("PATCH", "/mmds", Some(r#"{"k1": null}"#)).0, 204);
    let (code, body) = vmm.req(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"]}"#),
    );
    assert_eq!(code, 400);
    assert!(body.contains("'eth0': it does not exist"), "{body}");
    let nic = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
    assert_eq!(vmm.req("PUT", "/network-interfaces/eth0", Some(nic)).0, 204);
    let bad_ip = r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#;
    assert_eq!(vmm.req("PUT", "/mmds/config", Some(bad_ip)).0, 400);
    let ok =
        r#"{"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2"}"#;
    assert_eq!(vmm.req("PUT", "/mmds/config", Some(ok)).0, 204);
    let (_, body) = vmm.req("GET", "/vm/config", None);
    assert_eq!(
        json(&body)["mmds-config"],
        serde_json::json!({"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2"})
    );
    assert_eq!(vmm.req("DELETE", "/mmds", None).0, 400);
}
