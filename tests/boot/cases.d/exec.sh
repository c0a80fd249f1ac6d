# shellcheck shell=sh
# tests/boot/cases.d/exec.sh: `capsule exec` cases (issue #6). Sourced by
# tests/boot/cases.sh; POSIX sh for busybox ash in L1.
#
# Most cases use the guest root image as an ephemeral --disk (never
# modified, so no copy is needed); exec_rootfs_dir packs a directory.
# Data files are made on the host side of the case and compared with cmp.

# shellcheck disable=SC2016  # $... in guest commands is for the guest shell
ALL_CASES="$ALL_CASES exec_status_0 exec_status_1 exec_status_42 exec_signal exec_not_found exec_output exec_output_console exec_stdin exec_share exec_env_cwd_clock exec_rootfs_dir exec_panic exec_timeout exec_bad_disk exec_boot_stall exec_startup_time"

# run_exec CASE STDIN_FILE ARGS...: runs `capsule exec ARGS` with stdin
# from STDIN_FILE (/dev/null for none); sets RC, OUT, ERR and SECS. The
# output files are kept byte for byte (no \r removal). Unless the case set
# CAPSULE_LOG, capsule logs at its default level plus the state of a guest
# that goes quiet (src/stall.rs, at info), so a rare stall's failure
# says where the vCPUs were.
run_exec() {
    _dir="$WORK/$1"
    _in="$2"
    rm -rf "$_dir"
    mkdir -p "$_dir"
    OUT="$_dir/stdout" ERR="$_dir/stderr"
    shift 2
    printf '%s\n' "capsule $*" >"$_dir/command"
    _start=$(now)
    CAPSULE_LOG="${CAPSULE_LOG:-warn,capsule::stall=info}" \
        timeout -k 10 "$CASE_TIMEOUT" "$CAPSULE" "$@" <"$_in" >"$OUT" 2>"$ERR"
    RC=$?
    SECS=$(($(now) - _start))
}

# exec_disk ARGS...: the common prefix of an exec with the root image.
EXEC_DISK_ARGS() {
    echo "exec --kernel $BZIMAGE --disk $ROOTFS,ephemeral"
}

out_is() { [ "$(cat "$OUT")" = "$1" ]; }
err_has() { grep -q -- "$1" "$ERR"; }
same_file() { cmp -s "$1" "$2"; }
secs_below() { [ "$SECS" -lt "$1" ]; }

exec_status_case() {
    # shellcheck disable=SC2046  # word splitting of the fixed prefix is wanted
    run_exec "$1" /dev/null $(EXEC_DISK_ARGS) -- sh -c "echo running; $2"
    expect "exit status $3" rc_is "$3"
    expect "stdout 'running'" out_is running
    expect "no Rust panic" no_rust_panic
}

case_exec_status_0() { exec_status_case exec_status_0 'exit 0' 0; }
case_exec_status_1() { exec_status_case exec_status_1 'false' 1; }
case_exec_status_42() { exec_status_case exec_status_42 'exit 42' 42; }
# SIGUSR1 (10) kills the shell: 128 + 10.
case_exec_signal() { exec_status_case exec_signal 'kill -USR1 $$' 138; }

case_exec_not_found() {
    # shellcheck disable=SC2046
    run_exec exec_not_found /dev/null $(EXEC_DISK_ARGS) -- no-such-command-here arg
    expect "exit status 127" rc_is 127
    expect "'command not found' on stderr" err_has "no-such-command-here: command not found"
    expect "no Rust panic" no_rust_panic
}

# exec_output_case CASE CHANNEL MIB: MIB MiB (+1000 B) of random stdout
# and 1 MiB of random stderr over CHANNEL (vsock or console), each
# compared byte for byte. The data comes in through --share, which
# without a virtiofsd in L1 falls back to copying and warns: that warning
# on stderr was the "damage" that failed this case after the virtio-fs
# merge. CAPSULE_LOG=error keeps capsule's warnings out of stderr
# (README: then stderr is the command's alone).
exec_output_case() {
    _d="$WORK/$1.in"
    rm -rf "$_d"
    mkdir -p "$_d"
    head -c $(($3 * 1048576)) /dev/urandom >"$_d/out.bin"
    head -c 1048576 /dev/urandom >"$_d/err.bin"
    export CAPSULE_EXEC_CHANNEL="$2" CAPSULE_LOG=error
    # shellcheck disable=SC2046
    run_exec "$1" /dev/null $(EXEC_DISK_ARGS) --share "$_d:/in:ro" \
        -- sh -c 'cat /in/out.bin; cat /in/err.bin >&2; head -c 1000 /in/out.bin; exit 3'
    unset CAPSULE_EXEC_CHANNEL
    head -c 1000 "$_d/out.bin" >"$_d/out.head"
    cat "$_d/out.bin" "$_d/out.head" >"$_d/out.expected"
    expect "exit status 3" rc_is 3
    expect "$3 MiB (+1000 B) of stdout intact" same_file "$OUT" "$_d/out.expected"
    expect "1 MiB of stderr intact and separate" same_file "$ERR" "$_d/err.bin"
    echo "    $1: $(wc -c <"$OUT") stdout bytes, $(wc -c <"$ERR") stderr bytes in ${SECS}s over $2"
    rm -rf "$_d"
}

case_exec_output() { exec_output_case exec_output vsock 10; }
# The fallback channel for kernels without vsock; less stdout, as it moves
# well under 1 MiB/s in the harness (the suite must stay short).
case_exec_output_console() { exec_output_case exec_output_console console 2; }

case_exec_stdin() {
    _f="$WORK/exec_stdin.in"
    head -c 2097152 /dev/urandom >"$_f"
    # shellcheck disable=SC2046
    run_exec exec_stdin "$_f" $(EXEC_DISK_ARGS) -- sh -c 'cat; echo end >&2'
    expect "exit status 0" rc_is 0
    expect "2 MiB of stdin came back on stdout" same_file "$OUT" "$_f"
    expect "stderr 'end'" [ "$(cat "$ERR")" = end ]
    rm -f "$_f"
}

case_exec_share() {
    _in="$WORK/exec_share.in" _out="$WORK/exec_share.out"
    rm -rf "$_in" "$_out"
    mkdir -p "$_in/deep" "$_out"
    echo "hello from the host" >"$_in/deep/msg.txt"
    echo "untouched" >"$_out/old.txt"
    # shellcheck disable=SC2046
    run_exec exec_share /dev/null $(EXEC_DISK_ARGS) \
        --share "$_in:/in:ro" --share "$_out:/work/out" -w /work/out \
        -- sh -c 'tr a-z A-Z </in/deep/msg.txt >result.txt; mkdir -p sub; seq 3 >sub/n.txt;
                  if echo x >/in/nope 2>/dev/null; then echo ro-share-writable; fi; cat old.txt'
    expect "exit status 0" rc_is 0
    expect "read-only share is read-only; existing file visible" out_is untouched
    expect "result file copied back" [ "$(cat "$_out/result.txt" 2>/dev/null)" = "HELLO FROM THE HOST" ]
    expect "new subdirectory copied back" [ "$(cat "$_out/sub/n.txt" 2>/dev/null | tr '\n' ' ')" = "1 2 3 " ]
    expect "read-only share not copied back" [ ! -e "$_in/nope" ]
    expect "no Rust panic" no_rust_panic
}

case_exec_env_cwd_clock() {
    _host_now=$(date +%s)
    # shellcheck disable=SC2046
    run_exec exec_env_cwd_clock /dev/null $(EXEC_DISK_ARGS) --env FOO='bar baz' -w /tmp \
        -- sh -c 'echo "$FOO|$(pwd)|$(date +%s)"'
    expect "exit status 0" rc_is 0
    _line="$(cat "$OUT")"
    expect "env FOO" [ "${_line%%|*}" = "bar baz" ]
    _rest="${_line#*|}"
    expect "working directory /tmp" [ "${_rest%%|*}" = /tmp ]
    _guest_now="${_rest#*|}"
    expect "guest clock within 120 s of the host's" \
        [ "$((_guest_now - _host_now))" -ge -5 -a "$((_guest_now - _host_now))" -le 120 ]
}

case_exec_rootfs_dir() {
    _r="$WORK/exec_rootfs_dir.root"
    rm -rf "$_r"
    mkdir -p "$_r"
    (cd "$_r" && gzip -dc "$INITRD" | cpio -id 2>/dev/null)
    run_exec exec_rootfs_dir /dev/null exec --kernel "$VMLINUX" --rootfs "$_r" --cpus 2 \
        -- sh -c 'echo cpus=$(nproc); exit 7'
    expect "exit status 7" rc_is 7
    expect "2 vCPUs" out_is cpus=2
    rm -rf "$_r"
}

case_exec_panic() {
    # No init at that path and no root disk: the kernel panics.
    run_exec exec_panic /dev/null exec --kernel "$BZIMAGE" --append "rdinit=/does-not-exist" -- true
    expect "exit status 123" rc_is 123
    expect "says the kernel panicked" err_has "the guest kernel panicked"
    expect "last console lines on stderr" err_has "Kernel panic"
    expect "no Rust panic" no_rust_panic
}

case_exec_timeout() {
    # shellcheck disable=SC2046
    run_exec exec_timeout /dev/null $(EXEC_DISK_ARGS) --timeout 20 -- sh -c 'echo started; sleep 600'
    expect "exit status 124" rc_is 124
    expect "output before the timeout arrived" out_is started
    expect "says the timeout expired" err_has "timeout of 20 s expired"
    expect "killed promptly (under 60 s)" secs_below 60
}

case_exec_bad_disk() {
    _img="$WORK/exec_bad_disk.img"
    head -c 4194304 /dev/zero >"$_img"
    run_exec exec_bad_disk /dev/null exec --kernel "$BZIMAGE" --disk "$_img,ephemeral" -- true
    expect "exit status 125" rc_is 125
    expect "one 'capsule: error:' line naming the disk" err_has "^capsule: error: in the guest: cannot mount --disk"
    expect "no Rust panic" no_rust_panic
    rm -f "$_img"
}

case_exec_boot_stall() {
    # A guest whose init never talks to capsule (a shell waiting on the
    # serial console): capsule must give up at --boot-timeout, not hang.
    _r="$WORK/exec_boot_stall.root"
    rm -rf "$_r"
    mkdir -p "$_r"
    (cd "$_r" && gzip -dc "$INITRD" | cpio -id 2>/dev/null)
    export CAPSULE_LOG=info
    run_exec exec_boot_stall /dev/null exec --kernel "$BZIMAGE" --rootfs "$_r" \
        --append "rdinit=/bin/sh" --boot-timeout 20 -- true
    expect "exit status 123" rc_is 123
    expect "says the init did not start" err_has "did not start capsule's init within 20 s"
    # The quiet guest's state (src/stall.rs, at info): both samples of
    # the vCPU, and the vsock device's queues.
    expect "logs where the vCPU was, twice" err_has "quiet guest: sample 2: vCPU 0: rip 0x"
    expect "logs the vsock device's queues" err_has "quiet guest: vsock: queue 0: avail"
    grep "quiet guest: sample 1" "$ERR" | cut -c1-400 | sed 's/^/    exec_boot_stall: /'
    expect "gave up in time (under 60 s)" secs_below 60
    rm -rf "$_r"
}

case_exec_startup_time() {
    export CAPSULE_LOG=info
    # shellcheck disable=SC2046
    run_exec exec_startup_time /dev/null $(EXEC_DISK_ARGS) -- true
    expect "exit status 0" rc_is 0
    _ms="$(sed -n 's/.*command started \([0-9]*\) ms after capsule started.*/\1/p' "$ERR")"
    expect "start-up time logged" [ -n "$_ms" ]
    echo "    exec_startup_time: command started ${_ms:-?} ms after capsule started; whole run ${SECS}s"
}
