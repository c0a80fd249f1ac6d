#!/usr/bin/env bash
# resources/bench-net.sh: network throughput benchmark, capsule vs QEMU.
#
# Builds capsule, the guest kernel and initramfs (cached), then runs
# resources/bench-net-guest.sh where /dev/kvm is real: directly on a host
# with hardware KVM, else inside the nested L1 guest, with
# qemu-system-x86_64 (and its shared libraries and microvm firmware) copied
# in. Both VMMs boot the same guest with a virtio-net device over
# virtio-mmio on a TAP device (QEMU: -M microvm, virtio-net-device, its
# userspace backend, vhost=off, as capsule has no vhost); the table
# at the end gives TCP throughput guest→host and host→guest. Under the
# nested harness the figures are TCG figures: compare the rows, not the
# absolute numbers.
#
# Usage: resources/bench-net.sh
# Env:   BENCH_MIB (MiB per transfer, default 64), BENCH_RUNS (default 10),
#        BENCH_DETAIL=1 (capsule's traffic and exit counters after its runs),
#        BENCH_VMMS (default "capsule qemu"),
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

copy_tools "$work/tools" qemu-system-x86_64
copy_qemu_firmware "$work/qemu-fw"

if [[ "$mode" == direct ]]; then
    CAPSULE="$capsule" BZIMAGE="$kdir/bzImage" INITRD="$initrd" \
        QEMU="$work/tools/qemu-system-x86_64" QEMU_FIRMWARE="$work/qemu-fw" \
        BENCH_MIB="${BENCH_MIB:-64}" BENCH_RUNS="${BENCH_RUNS:-10}" BENCH_DETAIL="${BENCH_DETAIL:-}" \
        BENCH_VMMS="${BENCH_VMMS:-capsule qemu}" sh "$resources/bench-net-guest.sh"
    exit
fi

cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
export CAPSULE=/capsule/capsule BZIMAGE=/capsule/bzImage INITRD=/capsule/initramfs.cpio.gz
export QEMU=/capsule/tools/qemu-system-x86_64 QEMU_FIRMWARE=/capsule/qemu-fw
export BENCH_MIB='${BENCH_MIB:-64}' BENCH_RUNS='${BENCH_RUNS:-10}' BENCH_DETAIL='${BENCH_DETAIL:-}' BENCH_VMMS='${BENCH_VMMS:-capsule qemu}'
exec sh /capsule/bench-net-guest.sh
EOF
CAPSULE_L1_TIMEOUT="${CAPSULE_L1_TIMEOUT:-1800}" "$resources/harness/run-in-l1.sh" \
    "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$initrd" "$work/tools" "$work/qemu-fw" \
    "$resources/bench-net-guest.sh" </dev/null | sed -u 's/\r$//' | grep --line-buffered -E '^bench-net:|^capsule-l1:|CAPSULE-L1-EXIT'
