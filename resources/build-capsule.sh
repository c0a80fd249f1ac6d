#!/usr/bin/env bash
# resources/build-capsule.sh: build a statically linked capsule binary.
#
# Runs, in the repository root,
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --target x86_64-unknown-linux-gnu \
#       --bin capsule --bin capsule-vsock --bin capsule-api-probe
# (glibc static libraries come from libc6-dev) and checks that the result
# has no program interpreter, so it can be copied alone into the L1 guest of
# the nested harness. Cargo's own incremental build is the cache.
#
# Usage: resources/build-capsule.sh
# Env:   CARGO (default cargo), CAPSULE_SKIP_DEPS=1 (skip install-deps)
# Prints the path of the capsule binary on stdout; capsule-vsock (the boot
# tests' vsock relay) and capsule-api-probe (bench-boot's API timer) are
# next to it.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
    "$CAPSULE_RESOURCES_DIR/install-deps.sh"
fi

target=x86_64-unknown-linux-gnu
cargo="${CARGO:-cargo}"
command -v "$cargo" >/dev/null || die "cargo not found"

log "cargo build --release --target $target (static)"
(
    cd "$CAPSULE_REPO_DIR"
    RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
        "$cargo" build --release --target "$target" -p capsule -p guest-init \
            --bin capsule --bin capsule-vsock --bin capsule-api-probe >&2
)
target_dir="$(cd "$CAPSULE_REPO_DIR" && "$cargo" metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="${target_dir:-$CAPSULE_REPO_DIR/target}/$target/release/capsule"
[[ -x "$bin" ]] || die "build produced no $bin"
file_is_static "$bin" || die "$bin is dynamically linked (is libc6-dev installed?)"
# The boot tests' vsock relay (guest-init/src/vsock_tool.rs) lies next to it.
file_is_static "$(dirname "$bin")/capsule-vsock" || die "no static capsule-vsock next to $bin"
log "built $bin"
echo "$bin"
