//! What the snapshot tests share: the tiny guests they snapshot, the
//! capsule binary and the files a snapshot leaves.
#![allow(
    clippy::cast_possible_truncation,
    reason = "the guests' jumps are short, known offsets"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use capsule::snapshot::format;
use std::time::{Duration, Instant};

use super::api::Vmm;
use super::{elf, rel8};

/// The guest: `bl` = 'a'; loop { out COM1, bl; bl = next letter (z wraps
/// to a); short delay }.
pub fn alphabet_guest() -> Vec<u8> {
    let mut c = vec![0xb3, b'a']; // mov bl, 'a'
    let top = c.len();
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend([0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
    c.extend([0xfe, 0xc3]); // inc bl
    c.extend([0x80, 0xfb, b'z' + 1, 0x75, 0x02, 0xb3, b'a']); // cmp bl, 'z'+1; jne +2; mov bl, 'a'
    c.extend([0xb9, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xfc]); // delay loop
    let j = c.len();
    c.extend([0xeb, rel8(top, j + 2)]); // jmp top
    elf(&c)
}

pub fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("snapshot-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `capsule ARGS`, stdin null, to completion.
pub fn capsule(args: &[&str]) -> Output {
    super::run::capsule(args, None)
}

pub use super::run::ok;

pub fn logs(name: &str) -> String {
    String::from_utf8_lossy(&capsule(&["logs", name]).stdout).into_owned()
}

pub fn next_letter(c: char) -> char {
    if c == 'z' {
        'a'
    } else {
        (c as u8 + 1) as char
    }
}

/// Waits until `name`'s console log has at least `n` bytes.
pub fn wait_output(name: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = logs(name);
        if l.len() >= n {
            return l;
        }
        assert!(Instant::now() < deadline, "{name} printed only {l:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest of the Diff test: prints the letter kept at 0x30_0000 (so
/// that the letter lives in memory, not in a register) and moves it on,
/// and counts its rounds in the u32 at 0x30_1000.
pub fn memory_guest() -> Vec<u8> {
    let mut c = vec![0x48, 0xc7, 0xc6, 0x00, 0x00, 0x30, 0x00]; // mov rsi, 0x300000
    c.extend([0xc6, 0x06, b'a']); // mov byte [rsi], 'a'
    let top = c.len();
    c.extend([0x8a, 0x06]); // mov al, [rsi]
    c.extend([0x66, 0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
    c.extend([0xfe, 0xc0, 0x3c, b'z' + 1, 0x75, 0x02, 0xb0, b'a']); // next letter, z wraps
    c.extend([0x88, 0x06]); // mov [rsi], al
    c.extend([0xff, 0x86, 0x00, 0x10, 0x00, 0x00]); // inc dword [rsi+0x1000]
    c.extend([0xb9, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xfc]); // delay loop
    let j = c.len();
    c.extend([0xeb, rel8(top, j + 2)]); // jmp top
    elf(&c)
}

/// The u32 at guest address `gpa` in a memory file (RAM starts at 0).
pub fn mem_u32(dir: &Path, gpa: u64) -> u32 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dir.join("memory")).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, gpa).unwrap();
    u32::from_le_bytes(b)
}

/// The JSON state of snapshot directory `dir`.
pub fn state_json(dir: &Path) -> serde_json::Value {
    let bytes = std::fs::read(dir.join("snapshot")).unwrap();
    serde_json::from_slice(&bytes[24..]).unwrap()
}

/// Runs the guest `kernel` detached as `name`, its console on COM1, with
/// `more` arguments to `run`.
pub fn run_detached(name: &str, kernel: &Path, more: &[&str]) {
    let k = kernel.to_str().unwrap();
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--kernel",
        k,
        "--cmdline",
        "console=ttyS0",
    ];
    args.extend(more);
    ok(&capsule(&args));
}

/// Restores the snapshot `dir` detached as `name`, with `more` arguments
/// to `run` (`--base`, `--vsock`, ...).
pub fn restore_detached(dir: &Path, name: &str, more: &[&str]) {
    let mut args = vec![
        "run",
        "-d",
        "--restore",
        dir.to_str().unwrap(),
        "--name",
        name,
    ];
    args.extend(more);
    ok(&capsule(&args));
}

/// Pauses `name`; returns the last letter it printed.
pub fn pause_after_a_letter(name: &str) -> char {
    ok(&capsule(&["pause", name]));
    logs(name).chars().last().expect("output")
}

/// Snapshots `name` into `dir` (emptied first), with `more` arguments
/// (`--stop`, `--diff`).
pub fn snapshot_into(name: &str, dir: &Path, more: &[&str]) {
    let _ = std::fs::remove_dir_all(dir);
    let mut args = vec!["snapshot", name, dir.to_str().unwrap()];
    args.extend(more);
    ok(&capsule(&args));
}

/// Whether `path` holds at least `n` bytes within 30 s.
pub fn wait_file_len(path: &Path, n: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(path).map_or(0, |m| m.len()) < n {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// `capsule run --api-sock SOCK` with `env` added and stdout, stderr as
/// given: a process of the test's own, killed when dropped.
pub fn api_vm(sock: PathBuf, env: &[(&str, &str)], stdout: Stdio, stderr: Stdio) -> Vmm {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsule"));
    command
        .args(["run", "--api-sock"])
        .arg(&sock)
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(stderr);
    Vmm::spawn(command, sock)
}

/// A copy of snapshot `dir` as `tag` whose state `edit` changed, written
/// with a right checksum (and the format version `version`).
pub fn edited(
    dir: &Path,
    tag: &str,
    version: u32,
    edit: &dyn Fn(&mut serde_json::Value),
) -> PathBuf {
    let d = tmp(tag);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(dir.join("memory"), d.join("memory")).unwrap();
    let mut state: serde_json::Value = format::read(&dir.join("snapshot")).unwrap();
    edit(&mut state);
    let mut bytes = format::encode(&state).unwrap();
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    std::fs::write(d.join("snapshot"), bytes).unwrap();
    d
}

/// Boots the alphabet guest over the API as `name`, configured by the
/// `puts` (path, body) on top of its boot source and changed by the
/// `patches` once it runs, pauses it and snapshots it (`PUT
/// /snapshot/create`) into the directory `name` in [`tmp`], which it
/// returns. The VM is gone on return (its disks unlocked).
pub fn snapshot_over_api(
    name: &str,
    puts: &[(&str, String)],
    patches: &[(&str, String)],
) -> PathBuf {
    let kernel = tmp(&format!("{name}.elf"));
    std::fs::write(&kernel, alphabet_guest()).unwrap();
    let dir = tmp(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let vm = api_vm(
        tmp(&format!("{name}.sock")),
        &[],
        Stdio::null(),
        Stdio::null(),
    );
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    let start = r#"{"action_type": "InstanceStart"}"#.to_string();
    let pause = r#"{"state":"Paused"}"#.to_string();
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.join("snapshot").display(),
        dir.join("memory").display()
    );
    let steps = [("PUT", "/boot-source", &boot)]
        .into_iter()
        .chain(puts.iter().map(|(path, body)| ("PUT", *path, body)))
        .chain([("PUT", "/actions", &start)])
        .chain(patches.iter().map(|(path, body)| ("PATCH", *path, body)))
        .chain([
            ("PATCH", "/vm", &pause),
            ("PUT", "/snapshot/create", &create),
        ]);
    for (method, path, body) in steps {
        let (st, resp) = vm.req(method, path, Some(body));
        assert_eq!(st, 204, "{method} {path}: {resp}");
    }
    dir
}

/// A new capsule serving the API as `name` (its console to `out`, its
/// log at `info` to `err`), with the snapshot in `dir` loaded and
/// resumed (`PUT /snapshot/load`).
pub fn load_over_api(dir: &Path, name: &str, out: &Path, err: &Path) -> Vmm {
    load_over_api_with(dir, name, out, err, "")
}

/// [`load_over_api`] with `more` fields in the load's body (`,
/// "track_dirty_pages": true`, ...).
pub fn load_over_api_with(dir: &Path, name: &str, out: &Path, err: &Path, more: &str) -> Vmm {
    let vm = api_vm(
        tmp(&format!("{name}.sock")),
        &[("CAPSULE_LOG", "info")],
        std::fs::File::create(out).unwrap().into(),
        std::fs::File::create(err).unwrap().into(),
    );
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "resume_vm": true{more}}}"#,
        dir.join("snapshot").display(),
        dir.join("memory").display()
    );
    let (st, body) = vm.req("PUT", "/snapshot/load", Some(&load));
    let log = std::fs::read_to_string(err).unwrap_or_default();
    assert_eq!(st, 204, "{body}\n{log}");
    vm
}
