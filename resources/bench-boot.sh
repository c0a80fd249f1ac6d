#!/usr/bin/env bash
# resources/bench-boot.sh: boot time and memory overhead, capsule beside QEMU.
#
# Boots the same guest (capsule's test kernel and busybox initramfs, 1 vCPU,
# 128 MiB, the same command line) BENCH_RUNS times with each VMM,
# alternating, and prints one table with min / median / max per VMM and the
# capsule/QEMU ratio of the medians:
#
#   - process start -> guest userspace: from just before the VMM is started
#     to the guest init's ready line on the VMM's stdout (measured the same
#     way for both, from outside);
#   - capsule's own boot-time marker (port 0x3c4, written by the guest's
#     init): wall ms since capsule's main() and the process's CPU ms;
#   - resident memory of the VMM process, excluding the guest RAM mapping,
#     read from /proc/PID/smaps once the guest is in userspace;
#   - capsule only: start -> its API socket answers `GET /` (curl, polled),
#     and main() -> API ready from capsule's own log;
#   - the cost of confinement: capsule as always (seccomp filters and
#     Landlock) beside `capsule-open` (--no-seccomp --no-landlock) and
#     `capsule-jail` (the default plus --jail, as root), same runs,
#     alternating. A jailed run's resident memory is the keeper's, not the
#     VMM's, so it is not compared.
#
# QEMU is Debian's qemu-system-x86_64 with `-M microvm` (qboot firmware),
# KVM, `-cpu host`, no default devices: the closest QEMU to capsule. In
# nested mode (resources/harness/mode.sh) both run inside the TCG L1 guest:
# absolute times there are inflated many times; only the ratios mean
# something. This is a benchmark: it prints numbers and never fails on one.
#
# Usage: resources/bench-boot.sh
# Env:   BENCH_RUNS (default 10), CAPSULE_HARNESS=direct|nested
# stdout: the table; progress on stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# write_runner FILE: the POSIX sh script that does the runs and prints one
# "bench-boot: VMM KEY=VALUE..." line per run.
write_runner() {
    cat >"$1" <<'RUNNER'
#!/bin/sh
# Env: CAPSULE QEMU QEMU_FW DATE CURL BZIMAGE INITRD BENCH_RUNS WORK
set -u
CMDLINE="console=ttyS0 reboot=k panic=1 quiet"
MEM_MIB=128
now_ns() { "$DATE" +%s%N; }

# rss_kib PID: resident KiB of PID outside mappings as large as guest RAM.
rss_kib() {
    awk -v lim=$((MEM_MIB * 1024)) '
        /^Size:/ { size = $2 }
        /^Rss:/ { if (size < lim) rss += $2 }
        END { print rss + 0 }' "/proc/$1/smaps"
}

# one VMM: boot once, print the line.
one() {
    vmm=$1
    out="$WORK/$vmm.out" err="$WORK/$vmm.err"
    rm -f "$out" "$err" "$WORK/fifo"
    mkfifo "$WORK/fifo"
    t0=$(now_ns)
    open=""
    [ "$vmm" = capsule-open ] && open="--no-seccomp --no-landlock"
    [ "$vmm" = capsule-jail ] && open="--jail --chroot-base $WORK/jail --id bench"
    if [ "$vmm" != qemu ]; then
        # shellcheck disable=SC2086 # $open is two words or none
        CAPSULE_LOG=info "$CAPSULE" run --kernel "$BZIMAGE" --initrd "$INITRD" \
            --cpus 1 --memory ${MEM_MIB}M --cmdline "$CMDLINE" $open \
            </dev/null >"$WORK/fifo" 2>"$err" &
    else
        "$QEMU" -M microvm -accel kvm -cpu host -m ${MEM_MIB}M -smp 1 \
            -nodefaults -no-user-config -display none -no-reboot -L "$QEMU_FW" \
            -serial stdio -kernel "$BZIMAGE" -initrd "$INITRD" -append "$CMDLINE" \
            </dev/null >"$WORK/fifo" 2>"$err" &
    fi
    pid=$!
    # The console stays open (and drained) until the VMM is gone: a VMM
    # must not die of a closed stdout before it is measured.
    exec 4<"$WORK/fifo"
    t1=""
    while IFS= read -r line <&4; do
        case "$line" in
        *"capsule-guest: ready"*)
            t1=$(now_ns)
            break
            ;;
        esac
    done
    cat <&4 >"$out" &
    drain=$!
    if [ -z "$t1" ]; then
        echo "bench-boot: error $vmm: no ready line; stderr: $(tail -n 3 "$err" | tr '\n' ' ')"
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        exec 4<&-
        wait "$drain" 2>/dev/null
        return
    fi
    sleep 1
    rss=$(rss_kib "$pid")
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    exec 4<&-
    wait "$drain" 2>/dev/null
    line="bench-boot: $vmm ready_ms=$(((t1 - t0) / 1000000)) rss_kib=$rss"
    if [ "$vmm" != qemu ]; then
        m=$(sed -n 's/.*boot marker 1: \([0-9.]*\) ms since capsule started, \([0-9.]*\) ms CPU.*/marker_ms=\1 marker_cpu_ms=\2/p' "$err")
        line="$line ${m:-marker_ms=- marker_cpu_ms=-}"
        v=$(sed -n 's/.*VM started: .*, \([0-9.]*\) ms after capsule started.*/vm_started_ms=\1/p' "$err")
        line="$line ${v:-vm_started_ms=-}"
    fi
    echo "$line"
}

# api: start capsule with an API socket and nothing else; time until a
# `GET /` over the socket is answered (curl, polled), and capsule's own
# "API ready" log line.
api() {
    sock="$WORK/api.sock"
    rm -f "$sock"
    t0=$(now_ns)
    CAPSULE_LOG=info "$CAPSULE" run --api-sock "$sock" </dev/null >/dev/null 2>"$WORK/api.err" &
    pid=$!
    t1=""
    n=0
    while [ "$n" -lt 2000 ]; do
        n=$((n + 1))
        if "$CURL" -sf --unix-socket "$sock" http://localhost/ >/dev/null 2>&1; then
            t1=$(now_ns)
            break
        fi
    done
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    if [ -z "$t1" ]; then
        echo "bench-boot: error api: no answer on $sock; stderr: $(tail -n 3 "$WORK/api.err" | tr '\n' ' ')"
        return
    fi
    l=$(sed -n 's/.*API ready on .*, \([0-9.]*\) ms after capsule started.*/api_log_ms=\1/p' "$WORK/api.err")
    echo "bench-boot: capsule api_ms=$(((t1 - t0) / 1000000)) ${l:-api_log_ms=-}"
}

i=0
while [ "$i" -lt "$BENCH_RUNS" ]; do
    i=$((i + 1))
    one capsule
    one qemu
    one capsule-open
    one capsule-jail
    api
done
RUNNER
    chmod 755 "$1"
}

main() {
    runs="${BENCH_RUNS:-10}"
    [[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"

    "$CAPSULE_RESOURCES_DIR/install-deps.sh"
    export CAPSULE_SKIP_DEPS=1
    capsule="$("$CAPSULE_RESOURCES_DIR/build-capsule.sh")"
    kdir="$("$CAPSULE_RESOURCES_DIR/build-guest-kernel.sh")"
    initrd="$("$CAPSULE_RESOURCES_DIR/build-guest-initramfs.sh")"
    mode="$("$CAPSULE_RESOURCES_DIR/harness/mode.sh")"

    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-boot.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    copy_tools "$work/tools" qemu-system-x86_64 date curl
    copy_qemu_firmware "$work/qemu-fw"
    write_runner "$work/bench-run.sh"

    log "mode: $mode; $runs runs per VMM"
    results="$work/results"
    if [[ "$mode" == direct ]]; then
        mkdir -p "$work/run"
        CAPSULE="$capsule" QEMU="$work/tools/qemu-system-x86_64" QEMU_FW="$work/qemu-fw" \
            DATE="$work/tools/date" CURL="$work/tools/curl" BZIMAGE="$kdir/bzImage" INITRD="$initrd" \
            BENCH_RUNS="$runs" WORK="$work/run" sh "$work/bench-run.sh" | tee "$results" >&2
    else
        cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
mkdir -p /tmp/bench
export CAPSULE=/capsule/capsule QEMU=/capsule/tools/qemu-system-x86_64 QEMU_FW=/capsule/qemu-fw
export DATE=/capsule/tools/date CURL=/capsule/tools/curl BZIMAGE=/capsule/bzImage INITRD=/capsule/initramfs.cpio.gz
export BENCH_RUNS=$runs WORK=/tmp/bench
exec sh /capsule/bench-run.sh
EOF
        export CAPSULE_L1_TIMEOUT=$((300 + runs * 120))
        run_in_l1_retrying "$results" \
            "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$initrd" "$work/tools" \
            "$work/qemu-fw" "$work/bench-run.sh"
    fi
    grep '^bench-boot: error' "$results" >&2 || true

    # value VMM KEY: the KEY values of VMM's runs, one a line.
    value() {
        sed -n "s/^bench-boot: $1 .*$2=\([0-9.]*\).*/\1/p" "$results"
    }
    echo
    echo "Boot, capsule vs QEMU microvm (1 vCPU, 128 MiB, same kernel/initramfs/cmdline; mode=$mode; $runs runs each)"
    printf '%-44s %26s %26s %8s\n' "measurement (min / median / max)" "capsule" "qemu" "ratio"
    row() { # LABEL KEY DIVISOR
        local c q cm qm ratio
        read -r -a c <<<"$(value capsule "$2" | awk -v d="$3" '{ print $1 / d }' | min_median_max %.1f)"
        read -r -a q <<<"$(value qemu "$2" | awk -v d="$3" '{ print $1 / d }' | min_median_max %.1f)"
        cm="${c[1]}" qm="${q[1]}"
        ratio="-"
        if [[ "$cm" != - && "$qm" != - ]]; then
            ratio="$(awk -v a="$cm" -v b="$qm" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
        fi
        printf '%-44s %26s %26s %8s\n' "$1" "${c[0]} / ${c[1]} / ${c[2]}" "${q[0]} / ${q[1]} / ${q[2]}" "$ratio"
    }
    row "process start -> guest userspace, ms" ready_ms 1
    row "VMM resident memory excl. guest RAM, MiB" rss_kib 1024
    local m cpu
    read -r -a m <<<"$(value capsule marker_ms | min_median_max %.1f)"
    read -r -a cpu <<<"$(value capsule marker_cpu_ms | min_median_max %.1f)"
    local v
    read -r -a v <<<"$(value capsule vm_started_ms | min_median_max %.1f)"
    printf '%-44s %26s %26s %8s\n' "capsule: process start -> vCPUs running, ms" "${v[0]} / ${v[1]} / ${v[2]}" "n/a" "-"
    printf '%-44s %26s %26s %8s\n' "capsule boot marker: wall ms" "${m[0]} / ${m[1]} / ${m[2]}" "n/a" "-"
    printf '%-44s %26s %26s %8s\n' "capsule boot marker: process CPU ms" "${cpu[0]} / ${cpu[1]} / ${cpu[2]}" "n/a" "-"
    local a al
    read -r -a a <<<"$(value capsule api_ms | min_median_max %.1f)"
    read -r -a al <<<"$(value capsule api_log_ms | min_median_max %.1f)"
    printf '%-44s %26s %26s %8s\n' "capsule: start -> API answers GET /, ms" "${a[0]} / ${a[1]} / ${a[2]}" "n/a" "-"
    printf '%-44s %26s %26s %8s\n' "capsule: main() -> API ready (its log), ms" "${al[0]} / ${al[1]} / ${al[2]}" "n/a" "-"

    echo
    echo "Confinement: capsule (seccomp + Landlock, the default) vs --no-seccomp --no-landlock vs --jail (same runs)"
    printf '%-40s %22s %22s %22s %6s %6s\n' "measurement (min / median / max)" "default" "open" "jailed" "d/o" "j/o"
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2f", a / b; else print "-" }'; }
    confined_row() { # LABEL KEY DIVISOR [no-jail]
        local c o j
        read -r -a c <<<"$(value capsule "$2" | awk -v d="$3" '{ print $1 / d }' | min_median_max %.1f)"
        read -r -a o <<<"$(value capsule-open "$2" | awk -v d="$3" '{ print $1 / d }' | min_median_max %.1f)"
        read -r -a j <<<"$(value capsule-jail "$2" | awk -v d="$3" '{ print $1 / d }' | min_median_max %.1f)"
        [[ -n "${4:-}" ]] && j=(- - -)
        printf '%-40s %22s %22s %22s %6s %6s\n' "$1" "${c[0]} / ${c[1]} / ${c[2]}" "${o[0]} / ${o[1]} / ${o[2]}" \
            "${j[0]} / ${j[1]} / ${j[2]}" "$(ratio "${c[1]}" "${o[1]}")" "$(ratio "${j[1]}" "${o[1]}")"
    }
    confined_row "process start -> guest userspace, ms" ready_ms 1
    confined_row "process start -> vCPUs running, ms" vm_started_ms 1
    confined_row "boot marker: wall ms" marker_ms 1
    confined_row "boot marker: process CPU ms" marker_cpu_ms 1
    confined_row "VMM resident memory excl. guest RAM, MiB" rss_kib 1024 no-jail
}

main "$@"
