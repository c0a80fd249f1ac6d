#!/usr/bin/env bash
# resources/bench-net.sh: network throughput benchmark, capsule vs QEMU.
#
# Builds capsule, the guest kernel and initramfs (cached), then runs
# resources/bench-net-guest.sh where /dev/kvm is real: directly on a host
# with hardware KVM, else inside the nested L1 guest, with
# qemu-system-x86_64 (and its shared libraries and firmware) copied in.
# Both VMMs boot the same guest with virtio-net on a TAP device; the table
# at the end gives TCP throughput guest→host and host→guest. Under the
# nested harness the figures are TCG figures: compare the rows, not the
# absolute numbers.
#
# Usage: resources/bench-net.sh
# Env:   BENCH_MIB (MiB per transfer, default 256), BENCH_RUNS (default 1),
#        CAPSULE_HARNESS=direct|nested, CAPSULE_CACHE
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
resources="$CAPSULE_RESOURCES_DIR"

"$resources/install-deps.sh"
export CAPSULE_SKIP_DEPS=1
capsule="$("$resources/build-capsule.sh")"
kdir="$("$resources/build-guest-kernel.sh")"
initrd="$("$resources/build-guest-initramfs.sh")"
mode="$("$resources/harness/mode.sh")"
log "mode: $mode"

work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-net.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [[ "$mode" == direct ]]; then
    CAPSULE="$capsule" BZIMAGE="$kdir/bzImage" INITRD="$initrd" \
        QEMU=qemu-system-x86_64 QEMU_FIRMWARE=/usr/share/qemu \
        BENCH_MIB="${BENCH_MIB:-256}" BENCH_RUNS="${BENCH_RUNS:-1}" \
        sh "$resources/bench-net-guest.sh"
    exit
fi

# QEMU for L1: the binary with its libraries, run through their loader,
# and the firmware a -kernel boot of the pc machine needs.
q="$work/qemu"
mkdir -p "$q/bin" "$q/lib" "$q/firmware"
qemu_bin="$(command -v qemu-system-x86_64)"
cp -L "$qemu_bin" "$q/bin/"
ldd "$qemu_bin" | awk '/=>/ { print $3 } /^\t\// { print $1 }' | while read -r lib; do
    [[ -n "$lib" ]] && cp -L "$lib" "$q/lib/"
done
for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
    /usr/share/qemu/kvmvapic.bin; do
    cp -L "$f" "$q/firmware/"
done
cat >"$q/qemu" <<'EOF'
#!/bin/sh
d="$(cd "$(dirname "$0")" && pwd)"
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/bin/qemu-system-x86_64" "$@"
EOF
chmod 755 "$q/qemu"

cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
export CAPSULE=/capsule/capsule BZIMAGE=/capsule/bzImage INITRD=/capsule/initramfs.cpio.gz
export QEMU=/capsule/qemu/qemu QEMU_FIRMWARE=/capsule/qemu/firmware
export BENCH_MIB='${BENCH_MIB:-256}' BENCH_RUNS='${BENCH_RUNS:-1}'
exec sh /capsule/bench-net-guest.sh
EOF
CAPSULE_L1_TIMEOUT="${CAPSULE_L1_TIMEOUT:-1800}" "$resources/harness/run-in-l1.sh" \
    "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$initrd" "$q" \
    "$resources/bench-net-guest.sh" </dev/null | tr -d '\r' | grep -E '^bench-net:|^capsule-l1:|CAPSULE-L1-EXIT'
