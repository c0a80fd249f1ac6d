#!/bin/sh
# resources/bench-net-guest.sh: TCP throughput over TAP, capsule beside
# QEMU, Firecracker and Cloud Hypervisor.
#
# Runs on the machine with /dev/kvm (inside L1, or directly on a host with
# hardware KVM), as root, POSIX sh with busybox tools. Each run boots a
# fresh test guest with one virtio-net device on a TAP device (both over
# virtio-mmio; QEMU: -M microvm, virtio-net-device, userspace backend,
# vhost=off; capsule-vhost and qemu-vhost: the same with vhost=on, the
# data path in the kernel's vhost-net; Firecracker: --no-api --config-file, virtio-mmio; Cloud
# Hypervisor: its command line, virtio-net over virtio-pci; the peers boot
# the build's vmlinux, Firecracker taking no bzImage), streams BENCH_MIB MiB of zeroes with busybox nc guest→host
# and then host→guest (the receiver counts and times them) and powers the
# guest off. The VMMs take turns, one run each per round. Prints one
# `bench-net: VMM DIRECTION BYTES SECONDS` line per complete transfer;
# resources/bench-net.sh makes the table. Not a test: nothing is compared
# against a threshold.
#
# Env: CAPSULE BZIMAGE INITRD (required), QEMU (a qemu-system-x86_64 command,
#      optional), QEMU_FIRMWARE (its -L directory), BENCH_MIB (default 64),
#      BENCH_RUNS (runs per VMM, default 10; BENCH_RUNS_capsule,
#      BENCH_RUNS_qemu, ... override it per VMM, '-' written '_'), BENCH_CPUS (guest vCPUs,
#      default 1), BENCH_DETAIL (1: TAP frame counts per transfer for
#      both VMMs, capsule's counters after each run),
#      BENCH_TRIES (attempts per VMM and round, default 3),
#      CAPSULE_PIN_CPU (run every VMM on this CPU alone: kvm_pin),
#      BENCH_EXITS (1: L1's KVM exits and interrupts per transfer, from its
#      kvm tracepoints), BENCH_TRACE (1: L1's KVM events traced, and
#      after a run whose guest shut down the BENCH_TRACE_LINES (default
#      150) events before it),
#      BENCH_VMMS (default "capsule qemu"; also capsule-vhost,
#      capsule-pci (capsule with --transport pci: virtio-pci, MSI-X),
#      capsule-pci-vhost (the same with vhost=on),
#      qemu-vhost, firecracker, cloud-hypervisor, capsule-base (capsule
#      as CAPSULE_BASE, another build, for an A/B of a change), and
#      loopback: the same transfers between two processes here, no VM),
#      FC and CH
#      (those VMMs' commands), VMLINUX (the
#      vmlinux of BZIMAGE's build, for them), SCRIPT (util-linux `script`,
#      which gives Cloud Hypervisor a terminal; default: the one next to
#      QEMU, as bench-net.sh copies it)
set -u
# A VMM that ended early must not end this script with SIGPIPE when the
# next line is typed to it.
trap "" PIPE
: "${CAPSULE:?}" "${BZIMAGE:?}" "${INITRD:?}"
MIB="${BENCH_MIB:-64}"
RUNS="${BENCH_RUNS:-10}"
CPUS="${BENCH_CPUS:-1}"
CMDLINE="console=ttyS0 reboot=k panic=1 quiet"
SCRIPT="${SCRIPT:-$(dirname "${QEMU:-/}")/script}"
WORK="$(mktemp -d /tmp/bench-net.XXXXXX)"
# shellcheck source=resources/kvm-host.sh
. "$(dirname "$0")/kvm-host.sh"

[ -c /dev/net/tun ] || insmod /lib/modules/tun.ko 2>/dev/null || modprobe tun 2>/dev/null
# vhost-net, for capsule-vhost and qemu-vhost (and what it needs).
if [ ! -c /dev/vhost-net ]; then
    for m in tap vhost_iotlb vhost vhost_net; do
        insmod "/lib/modules/$m.ko" 2>/dev/null || modprobe "$m" 2>/dev/null
    done
fi
ip link set lo up 2>/dev/null
[ -z "${BENCH_TRACE:-}" ] || kvm_trace_start bench-net:
kvm_pin bench-net:

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

# stalled DIRECTION: a transfer did not finish. Its nc processes are
# stopped; a VMM still running (a stall) is stopped too, so that the run is
# repeated in a new VM. A VMM that has ended is reported by the caller.
stalled() {
    [ -z "${_snd:-}" ] || kill -9 "$_snd" 2>/dev/null
    [ -z "${_rcv:-}" ] || kill -9 "$_rcv" 2>/dev/null
    kill -0 "$_pid" 2>/dev/null || return 0
    echo "bench-net: progress: $_vmm: $1 did not finish; stopping $_vmm"
    grep -v 'serial: FIFO' "$_d/err" | tail -n 6 | sed "s/^/bench-net:   $_vmm: /"
    _stalled=1
    kill_vmm
}

# kill_vmm: SIGKILL to the VMM (and for Cloud Hypervisor, which runs under
# `script`, to it too: it would outlive its terminal). Cloud Hypervisor is
# waited for (up to 10 s): one still holding its TAP device would leave
# the next run's guest without a link.
kill_vmm() {
    kill -9 "$_pid" 2>/dev/null
    [ "$_vmm" = cloud-hypervisor ] || return 0
    pkill -9 -f "cloud-hypervisor --kernel" 2>/dev/null
    _i=0
    while pgrep -f "cloud-hypervisor --kernel" >/dev/null 2>&1 && [ $_i -lt 50 ]; do
        sleep 0.2 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
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

# The receiver of each transfer runs RECV (busybox dd prints no byte count
# or time, so it is not used): it counts the bytes with wc and reads
# /proc/uptime (10 ms) when the connection is accepted and at its end, and
# prints "BYTES T0 T1".
RECV='read t0 _ </proc/uptime; n=$(wc -c); read t1 _ </proc/uptime; echo "$n $t0 $t1"'

# tap_counters: the TAP's "tx_packets tx_bytes rx_packets rx_bytes" (tx:
# toward the guest, rx: from it; a GSO frame counts once), the same for
# both VMMs.
tap_counters() {
    for _c in tx_packets tx_bytes rx_packets rx_bytes; do
        printf '%s ' "$(cat "/sys/class/net/$_tap/statistics/$_c")"
    done
}

# tap_detail DIRECTION "BEFORE" "AFTER": with BENCH_DETAIL or BENCH_EXITS,
# the frames that crossed the TAP during a transfer, each way, with their
# average size.
tap_detail() {
    [ -n "${BENCH_DETAIL:-}${BENCH_EXITS:-}" ] || return 0
    echo "$2 $3" | awk -v v="$_vmm" -v d="$1" '{
        tp = $5 - $1; tb = $6 - $2; rp = $7 - $3; rb = $8 - $4
        printf "bench-net: detail: %s: %s: TAP to guest %d frames (%d bytes avg), from guest %d frames (%d bytes avg)\n",
            v, d, tp, tp ? tb / tp : 0, rp, rp ? rb / rp : 0 }'
}

# With BENCH_EXITS=1, L1's KVM exits and injected interrupts during each
# transfer (resources/kvm-host.sh), one "bench-net: exits VMM DIRECTION
# EVENT ..." line per event: kept as "pending" lines until the run is
# complete, so that the table counts only the runs it times.
exits_arm() {
    [ -z "${BENCH_EXITS:-}" ] || kvm_exits_arm bench-net:
}
# exits_report DIRECTION: the counts of the transfer since exits_arm.
exits_report() {
    [ -z "${BENCH_EXITS:-}" ] || kvm_exits_report "exits $_vmm $1" >>"$_d/exits"
}

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
    tap_up "$_tap" 10.9.0.1/24
    "$@" <"$_fifo" >"$_out" 2>"$_d/err" &
    _pid=$!
    exec 3>"$_fifo"
    if ! wait_out "$_out" 'capsule-guest:.*# ' 180; then
        echo "bench-net: $_vmm: the guest did not boot; last output:"
        tail -n 20 "$_out" "$_d/err" | sed 's/^/bench-net:   /'
        exec 3>&-
        kill_vmm
        wait "$_pid" 2>/dev/null
        return 1
    fi
    echo 'ip addr add 10.9.0.2/24 dev eth0; ip link set eth0 up; echo NET-UP' >&3
    wait_out "$_out" '^NET-UP' 30 || echo "bench-net: progress: $_vmm: no NET-UP"
}

# stop_vmm: power the guest off (kill the VMM after 30 s) and reap it.
# Firecracker has no ACPI: its guest ends through the i8042 reset.
stop_vmm() {
    if [ "$_vmm" = firecracker ]; then
        echo 'reboot -f' >&3
    else
        echo 'poweroff -f' >&3
    fi
    _i=0
    while kill -0 "$_pid" 2>/dev/null && [ $_i -lt 30 ]; do
        sleep 1
        _i=$((_i + 1))
    done
    kill_vmm
    exec 3>&-
    wait "$_pid" 2>/dev/null
}

# whole_transfer "BYTES SECONDS": true if the whole transfer arrived.
whole_transfer() {
    [ "${1%% *}" = "$((MIB * 1048576))" ]
}

# measure VMM TAP COMMAND...: boot a fresh VM, time one transfer each way,
# power it off; prints the two result lines. False (nothing printed as a
# result) when the guest did not boot, a transfer stalled or came up short,
# or the VM ended before it was powered off (a guest reset: see
# docs/ARCHITECTURE.md, "Testing layers"); the caller repeats the run.
measure() {
    _vmm="$1" _tap="$2"
    shift 2
    _d="$WORK/$_vmm"
    mkdir -p "$_d"
    _fifo="$_d/in" _out="$_d/out"
    _snd="" _rcv="" _stalled=""
    rm -f "$_d/exits"
    [ -z "${BENCH_TRACE:-}" ] || kvm_trace_clear
    start_vmm "$@" || return 1
    # guest → host: the host's receiver reports what arrived.
    rm -f "$_d/g2h"
    nc -l -p 5201 -e sh -c "$RECV >'$_d/g2h.tmp'; mv '$_d/g2h.tmp' '$_d/g2h'" </dev/null >/dev/null 2>&1 &
    _rcv=$!
    listening 1451 || echo "bench-net: progress: $_vmm: the host's receiver is not listening"
    _before="$(tap_counters)"
    exits_arm
    echo "dd if=/dev/zero bs=1048576 count=$MIB 2>/dev/null | nc 10.9.0.1 5201; echo G2H-DONE" >&3
    if ! wait_transfer "$_out" '^G2H-DONE'; then
        stalled guest-to-host
    else
        # nc ends when the data is in the guest's socket buffer: wait for
        # the host's receiver to see the end.
        wait_out "$_d/g2h" '[0-9]' 120 || echo "bench-net: progress: $_vmm: the host's receiver did not finish"
    fi
    exits_report guest-to-host
    kill -9 "$_rcv" 2>/dev/null
    tap_detail guest-to-host "$_before" "$(tap_counters)"
    _g2h="$(stats "$(cat "$_d/g2h" 2>/dev/null)")"
    # host → guest: the guest's receiver prints its stats. The host
    # connects only once the guest says it listens: a connection refused
    # by a guest still starting nc would leave that nc waiting and the
    # next typed line unread.
    _h2g=""
    if kill -0 "$_pid" 2>/dev/null; then
        echo "nc -l -p 5202 -e sh -c '$RECV >/tmp/h2g' </dev/null & i=0; while [ \$i -lt 300 ] && ! grep -q ':1452 00000000:0000 0A' /proc/net/tcp; do sleep 0.1; i=\$((i+1)); done; echo H2G-LISTENING; wait; echo H2G-STATS \$(cat /tmp/h2g)" >&3
        if wait_out "$_out" '^H2G-LISTENING' 120; then
            _before="$(tap_counters)"
            exits_arm
            dd if=/dev/zero bs=1048576 count="$MIB" 2>/dev/null | nc 10.9.0.2 5202 &
            _snd=$!
            wait_transfer "$_out" '^H2G-STATS [0-9]' || stalled host-to-guest
            wait "$_snd" 2>/dev/null
            exits_report host-to-guest
            tap_detail host-to-guest "$_before" "$(tap_counters)"
            _h2g="$(stats "$(tr -d '\r' <"$_out" | sed -n 's/^H2G-STATS //p' | tail -n1)")"
        else
            echo "bench-net: progress: $_vmm: the guest's receiver is not listening"
        fi
    fi
    if ! kill -0 "$_pid" 2>/dev/null; then
        wait "$_pid"
        _status=$?
        exec 3>&-
        [ -z "$_stalled" ] || return 1
        echo "bench-net: $_vmm: the VM ended before it was powered off (status $_status); last output:"
        tail -n 12 "$_out" "$_d/err" | sed 's/^/bench-net:   /'
        echo "bench-net: note: $_vmm early-end"
        [ -z "${BENCH_TRACE:-}" ] || kvm_trace_shutdown bench-net: "$_vmm" "${BENCH_TRACE_LINES:-150}"
        return 1
    fi
    stop_vmm
    if [ -n "${BENCH_DETAIL:-}" ]; then
        grep -E 'virtio-net .*NetStats|stopped;' "$_d/err" | sed "s/^/bench-net: detail: $_vmm: /"
    fi
    if ! whole_transfer "$_g2h" || ! whole_transfer "$_h2g"; then
        echo "bench-net: $_vmm: incomplete transfer (guest-to-host: '$_g2h', host-to-guest: '$_h2g'; expected $((MIB * 1048576)) bytes each)"
        return 1
    fi
    [ ! -r "$_d/exits" ] || sed 's/^/bench-net: /' "$_d/exits"
    echo "bench-net: $_vmm guest-to-host $_g2h"
    echo "bench-net: $_vmm host-to-guest $_h2g"
}

# measure_loopback: the same transfer with no VM, between two processes
# of this machine over loopback, twice (labelled as the two directions
# so the table has a row to compare each with): what TCP through busybox
# nc can do here at best, the physical limit of the rows above.
measure_loopback() {
    _d="$WORK/loopback" _pid=""
    mkdir -p "$_d"
    for _dir in guest-to-host host-to-guest; do
        rm -f "$_d/r"
        nc -l -p 5203 -e sh -c "$RECV >'$_d/r.tmp'; mv '$_d/r.tmp' '$_d/r'" </dev/null >/dev/null 2>&1 &
        _rcv=$!
        listening 1453 || echo "bench-net: progress: loopback: the receiver is not listening"
        dd if=/dev/zero bs=1048576 count="$MIB" 2>/dev/null | nc 127.0.0.1 5203 &
        _snd=$!
        wait_out "$_d/r" '[0-9]' 120 || echo "bench-net: progress: loopback: the receiver did not finish"
        kill -9 "$_rcv" "$_snd" 2>/dev/null
        wait "$_snd" 2>/dev/null
        _res="$(stats "$(cat "$_d/r" 2>/dev/null)")"
        if ! whole_transfer "$_res"; then
            echo "bench-net: loopback: incomplete transfer ('$_res')"
            return 1
        fi
        echo "bench-net: loopback $_dir $_res"
    done
}

# run_vmm VMM: one measured run of VMM with the configuration below.
run_vmm() {
    case "$1" in
    loopback)
        measure_loopback
        ;;
    capsule | capsule-vhost | capsule-base | capsule-pci | capsule-pci-vhost)
        _vhost=off _tapname=capb0 _bin="$CAPSULE" _transport=mmio
        [ "$1" != capsule-vhost ] || _vhost=on _tapname=capv0
        [ "$1" != capsule-base ] || _tapname=capbb0 _bin="${CAPSULE_BASE:?}"
        [ "$1" != capsule-pci ] || _tapname=capp0 _transport=pci
        [ "$1" != capsule-pci-vhost ] || _tapname=cappv0 _transport=pci _vhost=on
        measure "$1" "$_tapname" "$_bin" run --kernel "$BZIMAGE" --initrd "$INITRD" \
            --cpus "$CPUS" --memory 512M --cmdline "$CMDLINE" --transport "$_transport" \
            --net "tap=$_tapname,vhost=$_vhost"
        ;;
    qemu | qemu-vhost)
        _vhost=off _tapname=qemub0
        [ "$1" = qemu ] || _vhost=on _tapname=qemuv0
        # shellcheck disable=SC2086  # QEMU is a command with arguments
        measure "$1" "$_tapname" $QEMU -L "${QEMU_FIRMWARE:-/usr/share/qemu}" \
            -M microvm -accel kvm -cpu host -m 512M -smp "$CPUS" -nodefaults -no-user-config \
            -display none -no-reboot -serial stdio -kernel "$BZIMAGE" -initrd "$INITRD" \
            -append "$CMDLINE" \
            -netdev "tap,id=n0,ifname=$_tapname,script=no,downscript=no,vhost=$_vhost" \
            -device virtio-net-device,netdev=n0
        ;;
    firecracker)
        cat >"$WORK/fc.json" <<EOF
{
  "boot-source": { "kernel_image_path": "$VMLINUX", "initrd_path": "$INITRD", "boot_args": "$CMDLINE" },
  "machine-config": { "vcpu_count": $CPUS, "mem_size_mib": 512 },
  "network-interfaces": [ { "iface_id": "eth0", "host_dev_name": "fcb0" } ],
  "drives": []
}
EOF
        measure firecracker fcb0 "$FC" --no-api --no-seccomp --config-file "$WORK/fc.json"
        ;;
    cloud-hypervisor)
        # The TAP exists (tap_up) with the host's address; the same given
        # here, or Cloud Hypervisor would set its own default on it. It
        # takes serial input only from a terminal (with --serial tty), so
        # util-linux `script` runs it on a pseudo-terminal fed by the
        # bench's typed lines.
        measure cloud-hypervisor chb0 "$SCRIPT" -q -e -c "$CH --kernel $VMLINUX --initramfs $INITRD \
            --cmdline '$CMDLINE' --cpus boot=$CPUS --memory size=512M \
            --serial tty --console off --net tap=chb0,ip=10.9.0.1,mask=255.255.255.0" /dev/null
        ;;
    esac
}

# BENCH_DETAIL=1: the frames each transfer put through the TAP (both
# VMMs); capsule logs at debug level, and its traffic counters and
# per-vCPU exit counts are printed after each of its runs.
[ -z "${BENCH_DETAIL:-}" ] || export CAPSULE_LOG=debug
VMMS="${BENCH_VMMS:-capsule qemu}"
case " $VMMS " in *" qemu "* | *" qemu-vhost "*)
    if [ -z "${QEMU:-}" ]; then
        echo "bench-net: no QEMU given; no QEMU rows"
        VMMS="$(echo " $VMMS " | sed 's/ qemu / /; s/ qemu-vhost / /')"
    fi
    ;;
esac
# Rounds: each VMM that still needs runs does one in turn, so that both
# see the same load on the machine. A run that fails is repeated, up to
# BENCH_TRIES (default 3) failures per VMM and round.
TRIES="${BENCH_TRIES:-3}"
round=0
while :; do
    round=$((round + 1))
    busy=""
    for vmm in $VMMS; do
        case "$vmm" in capsule | capsule-vhost | capsule-base | capsule-pci | capsule-pci-vhost | qemu | qemu-vhost | firecracker | cloud-hypervisor | loopback) ;; *)
            echo "bench-net: unknown VMM '$vmm' in BENCH_VMMS (capsule, capsule-vhost, capsule-base, capsule-pci, capsule-pci-vhost, qemu, qemu-vhost, firecracker, cloud-hypervisor, loopback)"
            exit 2
            ;;
        esac
        left=0
        # BENCH_RUNS_cloud_hypervisor: '-' cannot be in a variable name.
        eval "left=\${BENCH_RUNS_$(echo "$vmm" | tr - _):-$RUNS}"
        [ "$left" -ge "$round" ] || continue
        busy=1
        tries=1
        echo "bench-net: progress: round $round: $vmm"
        until run_vmm "$vmm"; do
            if [ "$tries" -ge "$TRIES" ]; then
                echo "bench-net: $vmm: round $round failed $TRIES times; giving up on $vmm"
                VMMS="$(echo " $VMMS " | sed "s/ $vmm / /")"
                break
            fi
            tries=$((tries + 1))
            echo "bench-net: progress: round $round: $vmm again (attempt $tries)"
        done
    done
    [ -n "$busy" ] || break
done
