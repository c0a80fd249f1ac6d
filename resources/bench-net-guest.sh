#!/bin/sh
# resources/bench-net-guest.sh: TCP throughput over TAP, capsule vs QEMU.
#
# Runs on the machine with /dev/kvm (inside L1, or directly on a host with
# hardware KVM), as root, POSIX sh with busybox tools. For each VMM it
# boots the test guest with one virtio-net device on a TAP device
# (both over virtio-mmio; QEMU: -M microvm, virtio-net-device, userspace
# backend, vhost=off), then streams BENCH_MIB MiB of zeroes with busybox
# nc guest→host and host→guest; the receiver counts and times them.
# Prints one `bench-net: VMM DIRECTION BYTES SECONDS` line per transfer and
# then a table. Not a test: nothing is compared against a threshold.
#
# Env: CAPSULE BZIMAGE INITRD (required), QEMU (a qemu-system-x86_64 command,
#      optional), QEMU_FIRMWARE (its -L directory), BENCH_MIB (default 64),
#      BENCH_RUNS (default 10), BENCH_DETAIL (1: capsule's counters),
#      BENCH_VMMS (default "capsule qemu")
set -u
# A VMM that ended early must not end this script with SIGPIPE when the
# next line is typed to it.
trap "" PIPE
: "${CAPSULE:?}" "${BZIMAGE:?}" "${INITRD:?}"
MIB="${BENCH_MIB:-64}"
RUNS="${BENCH_RUNS:-10}"
WORK="$(mktemp -d /tmp/bench-net.XXXXXX)"
RESULTS="$WORK/results"
: >"$RESULTS"

[ -c /dev/net/tun ] || insmod /lib/modules/tun.ko 2>/dev/null || modprobe tun 2>/dev/null
ip link set lo up 2>/dev/null

now() { date +%s; }

# wait_out FILE REGEX SECONDS: false after SECONDS or once the VMM being
# measured ($_pid, if set) has ended.
wait_out() {
    _end=$(($(now) + $3))
    while ! tr -d '\r' <"$1" 2>/dev/null | grep -q -- "$2"; do
        [ "$(now)" -lt "$_end" ] || return 1
        [ -z "${_pid:-}" ] || kill -0 "$_pid" 2>/dev/null || return 1
        sleep 0.2 2>/dev/null || sleep 1
    done
}

# tap_counters: the TAP's packet and drop counters, one line.
tap_counters() {
    for _c in rx_packets tx_packets rx_dropped tx_dropped; do
        printf '%s=%s ' "$_c" "$(cat "/sys/class/net/$_tap/statistics/$_c" 2>/dev/null)"
    done
}

# wait_transfer FILE REGEX: like wait_out, but gives up only when nothing
# has crossed the TAP for 60 s (a stall), and then says what it saw: the
# TAP's counters (its tx is toward the guest; tx_dropped grows when the VMM
# stops reading), the host's TCP queues and where the VMM's threads wait.
wait_transfer() {
    _last="" _still=0
    while ! tr -d '\r' <"$1" 2>/dev/null | grep -q -- "$2"; do
        [ -z "${_pid:-}" ] || kill -0 "$_pid" 2>/dev/null || return 1
        _now="$(tap_counters)"
        if [ "$_now" = "$_last" ]; then
            _still=$((_still + 1))
        else
            _still=0 _last="$_now"
        fi
        if [ "$_still" -ge 60 ]; then
            echo "bench-net: $_vmm: stalled: nothing crossed $_tap for 60 s; waiting for '$2'"
            echo "bench-net:   $_tap: $_now"
            grep -E ':145[12] ' /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '{ print "bench-net:   tcp " $2, $3, "st=" $4, "tx:rx=" $5 }'
            for _t in /proc/"$_pid"/task/*; do
                echo "bench-net:   thread $(cut -d' ' -f2,3 "$_t/stat") wchan=$(cat "$_t/wchan" 2>/dev/null)"
            done
            return 1
        fi
        sleep 1
    done
}

# stalled DIRECTION: a transfer did not finish; the VMM is stopped, so
# that the run is repeated in a new VM.
stalled() {
    echo "bench-net: progress: $_vmm: $1 did not finish; stopping $_vmm"
    grep -v 'serial: FIFO' "$_d/err" | tail -n 6 | sed "s/^/bench-net:   $_vmm: /"
    kill -9 "$_pid" 2>/dev/null
    [ -z "${_snd:-}" ] || kill -9 "$_snd" 2>/dev/null
    [ -z "${_rcv:-}" ] || kill -9 "$_rcv" 2>/dev/null
}

# listening PORTHEX: true once /proc/net/tcp shows a listening socket on
# port PORTHEX (hex, as the kernel prints it), IPv4 or IPv6 (busybox nc
# listens on both); gives up after 30 s.
listening() {
    _end=$(($(now) + 30))
    while ! cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q ":$1 0*:0000 0A"; do
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1 2>/dev/null || sleep 1
    done
}

# tap_setup NAME ADDR: configure the host side once the VMM created it.
tap_setup() {
    (
        _i=0
        while [ $_i -lt 600 ] && ! ip link show "$1" >/dev/null 2>&1; do
            sleep 0.1 2>/dev/null || sleep 1
            _i=$((_i + 1))
        done
        ip addr add "$2" dev "$1" && ip link set "$1" up
    ) </dev/null >/dev/null 2>&1 &
}

# The receiver of each transfer runs RECV (busybox dd prints no byte count
# or time, so it is not used): it counts the bytes with wc and reads
# /proc/uptime (10 ms) when the connection is accepted and at its end, and
# prints "BYTES T0 T1".
RECV='read t0 _ </proc/uptime; n=$(wc -c); read t1 _ </proc/uptime; echo "$n $t0 $t1"'

# stats "BYTES T0 T1": "BYTES SECONDS".
stats() {
    echo "$1" | awk 'NF == 3 && $3 > $2 { printf "%s %.2f\n", $1, $3 - $2 }'
}

# start_vmm COMMAND...: boot the VMM ($_vmm, on TAP $_tap, files in $_d)
# with its console on the FIFO behind fd 3 and configure the guest's eth0.
start_vmm() {
    rm -f "$_fifo"
    mkfifo "$_fifo"
    : >"$_out"
    tap_setup "$_tap" 10.9.0.1/24
    "$@" <"$_fifo" >"$_out" 2>"$_d/err" &
    _pid=$!
    exec 3>"$_fifo"
    if ! wait_out "$_out" 'capsule-guest:.*# ' 180; then
        echo "bench-net: $_vmm: the guest did not boot; last output:"
        tail -n 20 "$_out" "$_d/err" | sed 's/^/bench-net:   /'
        exec 3>&-
        kill "$_pid" 2>/dev/null
        return 1
    fi
    echo "bench-net: progress: $_vmm booted"
    echo 'ip addr add 10.9.0.2/24 dev eth0; ip link set eth0 up; echo NET-UP' >&3
    wait_out "$_out" '^NET-UP' 30 || echo "bench-net: progress: $_vmm: no NET-UP"
}

# bench VMM TAP COMMAND...: boot, measure RUNS runs, power off. A VMM that
# ends during a run (a guest reset or crash) is reported with its last
# output and started again, and the run is repeated: up to 3 times.
bench() {
    _vmm="$1" _tap="$2"
    shift 2
    _d="$WORK/$_vmm"
    mkdir -p "$_d"
    _fifo="$_d/in" _out="$_d/out"
    _ends=0
    start_vmm "$@" || return 1
    _run=1
    while [ "$_run" -le "$RUNS" ]; do
        : >"$_d/run"
        # guest → host: the host's receiver reports what arrived.
        rm -f "$_d/g2h"
        _snd=""
        nc -l -p 5201 -e sh -c "$RECV >'$_d/g2h.tmp'; mv '$_d/g2h.tmp' '$_d/g2h'" </dev/null >/dev/null 2>&1 &
        _rcv=$!
        listening 1451 || echo "bench-net: progress: $_vmm: the host's receiver is not listening"
        echo "dd if=/dev/zero bs=1048576 count=$MIB 2>/dev/null | nc 10.9.0.1 5201; echo G2H-DONE-$_run" >&3
        wait_transfer "$_out" "^G2H-DONE-$_run" || stalled guest-to-host
        # nc ends when the data is in the guest's socket buffer: wait for
        # the host's receiver to see the end.
        wait_out "$_d/g2h" '[0-9]' 120 || echo "bench-net: progress: $_vmm: the host's receiver did not finish"
        kill -9 "$_rcv" 2>/dev/null
        echo "bench-net: $_vmm guest-to-host $(stats "$(cat "$_d/g2h" 2>/dev/null)")" >>"$_d/run"
        # host → guest: the guest's receiver prints its stats. The host
        # connects only once the guest says it listens: a connection
        # refused by a guest still starting nc would leave that nc waiting
        # and the next typed line unread.
        echo "nc -l -p 5202 -e sh -c '$RECV >/tmp/h2g' </dev/null & i=0; while [ \$i -lt 300 ] && ! grep -q ':1452 00000000:0000 0A' /proc/net/tcp; do sleep 0.1; i=\$((i+1)); done; echo H2G-LISTENING-$_run; wait; echo H2G-STATS-$_run \$(cat /tmp/h2g)" >&3
        if wait_out "$_out" "^H2G-LISTENING-$_run" 120; then
            dd if=/dev/zero bs=1048576 count="$MIB" 2>/dev/null | nc 10.9.0.2 5202 &
            _snd=$!
        else
            echo "bench-net: progress: $_vmm: the guest's receiver is not listening"
        fi
        wait_transfer "$_out" "^H2G-STATS-$_run [0-9]" || stalled host-to-guest
        [ -z "$_snd" ] || wait "$_snd" 2>/dev/null
        _st="$(tr -d '\r' <"$_out" | sed -n "s/^H2G-STATS-$_run //p" | tail -n1)"
        echo "bench-net: $_vmm host-to-guest $(stats "$_st")" >>"$_d/run"
        if ! kill -0 "$_pid" 2>/dev/null; then
            wait "$_pid"
            _status=$?
            _ends=$((_ends + 1))
            echo "bench-net: $_vmm ended during run $_run (status $_status); last output:"
            tail -n 12 "$_out" "$_d/err" | sed 's/^/bench-net:   /'
            echo "bench-net: $_vmm early-end" >>"$RESULTS"
            exec 3>&-
            [ "$_ends" -lt 3 ] || return 1
            start_vmm "$@" || return 1
            continue
        fi
        tee -a "$RESULTS" <"$_d/run"
        _run=$((_run + 1))
    done
    echo 'poweroff -f' >&3
    _i=0
    while kill -0 "$_pid" 2>/dev/null && [ $_i -lt 30 ]; do
        sleep 1
        _i=$((_i + 1))
    done
    kill "$_pid" 2>/dev/null
    exec 3>&-
    wait "$_pid" 2>/dev/null
    if [ -n "${BENCH_DETAIL:-}" ]; then
        grep -E 'virtio-net .*NetStats|stopped;' "$_d/err" | sed "s/^/bench-net: detail: $_vmm: /"
    fi
}

# BENCH_DETAIL=1: capsule logs at debug level; its traffic counters and
# per-vCPU exit counts are printed after its runs.
[ -z "${BENCH_DETAIL:-}" ] || export CAPSULE_LOG=debug
case " ${BENCH_VMMS:-capsule qemu} " in *" capsule "*)
bench capsule capb0 "$CAPSULE" run --kernel "$BZIMAGE" --initrd "$INITRD" \
    --cpus 2 --memory 512M --net tap=capb0 ;;
esac
case " ${BENCH_VMMS:-capsule qemu} " in *" qemu "*) ;; *) QEMU="" ;; esac
if [ -n "${QEMU:-}" ]; then
    # shellcheck disable=SC2086  # QEMU is a command with arguments
    bench qemu qemub0 $QEMU -L "${QEMU_FIRMWARE:-/usr/share/qemu}" \
        -M microvm -accel kvm -cpu host -m 512M -smp 2 -nodefaults -no-user-config \
        -display none -no-reboot -serial stdio -kernel "$BZIMAGE" -initrd "$INITRD" \
        -append "console=ttyS0 reboot=k panic=1" \
        -netdev tap,id=n0,ifname=qemub0,script=no,downscript=no,vhost=off \
        -device virtio-net-device,netdev=n0
else
    echo "bench-net: no QEMU given; capsule only"
fi

echo "bench-net: TCP over TAP, $MIB MiB per transfer, busybox nc, timed by the receiver; MB/s = 10^6 bytes/s, min / median / max over $RUNS run(s)"
# rates VMM DIRECTION: "min median max" MB/s of VMM's runs (or "- - -").
rates() {
    grep "^bench-net: $1 $2 " "$RESULTS" | awk '$4 > 0 && $5 > 0 { print $4 / $5 / 1e6 }' | sort -n |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "- - -"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%.1f %.1f %.1f\n", v[1], m, v[NR] }'
}
printf 'bench-net: %-16s %22s %22s\n' VMM guest-to-host host-to-guest
for vmm in capsule qemu; do
    grep -q "^bench-net: $vmm " "$RESULTS" || continue
    set -- $(rates "$vmm" guest-to-host) $(rates "$vmm" host-to-guest)
    printf 'bench-net: %-16s %22s %22s\n' "$vmm" "$1 / $2 / $3" "$4 / $5 / $6"
done
# capsule/QEMU ratio of the medians.
ratio() {
    c=$(rates capsule "$1" | cut -d' ' -f2)
    q=$(rates qemu "$1" | cut -d' ' -f2)
    awk -v a="$c" -v b="$q" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2f", a / b; else printf "-" }'
}
printf 'bench-net: %-16s %22s %22s\n' "capsule/qemu" "$(ratio guest-to-host)" "$(ratio host-to-guest)"
for vmm in capsule qemu; do
    n=$(grep -c "^bench-net: $vmm early-end" "$RESULTS")
    [ "$n" = 0 ] || echo "bench-net: note: $vmm ended during a run $n time(s) (see above); those runs were repeated"
done
