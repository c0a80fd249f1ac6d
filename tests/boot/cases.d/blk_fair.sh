# shellcheck shell=sh
# tests/boot/cases.d/blk_fair.sh: a guest streaming the largest block
# requests it can must not starve the API or the orderly stop (issue 15,
# item 3). Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1.
#
# The device event-loop thread serves the disk's queue, the API and the
# stop. The case times `GET /` on the API socket with curl, first with the
# guest idle, then while two guest loops read a disk with O_DIRECT in
# 64 MiB blocks (max_sectors_kb raised, so the guest sends requests as large
# as the device's SEG_MAX x SIZE_MAX allow), and then times `capsule stop`.
#
# The bound is relative to the same harness: the nested L1 runs everything
# under TCG, where even an idle `GET /` takes milliseconds and two busy
# guest vCPUs take L1's two CPUs from the event loop, the API thread and
# curl. So a control series, with the guest's two vCPUs spinning and no
# I/O, takes turns with the disk series (STARVE_ROUNDS of each, so both
# see the same stretches of the host's load), and the loaded p95 must stay
# within STARVE_BOUND_MS (100) of the control's p95, in the same VM: what
# is left is the disk's own stall. All three are printed, with each
# series' p99 (its maximum) and its five slowest requests.

# History: optional until it passed. Its first full run in the nested
# harness (2026-12-04, 4 MiB budget, a request could not stop partway)
# measured GET / idle p99 179 ms, loaded p99 399 ms, capsule stop 2.6 s.
# With requests that stop partway and a 1 MiB budget, then a CPU-bound
# control series run once between idle and load, 4 of 5 runs passed
# (2026-12-05); the one failure (loaded 445 ms against the control's
# 245 ms) came while a Debian image was built on the same two host cores,
# because the control and the load ran a minute apart under different
# host load. Since the two series take turns (3 rounds each), two runs
# in a row passed beside other builds and L1s: loaded p99 143.4 / 145.6
# ms against the control's 122.3 / 220.7 ms (idle 68.0 / 112.9), the
# guest reading 377 / 326 MiB/s, capsule stop 1.2 / 1.0 s. In the default
# suite since then. The bound was on p99, which of 60 requests is the
# slowest one: on 2026-12-05 (QEMU 10 + L1 6.12, host load 6.5: two L1s,
# builds, a fuzzer) one loaded request took 391 ms against the control's
# 35 ms, p50 12.5 ms against 4.3, and failed the suite. One slow curl start
# is the host's scheduling; a disk that starves the event loop delays
# every request it overlaps, so the bound is now on p95 (the 57th of 60:
# three outliers allowed).
ALL_CASES="$ALL_CASES disk_starve"

# Each curl is a process start, about 0.7 s under TCG in L1: 60 requests
# per series (p99 of 60 is their maximum).
STARVE_GETS="${STARVE_GETS:-60}"
# The case runs its own capsule under this timeout (it needs more than
# CASE_TIMEOUT: boot, two timed series, the stop).
STARVE_TIMEOUT="${STARVE_TIMEOUT:-480}"
STARVE_BOUND_MS="${STARVE_BOUND_MS:-100}"
# Control and load series alternate in this many rounds each.
STARVE_ROUNDS="${STARVE_ROUNDS:-3}"

# starve_alive: the case's capsule still runs. Once it has ended (a guest
# that triple-faulted resets the VM, and capsule ends), the typing and
# timing below stop at once instead of waiting out each of their
# timeouts (20 minutes in all, seen in CI), and the case fails or is
# rerun promptly.
starve_alive() { kill -0 "$_pid" 2>/dev/null; }

# starve_gets SOCK N FILE: N sequential `GET /` on SOCK, or as many as fit
# in STARVE_GETS_SECS (60) seconds; one line per request in FILE: HTTP
# status and time in ms. A request that gets no answer within 30 s counts
# as 30000 ms.
starve_gets() {
    : >"$3"
    _i=0
    _until=$(($(now) + ${STARVE_GETS_SECS:-60}))
    while [ "$_i" -lt "$2" ] && [ "$(now)" -lt "$_until" ] && starve_alive; do
        _r="$("$TOOLS/curl" -s -o /dev/null --max-time 30 -w '%{http_code} %{time_total}' \
            --unix-socket "$1" http://localhost/)" || _r="000 30"
        echo "$_r" | awk '{ printf "%s %.2f\n", $1, $2 * 1000 }' >>"$3"
        _i=$((_i + 1))
    done
}

# starve_pct FILE P: the P-th percentile (nearest rank) of FILE's times.
starve_pct() {
    awk '{ print $2 }' "$1" | sort -n | awk -v p="$2" '
        { a[NR] = $1 }
        END { i = int((NR * p + 99) / 100); if (i < 1) i = 1; print a[i] }'
}

# starve_slowest FILE: FILE's five longest times, slowest first.
starve_slowest() {
    awk '{ print $2 }' "$1" 2>/dev/null | sort -rn | head -n 5 | tr '\n' ' ' | sed 's/ $//'
}

# starve_all_ok FILE: every request in FILE got 200.
starve_all_ok() { [ -s "$1" ] && ! awk '{ print $1 }' "$1" | grep -qv '^200$'; }

# starve_within LOADED IDLE BOUND: LOADED <= IDLE + BOUND (decimals).
starve_within() { awk -v l="$1" -v i="$2" -v b="$3" 'BEGIN { exit !(l <= i + b) }'; }

# starve_type LINE: types LINE on the guest console (fd 7) and waits for
# the shell's next prompt.
starve_type() {
    starve_alive || return 0
    _p=$(prompt_count "$_sd/stdout.raw")
    printf '%s\n' "$1" >&7
    wait_prompts "$_sd/stdout.raw" "$_p" 60 "$_sd/never" || true
}

# starve_sectors TAG: the value the guest printed as "TAG=N".
starve_sectors() {
    tr -d '\r' <"$_sd/stdout.raw" | sed -n "s/^$1=\([0-9][0-9]*\)\$/\1/p" | tail -n1
}

# starve_round KIND R START: starts the guest's workload START (its loops'
# pids in /tmp/w.pids), times STARVE_GETS / STARVE_ROUNDS `GET /` into
# KIND.txt, then stops the workload. Load rounds add their time to _load_ms.
starve_round() {
    starve_type "$3; echo W-$1-$2-\$((0+1))"
    starve_alive && wait_for "$_sd/stdout.raw" "^W-$1-$2-1" 60 "$_sd/never" || true
    _t0=$(uptime_ms)
    starve_gets "$_sock" $((STARVE_GETS / STARVE_ROUNDS)) "$_sd/round.txt"
    [ "$1" = load ] && _load_ms=$((_load_ms + $(uptime_ms) - _t0))
    cat "$_sd/round.txt" >>"$_sd/$1.txt"
    starve_type 'kill $(cat /tmp/w.pids); rm /tmp/w.pids; sleep 1'
}

case_disk_starve() {
    _sd="$WORK/disk_starve"
    rm -rf "$_sd"
    mkdir -p "$_sd"
    OUT="$_sd/stdout" ERR="$_sd/stderr"
    _name="starve$$"
    _img="$_sd/scratch.img"
    # Sparse: the reads are copies of zero pages, as fast as the host can go.
    dd if=/dev/zero of="$_img" bs=1048576 count=0 seek=512 2>/dev/null
    printf '%s\n' "capsule run --name $_name --disk scratch.img,ro (GET / timed with curl, then capsule stop)" >"$_sd/command"
    mkfifo "$_sd/in"
    exec 7<>"$_sd/in"
    _start=$(now)
    timeout -k 10 "$STARVE_TIMEOUT" "$CAPSULE" run --name "$_name" --kernel "$BZIMAGE" \
        --initrd "$INITRD" --cpus 2 --memory 512M --disk "$_img,ro" \
        <"$_sd/in" >"$_sd/stdout.raw" 2>"$ERR" &
    _pid=$!
    _ready=0
    if wait_for "$_sd/stdout.raw" "$READY" "$CASE_TIMEOUT" "$_sd/never"; then
        wait_for "$_sd/stdout.raw" "$PROMPT" 15 "$_sd/never" || true
        _ready=1
    fi
    _sock=""
    for _s in "/run/capsule/$_name/api.sock" "${XDG_RUNTIME_DIR:-/nonexistent}/capsule/$_name/api.sock" \
        "${TMPDIR:-/tmp}/capsule-$(id -u)/$_name/api.sock"; do
        if [ -S "$_s" ]; then
            _sock="$_s"
            break
        fi
    done

    _idle_p50="" _idle_p99="" _cpu_p50="" _cpu_p95="" _cpu_p99="" _load_p50="" _load_p95="" _load_p99="" _stop_ms="" _stop_rc=""
    _mib=0 _load_s=0 _load_ms=0
    if [ "$_ready" -eq 1 ] && [ -n "$_sock" ]; then
        starve_gets "$_sock" "$STARVE_GETS" "$_sd/idle.txt"
        starve_type 'echo 262144 >/sys/block/vda/queue/max_sectors_kb; echo max_sectors_kb=$(cat /sys/block/vda/queue/max_sectors_kb)'
        starve_type 'echo RDA=$(awk "{ print \$3 }" /sys/block/vda/stat)'
        # Control and load take turns, STARVE_ROUNDS of each, so that both
        # sample the same stretches of the host's load (a build beside the
        # harness moved a whole series by 200 ms when they ran one after
        # the other).
        _round=1
        : >"$_sd/cpu.txt"
        : >"$_sd/load.txt"
        while [ "$_round" -le "$STARVE_ROUNDS" ] && starve_alive; do
            starve_round cpu "$_round" 'for i in 1 2; do (while :; do :; done) & echo $! >>/tmp/w.pids; done'
            starve_round load "$_round" 'for i in 1 2; do (while :; do dd if=/dev/vda of=/dev/null bs=64M iflag=direct 2>/dev/null; done) & echo $! >>/tmp/w.pids; done; sleep 3'
            _round=$((_round + 1))
        done
        starve_type 'echo RDB=$(awk "{ print \$3 }" /sys/block/vda/stat)'
        _a="$(starve_sectors RDA)" _b="$(starve_sectors RDB)"
        _mib=$(((${_b:-0} - ${_a:-0}) / 2048))
        _load_s=$((_load_ms / 1000))
        _idle_p50="$(starve_pct "$_sd/idle.txt" 50)" _idle_p99="$(starve_pct "$_sd/idle.txt" 99)"
        _cpu_p50="$(starve_pct "$_sd/cpu.txt" 50)" _cpu_p99="$(starve_pct "$_sd/cpu.txt" 99)"
        _load_p50="$(starve_pct "$_sd/load.txt" 50)" _load_p99="$(starve_pct "$_sd/load.txt" 99)"
        _cpu_p95="$(starve_pct "$_sd/cpu.txt" 95)" _load_p95="$(starve_pct "$_sd/load.txt" 95)"
        # The orderly stop, with the guest streaming again.
        starve_type 'for i in 1 2; do (while :; do dd if=/dev/vda of=/dev/null bs=64M iflag=direct 2>/dev/null; done) & done; sleep 3'
        _t0=$(uptime_ms)
        "$CAPSULE" stop "$_name" --timeout 30 >"$_sd/stop.out" 2>"$_sd/stop.err"
        _stop_rc=$?
        _stop_ms=$(($(uptime_ms) - _t0))
    fi
    if kill -0 "$_pid" 2>/dev/null; then
        sleep 5
        kill "$_pid" 2>/dev/null
    fi
    wait "$_pid"
    RC=$?
    exec 7>&-
    SECS=$(($(now) - _start))
    tr -d '\r' <"$_sd/stdout.raw" >"$OUT"

    _n_idle=$(wc -l <"$_sd/idle.txt" 2>/dev/null || echo 0)
    _n_load=$(wc -l <"$_sd/load.txt" 2>/dev/null || echo 0)
    _max_load="$(starve_pct "$_sd/load.txt" 100 2>/dev/null)"
    echo "    disk_starve: GET / idle   p50 ${_idle_p50:-?} ms, p99 ${_idle_p99:-?} ms ($_n_idle requests)"
    echo "    disk_starve: GET / guest CPU-bound, no I/O: p50 ${_cpu_p50:-?} ms, p95 ${_cpu_p95:-?} ms, p99 ${_cpu_p99:-?} ms ($(wc -l <"$_sd/cpu.txt" 2>/dev/null || echo 0) requests; slowest: $(starve_slowest "$_sd/cpu.txt"))"
    echo "    disk_starve: GET / loaded p50 ${_load_p50:-?} ms, p95 ${_load_p95:-?} ms, p99 ${_load_p99:-?} ms, max ${_max_load:-?} ms ($_n_load requests; slowest: $(starve_slowest "$_sd/load.txt"); the guest read $_mib MiB in ${_load_s} s meanwhile)"
    echo "    disk_starve: capsule stop took ${_stop_ms:-?} ms (status ${_stop_rc:-?})"
    expect "the guest booted" [ "$_ready" -eq 1 ]
    expect "the API socket exists" [ -n "$_sock" ]
    expect "every idle GET / answered 200" starve_all_ok "$_sd/idle.txt"
    expect "every loaded GET / answered 200" starve_all_ok "$_sd/load.txt"
    expect "at least 40 GET / timed under load" [ "$_n_load" -ge 40 ]
    expect "the guest read at least 64 MiB while GET / was timed" [ "$_mib" -ge 64 ]
    expect "loaded p95 (${_load_p95:-?} ms) within ${STARVE_BOUND_MS} ms of the CPU-bound control's p95 (${_cpu_p95:-?} ms)" \
        starve_within "${_load_p95:-999999}" "${_cpu_p95:-0}" "$STARVE_BOUND_MS"
    expect "capsule stop: status 0" [ "${_stop_rc:-1}" -eq 0 ]
    expect "capsule stop: the VM ended on Ctrl-Alt-Del, within the timeout" \
        eval '! grep -q "did not end\|stopping" "$_sd/stop.err"'
    expect "capsule run: exit status 0" rc_is 0
    expect "no Rust panic" no_rust_panic
}
