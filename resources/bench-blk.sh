#!/usr/bin/env bash
# resources/bench-blk.sh: virtio-blk benchmark, from inside the guest.
#
# Boots capsule's test kernel, in capsule and in QEMU (-M microvm, the same
# virtio-blk devices over virtio-mmio), with a benchmark root image (busybox + fio,
# as /dev/vda, read-only) and a raw data image (/dev/vdb), and runs fio on
# /dev/vdb with O_DIRECT and libaio: sequential write and read (1 MiB
# blocks, queue depth 4) and 4 KiB random reads (queue depth 32). Each VM
# run measures every job once; the table shows min / median / max over the
# runs. This is a benchmark, not a test: it prints numbers, it does not
# judge them.
#
# In nested mode (resources/harness/mode.sh) the runs happen inside the
# TCG L1 guest and the data image is in L1's RAM (tmpfs): absolute figures
# are far below what hardware KVM gives; they show the VMM's own costs.
#
# Usage: resources/bench-blk.sh
# Env:   BENCH_RUNS   VM runs (default 5)
#        BENCH_SIZE   MiB of data disk and of each sequential job (default 256)
#        CAPSULE_HARNESS=direct|nested   force a mode
# stdout: the table; progress goes to stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# write_guest_init FILE SIZE_MIB: the benchmark image's /sbin/init.
write_guest_init() {
    cat >"$1" <<INIT
#!/bin/sh
export PATH=/bin:/sbin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
# job NAME FIO_ARGS...: one fio job on /dev/vdb, as a "bench-blk:" line.
job() {
    name=\$1
    shift
    if ! out=\$(/opt/tools/fio --name="\$name" --filename=/dev/vdb --direct=1 \\
        --ioengine=libaio --group_reporting --output-format=terse \\
        --terse-version=3 "\$@" 2>/tmp/err); then
        echo "bench-blk: error \$name: \$(head -c 300 /tmp/err)"
        return
    fi
    echo "\$out" | awk -F';' -v n="\$name" '{
        printf "bench-blk: %s read_kibps=%s read_iops=%s write_kibps=%s write_iops=%s\\n",
            n, \$7, \$8, \$48, \$49 }'
}
echo "bench-blk: start \$(nproc) vCPUs, vdb \$((\$(cat /sys/block/vdb/size) / 2048)) MiB"
job seqwrite --rw=write --bs=1M --iodepth=4 --size=${2}M
job seqread --rw=read --bs=1M --iodepth=4 --size=${2}M
job randread --rw=randread --bs=4k --iodepth=32 --size=${2}M --runtime=10 --time_based
poweroff -f
INIT
    chmod 755 "$1"
}

# write_runner FILE: the script that boots the benchmark VM BENCH_RUNS times
# with each VMM, alternating (on the host in direct mode, in L1 in nested
# mode). POSIX sh. Prints the guest's lines as "bench-blk: VMM JOB ...".
write_runner() {
    cat >"$1" <<'RUNNER'
#!/bin/sh
# Env: CAPSULE QEMU QEMU_FW BZIMAGE BENCH_ROOT DATA_DIR BENCH_RUNS BENCH_SIZE
set -u
CMDLINE="console=ttyS0 reboot=k panic=1 root=/dev/vda ro quiet"
data="$DATA_DIR/bench-data.img"
# boot VMM: one benchmark VM; the guest's lines on stdout.
boot() {
    if [ "$1" = capsule ]; then
        "$CAPSULE" run --kernel "$BZIMAGE" --cpus 2 --memory 512M \
            --disk "$BENCH_ROOT,ro" --disk "$data" --cmdline "$CMDLINE" </dev/null
    else
        # Same devices, same order: virtio-blk over virtio-mmio, the host
        # page cache in between (QEMU's default cache=writeback).
        "$QEMU" -M microvm -accel kvm -cpu host -m 512M -smp 2 \
            -nodefaults -no-user-config -display none -no-reboot -L "$QEMU_FW" \
            -serial stdio -kernel "$BZIMAGE" -append "$CMDLINE" \
            -drive id=root,file="$BENCH_ROOT",format=raw,if=none,readonly=on \
            -drive id=data,file="$data",format=raw,if=none \
            -device virtio-blk-device,drive=root -device virtio-blk-device,drive=data \
            </dev/null
    fi
}
i=0
while [ "$i" -lt "$BENCH_RUNS" ]; do
    i=$((i + 1))
    for vmm in capsule qemu; do
        rm -f "$data"
        dd if=/dev/zero of="$data" bs=1048576 count="$BENCH_SIZE" 2>/dev/null
        echo "bench-blk: run $i $vmm"
        boot "$vmm" | tr -d '\r' | grep '^bench-blk:' | sed "s/^bench-blk: /bench-blk: $vmm /"
    done
    rm -f "$data"
done
RUNNER
    chmod 755 "$1"
}

main() {
    runs="${BENCH_RUNS:-5}"
    size="${BENCH_SIZE:-256}"
    [[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"
    [[ "$size" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SIZE must be a positive number of MiB"

    "$CAPSULE_RESOURCES_DIR/install-deps.sh" fio
    export CAPSULE_SKIP_DEPS=1
    capsule="$("$CAPSULE_RESOURCES_DIR/build-capsule.sh")"
    kdir="$("$CAPSULE_RESOURCES_DIR/build-guest-kernel.sh")"
    mode="$("$CAPSULE_RESOURCES_DIR/harness/mode.sh")"

    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-blk.XXXXXX")"
    trap 'rm -rf "$work"' EXIT

    log "building the benchmark root image (busybox, fio)"
    root="$work/root"
    populate_busybox_root "$root"
    copy_tools "$root/opt/tools" fio
    write_guest_init "$root/sbin/init" "$size"
    image_mib=$(($(du -sm "$root" | cut -f1) + 32))
    truncate -s "${image_mib}M" "$work/bench-root.ext4"
    mkfs.ext4 -q -F -E root_owner=0:0 -d "$root" "$work/bench-root.ext4"
    write_runner "$work/bench-run.sh"
    copy_tools "$work/tools" qemu-system-x86_64
    copy_qemu_firmware "$work/qemu-fw"

    log "mode: $mode; $runs runs per VMM"
    results="$work/results"
    if [[ "$mode" == direct ]]; then
        CAPSULE="$capsule" QEMU="$work/tools/qemu-system-x86_64" QEMU_FW="$work/qemu-fw" \
            BZIMAGE="$kdir/bzImage" BENCH_ROOT="$work/bench-root.ext4" \
            DATA_DIR="$work" BENCH_RUNS="$runs" BENCH_SIZE="$size" \
            sh "$work/bench-run.sh" | tee "$results" >&2
    else
        cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
export CAPSULE=/capsule/capsule BZIMAGE=/capsule/bzImage BENCH_ROOT=/capsule/bench-root.ext4
export QEMU=/capsule/tools/qemu-system-x86_64 QEMU_FW=/capsule/qemu-fw
export DATA_DIR=/tmp BENCH_RUNS=$runs BENCH_SIZE=$size
exec sh /capsule/bench-run.sh
EOF
        CAPSULE_L1_TIMEOUT=$((300 + runs * 360)) "$CAPSULE_RESOURCES_DIR/harness/run-in-l1.sh" \
            "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$work/bench-root.ext4" \
            "$work/bench-run.sh" "$work/tools" "$work/qemu-fw" </dev/null | tr -d '\r' | tee "$results" >&2
    fi
    if grep -q '^bench-blk: error' "$results"; then
        grep '^bench-blk: error' "$results" >&2
        die "a fio job failed"
    fi

    echo
    echo "virtio-blk inside the guest, capsule vs QEMU microvm (fio, O_DIRECT, libaio, /dev/vdb ${size} MiB; 2 vCPUs, 512 MiB; mode=$mode; $runs runs each)"
    printf '%-34s %22s %22s %8s\n' "measurement (min / median / max)" "capsule" "qemu" "ratio"
    row() { # LABEL JOB FIELD DIVISOR
        local c q ratio
        read -r -a c <<<"$(sed -n "s/^bench-blk: capsule $2 .*$3=\([0-9.]*\).*/\1/p" "$results" |
            awk -v d="$4" '{ print $1 / d }' | min_median_max %.0f)"
        read -r -a q <<<"$(sed -n "s/^bench-blk: qemu $2 .*$3=\([0-9.]*\).*/\1/p" "$results" |
            awk -v d="$4" '{ print $1 / d }' | min_median_max %.0f)"
        ratio="$(awk -v a="${c[1]}" -v b="${q[1]}" 'BEGIN { if (b + 0 > 0 && a != "-") printf "%.2f", a / b; else print "-" }')"
        printf '%-34s %22s %22s %8s\n' "$1" "${c[0]} / ${c[1]} / ${c[2]}" "${q[0]} / ${q[1]} / ${q[2]}" "$ratio"
    }
    row "sequential write, MiB/s (1 MiB)" seqwrite write_kibps 1024
    row "sequential read, MiB/s (1 MiB)" seqread read_kibps 1024
    row "random read, IOPS (4 KiB, QD 32)" randread read_iops 1
}

main "$@"
