# shellcheck shell=sh
# tests/boot/cases.d/containerd_tty.sh: the containerd runtime's
# terminals, process user, OOM events and pause/resume (issue 24), and
# what a container costs: start to first output, host memory.
# Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1. Uses
# containerd.sh's helpers (ctrd_start, ctr, ctr_rootfs, wait_line).
#
# `ctr run -t` and `ctr task exec -t` want a terminal of their own: they
# run under util-linux's `script` (tests/boot/run.sh ships it beside
# containerd), whose terminal the case resizes with `stty -F` (ctr then
# sends resize_pty).

# shellcheck disable=SC2016  # $... in container commands is for the guest shell
# shellcheck disable=SC2086  # $_ctr and $_rt are several words
OPTIONAL_CASES="${OPTIONAL_CASES:-} containerd_tty"

# ctr_tty DIR NAME CMD: CMD (a ctr command line) under `script`, on a
# terminal of 30x100 whose name goes to DIR/NAME.tty; its input is the
# FIFO DIR/NAME.in, its output DIR/NAME.out. Sets CTR_TTY_PID.
ctr_tty() {
    rm -f "$1/$2.in"
    mkfifo "$1/$2.in"
    SHELL=/bin/sh timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/script" -qfec \
        "tty >$1/$2.tty; stty rows 30 cols 100; exec $3" /dev/null \
        <"$1/$2.in" >"$1/$2.out" 2>"$1/$2.err" &
    CTR_TTY_PID=$!
}

# tty_line FILE LINE: a terminal's output FILE (CR LF) has LINE.
tty_line() { tr -d '\r' <"$1" | grep -qx -- "$2"; }

# containerd_terminal DIR ROOT: `ctr run -t` and `ctr task exec -t`.
containerd_terminal() {
    _ctr="$TOOLS/containerd/ctr --address $CTRD_SOCK"
    ctr_tty "$1" t1 "$_ctr run --rm -t $_rt --rootfs $2 t1 /bin/sh -c 'tty; stty size; echo t1-up; read x; stty size; echo got-\$x; exit 4'"
    exec 7>"$1/t1.in"
    expect "ctr run -t: the container started on a terminal" wait_line_cr "$1/t1.out" t1-up 120
    # The outer terminal grows: ctr sends resize_pty, the shim SIGWINCH
    # to capsule, capsule a Resize frame to the guest's terminal.
    stty -F "$(cat "$1/t1.tty")" rows 50 cols 160
    sleep 2
    echo line >&7
    exec 7>&-
    wait "$CTR_TTY_PID"
    _rct1=$?
    expect "ctr run -t: the process's tty is /dev/pts/N" grep -q '^/dev/pts/[0-9]' "$1/t1.out"
    expect "ctr run -t: its terminal was 30x100 at start" tty_line "$1/t1.out" '30 100'
    expect "ctr run -t: and 50x160 after the resize" tty_line "$1/t1.out" '50 160'
    expect "ctr run -t: it read its input line" tty_line "$1/t1.out" got-line
    expect "ctr run -t: ended with 4 (was $_rct1)" test "$_rct1" -eq 4

    timeout -k 10 "$CASE_TIMEOUT" $_ctr run --rm $_rt --rootfs "$2" t2 \
        /bin/sh -c 'echo t2-up; exec sleep 600' </dev/null >"$1/t2.out" 2>"$1/t2.err" &
    _t2=$!
    expect "the exec -t container started" wait_line "$1/t2.out" t2-up 120
    # The exec's terminal starts at 24x80; ctr's resize_pty follows its start.
    ctr_tty "$1" x1 "$_ctr task exec -t --exec-id x1 t2 /bin/sh -c 'tty; sleep 3; stty size; exit 2'"
    exec 7>"$1/x1.in"
    wait "$CTR_TTY_PID"
    _rcx1=$?
    exec 7>&-
    expect "ctr task exec -t: a /dev/pts/N terminal" grep -q '^/dev/pts/[0-9]' "$1/x1.out"
    expect "ctr task exec -t: of the outer terminal's size" tty_line "$1/x1.out" '30 100'
    expect "ctr task exec -t: ended with 2 (was $_rcx1)" test "$_rcx1" -eq 2

    # process.user: `ctr task exec --user` (ctr 1.6's run has no --user;
    # the first process's user takes the same path through the guest).
    timeout -k 10 "$CASE_TIMEOUT" $_ctr task exec --user 1234:567 --exec-id u1 t2 \
        /bin/sh -c 'id -u; id -g' </dev/null >"$1/u1.out" 2>"$1/u1.err"
    echo "    containerd_tty: ctr task exec --user 1234:567: $(cat "$1/u1.out" "$1/u1.err" | tr '\n' ' ' | cut -c1-200)"
    expect "ctr task exec --user 1234:567 ran as 1234" grep -qx 1234 "$1/u1.out"
    expect "and group 567" grep -qx 567 "$1/u1.out"
    ctr task kill -s SIGKILL t2 >>"$1/t2.err" 2>&1
    wait "$_t2"
}

# wait_line_cr FILE LINE SECONDS: wait_line on a terminal's output.
wait_line_cr() {
    _i=0
    while [ $_i -lt $(($3 * 5)) ]; do
        tr -d '\r' <"$1" 2>/dev/null | grep -qx -- "$2" && return 0
        sleep 0.2 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    return 1
}

# containerd_pause_oom DIR ROOT: pause/resume past capsule's stall
# timeout, the memory a running sandbox costs, an OOM kill's event.
containerd_pause_oom() {
    _ctr="$TOOLS/containerd/ctr --address $CTRD_SOCK"
    $_ctr events >"$1/events" 2>&1 &
    _ev=$!
    timeout -k 10 "$CASE_TIMEOUT" $_ctr run --rm $_rt --rootfs "$2" p1 \
        /bin/sh -c 'echo p1-up; while :; do sleep 1; done' </dev/null >"$1/p1.out" 2>"$1/p1.err" &
    _p1=$!
    expect "the pause container started" wait_line "$1/p1.out" p1-up 120
    # The sandbox's host memory: capsule, its children (virtiofsd), the shim.
    _vm=$($_ctr task ls | awk '$1 == "p1" { print $2 }')
    _shim=$(awk '{ print $4 }' "/proc/$_vm/stat")
    _kb=$(($(rss_kb "$_vm") + $(rss_kb "$_shim")))
    for _c in $(children "$_vm"); do _kb=$((_kb + $(rss_kb "$_c"))); done
    echo "    containerd_tty: sandbox RSS: capsule $(rss_kb "$_vm") KiB, shim $(rss_kb "$_shim") KiB, all $_kb KiB (256 MiB guest)"
    $_ctr task pause p1 >>"$1/p1.err" 2>&1
    $_ctr task ls >"$1/paused" 2>&1
    expect "ctr task pause: p1 PAUSED" grep -q '^p1 .*PAUSED' "$1/paused"
    expect "the paused microVM's capsule is stopped" grep -q '^State:.*T' "/proc/$_vm/status"
    # Past capsule's 30 s stall timeout: the resumed guest is not "stuck".
    sleep 35
    $_ctr task resume p1 >>"$1/p1.err" 2>&1
    $_ctr task ls >"$1/resumed" 2>&1
    expect "ctr task resume: p1 RUNNING" grep -q '^p1 .*RUNNING' "$1/resumed"
    timeout -k 10 "$CASE_TIMEOUT" $_ctr task exec --exec-id x3 p1 /bin/sh -c 'echo after-resume' \
        </dev/null >"$1/x3.out" 2>"$1/x3.err"
    expect "the resumed container runs an exec" grep -qx after-resume "$1/x3.out"
    $_ctr task kill -s SIGKILL p1 >>"$1/p1.err" 2>&1
    wait "$_p1"

    # OOM: awk keeps 1 MiB strings past the 256 MiB guest; the guest
    # kernel kills it, the shim publishes /tasks/oom. The sleep lets the
    # shim's events watch connect first.
    echo 'BEGIN { s = "x"; for (j = 0; j < 20; j++) s = s s; while (1) a[i++] = s i }' >"$2/oom.awk"
    timeout -k 10 "$CASE_TIMEOUT" $_ctr run --rm $_rt --rootfs "$2" o1 \
        /bin/sh -c 'echo o1-up; sleep 10; awk -f /oom.awk; echo awk-ended-$?' \
        </dev/null >"$1/o1.out" 2>"$1/o1.err"
    _rco1=$?
    sleep 2
    kill "$_ev" 2>/dev/null
    expect "the OOM-killed awk ended with 137" grep -qx awk-ended-137 "$1/o1.out"
    expect "the container ended normally after it (was $_rco1)" test "$_rco1" -eq 0
    expect "ctr events showed /tasks/oom for o1" grep -q '/tasks/oom.*o1' "$1/events"
    expect "ctr events showed /tasks/paused and /tasks/resumed" \
        sh -c "grep -q /tasks/paused '$1/events' && grep -q /tasks/resumed '$1/events'"
}

# containerd_first_output DIR ROOT: container start to its first output
# line, five times; prints the median.
containerd_first_output() {
    _ctr="$TOOLS/containerd/ctr --address $CTRD_SOCK"
    rm -f "$1/f.first" "$1/f.end"
    for _n in 1 2 3 4 5; do
        runtime_first "$_rt" "f$_n" "$1" "$2"
    done
    echo "    containerd_tty: ctr run to first output (ms, 5 runs): $(tr '\n' ' ' <"$1/f.first")median $(median "$1/f.first")"
    expect "five containers printed their first line" test "$(grep -lx first "$1"/f[1-5].out | wc -l)" -eq 5
}

# shellcheck disable=SC2154  # _d, _root, _start: set by containerd_case_begin (containerd.sh)
case_containerd_tty() {
    containerd_prereqs || return
    if [ ! -x "$TOOLS/containerd/script" ]; then
        CASE_ERRORS="not run: no script in \$TOOLS/containerd (tests/boot/run.sh ships it)"
        SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
        return
    fi
    containerd_case_begin containerd_tty "ctr run -t / task exec -t / pause / OOM with the capsule runtime" || return
    for _a in tty stty id awk; do ln -s busybox "$_root/bin/$_a"; done
    # ctr's --user reads them (additional groups).
    echo 'root:x:0:0:root:/root:/bin/sh' >"$_root/etc/passwd"
    echo 'root:x:0:' >"$_root/etc/group"
    _rt="--runtime io.containerd.capsule.v2"
    RC=0

    containerd_terminal "$_d" "$_root"
    containerd_pause_oom "$_d" "$_root"
    containerd_first_output "$_d" "$_root"

    SECS=$(($(now) - _start))
    kill "$CTRD_PID" 2>/dev/null
    wait "$CTRD_PID" 2>/dev/null
    virtiofs_done
    for _f in t1.out t1.err t2.out t2.err x1.out x1.err u1.out u1.err p1.out p1.err paused resumed \
        x3.out x3.err o1.out o1.err events f.first; do
        echo "== $_f" >>"$OUT"
        cat "$_d/$_f" >>"$OUT" 2>/dev/null
    done
    tail -n 60 "$_d/containerd.log" >>"$ERR"
    expect "no Rust panic" no_rust_panic
}
