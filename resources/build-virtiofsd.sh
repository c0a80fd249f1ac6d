#!/usr/bin/env bash
# resources/build-virtiofsd.sh: the Rust virtiofsd (vhost-user virtio-fs
# daemon) for `--fs` and `capsule exec --share/--host-root`, built from a
# pinned crates.io release.
#
# Why not Debian 12's /usr/lib/qemu/virtiofsd: that is the old C daemon; it
# has no read-only mode, so `--fs DIR:TAG,ro` could only ask the guest to
# behave. The Rust daemon refuses writes itself (`--readonly`).
#
# Built once with `cargo install --locked` (libseccomp-dev and libcap-ng-dev
# installed first) into ${CAPSULE_CACHE:-~/.cache/capsule}/virtiofsd/<key>/,
# keyed by the version and this script, with the shared libraries it needs
# beside it (bin/, lib/) and a wrapper `virtiofsd` that runs it through the
# copied dynamic loader, so that the same directory also runs in the nested
# harness's busybox L1.
#
# Give it to capsule with CAPSULE_VIRTIOFSD=<printed path>.
#
# Usage: resources/build-virtiofsd.sh      prints the path of the wrapper
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
    "$CAPSULE_RESOURCES_DIR/install-deps.sh"
fi

version="1.14.0"
key="$(hash_inputs "$version" "${BASH_SOURCE[0]}")"
final="$(capsule_cache_root)/virtiofsd/$key"
cache_lock virtiofsd
exit_if_cached "$final/virtiofsd"

tmp="$(cache_tmpdir "$final")"
trap 'rm -rf "$tmp"' EXIT

log "building virtiofsd $version (cargo install --locked; a few minutes)"
CARGO_TARGET_DIR="$tmp/target" cargo install --quiet --locked --version "=$version" \
    --root "$tmp/root" virtiofsd >"$tmp/build.log" 2>&1 || {
    tail -n 20 "$tmp/build.log" >&2
    die "building virtiofsd $version failed"
}
mkdir -p "$tmp/out/bin" "$tmp/out/lib"
install -m 755 "$tmp/root/bin/virtiofsd" "$tmp/out/bin/virtiofsd"
while read -r lib; do
    [[ -z "$lib" ]] || cp -L "$lib" "$tmp/out/lib/"
done < <(ldd "$tmp/out/bin/virtiofsd" | awk '/=>/ { print $3 } /^\t\// { print $1 }')
cat >"$tmp/out/virtiofsd" <<'WRAP'
#!/bin/sh
d="$(cd "$(dirname "$0")" && pwd)"
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/bin/virtiofsd" "$@"
WRAP
chmod 755 "$tmp/out/virtiofsd"
"$tmp/out/virtiofsd" --version >/dev/null || die "the built virtiofsd does not run"
rm -rf "$tmp/target" "$tmp/root"
cache_publish "$tmp/out" "$final"
log "built $final/virtiofsd"
echo "$final/virtiofsd"
