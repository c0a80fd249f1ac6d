#!/usr/bin/env bash
# resources/harness/run-in-l1.sh: run a script inside a nested L1 Linux guest
# that has a real (kvm_amd) /dev/kvm, on a host without hardware KVM.
#
# Builds an L1 initramfs (static busybox, the kvm modules of the Debian
# cloud kernel from l1-kernel.sh, SCRIPT and FILES under /capsule/) whose
# /init mounts proc/sys/devtmpfs, insmods irqbypass, kvm and kvm-amd, checks
# /dev/kvm, runs SCRIPT in /capsule with the L1 serial console as its
# controlling terminal (in raw mode, so bytes pass through untouched), prints
# `CAPSULE-L1-EXIT <status>` and powers off. L1 runs under
#   qemu-system-x86_64 -M pc,accel=tcg -cpu EPYC,+svm,+npt
# with its serial console on this script's stdin/stdout. This script exits
# with SCRIPT's status, 124 if L1 timed out, 126 if L1 hung (its heartbeat
# stopped), 125 if L1 failed otherwise (no exit marker). On a time-out or a
# hang, where L1's vCPUs are (QEMU monitor) is printed on stderr.
#
# When stdin is a terminal the session is interactive: keystrokes (Ctrl-C
# included) go to SCRIPT; Ctrl-A x kills L1, Ctrl-A c opens QEMU's monitor.
# Otherwise stdin is forwarded if it is a pipe or a file, from the moment
# SCRIPT starts (L1's serial driver would eat bytes sent while L1 boots),
# and replaced with /dev/null if it is anything else (closed, /dev/null,
# a socket).
#
# Usage: resources/harness/run-in-l1.sh SCRIPT [FILE|FILE:NAME|DIR ...]
#   SCRIPT   executable run in L1 as /capsule/<basename> (busybox sh is
#            /bin/sh there: no bash)
#   FILE     copied to /capsule/<basename> (or /capsule/NAME)
# Env: CAPSULE_L1_TIMEOUT  seconds before L1 is killed (default 1800; 0 = no
#                          limit; interactive sessions default to no limit)
#      CAPSULE_L1_MEMORY   L1 memory in MiB (default 3072)
#      CAPSULE_L1_CPUS     L1 vCPUs (default 2)
#      CAPSULE_L1_APPEND   extra L1 kernel command line
#      CAPSULE_L1_ACCEL    L1's -accel (default tcg; e.g. tcg,thread=single)
#      CAPSULE_L1_KVM_AMD_PARAMS  kvm-amd module parameters in L1 (e.g. vgif=0)
#      CAPSULE_L1_WATCHDOG seconds after which L1 prints a state dump of
#                          the still running SCRIPT (processes, kernel
#                          stacks, dmesg); default: 30 s before the timeout
#      CAPSULE_L1_HANG     seconds without L1's heartbeat (on its second
#                          serial port) after which L1 is taken as hung
#                          (default 90; not in interactive sessions)
#      CAPSULE_L1          the L1 configuration: QEMU and L1 kernel versions
#                          (resources/harness/l1-config.sh; default
#                          qemu10-linux612; qemu7-linux61 is the old one)
#      CAPSULE_L1_LOG      also keep the L1 console log at this path
#      CAPSULE_L1_DISK     a raw file given to L1 as a virtio disk (/dev/vda
#                          there) with cache=none: L1's flushes reach the
#                          host file (for power-loss trials,
#                          resources/durability.sh)
#      CAPSULE_L1_PIDFILE  write the L1 QEMU's process id here (not in
#                          interactive sessions), e.g. to kill L1
#      CAPSULE_SKIP_DEPS=1 skip install-deps.sh
# stdout: the L1 console (SCRIPT's output); progress goes to stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

# free_tcp_port: a TCP port on 127.0.0.1 that nothing listens on.
free_tcp_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 9<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free TCP port for the QEMU monitor"
}

# dump_l1_state PORT KALLSYMS: where L1's vCPUs are, from QEMU's monitor on
# PORT, with the kvm module symbols L1 wrote to the file KALLSYMS.
dump_l1_state() {
    local out
    echo "=== L1 state from the QEMU monitor (info cpus; info registers -a, abridged) ==="
    if ! { exec 9<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; then
        echo "(the monitor is not reachable)"
        return 0
    fi
    printf 'info cpus\ninfo registers -a\n' >&9
    out="$(timeout 5 cat <&9 || true)"
    exec 9>&-
    printf '%s\n' "$out" | tr -d '\r' | sed 's/\x1b\[[0-9;]*[A-Za-z]//g' |
        grep -E '^(\*| ) CPU #|^CPU#|^(RIP|RAX|RSI|R8 |R12|CR0|EFER)=|^CS ' || true
    if [[ -s "$2" ]]; then
        echo "--- vCPU code addresses (kvm module symbols from L1's /proc/kallsyms):"
        printf '%s\n' "$out" | sed -n 's/^RIP=\([0-9a-fA-F]*\).*/\1/p' | tr 'A-F' 'a-f' |
            while read -r rip; do
                printf 'RIP %s: %s\n' "$rip" "$(symbolize "$rip" "$2")"
            done
    fi
    echo "=== end of L1 state ==="
}

# symbolize ADDR KALLSYMS: "symbol+offset [module]" for ADDR (16 lowercase
# hex digits), or "?" if ADDR is not in the symbols of KALLSYMS.
symbolize() {
    LC_ALL=C sort "$2" | awk -v a="$1" '
        length($1) == 16 && $2 ~ /^[tT]$/ && $1 <= a { best = $0 }
        END {
            if (a < "ffffffffa0000000") { print "core kernel (nokaslr: see System.map of the -dbg package)"; exit }
            if (best == "") { print "?"; exit }
            split(best, f, " ")
            print f[3] " " f[4] " (at " f[1] ")"
        }'
}

# All of the work is in main(), parsed whole before it runs: editing this
# file while it runs cannot corrupt the run.
main() {
    if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
        exit 2
    fi
    script="$1"
    shift
    [[ -f "$script" ]] || die "script not found: $script"

    if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
        "$CAPSULE_RESOURCES_DIR/install-deps.sh"
    fi

    interactive=0
    if [[ -t 0 ]]; then
        interactive=1
    fi
    timeout_s="${CAPSULE_L1_TIMEOUT:-}"
    if [[ -z "$timeout_s" ]]; then
        if [[ $interactive -eq 1 ]]; then timeout_s=0; else timeout_s=1800; fi
    fi
    [[ "$timeout_s" =~ ^[0-9]+$ ]] || die "CAPSULE_L1_TIMEOUT must be a number of seconds"
    # The L1 watchdog dumps L1's state shortly before the host kills it.
    watchdog="${CAPSULE_L1_WATCHDOG:-}"
    if [[ -z "$watchdog" ]]; then
        watchdog=0
        if [[ "$timeout_s" -ge 90 ]]; then watchdog=$((timeout_s - 30)); fi
    fi
    [[ "$watchdog" =~ ^[0-9]+$ ]] || die "CAPSULE_L1_WATCHDOG must be a number of seconds"
    kvm_amd_params="${CAPSULE_L1_KVM_AMD_PARAMS-}"
    [[ "$kvm_amd_params" =~ ^[A-Za-z0-9_=,\ ]*$ ]] || die "CAPSULE_L1_KVM_AMD_PARAMS: unexpected characters"
    hang_s="${CAPSULE_L1_HANG:-90}"
    [[ "$hang_s" =~ ^[0-9]+$ && "$hang_s" -gt 0 ]] || die "CAPSULE_L1_HANG must be a positive number of seconds"
    memory="${CAPSULE_L1_MEMORY:-3072}"
    cpus="${CAPSULE_L1_CPUS:-2}"

    # shellcheck source=resources/harness/l1-config.sh
    source "$CAPSULE_RESOURCES_DIR/harness/l1-config.sh"
    l1dir="$("$CAPSULE_RESOURCES_DIR/harness/l1-kernel.sh")" ||
        die "cannot start L1: fetching its kernel ($L1_CONFIG) failed"
    l1qemu="$("$CAPSULE_RESOURCES_DIR/harness/l1-qemu.sh")" ||
        die "cannot start L1: fetching its QEMU ($L1_CONFIG) failed"

    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-l1.XXXXXX")"
    saved_tty=""
    # shellcheck disable=SC2317  # invoked by the EXIT trap
    cleanup() {
        if [[ -n "$saved_tty" ]]; then
            stty "$saved_tty" 2>/dev/null || true
        fi
        rm -rf "$work"
    }
    trap cleanup EXIT

    root="$work/root"
    populate_busybox_root "$root"
    cp "$l1dir"/modules/*.ko "$root/lib/modules/"
    l1_disk="${CAPSULE_L1_DISK:-}"
    if [[ -n "$l1_disk" ]]; then
        [[ -f "$l1_disk" ]] || die "CAPSULE_L1_DISK: no such file: $l1_disk"
        [[ -s "$l1dir/modules/virtio/order" ]] ||
            die "CAPSULE_L1_DISK: the L1 kernel's virtio modules are missing ($l1dir/modules/virtio)"
        cp -r "$l1dir/modules/virtio" "$root/lib/modules/"
    fi
    # kvm-keypin (see its source): off unless CAPSULE_L1_KEYPIN=1. With it
    # on, two clean-clone suites had more L1 hangs and oopses than the runs
    # without it (docs/harness.md, "the key pin").
    keypin=0
    if [[ "${CAPSULE_L1_KEYPIN:-0}" = 1 ]]; then
        cc -static -O2 -Wall -o "$root/bin/kvm-keypin" \
            "$CAPSULE_RESOURCES_DIR/harness/kvm-keypin.c" ||
            die "cannot start L1: building kvm-keypin failed"
        keypin=1
    fi
    mkdir -p "$root/capsule"

    script_name="$(basename "$script")"
    cp -L "$script" "$root/capsule/$script_name"
    chmod 755 "$root/capsule/$script_name"
    for spec in "$@"; do
        src="$spec"
        name="$(basename "$spec")"
        if [[ ! -e "$src" && "$spec" == *:* ]]; then
            src="${spec%:*}"
            name="${spec##*:}"
        fi
        [[ -e "$src" ]] || die "file not found: $src"
        mkdir -p "$(dirname "$root/capsule/$name")"
        cp -rL "$src" "$root/capsule/$name"
    done

    cat >"$root/init" <<INIT
#!/bin/sh
# L1 /init (generated by resources/harness/run-in-l1.sh)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=\${TERM:-linux}
l1_exit() {
    echo "CAPSULE-L1-EXIT \$1"
    poweroff -f
    sleep 10
}
# State dump for a script that hangs: processes, the threads of capsule
# (kernel stacks), and the kernel's CPU and blocked-task backtraces.
l1_dump() {
    echo "capsule-l1: watchdog: $script_name still running after \$1 s; L1 state follows"
    cat /proc/loadavg
    ps -o pid,ppid,stat,time,args 2>/dev/null || ps
    for p in /proc/[0-9]*; do
        [ "\$(readlink \$p/exe 2>/dev/null)" = /capsule/capsule ] || continue
        for t in \$p/task/*; do
            echo "--- thread \$t: \$(cut -d' ' -f2,3 \$t/stat) wchan=\$(cat \$t/wchan 2>/dev/null)"
            cat \$t/stack 2>/dev/null
        done
    done
    echo l >/proc/sysrq-trigger
    echo w >/proc/sysrq-trigger
    sleep 2
    echo "capsule-l1: watchdog: last kernel messages"
    dmesg | tail -n 150
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
# Raw console early: no echo or line editing of bytes meant for the script.
stty -F /dev/ttyS0 raw -echo 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in irqbypass kvm kvm-amd; do
    params=
    [ "\$m" != kvm-amd ] || params="$kvm_amd_params"
    # shellcheck disable=SC2086
    if ! insmod /lib/modules/\$m.ko \$params; then
        echo "capsule-l1: ERROR: insmod \$m.ko \$params failed"
        l1_exit 125
    fi
done
# The extra disk (CAPSULE_L1_DISK): the virtio-pci disk stack, then wait
# for its /dev/vda.
if [ -f /lib/modules/virtio/order ]; then
    for m in \$(cat /lib/modules/virtio/order); do
        if ! insmod /lib/modules/virtio/\$m.ko; then
            echo "capsule-l1: ERROR: insmod virtio/\$m.ko failed"
            l1_exit 125
        fi
    done
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        [ -b /dev/vda ] && break
        sleep 0.5
    done
    if [ ! -b /dev/vda ]; then
        echo "capsule-l1: ERROR: no /dev/vda for CAPSULE_L1_DISK"
        l1_exit 125
    fi
fi
if [ ! -c /dev/kvm ]; then
    echo "capsule-l1: ERROR: no /dev/kvm after loading kvm-amd (is SVM emulated?)"
    l1_exit 125
fi
# Hold KVM's APIC static keys (resources/harness/kvm-keypin.c): without it,
# every guest's start and end live-patches kvm.ko, which TCG's threads do
# not see coherently.
keypin_state=off
if [ "$keypin" = 1 ]; then
    kvm-keypin >/run/keypin.log 2>&1 </dev/null &
    keypin_state="failed"
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        if grep -q holding /run/keypin.log; then keypin_state=on; break; fi
        sleep 0.5
    done
    [ "\$keypin_state" = on ] || echo "capsule-l1: warning: kvm-keypin: \$(cat /run/keypin.log)"
fi
echo "capsule-l1: nested mode: L1 Linux \$(uname -r) under QEMU TCG, kvm_amd npt=\$(cat /sys/module/kvm_amd/parameters/npt) vgif=\$(cat /sys/module/kvm_amd/parameters/vgif 2>/dev/null), \$(nproc) vCPUs, APIC key pin \$keypin_state; running $script_name"
# Heartbeat on the second serial port: the host sees that L1 still runs.
(while :; do echo . >/dev/ttyS1; sleep 5; done) </dev/null >/dev/null 2>&1 &
# The kvm modules' symbols on the third, to name code in a hung L1.
grep -E '\[(kvm|kvm_amd|irqbypass)\]' /proc/kallsyms >/dev/ttyS2 2>/dev/null &
cd /capsule
watchdog=\$(sed -n 's/.*capsule\.watchdog=\([0-9]*\).*/\1/p' /proc/cmdline)
wd_pid=
if [ "\${watchdog:-0}" -gt 0 ]; then
    (sleep "\$watchdog" && l1_dump "\$watchdog") </dev/null &
    wd_pid=\$!
fi
# A new session with the serial console as controlling terminal, in raw
# mode: the script (and a VMM it runs) sees exactly the bytes sent to L1.
# The session leader waits for the console to drain its output (stty sets
# modes with TCSADRAIN) before it exits: its exit hangs the tty up, which
# would discard output not yet sent.
# "stdin" on the heartbeat port tells the host that the console is raw
# and the script about to read it: the host holds piped input back until
# then (bytes sent while L1 boots are eaten by its 8250 driver's probe).
setsid cttyhack sh -c 'stty raw -echo 2>/dev/null; echo stdin >/dev/ttyS1 2>/dev/null; /capsule/$script_name; rc=\$?; stty raw -echo 2>/dev/null; sleep 1; exit \$rc'
status=\$?
[ -z "\$wd_pid" ] || kill "\$wd_pid" 2>/dev/null
l1_exit \$status
INIT
    chmod 755 "$root/init"

    log "packing L1 initramfs ($(du -sh "$root" | cut -f1))"
    make_cpio "$root" "$work/l1.cpio"

    conlog="$work/console.log"
    # EPYC with SVM and nested paging; the features TCG cannot emulate are
    # switched off explicitly (TCG would drop them anyway, with a warning each).
    cpu="EPYC,+svm,+npt"
    for feature in rdseed sha-ni fxsr-opt misalignsse 3dnowprefetch osvw topoext nrip-save xsavec; do
        cpu+=",-$feature"
    done
    # panic_on_oops=1: an oops in L1's own kernel (seen under TCG: "stack
    # guard page was hit") ends L1, and the callers rerun what it had not
    # reported, instead of leaving a task stuck while L1's heartbeat goes
    # on (a boot case then sits out every timeout it has).
    # shellcheck disable=SC2054  # commas are QEMU's, not array separators
    qemu=(
        "$l1qemu"
        -M pc -accel "${CAPSULE_L1_ACCEL:-tcg}" -cpu "$cpu"
        -m "$memory" -smp "$cpus"
        -nodefaults -no-user-config -display none -no-reboot
        -kernel "$l1dir/vmlinuz" -initrd "$work/l1.cpio"
        -append "console=ttyS0 quiet loglevel=1 panic=-1 panic_on_oops=1 nokaslr capsule.watchdog=$watchdog ${CAPSULE_L1_APPEND:-}"
    )
    if [[ -n "$l1_disk" ]]; then
        # cache=none: O_DIRECT on the host file, and L1's flushes are
        # fdatasyncs of it; what L1 has not flushed is lost if L1 dies.
        qemu+=(-drive "file=$l1_disk,format=raw,if=virtio,cache=none")
    fi
    if [[ $interactive -eq 1 ]]; then
        # shellcheck disable=SC2054
        qemu+=(
            -chardev "stdio,id=con,mux=on,signal=off,logfile=$conlog"
            -serial chardev:con -mon chardev=con,mode=readline
        )
        saved_tty="$(stty -g 2>/dev/null || true)"
        log "interactive L1 session (Ctrl-A x kills L1)"
    else
        # shellcheck disable=SC2054
        qemu+=(-chardev "stdio,id=con,signal=off,logfile=$conlog" -serial chardev:con)
        if [[ ! -p /dev/stdin && ! -f /dev/stdin ]]; then
            exec </dev/null
        fi
    fi

    log "booting L1 ($L1_CONFIG: $("$l1qemu" --version | head -n1 | sed 's/ (.*//'), Linux $(cat "$l1dir/release"), ${cpus} vCPUs, ${memory} MiB, timeout ${timeout_s}s)"
    start=$SECONDS
    qemu_rc=0
    hung=0
    if [[ $interactive -eq 1 ]]; then
        # QEMU in the foreground on the terminal.
        runner=()
        if [[ "$timeout_s" -gt 0 ]]; then runner=(timeout -k 10 --foreground "$timeout_s"); fi
        "${runner[@]}" "${qemu[@]}" -serial null -serial null || qemu_rc=$?
    else
        # QEMU in the background, watched: the overall timeout, and L1's
        # heartbeat on its second serial port; a silent L1 is hung.
        port="$(free_tcp_port)"
        heartbeat="$work/heartbeat"
        : >"$heartbeat"
        exec 3<&0
        # Piped or file input is held back until L1's script runs (its
        # "stdin" on the heartbeat port): QEMU reads a FIFO (opened for
        # reading and writing, so neither side waits for the other) that
        # a feeder fills from stdin from then on.
        feeder=""
        if [[ -p /dev/stdin || -f /dev/stdin ]]; then
            mkfifo "$work/stdin"
            exec 5<>"$work/stdin"
        else
            exec 5<&3
        fi
        kallsyms="$work/kallsyms"
        "${qemu[@]}" -chardev "file,id=hb,path=$heartbeat" -serial chardev:hb \
            -chardev "file,id=syms,path=$kallsyms" -serial chardev:syms \
            -monitor "tcp:127.0.0.1:$port,server=on,wait=off" <&5 2> >(tee "$work/qemu.err" >&2) &
        qemu_pid=$!
        if [[ -p "$work/stdin" ]]; then
            (
                until grep -q stdin "$heartbeat" 2>/dev/null; do
                    kill -0 "$qemu_pid" 2>/dev/null || exit 0
                    sleep 0.2
                done
                exec cat <&3 >"$work/stdin"
            ) &
            feeder=$!
        fi
        exec 3<&- 5<&-
        if [[ -n "${CAPSULE_L1_PIDFILE:-}" ]]; then
            echo "$qemu_pid" >"$CAPSULE_L1_PIDFILE"
        fi
        last_beat=$SECONDS
        beats=0
        while kill -0 "$qemu_pid" 2>/dev/null; do
            sleep 1
            size="$(stat -c %s "$heartbeat" 2>/dev/null || echo 0)"
            if [[ "$size" -ne "$beats" ]]; then
                beats=$size
                last_beat=$SECONDS
            fi
            if [[ "$timeout_s" -gt 0 && $((SECONDS - start)) -ge "$timeout_s" ]]; then
                log "ERROR: L1 timed out after ${timeout_s}s"
                dump_l1_state "$port" "$kallsyms" >&2
                qemu_rc=124
                break
            fi
            if [[ $beats -gt 0 && $((SECONDS - last_beat)) -ge "$hang_s" ]]; then
                log "ERROR: L1 hung: no heartbeat for ${hang_s}s (after $((SECONDS - start))s)"
                dump_l1_state "$port" "$kallsyms" >&2
                hung=1
                break
            fi
        done
        if kill -0 "$qemu_pid" 2>/dev/null; then
            kill "$qemu_pid" 2>/dev/null || true
            sleep 1
            kill -9 "$qemu_pid" 2>/dev/null || true
        fi
        wait_rc=0
        wait "$qemu_pid" 2>/dev/null || wait_rc=$?
        if [[ -n "$feeder" ]]; then
            kill "$feeder" 2>/dev/null || true
            wait "$feeder" 2>/dev/null || true
        fi
        [[ $qemu_rc -ne 0 || $hung -eq 1 ]] || qemu_rc=$wait_rc
    fi
    elapsed=$((SECONDS - start))
    if [[ -n "$saved_tty" ]]; then
        stty "$saved_tty" 2>/dev/null || true
    fi
    if [[ -n "${CAPSULE_L1_LOG:-}" ]]; then
        cp "$conlog" "$CAPSULE_L1_LOG" 2>/dev/null || true
    fi

    marker="$(grep -ao 'CAPSULE-L1-EXIT [0-9]*' "$conlog" 2>/dev/null | tail -n1 || true)"
    if [[ -z "$marker" ]]; then
        if [[ $hung -eq 1 ]]; then
            log "ERROR: L1 hung; $script_name did not finish"
            exit 126
        fi
        if [[ $qemu_rc -eq 124 ]]; then
            log "ERROR: L1 timed out after ${timeout_s}s without reporting an exit status"
            exit 124
        fi
        if [[ ! -s "$conlog" && -s "$work/qemu.err" ]]; then
            log "ERROR: cannot start L1 ($L1_CONFIG): $(grep -v '^$' "$work/qemu.err" | head -n1)"
        else
            log "ERROR: L1 ended (qemu status $qemu_rc, after ${elapsed}s) without reporting an exit status"
        fi
        exit 125
    fi
    status="${marker##* }"
    log "L1 finished in ${elapsed}s: $script_name exited with status $status"
    exit "$status"
}

main "$@"
