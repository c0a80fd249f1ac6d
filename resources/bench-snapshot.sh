#!/usr/bin/env bash
# resources/bench-snapshot.sh: snapshots, restores and clones, capsule
# beside Firecracker (issue #17, item 8).
#
# In one harness run (nested mode: inside one L1; direct: on this host),
# BENCH_RUNS times, alternating the VMMs:
#
#   - snapshot create: the test guest (vmlinux, busybox initramfs, 1 vCPU,
#     128 MiB and 1 GiB, `quiet`) booted from the same Firecracker JSON
#     configuration with an API socket (`capsule run --api-sock S
#     --config-file F`, `firecracker --api-sock S --config-file F`); at
#     its ready line `PATCH /vm` Paused, then `PUT /snapshot/create` (Full),
#     timed around the request; the memory file's allocated and apparent
#     size and the state file's size;
#   - restore: a new VMM process with only its API socket, `PUT
#     /snapshot/load` with `resume_vm`: process start -> load answered
#     (the VM running), and -> the first output of a command typed on the
#     restored guest's console (`echo`);
#   - `capsule exec` cold (`--kernel bzImage --disk rootfs,ephemeral`) vs
#     warm (`exec --snapshot` of a template made once with the same
#     options), process start -> exit, same command;
#   - resident memory of BENCH_CLONES (default 10) capsule clones of the
#     128 MiB snapshot running at once, idle, vs as many cold boots of the
#     same guest: the sum of VmRSS and of Pss (the proportional share: what
#     the clones share of the memory file counts once).
#
# Firecracker is the unmodified build of capsule_anchors_dir
# (resources/lib.sh); without it its columns are left out with a note.
# In nested mode the absolute times are TCG times: compare the columns.
# A benchmark: it prints numbers and never fails on one.
#
# Usage: flock /tmp/capsule-l1.lock resources/bench-snapshot.sh
# Env:   BENCH_RUNS (default 5), BENCH_CLONES (default 10),
#        CAPSULE_HARNESS=direct|nested, CAPSULE_ANCHORS
# stdout: the table; progress on stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# write_runner FILE: the POSIX sh script that measures, printing
# "bench-snapshot: ..." lines.
write_runner() {
    cat >"$1" <<'RUNNER'
#!/bin/sh
# Env: CAPSULE DATE CURL VMLINUX BZIMAGE INITRD ROOTFS BENCH_RUNS
#      BENCH_CLONES WORK PEERS TOOLS
set -u
CMDLINE="console=ttyS0 reboot=k panic=1 quiet"
FC="$TOOLS/firecracker"
now_ns() { "$DATE" +%s%N; }
ms_since() { echo $((($(now_ns) - $1) / 1000000)); }
api() { # SOCK METHOD PATH [BODY]: 0 if the answer is 2xx
    "$CURL" -sf -m 120 --unix-socket "$1" -X "$2" ${4:+-H 'Content-Type: application/json' -d "$4"} "http://localhost$3" >/dev/null
}
wait_api() { # SOCK
    n=0
    while [ $n -lt 3000 ]; do
        "$CURL" -s -m 5 --unix-socket "$1" http://localhost/ >/dev/null 2>&1 && return 0
        n=$((n + 1))
    done
    return 1
}
wait_line() { # FILE TEXT SECS
    n=0
    while [ $n -lt $(($3 * 20)) ]; do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
        n=$((n + 1))
    done
    return 1
}
# start VMM TAG ARGS...: the VMM with stdin the FIFO $WORK/TAG.in (held
# open by a sleeper until the VMM is killed), stdout TAG.out, stderr
# TAG.err; sets PID and HOLD.
start() {
    vmm=$1 tag=$2
    shift 2
    rm -f "$WORK/$tag.in" "$WORK/$tag.out" "$WORK/$tag.err"
    mkfifo "$WORK/$tag.in"
    sleep 100000 >"$WORK/$tag.in" &
    HOLD=$!
    case "$vmm" in
    capsule) CAPSULE_LOG=info "$CAPSULE" run "$@" <"$WORK/$tag.in" >"$WORK/$tag.out" 2>"$WORK/$tag.err" & ;;
    firecracker) "$FC" --no-seccomp "$@" <"$WORK/$tag.in" >"$WORK/$tag.out" 2>"$WORK/$tag.err" & ;;
    esac
    PID=$!
}
stop() {
    kill "$PID" 2>/dev/null
    wait "$PID" 2>/dev/null
    kill "$HOLD" 2>/dev/null
    wait "$HOLD" 2>/dev/null
}
fc_config() { # MIB FILE
    cat >"$2" <<EOF
{ "boot-source": { "kernel_image_path": "$VMLINUX", "initrd_path": "$INITRD", "boot_args": "$CMDLINE" },
  "machine-config": { "vcpu_count": 1, "mem_size_mib": $1 }, "drives": [] }
EOF
}

# snap VMM MIB: boot, snapshot into $WORK/VMM.MIB/, then restore it once.
snap() {
    vmm=$1 mib=$2 d="$WORK/$1.$2"
    rm -rf "$d"
    mkdir -p "$d"
    fc_config "$mib" "$d/config.json"
    start "$vmm" boot --api-sock "$d/api.sock" --config-file "$d/config.json"
    if ! wait_line "$WORK/boot.out" "capsule-guest: ready" 120; then
        echo "bench-snapshot: error $vmm $mib: no ready line: $(tail -n 3 "$WORK/boot.err" | tr '\n' ' ')"
        stop
        return
    fi
    api "$d/api.sock" PATCH /vm '{"state":"Paused"}' || echo "bench-snapshot: error $vmm $mib: pause refused"
    t0=$(now_ns)
    if ! api "$d/api.sock" PUT /snapshot/create \
        "{\"snapshot_type\":\"Full\",\"snapshot_path\":\"$d/state\",\"mem_file_path\":\"$d/memory\"}"; then
        echo "bench-snapshot: error $vmm $mib: snapshot/create failed: $(tail -n 3 "$WORK/boot.err" | tr '\n' ' ')"
        stop
        return
    fi
    create_ms=$(ms_since "$t0")
    stop
    echo "bench-snapshot: $vmm create mib=$mib create_ms=$create_ms mem_alloc_kib=$(du -k "$d/memory" | cut -f1) mem_kib=$(($(wc -c <"$d/memory") / 1024)) state_kib=$(du -k "$d/state" | cut -f1)"
    rm -f "$d/api2.sock"
    t0=$(now_ns)
    start "$vmm" restore --api-sock "$d/api2.sock"
    wait_api "$d/api2.sock"
    if ! api "$d/api2.sock" PUT /snapshot/load \
        "{\"snapshot_path\":\"$d/state\",\"mem_backend\":{\"backend_type\":\"File\",\"backend_path\":\"$d/memory\"},\"resume_vm\":true}"; then
        echo "bench-snapshot: error $vmm $mib: snapshot/load failed: $(tail -n 3 "$WORK/restore.err" | tr '\n' ' ')"
        stop
        return
    fi
    load_ms=$(ms_since "$t0")
    printf 'echo restored-$((40+2))\n' >"$WORK/restore.in"
    if wait_line "$WORK/restore.out" "^restored-42" 60; then
        out_ms=$(ms_since "$t0")
    else
        out_ms=-
        echo "bench-snapshot: error $vmm $mib: the restored guest did not answer"
    fi
    log_ms=$(sed -n 's/.*restored .* in \([0-9.]*\) ms.*/\1/p' "$WORK/restore.err" | head -n1)
    stop
    echo "bench-snapshot: $vmm restore mib=$mib load_ms=$load_ms output_ms=$out_ms log_ms=${log_ms:--}"
    # Only capsule's 128 MiB snapshot is kept (the clones' source): L1's
    # /tmp is RAM.
    [ "$vmm.$mib" = capsule.128 ] || rm -rf "$d"
}

# exec_once KIND: one cold or warm exec of the same command, timed.
exec_once() {
    t0=$(now_ns)
    if [ "$1" = cold ]; then
        "$CAPSULE" exec --kernel "$BZIMAGE" --disk "$ROOTFS,ephemeral" --memory 128M \
            -- sh -c 'echo hello' </dev/null >"$WORK/exec.out" 2>"$WORK/exec.err"
    else
        "$CAPSULE" exec --snapshot "$WORK/tmpl" -- sh -c 'echo hello' \
            </dev/null >"$WORK/exec.out" 2>"$WORK/exec.err"
    fi
    rc=$?
    ms=$(ms_since "$t0")
    if [ $rc -eq 0 ] && [ "$(cat "$WORK/exec.out")" = hello ]; then
        echo "bench-snapshot: exec $1 ms=$ms"
    else
        echo "bench-snapshot: error exec $1: status $rc: $(tail -n 3 "$WORK/exec.err" | tr '\n' ' ')"
    fi
}

# memsum PIDS: "rss_kib=... pss_kib=..." summed over PIDS.
memsum() {
    r=0 p=0
    for q in "$@"; do
        r=$((r + $(awk '/^VmRSS:/ { print $2 }' "/proc/$q/status" 2>/dev/null || echo 0)))
        p=$((p + $(awk '/^Pss:/ { print $2 }' "/proc/$q/smaps_rollup" 2>/dev/null || echo 0)))
    done
    echo "rss_kib=$r pss_kib=$p"
}

# many KIND: BENCH_CLONES capsules at once (clones of the 128 MiB
# snapshot, or cold boots), idle; their summed memory.
many() {
    pids="" i=0
    while [ $i -lt "$BENCH_CLONES" ]; do
        i=$((i + 1))
        if [ "$1" = clones ]; then
            "$CAPSULE" run --restore "$WORK/clone-src" </dev/null >"$WORK/many.$i.out" 2>&1 &
        else
            "$CAPSULE" run --kernel "$VMLINUX" --initrd "$INITRD" --memory 128M --cmdline "$CMDLINE" \
                </dev/null >"$WORK/many.$i.out" 2>&1 &
        fi
        pids="$pids $!"
    done
    i=0
    while [ $i -lt "$BENCH_CLONES" ]; do
        i=$((i + 1))
        [ "$1" = clones ] && want="" || want="capsule-guest: ready"
        [ -z "$want" ] || wait_line "$WORK/many.$i.out" "$want" 180 || echo "bench-snapshot: error $1 $i: not ready"
    done
    sleep 3
    # shellcheck disable=SC2086 # one PID a word
    echo "bench-snapshot: many $1 n=$BENCH_CLONES $(memsum $pids)"
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null
    for q in $pids; do wait "$q" 2>/dev/null; done
}

"$CAPSULE" exec --make-snapshot "$WORK/tmpl" --kernel "$BZIMAGE" --disk "$ROOTFS,ephemeral" \
    --memory 128M </dev/null >/dev/null 2>"$WORK/tmpl.err" ||
    echo "bench-snapshot: error exec --make-snapshot: $(tail -n 3 "$WORK/tmpl.err" | tr '\n' ' ')"
i=0
while [ "$i" -lt "$BENCH_RUNS" ]; do
    i=$((i + 1))
    for mib in 128 1024; do
        snap capsule "$mib"
        for p in $PEERS; do [ "$p" = firecracker ] && snap firecracker "$mib"; done
    done
    exec_once cold
    exec_once warm
done
# The clones' source: capsule's own 128 MiB snapshot, in the layout of
# `capsule snapshot` (run --restore DIR).
mkdir -p "$WORK/clone-src"
ln -f "$WORK/capsule.128/state" "$WORK/clone-src/snapshot" && ln -f "$WORK/capsule.128/memory" "$WORK/clone-src/memory"
many clones
many cold
RUNNER
    chmod 755 "$1"
}

# print_table RESULTS PEERS MODE RUNS: the table from the runs' lines.
print_table() {
    local results="$1" peers="$2" vmms="capsule"
    [[ " $peers " == *" firecracker "* ]] && vmms="capsule firecracker"
    # value VMM WHAT MIB KEY: the KEY values of those lines, one a line.
    value() {
        sed -n "s/^bench-snapshot: $1 $2 mib=$3 .*$4=\([0-9.]*\).*/\1/p" "$results"
    }
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2f", a / b; else print "-" }'; }
    echo
    echo "Snapshots, capsule beside Firecracker (vmlinux + busybox initramfs, 1 vCPU; mode=$3; $4 runs, alternating; $(date -u +%Y-%m-%d))"
    [[ "$vmms" == *firecracker* ]] || echo "(Firecracker not found in $(capsule_anchors_dir): its column is left out)"
    printf '%-52s %24s %24s %6s\n' "measurement (min / median / max)" capsule firecracker "c/fc"
    local mib what key label c f
    for mib in 128 1024; do
        for row in "create create_ms snapshot/create (paused VM), ms" \
            "create mem_alloc_kib memory file allocated, MiB" \
            "create mem_kib memory file apparent size, MiB" \
            "create state_kib state file, KiB" \
            "restore load_ms start -> snapshot/load answered (running), ms" \
            "restore output_ms start -> first command output, ms" \
            "restore log_ms capsule's own restore log, ms"; do
            read -r what key label <<<"$row"
            local div=1
            [[ $key == mem_* ]] && div=1024
            label="$mib MiB: $label"
            read -r -a c <<<"$(value capsule "$what" "$mib" "$key" | awk -v d=$div '{ print $1 / d }' | min_median_max %.1f)"
            f=(- - -)
            if [[ "$vmms" == *firecracker* && $key != log_ms ]]; then
                read -r -a f <<<"$(value firecracker "$what" "$mib" "$key" | awk -v d=$div '{ print $1 / d }' | min_median_max %.1f)"
            fi
            printf '%-52s %24s %24s %6s\n' "$label" "${c[0]} / ${c[1]} / ${c[2]}" "${f[0]} / ${f[1]} / ${f[2]}" "$(ratio "${c[1]}" "${f[1]}")"
        done
    done
    local cold warm
    read -r -a cold <<<"$(sed -n 's/^bench-snapshot: exec cold ms=\([0-9]*\).*/\1/p' "$results" | min_median_max %.0f)"
    read -r -a warm <<<"$(sed -n 's/^bench-snapshot: exec warm ms=\([0-9]*\).*/\1/p' "$results" | min_median_max %.0f)"
    printf '%-52s %24s\n' "capsule exec, cold (start -> exit), ms" "${cold[0]} / ${cold[1]} / ${cold[2]}"
    printf '%-52s %24s   warm/cold %s\n' "capsule exec --snapshot, warm (start -> exit), ms" \
        "${warm[0]} / ${warm[1]} / ${warm[2]}" "$(ratio "${warm[1]}" "${cold[1]}")"
    local k
    for k in clones cold; do
        sed -n "s/^bench-snapshot: many $k n=\([0-9]*\) rss_kib=\([0-9]*\) pss_kib=\([0-9]*\).*/\1 \2 \3/p" "$results" |
            while read -r n r p; do
                printf '%-52s %24s\n' "$n capsule VMs at once, $k: sum of VmRSS / Pss, MiB" \
                    "$((r / 1024)) / $((p / 1024))"
            done
    done
}

main() {
    local runs="${BENCH_RUNS:-5}" clones="${BENCH_CLONES:-10}"
    [[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"
    [[ "$clones" =~ ^[1-9][0-9]*$ ]] || die "BENCH_CLONES must be a positive number"
    "$CAPSULE_RESOURCES_DIR/install-deps.sh"
    export CAPSULE_SKIP_DEPS=1
    local capsule kdir initrd rootfs mode work peers results
    capsule="$("$CAPSULE_RESOURCES_DIR/build-capsule.sh")"
    kdir="$("$CAPSULE_RESOURCES_DIR/build-guest-kernel.sh")"
    initrd="$("$CAPSULE_RESOURCES_DIR/build-guest-initramfs.sh")"
    rootfs="$("$CAPSULE_RESOURCES_DIR/build-guest-rootfs.sh")"
    mode="$("$CAPSULE_RESOURCES_DIR/harness/mode.sh")"
    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-snapshot.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    copy_tools "$work/tools" date curl
    peers="$(copy_peers "$work/tools")"
    write_runner "$work/bench-run.sh"
    results="$work/results"
    log "mode: $mode; $runs runs; $clones clones"
    if [[ "$mode" == direct ]]; then
        mkdir -p "$work/run"
        CAPSULE="$capsule" DATE="$work/tools/date" CURL="$work/tools/curl" VMLINUX="$kdir/vmlinux" \
            BZIMAGE="$kdir/bzImage" INITRD="$initrd" ROOTFS="$rootfs" BENCH_RUNS="$runs" \
            BENCH_CLONES="$clones" WORK="$work/run" PEERS="$peers" TOOLS="$work/tools" \
            sh "$work/bench-run.sh" | tee "$results" >&2
    else
        cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
mkdir -p /tmp/bench
export CAPSULE=/capsule/capsule DATE=/capsule/tools/date CURL=/capsule/tools/curl
export VMLINUX=/capsule/vmlinux BZIMAGE=/capsule/bzImage INITRD=/capsule/initramfs.cpio.gz
export ROOTFS=/capsule/rootfs.ext4 BENCH_RUNS=$runs BENCH_CLONES=$clones WORK=/tmp/bench
export PEERS='$peers' TOOLS=/capsule/tools
exec sh /capsule/bench-run.sh
EOF
        export CAPSULE_L1_TIMEOUT=$((600 + runs * 240))
        run_in_l1_retrying "$results" \
            "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$kdir/vmlinux" "$initrd" "$rootfs" \
            "$work/tools" "$work/bench-run.sh" || true
    fi
    grep '^bench-snapshot: error' "$results" >&2 || true
    print_table "$results" "$peers" "$mode" "$runs"
}

main "$@"
