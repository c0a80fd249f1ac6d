# shellcheck shell=sh
# tests/boot/cases.d/net.sh: virtio-net boot cases (sourced by cases.sh).
#
# Run as root on the machine with /dev/kvm: inside L1 (busybox) or on a host
# with hardware KVM. TAP cases let capsule create the TAP device and
# configure the host side as soon as it appears; the user-mode case runs
# passt (from $TOOLS in L1, else from PATH) with a TAP device without a
# reader as the host's "uplink", since passt needs an interface with a
# default route to copy addresses from.
#
# Guest-side commands run in one typed line each, with every command that
# would read stdin given another input: typed-ahead lines must not be eaten.
# busybox nc ends a connection when its stdin ends, so transfers use
# `nc -e` (the program's output is sent, its input is what arrives).

# shellcheck disable=SC2016  # $(...) in case inputs is for the guest shell
ALL_CASES="$ALL_CASES net_ping net_tcp_64m net_vhost_tcp_64m net_user net_tap_gone"

# net_prepare: /dev/net/tun, loopback up, a `nobody` user for passt.
net_prepare() {
    if [ ! -c /dev/net/tun ]; then
        insmod /lib/modules/tun.ko 2>/dev/null || modprobe tun 2>/dev/null || true
    fi
    ip link set lo up 2>/dev/null || true
    if [ -w /etc/passwd ] && ! grep -q '^nobody:' /etc/passwd 2>/dev/null; then
        echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >>/etc/passwd
        echo 'nogroup:x:65534:' >>/etc/group
    fi
}

# net_ip ARGS: iproute2's ip (for tuntap), from $TOOLS if there.
net_ip() {
    if [ -n "${TOOLS:-}" ] && [ -x "$TOOLS/ip" ]; then
        "$TOOLS/ip" "$@"
    else
        ip "$@"
    fi
}

# net_passt: the passt binary to give capsule (CAPSULE_PASST): the static
# one tests/boot/run.sh built and copied into $TOOLS (Debian 12's own loses
# published-port replies; see resources/build-passt.sh).
net_passt() {
    if [ -n "${TOOLS:-}" ] && [ -x "$TOOLS/bin/passt" ]; then
        echo "$TOOLS/bin/passt"
    else
        echo "net_passt: no passt in \$TOOLS/bin" >&2
        echo passt
    fi
}

# net_capsule_for_passt: the capsule command for a case that starts passt.
# passt sandboxes itself with pivot_root(2) and a user namespace. The
# kernel refuses pivot_root (EINVAL) while the caller's root is the initial
# ramfs, as in L1, whose root is the initramfs: passt then logs
# "pivot_root: Invalid argument, Failed to sandbox process" and exits. A
# plain chroot into a bind mount of / is no way out: a chrooted process
# may not create a user namespace (EPERM). So there capsule runs as after
# switch_root: in its own mount namespace, a recursive bind mount of / (the
# same files at the same paths) is moved over / and made the root.
# Elsewhere capsule runs as it is.
net_capsule_for_passt() {
    if [ "$(awk '$2 == "/" { print $3; exit }' /proc/mounts)" != rootfs ]; then
        echo "$CAPSULE"
        return
    fi
    mkdir -p /mnt/capsule-root || return 1
    cat >"$WORK/capsule-switch-root" <<'EOF'
#!/bin/sh
exec unshare -m --propagation private sh -c 'mount --rbind / /mnt/capsule-root && cd /mnt/capsule-root && mount -o move . / && exec chroot . "$0" "$@"' CAPSULE "$@"
EOF
    sed -i "s|CAPSULE \"\$@\"|'$CAPSULE' \"\$@\"|" "$WORK/capsule-switch-root"
    chmod 755 "$WORK/capsule-switch-root"
    echo "$WORK/capsule-switch-root"
}

# net_fd_wrapper PASST: a script that writes the descriptors it was started
# with to $WORK/passt-fds-at-exec ("N -> target" and, first, "socket=N"
# for passt's --fd N), then execs PASST with its arguments; prints its path.
net_fd_wrapper() {
    _w="$WORK/passt-fd-wrapper"
    cat >"$_w" <<EOF
#!/bin/sh
out='$WORK/passt-fds-at-exec'
fd=none
prev=
for a in "\$@"; do
    [ "\$prev" = --fd ] && fd="\$a"
    prev="\$a"
done
echo "socket=\$fd" >"\$out"
# What an exec'd program inherits from here: the list of an exec'd ls,
# without ls's own directory descriptor (GNU ls shows it as /proc/N/fd;
# busybox ls, having closed it, shows it without a target).
(exec ls -l /proc/self/fd/) >"\$out.raw"
awk '/ -> / && \$NF !~ "^/proc/[0-9]*/fd" { print \$(NF-2), "->", \$NF }' "\$out.raw" >>"\$out"
exec '$1' "\$@"
EOF
    chmod 755 "$_w"
    echo "$_w"
}

# net_fds_only_expected FILE: the wrapper's list holds only 0, 1, 2 and the
# socket passed with --fd.
net_fds_only_expected() {
    _sockfd="$(sed -n 's/^socket=//p' "$1" 2>/dev/null)"
    [ -n "$_sockfd" ] && [ "$_sockfd" != none ] || return 1
    ! grep -v '^socket=' "$1" | awk -v s="$_sockfd" '$1 != 0 && $1 != 1 && $1 != 2 && $1 != s' | grep -q .
}

stderr_has() { grep -q -- "$1" "$ERR"; }
no_link_problem() { ! grep -q 'link problem' "$ERR"; }
file_md5_is() { [ "$(md5sum <"$1" | cut -d' ' -f1)" = "$2" ]; }
file_has() { grep -q -- "$2" "$1" 2>/dev/null; }

case_net_ping() {
    net_prepare
    tap_up capt0 10.0.0.1/24
    run_capsule net_ping 'ip addr add 10.0.0.2/24 dev eth0; ip link set eth0 up; echo mac=$(cat /sys/class/net/eth0/address); ping -c 3 -w 30 10.0.0.1 </dev/null && echo PING-OK; poweroff -f' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M --net tap=capt0
    expect "exit status 0" rc_is 0
    expect "default MAC 02:ca:75:00:00:00" out_has_line "mac=02:ca:75:00:00:00"
    expect "guest pings the host over TAP" out_has_line "PING-OK"
    expect "no link problem" no_link_problem
    expect "no Rust panic" no_rust_panic
    expect "TAP gone after exit" sh -c '! ip link show capt0 >/dev/null 2>&1'
}

case_net_tcp_64m() {
    net_tcp_transfer net_tcp_64m capt1 10.0.1 ""
}

# vhost-net: the same transfer with the data path in L1's kernel. Checks
# that capsule handed the rings to vhost-net (its log says so) and that
# the bytes arrive intact both ways through its relayed interrupts.
case_net_vhost_tcp_64m() {
    net_prepare
    net_vhost_prepare
    export CAPSULE_LOG=info
    net_tcp_transfer net_vhost_tcp_64m capt2 10.0.2 ",vhost=on"
    expect "the NIC was built on vhost-net" stderr_has "data path in the kernel (vhost-net)"
    expect "the driver's activation handed the rings to vhost-net" stderr_has "vhost-net moves its frames"
    expect "no vhost-net ring error" sh -c "! grep -q 'vhost-net cannot use queue' '$ERR'"
}

# net_vhost_prepare: /dev/vhost-net (and the modules it needs: tap, vhost,
# vhost_iotlb; tun comes from net_prepare).
net_vhost_prepare() {
    [ -c /dev/vhost-net ] && return 0
    for _m in tap vhost_iotlb vhost vhost_net; do
        insmod "/lib/modules/$_m.ko" 2>/dev/null || modprobe "$_m" 2>/dev/null || true
    done
}

# net_tcp_transfer NAME TAP SUBNET NETOPTS: 64 MiB host → guest and back
# over TCP, through TAP (SUBNET.1 the host, SUBNET.2 the guest), NETOPTS
# appended to --net tap=TAP,mac=...; checks both copies' md5.
net_tcp_transfer() {
    _case="$1" _tap="$2" _net="$3" _opts="$4"
    net_prepare
    _data="$WORK/net-data.bin"
    _back="$WORK/net-back.bin"
    rm -f "$_back" "$_back.done"
    dd if=/dev/urandom of="$_data" bs=1048576 count=64 2>/dev/null
    _sum="$(md5sum <"$_data" | cut -d' ' -f1)"
    tap_up "$_tap" "$_net.1/24"
    # Host → guest on 5001, guest → host on 5002; one connection each.
    # The host's receiver marks the end of its file once the guest's side
    # has closed the connection.
    nc -l -p 5001 -e cat "$_data" </dev/null >/dev/null 2>&1 &
    _s1=$!
    nc -l -p 5002 -e sh -c "cat >'$_back'; touch '$_back.done'" </dev/null >/dev/null 2>&1 &
    _s2=$!
    # In the guest, nc ends as soon as cat has handed the last bytes to its
    # socket; the kernel sends them after that. So the guest waits until
    # no connection to port 5002 (0x138A) is still established or sending
    # (TCP states 01 ESTABLISHED, 04 FIN_WAIT1, 08 CLOSE_WAIT, 09 LAST_ACK,
    # 0B CLOSING in /proc/net/tcp) before it powers off: FIN_WAIT2 means
    # the host acknowledged every byte and the FIN. A progress line every
    # 5 s shows a stall apart from slowness.
    run_capsule "$_case" "ip addr add $_net.2/24 dev eth0; ip link set eth0 up; sleep 1; t0=\$(date +%s); nc $_net.1 5001 -e sh -c \"cat >/tmp/in\" </dev/null; t1=\$(date +%s); echo \"in-sum \$(md5sum </tmp/in)\"; (while sleep 5; do echo \"tx-progress \$((\$(date +%s)-t1))s \$(cat /sys/class/net/eth0/statistics/tx_bytes) bytes\"; done) & q=\$!; nc $_net.1 5002 -e cat /tmp/in </dev/null; i=0; while [ \$i -lt 600 ] && grep -qE \":138A 0[1489B] \" /proc/net/tcp; do sleep 0.2; i=\$((i+1)); done; t2=\$(date +%s); kill \$q; echo \"TCP-DONE host-to-guest=\$((t1-t0))s guest-to-host=\$((t2-t1))s drain-polls=\$i\"; poweroff -f" \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 2 --memory 512M --net "tap=$_tap,mac=02:00:00:00:01:02$_opts"
    _i=0
    while [ $_i -lt 100 ] && [ ! -e "$_back.done" ]; do
        sleep 0.1 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    kill "$_s1" "$_s2" 2>/dev/null
    expect "exit status 0" rc_is 0
    expect "transfers finished" grep -q '^TCP-DONE host-to-guest=[0-9]' "$OUT"
    expect "64 MiB host→guest arrived intact (md5 $_sum)" out_has "in-sum $_sum"
    expect "the host's receiver saw the guest close the connection" test -e "$_back.done"
    expect "64 MiB guest→host arrived intact" file_md5_is "$_back" "$_sum"
    expect "no link problem" no_link_problem
    expect "no Rust panic" no_rust_panic
    sed -n "s/^\(TCP-DONE .*\)/    $_case: \1/p" "$OUT" | head -n1
    grep '^tx-progress ' "$OUT" | tail -n 3 | sed "s/^/    $_case: /"
    echo "    $_case: the host received $(wc -c <"$_back" 2>/dev/null || echo 0) bytes"
    rm -f "$_data" "$_back" "$_back.done"
}

case_net_user() {
    net_prepare
    # The host's uplink for passt: a TAP nobody reads, with an address and
    # a default route.
    net_ip tuntap add dev captup mode tap 2>/dev/null
    ip addr add 192.168.77.1/24 dev captup 2>/dev/null
    ip link set captup up 2>/dev/null
    ip route add default via 192.168.77.254 dev captup 2>/dev/null
    # A server on the host, reached through the gateway address.
    nc -l -p 6001 -e echo hello-from-host </dev/null >/dev/null 2>&1 &
    _s1=$!
    # The published port: connect once the guest's server is up.
    _reply="$WORK/net-user-reply"
    rm -f "$_reply"
    rm -f "$WORK/passt-fds-at-exec" "$WORK/passt-fds-running"
    (
        wait_for "$WORK/net_user/stdout.raw" "GUEST-SERVER-UP" "$CASE_TIMEOUT" "$WORK/net_user/done" || exit 0
        # For the record: what passt holds once it runs (what it opens
        # itself: epoll, its namespaces, the guest's socket).
        # (Debian's busybox has pidof, not pgrep.)
        _pp="$(pidof passt.avx2 passt)"
        [ -z "$_pp" ] || ls -l "/proc/${_pp%% *}/fd/" >"$WORK/passt-fds-running" 2>&1
        _i=0
        while [ $_i -lt 30 ] && ! grep -q hello-from-guest "$_reply" 2>/dev/null; do
            # Bounded: a connection the guest never answers must not
            # hang the retries.
            timeout 10 nc 127.0.0.1 6080 -e sh -c "cat >'$_reply'" </dev/null >>"$WORK/net-user-attempts" 2>&1
            echo "connection $_i to 6080: status $?, reply '$(cat "$_reply" 2>/dev/null)'" >>"$WORK/net-user-attempts"
            sleep 1
            _i=$((_i + 1))
        done
    ) &
    _c=$!
    # passt through a wrapper that lists the descriptors capsule handed
    # over (passt itself may close strays on start, hiding a leak).
    CAPSULE_PASST="$(net_fd_wrapper "$(net_passt)")"
    export CAPSULE_PASST
    # passt logs to syslog after it starts: keep a log for the report.
    rm -f "$WORK/net-user-attempts" "$WORK/net-user-syslog"
    _syslogd=""
    if [ ! -e /dev/log ] && command -v syslogd >/dev/null 2>&1; then
        syslogd -n -O "$WORK/net-user-syslog" </dev/null >/dev/null 2>&1 &
        _syslogd=$!
        sleep 1
    fi
    _capsule="$CAPSULE"
    CAPSULE="$(net_capsule_for_passt)" || CAPSULE="$_capsule"
    # No here-document: the feeder types a line once the previous one has
    # brought back the shell's main prompt, which continuation lines do not.
    run_capsule net_user 'printf "#!/bin/sh\n[ \"\$1\" = bound ] || exit 0\nip addr add \$ip/\$mask dev \$interface\nip route add default via \$router\necho \$router >/tmp/router\n" >/tmp/dhcp.sh; chmod +x /tmp/dhcp.sh; ip link set eth0 up; udhcpc -i eth0 -n -q -t 10 -s /tmp/dhcp.sh </dev/null >/dev/null 2>&1 && echo "DHCP-OK $(ip addr show eth0 | grep -o "inet [0-9./]*")"
nc $(cat /tmp/router) 6001 -e sh -c "cat >/tmp/reply" </dev/null; echo "host-says $(cat /tmp/reply)"
nc -l -p 80 -e echo hello-from-guest </dev/null & sleep 1; echo GUEST-SERVER-UP; wait; echo PUBLISH-SERVED; poweroff -f' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M \
        --net user,publish=6080:80
    CAPSULE="$_capsule"
    kill "$_s1" "$_c" 2>/dev/null
    [ -z "$_syslogd" ] || kill "$_syslogd" 2>/dev/null
    # How passt ended, if the kernel logged it (seccomp, a fatal signal),
    # what it logged and what the published-port connections got.
    dmesg 2>/dev/null | grep -iE 'passt|seccomp|audit.*1326|traps:' | tail -n 5 | sed 's/^/    net_user: dmesg: /'
    if ! file_has "$_reply" hello-from-guest; then
        tail -n 12 "$WORK/net-user-syslog" 2>/dev/null | sed 's/^/    net_user: syslog: /'
        tail -n 6 "$WORK/net-user-attempts" 2>/dev/null | sed 's/^/    net_user: /'
    fi
    net_ip tuntap del dev captup mode tap 2>/dev/null
    expect "exit status 0" rc_is 0
    expect "passt inherited only 0, 1, 2 and its socket" net_fds_only_expected "$WORK/passt-fds-at-exec"
    sed 's/^/    net_user: fds at exec: /' "$WORK/passt-fds-at-exec" 2>/dev/null
    sed -n 's/.* \([0-9][0-9]* -> .*\)/    net_user: fds of running passt: \1/p' "$WORK/passt-fds-running" 2>/dev/null
    expect "guest got a DHCP address" out_has "DHCP-OK inet 192.168.77.1/24"
    expect "guest reached the host's TCP server" out_has_line "host-says hello-from-host"
    expect "published port reached the guest's server" file_has "$_reply" hello-from-guest
    expect "guest served the published connection" out_has_line "PUBLISH-SERVED"
    expect "no link problem" no_link_problem
    expect "no Rust panic" no_rust_panic
    # pidof must exist: a missing tool must not read as "no passt".
    expect "passt stopped" sh -c 'command -v pidof >/dev/null && ! pidof passt passt.avx2 >/dev/null'
}

case_net_tap_gone() {
    net_prepare
    tap_up capt2 10.0.2.1/24
    (
        wait_for "$WORK/net_tap_gone/stdout.raw" "LINK-UP" "$CASE_TIMEOUT" "$WORK/net_tap_gone/done" || exit 0
        ip link del capt2
    ) </dev/null >/dev/null 2>&1 &
    run_capsule net_tap_gone 'ip link set eth0 up; sleep 2; echo LINK-$(cat /sys/class/net/eth0/carrier | sed s/1/UP/); sleep 10; echo carrier-after=$(cat /sys/class/net/eth0/carrier); ping -c 1 -w 2 10.0.2.1 </dev/null >/dev/null 2>&1; echo STILL-RUNNING; poweroff -f' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M --net tap=capt2
    expect "exit status 0" rc_is 0
    expect "the link was up first" out_has "LINK-UP"
    expect "one logged link problem" stderr_has "link problem"
    expect "guest sees the carrier go down" out_has_line "carrier-after=0"
    expect "guest keeps running" out_has_line "STILL-RUNNING"
    expect "no Rust panic" no_rust_panic
}
