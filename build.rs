//! Builds the guest init (`guest-init`, binary `capsule-init`) as a static
//! binary and puts it in OUT_DIR, where `src/exec/mod.rs` embeds it with
//! `include_bytes!`.
//!
//! The init is built by a nested `cargo build --release --locked --offline`
//! into its own target directory under OUT_DIR (so it does not contend for
//! the outer build's lock), for x86_64-unknown-linux-gnu with
//! `+crt-static`, whatever flags the outer build uses. Its only dependency,
//! libc, is already in the lock file and downloaded for capsule itself, so
//! the nested build never needs the network.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for p in [
        "guest-init/src",
        "guest-init/Cargo.toml",
        "exec-proto/src",
        "exec-proto/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out.join("guest-init-target");
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "--offline",
            "-p",
            "guest-init",
        ])
        .args(["--bin", "capsule-init", "--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        // The outer build's flags and wrappers (clippy, coverage) are not
        // for the init; it gets exactly these.
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-feature=+crt-static\x1f-Cstrip=symbols",
        )
        .status()
        .expect("cannot run cargo to build the guest init");
    assert!(
        status.success(),
        "building the guest init (guest-init) failed"
    );
    let bin = target_dir.join(TARGET).join("release").join("capsule-init");
    std::fs::copy(&bin, out.join("capsule-init"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", bin.display()));
}
