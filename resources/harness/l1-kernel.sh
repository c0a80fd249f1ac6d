#!/usr/bin/env bash
# resources/harness/l1-kernel.sh: fetch the L1 kernel of the nested harness.
#
# Downloads (apt-get download) the Debian linux-image-*-cloud-amd64 package
# that `apt-cache depends linux-image-cloud-amd64` names, unpacks it with
# dpkg -x and caches, in $CACHE/l1-kernel/<hash>/:
#   vmlinuz                     the L1 kernel
#   modules/irqbypass.ko, modules/kvm.ko, modules/kvm-amd.ko, modules/tun.ko,
#   and for vhost-net: modules/tap.ko, vhost_iotlb.ko, vhost.ko, vhost_net.ko
#   and for the containerd pod network (containerd_net): modules/veth.ko,
#   sch_ingress.ko, cls_matchall.ko, act_mirred.ko (where the kernel has
#   them as modules)
#   release                     the kernel release (uname -r in L1)
#   System.map                  its symbols (for diagnosing a hung L1)
# <hash> covers the package name and version and this script. Modules
# shipped compressed (.ko.xz in 6.12) are decompressed: busybox insmod
# takes plain ones only.
#
# Which kernel: CAPSULE_L1 (resources/harness/l1-config.sh). linux61 is
# Debian 12's 6.1 from the system's apt sources; linux612 is 6.12 from
# bookworm-backports, through a private apt source (resources/harness/apt.sh).
#
# Usage: resources/harness/l1-kernel.sh
# Env:   CAPSULE_L1, CAPSULE_CACHE (cache root)
# Prints the cache directory on stdout.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
# shellcheck source=resources/harness/l1-config.sh
source "$CAPSULE_RESOURCES_DIR/harness/l1-config.sh"
# shellcheck source=resources/harness/apt.sh
source "$CAPSULE_RESOURCES_DIR/harness/apt.sh"

meta=linux-image-cloud-amd64
modules=(virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko drivers/net/tun.ko
    drivers/net/tap.ko drivers/vhost/vhost_iotlb.ko drivers/vhost/vhost.ko drivers/vhost/vhost_net.ko)
# A pod's veth and the tc redirects the containerd shim joins it to its TAP
# with; copied where they are modules (built in elsewhere).
net_modules=(drivers/net/veth.ko net/sched/sch_ingress.ko net/sched/cls_matchall.ko
    net/sched/act_mirred.ko)
# The virtio-pci disk stack, in load order, for an extra L1 disk
# (run-in-l1.sh's CAPSULE_L1_DISK); copied where the kernel has them.
virtio_modules=(drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
    drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko)

image_pkg() {
    apt-cache depends "$meta" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}

if [[ "$L1_LINUX" == 612 ]]; then
    private_apt "$(. /etc/os-release && echo "$VERSION_CODENAME")-backports" deb
fi
pkg="$(image_pkg)"
if [[ -z "$pkg" && -z "${APT_CONFIG:-}" ]]; then
    log "apt-cache does not know $meta: apt-get update"
    if [[ $(id -u) -eq 0 ]]; then
        apt-get -q -o DPkg::Lock::Timeout=600 update >&2
    else
        sudo apt-get -q -o DPkg::Lock::Timeout=600 update >&2
    fi
    pkg="$(image_pkg)"
fi
[[ -n "$pkg" ]] || die "cannot find the package that $meta depends on"
case "$L1_LINUX:$pkg" in
61:linux-image-6.1.* | 612:linux-image-6.12.*) ;;
*) die "$meta names $pkg, not the Linux ${L1_LINUX:0:1}.${L1_LINUX:1} of CAPSULE_L1=$L1_CONFIG" ;;
esac
version="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
[[ -n "$version" && "$version" != "(none)" ]] || die "no candidate version of $pkg"

key="$(hash_inputs "$pkg=$version" "${BASH_SOURCE[0]}")"
final="$(capsule_cache_root)/l1-kernel/$key"
if [[ -f "$final/vmlinuz" && -f "$final/modules/kvm-amd.ko" ]]; then
    log "cached: $final ($pkg $version)"
    echo "$final"
    exit 0
fi

tmp="$(cache_tmpdir "$final")"
# apt's unprivileged download user (_apt) must be able to reach and write
# the download directory: use one under /tmp rather than the cache.
dl="$(mktemp -d)"
trap 'rm -rf "$tmp" "$dl"' EXIT
chmod 755 "$dl"
chown _apt "$dl" 2>/dev/null || true
out="$tmp/out"
mkdir -p "$out/modules"

log "downloading $pkg $version"
(cd "$dl" && apt-get -q download "$pkg=$version" >&2)
deb="$(find "$dl" -maxdepth 1 -name '*.deb' | head -n1)"
[[ -n "$deb" ]] || die "apt-get download produced no .deb"
log "unpacking $(basename "$deb")"
dpkg -x "$deb" "$tmp/x"

vmlinuz="$(find "$tmp/x/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)"
[[ -n "$vmlinuz" ]] || die "no boot/vmlinuz-* in $pkg"
cp "$vmlinuz" "$out/vmlinuz"
release="${vmlinuz##*/vmlinuz-}"
echo "$release" >"$out/release"
# Symbols, to name the code where a hung L1's vCPUs are (run-in-l1.sh).
if [[ -f "$tmp/x/boot/System.map-$release" ]]; then
    cp "$tmp/x/boot/System.map-$release" "$out/System.map"
fi

moddir="$tmp/x/lib/modules/$release/kernel"
# copy_module PATH DEST: the (possibly compressed) module PATH of the
# kernel into DEST; false if the kernel has no such module.
copy_module() {
    local name
    name="$(basename "$1")"
    if [[ -f "$moddir/$1" ]]; then
        cp "$moddir/$1" "$2/$name"
    elif [[ -f "$moddir/$1.xz" ]]; then
        xz -dc "$moddir/$1.xz" >"$2/$name"
    elif [[ -f "$moddir/$1.zst" ]]; then
        zstd -qdc "$moddir/$1.zst" >"$2/$name"
    else
        return 1
    fi
}
for m in "${modules[@]}"; do
    copy_module "$m" "$out/modules" || die "module $m not found in $pkg"
done
for m in "${net_modules[@]}"; do
    copy_module "$m" "$out/modules" || log "no module $m in $pkg (built in?)"
done
# Apart from the others: the L1 /init loads every module in modules/ that
# a script may need by name, and these only with an extra disk.
mkdir -p "$out/modules/virtio"
: >"$out/modules/virtio/order"
for m in "${virtio_modules[@]}"; do
    if copy_module "$m" "$out/modules/virtio"; then
        basename "$m" .ko >>"$out/modules/virtio/order"
    fi
done

cache_publish "$out" "$final"
log "L1 kernel $release cached in $final"
echo "$final"
