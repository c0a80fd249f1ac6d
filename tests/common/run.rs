//! Running the capsule binary (on a test guest) and collecting what it
//! printed.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use super::guest::{write_guest, Asm};

pub fn capsule(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(input).unwrap();
        // Keep the pipe open until capsule exits: EOF must not matter.
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(120));
            drop(s);
        });
    }
    child.wait_with_output().unwrap()
}

pub fn run_guest(name: &str, code: &Asm, extra: &[&str], stdin: Option<&[u8]>) -> Output {
    let kernel = write_guest(name, code);
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap()];
    args.extend(extra);
    let out = capsule(&args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked at"),
        "capsule panicked: {stderr}"
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// capsule with extra environment variables.
pub fn capsule_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run capsule")
}

/// Starts capsule on `kernel` with stdin piped (the guest of
/// [`poweroff_on_input_guest`] runs until a byte arrives).
pub fn spawn_capsule(args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsule")
}

/// Waits up to `secs` for `child` to end; kills it and fails otherwise.
pub fn wait_or_kill(mut child: std::process::Child, secs: u64) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "capsule still running after {secs} s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Asserts that a capsule run ended with status 0, showing its stderr if
/// not.
pub fn ok(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `capsule ls --json` entry of the VM `name`; panics if it is not
/// listed.
pub fn listed(name: &str) -> serde_json::Value {
    let out = capsule(&["ls", "--json"], None);
    let list: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("ls --json prints JSON");
    list.as_array()
        .expect("ls --json prints an array")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
        .clone()
}
