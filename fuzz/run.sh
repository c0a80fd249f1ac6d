#!/usr/bin/env bash
# fuzz/run.sh TARGET SECONDS [libFuzzer options...]
#
# Builds TARGET (fuzz/build.sh) and fuzzes it for SECONDS at the lowest
# CPU priority, starting from the checked-in seeds (fuzz/corpus/TARGET,
# never written to) plus a working corpus kept with the build
# ($CARGO_TARGET_DIR/fuzz/corpus/TARGET), so long runs accumulate there.
# Crashes are written to $CARGO_TARGET_DIR/fuzz/artifacts/TARGET/.
#
# Prints one summary line: executions, executions/s, edges covered,
# features, corpus size, crashes. Exits non-zero if the target crashed.
# Reproduce a crash with: `$(fuzz/build.sh TARGET)/TARGET CRASH_FILE`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 2 ] || { echo "usage: $0 TARGET SECONDS [libFuzzer options]" >&2; exit 2; }
target=$1 secs=$2
shift 2
[ -d "$here/corpus/$target" ] || { echo "fuzz/run.sh: no target '$target' (no fuzz/corpus/$target)" >&2; exit 2; }
bindir=$("$here/build.sh" "$target")
work="${CARGO_TARGET_DIR:-$here/../target}/fuzz"
corpus="$work/corpus/$target" artifacts="$work/artifacts/$target"
mkdir -p "$corpus" "$artifacts"
log="$work/logs/$target-$(date -u +%Y%m%dT%H%M%SZ).log"
mkdir -p "$(dirname "$log")"
case $target in
virtio_*|kernel_image) max_len=16384 ;;
snapshot_file) max_len=65536 ;;
*) max_len=8192 ;;
esac
status=0
nice -n 19 "$bindir/$target" -max_total_time="$secs" -max_len="$max_len" \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$@" "$corpus" "$here/corpus/$target" >"$log" 2>&1 || status=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
units=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
crashes=$(grep -cE '^==[0-9]+== ERROR: libFuzzer|^SUMMARY: libFuzzer|panicked at' "$log" || true)
printf '%s: %s s, %s execs, %s exec/s, cov %s edges, ft %s, corpus %s, crashes %s, log %s\n' \
    "$target" "$secs" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${units:-?}" \
    "$([ $status -eq 0 ] && echo 0 || echo "1 (status $status)")" "$log"
if [ $status -ne 0 ]; then
    grep -E 'panicked at|ERROR|SUMMARY|Test unit written|artifact' "$log" | head -20 >&2
    exit 1
fi
