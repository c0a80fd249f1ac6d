#!/usr/bin/env bash
# resources/bench-net.sh: network throughput benchmark, capsule beside QEMU,
# Firecracker and Cloud Hypervisor.
#
# Builds capsule, the guest kernel and initramfs (cached), then runs
# resources/bench-net-guest.sh where /dev/kvm is real: directly on a host
# with hardware KVM, else inside the nested L1 guest, with
# qemu-system-x86_64 (and its shared libraries and microvm firmware) copied
# in. Both VMMs boot the same guest with a virtio-net device over
# virtio-mmio on a TAP device (QEMU: -M microvm, virtio-net-device, its
# userspace backend, vhost=off; capsule-vhost and qemu-vhost: both with
# vhost=on, the kernel's vhost-net). Firecracker
# (`--no-api --config-file`, virtio-mmio) and Cloud Hypervisor (command
# line, virtio-net over virtio-pci) join when their builds are in
# capsule_anchors_dir (resources/lib.sh), booting the same build's vmlinux;
# otherwise their rows are left out with a note. The table
# at the end gives TCP throughput guest→host and host→guest. Under the
# nested harness the figures are TCG figures: compare the rows, not the
# absolute numbers.
#
# Usage: resources/bench-net.sh
# Env:   BENCH_MIB (MiB per transfer, default 64), BENCH_RUNS (runs per
#        VMM, default 10; each run is a fresh VM), BENCH_CPUS (guest vCPUs,
#        default 1),
#        BENCH_DETAIL=1 (TAP frame counts per transfer; capsule's traffic
#        and exit counters),
#        BENCH_EXITS=1 (nested mode: L1's KVM exits by reason and the
#        interrupts it injected, per transfer, from its kvm tracepoints;
#        every VMM is traced alike, which costs each exit some time),
#        BENCH_PIN_CPU=N (nested mode: every VMM runs on L1 CPU N alone,
#        all alike; docs/harness.md, "Pinned to one L1 CPU"),
#        BENCH_TRIES (attempts per VMM and round before it is left out,
#        default 3),
#        BENCH_TRACE=1 (nested mode: L1's KVM events traced; after a run
#        whose guest shut down, the BENCH_TRACE_LINES (default 150)
#        events up to the shutdown, as bench-blk's BENCH_TRACE),
#        BENCH_VMMS (default "capsule capsule-vhost capsule-pci qemu qemu-vhost",
#        the peers found, and "loopback": the same transfers between two
#        processes of the machine running the VMMs, no VM, the physical
#        limit of the other rows; also capsule-pci-vhost: virtio-pci with
#        vhost=on),
#        BENCH_RESULTS (a file the runs' lines are appended to and the
#        table computed from: several invocations make one table),
#        BENCH_CAPSULE_BASE (another capsule binary, e.g. main's before a
#        change: a capsule-base row beside capsule's, in the same L1),
#        BENCH_TABLE_ONLY=1 (with BENCH_RESULTS: print its table, run
#        nothing),
#        CAPSULE_HARNESS=direct|nested, CAPSULE_CACHE, CAPSULE_ANCHORS
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
resources="$CAPSULE_RESOURCES_DIR"

# table: the table of every complete run in $results (mib, cpus, mode,
# runs and peers as set by the caller).
table() {
    echo
    echo "bench-net: TCP over TAP, $mib MiB per transfer, busybox nc, timed by the receiver; $cpus vCPU(s), 512 MiB; mode=$mode"
    echo "bench-net: MB/s = 10^6 bytes/s, min / median / max over each VMM's complete runs (asked for: $runs)"
    # rates VMM DIRECTION: "min median max" MB/s of VMM's runs (or "- - -").
    rates() {
        grep "^bench-net: $1 $2 [0-9]" "$results" | awk '$5 > 0 { print $4 / $5 / 1e6 }' | min_median_max %.2f
    }
    [[ -n "$peers" ]] || echo "bench-net: Firecracker and Cloud Hypervisor not found in $(capsule_anchors_dir): their rows are left out"
    printf 'bench-net: %-26s %24s %24s\n' VMM guest-to-host host-to-guest
    for vmm in capsule capsule-base capsule-vhost capsule-pci capsule-pci-vhost qemu qemu-vhost firecracker cloud-hypervisor loopback; do
        n=$(grep -c "^bench-net: $vmm guest-to-host [0-9]" "$results" || true)
        [[ $n -gt 0 ]] || continue
        read -r -a g <<<"$(rates "$vmm" guest-to-host)"
        read -r -a h <<<"$(rates "$vmm" host-to-guest)"
        printf 'bench-net: %-26s %24s %24s\n' "$vmm ($n runs)" "${g[0]} / ${g[1]} / ${g[2]}" "${h[0]} / ${h[1]} / ${h[2]}"
    done
    # ratio MINE PEER DIRECTION: MINE/PEER ratio of the medians.
    ratio() {
        local c q
        c=$(rates "$1" "$3" | cut -d' ' -f2)
        q=$(rates "$2" "$3" | cut -d' ' -f2)
        awk -v a="$c" -v b="$q" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2f", a / b; else printf "-" }'
    }
    # has VMM: VMM has complete runs.
    has() { grep -q "^bench-net: $1 guest-to-host [0-9]" "$results"; }
    # capsule against each peer; capsule-vhost against capsule's userspace
    # path and QEMU's vhost-net.
    for pair in capsule:capsule-base capsule:qemu capsule:firecracker capsule:cloud-hypervisor capsule-vhost:capsule capsule-vhost:qemu-vhost \
        capsule-pci:capsule capsule-pci:firecracker capsule-pci:cloud-hypervisor \
        capsule-pci-vhost:capsule-pci capsule-pci-vhost:firecracker capsule-pci-vhost:cloud-hypervisor \
        capsule:loopback qemu:loopback firecracker:loopback cloud-hypervisor:loopback; do
        mine="${pair%%:*}" peer="${pair#*:}"
        has "$mine" && has "$peer" || continue
        printf 'bench-net: %-26s %24s %24s\n' "$mine/$peer" "$(ratio "$mine" "$peer" guest-to-host)" "$(ratio "$mine" "$peer" host-to-guest)"
    done
    if grep -q '^bench-net: exits ' "$results"; then
        echo "bench-net: L1's KVM exits per transfer, median (BENCH_EXITS=1; SVM exit codes, userspace reasons: 2 I/O, 6 MMIO; interrupts injected by vector):"
        local labels=() vmm dir
        for vmm in $vmms; do
            for dir in guest-to-host host-to-guest; do labels+=("$vmm $dir"); done
        done
        exits_table "$results" "bench-net: exits" "${labels[@]}" | sed 's/^/bench-net: /'
    fi
    for vmm in $vmms; do
        n=$(grep -c "^bench-net: note: $vmm early-end" "$results" || true)
        [[ $n -eq 0 ]] || echo "bench-net: note: $vmm's guest ended during a run $n time(s) (a nested-harness fault; see above); those runs were repeated"
    done
}


# BENCH_TABLE_ONLY=1: print the table of BENCH_RESULTS and run nothing
# (after runs that a dying harness cut short; nothing is built).
if [[ "${BENCH_TABLE_ONLY:-}" == 1 ]]; then
    [[ -n "${BENCH_RESULTS:-}" && -r "${BENCH_RESULTS:-}" ]] || die "BENCH_TABLE_ONLY=1 needs a readable BENCH_RESULTS file"
    results="$BENCH_RESULTS" mib="${BENCH_MIB:-64}" runs="${BENCH_RUNS:-10}" cpus="${BENCH_CPUS:-1}" mode="(as run)"
    vmms="capsule capsule-base capsule-vhost capsule-pci capsule-pci-vhost qemu qemu-vhost firecracker cloud-hypervisor loopback"
    peers="$({ grep -o '^bench-net: \(firecracker\|cloud-hypervisor\) ' "$results" || true; } | sort -u | cut -d' ' -f2 | tr '\n' ' ')"
    table
    exit 0
fi

"$resources/install-deps.sh"
export CAPSULE_SKIP_DEPS=1
capsule="$("$resources/build-capsule.sh")"
kdir="$("$resources/build-guest-kernel.sh")"
initrd="$("$resources/build-guest-initramfs.sh")"
mode="$("$resources/harness/mode.sh")"
log "mode: $mode"

work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-net.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# script: Cloud Hypervisor reads serial input only from a terminal.
copy_tools "$work/tools" qemu-system-x86_64 script
peers="$(copy_peers "$work/tools")"
copy_qemu_firmware "$work/qemu-fw"

mib="${BENCH_MIB:-64}" runs="${BENCH_RUNS:-10}" cpus="${BENCH_CPUS:-1}"
base=""
if [[ -n "${BENCH_CAPSULE_BASE:-}" ]]; then
    [[ -x "$BENCH_CAPSULE_BASE" ]] || die "BENCH_CAPSULE_BASE: $BENCH_CAPSULE_BASE is not an executable"
    cp "$BENCH_CAPSULE_BASE" "$work/capsule-base"
    base=capsule-base
fi
vmms="${BENCH_VMMS:-capsule $base capsule-vhost capsule-pci qemu qemu-vhost $peers loopback}"
[[ "$mib" =~ ^[1-9][0-9]*$ ]] || die "BENCH_MIB must be a positive number of MiB"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"
[[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "BENCH_CPUS must be a positive number"
results="${BENCH_RESULTS:-$work/results}"
touch "$results"
# Only this invocation's runs count toward BENCH_RUNS.
skip_lines=$(wc -l <"$results")

# count VMM: complete runs of VMM so far (one guest-to-host line per run).
count() {
    tail -n +$((skip_lines + 1)) "$results" | grep -c "^bench-net: $1 guest-to-host [0-9]" || true
}

if [[ "$mode" == direct ]]; then
    CAPSULE="$capsule" BZIMAGE="$kdir/bzImage" INITRD="$initrd" \
        QEMU="$work/tools/qemu-system-x86_64" QEMU_FIRMWARE="$work/qemu-fw" \
        BENCH_MIB="$mib" BENCH_RUNS="$runs" BENCH_CPUS="$cpus" BENCH_DETAIL="${BENCH_DETAIL:-}" \
        BENCH_VMMS="$vmms" CAPSULE_BASE="${BENCH_CAPSULE_BASE:-}" VMLINUX="$kdir/vmlinux" FC="$work/tools/firecracker" CH="$work/tools/cloud-hypervisor" \
        sh "$resources/bench-net-guest.sh" | tee -a "$results"
else
    # The nested harness's L1 may die or hang (TCG; see docs/ARCHITECTURE.md,
    # "Testing layers"): the runs done so far are kept and a new L1 does the
    # rest, up to 3 L1 sessions.
    for session in 1 2 3; do
        plan="" need=""
        for vmm in $vmms; do
            left=$((runs - $(count "$vmm")))
            [[ $left -gt 0 ]] || continue
            need+=" $vmm"
            plan+=" BENCH_RUNS_${vmm//-/_}=$left"
        done
        [[ -n "$need" ]] || break
        log "L1 session $session:$plan"
        cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
export CAPSULE=/capsule/capsule BZIMAGE=/capsule/bzImage INITRD=/capsule/initramfs.cpio.gz
export QEMU=/capsule/tools/qemu-system-x86_64 QEMU_FIRMWARE=/capsule/qemu-fw
export VMLINUX=/capsule/vmlinux FC=/capsule/tools/firecracker CH=/capsule/tools/cloud-hypervisor
${base:+export CAPSULE_BASE=/capsule/capsule-base}
export BENCH_MIB='$mib' BENCH_RUNS='$runs' BENCH_CPUS='$cpus' BENCH_DETAIL='${BENCH_DETAIL:-}' BENCH_VMMS='$need'
export CAPSULE_PIN_CPU='${BENCH_PIN_CPU:-}' BENCH_TRIES='${BENCH_TRIES:-3}' BENCH_EXITS='${BENCH_EXITS:-}' BENCH_TRACE='${BENCH_TRACE:-}' BENCH_TRACE_LINES='${BENCH_TRACE_LINES:-150}'
export$plan
exec sh /capsule/bench-net-guest.sh
EOF
        rc=0
        # About 2 minutes per run of each VMM still needed.
        nvmms=$(wc -w <<<"$need")
        CAPSULE_L1_TIMEOUT="${CAPSULE_L1_TIMEOUT:-$((300 + runs * nvmms * 120))}" "$resources/harness/run-in-l1.sh" \
            "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$kdir/vmlinux" "$initrd" "$work/tools" "$work/qemu-fw" \
            "$resources/bench-net-guest.sh" "$resources/kvm-host.sh" ${base:+"$work/capsule-base"} </dev/null | sed -u 's/\r$//' |
            grep --line-buffered -E '^bench-net:|^capsule-l1:|CAPSULE-L1-EXIT' | tee -a "$results" || rc=$?
        [[ $rc -eq 0 ]] || log "L1 session $session ended with status $rc"
    done
fi

table
for vmm in $vmms; do
    [[ $(count "$vmm") -ge $runs ]] || die "$vmm: $(count "$vmm") complete runs of $runs"
done
