#!/usr/bin/env bash
# resources/install-deps.sh: install the Debian packages that capsule's guest
# images, nested test harness and boot tests need.
#
# Idempotent and fast: when every package is already installed it only runs
# one dpkg-query and exits. Otherwise it installs the missing ones with
# apt-get, running `apt-get update` first only when the package lists are
# empty or an install attempt fails. Needs root (or passwordless sudo).
#
# The nested harness's default L1 (CAPSULE_L1=qemu10-linux612: QEMU 10.0
# and Linux 6.12 from bookworm-backports, docs/harness.md) is not installed here: the packages
# are fetched into the cache by resources/harness/l1-qemu.sh and
# l1-kernel.sh through a private apt source (the system's apt sources stay
# as they are, and Debian 12's QEMU 7.2 below stays the L2 reference VMM of
# the benches and the CAPSULE_L1=qemu7-* harness).
#
# Usage: resources/install-deps.sh [EXTRA_PACKAGE...]
# Prints nothing on stdout.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

packages=(
    # Nested harness (L1 under TCG) and guest initramfs.
    qemu-system-x86 busybox-static cpio
    # Guest kernel source and build.
    linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev xz-utils
    # Disk images for later tests; the Debian guest image of the debian_*
    # and virtio-fs cases (resources/build-debian-image.sh: the boot step
    # runs it with CAPSULE_SKIP_DEPS=1, so it must be here).
    e2fsprogs mmdebstrap
    # curl for the API boot cases (copied into L1).
    curl
    # Network boot tests: ip tuntap (copied into L1).
    iproute2
    # Static capsule binary (libc.a).
    libc6-dev
    # virtiofsd (resources/build-virtiofsd.sh) links these; git runs on a
    # virtio-fs share in a boot case (copied into L1).
    libseccomp-dev libcap-ng-dev git
    # apt-get download / dpkg -x for the L1 kernel and QEMU (6.12's
    # modules are .ko.xz: xz-utils above).
    dpkg ca-certificates zstd
    "$@"
)

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all ${#packages[@]} packages already installed"
    exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install ${missing[*]}"
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o DPkg::Lock::Timeout=600)

lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null
}

log "installing: ${missing[*]}"
if ! lists_present; then
    log "apt package lists are empty: apt-get update"
    "${SUDO[@]}" apt-get "${apt_opts[@]}" update >&2
    "${SUDO[@]}" apt-get "${apt_opts[@]}" install "${missing[@]}" >&2
elif ! "${SUDO[@]}" apt-get "${apt_opts[@]}" install "${missing[@]}" >&2; then
    log "install failed with the current package lists: apt-get update and retry"
    "${SUDO[@]}" apt-get "${apt_opts[@]}" update >&2
    "${SUDO[@]}" apt-get "${apt_opts[@]}" install "${missing[@]}" >&2
fi
log "done"
