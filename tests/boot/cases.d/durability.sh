# shellcheck shell=sh
# tests/boot/cases.d/durability.sh: crash durability (issue #20, item 4).
# Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1.
#
# durability_kill9 runs DURABILITY_TRIALS trials (default 20). In each, the
# guest writes numbered 4 KiB records to /dev/vda (record N at offset
# N * 4096, filled with the 8-byte line "%07d\n" of N) with O_DIRECT and
# fsync (dd oflag=direct conv=fsync, which ends in a virtio-blk FLUSH), and
# prints `ack N` on the serial console once dd has returned. The host
# waits for a random ack (2-40), sleeps a random 0-0.9 s more and kills
# capsule with SIGKILL, then checks the image file: every record the host
# saw acknowledged must be there intact (else "lost"), and no record may
# hold anything but its own bytes or zeros (else "torn").
#
# Optional (run by name: CASES=durability_kill9): 20 guest boots take about
# 17 minutes in the nested harness (tests/boot/run.sh gives such an L1 15
# minutes more than its usual 900 s). Results: docs/fuzzing.md.

# shellcheck disable=SC2016  # $n etc. in the guest command are for the guest shell
OPTIONAL_CASES="${OPTIONAL_CASES:-} durability_kill9"

DURABILITY_SLOTS=512
DURABILITY_WRITER='n=0; while [ $n -lt 400 ]; do yes $(printf %07d $n) | head -c 4096 >/tmp/r; dd if=/tmp/r of=/dev/vda bs=4096 seek=$n count=1 oflag=direct conv=notrunc,fsync 2>/dev/null || break; echo "ack $n"; n=$((n+1)); done; echo writer-stopped-$((1+1))'

# rand N: a random number in 0..N-1.
rand() {
    echo $(($(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % $1))
}

# durability_check IMAGE LAST: checks the records of IMAGE against the
# last acknowledged record LAST (-1: none); adds to LOST and TORN.
durability_check() {
    _zero="$WORK/durability/zero4k"
    [ -f "$_zero" ] || head -c 4096 /dev/zero >"$_zero"
    _i=0
    # Records beyond LAST + 8 cannot have been written (the guest writes
    # in order and the kill came while it was at most a few records on).
    _end=$(($2 + 8))
    while [ "$_i" -le "$_end" ]; do
        dd if="$1" of="$WORK/durability/slot" bs=4096 skip="$_i" count=1 2>/dev/null
        yes "$(printf %07d "$_i")" | head -c 4096 >"$WORK/durability/want"
        if cmp -s "$WORK/durability/slot" "$WORK/durability/want"; then
            :
        elif [ "$_i" -le "$2" ]; then
            LOST=$((LOST + 1))
            cmp -s "$WORK/durability/slot" "$_zero" || TORN=$((TORN + 1))
            echo "durability: record $_i was acknowledged but is not on the image" >&2
        elif ! cmp -s "$WORK/durability/slot" "$_zero"; then
            TORN=$((TORN + 1))
            echo "durability: record $_i is torn" >&2
        fi
        _i=$((_i + 1))
    done
    _rest=$((DURABILITY_SLOTS - _end - 1))
    if ! dd if="$1" bs=4096 skip=$((_end + 1)) 2>/dev/null | cmp -s -n $((_rest * 4096)) - /dev/zero; then
        TORN=$((TORN + 1))
        echo "durability: data beyond record $_end" >&2
    fi
}

# durability_trial T: one trial; sets LAST (-1 if the guest never got to
# write) and adds to LOST and TORN.
durability_trial() {
    _dir="$WORK/durability/$1"
    rm -rf "$_dir"
    mkdir -p "$_dir"
    _img="$_dir/data.img" _raw="$_dir/stdout.raw" _fifo="$_dir/stdin.fifo" _done="$_dir/done"
    head -c $((DURABILITY_SLOTS * 4096)) /dev/zero >"$_img"
    printf '%s\n' "$DURABILITY_WRITER" >"$_dir/input"
    : >"$_raw"
    mkfifo "$_fifo"
    feeder "$_fifo" "$_raw" "$_done" "$_dir/input" &
    _feeder_pid=$!
    "$CAPSULE" run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M \
        --disk "$_img" <"$_fifo" >"$_raw" 2>"$_dir/stderr" &
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
    durability_check "$_img" "$LAST"
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
        durability_trial "$_t"
        if [ "$LAST" -lt 0 ]; then
            # The guest never wrote (a boot that stalled or triple-faulted
            # in the nested harness): not a trial; said below.
            _norun=$((_norun + 1))
            echo "durability: trial $_t: no record acknowledged (last console line: $(tail -n1 "$WORK/durability/$_t/stdout.raw" | tr -d '\r'))"
            continue
        fi
        _ran=$((_ran + 1))
        echo "durability: trial $_t: killed after ack $LAST"
    done
    SECS=$(($(now) - _start))
    RC=0 OUT=/dev/null ERR=/dev/null
    echo "durability: trials $_ran (of $_trials; $_norun boots without a write), records acknowledged $ACKED, lost $LOST, torn $TORN"
    expect "$_trials trials ran ($_ran did; $_norun boots never wrote)" [ "$_ran" -eq "$_trials" ]
    expect "no acknowledged record lost ($LOST lost)" [ "$LOST" -eq 0 ]
    expect "no torn record ($TORN torn)" [ "$TORN" -eq 0 ]
    expect "no Rust panic ($PANICS)" [ "$PANICS" -eq 0 ]
}
