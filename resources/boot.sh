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
#   named by --kernel, --initrd and --disk are copied into L1 (a disk is a
#   copy there: the guest's writes do not reach the host's file).
# Env:   CAPSULE_HARNESS=direct|nested forces a mode; CAPSULE_CACHE.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# All of the work is in main(), parsed whole before it runs: editing this
# file while it runs cannot corrupt the run.
main() {
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

    # Nested: copy the capsule binary and the files that --kernel, --initrd
    # and --disk name into L1 (as /capsule/kernel-N, /capsule/initrd-N,
    # /capsule/disk-N) and run capsule from a wrapper script there. A disk
    # is a copy: what the guest writes to it stays in L1.
    quote() {
        printf "'%s'" "${1//\'/\'\\\'\'}"
    }
    files=("$capsule")
    l1args=()
    n=0
    # to_l1 OPT VALUE: the L1 version of VALUE of file option OPT.
    to_l1() {
        local path="$2" suffix=""
        if [[ "$1" == --disk ]]; then
            path="${2%%,*}"
            suffix="${2#"$path"}"
        fi
        n=$((n + 1))
        files+=("$path:${1#--}-$n")
        l1value="/capsule/${1#--}-$n$suffix"
    }
    pending=""
    for arg in "${args[@]}"; do
        if [[ -n "$pending" ]]; then
            to_l1 "$pending" "$arg"
            l1args+=("$l1value")
            pending=""
            continue
        fi
        case "$arg" in
        --kernel | --initrd | --disk)
            pending="$arg"
            l1args+=("$arg")
            ;;
        --kernel=* | --initrd=* | --disk=*)
            to_l1 "${arg%%=*}" "${arg#*=}"
            l1args+=("${arg%%=*}=$l1value")
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
}

main "$@"
