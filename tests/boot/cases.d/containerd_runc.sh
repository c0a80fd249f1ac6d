# shellcheck shell=sh
# tests/boot/cases.d/containerd_runc.sh: what a capsule container costs
# next to a runc one, in the same L1 and the same containerd (issue 24):
# `ctr run` to the container's first output line and to its end, and the
# host memory of a running sandbox, alternating runtime run by run.
# Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1. Uses
# containerd.sh's helpers (containerd_case_begin, runtime_first, tree_kb, ...).
#
# runc is Debian's (with Debian's containerd-shim-runc-v2): tests/boot/run.sh
# ships both with their libraries in $TOOLS/containerd/native, and this
# case puts the libraries where the loader looks, since both re-execute
# /proc/self/exe and so cannot run through a loader wrapper. L1's root is
# an initramfs, which cannot be pivot_root'ed away from: runc runs its
# containers with --no-pivot (chroot), as on any initramfs root.

# shellcheck disable=SC2016  # $... in container commands is for the guest shell
# shellcheck disable=SC2086  # $_ctr and $1 (a runtime's options) are several words
# Optional (run by name): a benchmark-like row, not a check of capsule.
OPTIONAL_CASES="${OPTIONAL_CASES:-} containerd_runc"

# runc_prereqs: runc and its shim runnable in L1, cgroup v2 mounted.
runc_prereqs() {
    _nat="${TOOLS:-/nonexistent}/containerd/native"
    if [ ! -x "$_nat/bin/runc" ] || [ ! -x "$_nat/bin/containerd-shim-runc-v2" ]; then
        CASE_ERRORS="not run: no runc in \$TOOLS/containerd/native (tests/boot/run.sh ships it for containerd_runc)"
        SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
        return 1
    fi
    mkdir -p /lib64 /lib/x86_64-linux-gnu
    for _l in "$_nat"/lib/*; do
        [ -e "/lib/x86_64-linux-gnu/${_l##*/}" ] || cp "$_l" /lib/x86_64-linux-gnu/
    done
    [ -e /lib64/ld-linux-x86-64.so.2 ] || cp "$_nat/lib/ld-linux-x86-64.so.2" /lib64/
    if ! grep -q '^[^ ]* /sys/fs/cgroup cgroup2 ' /proc/mounts; then
        mkdir -p /sys/fs/cgroup
        mount -t cgroup2 cgroup2 /sys/fs/cgroup
    fi
    if ! "$_nat/bin/runc" --version >/dev/null 2>&1; then
        CASE_ERRORS="not run: runc does not start in L1: $("$_nat/bin/runc" --version 2>&1 | head -n 1)"
        SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
        return 1
    fi
}

# runtime_rss RUNTIME_OPTS NAME DIR ROOT: host memory of a running
# container: its shim and everything under it (runc: the container's
# processes; capsule: capsule and virtiofsd).
runtime_rss() {
    timeout -k 10 "$CASE_TIMEOUT" $_ctr run --rm $1 --rootfs "$4" "$2" \
        /bin/sh -c 'echo up; exec sleep 600' </dev/null >"$3/$2.out" 2>&1 &
    _m=$!
    if wait_line "$3/$2.out" up 120; then
        sleep 2
        _task=$($_ctr task ls | awk -v n="$2" '$1 == n { print $2 }')
        _shim=$(awk '{ print $4 }' "/proc/$_task/stat")
        tree_kb "$_shim" >"$3/$2.kb"
    fi
    $_ctr task kill -s SIGKILL "$2" >/dev/null 2>&1
    wait "$_m"
}

# shellcheck disable=SC2154  # _d, _root, _start: set by containerd_case_begin (containerd.sh)
case_containerd_runc() {
    containerd_prereqs || return
    runc_prereqs || return
    # containerd finds a runtime's shim, and the runc shim finds runc, on PATH.
    _path="$PATH"
    PATH="$TOOLS/containerd/native/bin:$PATH"
    containerd_case_begin containerd_runc "ctr run with runc and with capsule, side by side" || {
        PATH="$_path"
        return
    }
    PATH="$_path"
    _ctr="$TOOLS/containerd/ctr --address $CTRD_SOCK"
    _capsule="--runtime io.containerd.capsule.v2"
    _runc="--runtime io.containerd.runc.v2 --no-pivot"
    RC=0

    # The baseline works: output and exit status through runc.
    timeout -k 10 "$CASE_TIMEOUT" $_ctr run --rm $_runc --rootfs "$_root" r0 \
        /bin/sh -c 'echo hi-runc; exit 7' </dev/null >"$_d/r0.out" 2>&1
    _rc0=$?
    expect "runc: ctr run printed hi-runc" grep -qx hi-runc "$_d/r0.out"
    expect "runc: ctr run ended with 7 (was $_rc0)" test "$_rc0" -eq 7

    # Five of each, alternating, so both see the same machine.
    for _n in 1 2 3 4 5; do
        runtime_first "$_runc" "runc$_n" "$_d" "$_root"
        runtime_first "$_capsule" "capsule$_n" "$_d" "$_root"
    done
    runtime_rss "$_runc" runcm "$_d" "$_root"
    runtime_rss "$_capsule" capsulem "$_d" "$_root"
    for _r in runc capsule; do
        echo "    containerd_runc: $_r: ctr run to first output (ms): $(tr '\n' ' ' <"$_d/$_r.first")median $(median "$_d/$_r.first");" \
            "to the end of ctr run --rm (ms): $(tr '\n' ' ' <"$_d/$_r.end")median $(median "$_d/$_r.end");" \
            "running sandbox RSS $(cat "$_d/${_r}m.kb" 2>/dev/null) KiB"
    done
    expect "ten containers printed their first line" \
        test "$(grep -lx first "$_d"/runc[1-5].out "$_d"/capsule[1-5].out | wc -l)" -eq 10
    expect "both sandboxes' memory was read" test -s "$_d/runcm.kb" -a -s "$_d/capsulem.kb"

    SECS=$(($(now) - _start))
    kill "$CTRD_PID" 2>/dev/null
    wait "$CTRD_PID" 2>/dev/null
    virtiofs_done
    for _f in r0.out runc1.out capsule1.out runcm.out capsulem.out runc.first capsule.first runc.end capsule.end; do
        echo "== $_f" >>"$OUT"
        cat "$_d/$_f" >>"$OUT" 2>/dev/null
    done
    tail -n 40 "$_d/containerd.log" >>"$ERR"
    expect "no Rust panic" no_rust_panic
}
