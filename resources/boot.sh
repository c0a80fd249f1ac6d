#!/usr/bin/env bash
# resources/boot.sh: build everything and boot the default guest.
#
# Installs the dependencies, builds the static capsule binary, the guest
# kernel and the busybox initramfs, then runs
#   capsule run --kernel <bzImage> --initrd <initramfs> --cpus 2 --memory 512M [ARGS...]
# with the guest's serial console on this terminal: directly on /dev/kvm
# when it is hardware KVM (`direct` mode), otherwise inside a nested L1
# guest under QEMU TCG (`nested` mode; resources/harness/run-in-l1.sh), which
# powers off when capsule exits. In the guest shell, `poweroff -f` ends the
# VM; in nested mode Ctrl-A x also kills L1. Exits with capsule's status.
#
# Usage: resources/boot.sh [CAPSULE_RUN_ARGS...]
#   ARGS are passed to `capsule run`; one of --kernel, --initrd, --cpus or
#   --memory given there replaces the default. In nested mode the files
#   named by --kernel and --initrd are copied into L1.
# Env:   CAPSULE_HARNESS=direct|nested forces a mode; CAPSULE_CACHE.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$CAPSULE_RESOURCES_DIR/install-deps.sh"
export CAPSULE_SKIP_DEPS=1
capsule="$("$CAPSULE_RESOURCES_DIR/build-capsule.sh")"
kdir="$("$CAPSULE_RESOURCES_DIR/build-guest-kernel.sh")"
initrd="$("$CAPSULE_RESOURCES_DIR/build-guest-initramfs.sh")"
mode="$("$CAPSULE_RESOURCES_DIR/harness/mode.sh")"

# Defaults, unless the user's arguments set them.
declare -A given=()
for arg in "$@"; do
    case "$arg" in
    --kernel | --kernel=* | --initrd | --initrd=* | --cpus | --cpus=* | --memory | --memory=*)
        opt="${arg%%=*}"
        given[$opt]=1
        ;;
    esac
done
defaults=()
[[ -n "${given[--kernel]:-}" ]] || defaults+=(--kernel "$kdir/bzImage")
[[ -n "${given[--initrd]:-}" ]] || defaults+=(--initrd "$initrd")
[[ -n "${given[--cpus]:-}" ]] || defaults+=(--cpus 2)
[[ -n "${given[--memory]:-}" ]] || defaults+=(--memory 512M)
args=("${defaults[@]}" "$@")

if [[ "$mode" == direct ]]; then
    log "mode: direct; capsule run ${args[*]}"
    exec "$capsule" run "${args[@]}"
fi

# Nested: copy the capsule binary and the files that --kernel and --initrd
# name into L1 (as /capsule/kernel-N, /capsule/initrd-N) and run capsule
# from a wrapper script there.
quote() {
    printf "'%s'" "${1//\'/\'\\\'\'}"
}
files=("$capsule")
l1args=()
n=0
expect_file=""
for arg in "${args[@]}"; do
    if [[ -n "$expect_file" ]]; then
        n=$((n + 1))
        files+=("$arg:$expect_file-$n")
        l1args+=("/capsule/$expect_file-$n")
        expect_file=""
        continue
    fi
    case "$arg" in
    --kernel | --initrd)
        expect_file="${arg#--}"
        l1args+=("$arg")
        ;;
    --kernel=* | --initrd=*)
        n=$((n + 1))
        opt="${arg%%=*}"
        files+=("${arg#*=}:${opt#--}-$n")
        l1args+=("$opt=/capsule/${opt#--}-$n")
        ;;
    *) l1args+=("$arg") ;;
    esac
done

work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-boot.XXXXXX")"
trap 'rm -rf "$work"' EXIT
wrapper="$work/boot-guest.sh"
{
    echo '#!/bin/sh'
    printf 'exec /capsule/capsule run'
    for a in "${l1args[@]}"; do
        printf ' %s' "$(quote "$a")"
    done
    echo
} >"$wrapper"

log "mode: nested; in L1: $(tail -n1 "$wrapper" | sed 's/^exec //')"
status=0
"$CAPSULE_RESOURCES_DIR/harness/run-in-l1.sh" "$wrapper" "${files[@]}" || status=$?
log "capsule exited with status $status"
exit "$status"
