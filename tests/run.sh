#!/usr/bin/env bash
# tests/run.sh: capsule's whole test suite, as README.md and CI run it.
#
#  1. formatting and lints (cargo fmt --check, clippy -D warnings)
#  2. unit tests and the VMM tests on /dev/kvm with tiny guests (cargo test)
#  3. a short run of every fuzz target (fuzz/run-all.sh; docs/fuzzing.md)
#  4. the boot tests with real Linux guests (tests/boot/run.sh), directly on
#     hardware KVM or inside the nested QEMU-TCG harness, chosen by itself
#
# Any failure stops the run with a non-zero status. Guest kernels and images
# are cached under ${CAPSULE_CACHE:-~/.cache/capsule}, so reruns are fast.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "dependencies"
resources/install-deps.sh
export CAPSULE_SKIP_DEPS=1

step "cargo fmt --check"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc -D warnings (broken doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (unit tests, VMM tests on /dev/kvm)"
cargo test --workspace --locked

# Each fuzz target starts from its checked-in seeds, so a change that
# crashes on one of them (or on what the fuzzer finds within seconds) fails
# here. The fuzz build is its own (fuzz/build.sh: $CARGO_TARGET_DIR/fuzz, or
# target/fuzz; cold, 3.5 CPU-minutes, so about 2 minutes of the 4 this step
# may take) and goes
# first, as it also brings fuzz/Cargo.lock up to date. Then the harness's
# own tests (a seed request must complete, or the fuzzer would only
# exercise the set-up), built in the workspace's target directory, whose
# debug artifacts they share.
step "fuzz smoke run (${CAPSULE_FUZZ_SECS:=10} s per target)"
fuzz/build.sh >/dev/null
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" cargo test --manifest-path fuzz/Cargo.toml --locked --lib
fuzz/run-all.sh "$CAPSULE_FUZZ_SECS"

step "boot tests (real Linux guests)"
tests/boot/run.sh
