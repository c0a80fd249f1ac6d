# shellcheck shell=sh
# tests/boot/cases.d/silent.sh: a guest booted with its kernel console on
# COM1 that never writes there (loglevel=0 keeps the kernel silent and its
# init is `sleep`), stopped with SIGTERM: capsule says that the guest never
# wrote to its console and logs where its vCPU was, twice (src/stall.rs),
# which tells a guest that never ran from one that ran without a console.
# A boot case that timed out with no output at all (CI, 2026-12-06:
# virtiofs_ro) left nothing to tell the two apart. Sourced by
# tests/boot/cases.sh; POSIX sh.

ALL_CASES="$ALL_CASES run_silent_console"

case_run_silent_console() {
    _d="$WORK/run_silent_console"
    rm -rf "$_d"
    mkdir -p "$_d"
    OUT="$_d/stdout" ERR="$_d/stderr"
    printf '%s\n' "capsule run --cmdline 'console=ttyS0 loglevel=0 ... rdinit=/bin/sleep 600', SIGTERM after 8 s" >"$_d/command"
    # "600" (no "=", unknown to the kernel) becomes sleep's argument; a
    # "--" would hand it the parameters capsule appends too (pci=off).
    _start=$(now)
    "$CAPSULE" run --kernel "$BZIMAGE" --initrd "$INITRD" --memory 128M \
        --cmdline "console=ttyS0 loglevel=0 reboot=k panic=1 rdinit=/bin/sleep 600" \
        </dev/null >"$OUT" 2>"$ERR" &
    _pid=$!
    sleep 8
    kill -TERM "$_pid"
    wait "$_pid"
    RC=$?
    SECS=$(($(now) - _start))
    expect "stopped by SIGTERM (status 143, got $RC)" rc_is 143
    expect "the guest wrote nothing to its console (got $(wc -c <"$OUT") bytes)" [ ! -s "$OUT" ]
    expect "capsule says the guest never wrote to its console" err_has "never wrote to its serial console"
    expect "and where its vCPU was, twice" err_has "silent guest: sample 2: vCPU 0: rip 0x"
    grep "silent guest: sample 1" "$ERR" | cut -c1-300 | sed 's/^/    run_silent_console: /'
}
