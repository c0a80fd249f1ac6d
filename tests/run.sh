#!/usr/bin/env bash
# tests/run.sh: capsule's whole test suite, as README.md and CI run it.
#
#  1. formatting and lints (cargo fmt --check, clippy -D warnings)
#  2. unit tests and the VMM tests on /dev/kvm with tiny guests (cargo test)
#  3. a short run of every fuzz target (fuzz/run-all.sh; docs/fuzzing.md)
#  4. the boot tests with real Linux guests (tests/boot/run.sh), directly on
#     hardware KVM or inside the nested QEMU-TCG harness, chosen by itself
#
# Any failure stops the run with a non-zero status. Guest kernels and images
# are cached under ${CAPSULE_CACHE:-~/.cache/capsule}, so reruns are fast.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "dependencies"
resources/install-deps.sh
export CAPSULE_SKIP_DEPS=1

# The boot tests' guest kernels, images and tools take most of a cold run
# (about 20 CPU-minutes with empty caches). They are built now, in the
# background at the lowest priority, so that they use the CPU the steps
# before the boot tests leave idle (tests waiting on their VMs, the
# single-threaded fuzz runs); each build script holds its cache entry's
# lock (resources/lib.sh, cache_lock), so a test or the boot step that
# wants one meanwhile waits for it and finds it cached. With warm caches
# this costs a second. The boot step builds again, loudly, whatever failed
# here. Only for the default case list; CAPSULE_PREFETCH=0 turns it off.
prefetch_pid=""
if [[ -z "${CASES:-}" && "${CAPSULE_PREFETCH:-1}" != 0 ]]; then
    prefetch_log="${CARGO_TARGET_DIR:-$PWD/target}/boot-prefetch.log"
    mkdir -p "$(dirname "$prefetch_log")"
    step "boot-test builds started in the background (log: $prefetch_log)"
    setsid nice -n 19 bash -c 'for b in guest-kernel guest-kernel-noacpi debian-image passt virtiofsd; do
            s=$SECONDS
            if resources/build-$b.sh >/dev/null; then r=ok; else r=FAILED; fi
            echo "prefetch: build-$b.sh $r in $((SECONDS - s)) s"
        done' >"$prefetch_log" 2>&1 &
    prefetch_pid=$!
    # A failed step ends the run: its background builds end with it.
    trap '[[ -z "$prefetch_pid" ]] || kill -- -"$prefetch_pid" 2>/dev/null || true' EXIT
fi

step "cargo fmt --check"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc -D warnings (broken doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (unit tests, VMM tests on /dev/kvm)"
cargo test --workspace --locked

# Each fuzz target starts from its checked-in seeds, so a change that
# crashes on one of them (or on what the fuzzer finds within seconds) fails
# here. The fuzz build is its own (fuzz/build.sh: $CARGO_TARGET_DIR/fuzz, or
# target/fuzz; cold, 3.5 CPU-minutes with the release profile, less with
# the smoke profile used here, fuzz/Cargo.toml) and goes
# first, as it also brings fuzz/Cargo.lock up to date. Then the harness's
# own tests (a seed request must complete, or the fuzzer would only
# exercise the set-up), built in the workspace's target directory, whose
# debug artifacts they share.
step "fuzz smoke run (${CAPSULE_FUZZ_SECS:=10} s per target)"
export CAPSULE_FUZZ_PROFILE="${CAPSULE_FUZZ_PROFILE:-smoke}"
fuzz/build.sh >/dev/null
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" cargo test --manifest-path fuzz/Cargo.toml --locked --lib
fuzz/run-all.sh "$CAPSULE_FUZZ_SECS"

# What the background builds have done so far; the boot step waits (on
# the cache locks) for any still running.
if [[ -n "$prefetch_pid" ]]; then
    grep '^prefetch:' "$prefetch_log" >&2 || true
fi

step "boot tests (real Linux guests)"
tests/boot/run.sh
