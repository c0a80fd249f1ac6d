#!/usr/bin/env bash
# fuzz/build.sh: builds the fuzz targets (all, or those named) with
# libFuzzer's coverage instrumentation on the stable toolchain.
#
# libfuzzer-sys compiles libFuzzer itself (C++, with the system g++); the
# instrumentation is LLVM's SanitizerCoverage, asked for with stable
# -C passes / -C llvm-args flags (what cargo-fuzz passes, minus the
# nightly-only -Z sanitizer). --target keeps these flags off build scripts
# and proc macros. Artifacts go to $CARGO_TARGET_DIR/fuzz (or
# <repo>/target/fuzz), outside the clone when CARGO_TARGET_DIR is set.
# CAPSULE_FUZZ_PROFILE picks the cargo profile: release (the default, for
# campaigns) or smoke (fuzz/Cargo.toml: quicker to build, for CI's
# seconds-long runs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../target}/fuzz"
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers"
bins=()
for t in "$@"; do bins+=(--bin "$t"); done
cd "$here"
# fuzz/Cargo.lock is this crate's own (it is not a workspace member). When
# capsule gains a dependency it falls behind; then let cargo add what is
# missing, keeping every version it already pins, and say so.
if ! cargo metadata --locked --format-version 1 >/dev/null 2>&1; then
    echo "fuzz/build.sh: fuzz/Cargo.lock is behind capsule's dependencies; updating it (commit fuzz/Cargo.lock)" >&2
    cargo metadata --format-version 1 >/dev/null
fi
profile="${CAPSULE_FUZZ_PROFILE:-release}"
nice -n 19 cargo build --profile "$profile" --locked --target "$triple" "${bins[@]}" >&2
echo "$CARGO_TARGET_DIR/$triple/$profile"
