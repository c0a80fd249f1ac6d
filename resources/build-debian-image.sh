#!/usr/bin/env bash
# resources/build-debian-image.sh: a full Debian 12 guest for the boot case
# tests/boot/cases.d/debian.sh: what a new user would try first.
#
# mmdebstrap (--variant=minbase, no recommends, no docs/man/locales) with
# systemd, udev and Debian's stock linux-image-cloud-amd64 kernel with its
# initramfs-tools initrd. The kernel finds the root disk (virtio-blk) and
# the network device (virtio-net) only through capsule's ACPI-announced
# virtio-mmio devices (LNRO0005) and the modules its initrd loads.
# The files in resources/debian-guest/ make it a test guest:
# systemd-networkd gives the first Ethernet link the static address
# 10.0.5.2/24 (the host side of the TAP is 10.0.5.1), and two units speak
# to the test on the serial console:
#   capsule-ready.service  early in boot:
#       capsule-guest: ready kernel=<release> cpus=<n>
#   capsule-probe.service  only with `capsule.probe=HOST:PORT` on the kernel
#       command line, once network-online.target is reached: connects to
#       HOST:PORT, prints the line the host sent as
#       `capsule-debian: host says <line>`, sends the host
#       `guest kernel=<release> cpus=<n>`, waits for the boot to finish
#       (`systemctl is-system-running --wait`), prints
#       `capsule-debian: system <state>, multi-user.target <state>` (and the
#       failed units, if any) and systemd's `Startup finished ...`, then
#       `capsule-debian: poweroff`, and runs `systemctl poweroff`. Without
#       a host to talk to it says `capsule-debian: host unreachable` and
#       powers off all the same.
# Without capsule.probe the image boots to a login prompt on the serial
# console (root, no password).
#
# apt's sources are the host's own (/etc/apt/sources.list.d/debian.sources,
# or CAPSULE_DEBIAN_SOURCES): its binary (`deb`) stanzas, without
# backports, are handed to mmdebstrap as a deb822 file. Needs root (mmdebstrap's
# root mode: the kernel's initramfs is built in the chroot).
#
# Output, cached under ${CAPSULE_CACHE:-~/.cache/capsule}/debian/<key>/
# (key: this script, lib.sh, resources/debian-guest/ and the derived
# sources):
#   vmlinuz       the image's kernel
#   initrd.img    its initramfs-tools initrd
#   debian.ext4   the root file system without /boot, shrunk with
#                 `resize2fs -M` plus 32 MiB (attach it with
#                 `,ephemeral` or use a copy: a guest writes to it)
#   release       the kernel release (`uname -r` in the guest)
#   packages      the installed packages and versions
#
# Usage: resources/build-debian-image.sh     prints the cache directory
# Env:   CAPSULE_SKIP_DEPS=1  skip install-deps.sh
#        CAPSULE_DEBIAN_SOURCES  the deb822 apt sources file to derive from
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

suite=bookworm
packages=(systemd systemd-sysv udev linux-image-cloud-amd64 initramfs-tools)
slack_mib=32
# The image's own files: network, test units (see the top of this file).
guest_files="$CAPSULE_RESOURCES_DIR/debian-guest"

# deb822_binary_sources FILE: the stanzas of the deb822 sources FILE that
# serve binary packages (Types: deb), with Types reduced to `deb`, their
# Suites without any *-backports suite, and without comment lines.
deb822_binary_sources() {
    awk '
        function flush() {
            if (n > 0 && is_deb && suites != "") {
                if (printed) print ""
                for (i = 1; i <= n; i++) {
                    if (lines[i] ~ /^Types:/) print "Types: deb"
                    else if (lines[i] ~ /^Suites:/) print "Suites:" suites
                    else print lines[i]
                }
                printed = 1
            }
            n = 0; is_deb = 0; suites = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        {
            lines[++n] = $0
            if ($0 ~ /^Types:/) {
                for (i = 2; i <= NF; i++) if ($i == "deb") is_deb = 1
            }
            if ($0 ~ /^Suites:/) {
                for (i = 2; i <= NF; i++) if ($i !~ /-backports$/) suites = suites " " $i
            }
        }
        END { flush() }
    ' "$1"
}

# write_guest_config ROOT: the image's own files: host name, fstab, root
# without a password, the network and the test units from $guest_files.
write_guest_config() {
    local root="$1" etc="$1/etc"
    echo capsule-debian >"$etc/hostname"
    printf '127.0.1.1\tcapsule-debian\n' >>"$etc/hosts"
    printf '/dev/vda\t/\text4\tdefaults\t0\t1\n' >"$etc/fstab"
    sed -i 's/^root:[^:]*:/root::/' "$etc/shadow"
    mkdir -p "$etc/systemd/network" "$etc/systemd/system/sysinit.target.wants" \
        "$etc/systemd/system/multi-user.target.wants" "$root/usr/local/sbin"
    cp "$guest_files/20-capsule.network" "$etc/systemd/network/"
    cp "$guest_files/capsule-ready.service" "$guest_files/capsule-probe.service" "$etc/systemd/system/"
    install -m 755 "$guest_files/capsule-probe" "$root/usr/local/sbin/"
    ln -sf ../capsule-ready.service "$etc/systemd/system/sysinit.target.wants/"
    ln -sf ../capsule-probe.service "$etc/systemd/system/multi-user.target.wants/"
}

# shrink_ext4 IMAGE: shrink the file system in IMAGE to its minimum plus
# $slack_mib MiB and the file to match.
shrink_ext4() {
    local img="$1" blocks block_size size
    e2fsck -f -y "$img" >/dev/null 2>&1 || [[ $? -le 1 ]] || die "e2fsck $img failed"
    resize2fs -M "$img" >/dev/null 2>&1 || die "resize2fs -M $img failed"
    block_size="$(dumpe2fs -h "$img" 2>/dev/null | awk -F: '/^Block size/ { print $2 + 0 }')"
    blocks="$(dumpe2fs -h "$img" 2>/dev/null | awk -F: '/^Block count/ { print $2 + 0 }')"
    size=$((blocks * block_size + slack_mib * 1048576))
    truncate -s "$size" "$img"
    resize2fs "$img" >/dev/null 2>&1 || die "resize2fs $img to $size bytes failed"
}

# All of the work is in main(), parsed whole before it runs.
main() {
    [[ $(id -u) -eq 0 ]] || die "needs root (mmdebstrap builds the kernel's initrd in a chroot)"
    if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
        "$CAPSULE_RESOURCES_DIR/install-deps.sh" mmdebstrap
    fi
    local host_sources="${CAPSULE_DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
    [[ -f "$host_sources" ]] || die "no apt sources file $host_sources (deb822) to take the Debian mirror from"
    local sources
    sources="$(deb822_binary_sources "$host_sources")"
    [[ -n "$sources" ]] || die "$host_sources has no binary (Types: deb) stanza"

    local key final
    key="$(hash_inputs "$suite" "${packages[*]}" "$sources" "${BASH_SOURCE[0]}" \
        "$CAPSULE_RESOURCES_DIR/lib.sh" "$guest_files"/*)"
    final="$(capsule_cache_root)/debian/$key"
    cache_lock debian
    exit_if_cached "$final"

    tmp="$(cache_tmpdir "$final")"
    trap 'rm -rf "$tmp"' EXIT
    local root="$tmp/root" out="$tmp/out"
    mkdir -p "$out"
    printf '%s\n' "$sources" >"$tmp/debian.sources"

    local start=$SECONDS
    log "mmdebstrap $suite (${packages[*]})"
    local include
    include="$(
        IFS=,
        echo "${packages[*]}"
    )"
    mmdebstrap --mode=root --variant=minbase --include="$include" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
        "$suite" "$root" "$tmp/debian.sources" >&2 ||
        die "mmdebstrap failed"
    log "mmdebstrap took $((SECONDS - start))s"

    write_guest_config "$root"

    local vmlinuz initrd release
    vmlinuz="$(find "$root/boot" -name 'vmlinuz-*' | head -n1)"
    [[ -n "$vmlinuz" ]] || die "no kernel in the image's /boot"
    release="${vmlinuz##*/vmlinuz-}"
    initrd="$root/boot/initrd.img-$release"
    [[ -f "$initrd" ]] || die "no initrd for $release in the image's /boot"
    cp "$vmlinuz" "$out/vmlinuz"
    cp "$initrd" "$out/initrd.img"
    echo "$release" >"$out/release"
    dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Package} ${Version}\n' >"$out/packages"
    # The kernel and initrd are given to capsule from outside.
    rm -rf "${root:?}"/boot/* "$root/vmlinuz" "$root/vmlinuz.old" "$root/initrd.img" "$root/initrd.img.old"
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*.log

    local used_mib
    used_mib="$(du -sm "$root" | cut -f1)"
    truncate -s "$((used_mib * 2 + 256))M" "$out/debian.ext4"
    mkfs.ext4 -q -F -L capsule-debian -m 0 -E root_owner=0:0 -d "$root" "$out/debian.ext4" ||
        die "mkfs.ext4 failed"
    shrink_ext4 "$out/debian.ext4"
    rm -rf "$root"
    cache_publish "$out" "$final"
    log "built $final in $((SECONDS - start))s: kernel $release," \
        "debian.ext4 $(($(stat -c %s "$final/debian.ext4") / 1048576)) MiB" \
        "(${used_mib} MiB of files), initrd.img $(($(stat -c %s "$final/initrd.img") / 1048576)) MiB"
    echo "$final"
}

main "$@"
