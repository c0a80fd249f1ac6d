#!/usr/bin/env bash
# fuzz/run-all.sh SECONDS: runs every fuzz target for SECONDS each, one
# after the other (fuzz/run.sh), and fails if any target crashed. The
# targets are built first, all at once.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
secs=${1:?usage: $0 SECONDS}
"$here/build.sh" >/dev/null
failed=()
for dir in "$here"/corpus/*/; do
    t=$(basename "$dir")
    "$here/run.sh" "$t" "$secs" || failed+=("$t")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/run-all.sh: crashed: ${failed[*]}" >&2
    exit 1
fi
