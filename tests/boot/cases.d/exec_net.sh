# shellcheck shell=sh
# tests/boot/cases.d/exec_net.sh: `capsule exec --net user` (sourced by
# cases.sh). The init configures eth0 as passt's DHCP would (the host's
# address and gateway); the command fetches a file from a web server on the
# host through the gateway address. The host side is set up as for
# net_user (net.sh): a TAP nobody reads as passt's uplink with a default
# route, and capsule in the switch-root wrapper passt needs in L1.

ALL_CASES="$ALL_CASES exec_net_user"

case_exec_net_user() {
    net_prepare
    net_ip tuntap add dev capteu mode tap 2>/dev/null
    ip addr add 192.168.78.1/24 dev capteu 2>/dev/null
    ip link set capteu up 2>/dev/null
    ip route add default via 192.168.78.254 dev capteu 2>/dev/null
    # A server on the host, reached through the gateway address (nc, as in
    # net_user: the guest image's static busybox wget crashes).
    nc -l -p 6003 -e echo hello-over-passt </dev/null >/dev/null 2>&1 &
    _server=$!
    CAPSULE_PASST="$(net_passt)"
    export CAPSULE_PASST
    _capsule="$CAPSULE"
    CAPSULE="$(net_capsule_for_passt)" || CAPSULE="$_capsule"
    # shellcheck disable=SC2046
    run_exec exec_net_user /dev/null $(EXEC_DISK_ARGS) --net user \
        -- sh -c 'ip -4 addr show eth0 | grep -o "inet [0-9./]*"; nc 192.168.78.254 6003 -e sh -c "cat >/tmp/reply" </dev/null; cat /tmp/reply'
    CAPSULE="$_capsule"
    kill "$_server" 2>/dev/null
    net_ip tuntap del dev capteu mode tap 2>/dev/null
    expect "exit status 0" rc_is 0
    expect "eth0 has passt's address (the host's)" out_has "inet 192.168.78.1/24"
    expect "the command reached the host's server" out_has "^hello-over-passt\$"
    expect "no Rust panic" no_rust_panic
}
