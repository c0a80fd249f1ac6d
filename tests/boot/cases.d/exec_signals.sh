# shellcheck shell=sh
# tests/boot/cases.d/exec_signals.sh: signals sent to `capsule exec` reach
# the command in the guest (issue 24). Sourced by tests/boot/cases.sh;
# POSIX sh for busybox ash in L1.
#
# capsule runs in the background (not under `timeout`, which would get
# the signal instead) with a watchdog that SIGKILLs it after
# $CASE_TIMEOUT; the case waits for the command's "ready" line, signals
# capsule and waits for it to end.

# shellcheck disable=SC2016  # $... in guest commands is for the guest shell
ALL_CASES="$ALL_CASES exec_sig_usr1 exec_sig_term_trapped exec_sig_term_ignored exec_sig_twice"

# The guest command's loop: wakes at once for a trapped signal (the shell
# runs traps while in `wait`, not while a foreground sleep runs).
SIG_LOOP='echo ready; while :; do sleep 1 & wait $!; done'

# sig_case CASE SIGNALS EXTRA_ARGS -- CMD...: starts capsule exec, sends
# each of SIGNALS (space-separated, 1 s apart) once CMD printed "ready";
# sets RC, OUT, ERR, SECS (from the first signal to the end).
sig_case() {
    _name="$1" _sigs="$2"
    shift 2
    _dir="$WORK/$_name"
    rm -rf "$_dir"
    mkdir -p "$_dir"
    OUT="$_dir/stdout" ERR="$_dir/stderr"
    printf '%s\n' "capsule $* (then kill -$_sigs)" >"$_dir/command"
    "$CAPSULE" "$@" </dev/null >"$OUT" 2>"$ERR" &
    _pid=$!
    (sleep "$CASE_TIMEOUT" && kill -KILL "$_pid" 2>/dev/null) &
    _dog=$!
    if wait_for "$OUT" '^ready$' "$CASE_TIMEOUT" "$_dir/none"; then
        _start=$(now)
        for _s in $_sigs; do
            kill "-$_s" "$_pid"
            sleep 1
        done
    else
        _start=$(now)
        expect "the command printed ready" false
    fi
    wait "$_pid"
    RC=$?
    SECS=$(($(now) - _start))
    kill "$_dog" 2>/dev/null
}

secs_between() { [ "$SECS" -ge "$1" ] && [ "$SECS" -lt "$2" ]; }

# sig_trap_case CASE SIG WORD STATUS: the command traps SIG, prints WORD
# and exits STATUS; capsule's status is the command's.
sig_trap_case() {
    # shellcheck disable=SC2046  # word splitting of the fixed prefix is wanted
    sig_case "$1" "$2" $(EXEC_DISK_ARGS) -- \
        sh -c "trap 'echo $3; exit $4' $2; $SIG_LOOP"
    expect "the command's trap ran ($3)" grep -qx "$3" "$OUT"
    expect "exit status $4, the command's (was $RC)" rc_is "$4"
    expect "no Rust panic" no_rust_panic
}

case_exec_sig_usr1() { sig_trap_case exec_sig_usr1 USR1 got-usr1 3; }
case_exec_sig_term_trapped() { sig_trap_case exec_sig_term_trapped TERM got-term 4; }

case_exec_sig_term_ignored() {
    # The command ignores SIGTERM: after --stop-timeout the VM is stopped
    # and capsule dies of SIGTERM (143).
    # shellcheck disable=SC2046
    sig_case exec_sig_term_ignored TERM $(EXEC_DISK_ARGS) --stop-timeout 3 -- \
        sh -c "trap 'echo got-term' TERM; $SIG_LOOP"
    expect "the command's trap ran (got-term)" grep -qx got-term "$OUT"
    expect "capsule died of SIGTERM: 143 (was $RC)" rc_is 143
    expect "says the command did not end in time" err_has "did not end within 3 s of SIGTERM"
    expect "stopped after the stop timeout, not at once or much later (${SECS}s)" \
        secs_between 2 30
    expect "no Rust panic" no_rust_panic
}

case_exec_sig_twice() {
    # The first SIGINT goes to the command, which ignores it; the second
    # stops the VM at once (no stop timeout): capsule dies of SIGINT.
    # shellcheck disable=SC2046
    sig_case exec_sig_twice "INT INT" $(EXEC_DISK_ARGS) --stop-timeout never -- \
        sh -c "trap 'echo got-int' INT; $SIG_LOOP"
    expect "the command's trap ran once (got-int)" [ "$(grep -cx got-int "$OUT")" -eq 1 ]
    expect "capsule died of SIGINT: 130 (was $RC)" rc_is 130
    expect "says the VM was stopped by SIGINT" err_has "stopped by SIGINT"
    expect "no Rust panic" no_rust_panic
}
