#!/usr/bin/env bash
# resources/bench-boot.sh: boot time and memory overhead, capsule beside
# QEMU, Firecracker and Cloud Hypervisor.
#
# Boots the same guest (capsule's test kernel and busybox initramfs, 1 vCPU,
# 128 MiB, the same command line) BENCH_RUNS times with each VMM, taking
# turns (each round starting one VMM further down the list), and prints
# one table with min / median / max per VMM and the ratio of capsule's
# median to each peer's:
#
#   - process start -> guest userspace: from just before the VMM is started
#     to the guest init's ready line on the VMM's stdout (measured the same
#     way for both, from outside), split into the guest kernel's own clock
#     at that line (its /proc/uptime, printed on the ready line) and the
#     rest: the VMM's start-up and the kernel's first steps before its
#     clock starts (the same kernel under every VMM, so the differences
#     between the VMMs in that row are theirs);
#   - capsule's own boot-time marker (port 0x3c4, written by the guest's
#     init): wall ms since capsule's main() and the process's CPU ms;
#   - resident memory of the VMM process, excluding the guest RAM mapping,
#     read from /proc/PID/smaps once the guest is in userspace;
#   - start -> the API socket accepts a connection and start -> it
#     answers (capsule-api-probe, trying every 100 us; capsule and
#     Firecracker `GET /`, Cloud Hypervisor `GET /api/v1/vmm.ping`, each
#     VMM started with only its API socket), and capsule's main() -> API
#     ready from its own log; its floor, "limit": the same for the
#     smallest static server (capsule-api-probe --serve), no VMM;
#   - the cost of confinement: capsule as always (seccomp filters and
#     Landlock) beside `capsule-open` (--no-seccomp --no-landlock) and
#     `capsule-jail` (the default plus --jail, as root), same runs,
#     alternating. A jailed run's resident memory is the keeper's, not the
#     VMM's, so it is not compared.
#
# QEMU is Debian's qemu-system-x86_64 with `-M microvm` (qboot firmware),
# KVM, `-cpu host`, no default devices: the closest QEMU to capsule.
# Firecracker and Cloud Hypervisor are the unmodified builds of
# capsule_anchors_dir (resources/lib.sh); where they are absent their
# columns are left out with a note. Each is started the way its own
# documentation recommends for speed: Firecracker with `--no-api
# --config-file` (and `--no-seccomp`: the build has no filter), Cloud
# Hypervisor from its command line. Firecracker boots only an ELF vmlinux,
# so capsule, Firecracker and Cloud Hypervisor all boot the build's
# vmlinux; QEMU's microvm boots the bzImage of the same build. In
# nested mode (resources/harness/mode.sh) both run inside the TCG L1 guest:
# absolute times there are inflated many times; only the ratios mean
# something. This is a benchmark: it prints numbers and never fails on one.
#
# Usage: resources/bench-boot.sh
# Env:   BENCH_RUNS (default 10), CAPSULE_HARNESS=direct|nested,
#        BENCH_RESULTS (a file the runs' lines are appended to and the
#        tables are computed from: several invocations make one table),
#        CAPSULE_ANCHORS (where the Firecracker / Cloud Hypervisor builds are),
#        BENCH_TRANSPORT=1 (also boot capsule with one read-only 1 MiB
#        virtio-blk disk over virtio-mmio and over virtio-pci, `--transport
#        pci`, and print a transport table; =only: just those two),
#        BENCH_EXITS=1 (L1's KVM exits per boot by reason, from its kvm
#        tracepoints; nested mode; separate from the timed table's runs,
#        as tracing costs time),
#        BENCH_CAPSULE_BASE (another capsule binary, e.g. main's before a
#        change: a capsule-base column beside capsule's, same runs),
#        BENCH_PIN_CPU=N (nested mode: every VMM runs on L1 CPU N alone,
#        all alike; docs/harness.md, "Pinned to one L1 CPU")
# stdout: the table; progress on stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# write_runner FILE: the POSIX sh script that does the runs and prints one
# "bench-boot: VMM KEY=VALUE..." line per run.
write_runner() {
    cat >"$1" <<'RUNNER'
#!/bin/sh
# Env: CAPSULE QEMU QEMU_FW DATE BZIMAGE VMLINUX INITRD BENCH_RUNS WORK
#      KVM_HOST_LIB (resources/kvm-host.sh)
#      PEERS (names of the reference VMMs present) TOOLS (where they are)
set -u
CMDLINE="console=ttyS0 reboot=k panic=1 quiet"
MEM_MIB=128
FC="$TOOLS/firecracker" CH="$TOOLS/cloud-hypervisor"
cat >"$WORK/fc.json" <<EOF
{
  "boot-source": {
    "kernel_image_path": "$VMLINUX",
    "initrd_path": "$INITRD",
    "boot_args": "$CMDLINE"
  },
  "machine-config": { "vcpu_count": 1, "mem_size_mib": $MEM_MIB },
  "drives": []
}
EOF
now_ns() { "$DATE" +%s%N; }

# With BENCH_EXITS=1, L1's kvm tracepoints count each boot's exits and
# interrupts, from process start to the ready line (kvm_exits_arm and
# kvm_exits_report, resources/kvm-host.sh), as "bench-boot: exits VMM
# EVENT ..." lines.
. "${KVM_HOST_LIB:?}"
kvm_pin bench-boot:
exits_arm() {
    [ -z "${BENCH_EXITS:-}" ] || kvm_exits_arm bench-boot:
}
# exits_report VMM: the counts since exits_arm.
exits_report() {
    [ -z "${BENCH_EXITS:-}" ] || kvm_exits_report "bench-boot: exits $1"
}

# rss_kib PID [DD]: resident KiB of PID outside mappings as large as guest
# RAM, and with DD=1 (capsule) outside those marked MADV_DONTDUMP ("dd" in
# VmFlags) too: capsule marks all of guest RAM so, and its RAM is in
# several smaller pieces when the kernel is mapped from its file.
rss_kib() {
    awk -v lim=$((MEM_MIB * 1024)) -v dd="${2:-0}" '
        /^Size:/ { size = $2 }
        /^Rss:/ { r = $2 }
        /^VmFlags:/ { if (size < lim && !(dd && / dd( |$)/)) rss += r }
        END { print rss + 0 }' "/proc/$1/smaps"
}

# one VMM: boot once, print the line.
one() {
    vmm=$1
    out="$WORK/$vmm.out" err="$WORK/$vmm.err"
    rm -f "$out" "$err" "$WORK/fifo"
    mkfifo "$WORK/fifo"
    exits_arm
    t0=$(now_ns)
    open=""
    [ "$vmm" = capsule-open ] && open="--no-seccomp --no-landlock"
    [ "$vmm" = capsule-jail ] && open="--jail --chroot-base $WORK/jail --id bench"
    [ "$vmm" = capsule-mmio-blk ] && open="--transport mmio --disk $WORK/blk.img,ro"
    [ "$vmm" = capsule-pci-blk ] && open="--transport pci --disk $WORK/blk.img,ro"
    bin="$CAPSULE"
    [ "$vmm" = capsule-base ] && bin="$CAPSULE_BASE"
    case "$vmm" in
    capsule*)
        # shellcheck disable=SC2086 # $open is two words or none
        CAPSULE_LOG=info,capsule::setup=debug "$bin" run --kernel "$VMLINUX" --initrd "$INITRD" \
            --cpus 1 --memory ${MEM_MIB}M --cmdline "$CMDLINE" $open \
            </dev/null >"$WORK/fifo" 2>"$err" &
        ;;
    firecracker)
        "$FC" --no-api --no-seccomp --config-file "$WORK/fc.json" \
            </dev/null >"$WORK/fifo" 2>"$err" &
        ;;
    cloud-hypervisor)
        "$CH" --kernel "$VMLINUX" --initramfs "$INITRD" --cmdline "$CMDLINE" \
            --cpus boot=1 --memory size=${MEM_MIB}M --serial tty --console off \
            </dev/null >"$WORK/fifo" 2>"$err" &
        ;;
    *)
        "$QEMU" -M microvm -accel kvm -cpu host -m ${MEM_MIB}M -smp 1 \
            -nodefaults -no-user-config -display none -no-reboot -L "$QEMU_FW" \
            -serial stdio -kernel "$BZIMAGE" -initrd "$INITRD" -append "$CMDLINE" \
            </dev/null >"$WORK/fifo" 2>"$err" &
        ;;
    esac
    pid=$!
    # The console stays open (and drained) until the VMM is gone: a VMM
    # must not die of a closed stdout before it is measured.
    exec 4<"$WORK/fifo"
    t1=""
    while IFS= read -r line <&4; do
        case "$line" in
        *"capsule-guest: ready"*)
            t1=$(now_ns)
            ready="$line"
            exits_report "$vmm"
            break
            ;;
        esac
    done
    cat <&4 >"$out" &
    drain=$!
    if [ -z "$t1" ]; then
        exits_report "$vmm" >/dev/null
        echo "bench-boot: error $vmm: no ready line; stderr: $(tail -n 3 "$err" | tr '\n' ' ')"
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        exec 4<&-
        wait "$drain" 2>/dev/null
        return
    fi
    sleep 1
    case "$vmm" in capsule*) rss=$(rss_kib "$pid" 1) ;; *) rss=$(rss_kib "$pid") ;; esac
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    exec 4<&-
    wait "$drain" 2>/dev/null
    line="bench-boot: $vmm ready_ms=$(((t1 - t0) / 1000000)) rss_kib=$rss"
    # The guest kernel's own clock at its ready line (uptime=S.CC), and
    # the rest of the time to it: the VMM's start-up and the kernel's
    # first steps before its clock starts.
    up=$(printf '%s\n' "$ready" | sed -n 's/.* uptime=\([0-9]*\)\.\([0-9][0-9]\).*/\1\2/p' | tr -d '\r')
    if [ -n "$up" ]; then
        # centiseconds, without leading zeros (not octal to $(( )))
        up=${up#"${up%%[!0]*}"}
        guest_ms=$((${up:-0} * 10))
        line="$line guest_ms=$guest_ms outside_ms=$(((t1 - t0) / 1000000 - guest_ms))"
    fi
    if [ "${vmm#capsule}" != "$vmm" ]; then
        m=$(sed -n 's/.*boot marker 1: \([0-9.]*\) ms since capsule started, \([0-9.]*\) ms CPU.*/marker_ms=\1 marker_cpu_ms=\2/p' "$err")
        line="$line ${m:-marker_ms=- marker_cpu_ms=-}"
        v=$(sed -n 's/.*VM started: .*, \([0-9.]*\) ms after capsule started.*/vm_started_ms=\1/p' "$err")
        line="$line ${v:-vm_started_ms=-}"
    fi
    echo "$line"
    # capsule's setup steps (its capsule::setup log): ms since the step
    # before, named after the log line.
    if [ "${vmm#capsule}" != "$vmm" ]; then
        echo "bench-boot: steps $vmm $(awk '/: debug: .* at [0-9.]+ ms$/ {
            t = $(NF - 1); name = $0
            sub(/^capsule: debug: /, "", name); sub(/ at [0-9.]+ ms$/, "", name)
            gsub(/[^A-Za-z0-9]+/, "_", name)
            printf "%s=%.1f ", name, t - prev; prev = t }' "$err")"
    fi
}

# api VMM: start VMM with an API socket and nothing else; time until the
# socket first accepts a connection and until it first answers a request
# (capsule-api-probe: connects every 100 us from just before the start),
# and for capsule its own "API ready" log line.
api() {
    sock="$WORK/api.sock"
    rm -f "$sock"
    url=/
    err=/dev/null
    case "$1" in
    capsule | capsule-base)
        bin="$CAPSULE"
        [ "$1" = capsule ] || bin="$CAPSULE_BASE"
        err="$WORK/api.err"
        set -- "$1" "$bin" run --api-sock "$sock" ;;
    firecracker) set -- "$1" "$FC" --no-seccomp --api-sock "$sock" ;;
    limit) set -- "$1" "$TOOLS/capsule-api-probe" --serve "$sock" ;;
    cloud-hypervisor)
        url=/api/v1/vmm.ping
        set -- "$1" "$CH" --api-socket path="$sock" ;;
    esac
    vmm="$1"
    shift
    # capsule's log (its API-ready line) goes to a file.
    if ! t=$(CAPSULE_LOG=info "$TOOLS/capsule-api-probe" --stderr "$err" "$sock" "$url" "$@" 2>&1); then
        echo "bench-boot: error api $vmm: $t"
        return
    fi
    l=""
    case "$vmm" in capsule*) l=$(sed -n 's/.*API ready on .*, \([0-9.]*\) ms after capsule started.*/api_log_ms=\1/p' "$WORK/api.err") ;; esac
    echo "bench-boot: $vmm $t ${l:-api_log_ms=-}"
}

# The transport runs' disk: 1 MiB of zeroes.
dd if=/dev/zero of="$WORK/blk.img" bs=1024 count=1024 2>/dev/null
# Each round starts one VMM further down the list, so that no VMM always
# boots right after the same neighbour (whose exit L1 may still be
# cleaning up after: freeing its guest RAM, its huge pages).
# rotated K WORD...: the words, starting at word K (mod their number).
rotated() {
    k=$1
    shift
    k=$((k % $#))
    while [ "$k" -gt 0 ]; do
        first=$1
        shift
        set -- "$@" "$first"
        k=$((k - 1))
    done
    echo "$@"
}
i=0
while [ "$i" -lt "$BENCH_RUNS" ]; do
    i=$((i + 1))
    if [ -n "${BENCH_TRANSPORT:-}" ]; then
        for v in $(rotated "$i" capsule-mmio-blk capsule-pci-blk); do one "$v"; done
        [ "$BENCH_TRANSPORT" = only ] && continue
    fi
    # shellcheck disable=SC2086 # $PEERS is a list of words
    for v in $(rotated "$i" capsule ${CAPSULE_BASE:+capsule-base} qemu $PEERS capsule-open capsule-jail); do
        one "$v"
    done
    api capsule
    [ -z "${CAPSULE_BASE:-}" ] || api capsule-base
    for p in $PEERS; do api "$p"; done
    api limit
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
    copy_tools "$work/tools" qemu-system-x86_64 date
    cp "$(dirname "$capsule")/capsule-api-probe" "$work/tools/"
    peers="$(copy_peers "$work/tools")"
    copy_qemu_firmware "$work/qemu-fw"
    write_runner "$work/bench-run.sh"
    local base="" l1_base=""
    if [[ -n "${BENCH_CAPSULE_BASE:-}" ]]; then
        [[ -x "$BENCH_CAPSULE_BASE" ]] || die "BENCH_CAPSULE_BASE: $BENCH_CAPSULE_BASE is not an executable"
        cp "$BENCH_CAPSULE_BASE" "$work/capsule-base"
        base=capsule-base l1_base=/capsule/capsule-base
    fi

    log "mode: $mode; $runs runs per VMM"
    results="$work/results"
    if [[ "$mode" == direct ]]; then
        mkdir -p "$work/run"
        CAPSULE="$capsule" QEMU="$work/tools/qemu-system-x86_64" QEMU_FW="$work/qemu-fw" \
            DATE="$work/tools/date" BZIMAGE="$kdir/bzImage" INITRD="$initrd" \
            VMLINUX="$kdir/vmlinux" PEERS="$peers" TOOLS="$work/tools" BENCH_TRANSPORT="${BENCH_TRANSPORT:-}" \
            CAPSULE_BASE="${base:+$work/capsule-base}" KVM_HOST_LIB="$CAPSULE_RESOURCES_DIR/kvm-host.sh" \
            BENCH_RUNS="$runs" WORK="$work/run" sh "$work/bench-run.sh" | tee "$results" >&2
    else
        cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
mkdir -p /tmp/bench
export CAPSULE=/capsule/capsule QEMU=/capsule/tools/qemu-system-x86_64 QEMU_FW=/capsule/qemu-fw
export DATE=/capsule/tools/date BZIMAGE=/capsule/bzImage INITRD=/capsule/initramfs.cpio.gz
export VMLINUX=/capsule/vmlinux PEERS='$peers' TOOLS=/capsule/tools BENCH_EXITS='${BENCH_EXITS:-}'
export KVM_HOST_LIB=/capsule/kvm-host.sh CAPSULE_PIN_CPU='${BENCH_PIN_CPU:-}'
export BENCH_TRANSPORT='${BENCH_TRANSPORT:-}' CAPSULE_BASE='$l1_base'
export BENCH_RUNS=$runs WORK=/tmp/bench
exec sh /capsule/bench-run.sh
EOF
        export CAPSULE_L1_TIMEOUT=$((300 + runs * 150))
        run_in_l1_retrying "$results" \
            "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$kdir/vmlinux" "$initrd" "$work/tools" \
            "$work/qemu-fw" "$work/bench-run.sh" "$CAPSULE_RESOURCES_DIR/kvm-host.sh" ${base:+"$work/capsule-base"}
    fi
    grep '^bench-boot: error' "$results" >&2 || true
    if [[ -n "${BENCH_RESULTS:-}" ]]; then
        grep '^bench-boot: ' "$results" >>"$BENCH_RESULTS" || true
        results="$BENCH_RESULTS"
        runs="$(grep -c '^bench-boot: capsule ready_ms=' "$results" || true)"
    fi

    # value VMM KEY: the KEY values of VMM's runs, one a line.
    value() {
        sed -n "s/^bench-boot: $1 .*$2=\([0-9.]*\).*/\1/p" "$results"
    }
    if [[ -n "${BENCH_TRANSPORT:-}" ]]; then
        transport_table
        [[ "$BENCH_TRANSPORT" == only ]] && return
    fi
    local vmms="capsule $base qemu $peers" vmm
    echo
    echo "Boot, capsule beside each peer (1 vCPU, 128 MiB, same initramfs/cmdline; vmlinux, QEMU bzImage; mode=$mode; $runs runs each, alternating)"
    [[ -n "$peers" ]] || echo "(Firecracker and Cloud Hypervisor not found in $(capsule_anchors_dir): their columns are left out)"
    printf '%-42s' "measurement (min / median / max)"
    for vmm in $vmms; do printf ' %25s' "$vmm"; done
    # short VMM: the ratio columns' names.
    short() { case "$1" in firecracker) echo fc ;; cloud-hypervisor) echo ch ;; *) echo "$1" ;; esac; }
    for vmm in $vmms; do [[ $vmm == capsule ]] || printf ' %7s' "c/$(short "$vmm")"; done
    echo
    # ratio A B: A / B, 2 decimals, or "-".
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2f", a / b; else print "-" }'; }
    row() { # LABEL KEY DIVISOR
        local c x cm
        printf '%-42s' "$1"
        for vmm in $vmms; do
            read -r -a x <<<"$(value "$vmm" "$2" | awk -v d="$3" '{ print $1 / d }' | min_median_max %.1f)"
            [[ $vmm == capsule ]] && cm="${x[1]}"
            printf ' %25s' "${x[0]} / ${x[1]} / ${x[2]}"
            c+=" ${x[1]}"
        done
        read -r -a c <<<"$c"
        local i=0
        for vmm in $vmms; do
            [[ $vmm == capsule ]] || printf ' %7s' "$(ratio "$cm" "${c[$i]}")"
            i=$((i + 1))
        done
        echo
    }
    row "process start -> guest userspace, ms" ready_ms 1
    row "  the guest kernel's clock then, ms" guest_ms 1
    row "  the rest: VMM + kernel before its clock" outside_ms 1
    row "VMM resident memory excl. guest RAM, MiB" rss_kib 1024
    row "start -> API socket accepts, ms" socket_ms 1
    row "start -> API socket answers, ms" api_ms 1
    local m cpu
    read -r -a m <<<"$(value capsule marker_ms | min_median_max %.1f)"
    read -r -a cpu <<<"$(value capsule marker_cpu_ms | min_median_max %.1f)"
    local v
    read -r -a v <<<"$(value capsule vm_started_ms | min_median_max %.1f)"
    printf '%-44s %26s %26s %8s\n' "capsule: process start -> vCPUs running, ms" "${v[0]} / ${v[1]} / ${v[2]}" "n/a" "-"
    printf '%-44s %26s %26s %8s\n' "capsule boot marker: wall ms" "${m[0]} / ${m[1]} / ${m[2]}" "n/a" "-"
    printf '%-44s %26s %26s %8s\n' "capsule boot marker: process CPU ms" "${cpu[0]} / ${cpu[1]} / ${cpu[2]}" "n/a" "-"
    local al
    read -r -a al <<<"$(value capsule api_log_ms | min_median_max %.1f)"
    printf '%-44s %26s %26s %8s\n' "capsule: main() -> API ready (its log), ms" "${al[0]} / ${al[1]} / ${al[2]}" "n/a" "-"
    read -r -a al <<<"$(value limit api_ms | min_median_max %.1f)"
    printf '%-44s %26s %26s %8s\n' "limit: start -> a minimal server answers, ms" "${al[0]} / ${al[1]} / ${al[2]}" "n/a" "-"

    steps_table "capsule $base"

    if grep -q '^bench-boot: exits ' "$results"; then
        echo
        echo "L1 KVM exits from process start to the ready line, median per boot (BENCH_EXITS=1; SVM exit codes, userspace reasons: 2 I/O, 6 MMIO; interrupts injected by vector)"
        # shellcheck disable=SC2086 # one VMM a word
        exits_table "$results" "bench-boot: exits" $vmms
    fi
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

# steps_table VMMS: median (and max) ms of each of capsule's setup steps
# since the step before, per capsule build in VMMS, from the "steps"
# lines: where the time before the guest runs goes, and which step
# stretches in the slow runs.
steps_table() {
    grep -q '^bench-boot: steps ' "$results" || return 0
    echo
    echo "capsule's setup steps: ms since the step before (its capsule::setup log), median / max"
    local vmm
    for vmm in $1; do
        sed -n "s/^bench-boot: steps $vmm //p" "$results" | awk -v v="$vmm" '
            { n++; for (i = 1; i <= NF; i++) { split($i, kv, "="); if (!(kv[1] in seen)) { seen[kv[1]] = 1; order[++k] = kv[1] }
              val[kv[1], ++cnt[kv[1]]] = kv[2] } }
            END {
                if (!n) exit
                printf "%-14s", v
                for (j = 1; j <= k; j++) {
                    key = order[j]; c = cnt[key]; delete a
                    for (x = 1; x <= c; x++) a[x] = val[key, x] + 0
                    for (x = 2; x <= c; x++) { y = a[x]; z = x - 1; while (z > 0 && a[z] > y) { a[z + 1] = a[z]; z-- } a[z + 1] = y }
                    m = (c % 2) ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
                    printf " %s=%.1f/%.1f", key, m, a[c]
                }
                print ""
            }'
    done
}

# transport_table: capsule with one virtio-blk disk over virtio-mmio and
# over virtio-pci (BENCH_TRANSPORT), from $results via value().
transport_table() {
    echo
    echo "Transport: one read-only 1 MiB virtio-blk disk over virtio-mmio vs virtio-pci (--transport pci; same runs, alternating)"
    printf '%-40s %26s %26s %6s\n' "measurement (min / median / max)" "mmio" "pci" "p/m"
    local row
    for row in "process start -> guest userspace, ms|ready_ms|1" "boot marker: wall ms|marker_ms|1" \
        "boot marker: process CPU ms|marker_cpu_ms|1" "VMM resident memory excl. guest RAM, MiB|rss_kib|1024"; do
        IFS='|' read -r label key div <<<"$row"
        local m p
        read -r -a m <<<"$(value capsule-mmio-blk "$key" | awk -v d="$div" '{ print $1 / d }' | min_median_max %.1f)"
        read -r -a p <<<"$(value capsule-pci-blk "$key" | awk -v d="$div" '{ print $1 / d }' | min_median_max %.1f)"
        printf '%-40s %26s %26s %6s\n' "$label" "${m[0]} / ${m[1]} / ${m[2]}" "${p[0]} / ${p[1]} / ${p[2]}" \
            "$(awk -v a="${p[1]}" -v b="${m[1]}" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2f", a / b; else print "-" }')"
    done
}

main "$@"
