# shellcheck shell=sh
# tests/boot/cases.d/durability.sh: crash durability (issue #20, item 4).
# Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1.
#
# durability_kill9 runs DURABILITY_TRIALS trials (default 20). In each, the
# guest writes numbered 4 KiB records to /dev/vda with O_DIRECT and fsync
# and prints `ack N` on the serial console once the record is written
# (the writer and the checker: tests/boot/durability-lib.sh). The host
# waits for a random ack (2-40), sleeps a random 0-0.9 s more and kills
# capsule with SIGKILL, then checks the image file: every record the host
# saw acknowledged must be there intact (else "lost"), and no slot may
# hold anything but its own record or zeros (else "torn"). Each trial
# prints one line, `durability: trial T: killed after ack N: lost L torn T`
# (or `... no record acknowledged ...` for a boot that never wrote), which
# resources/durability.sh tallies.
# DURABILITY_CACHE=unsafe gives the disk `,cache=unsafe` (flushes are not
# carried to the image): the image lives in L1's page cache, which outlives
# capsule, so a SIGKILL loses nothing either way.
# DURABILITY_ENGINE=io_uring gives the disk `,engine=io_uring` (default
# sync: the disk's default engine).
#
# Optional (run by name: CASES=durability_kill9; resources/durability.sh
# runs it with more trials). Results: docs/fuzzing.md.

OPTIONAL_CASES="${OPTIONAL_CASES:-} durability_kill9"

# shellcheck source=tests/boot/durability-lib.sh
. "$CASES_DIR/durability-lib.sh"

# durability_trial T: one trial; sets LAST (-1 if the guest never got to
# write) and adds to LOST and TORN.
durability_trial() {
    _dir="$WORK/durability/$1"
    rm -rf "$_dir"
    mkdir -p "$_dir"
    _img="$_dir/data.img" _raw="$_dir/stdout.raw" _fifo="$_dir/stdin.fifo" _done="$_dir/done"
    head -c $((DURABILITY_SLOTS * 4096)) /dev/zero >"$_img"
    _cache=""
    [ "${DURABILITY_CACHE:-writeback}" = writeback ] || _cache=",cache=$DURABILITY_CACHE"
    [ "${DURABILITY_ENGINE:-sync}" = sync ] || _cache="$_cache,engine=$DURABILITY_ENGINE"
    printf '%s\n' "$DURABILITY_WRITER" >"$_dir/input"
    : >"$_raw"
    mkfifo "$_fifo"
    feeder "$_fifo" "$_raw" "$_done" "$_dir/input" &
    _feeder_pid=$!
    "$CAPSULE" run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M \
        --disk "$_img$_cache" <"$_fifo" >"$_raw" 2>"$_dir/stderr" &
    _pid=$!
    _at=$(($(rand 39) + 2))
    if wait_for "$_raw" "^ack $_at" "$CASE_TIMEOUT" "$_done"; then
        sleep "0.$(rand 10)" 2>/dev/null || true
    fi
    kill -9 "$_pid" 2>/dev/null
    wait "$_pid" 2>/dev/null
    touch "$_done"
    wait "$_feeder_pid" 2>/dev/null
    LAST=$(tr -d '\r' <"$_raw" | grep -E '^ack [0-9]+$' | tail -n1 | cut -d' ' -f2)
    LAST=${LAST:--1}
    if [ "$LAST" -lt 0 ]; then
        return
    fi
    ACKED=$((ACKED + LAST + 1))
    if ! durability_check "$_img" "$LAST" "$WORK/durability/check"; then
        echo "durability: trial $1: the check could not run; counted as torn" >&2
        TORN=$((TORN + 1))
    fi
    rm -f "$_img"
    if grep -q 'panicked at' "$_raw" "$_dir/stderr"; then
        PANICS=$((PANICS + 1))
    fi
}

case_durability_kill9() {
    _trials="${DURABILITY_TRIALS:-20}"
    mkdir -p "$WORK/durability"
    ACKED=0 LOST=0 TORN=0 PANICS=0 _ran=0 _norun=0 _t=0
    _start=$(now)
    while [ "$_ran" -lt "$_trials" ] && [ "$_norun" -le $((_trials / 5)) ]; do
        _t=$((_t + 1))
        _lost0=$LOST _torn0=$TORN
        durability_trial "$_t"
        if [ "$LAST" -lt 0 ]; then
            # The guest never wrote (a boot that stalled or triple-faulted
            # in the nested harness): not a trial; said below.
            _norun=$((_norun + 1))
            echo "durability: trial $_t: no record acknowledged (last console line: $(tail -n1 "$WORK/durability/$_t/stdout.raw" | tr -d '\r'))"
            continue
        fi
        _ran=$((_ran + 1))
        echo "durability: trial $_t: killed after ack $LAST: lost $((LOST - _lost0)) torn $((TORN - _torn0))"
    done
    SECS=$(($(now) - _start))
    RC=0 OUT=/dev/null ERR=/dev/null
    echo "durability: trials $_ran (of $_trials; $_norun boots without a write), records acknowledged $ACKED, lost $LOST, torn $TORN"
    expect "$_trials trials ran ($_ran did; $_norun boots never wrote)" [ "$_ran" -eq "$_trials" ]
    expect "no acknowledged record lost ($LOST lost)" [ "$LOST" -eq 0 ]
    expect "no torn record ($TORN torn)" [ "$TORN" -eq 0 ]
    expect "no Rust panic ($PANICS)" [ "$PANICS" -eq 0 ]
}
