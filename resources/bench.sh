#!/usr/bin/env bash
# resources/bench.sh: every benchmark, one after the other, their tables
# together on stdout (progress on stderr): boot and memory
# (bench-boot.sh), block (bench-blk.sh) and network (bench-net.sh), each
# capsule beside QEMU, and snapshots (bench-snapshot.sh, beside
# Firecracker). See docs/performance.md for how to read them.
#
# Usage: resources/bench.sh
# Env:   BENCH_RUNS (each script's default when unset), CAPSULE_HARNESS
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
    local script status=0
    for script in bench-boot.sh bench-blk.sh bench-net.sh bench-snapshot.sh; do
        [[ -x "$CAPSULE_RESOURCES_DIR/$script" ]] || continue
        log "running $script"
        "$CAPSULE_RESOURCES_DIR/$script" || {
            status=1
            echo "($script failed; see its messages above)"
        }
        echo
    done
    return "$status"
}

main "$@"
