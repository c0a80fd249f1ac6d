use std::path::PathBuf;

use super::*;

/// A fresh directory for the tests' bind mount sources.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("capsule-shim-mounts-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spec_with(mounts: &str) -> Spec {
    serde_json::from_str(&format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"mounts":{mounts}}}"#
    ))
    .unwrap()
}

fn strings(v: &[OsString]) -> Vec<&str> {
    v.iter().map(|s| s.to_str().unwrap()).collect()
}

/// The runtime mounts `ctr run` (containerd 1.6's default spec) lists,
/// and a `/run` tmpfs as Docker adds one.
const CTR_DEFAULTS: &str = r#"[
    {"destination":"/proc","type":"proc","source":"proc","options":["nosuid","noexec","nodev"]},
    {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]},
    {"destination":"/dev/pts","type":"devpts","source":"devpts","options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620","gid=5"]},
    {"destination":"/dev/shm","type":"tmpfs","source":"shm","options":["nosuid","noexec","nodev","mode=1777","size=65536k"]},
    {"destination":"/dev/mqueue","type":"mqueue","source":"mqueue","options":["nosuid","noexec","nodev"]},
    {"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]},
    {"destination":"/run","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]},
    {"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["nosuid","noexec","nodev","relatime","ro"]}
]"#;

#[test]
fn the_runtime_s_own_mounts_are_left_to_the_guest_and_tmpfs_kept() {
    let a = mount_args(&spec_with(CTR_DEFAULTS), Path::new("/b")).unwrap();
    assert_eq!(
        strings(&a),
        [
            "--tmpfs",
            "/dev/shm:nosuid,noexec,nodev,mode=1777,size=65536k",
            "--tmpfs",
            "/run:nosuid,strictatime,mode=755,size=65536k",
        ]
    );
    // A spec without mounts has none to pass.
    let none: Spec = serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap();
    assert!(mount_args(&none, Path::new("/b")).unwrap().is_empty());
}

#[test]
fn bind_mounts_of_directories_and_files_become_shares() {
    let d = scratch("binds");
    std::fs::create_dir_all(d.join("vol")).unwrap();
    std::fs::create_dir_all(d.join("secret")).unwrap();
    std::fs::write(d.join("resolv.conf"), "nameserver 10.96.0.10\n").unwrap();
    std::fs::write(d.join("in-bundle"), "x").unwrap();
    let m = format!(
        r#"[
        {{"destination":"/data","type":"bind","source":"{v}","options":["rbind","rw"]}},
        {{"destination":"/var/run/secrets/kubernetes.io/serviceaccount","type":"bind","source":"{s}","options":["rbind","rprivate","ro"]}},
        {{"destination":"/etc/resolv.conf","type":"bind","source":"{r}","options":["rbind","rprivate"]}},
        {{"destination":"/etc/../../x/./y","source":"in-bundle","options":["bind","ro"]}},
        {{"destination":"/dev/shm","type":"bind","source":"{d}","options":["rbind","rw"]}}
    ]"#,
        v = d.join("vol").display(),
        s = d.join("secret").display(),
        r = d.join("resolv.conf").display(),
        d = d.display(),
    );
    let a = mount_args(&spec_with(&m), &d).unwrap();
    let share = |src: &Path, rest: &str| format!("{}:{rest}", src.display());
    assert_eq!(
        strings(&a),
        [
            "--share",
            &share(&d.join("vol"), "/data"),
            "--share",
            &share(
                &d.join("secret"),
                "/var/run/secrets/kubernetes.io/serviceaccount:ro"
            ),
            "--share",
            &share(&d.join("resolv.conf"), "/etc/resolv.conf"),
            // A relative source is the bundle's; `..` stops at `/`.
            "--share",
            &share(&d.join("in-bundle"), "/x/y:ro"),
            // CRI's pod-wide shm: the guest's own tmpfs.
            "--tmpfs",
            "/dev/shm:mode=1777,nosuid,nodev",
        ]
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_missing_source_or_an_unknown_type_fails_create() {
    let d = scratch("bad");
    let missing = spec_with(&format!(
        r#"[{{"destination":"/data","type":"bind","source":"{}","options":["rbind"]}}]"#,
        d.join("nothing").display()
    ));
    let e = mount_args(&missing, &d).unwrap_err();
    assert!(matches!(e, SpecError::MountSource { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("/data") && text.contains("nothing") && text.contains("No such file"),
        "{text}"
    );
    let no_source = spec_with(r#"[{"destination":"/data","type":"bind","options":["rbind"]}]"#);
    assert!(matches!(
        mount_args(&no_source, &d),
        Err(SpecError::MountSource { .. })
    ));
    let device = spec_with(r#"[{"destination":"/n","type":"bind","source":"/dev/null"}]"#);
    let e = mount_args(&device, &d).unwrap_err().to_string();
    assert!(e.contains("neither a directory nor a regular file"), "{e}");
    let nfs = spec_with(r#"[{"destination":"/mnt","type":"nfs","source":"srv:/x"}]"#);
    assert_eq!(
        mount_args(&nfs, &d),
        Err(SpecError::UnsupportedMount {
            destination: "/mnt".into(),
            typ: "nfs".into()
        })
    );
    // A source whose path capsule's option cannot carry.
    std::fs::create_dir_all(d.join("a:b")).unwrap();
    let colon = spec_with(&format!(
        r#"[{{"destination":"/c","type":"bind","source":"{}"}}]"#,
        d.join("a:b").display()
    ));
    let e = mount_args(&colon, &d).unwrap_err().to_string();
    assert!(e.contains("':'"), "{e}");
    // NUL bytes never reach capsule's command line (nor panic).
    let nul = spec_with(r#"[{"destination":"/x\u0000y","type":"bind","source":"/tmp"}]"#);
    assert!(matches!(
        mount_args(&nul, &d),
        Err(SpecError::Destination { .. })
    ));
    let nul = spec_with(r#"[{"destination":"/x","type":"bind","source":"/tmp\u0000y"}]"#);
    assert!(matches!(
        mount_args(&nul, &d),
        Err(SpecError::MountSource { .. })
    ));
    // Nothing over the root itself.
    let root = spec_with(&format!(
        r#"[{{"destination":"/..","type":"bind","source":"{}"}}]"#,
        d.display()
    ));
    assert!(matches!(
        mount_args(&root, &d),
        Err(SpecError::Destination { .. })
    ));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn too_many_mounts_are_refused() {
    let d = scratch("many");
    std::fs::write(d.join("f"), "").unwrap();
    let list = |n: usize, src: &Path| {
        let m: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"destination":"/m{i}","type":"bind","source":"{}"}}"#,
                    src.display()
                )
            })
            .collect();
        spec_with(&format!("[{}]", m.join(",")))
    };
    // Files take no device each: up to 64 of them.
    assert_eq!(
        mount_args(&list(MAX_MOUNTS, &d.join("f")), &d)
            .unwrap()
            .len(),
        2 * MAX_MOUNTS
    );
    assert_eq!(
        mount_args(&list(MAX_MOUNTS + 1, &d.join("f")), &d),
        Err(SpecError::TooManyMounts {
            count: MAX_MOUNTS + 1,
            max: MAX_MOUNTS
        })
    );
    assert!(mount_args(&list(MAX_DIR_SHARES, &d), &d).is_ok());
    let e = mount_args(&list(MAX_DIR_SHARES + 1, &d), &d).unwrap_err();
    assert!(e.to_string().contains("virtio-fs device"), "{e}");
    // The runtime's own mounts do not count.
    let defaults: Vec<&str> = CTR_DEFAULTS
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .lines()
        .filter(|l| l.contains("destination"))
        .map(|l| l.trim().trim_end_matches(','))
        .collect();
    let many: Vec<String> = (0..MAX_MOUNTS - 2)
        .map(|i| format!(r#"{{"destination":"/t{i}","type":"tmpfs"}}"#))
        .chain(defaults.iter().map(|s| s.to_string()))
        .collect();
    assert!(mount_args(&spec_with(&format!("[{}]", many.join(","))), &d).is_ok());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn destinations_are_normalised_inside_the_root() {
    for (dest, want) in [
        ("/etc/resolv.conf", "/etc/resolv.conf"),
        ("etc/hosts", "/etc/hosts"),
        ("/../../../etc/passwd", "/etc/passwd"),
        ("/a/./b//c/../d", "/a/b/d"),
    ] {
        assert_eq!(normalise(Path::new(dest)).as_deref(), Ok(want), "{dest}");
    }
    for bad in ["/", "/..", "", "/a/..", "/a:b", "/a\0b"] {
        assert!(normalise(Path::new(bad)).is_err(), "{bad}");
    }
}
