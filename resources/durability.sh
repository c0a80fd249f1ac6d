#!/usr/bin/env bash
# resources/durability.sh: crash-durability trials of capsule's virtio-blk
# (issue #20, item 4), in the nested harness.
#
# In every trial a Linux guest (the boot tests' kernel and initramfs, one
# vCPU) writes numbered 4 KiB records to its disk with O_DIRECT and fsync
# and prints `ack N` on its serial console after each one
# (tests/boot/durability-lib.sh); something is killed after a random ack
# (2-40) plus a random 0-0.9 s; then the image is checked: every record
# acknowledged before the kill must be there intact ("lost" otherwise)
# and no slot may hold anything but its own record or zeros ("torn").
#
# Modes (MODE[:CACHE][:ENGINE], CACHE writeback (default) or unsafe, the
# disk's `,cache=`; ENGINE sync (default) or io_uring, its `,engine=`;
# e.g. kill9:io_uring, l1:unsafe:io_uring):
#   kill9  SIGKILL of capsule; the image is a file in L1 (its page cache
#          outlives capsule). All trials in one L1 (the boot case
#          durability_kill9, tests/boot/cases.d/durability.sh).
#   l1     power loss: the whole L1 QEMU is killed with SIGKILL. capsule
#          runs in L1 with `--disk /dev/vda`, an L1 virtio disk backed by
#          a host file with cache=none (run-in-l1.sh's CAPSULE_L1_DISK); the
#          acks reach this script through L1's console; the host file is
#          checked. One fresh L1 per trial.
# With cache=unsafe a flush does not reach the image's storage, so `l1`
# SHOULD lose records (they were only in L1's page cache): that shows the
# check sees a loss.
#
# Prints one line per mode:
#   durability: MODE:CACHE trials T, records acknowledged A, lost L, torn X, boots that never wrote B
# Exits 1 if a writeback mode lost or tore a record, or ran fewer trials
# than asked; unsafe modes are reported, never failed.
#
# The L1s have 1 vCPU and 1024 MiB and run under `nice -n 5`, one at a
# time (flock DURABILITY_LOCK). A boot that never acknowledged a record
# (a stalled nested boot) is not a trial: it is counted and retried, up to
# TRIALS/5 + 2 such boots per mode.
#
# Usage: resources/durability.sh [-n TRIALS] MODE[:CACHE]...
#        e.g. resources/durability.sh -n 100 kill9 l1 l1:unsafe kill9:io_uring
# Env:   DURABILITY_LOG   append every trial's line here (default: stderr only)
#        DURABILITY_LOCK  lock file (default /tmp/capsule-l1-dura.lock)
#        CAPSULE_L1       the L1 configuration (run-in-l1.sh)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=resources/lib.sh
source "$here/lib.sh"
boot_dir="$here/../tests/boot"
# shellcheck source=tests/boot/durability-lib.sh
source "$boot_dir/durability-lib.sh"

# note LINE: a trial's line, on stderr and in DURABILITY_LOG.
note() {
    echo "$1" >&2
    if [[ -n "${DURABILITY_LOG:-}" ]]; then echo "$1" >>"$DURABILITY_LOG"; fi
}

# l1_run SCRIPT [FILE...]: run-in-l1.sh as every trial's L1 runs, under the
# lock (stdout: L1's console).
l1_run() {
    CAPSULE_L1_CPUS=1 CAPSULE_L1_MEMORY=1024 CAPSULE_SKIP_DEPS=1 \
        flock "$lock" nice -n 5 "$here/harness/run-in-l1.sh" "$@"
}

# mode_kill9 CACHE ENGINE TRIALS: the boot case in as many L1s as it
# takes (an L1 that hangs or dies is replaced; its finished trials count).
mode_kill9() {
    local cache="$1" engine="$2" want="$3" log="$work/kill9-$1-$2.log" attempt=0 done_n left
    : >"$log"
    while :; do
        done_n=$(grep -acE '^durability: trial [0-9]+: killed after ack' "$log" || true)
        left=$((want - done_n))
        [[ $left -gt 0 && $attempt -lt 5 ]] || break
        attempt=$((attempt + 1))
        cat >"$work/kill9-l1.sh" <<EOF
#!/bin/sh
export CAPSULE=/capsule/capsule BZIMAGE=/capsule/bzImage VMLINUX=/capsule/bzImage
export INITRD=/capsule/initramfs.cpio.gz KVM_HOST_LIB=/capsule/kvm-host.sh
export CASES=durability_kill9 CASE_TIMEOUT=240 DURABILITY_TRIALS=$left DURABILITY_CACHE=$cache
export DURABILITY_ENGINE=$engine
exec sh /capsule/boot/cases.sh
EOF
        log "$label: L1 run $attempt for $left trial(s)"
        CAPSULE_L1_TIMEOUT=$((600 + left * 150)) l1_run "$work/kill9-l1.sh" \
            "$capsule" "$kdir/bzImage" "$initrd:initramfs.cpio.gz" "$boot_dir:boot" \
            "$here/kvm-host.sh" </dev/null 2>>"$work/l1.err" | sed -u 's/\r$//' |
            grep -a --line-buffered -E '^durability: ' | tee -a "$log" >&2 || true
    done
    TRIALS=0 ACKED=0 LOST=0 TORN=0 NORUN=0
    while read -r _ _ _ _ _ _ last _ lost _ torn; do
        TRIALS=$((TRIALS + 1))
        ACKED=$((ACKED + ${last%:} + 1))
        LOST=$((LOST + lost))
        TORN=$((TORN + torn))
    done < <(grep -aE '^durability: trial [0-9]+: killed after ack [0-9]+: lost [0-9]+ torn [0-9]+$' "$log")
    NORUN=$(grep -acE '^durability: trial [0-9]+: no record acknowledged' "$log" || true)
    if [[ -n "${DURABILITY_LOG:-}" ]]; then sed "s/^/$label: /" "$log" >>"$DURABILITY_LOG"; fi
}

# write_l1_trial_script PATH CACHE ENGINE: the L1 side of an `l1` trial:
# capsule with the writer guest on L1's /dev/vda, its console on L1's
# console.
write_l1_trial_script() {
    local opt=""
    [[ "$2" == writeback ]] || opt=",cache=$2"
    [[ "$3" == sync ]] || opt="$opt,engine=$3"
    cat >"$1" <<EOF
#!/bin/sh
# An l1 durability trial (generated by resources/durability.sh).
. /capsule/durability-lib.sh
mkfifo /tmp/in
: >/tmp/out
# Type the writer once the guest's shell is up; hold stdin open.
(
    exec 3>/tmp/in
    i=0
    while [ \$i -lt 1200 ] && ! tr -d '\r' </tmp/out | grep -q 'capsule-guest:.*# '; do
        sleep 0.2
        i=\$((i + 1))
    done
    printf '%s\n' "\$DURABILITY_WRITER" >&3
    sleep 100000
) &
/capsule/capsule run --kernel /capsule/bzImage --initrd /capsule/initramfs.cpio.gz \\
    --cpus 1 --memory 256M --disk /dev/vda$opt </tmp/in 2>&1 | tee /tmp/out
EOF
    chmod 755 "$1"
}

# l1_trial CACHE T: one power-loss trial; sets LAST (-1: the guest never
# acknowledged a record) and adds to LOST and TORN.
l1_trial() {
    local cache="$1" t="$2" img="$work/l1disk.img" con="$work/l1-console" pidf="$work/l1.pid"
    local at deadline rpid qpid start=$SECONDS
    rm -f "$img" "$con" "$pidf"
    head -c $((DURABILITY_SLOTS * 4096)) /dev/zero >"$img"
    : >"$con"
    CAPSULE_L1_DISK="$img" CAPSULE_L1_PIDFILE="$pidf" CAPSULE_L1_TIMEOUT=900 \
        l1_run "$work/l1-trial.sh" "$capsule" "$kdir/bzImage" "$initrd:initramfs.cpio.gz" \
        "$boot_dir/durability-lib.sh" </dev/null >"$con" 2>>"$work/l1.err" &
    rpid=$!
    at=$(($(rand 39) + 2))
    # The L1 boot, the guest's boot, then the acks.
    deadline=$((SECONDS + 600))
    while kill -0 "$rpid" 2>/dev/null && [[ $SECONDS -lt $deadline ]]; do
        if tr -d '\r' <"$con" | grep -aqE "^ack $at\$"; then
            sleep "0.$(rand 10)"
            break
        fi
        sleep 0.2
    done
    qpid="$(cat "$pidf" 2>/dev/null || true)"
    if [[ -n "$qpid" ]]; then kill -9 "$qpid" 2>/dev/null || true; fi
    wait "$rpid" 2>/dev/null || true
    LAST=$(tr -d '\r' <"$con" | grep -aE '^ack [0-9]+$' | tail -n1 | cut -d' ' -f2)
    LAST=${LAST:--1}
    if [[ "$LAST" -lt 0 ]]; then
        note "durability: $label: trial $t: no record acknowledged (last console line: $(tr -d '\r' <"$con" | grep -av '^$' | tail -n1 | cut -c1-120))"
        return 0
    fi
    local lost0=$LOST torn0=$TORN
    if ! durability_check "$img" "$LAST" "$work/check" 2> >(sed "s/^/  $label: trial $t: /" >&2); then
        note "durability: $label: trial $t: the check could not run; counted as torn"
        TORN=$((TORN + 1))
    fi
    note "durability: $label: trial $t: killed after ack $LAST: lost $((LOST - lost0)) torn $((TORN - torn0)) ($((SECONDS - start)) s)"
    rm -f "$img"
}

# mode_l1 CACHE ENGINE TRIALS
mode_l1() {
    local cache="$1" want="$3" t=0
    write_l1_trial_script "$work/l1-trial.sh" "$cache" "$2"
    TRIALS=0 ACKED=0 LOST=0 TORN=0 NORUN=0
    while [[ $TRIALS -lt $want && $NORUN -le $((want / 5 + 2)) ]]; do
        t=$((t + 1))
        l1_trial "$cache" "$t"
        if [[ "$LAST" -lt 0 ]]; then
            NORUN=$((NORUN + 1))
            continue
        fi
        TRIALS=$((TRIALS + 1))
        ACKED=$((ACKED + LAST + 1))
    done
}

main() {
    local trials=100 fail=0 spec mode cache engine opt started
    if [[ "${1:-}" == -n ]]; then
        trials="${2:-}"
        shift 2 || true
    fi
    if [[ $# -eq 0 || ! "$trials" =~ ^[1-9][0-9]*$ || "${1:-}" == -h || "${1:-}" == --help ]]; then
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
        exit 2
    fi
    for spec in "$@"; do
        [[ "$spec" =~ ^(kill9|l1)(:(writeback|unsafe|sync|io_uring)){0,2}$ ]] ||
            die "unknown mode '$spec' (kill9 or l1, optionally :writeback or :unsafe and :sync or :io_uring)"
    done
    lock="${DURABILITY_LOCK:-/tmp/capsule-l1-dura.lock}"

    "$here/install-deps.sh"
    capsule="$(CAPSULE_SKIP_DEPS=1 "$here/build-capsule.sh")"
    kdir="$(CAPSULE_SKIP_DEPS=1 "$here/build-guest-kernel.sh")"
    initrd="$(CAPSULE_SKIP_DEPS=1 "$here/build-guest-initramfs.sh")"

    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-durability.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    results=()
    for spec in "$@"; do
        mode="${spec%%:*}"
        cache=writeback
        engine=sync
        for opt in $(tr : ' ' <<<"${spec#"$mode"}"); do
            case "$opt" in
            writeback | unsafe) cache="$opt" ;;
            *) engine="$opt" ;;
            esac
        done
        # The label of the mode's lines: as before for the sync engine.
        label="$mode:$cache"
        [[ "$engine" == sync ]] || label="$label:$engine"
        started=$SECONDS
        log "durability: $label, $trials trials"
        case "$mode" in
        kill9) mode_kill9 "$cache" "$engine" "$trials" ;;
        l1) mode_l1 "$cache" "$engine" "$trials" ;;
        esac
        line="durability: $label trials $TRIALS, records acknowledged $ACKED, lost $LOST, torn $TORN, boots that never wrote $NORUN ($((SECONDS - started)) s)"
        note "$line"
        results+=("$line")
        if [[ "$cache" == writeback ]] && [[ $LOST -ne 0 || $TORN -ne 0 || $TRIALS -lt $trials ]]; then
            fail=1
        fi
    done
    printf '%s\n' "${results[@]}"
    exit "$fail"
}

main "$@"
