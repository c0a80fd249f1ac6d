#!/usr/bin/env bash
# resources/release.sh: the files to attach to a capsule release.
#
# Builds capsule statically linked (glibc's static libraries, from
# libc6-dev; the guest init inside it is static too) with the locked
# dependencies, checks that it has no program interpreter and runs, and
# writes into OUTDIR (default dist/):
#   capsule-VERSION-x86_64-linux          the binary
#   capsule-VERSION-x86_64-linux.sha256   its checksum (`sha256sum -c` format)
# VERSION is Cargo.toml's version, plus `git describe` when the tree is not
# exactly at a tag.
#
# Usage: resources/release.sh [OUTDIR]
# Env:   CARGO (default cargo), CARGO_TARGET_DIR (honoured)
# Prints the binary's path on stdout; progress on stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
    local out="${1:-$CAPSULE_REPO_DIR/dist}"
    local target=x86_64-unknown-linux-gnu
    local cargo="${CARGO:-cargo}"
    command -v "$cargo" >/dev/null || die "cargo not found"
    command -v sha256sum >/dev/null || die "sha256sum not found"

    cd "$CAPSULE_REPO_DIR"
    local version
    version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
    [[ -n "$version" ]] || die "no version in Cargo.toml"
    local described
    if described="$(git describe --tags --exact-match 2>/dev/null)"; then
        :
    elif described="$(git describe --always --dirty 2>/dev/null)"; then
        version="$version+$described"
    fi

    log "cargo build --release --locked --target $target (static), version $version"
    RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
        "$cargo" build --release --locked --target "$target" --bin capsule >&2
    local target_dir
    target_dir="$("$cargo" metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    local bin="${target_dir:-$CAPSULE_REPO_DIR/target}/$target/release/capsule"
    [[ -x "$bin" ]] || die "build produced no $bin"
    file_is_static "$bin" || die "$bin is dynamically linked (is libc6-dev installed?)"
    "$bin" --version >/dev/null || die "$bin does not run"

    mkdir -p "$out"
    local name="capsule-$version-x86_64-linux"
    cp "$bin" "$out/$name"
    (cd "$out" && sha256sum "$name" >"$name.sha256" && sha256sum -c --quiet "$name.sha256")
    log "wrote $out/$name ($(du -h "$out/$name" | cut -f1)) and $name.sha256"
    echo "$out/$name"
}

main "$@"
