#!/usr/bin/env bash
# resources/build-guest-kernel-noacpi.sh: build a small guest kernel without
# ACPI (the kind built for Firecracker), for the boot case
# tests/boot/cases.d/noacpi.sh.
#
# Same source and method as build-guest-kernel.sh (Debian linux-source-6.1,
# `make ARCH=x86_64 tinyconfig`, then resources/guest-kernel-noacpi.config
# appended and `make olddefconfig` twice), but a much smaller fragment, so
# the build takes minutes. Verifies that every `CONFIG_X=value` line and
# every `# CONFIG_X is not set` line of the fragment holds in the final
# .config.
#
# Cached in $CACHE/guest-kernel-noacpi/<hash>/ (vmlinux with its symbol
# table, debug info stripped; bzImage; config; kernelrelease), <hash>
# covering the source version, the compiler, the fragment and this script.
#
# Usage: resources/build-guest-kernel-noacpi.sh
# Env:   CAPSULE_CACHE (cache root), CAPSULE_SKIP_DEPS=1 (skip install-deps)
# Prints the cache directory on stdout; progress goes to stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
    if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
        "$CAPSULE_RESOURCES_DIR/install-deps.sh"
    fi

    src_pkg=linux-source-6.1
    tarball=/usr/src/$src_pkg.tar.xz
    fragment="$CAPSULE_RESOURCES_DIR/guest-kernel-noacpi.config"
    [[ -f "$tarball" ]] || die "$tarball not found (package $src_pkg)"
    src_version="$(dpkg-query -W -f='${Version}' "$src_pkg")"
    cc_version="$(gcc --version | head -n1)"

    key="$(hash_inputs "$src_pkg=$src_version" "$cc_version" "$fragment" \
        "${BASH_SOURCE[0]}")"
    cache_root="$(capsule_cache_root)"
    final="$cache_root/guest-kernel-noacpi/$key"

    cache_lock guest-kernel-noacpi
    if [[ -f "$final/bzImage" && -f "$final/vmlinux" ]]; then
        log "cached: $final"
        echo "$final"
        exit 0
    fi
    mkdir -p "$cache_root/guest-kernel-noacpi"
    find "$cache_root/guest-kernel-noacpi" -maxdepth 1 -name '.tmp.*' -mmin +1440 \
        -exec rm -rf {} + 2>/dev/null || true

    tmp="$(cache_tmpdir "$final")"
    trap 'rm -rf "$tmp"' EXIT
    src="$tmp/src"
    out="$tmp/out"
    buildlog="$tmp/build.log"
    mkdir -p "$src" "$out"

    fail_with_log() {
        local saved="$cache_root/guest-kernel-noacpi/last-failed-build.log"
        cp "$buildlog" "$saved" 2>/dev/null || true
        log "last lines of the build log (full log: $saved):"
        tail -n 40 "$buildlog" >&2 || true
        die "$*"
    }

    start=$SECONDS
    log "source: $src_pkg $src_version; key $key"
    tar -xf "$tarball" -C "$src" --strip-components=1
    kmake() {
        make -C "$src" ARCH=x86_64 "$@"
    }
    kmake tinyconfig >>"$buildlog" 2>&1 || fail_with_log "make tinyconfig failed"
    cat "$fragment" >>"$src/.config"
    kmake olddefconfig >>"$buildlog" 2>&1 || fail_with_log "make olddefconfig failed"
    kmake olddefconfig >>"$buildlog" 2>&1 || fail_with_log "make olddefconfig failed"

    missing=()
    while IFS= read -r line; do
        grep -qxF -- "$line" "$src/.config" || missing+=("$line")
    done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$fragment")
    while IFS= read -r line; do
        name="$(echo "$line" | cut -d' ' -f2)"
        ! grep -qE "^${name}=" "$src/.config" || missing+=("$line")
    done < <(grep -E '^# CONFIG_[A-Za-z0-9_]+ is not set' "$fragment")
    if [[ ${#missing[@]} -gt 0 ]]; then
        for m in "${missing[@]}"; do
            log "does not hold in .config: $m"
        done
        die "${#missing[@]} line(s) of $(basename "$fragment") do not hold after olddefconfig"
    fi

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
