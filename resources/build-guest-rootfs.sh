#!/usr/bin/env bash
# resources/build-guest-rootfs.sh: an ext4 root filesystem image for disk
# tests and for booting with `--disk IMG --cmdline "... root=/dev/vda"`.
#
# The image holds the static busybox and an /sbin/init that mounts the
# pseudo filesystems, prints
#     capsule-guest: ready kernel=<release> cpus=<n> root=<root device>
# and runs a shell on the console; `poweroff -f` ends the VM. It is made
# without root privileges with `mkfs.ext4 -d` and cached under
# ${CAPSULE_CACHE:-~/.cache/capsule}/guest-rootfs/<key>/rootfs.ext4, keyed by
# the busybox version and this script. Use a copy: tests write to it.
#
# Usage: resources/build-guest-rootfs.sh      prints the image path
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
    "$CAPSULE_RESOURCES_DIR/install-deps.sh"
fi

size_mib=64
bb_version="$(dpkg-query -W -f='${Version}' busybox-static)"
key="$(hash_inputs "busybox-static=$bb_version" "size=$size_mib" "${BASH_SOURCE[0]}" \
    "$CAPSULE_RESOURCES_DIR/lib.sh")"
final="$(capsule_cache_root)/guest-rootfs/$key"

exit_if_cached "$final/rootfs.ext4"

tmp="$(cache_tmpdir "$final")"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
out="$tmp/out"
mkdir -p "$out"

log "populating busybox root (busybox-static $bb_version)"
populate_busybox_root "$root"

{
    echo '#!/bin/sh'
    guest_init_common
    cat <<'INIT'
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname capsule-guest
rootdev="$(awk '$2 == "/" && $1 != "rootfs" {print $1}' /proc/mounts | tail -n 1)"
echo "capsule-guest: ready kernel=$(uname -r) cpus=$(nproc) root=$rootdev"
cd /root
setsid cttyhack sh -l
sync
poweroff -f
INIT
} >"$root/sbin/init"
chmod 755 "$root/sbin/init"
printf 'export PS1='\''capsule-guest:\\w# '\''\n' >"$root/etc/profile"
echo "written on the host by build-guest-rootfs.sh" >"$root/root/hello.txt"

truncate -s "${size_mib}M" "$out/rootfs.ext4"
mkfs.ext4 -q -F -L capsule-root -E root_owner=0:0 -d "$root" "$out/rootfs.ext4"
cache_publish "$out" "$final"
log "built $final/rootfs.ext4 (${size_mib} MiB)"
echo "$final/rootfs.ext4"
