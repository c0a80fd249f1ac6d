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
nice -n 19 cargo build --release --locked --target "$triple" "${bins[@]}" >&2
echo "$CARGO_TARGET_DIR/$triple/release"
