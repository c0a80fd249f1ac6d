# shellcheck shell=sh
# resources/kvm-host.sh: POSIX sh helpers for the scripts that run next to
# /dev/kvm (tests/boot/cases.sh and resources/bench-net-guest.sh), inside
# the nested harness's L1 (busybox sh) or on a host with hardware KVM.
# Sourced, not run.

# tap_up NAME ADDR: in the background, once the VMM has created the TAP
# device NAME, give it ADDR (CIDR) and bring it up (for at most 60 s).
tap_up() {
    (
        _i=0
        while [ $_i -lt 600 ] && ! ip link show "$1" >/dev/null 2>&1; do
            sleep 0.1 2>/dev/null || sleep 1
            _i=$((_i + 1))
        done
        ip addr add "$2" dev "$1" && ip link set "$1" up
    ) </dev/null >/dev/null 2>&1 &
}
