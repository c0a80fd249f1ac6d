#!/usr/bin/env bash
# resources/build-containerd-shim.sh: what the containerd boot cases carry
# into L1. Builds the static `containerd-shim-capsule-v2` (a static binary:
# the shim re-executes itself, so it cannot run through copy_tools' loader
# wrapper) and unpacks Debian's containerd package (containerd, ctr) into
# the cache, without installing it on this host (no daemon is started here).
#
# Prints one directory holding containerd-shim-capsule-v2 and
# containerd/usr/bin/{containerd,ctr}.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

target=x86_64-unknown-linux-gnu
cargo="${CARGO:-cargo}"
command -v "$cargo" >/dev/null || die "cargo not found"

log "cargo build --release --target $target -p containerd-shim-capsule-v2 (static)"
(
    cd "$CAPSULE_REPO_DIR"
    RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
        "$cargo" build --locked --release --target "$target" -p containerd-shim-capsule-v2 >&2
)
target_dir="$(cd "$CAPSULE_REPO_DIR" && "$cargo" metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
shim="${target_dir:-$CAPSULE_REPO_DIR/target}/$target/release/containerd-shim-capsule-v2"
[[ -x "$shim" ]] || die "build produced no $shim"
file_is_static "$shim" || die "$shim is dynamically linked (is libc6-dev installed?)"

pkg=containerd
version="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
[[ -n "$version" && "$version" != "(none)" ]] || die "apt knows no $pkg (apt-get update?)"
key="$(hash_inputs "$pkg=$version" "${BASH_SOURCE[0]}")"
final="$(capsule_cache_root)/containerd/$key"
if [[ ! -x "$final/usr/bin/containerd" ]]; then
    tmp="$(cache_tmpdir "$final")"
    dl="$(mktemp -d)"
    trap 'rm -rf "$tmp" "$dl"' EXIT
    chmod 755 "$dl"
    chown _apt "$dl" 2>/dev/null || true
    log "downloading $pkg $version"
    (cd "$dl" && apt-get -q download "$pkg=$version" >&2)
    deb="$(find "$dl" -maxdepth 1 -name '*.deb' | head -n1)"
    [[ -n "$deb" ]] || die "apt-get download produced no .deb"
    dpkg -x "$deb" "$tmp"
    [[ -x "$tmp/usr/bin/containerd" && -x "$tmp/usr/bin/ctr" ]] || die "$pkg has no usr/bin/containerd and ctr"
    cache_publish "$tmp" "$final"
fi

out="$(dirname "$shim")/containerd-l1"
rm -rf "$out"
mkdir -p "$out"
cp "$shim" "$out/"
ln -s "$final" "$out/containerd"
log "shim $shim, $pkg $version in $final"
echo "$out"
