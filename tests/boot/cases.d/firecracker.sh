# shellcheck shell=sh
# tests/boot/cases.d/firecracker.sh: capsule started with Firecracker's
# command line (`capsule firecracker --no-api --config-file ...`) boots a
# Linux guest from a Firecracker configuration file with a drive, an
# entropy device (virtio-rng) and metrics: the guest's hwrng is the
# virtio one and gives random bytes, and the metrics file counts the
# block and entropy bytes. Sourced by tests/boot/cases.sh; POSIX sh.

ALL_CASES="$ALL_CASES fc_config_entropy"

# metric_sum FILE KEY: the sum of KEY over every line (each is a delta).
metric_sum() {
    grep -o "\"$2\":[0-9]*" "$1" | cut -d: -f2 | awk '{s += $1} END {print s + 0}'
}

case_fc_config_entropy() {
    _d="$WORK/fc_config_entropy.files"
    rm -rf "$_d"
    mkdir -p "$_d"
    dd if=/dev/zero of="$_d/data.img" bs=1024 count=4096 2>/dev/null
    cat >"$_d/vm.json" <<EOF
{"boot-source": {"kernel_image_path": "$VMLINUX", "initrd_path": "$INITRD",
                 "boot_args": "console=ttyS0 reboot=k panic=1"},
 "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
 "drives": [{"drive_id": "data", "path_on_host": "$_d/data.img",
             "is_root_device": false, "is_read_only": false}],
 "entropy": {},
 "metrics": {"metrics_path": "$_d/metrics.json"}}
EOF
    run_capsule fc_config_entropy 'echo rng=$(cat /sys/class/misc/hw_random/rng_current)
echo hwrng-bytes=$(head -c 4096 /dev/hwrng | wc -c)
dd if=/dev/vda of=/dev/null bs=4096 count=256 2>/dev/null; echo read-done
poweroff -f' \
        firecracker --no-api --config-file "$_d/vm.json"
    expect "exit status 0" rc_is 0
    expect "the guest's hwrng is virtio-rng" out_has_line "rng=virtio_rng.0"
    expect "4096 random bytes read from /dev/hwrng" out_has_line "hwrng-bytes=4096"
    expect "the disk was read" out_has_line "read-done"
    expect "a metrics line was written at exit" [ -s "$_d/metrics.json" ]
    expect "metrics count at least the 4096 entropy bytes" \
        [ "$(metric_sum "$_d/metrics.json" entropy_bytes)" -ge 4096 ]
    expect "metrics count at least the 1 MiB read from the disk" \
        [ "$(metric_sum "$_d/metrics.json" read_bytes)" -ge 1048576 ]
    expect "no Rust panic" no_rust_panic
    rm -rf "$_d"
}
