#!/usr/bin/env bash
# resources/harness/l1-qemu.sh: the QEMU that runs the nested harness's L1.
#
# CAPSULE_L1 (resources/harness/l1-config.sh) picks it:
#   qemu7-*   Debian 12's qemu-system-x86_64 (installed by install-deps.sh)
#   qemu10-*  qemu-system-x86 from bookworm-backports. It cannot be
#             installed beside Debian 12's QEMU (same package), so its
#             .debs (qemu-system-x86, qemu-system-data, seabios) are fetched
#             with `apt-get download` through a private apt source
#             (resources/harness/apt.sh) and unpacked with dpkg -x into
#             $CACHE/l1-qemu/<hash>/root; <hash> covers the package versions
#             and this script. Its shared libraries are Debian 12's, which
#             Debian 12's QEMU (install-deps.sh) already brings; a missing
#             one is an error naming it.
# Prints the path of a qemu-system-x86_64 to run (for QEMU 10 a wrapper
# that points -L at its own firmware directories).
#
# Usage: resources/harness/l1-qemu.sh
# Env:   CAPSULE_L1, CAPSULE_CACHE
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
# shellcheck source=resources/harness/l1-config.sh
source "$CAPSULE_RESOURCES_DIR/harness/l1-config.sh"
# shellcheck source=resources/harness/apt.sh
source "$CAPSULE_RESOURCES_DIR/harness/apt.sh"

if [[ "$L1_QEMU" == 7 ]]; then
    command -v qemu-system-x86_64 || die "qemu-system-x86_64 not found (package qemu-system-x86; resources/install-deps.sh)"
    exit 0
fi

suite="$(. /etc/os-release && echo "$VERSION_CODENAME")-backports"
private_apt "$suite" deb
packages=(qemu-system-x86 qemu-system-data seabios)
pins=()
for p in "${packages[@]}"; do
    v="$(apt-cache policy "$p" | sed -n 's/^ *Candidate: //p')"
    [[ -n "$v" && "$v" != "(none)" ]] || die "$suite has no $p"
    pins+=("$p=$v")
done
case "${pins[0]}" in
qemu-system-x86=1:10.*) ;;
*) die "$suite offers ${pins[0]}, not QEMU 10: update resources/harness/l1-qemu.sh" ;;
esac

key="$(hash_inputs "${pins[*]}" "${BASH_SOURCE[0]}")"
final="$(capsule_cache_root)/l1-qemu/$key"
if [[ -x "$final/qemu-system-x86_64" ]]; then
    log "cached: $final (${pins[0]})"
    echo "$final/qemu-system-x86_64"
    exit 0
fi

tmp="$(cache_tmpdir "$final")"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/dl" "$tmp/out"
log "downloading ${pins[*]} from $suite"
(cd "$tmp/dl" && apt-get -q download "${pins[@]}" >&2) || die "apt-get download ${pins[*]} failed"
for deb in "$tmp"/dl/*.deb; do
    dpkg -x "$deb" "$tmp/out/root"
done
bin="$tmp/out/root/usr/bin/qemu-system-x86_64"
[[ -x "$bin" ]] || die "no usr/bin/qemu-system-x86_64 in ${pins[0]}"
missing="$(ldd "$bin" | awk '/not found/ { print $1 }' | tr '\n' ' ')"
[[ -z "$missing" ]] || die "QEMU 10 needs libraries this machine lacks: $missing(install Debian 12's qemu-system-x86: resources/install-deps.sh)"
cat >"$tmp/out/qemu-system-x86_64" <<'WRAP'
#!/bin/sh
# QEMU from bookworm-backports, unpacked by resources/harness/l1-qemu.sh,
# with its own firmware (SeaBIOS, option ROMs) ahead of the system's.
d="$(cd "$(dirname "$0")" && pwd)"
exec "$d/root/usr/bin/qemu-system-x86_64" -L "$d/root/usr/share/qemu" -L "$d/root/usr/share/seabios" "$@"
WRAP
chmod 755 "$tmp/out/qemu-system-x86_64"
"$tmp/out/qemu-system-x86_64" --version | head -n1 | grep -q 'version 10\.' ||
    die "the unpacked QEMU does not run: $("$tmp/out/qemu-system-x86_64" --version 2>&1 | head -n1)"
cache_publish "$tmp/out" "$final"
log "QEMU ${pins[0]#*=} cached in $final"
echo "$final/qemu-system-x86_64"
