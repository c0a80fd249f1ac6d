#!/usr/bin/env bash
# resources/build-containerd-shim.sh: what the containerd boot cases carry
# into L1. Builds the static `containerd-shim-capsule-v2` (a static binary:
# the shim re-executes itself, so it cannot run through copy_tools' loader
# wrapper) and unpacks Debian's containerd package (containerd, ctr,
# containerd-shim-runc-v2) and runc package into the cache, without
# installing them on this host (no daemon is started here); runc is the
# baseline the containerd_runc case measures capsule against.
#
# Prints one directory holding containerd-shim-capsule-v2 and
# containerd/usr/{bin,sbin}/{containerd,ctr,containerd-shim-runc-v2,runc}.
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

pkgs=(containerd runc)
versions=()
for pkg in "${pkgs[@]}"; do
    version="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
    [[ -n "$version" && "$version" != "(none)" ]] || die "apt knows no $pkg (apt-get update?)"
    versions+=("$pkg=$version")
done
key="$(hash_inputs "${versions[@]}" "${BASH_SOURCE[0]}")"
final="$(capsule_cache_root)/containerd/$key"
if [[ ! -x "$final/usr/bin/containerd" ]]; then
    tmp="$(cache_tmpdir "$final")"
    dl="$(mktemp -d)"
    trap 'rm -rf "$tmp" "$dl"' EXIT
    chmod 755 "$dl"
    chown _apt "$dl" 2>/dev/null || true
    log "downloading ${versions[*]}"
    (cd "$dl" && apt-get -q download "${versions[@]}" >&2)
    for deb in "$dl"/*.deb; do
        [[ -f "$deb" ]] || die "apt-get download produced no .deb"
        dpkg -x "$deb" "$tmp"
    done
    for f in usr/bin/containerd usr/bin/ctr usr/bin/containerd-shim-runc-v2 usr/sbin/runc; do
        [[ -x "$tmp/$f" ]] || die "${versions[*]} have no $f"
    done
    cache_publish "$tmp" "$final"
fi
out="$(dirname "$shim")/containerd-l1"
rm -rf "$out"
mkdir -p "$out"
cp "$shim" "$out/"
ln -s "$final" "$out/containerd"
log "shim $shim, ${versions[*]} in $final"
echo "$out"
