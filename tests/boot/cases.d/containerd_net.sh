# shellcheck shell=sh
# tests/boot/cases.d/containerd_net.sh: a container's network namespace
# inside its microVM (issue 24: the pod network, Kata's tcfilter model).
# Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1. Uses
# containerd.sh's helpers (containerd_prereqs, containerd_case_begin,
# ctr, wait_line) and net.sh's (net_prepare, net_ip).
#
# What CNI would do, by hand: a network namespace with the pod end of a
# veth pair (10.88.7.2/24, MTU 1400, default route via the host end,
# 10.88.7.1/24). `ctr run --with-ns network:PATH` puts the container in
# it; the shim finds that interface, creates its TAP there, joins them
# with tc redirects and gives capsule the interface's MAC, address,
# gateway and MTU. The container prints its eth0 and fetches a token from
# a server (busybox nc) on the host end; the host fetches a text from a
# server in the container. (A ping would prove nothing: the veth keeps
# its address, so the namespace's own stack answers when the redirects
# are missing, as it did in this case's first run.) A container without the namespace
# has no network device, as before.

# shellcheck disable=SC2016  # $... in container commands is for the guest shell
# shellcheck disable=SC2086  # $_rt is two words
# Optional (run by name), as containerd_ctr: the static shim's build is
# more than CI's per-feature budget.
OPTIONAL_CASES="${OPTIONAL_CASES:-} containerd_net"

# cnet_modules: the veth and tc modules L1's kernel has as modules
# (resources/harness/l1-kernel.sh ships them; built-in ones are absent).
cnet_modules() {
    for _m in veth sch_ingress cls_matchall act_mirred; do
        [ -f "/lib/modules/$_m.ko" ] && insmod "/lib/modules/$_m.ko" 2>/dev/null
    done
    return 0
}

# cnet_pod NS: the namespace /run/netns/NS with the veth's pod end eth0.
cnet_pod() {
    net_ip netns add "$1" &&
        net_ip link add cnet-h0 type veth peer name eth0 netns "$1" &&
        net_ip addr add 10.88.7.1/24 dev cnet-h0 &&
        net_ip link set cnet-h0 mtu 1400 up &&
        net_ip -n "$1" link set lo up &&
        net_ip -n "$1" link set eth0 mtu 1400 up &&
        net_ip -n "$1" addr add 10.88.7.2/24 dev eth0 &&
        net_ip -n "$1" route add default via 10.88.7.1
}

# cnet_tc ARGS: iproute2's tc from $TOOLS (as the shim finds it in PATH).
cnet_tc() { "$TOOLS/tc" "$@"; }

# cnet_no_host_tap: the host's namespace has no capsule0.
cnet_no_host_tap() { ! net_ip link show capsule0 >/dev/null 2>&1; }

# cnet_lacks FILE TEXT: FILE does not have TEXT.
cnet_lacks() { ! grep -q -- "$2" "$1"; }

case_containerd_net() {
    containerd_prereqs || return
    if [ ! -x "$TOOLS/tc" ]; then
        CASE_ERRORS="not run: no tc in \$TOOLS (tests/boot/run.sh ships it)"
        SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
        return
    fi
    net_prepare
    cnet_modules
    # containerd (and so the shim) finds iproute2's tc in PATH: first,
    # before L1's busybox tc (which has no ingress qdisc; the first run
    # failed on it). Only containerd's PATH: the case's own stays.
    _path="$PATH"
    PATH="$TOOLS:$PATH"
    containerd_case_begin containerd_net "ctr run --with-ns network:/run/netns/capnet ..." || {
        PATH="$_path"
        return
    }
    PATH="$_path"
    _rt="--runtime io.containerd.capsule.v2"
    _ns=capnet
    net_ip netns del "$_ns" 2>/dev/null
    net_ip link del cnet-h0 2>/dev/null
    expect "the pod's namespace and veth were made" cnet_pod "$_ns"
    _mac="$(net_ip -n "$_ns" link show eth0 | awk '/link\/ether/ { print $2 }')"
    echo "    containerd_net: pod eth0 $_mac 10.88.7.2/24 mtu 1400"

    # The host's server, with a token the guest can only have from it
    # (busybox nc -e: the program's output is sent; the static busybox's
    # wget crashes in the guest, see exec_net.sh).
    _token="token-$$-$(now)"
    busybox nc -l -p 8080 -e echo "$_token" </dev/null >/dev/null 2>&1 &
    _server=$!

    for _a in ip nc; do ln -s busybox "$_root/bin/$_a"; done
    _t0=$(now)
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --with-ns "network:/run/netns/$_ns" --rootfs "$_root" n1 /bin/sh -c '
            echo "guest-uptime: $(cat /proc/uptime)"
            ip -o -4 addr show dev eth0; ip -o link show dev eth0; ip route
            nc -w 20 10.88.7.1 8080 -e sh -c "cat >/tmp/reply" </dev/null
            echo "got:$(cat /tmp/reply)"
            v=from-guest-$((6*7))
            nc -l -p 8081 -e echo $v </dev/null >/dev/null 2>&1 & echo n1-up; exec sleep 600' \
        </dev/null >"$_d/n1.out" 2>"$_d/n1.err" &
    _n1=$!
    expect "the networked container started" wait_line "$_d/n1.out" n1-up 120
    echo "    containerd_net: ctr run to n1-up took $(($(now) - _t0)) s"
    sed 's/^/    containerd_net: n1: /' "$_d/n1.out" | head -n 12
    expect "the guest's eth0 has the pod's address" grep -q 'eth0 *inet 10\.88\.7\.2/24' "$_d/n1.out"
    expect "the guest's eth0 has the pod's MAC ($_mac)" \
        grep -q "eth0:.* mtu 1400 .*link/ether $_mac" "$_d/n1.out"
    expect "the guest's default route is the pod's gateway" \
        grep -q '^default via 10\.88\.7\.1 dev eth0' "$_d/n1.out"
    expect "the guest fetched the host's token through 10.88.7.1" grep -qx "got:$_token" "$_d/n1.out"
    for _i in 1 2 3 4 5; do
        busybox nc -w 20 10.88.7.2 8081 -e sh -c "cat >'$_d/from-guest'" </dev/null 2>>"$_d/n1.err"
        [ -s "$_d/from-guest" ] && break
        sleep 1
    done
    expect "the host fetched the container's text from 10.88.7.2" \
        test "$(cat "$_d/from-guest" 2>/dev/null)" = from-guest-42
    net_ip -n "$_ns" link show >"$_d/links-running" 2>&1
    cnet_tc -n "$_ns" filter show dev eth0 ingress >"$_d/tc-running" 2>&1
    expect "the TAP capsule0 is in the pod's namespace" grep -q 'capsule0:' "$_d/links-running"
    expect "and not in the host's" cnet_no_host_tap
    ctr task kill n1 >>"$_d/n1.err" 2>&1
    wait "$_n1"
    RC=$?
    expect "ctr task kill ended n1 with 143 (was $RC)" rc_is 143
    net_ip -n "$_ns" link show >"$_d/links-after" 2>&1
    cnet_tc -n "$_ns" qdisc show dev eth0 >"$_d/tc-after" 2>&1
    expect "delete removed the TAP" cnet_lacks "$_d/links-after" capsule0:
    expect "and the veth's ingress redirect" cnet_lacks "$_d/tc-after" ingress

    # Without a network namespace: no network device, as before.
    timeout -k 10 "$CASE_TIMEOUT" "$TOOLS/containerd/ctr" --address "$CTRD_SOCK" run --rm $_rt \
        --rootfs "$_root" n2 /bin/sh -c 'ip -o link; echo n2-done' \
        </dev/null >"$_d/n2.out" 2>"$_d/n2.err"
    _rcn2=$?
    expect "the container without a namespace ran (status $_rcn2)" grep -qx n2-done "$_d/n2.out"
    expect "and has loopback only" test "$(grep -c ': eth' "$_d/n2.out")" -eq 0

    SECS=$(($(now) - _start))
    kill "$_server" 2>/dev/null
    kill "$CTRD_PID" 2>/dev/null
    wait "$CTRD_PID" 2>/dev/null
    virtiofs_done
    net_ip netns del "$_ns" 2>/dev/null
    net_ip link del cnet-h0 2>/dev/null
    for _f in n1.out n1.err links-running tc-running links-after tc-after n2.out n2.err; do
        echo "== $_f" >>"$OUT"
        cat "$_d/$_f" >>"$OUT" 2>/dev/null
    done
    grep -i 'capsule0\|network namespace\|podnet\|tc ' "$_d/containerd.log" | tail -n 20 >>"$ERR"
    tail -n 30 "$_d/containerd.log" >>"$ERR"
    expect "no Rust panic" no_rust_panic
}
