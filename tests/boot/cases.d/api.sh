# shellcheck shell=sh
# tests/boot/cases.d/api.sh: the Firecracker-compatible API (issue #5),
# driven from the shell with curl. Sourced by tests/boot/cases.sh; POSIX
# sh for busybox ash in L1.

ALL_CASES="$ALL_CASES api_lifecycle"

# api CASE_DIR METHOD PATH [JSON]: one API call with curl (given up after
# 120 s: an unanswered request fails the case, not the suite); prints the HTTP
# status, keeps the body in CASE_DIR/body.
api() {
    _d="$1" _m="$2" _p="$3"
    if [ -n "${4:-}" ]; then
        "$TOOLS/curl" --max-time 120 -s -o "$_d/body" -w '%{http_code}' --unix-socket "$_d/api.sock" \
            -X "$_m" -H 'Content-Type: application/json' -d "$4" "http://localhost$_p"
    else
        "$TOOLS/curl" --max-time 120 -s -o "$_d/body" -w '%{http_code}' --unix-socket "$_d/api.sock" \
            -X "$_m" "http://localhost$_p"
    fi
}

case_api_lifecycle() {
    _dir="$WORK/api_lifecycle"
    rm -rf "$_dir"
    mkdir -p "$_dir"
    OUT="$_dir/stdout" ERR="$_dir/stderr"
    printf '%s\n' "capsule run --api-sock $_dir/api.sock (configured with curl)" >"$_dir/command"
    _start=$(now)
    timeout -k 10 "$CASE_TIMEOUT" "$CAPSULE" run --api-sock "$_dir/api.sock" </dev/null \
        >"$_dir/stdout.raw" 2>"$ERR" &
    _pid=$!
    _i=0
    while [ ! -S "$_dir/api.sock" ] && [ $_i -lt 100 ]; do
        sleep 0.1
        _i=$((_i + 1))
    done
    expect "GET / is Not started" [ "$(api "$_dir" GET /)" = 200 ]
    expect "state Not started" grep -q '"state":"Not started"' "$_dir/body"
    expect "PUT /machine-config 204" [ "$(api "$_dir" PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256}')" = 204 ]
    expect "PUT /boot-source 204" [ "$(api "$_dir" PUT /boot-source \
        "{\"kernel_image_path\": \"$BZIMAGE\", \"initrd_path\": \"$INITRD\", \"boot_args\": \"console=ttyS0 reboot=k panic=1\"}")" = 204 ]
    expect "InstanceStart 204" [ "$(api "$_dir" PUT /actions '{"action_type": "InstanceStart"}')" = 204 ]
    # A bzImage does not show its PCI support: capsule keeps virtio-mmio,
    # and the machine configuration has Firecracker's fields only.
    expect "GET /machine-config after start 200" [ "$(api "$_dir" GET /machine-config)" = 200 ]
    expect "machine-config keeps vCPUs and memory, no transport" \
        sh -c "grep -q '\"vcpu_count\":2' '$_dir/body' && grep -q '\"mem_size_mib\":256' '$_dir/body' && ! grep -q transport '$_dir/body'"
    expect "boot-source after start is 400" [ "$(api "$_dir" PUT /boot-source "{\"kernel_image_path\": \"$BZIMAGE\"}")" = 400 ]
    expect "fault_message after start" grep -q 'fault_message' "$_dir/body"
    expect "guest ready" wait_for "$_dir/stdout.raw" "$READY" "$CASE_TIMEOUT" "$_dir/none"
    wait_for "$_dir/stdout.raw" "$PROMPT" 15 "$_dir/none"
    expect "pause 204" [ "$(api "$_dir" PATCH /vm '{"state": "Paused"}')" = 204 ]
    api "$_dir" GET / >/dev/null
    expect "state Paused" grep -q '"state":"Paused"' "$_dir/body"
    expect "resume 204" [ "$(api "$_dir" PATCH /vm '{"state": "Resumed"}')" = 204 ]
    api "$_dir" GET / >/dev/null
    expect "state Running" grep -q '"state":"Running"' "$_dir/body"
    expect "SendCtrlAltDel 204" [ "$(api "$_dir" PUT /actions '{"action_type": "SendCtrlAltDel"}')" = 204 ]
    wait "$_pid"
    RC=$?
    SECS=$(($(now) - _start))
    tr -d '\r' <"$_dir/stdout.raw" >"$OUT"
    expect "exit status 0 after Ctrl-Alt-Del" rc_is 0
    expect "the guest restarted" out_has "reboot: Restarting system"
    expect "socket removed" [ ! -e "$_dir/api.sock" ]
    expect "no Rust panic" no_rust_panic
}
