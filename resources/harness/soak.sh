#!/usr/bin/env bash
# resources/harness/soak.sh: the nested harness's flake meter.
#
# boots mode (default): boots the same small guest SOAK_N times in ONE L1
# (resources/harness/run-in-l1.sh) with capsule, or with QEMU microvm
# (SOAK_VMM=qemu) so that a fault can be attributed to the harness or to
# capsule by comparison. The guest is capsule's test kernel with a busybox
# initramfs whose /init exercises inter-processor interrupts on every vCPU
# (jobs pinned with taskset to each CPU, a pipe between processes on
# different CPUs, short sleeps that need timer wake-ups, migrations with
# `taskset -p`), prints `soak-guest: done` and powers off. Each boot is one
# of:
#   clean   `soak-guest: done` on the console and the VMM exited 0
#   triple  capsule logged "triple fault"; or (both VMMs) the VMM exited 0
#           before the guest was done: the guest reset itself, which this
#           guest never asks for (QEMU says nothing of a triple fault)
#   hang    the boot's timeout (SOAK_BOOT_TIMEOUT) killed the VMM
#   other   anything else (non-zero status, guest panic, ...)
# and L1's own fate is counted apart: a hung, timed-out or crashed L1
# (run-in-l1.sh status 126, 124, 125) ends the run early, and the boots it
# did not get to are not counted as the VMM's.
#
# suite mode (`soak.sh suite`): runs the boot suite (tests/boot/run.sh)
# SOAK_K times, each in its own L1, and counts per run the cases rerun
# after a triple fault or stall (`boot-case: RETRY`), the L1 reruns, the
# failures and the time.
#
# Prints per run one summary line, `soak: ...`, and a markdown table row
# (`soak-row: | ... |`) for docs/harness.md; the per-boot lines are on
# stderr. Exits 0 when the measurement ran (whatever it measured), 1 when
# it could not run at all.
#
# Every L1 must hold /tmp/capsule-l1.lock (docs/harness.md): run it as
#   flock /tmp/capsule-l1.lock resources/harness/soak.sh
# In suite mode SOAK_LOCK=/tmp/capsule-l1.lock takes the lock per run
# instead (others get the harness between runs).
#
# Usage: resources/harness/soak.sh [boots|suite]
# Env:   SOAK_N             boots (default 100)
#        SOAK_VMM           capsule (default) or qemu (QEMU microvm, KVM)
#        SOAK_CPUS          guest vCPUs (default 2)
#        SOAK_BOOT_TIMEOUT  seconds per boot (default 60)
#        SOAK_K             suite runs (default 5)
#        SOAK_LOCK          suite mode: lock file taken per run
#        SOAK_LOG           keep the L1 console log(s) here (a path prefix)
#        SOAK_TRACE=1       trace L1's KVM (kvm_trace_start in
#                           resources/kvm-host.sh: exits, entries,
#                           injections, IPIs, nested exits) and print the last
#                           SOAK_TRACE_LINES (default 80) events after each
#                           boot that was not clean
#        CAPSULE_L1, CAPSULE_L1_CPUS, ... as for run-in-l1.sh
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
# shellcheck source=resources/harness/l1-config.sh
source "$CAPSULE_RESOURCES_DIR/harness/l1-config.sh"

# write_guest_init FILE: the soak guest's /init.
write_guest_init() {
    {
        echo '#!/bin/sh'
        guest_init_common
        cat <<'INIT'
n=$(nproc)
echo "soak-guest: up cpus=$n"
last=$((n - 1))
# Busy jobs pinned to each CPU: the scheduler's IPIs and tick on all.
for c in $(seq 0 "$last"); do
    taskset -c "$c" sh -c 'i=0; while [ $i -lt 500 ]; do i=$((i + 1)); done' &
done
# Cross-CPU wake-ups: a pipe from a producer on CPU 0 to a consumer on
# the last CPU (reschedule IPIs as each side wakes the other), sleepers on
# each CPU that need timer wake-ups while the others run.
taskset -c 0 seq 1 60 | taskset -c "$last" sh -c 'while read -r l; do :; done' &
for c in $(seq 0 "$last"); do
    taskset -c "$c" sh -c 'for i in 1 2 3; do sleep 0.05; done' &
done
# Migrations: move a running job between CPUs (stop-machine style IPIs).
sh -c 'i=0; while [ $i -lt 1000 ]; do i=$((i + 1)); done' &
m=$!
for c in $(seq 0 "$last") 0; do
    taskset -p -c "$c" "$m" >/dev/null 2>&1
    sleep 0.02
done
wait
echo "soak-guest: done"
poweroff -f
INIT
    } >"$1"
    chmod 755 "$1"
}

# write_runner FILE: the POSIX sh script that runs in L1: SOAK_N boots, one
# `soak-boot: I RESULT ms=MS` line each (with the VMM's last lines after
# any but a clean one), then `soak-end`.
write_runner() {
    cat >"$1" <<'RUNNER'
#!/bin/sh
# Env: VMM CAPSULE QEMU QEMU_FW DATE BZIMAGE INITRD N CPUS BOOT_TIMEOUT WORK
#      TRACE TRACE_LINES
set -u
# shellcheck source=resources/kvm-host.sh
. "$(dirname "$0")/kvm-host.sh"
[ "$TRACE" != 1 ] || kvm_trace_start soak-boot:
CMDLINE="console=ttyS0 reboot=k panic=-1 quiet"
now_ns() { "$DATE" +%s%N; }
i=0
while [ "$i" -lt "$N" ]; do
    i=$((i + 1))
    out="$WORK/out" err="$WORK/err"
    [ "$TRACE" != 1 ] || kvm_trace_clear
    t0=$(now_ns)
    if [ "$VMM" = capsule ]; then
        timeout -s KILL "$BOOT_TIMEOUT" "$CAPSULE" run --kernel "$BZIMAGE" --initrd "$INITRD" \
            --cpus "$CPUS" --memory 256M --cmdline "$CMDLINE" </dev/null >"$out" 2>"$err"
    else
        timeout -s KILL "$BOOT_TIMEOUT" "$QEMU" -M microvm -accel kvm -cpu host -m 256M -smp "$CPUS" \
            -nodefaults -no-user-config -display none -no-reboot -L "$QEMU_FW" \
            -serial stdio -kernel "$BZIMAGE" -initrd "$INITRD" -append "$CMDLINE" \
            </dev/null >"$out" 2>"$err"
    fi
    rc=$?
    ms=$((($(now_ns) - t0) / 1000000))
    done=0
    tr -d '\r' <"$out" | grep '^soak-guest: done' >/dev/null && done=1
    if [ "$rc" -eq 137 ] || [ "$rc" -eq 124 ]; then
        r=hang
    elif grep -q 'triple fault' "$err"; then
        r=triple
    elif [ "$rc" -eq 0 ] && [ "$done" -eq 1 ]; then
        r=clean
    elif [ "$rc" -eq 0 ]; then
        r=triple
    else
        r=other
    fi
    echo "soak-boot: $i $r ms=$ms rc=$rc"
    if [ "$r" != clean ]; then
        tr -d '\r' <"$out" | tail -n 15 | sed 's/^/soak-boot:   | /'
        tail -n 8 "$err" | sed 's/^/soak-boot:   ! /'
        if [ "$TRACE" = 1 ]; then
            echo "soak-boot:   last $TRACE_LINES KVM events in L1:"
            tail -n "$TRACE_LINES" "$KVM_TRACE/trace" | sed 's/^/soak-boot:   ~ /'
        fi
    fi
done
echo "soak-end"
RUNNER
    chmod 755 "$1"
}

# summarize LOG L1_STATUS SECONDS: the summary and table lines of a boots run.
summarize() {
    local log="$1" l1rc="$2" secs="$3" boots clean triple hang other l1 ms
    boots="$(grep -c '^soak-boot: [0-9][0-9]* ' "$log" || true)"
    count() { grep -c "^soak-boot: [0-9][0-9]* $1 " "$log" || true; }
    clean="$(count clean)" triple="$(count triple)" hang="$(count hang)" other="$(count other)"
    case "$l1rc" in
    0) l1="ok" ;;
    124) l1="L1 timed out after $boots boots" ;;
    125) l1="L1 crashed after $boots boots" ;;
    126) l1="L1 hung after $boots boots" ;;
    *) l1="L1 script status $l1rc after $boots boots" ;;
    esac
    if [[ "$l1rc" -eq 0 && "$boots" -lt "$n" ]]; then l1="L1 ok, but only $boots boots reported"; fi
    ms="$(sed -n 's/^soak-boot: [0-9]* clean ms=\([0-9]*\).*/\1/p' "$log" | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "- -"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2)
            p = int(NR * 0.9 + 0.999); if (p > NR) p = NR
            print m, v[p] }')"
    echo "soak: config=$L1_CONFIG l1_cpus=$l1_cpus vmm=$vmm guest_cpus=$cpus boots=$boots clean=$clean triple=$triple hang=$hang other=$other l1=\"$l1\" median_ms=${ms% *} p90_ms=${ms#* } wall_s=$secs"
    echo "soak-row: | $(date +%Y-%m-%d) | $L1_CONFIG | ${l1_cpus} | $vmm | $boots | $clean | $triple | $hang | $other | $l1 | ${ms% *} / ${ms#* } |"
}

boots_mode() {
    n="${SOAK_N:-100}" vmm="${SOAK_VMM:-capsule}" cpus="${SOAK_CPUS:-2}"
    timeout_b="${SOAK_BOOT_TIMEOUT:-60}" l1_cpus="${CAPSULE_L1_CPUS:-2}"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "SOAK_N must be a positive number"
    [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "SOAK_CPUS must be a positive number"
    [[ "$timeout_b" =~ ^[1-9][0-9]*$ ]] || die "SOAK_BOOT_TIMEOUT must be a positive number of seconds"
    [[ "$vmm" == capsule || "$vmm" == qemu ]] || die "SOAK_VMM must be capsule or qemu, not '$vmm'"

    "$CAPSULE_RESOURCES_DIR/install-deps.sh"
    export CAPSULE_SKIP_DEPS=1
    capsule="$("$CAPSULE_RESOURCES_DIR/build-capsule.sh")"
    kdir="$("$CAPSULE_RESOURCES_DIR/build-guest-kernel.sh")"

    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-soak.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    populate_busybox_root "$work/guest"
    write_guest_init "$work/guest/init"
    make_cpio "$work/guest" "$work/soak-initrd.cpio.gz" gzip
    copy_tools "$work/tools" date
    files=("$capsule" "$kdir/bzImage" "$work/soak-initrd.cpio.gz" "$work/tools" "$work/soak-run.sh"
        "$CAPSULE_RESOURCES_DIR/kvm-host.sh")
    if [[ "$vmm" == qemu ]]; then
        # The L2 VMM is Debian 12's QEMU, whichever QEMU runs L1.
        copy_tools "$work/tools" qemu-system-x86_64
        copy_qemu_firmware "$work/qemu-fw"
        files+=("$work/qemu-fw")
    fi
    write_runner "$work/soak-run.sh"
    cat >"$work/soak-l1.sh" <<EOF
#!/bin/sh
mkdir -p /tmp/soak
export VMM=$vmm CAPSULE=/capsule/capsule QEMU=/capsule/tools/qemu-system-x86_64 QEMU_FW=/capsule/qemu-fw
export DATE=/capsule/tools/date BZIMAGE=/capsule/bzImage INITRD=/capsule/soak-initrd.cpio.gz
export N=$n CPUS=$cpus BOOT_TIMEOUT=$timeout_b WORK=/tmp/soak
export TRACE=${SOAK_TRACE:-0} TRACE_LINES=${SOAK_TRACE_LINES:-80}
exec sh /capsule/soak-run.sh
EOF
    log "$L1_CONFIG, L1 ${l1_cpus} vCPUs: $n boots of $vmm (${cpus} vCPUs), ${timeout_b}s each"
    export CAPSULE_L1_TIMEOUT="${CAPSULE_L1_TIMEOUT:-$((300 + n * (timeout_b + 5)))}"
    # A boot can take up to its timeout with no L1 heartbeat issue; but the
    # heartbeat must outlast a slow boot.
    export CAPSULE_L1_HANG="${CAPSULE_L1_HANG:-$((timeout_b + 60))}"
    local start=$SECONDS rc=0
    "$CAPSULE_RESOURCES_DIR/harness/run-in-l1.sh" "$work/soak-l1.sh" "${files[@]}" </dev/null |
        sed -u 's/\r//g' | tee "$work/console.log" | grep --line-buffered '^soak-boot: ' >&2 || rc=${PIPESTATUS[0]}
    if [[ -n "${SOAK_LOG:-}" ]]; then cp "$work/console.log" "$SOAK_LOG.boots.log"; fi
    summarize "$work/console.log" "$rc" $((SECONDS - start))
}

suite_mode() {
    local k="${SOAK_K:-5}" i rc start retries l1reruns failed passed line
    [[ "$k" =~ ^[1-9][0-9]*$ ]] || die "SOAK_K must be a positive number"
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-soak-suite.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    for i in $(seq 1 "$k"); do
        start=$SECONDS
        rc=0
        if [[ -n "${SOAK_LOCK:-}" ]]; then
            flock "$SOAK_LOCK" "$CAPSULE_REPO_DIR/tests/boot/run.sh" >"$work/run.log" 2>&1 || rc=$?
        else
            "$CAPSULE_REPO_DIR/tests/boot/run.sh" >"$work/run.log" 2>&1 || rc=$?
        fi
        if [[ -n "${SOAK_LOG:-}" ]]; then cp "$work/run.log" "$SOAK_LOG.suite$i.log"; fi
        retries="$(tr -d '\r' <"$work/run.log" | grep -c '^boot-case: RETRY ' || true)"
        l1reruns="$(grep -c '^boot tests: L1 failed' "$work/run.log" || true)"
        line="$(grep '^boot: [0-9]* passed, [0-9]* failed' "$work/run.log" | tail -n1 || true)"
        passed="$(echo "$line" | sed -n 's/^boot: \([0-9]*\) passed.*/\1/p')"
        failed="$(echo "$line" | sed -n 's/.*passed, \([0-9]*\) failed.*/\1/p')"
        tr -d '\r' <"$work/run.log" | grep '^boot-case: RETRY \|^  FAIL ' | sed "s/^/soak-suite $i: /" >&2 || true
        echo "soak: suite run $i/$k config=$L1_CONFIG status=$rc passed=${passed:--} failed=${failed:--} case_reruns=$retries l1_reruns=$l1reruns wall_s=$((SECONDS - start))"
    done
}

# All of the work is in main(), parsed whole before it runs: editing this
# file while it runs cannot corrupt the run.
main() {
    case "${1:-boots}" in
    boots) boots_mode ;;
    suite) suite_mode ;;
    -h | --help)
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        ;;
    *) die "usage: soak.sh [boots|suite]" ;;
    esac
}

main "$@"; exit
