# shellcheck shell=sh
# tests/boot/cases.d/mmds.sh: the metadata service (issue #21), sourced by
# tests/boot/cases.sh; POSIX sh for busybox ash in L1.
#
# mmds_v2: capsule started the way Firecracker's users start Firecracker
# (`firecracker --no-api --config-file` with `mmds-config`, and
# `--metadata FILE` for the data) answers the guest's own TCP/IP stack at
# 169.254.169.254 on a TAP interface: a V2 session token, a GET with it,
# a GET without it refused (401), and ordinary traffic (a ping to the
# host) still goes to the TAP device. busybox nc ends a connection when
# its stdin ends, so each request is `nc -e` of a shell that prints the
# request and saves the answer.

# shellcheck disable=SC2016  # $(...) in case inputs is for the guest shell
ALL_CASES="$ALL_CASES mmds_v2"

case_mmds_v2() {
    net_prepare
    _d="$WORK/mmds_v2.files"
    rm -rf "$_d"
    mkdir -p "$_d"
    cat >"$_d/vm.json" <<EOF
{"boot-source": {"kernel_image_path": "$VMLINUX", "initrd_path": "$INITRD",
                 "boot_args": "console=ttyS0 reboot=k panic=1"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "captm0"}],
 "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]}}
EOF
    cat >"$_d/metadata.json" <<'EOF'
{"latest": {"meta-data": {"instance-id": "i-capsule-42", "local-hostname": "guest1"}}}
EOF
    tap_up captm0 10.0.9.1/24
    run_capsule mmds_v2 'ip addr add 10.0.9.2/24 dev eth0; ip link set eth0 up; ip route add 169.254.169.254 dev eth0; echo net-up
nc 169.254.169.254 80 -e sh -c "printf \"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n\"; cat >/tmp/token.http" </dev/null; T=$(tail -n 1 /tmp/token.http); echo token-len=${#T}
nc 169.254.169.254 80 -e sh -c "printf \"GET /latest/meta-data/instance-id HTTP/1.1\r\nX-metadata-token: $T\r\n\r\n\"; cat >/tmp/id.http" </dev/null; echo id=$(tail -n 1 /tmp/id.http)
nc 169.254.169.254 80 -e sh -c "printf \"GET /latest/meta-data/ HTTP/1.1\r\nX-metadata-token: $T\r\n\r\n\"; cat >/tmp/keys.http" </dev/null; echo keys=$(tail -n 2 /tmp/keys.http | tr -d "\r" | tr "\n" " ")
nc 169.254.169.254 80 -e sh -c "printf \"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n\"; cat >/tmp/none.http" </dev/null; echo no-token=$(head -n 1 /tmp/none.http | tr -d "\r")
ping -c 1 -w 20 10.0.9.1 </dev/null >/dev/null && echo PING-OK
poweroff -f' \
        firecracker --no-api --config-file "$_d/vm.json" --metadata "$_d/metadata.json"
    expect "exit status 0" rc_is 0
    expect "the guest configured eth0" out_has_line "net-up"
    expect "a V2 session token (64 hex digits)" out_has_line "token-len=64"
    expect "GET with the token: the instance id" out_has_line "id=i-capsule-42"
    expect "GET of a directory: its keys" out_has_line "keys=instance-id local-hostname"
    expect "GET without a token: 401" out_has_line "no-token=HTTP/1.1 401 Unauthorized"
    expect "other traffic still reaches the TAP (ping)" out_has_line "PING-OK"
    expect "no Rust panic" no_rust_panic
    rm -rf "$_d"
}
