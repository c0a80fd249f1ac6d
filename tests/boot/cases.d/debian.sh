# shellcheck shell=sh
# tests/boot/cases.d/debian.sh: a full distribution (sourced by cases.sh).
#
# Debian 12 as a new user would run it: the image that
# resources/build-debian-image.sh builds with mmdebstrap (systemd, udev,
# Debian's stock linux-image-cloud-amd64 kernel and its initramfs-tools
# initrd), in $DEBIAN_IMAGE (vmlinuz, initrd.img, debian.ext4, release).
# The stock kernel finds its root disk (virtio-blk) and network device
# (virtio-net) only through capsule's ACPI-announced virtio-mmio devices,
# with the modules its initrd loads. The root disk is attached `,ephemeral`:
# the guest writes (journal, ...) but the shared image never changes.
#
# Over TAP the guest (systemd-networkd, static 10.0.5.2/24) connects to a
# listener on the host side (10.0.5.1:5005) once network-online.target is
# reached, prints the token the host sent and sends back its kernel and CPU
# count; once the boot has finished it prints the system state and runs
# `systemctl poweroff`, which must end capsule with status 0. The image's
# units print the `capsule-debian:` lines checked here (see the builder).

# In the default suite since 2026-12-05. They were optional before: in
# every run the guest had reached the host and printed its lines, but
# journald puts `capsule-probe[PID]: ` in front of a unit's lines on the
# console, and the checks wanted them whole. Both passed in the nested
# harness (QEMU 10 + L1 Linux 6.12) in 106 and 101 s.
ALL_CASES="$ALL_CASES debian_1cpu debian_2cpu"

# debian_prereqs: whether the image is there; if not, the case fails (it
# must not pass without running).
debian_prereqs() {
    if [ -n "${DEBIAN_IMAGE:-}" ] && [ -f "$DEBIAN_IMAGE/vmlinuz" ] &&
        [ -f "$DEBIAN_IMAGE/initrd.img" ] && [ -f "$DEBIAN_IMAGE/debian.ext4" ] &&
        [ -f "$DEBIAN_IMAGE/release" ]; then
        return 0
    fi
    CASE_ERRORS="not run: DEBIAN_IMAGE (the directory resources/build-debian-image.sh prints) missing or incomplete"
    SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
    return 1
}

# out_has_probe TEXT: the probe printed the line `capsule-debian: TEXT`.
# The unit's output reaches the console through journald
# (StandardOutput=journal+console), which may put the unit's name and pid
# in front of it: the line must end with it, not start with it.
out_has_probe() { grep -q -- "capsule-debian: $1\$" "$OUT"; }

# debian_boot CASE CPUS TAP: boot the image with CPUS vCPUs and the TAP
# device TAP (host side 10.0.5.1/24), and check it all.
debian_boot() {
    debian_prereqs || return
    net_prepare
    _rel="$(cat "$DEBIAN_IMAGE/release")"
    # What the host says, different in every run: the guest can only
    # print it if it came over the network.
    _token="host-token-$$-$(date +%s)-$2"
    _from_guest="$WORK/$1.from-guest"
    rm -f "$_from_guest"
    tap_up "$3" 10.0.5.1/24
    nc -l -p 5005 -e sh -c "echo $_token; cat >'$_from_guest'" </dev/null >/dev/null 2>&1 &
    _listener=$!
    # A full distribution boots in about a minute in an idle nested
    # harness, but took over 180 s with 1 vCPU on a loaded machine: twice
    # the case timeout.
    _saved_timeout="$CASE_TIMEOUT"
    CASE_TIMEOUT=$((CASE_TIMEOUT * 2))
    run_capsule "$1" '' \
        run --kernel "$DEBIAN_IMAGE/vmlinuz" --initrd "$DEBIAN_IMAGE/initrd.img" \
        --disk "$DEBIAN_IMAGE/debian.ext4,ephemeral" --net "tap=$3" \
        --cpus "$2" --memory 512M --cmdline "console=ttyS0 root=/dev/vda rw panic=1 capsule.probe=10.0.5.1:5005"
    CASE_TIMEOUT="$_saved_timeout"
    kill "$_listener" 2>/dev/null
    expect "exit status 0 (systemctl poweroff)" rc_is 0
    expect "stock kernel $_rel with $2 CPUs reached userspace" \
        out_has "capsule-guest: ready kernel=$_rel cpus=$2"
    expect "root file system on /dev/vda (virtio-blk)" out_has "EXT4-fs (vda): mounted filesystem"
    expect "the guest got the host's token over TAP" out_has_probe "host says $_token"
    expect "the host got the guest's line" file_has "$_from_guest" "guest kernel=$_rel cpus=$2"
    expect "boot finished, multi-user.target active, no failed unit" \
        out_has_probe "system running, multi-user.target active"
    expect "the guest powered off through systemd" out_has_probe poweroff
    expect "the kernel powered down" out_has "reboot: Power down"
    expect "no guest kernel WARNING" no_kernel_warning
    expect "no Rust panic" no_rust_panic
    expect "TAP gone after exit" sh -c "! ip link show $3 >/dev/null 2>&1"
    # The guest kernel's warnings, if any, would be out of the last lines.
    grep -m 3 -A 4 'WARNING: CPU: \|consistency problem' "$OUT" | sed 's/^/    '"$1"': /'
    # What the probe said, whatever it was (the console tail shown on a
    # failure holds only the shutdown): reachability, system state, the
    # failed units it listed.
    grep -a 'capsule-debian: \|host unreachable\|\.service.*failed' "$OUT" | head -n 20 | sed 's/^/    '"$1"' probe: /'
    # Where the time went, by the guest's own clock (systemd-analyze).
    sed -n 's/^.*capsule-debian: \(Startup finished .*\)$/    '"$1"': \1/p' "$OUT" | head -n1
    rm -f "$_from_guest"
}

case_debian_1cpu() {
    debian_boot debian_1cpu 1 captd1
}

case_debian_2cpu() {
    debian_boot debian_2cpu 2 captd2
}
