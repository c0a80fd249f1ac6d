# shellcheck shell=sh
# tests/boot/cases.d/bench_exec.sh: `capsule exec` stdout throughput, in
# one harness run, over the three channels a command's bytes can take:
# the exec session over vsock (the default; with `head -c`, whose busybox
# writes 4 KiB at a time, and with `dd bs=256k`), the older virtio-console
# session (CAPSULE_EXEC_CHANNEL=console), and plain TCP over virtio-net
# (a TAP device, busybox nc) for comparison. Optional (run by name, e.g.
# through resources/bench-exec.sh): a measurement, not a check of capsule's
# behaviour, and minutes long under the nested harness.
#
# Sizes: BENCH_EXEC_MIB (vsock and TCP, default 256) and
# BENCH_CONSOLE_MIB (default 16: the console channel moves about 0.4 MiB/s
# under the harness). Each exec's transfer time is its wall time minus the
# moment capsule logged the command's start (so the boot is left out);
# the TCP one is timed by the guest around its sender. The bytes land in a
# file in L1's RAM (counted with stat, then removed): a pipe into busybox
# `wc -c`, which reads a few KiB at a time, halved the vsock rows by
# itself (8.6 against 20.1 MiB/s for the same 128 MiB, 2026-12-05).

OPTIONAL_CASES="${OPTIONAL_CASES:-} bench_exec_stdout"

# bench_exec_one CHANNEL MIB [dd]: runs `capsule exec` writing MIB MiB to
# stdout over CHANNEL, with `head -c` (busybox: 4 KiB writes) or, given
# `dd`, `dd bs=256k` (256 KiB writes); prints "bytes seconds" (or nothing
# on failure).
bench_exec_one() {
    _dir="$WORK/bench_exec_$1${3:-}"
    rm -rf "$_dir"
    mkdir -p "$_dir"
    _bytes=$(($2 * 1048576))
    if [ "${3:-}" = dd ]; then
        set -- "$1" "$2" dd if=/dev/zero bs=262144 count=$(($2 * 4))
    else
        set -- "$1" "$2" head -c "$_bytes" /dev/zero
    fi
    _ch="$1"
    shift 2
    _t0=$(cut -d' ' -f1 /proc/uptime)
    CAPSULE_EXEC_CHANNEL="$_ch" CAPSULE_LOG=info,devices::virtio::vsock=debug timeout -k 10 1800 "$CAPSULE" exec \
        --kernel "$BZIMAGE" --disk "$ROOTFS,ephemeral" -- "$@" \
        2>"$_dir/stderr" </dev/null >"$_dir/out.bin"
    _t1=$(cut -d' ' -f1 /proc/uptime)
    stat -c %s "$_dir/out.bin" >"$_dir/count"
    rm -f "$_dir/out.bin"
    _started_ms=$(sed -n 's/.*command started \([0-9]*\) ms after capsule started.*/\1/p' "$_dir/stderr" | head -n1)
    _got=$(tr -d ' ' <"$_dir/count")
    if [ "$_got" != "$_bytes" ] || [ -z "$_started_ms" ]; then
        echo "    bench_exec_stdout: $_ch $*: got ${_got:-0} of $_bytes bytes; stderr:" >&2
        grep -v 'devices::virtio::vsock' "$_dir/stderr" | tail -n 12 | sed 's/^/      | /' >&2
        return 1
    fi
    # What the vsock device saw (packet sizes, credit updates), for the log.
    grep -o 'virtio-vsock: host port.*' "$_dir/stderr" | tail -n 1 | sed 's/^/    bench_exec_stdout: /' >&2
    awk -v t0="$_t0" -v t1="$_t1" -v s="$_started_ms" -v b="$_bytes" \
        'BEGIN { printf "%d %.2f\n", b, (t1 - t0) - s / 1000 }'
}

# bench_tcp MIB: MIB MiB from the guest to the host over TCP on a TAP
# device; prints "bytes seconds".
bench_tcp() {
    net_prepare
    _bytes=$(($1 * 1048576))
    tap_up captb 10.0.9.1/24
    nc -l -p 5009 </dev/null >"$WORK/bench-tcp.bin" 2>/dev/null &
    _srv=$!
    run_capsule bench_exec_tcp "ip addr add 10.0.9.2/24 dev eth0; ip link set eth0 up; sleep 1; t0=\$(cut -d' ' -f1 /proc/uptime); nc 10.0.9.1 5009 -e head -c $_bytes /dev/zero </dev/null; t1=\$(cut -d' ' -f1 /proc/uptime); echo \"TCP-SECS \$(awk -v a=\$t0 -v b=\$t1 'BEGIN { printf \"%.2f\", b - a }')\"; poweroff -f" \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --memory 512M --net tap=captb,mac=02:00:00:00:09:02
    wait "$_srv" 2>/dev/null
    _secs=$(sed -n 's/^TCP-SECS \([0-9.]*\).*/\1/p' "$OUT" | head -n1)
    _got=$(stat -c %s "$WORK/bench-tcp.bin" 2>/dev/null)
    rm -f "$WORK/bench-tcp.bin"
    if [ -z "$_secs" ] || [ "$_got" != "$_bytes" ]; then
        echo "    bench_exec_stdout: tcp: got ${_got:-0} of $_bytes bytes" >&2
        return 1
    fi
    echo "$_bytes $_secs"
}

case_bench_exec_stdout() {
    _mib="${BENCH_EXEC_MIB:-256}"
    _cmib="${BENCH_CONSOLE_MIB:-16}"
    # BENCH_EXEC_ROWS picks rows (default all four): vsock dd console tcp.
    _rows="${BENCH_EXEC_ROWS:-vsock dd console tcp}"
    _v="" _d="" _c="" _n=""
    for _r in $_rows; do
        case "$_r" in
            vsock) _v="$(bench_exec_one vsock "$_mib")" ;;
            dd) _d="$(bench_exec_one vsock "$_mib" dd)" ;;
            console) _c="$(bench_exec_one console "$_cmib")" ;;
            tcp) _n="$(bench_tcp "$_mib")" ;;
        esac
    done
    for _row in "exec over vsock:$_v" "exec over vsock, dd bs=256k:$_d" "exec over virtio-console:$_c" "TCP over virtio-net (TAP):$_n"; do
        _name="${_row%%:*}" _val="${_row#*:}"
        if [ -n "$_val" ]; then
            echo "$_val" | awk -v n="$_name" '{ printf "    bench_exec_stdout: %-28s %4d MiB in %7.2f s = %8.2f MiB/s\n", n, $1 / 1048576, $2, ($1 / 1048576) / ($2 > 0 ? $2 : 0.01) }'
        fi
    done
    for _r in $_rows; do
        case "$_r" in
            vsock) expect "exec over vsock moved its bytes" test -n "$_v" ;;
            dd) expect "exec over vsock (dd) moved its bytes" test -n "$_d" ;;
            console) expect "exec over virtio-console moved its bytes" test -n "$_c" ;;
            tcp) expect "TCP over virtio-net moved its bytes" test -n "$_n" ;;
        esac
    done
    # The rows ran in subshells: no run_capsule here set SECS.
    RC=0 OUT=/dev/null ERR=/dev/null SECS=${SECS:-0}
}

# bench_exec_confinement: `capsule exec ... -- true` BENCH_RUNS times
# (default 5) as always (seccomp filters and Landlock) and with
# `--no-seccomp --no-landlock`, alternating; per run the command's start
# as capsule logs it (ms after capsule started) and the whole run's wall
# time; min / median / max of each. Optional, a measurement (issue #19).
OPTIONAL_CASES="${OPTIONAL_CASES:-} bench_exec_confinement"

# bench_median: min / median / max of the numbers on stdin.
bench_median() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (!NR) { print "- / - / -"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%s / %s / %s\n", v[1], m, v[NR] }'
}

case_bench_exec_confinement() {
    _dir="$WORK/bench_exec_confinement"
    rm -rf "$_dir"
    mkdir -p "$_dir"
    OUT="$_dir/stdout" ERR="$_dir/stderr"
    : >"$OUT"
    : >"$ERR"
    _start=$(now)
    _i=0
    RC=0
    while [ "$_i" -lt "${BENCH_RUNS:-5}" ]; do
        _i=$((_i + 1))
        for _mode in default open; do
            _extra=""
            [ "$_mode" = open ] && _extra="--no-seccomp --no-landlock"
            _t0=$(cut -d' ' -f1 /proc/uptime)
            # shellcheck disable=SC2086  # $_extra is two words or none
            CAPSULE_LOG=info timeout -k 10 "$CASE_TIMEOUT" "$CAPSULE" exec --kernel "$BZIMAGE" \
                --disk "$ROOTFS,ephemeral" $_extra -- true </dev/null >/dev/null 2>"$_dir/run.err" || RC=1
            _t1=$(cut -d' ' -f1 /proc/uptime)
            _ms=$(sed -n 's/.*command started \([0-9]*\) ms after capsule started.*/\1/p' "$_dir/run.err" | head -n1)
            _wall=$(awk -v a="$_t0" -v b="$_t1" 'BEGIN { printf "%d", (b - a) * 1000 }')
            echo "$_mode ${_ms:--} $_wall" >>"$_dir/runs"
            cat "$_dir/run.err" >>"$ERR"
        done
    done
    SECS=$(($(now) - _start))
    for _mode in default open; do
        echo "bench_exec_confinement: $_mode: command started, ms after capsule started (min / median / max): $(awk -v m="$_mode" '$1 == m && $2 != "-" { print $2 }' "$_dir/runs" | bench_median)" | tee -a "$OUT"
        echo "bench_exec_confinement: $_mode: whole exec, wall ms (min / median / max): $(awk -v m="$_mode" '$1 == m { print $3 }' "$_dir/runs" | bench_median)" | tee -a "$OUT"
    done
    expect "every exec ran with status 0" [ "$RC" -eq 0 ]
    expect "no Rust panic" no_rust_panic
}
