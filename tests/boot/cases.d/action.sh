# shellcheck shell=sh
# tests/boot/cases.d/action.sh: the GitHub Action (action.yml), its steps
# run in order by resources/run-action-locally.sh on this machine's KVM, as
# a workflow step `uses: ./` would run them. Sourced by tests/boot/cases.sh;
# POSIX sh for busybox ash in L1.
#
# Env: ACTION_DIR     directory with action.yml (the repository; /capsule in L1)
#      ACTION_RUNNER  resources/run-action-locally.sh
# The install step gets the capsule under test (input capsule-binary):
# building capsule needs cargo, which L1 does not have.

ALL_CASES="$ALL_CASES action_exec"

case_action_exec() {
    _dir="$WORK/action_exec"
    rm -rf "$_dir"
    mkdir -p "$_dir/in" "$_dir/out"
    OUT="$_dir/stdout" ERR="$_dir/stderr"
    echo "hello from the host" >"$_dir/in/msg"
    # Two shares, as the action's multi-line input gives them.
    _shares="$_dir/in:/in:ro
$_dir/out:/out"
    printf '%s\n' "run-action-locally.sh (action.yml) kernel=$BZIMAGE disk=$ROOTFS,ephemeral" >"$_dir/command"
    _start=$(now)
    if [ -z "${ACTION_DIR:-}" ] || [ -z "${ACTION_RUNNER:-}" ]; then
        echo "ACTION_DIR and ACTION_RUNNER must be set" >"$ERR"
        : >"$OUT"
        RC=99
    else
        timeout -k 10 "$CASE_TIMEOUT" sh "$ACTION_RUNNER" -C "$ACTION_DIR" \
            --input kernel="$BZIMAGE" --input disk="$ROOTFS,ephemeral" \
            --input share="$_shares" --input capsule-binary="$CAPSULE" --input timeout=150 \
            --input command='tr a-z A-Z </in/msg; echo made-in-the-guest >/out/result; exit 3' \
            </dev/null >"$OUT" 2>"$ERR"
        RC=$?
    fi
    SECS=$(($(now) - _start))
    expect "exit status 3, the command's" rc_is 3
    expect "the command's output streamed" out_has_line "HELLO FROM THE HOST"
    expect "every run step ran, in order" \
        [ "$(grep '^==> ' "$OUT" | cut -c1-30 | tr '\n' '|')" = "==> Enable /dev/kvm for the ru|==> Choose the capsule to inst|==> Cache capsule: skipped (us|==> Install capsule|==> Run the command in a VM|==> Run the command in a VM: f|" ]
    expect "the step failed with the status" out_has "::error title=capsule exec::exit status 3"
    expect "writable share copied back" [ "$(cat "$_dir/out/result" 2>/dev/null)" = made-in-the-guest ]
    expect "no Rust panic" no_rust_panic
}
