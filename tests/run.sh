#!/usr/bin/env bash
# tests/run.sh: capsule's whole test suite, as README.md and CI run it.
#
#  1. formatting and lints (cargo fmt --check, clippy -D warnings)
#  2. unit tests and the VMM tests on /dev/kvm with tiny guests (cargo test)
#  3. the boot tests with real Linux guests (tests/boot/run.sh), directly on
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

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc -D warnings (broken doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (unit tests, VMM tests on /dev/kvm)"
cargo test --workspace --locked

step "boot tests (real Linux guests)"
tests/boot/run.sh
