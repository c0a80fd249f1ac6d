# shellcheck shell=sh
# tests/boot/cases.d/containerd.sh: the containerd runtime (issue 24).
# Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1.
#
# Debian's containerd (unpacked, not installed, by
# resources/build-containerd-shim.sh) runs in L1 with a private root,
# state and socket, and the static containerd-shim-capsule-v2 in PATH;
# tests/boot/run.sh ships both in $TOOLS/containerd/. No image registry
# can be reached: the container's root is a directory made here from
# L1's static busybox (`ctr run --rootfs DIR`). The shim runs each
# container in its own microVM with that directory as the root over
# virtio-fs, so the case needs the virtiofsd of cases.d/virtiofs.sh.

# shellcheck disable=SC2016  # $... in container commands is for the guest shell
# Optional (run by name): it passed in the harness on 2026-12-04 (74 s in
# L1; 54 s on 2026-12-05 with the exec part), but that and the static
# shim's build (several minutes cold) are more than CI's per-feature
# budget of one minute.
OPTIONAL_CASES="${OPTIONAL_CASES:-} containerd_ctr"

# containerd_prereqs: the tools, else the case fails loudly.
containerd_prereqs() {
    for _t in containerd ctr containerd-shim-capsule-v2; do
        if [ ! -x "${TOOLS:-/nonexistent}/containerd/$_t" ]; then
            CASE_ERRORS="not run: no $_t in \$TOOLS/containerd (tests/boot/run.sh ships it for containerd_* cases)"
            SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
            return 1
        fi
    done
    virtiofs_prereqs
}

# ctrd_start DIR: containerd on DIR/containerd.sock, its log in DIR/containerd.log.
ctrd_start() {
    mkdir -p "$1/root" "$1/state"
    cat >"$1/config.toml" <<CONF
version = 2
root = "$1/root"
state = "$1/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$1/containerd.sock"
CONF
    PATH="$TOOLS/containerd:$PATH" CAPSULE_SHIM_KERNEL="$BZIMAGE" CAPSULE_SHIM_CAPSULE="$CAPSULE" \
        CAPSULE_SHIM_MEMORY=256M \
        "$TOOLS/containerd/containerd" --config "$1/config.toml" >"$1/containerd.log" 2>&1 &
    CTRD_PID=$!
    CTRD_SOCK="$1/containerd.sock"
    _i=0
    while [ $_i -lt 150 ]; do
        if ctr version >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    return 1
}

ctr() { "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" "$@"; }

# ctr_rootfs DIR: a busybox root for the containers.
ctr_rootfs() {
    rm -rf "$1"
    mkdir -p "$1/bin" "$1/proc" "$1/sys" "$1/dev" "$1/tmp" "$1/etc"
    # busybox ash answers `command -v busybox` with the bare name.
    _bb="$(command -v busybox)"
    case "$_bb" in /*) ;; *) _bb=/bin/busybox ;; esac
    cp "$_bb" "$1/bin/busybox"
    for _a in sh echo sleep cat ls true; do ln -s busybox "$1/bin/$_a"; done
}

# containerd_case_begin CASE COMMAND: a fresh $WORK/CASE as _d (OUT and ERR
# in it, COMMAND its description), containerd started there (_start is the
# case's start) and a busybox root in $_d/rootfs as _root. If containerd
# does not start, the case is failed and ended here: status 1.
containerd_case_begin() {
    _d="$WORK/$1"
    rm -rf "$_d"
    mkdir -p "$_d"
    OUT="$_d/stdout" ERR="$_d/stderr"
    : >"$OUT"
    : >"$ERR"
    printf '%s\n' "$2" >"$_d/command"
    _start=$(now)
    if ! ctrd_start "$_d"; then
        expect "containerd started" false
        cat "$_d/containerd.log" >>"$ERR"
        RC=1 SECS=$(($(now) - _start))
        kill "$CTRD_PID" 2>/dev/null
        virtiofs_done
        return 1
    fi
    _root="$_d/rootfs"
    ctr_rootfs "$_root"
}

# wait_line FILE LINE SECONDS: until FILE has LINE.
wait_line() {
    _i=0
    while [ $_i -lt $(($3 * 5)) ]; do
        grep -qx -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.2 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    return 1
}

# ctr_exec ARGS...: `ctr task exec` under the case's timeout, stdin empty.
ctr_exec() {
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" task exec "$@" </dev/null
}

# containerd_exec DIR ROOT: `ctr task exec` in a running container (c6):
# output and status, `ctr task kill --exec-id`, and exec'd processes
# killed when the container's first process ends.
containerd_exec() {
    # shellcheck disable=SC2086  # $_rt is two words
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --rootfs "$2" c6 /bin/sh -c 'echo c6-up; exec sleep 600' \
        </dev/null >"$1/c6.out" 2>"$1/c6.err" &
    _c6=$!
    expect "the exec container started" wait_line "$1/c6.out" c6-up 120
    _t0=$(now)
    ctr_exec --exec-id e1 c6 /bin/sh -c 'echo from-exec; exit 3' >"$1/e1.out" 2>"$1/e1.err"
    _rce1=$?
    echo "    containerd_ctr: ctr task exec e1 took $(($(now) - _t0)) s (status $_rce1)"
    expect "ctr task exec printed from-exec" grep -qx from-exec "$1/e1.out"
    expect "the exec ended with its own status 3 (was $_rce1)" test "$_rce1" -eq 3

    ctr_exec --exec-id e2 c6 /bin/sh -c 'echo e2-up; exec sleep 600' >"$1/e2.out" 2>"$1/e2.err" &
    _e2=$!
    expect "the exec'd sleep started" wait_line "$1/e2.out" e2-up 60
    ctr task kill --exec-id e2 c6 >>"$1/e2.err" 2>&1
    wait "$_e2"
    _rce2=$?
    expect "ctr task kill --exec-id (SIGTERM) ended the exec'd sleep with 143 (was $_rce2)" \
        test "$_rce2" -eq 143

    ctr_exec --exec-id e3 c6 /bin/sh -c 'echo e3-up; exec sleep 600' >"$1/e3.out" 2>"$1/e3.err" &
    _e3=$!
    expect "the second exec'd sleep started" wait_line "$1/e3.out" e3-up 60
    ctr task kill c6 >>"$1/c6.err" 2>&1
    wait "$_c6"
    _rc6=$?
    wait "$_e3"
    _rce3=$?
    expect "the container's first process ended with 143 (was $_rc6)" test "$_rc6" -eq 143
    expect "its exec'd process was killed with it: 137 (was $_rce3)" test "$_rce3" -eq 137
}

# containerd_mounts DIR ROOT: the spec's mounts reach the microVM (issue
# 24): a host directory bound read-write at /data (the container reads
# the host's file there and writes one the host then sees), a host file
# bound read-only over /etc/resolv.conf (missing in ROOT: the guest init
# creates the mount point, as runc would), a writable file, ctr's
# /dev/shm tmpfs; then a file changed in place on the host while the
# container runs.
containerd_mounts() {
    mkdir -p "$1/vol"
    echo from-host >"$1/vol/host.txt"
    echo 'nameserver 10.9.8.7 # capsule-ocimounts' >"$1/resolv.conf"
    : >"$1/termlog"
    rm -f "$2/etc/resolv.conf"
    "$TOOLS/containerd/ctr" run --help 2>&1 | grep -e '--mount' >"$1/m1.help"
    # shellcheck disable=SC2086  # $_rt is two words
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --mount "type=bind,src=$1/vol,dst=/data,options=rbind:rw" \
        --mount "type=bind,src=$1/resolv.conf,dst=/etc/resolv.conf,options=rbind:ro" \
        --mount "type=bind,src=$1/termlog,dst=/dev/termination-log,options=rbind:rw" \
        --rootfs "$2" m1 /bin/sh -c 'cat /data/host.txt; echo from-vm >/data/vm.txt
            cat /etc/resolv.conf
            if echo x 2>/dev/null >>/etc/resolv.conf; then echo resolv-writable; else echo resolv-ro; fi
            echo last-words >/dev/termination-log
            cat /proc/mounts; exit 4' \
        </dev/null >"$1/m1.out" 2>"$1/m1.err"
    _rcm1=$?
    echo "    containerd_ctr: ctr run --help: $(cat "$1/m1.help")"
    expect "the mounts container ended with 4 (was $_rcm1)" test "$_rcm1" -eq 4
    expect "the container read the host's file in /data" grep -qx from-host "$1/m1.out"
    expect "the host sees the file the container wrote in /data" \
        test "$(cat "$1/vol/vm.txt" 2>/dev/null)" = from-vm
    expect "the container's /etc/resolv.conf is the host file" \
        grep -qx 'nameserver 10.9.8.7 # capsule-ocimounts' "$1/m1.out"
    expect "and read-only" grep -qx resolv-ro "$1/m1.out"
    expect "the host file is unchanged" \
        test "$(cat "$1/resolv.conf")" = 'nameserver 10.9.8.7 # capsule-ocimounts'
    expect "/dev/shm is a tmpfs in the guest" grep -q ' /dev/shm tmpfs ' "$1/m1.out"
    expect "the mount point made in the root is an empty file" \
        test -f "$2/etc/resolv.conf" -a ! -s "$2/etc/resolv.conf"
    expect "the container wrote its writable file" \
        test "$(cat "$1/termlog" 2>/dev/null)" = last-words

    # A file changed in place on the host shows in the running container
    # (the file is a hard link where it can be, see docs/kubernetes.md).
    echo one >"$1/live"
    # shellcheck disable=SC2086
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --mount "type=bind,src=$1/live,dst=/etc/live,options=rbind:ro" \
        --rootfs "$2" m2 /bin/sh -c 'cat /etc/live; echo m2-up; i=0
            while [ "$(cat /etc/live)" = one ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
            cat /etc/live; echo after=$i' \
        </dev/null >"$1/m2.out" 2>"$1/m2.err" &
    _m2=$!
    expect "the live-file container started" wait_line "$1/m2.out" m2-up 120
    echo two >"$1/live"
    wait "$_m2"
    echo "    containerd_ctr: m2 saw the file change after $(sed -n 's/^after=//p' "$1/m2.out") s"
    expect "the container saw the host file's new content" grep -qx two "$1/m2.out"
}

case_containerd_ctr() {
    containerd_prereqs || return
    containerd_case_begin containerd_ctr "ctr run --rm --runtime io.containerd.capsule.v2 --rootfs DIR ..." || return
    _rt="--runtime io.containerd.capsule.v2"

    # 1. The process's output and exit status come back through containerd.
    # shellcheck disable=SC2086  # $_rt is two words
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --rootfs "$_root" c1 /bin/sh -c 'echo hi; echo in-$((6*7)) >/made-in-vm; exit 7' \
        </dev/null >"$_d/c1.out" 2>"$_d/c1.err"
    RC=$?
    expect "ctr run printed hi" grep -qx hi "$_d/c1.out"
    expect "ctr run ended with the container's status 7 (was $RC)" rc_is 7
    expect "the container wrote its root live over virtio-fs" \
        test "$(cat "$_root/made-in-vm" 2>/dev/null)" = in-42

    # 2. Two containers at once (each its own microVM), and `ctr task
    # kill` (SIGTERM) ending the second one as runc's would: 128+15.
    # shellcheck disable=SC2086
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --rootfs "$_root" c2 /bin/sh -c 'echo c2-up; exec sleep 600' \
        </dev/null >"$_d/c2.out" 2>"$_d/c2.err" &
    _c2=$!
    # shellcheck disable=SC2086
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --rootfs "$_root" c3 /bin/sh -c 'echo c3-up; exit 3' \
        </dev/null >"$_d/c3.out" 2>"$_d/c3.err" &
    _c3=$!
    wait "$_c3"
    _rc3=$?
    expect "the parallel container printed c3-up" grep -qx c3-up "$_d/c3.out"
    expect "the parallel container ended with 3 (was $_rc3)" test "$_rc3" -eq 3
    expect "the long-running container started" wait_line "$_d/c2.out" c2-up 120
    ctr task ls >"$_d/tasks" 2>&1
    expect "ctr task ls shows c2 RUNNING" grep -q '^c2 .*RUNNING' "$_d/tasks"
    ctr task kill c2 >>"$_d/c2.err" 2>&1
    wait "$_c2"
    _rc2=$?
    expect "ctr task kill (SIGTERM) ended c2 with 143 (was $_rc2)" test "$_rc2" -eq 143

    # 3. `ctr task kill -s SIGUSR1` reaches a process that traps it in its
    # microVM, whose exit status is then the container's; `ctr task
    # metrics` (the shim's stats) while it runs.
    # shellcheck disable=SC2086
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --rootfs "$_root" c4 /bin/sh -c \
        'trap "echo got-usr1; exit 5" USR1; echo c4-up; while :; do sleep 1 & wait $!; done' \
        </dev/null >"$_d/c4.out" 2>"$_d/c4.err" &
    _c4=$!
    expect "the trapping container started" wait_line "$_d/c4.out" c4-up 120
    ctr task metrics c4 >"$_d/c4.metrics" 2>&1
    _rcm=$?
    expect "ctr task metrics answered (status $_rcm)" test "$_rcm" -eq 0
    expect "ctr task metrics shows the microVM's memory" grep -q 'memory' "$_d/c4.metrics"
    echo "    containerd_ctr: ctr task metrics c4: $(tr -s ' \t\n' ' ' <"$_d/c4.metrics")"
    ctr task kill -s SIGUSR1 c4 >>"$_d/c4.err" 2>&1
    wait "$_c4"
    _rc4=$?
    expect "SIGUSR1 reached the container's trap" grep -qx got-usr1 "$_d/c4.out"
    expect "the container ended with its trap's status 5 (was $_rc4)" test "$_rc4" -eq 5

    # 4. close_io: ctr closes the container's stdin when its own ends
    # (while still holding the FIFO), and the process reads end-of-file.
    # shellcheck disable=SC2086
    printf 'in-1\nin-2\n' | timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" \
        --address "$CTRD_SOCK" run --rm $_rt --rootfs "$_root" c5 \
        /bin/sh -c 'cat; echo after-eof; exit 6' >"$_d/c5.out" 2>"$_d/c5.err"
    _rc5=$?
    expect "the container read its stdin" grep -qx in-2 "$_d/c5.out"
    expect "and then end-of-file (close_io)" grep -qx after-eof "$_d/c5.out"
    expect "the stdin container ended with 6 (was $_rc5)" test "$_rc5" -eq 6

    # 5. exec (issue 24): more processes in a running container's
    # microVM, each over its own vsock connection to the guest init.
    containerd_exec "$_d" "$_root"

    # 6. The spec's mounts (issue 24): bind mounts of a directory and of a
    # file, a tmpfs.
    containerd_mounts "$_d" "$_root"

    ctr task ls >"$_d/tasks-after" 2>&1
    expect "no task is left" test "$(grep -c '^[cm][1-6] ' "$_d/tasks-after")" -eq 0

    SECS=$(($(now) - _start))
    kill "$CTRD_PID" 2>/dev/null
    wait "$CTRD_PID" 2>/dev/null
    virtiofs_done
    for _f in c1.out c1.err c2.out c2.err c3.out c3.err c4.out c4.err c4.metrics c5.out c5.err \
        c6.out c6.err e1.out e1.err e2.out e2.err e3.out e3.err m1.out m1.err m2.out m2.err tasks tasks-after; do
        echo "== $_f" >>"$OUT"
        cat "$_d/$_f" >>"$OUT" 2>/dev/null
    done
    tail -n 40 "$_d/containerd.log" >>"$ERR"
    expect "no Rust panic" no_rust_panic
}

# What a container costs (containerd_tty, containerd_runc).

# rss_kb PID: the process's resident memory, KiB.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# children PID: the pids whose parent is PID.
children() {
    for _s in /proc/[0-9]*/stat; do
        awk -v p="$1" '$4 == p { print $1 }' "$_s" 2>/dev/null
    done
}

# tree_kb PID: resident memory of PID and all its descendants, KiB.
tree_kb() {
    _sum=$(rss_kb "$1")
    for _c in $(children "$1"); do
        _sum=$((_sum + $(tree_kb "$_c")))
    done
    echo "$_sum"
}

# runtime_first RUNTIME_OPTS NAME DIR ROOT: ms from `ctr run` ($_ctr) of
# container NAME to its first output line and to the end of `ctr run
# --rm`, appended to DIR/BASE.first and DIR/BASE.end (BASE: NAME without
# its number, so that runs 1 to 5 of one kind share the files).
# shellcheck disable=SC2086  # $_ctr and $1 are several words
runtime_first() {
    _t0=$(uptime_ms)
    timeout -k 10 "$CASE_TIMEOUT" $_ctr run --rm $1 --rootfs "$4" "$2" \
        /bin/sh -c 'echo first' </dev/null >"$3/$2.out" 2>&1 &
    _f=$!
    _i=0
    while ! grep -qx first "$3/$2.out" 2>/dev/null && [ $_i -lt 2400 ]; do
        sleep 0.05 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    _t1=$(uptime_ms)
    wait "$_f"
    _t2=$(uptime_ms)
    echo $((_t1 - _t0)) >>"$3/${2%%[0-9]*}.first"
    echo $((_t2 - _t0)) >>"$3/${2%%[0-9]*}.end"
}

# median FILE: the middle of FILE's numbers.
median() { sort -n "$1" | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
