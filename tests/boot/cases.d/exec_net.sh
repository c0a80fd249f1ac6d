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
    _www="$WORK/exec_net_user.www"
    rm -rf "$_www"
    mkdir -p "$_www"
    echo "hello-over-passt" >"$_www/index.html"
    busybox httpd -f -p 6003 -h "$_www" </dev/null >/dev/null 2>&1 &
    _httpd=$!
    CAPSULE_PASST="$(net_passt)"
    export CAPSULE_PASST
    _capsule="$CAPSULE"
    CAPSULE="$(net_capsule_for_passt)" || CAPSULE="$_capsule"
    # shellcheck disable=SC2046
    run_exec exec_net_user /dev/null $(EXEC_DISK_ARGS) --net user \
        -- sh -c 'ip -4 addr show eth0 | grep -o "inet [0-9./]*"; wget -q -T 20 -O- http://192.168.78.254:6003/index.html'
    CAPSULE="$_capsule"
    kill "$_httpd" 2>/dev/null
    net_ip tuntap del dev capteu mode tap 2>/dev/null
    expect "exit status 0" rc_is 0
    expect "eth0 has passt's address (the host's)" out_has "inet 192.168.78.1/24"
    expect "the command fetched the host's page" out_has "^hello-over-passt\$"
    expect "no Rust panic" no_rust_panic
}
