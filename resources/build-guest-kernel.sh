#!/usr/bin/env bash
# resources/build-guest-kernel.sh: build capsule's small test guest kernel.
#
# Takes Debian's linux-source-6.1 (/usr/src/linux-source-6.1.tar.xz), runs
# `make ARCH=x86_64 tinyconfig`, appends resources/guest-kernel.config,
# runs `make olddefconfig` twice, verifies that every `CONFIG_X=value` line
# of the fragment survived in .config (fails naming the ones that did not),
# then `make vmlinux bzImage`.
#
# The result is cached in $CACHE/guest-kernel/<hash>/ where <hash> covers
# the source package version, the compiler version, the fragment and this
# script; a second run with the same inputs rebuilds nothing. The cache
# entry holds: vmlinux (ELF, debug info stripped), bzImage, config (the
# final .config) and kernelrelease (`uname -r` of the guest).
#
# Usage: resources/build-guest-kernel.sh
# Env:   CAPSULE_CACHE (cache root), CAPSULE_SKIP_DEPS=1 (skip install-deps)
# Prints the cache directory on stdout; progress goes to stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# All of the work is in main(), parsed whole before it runs: editing this
# file while a (long) build runs cannot corrupt that build.
main() {
    if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
        "$CAPSULE_RESOURCES_DIR/install-deps.sh"
    fi

    src_pkg=linux-source-6.1
    tarball=/usr/src/$src_pkg.tar.xz
    fragment="$CAPSULE_RESOURCES_DIR/guest-kernel.config"
    [[ -f "$tarball" ]] || die "$tarball not found (package $src_pkg)"
    src_version="$(dpkg-query -W -f='${Version}' "$src_pkg")"
    cc_version="$(gcc --version | head -n1)"

    key="$(hash_inputs "$src_pkg=$src_version" "$cc_version" "$fragment" \
        "${BASH_SOURCE[0]}")"
    cache_root="$(capsule_cache_root)"
    final="$cache_root/guest-kernel/$key"

    cache_lock guest-kernel
    if [[ -f "$final/bzImage" && -f "$final/vmlinux" ]]; then
        log "cached: $final"
        echo "$final"
        exit 0
    fi

    # Leftovers of builds that were killed long ago.
    find "$cache_root/guest-kernel" -maxdepth 1 -name '.tmp.*' -mmin +1440 \
        -exec rm -rf {} + 2>/dev/null || true

    tmp="$(cache_tmpdir "$final")"
    trap 'rm -rf "$tmp"' EXIT
    src="$tmp/src"
    out="$tmp/out"
    buildlog="$tmp/build.log"
    mkdir -p "$src" "$out"

    fail_with_log() {
        local saved="$cache_root/guest-kernel/last-failed-build.log"
        cp "$buildlog" "$saved" 2>/dev/null || true
        log "last lines of the build log (full log: $saved):"
        tail -n 40 "$buildlog" >&2 || true
        die "$*"
    }

    start=$SECONDS
    log "source: $src_pkg $src_version; key $key"
    log "extracting $tarball"
    tar -xf "$tarball" -C "$src" --strip-components=1

    kmake() {
        make -C "$src" ARCH=x86_64 "$@"
    }

    log "tinyconfig + $(basename "$fragment")"
    kmake tinyconfig >>"$buildlog" 2>&1 || fail_with_log "make tinyconfig failed"
    cat "$fragment" >>"$src/.config"
    kmake olddefconfig >>"$buildlog" 2>&1 || fail_with_log "make olddefconfig failed"
    kmake olddefconfig >>"$buildlog" 2>&1 || fail_with_log "make olddefconfig failed"

    # Every assignment in the fragment must be in the final .config verbatim.
    missing=()
    while IFS= read -r line; do
        if ! grep -qxF -- "$line" "$src/.config"; then
            name="${line%%=*}"
            have="$(grep -E "^(# )?${name}[= ]" "$src/.config" || echo "absent")"
            missing+=("$line (got: $have)")
        fi
    done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$fragment")
    if [[ ${#missing[@]} -gt 0 ]]; then
        for m in "${missing[@]}"; do
            log "missing from .config: $m"
        done
        die "${#missing[@]} option(s) of $(basename "$fragment") did not survive olddefconfig (unmet dependencies?)"
    fi
    log "all $(grep -cE '^CONFIG_[A-Za-z0-9_]+=' "$fragment") fragment options present in .config"

    log "make -j$(nproc) vmlinux bzImage (log: $buildlog)"
    kmake -j"$(nproc)" vmlinux bzImage >>"$buildlog" 2>&1 || fail_with_log "kernel build failed"

    strip --strip-debug -o "$out/vmlinux" "$src/vmlinux"
    cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
    cp "$src/.config" "$out/config"
    kmake -s kernelrelease >"$out/kernelrelease" 2>>"$buildlog"
    printf 'source: %s %s\ncompiler: %s\nbuild seconds: %s\n' \
        "$src_pkg" "$src_version" "$cc_version" "$((SECONDS - start))" >"$out/build-info"

    cache_publish "$out" "$final"
    log "built in $((SECONDS - start)) s: $final ($(cat "$final/kernelrelease"))"
    echo "$final"
}

main "$@"
