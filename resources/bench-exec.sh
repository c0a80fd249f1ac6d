#!/usr/bin/env bash
# resources/bench-exec.sh: `capsule exec` stdout throughput over vsock (the
# exec channel; busybox `head -c`'s 4 KiB writes and `dd bs=256k`), over
# the older virtio-console channel, and plain TCP over virtio-net, in one
# harness run: the optional boot case bench_exec_stdout
# (tests/boot/cases.d/bench_exec.sh), which prints one MiB/s line per row. Under the nested harness the figures are TCG
# figures: compare the rows, not the absolute numbers.
#
# Usage: flock /tmp/capsule-l1.lock resources/bench-exec.sh
# Env:   BENCH_EXEC_MIB (vsock and TCP, default 256), BENCH_CONSOLE_MIB
#        (console, default 16), CAPSULE_HARNESS, CAPSULE_CACHE
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export BENCH_EXEC_MIB="${BENCH_EXEC_MIB:-256}" BENCH_CONSOLE_MIB="${BENCH_CONSOLE_MIB:-16}"
CASES=bench_exec_stdout CASE_TIMEOUT="${CASE_TIMEOUT:-600}" exec "$here/../tests/boot/run.sh"
