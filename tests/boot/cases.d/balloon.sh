# shellcheck shell=sh
# tests/boot/cases.d/balloon.sh: virtio-balloon with a real guest (issue
# #21). A 512 MiB guest fills ~300 MiB of tmpfs and frees it; capsule's
# resident memory (VmRSS, in L1) is read at each step and printed.
#
# balloon_reporting: with free page reporting the freed memory goes back
#   to the host by itself, within seconds; GET /balloon/statistics gives
#   the guest's own numbers (total_memory is its MemTotal).
# balloon_inflate: without reporting the freed memory stays with capsule
#   (the contrast); PATCH /balloon amount_mib=300 inflates the balloon:
#   the guest's MemTotal shrinks by it, capsule's RSS drops, and
#   amount_mib=0 gives the guest its memory back.
# balloon_oom: with deflate_on_oom, a guest whose memory is mostly in the
#   balloon takes pages back when it needs them instead of killing.
# Sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1.

ALL_CASES="$ALL_CASES balloon_reporting balloon_inflate balloon_oom"

# What the guest writes and frees, MiB.
BALLOON_FILL_MIB=300

# balloon_start CASE BALLOON_OPTION: capsule with 512 MiB, an API socket
# and `--balloon BALLOON_OPTION` in the background, its stdin a FIFO open
# on descriptor 7; waits for the guest's shell. Sets BD (the case's
# directory) and BPID (capsule's pid).
balloon_start() {
    BD="$WORK/$1"
    rm -rf "$BD"
    mkdir -p "$BD"
    OUT="$BD/stdout" ERR="$BD/stderr"
    mkfifo "$BD/stdin.fifo"
    printf '%s\n' "capsule run --memory 512M --balloon $2 --api-sock (driven from the case)" >"$BD/command"
    _start=$(now)
    CAPSULE_LOG=info "$CAPSULE" run --kernel "$VMLINUX" --initrd "$INITRD" --memory 512M \
        --api-sock "$BD/api.sock" --balloon "$2" \
        <"$BD/stdin.fifo" >"$BD/stdout.raw" 2>"$ERR" &
    BPID=$!
    # $BD/gone once capsule has ended (a guest that reset, a crash): every
    # wait below stops there instead of running out its own time.
    (
        while kill -0 "$BPID" 2>/dev/null; do sleep 1; done
        touch "$BD/gone"
    ) &
    # A capsule that died must not take this shell along with a SIGPIPE.
    trap '' PIPE
    exec 7>"$BD/stdin.fifo"
    wait_for "$BD/stdout.raw" "$READY" "$CASE_TIMEOUT" "$BD/gone" &&
        wait_for "$BD/stdout.raw" "$PROMPT" 15 "$BD/gone"
}

# balloon_end: `poweroff -f`, then waits (at most CASE_TIMEOUT) for
# capsule; sets RC, SECS and OUT.
balloon_end() {
    printf 'poweroff -f\n' >&7
    exec 7>&-
    trap - PIPE
    _deadline=$(($(now) + CASE_TIMEOUT))
    while kill -0 "$BPID" 2>/dev/null && [ "$(now)" -lt "$_deadline" ]; do
        sleep 1
    done
    kill -9 "$BPID" 2>/dev/null
    wait "$BPID"
    RC=$?
    SECS=$(($(now) - _start))
    tr -d '\r' <"$BD/stdout.raw" >"$OUT"
}

# guest_do CMD MARK [SECONDS]: types CMD and waits until it has finished
# (the guest prints MARKdone after it; the echoed command line shows
# MARK""done, which does not match).
guest_do() {
    printf '%s; echo %s""done\n' "$1" "$2" >&7
    wait_for "$BD/stdout.raw" "^$2done" "${3:-120}" "$BD/gone"
}

# guest_value NAME: the number the guest printed as `NAME=N` last.
guest_value() {
    tr -d '\r' <"$BD/stdout.raw" | sed -n "s/^$1=\([0-9]*\)\$/\1/p" | tail -n1
}

# rss_mib: capsule's resident memory, MiB.
rss_mib() {
    awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$BPID/status"
}

# bapi METHOD PATH [JSON]: one API call; prints the status, the body is in
# $BD/body.
bapi() {
    if [ -n "${3:-}" ]; then
        "$TOOLS/curl" --max-time 120 -s -o "$BD/body" -w '%{http_code}' --unix-socket "$BD/api.sock" \
            -X "$1" -H 'Content-Type: application/json' -d "$3" "http://localhost$2"
    else
        "$TOOLS/curl" --max-time 120 -s -o "$BD/body" -w '%{http_code}' --unix-socket "$BD/api.sock" \
            -X "$1" "http://localhost$2"
    fi
}

# body_num KEY: the number KEY has in the last API body.
body_num() {
    grep -o "\"$1\":[0-9]*" "$BD/body" | head -n1 | cut -d: -f2
}

# rss_below MIB SECONDS: waits until capsule's RSS is at most MIB.
rss_below() {
    _deadline=$(($(now) + $2))
    while [ "$(rss_mib)" -gt "$1" ]; do
        [ "$(now)" -ge "$_deadline" ] && return 1
        sleep 1
    done
}

# fill_and_free: the guest writes BALLOON_FILL_MIB MiB to a tmpfs and
# deletes it; sets RSS0 (before), RSS1 (filled).
fill_and_free() {
    RSS0=$(rss_mib)
    guest_do "mkdir -p /b && mount -t tmpfs -o size=400m b /b && dd if=/dev/zero of=/b/f bs=1M count=$BALLOON_FILL_MIB 2>/dev/null" filled 300
    RSS1=$(rss_mib)
    guest_do "rm /b/f" freed
}

case_balloon_reporting() {
    balloon_start balloon_reporting free_page_reporting=on,stats_interval_s=1
    fill_and_free
    # Linux reports free 4 MiB blocks 2 s after they are freed, a few
    # batches a round: give it (and the emulated harness) 60 s.
    _t0=$(now)
    _grew=$((RSS1 - RSS0))
    rss_below $((RSS1 - _grew / 2)) 60
    _secs=$(($(now) - _t0))
    sleep 5
    RSS2=$(rss_mib)
    echo "balloon_reporting: capsule VmRSS booted ${RSS0} MiB, after the guest wrote ${BALLOON_FILL_MIB} MiB ${RSS1} MiB, after it freed them ${RSS2} MiB (half of the growth back within ${_secs} s)"
    guest_do "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2 | sed 's/^/memtotal=/'" meminfo
    _st=$(bapi GET /balloon/statistics)
    cp "$BD/body" "$BD/statistics.json"
    echo "balloon_reporting: GET /balloon/statistics: $(cat "$BD/body")"
    balloon_end
    expect "exit status 0" rc_is 0
    expect "the guest wrote ${BALLOON_FILL_MIB} MiB (RSS grew by at least 250 MiB)" [ "$_grew" -ge 250 ]
    expect "RSS dropped by more than half of what the guest wrote and freed" \
        [ $((RSS1 - RSS2)) -gt $((_grew / 2)) ]
    expect "GET /balloon/statistics 200" [ "$_st" = 200 ]
    expect "statistics total_memory is the guest's MemTotal" \
        [ "$(grep -o '"total_memory":[0-9]*' "$BD/statistics.json" | cut -d: -f2)" = \
        "$(($(guest_value memtotal) * 1024))" ]
    expect "statistics have free_memory" grep -q '"free_memory":[0-9]' "$BD/statistics.json"
    expect "no Rust panic" no_rust_panic
}

# balloon_wait_actual MIB SECONDS: waits until the driver holds MIB in
# the balloon (GET /balloon/statistics' actual_mib).
balloon_wait_actual() {
    _deadline=$(($(now) + $2))
    while :; do
        bapi GET /balloon/statistics >/dev/null
        [ "$(body_num actual_mib)" = "$1" ] && return 0
        [ "$(now)" -ge "$_deadline" ] || [ -e "$BD/gone" ] && return 1
        sleep 1
    done
}

case_balloon_inflate() {
    balloon_start balloon_inflate amount_mib=0,stats_interval_s=1
    guest_do "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2 | sed 's/^/memtotal=/'" total0
    _total0=$(guest_value memtotal)
    fill_and_free
    sleep 5
    RSS2=$(rss_mib)
    _patch=$(bapi PATCH /balloon "{\"amount_mib\": $BALLOON_FILL_MIB}")
    balloon_wait_actual "$BALLOON_FILL_MIB" 120
    _inflated=$?
    RSS3=$(rss_mib)
    guest_do "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2 | sed 's/^/memtotal=/'" total1
    _total1=$(guest_value memtotal)
    bapi PATCH /balloon '{"amount_mib": 0}' >/dev/null
    balloon_wait_actual 0 120
    _deflated=$?
    guest_do "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2 | sed 's/^/memtotal=/'" total2
    _total2=$(guest_value memtotal)
    echo "balloon_inflate: capsule VmRSS booted ${RSS0} MiB, after the guest wrote ${BALLOON_FILL_MIB} MiB ${RSS1} MiB, 5 s after it freed them ${RSS2} MiB (no reporting), after PATCH /balloon amount_mib=${BALLOON_FILL_MIB} ${RSS3} MiB; guest MemTotal ${_total0} kB, inflated ${_total1} kB, deflated ${_total2} kB"
    balloon_end
    _grew=$((RSS1 - RSS0))
    expect "exit status 0" rc_is 0
    expect "the guest wrote ${BALLOON_FILL_MIB} MiB (RSS grew by at least 250 MiB)" [ "$_grew" -ge 250 ]
    expect "without reporting, freed memory stays with capsule" [ $((RSS1 - RSS2)) -lt 50 ]
    expect "PATCH /balloon 204" [ "$_patch" = 204 ]
    expect "the guest inflated the balloon to ${BALLOON_FILL_MIB} MiB" [ "$_inflated" = 0 ]
    expect "RSS dropped by more than half of what the guest freed" [ $((RSS2 - RSS3)) -gt $((_grew / 2)) ]
    expect "the guest's MemTotal shrank by the balloon" \
        [ $((_total0 - _total1)) -eq $((BALLOON_FILL_MIB * 1024)) ]
    expect "the balloon deflated" [ "$_deflated" = 0 ]
    expect "MemTotal is back after deflating" [ "$_total2" = "$_total0" ]
    expect "no Rust panic" no_rust_panic
}

no_oom_kill() { ! out_has "Killed process"; }

case_balloon_oom() {
    balloon_start balloon_oom deflate_on_oom=on,stats_interval_s=1
    _patch=$(bapi PATCH /balloon '{"amount_mib": 400}')
    balloon_wait_actual 400 120
    _inflated=$?
    guest_do "grep MemFree /proc/meminfo | tr -s ' ' | cut -d' ' -f2 | sed 's/^/memfree=/'" free0
    _free0=$(guest_value memfree)
    # More than is free: only pages taken back from the balloon make room.
    guest_do "mkdir -p /b && mount -t tmpfs -o size=400m b /b && dd if=/dev/zero of=/b/f bs=1M count=150 2>/dev/null; echo dd=\$?" wrote 300
    _dd=$(guest_value dd)
    bapi GET /balloon/statistics >/dev/null
    _actual=$(body_num actual_mib)
    echo "balloon_oom: balloon inflated to 400 MiB of 512 (guest MemFree ${_free0} kB), then the guest wrote 150 MiB (dd status ${_dd}); the balloon holds ${_actual} MiB"
    balloon_end
    expect "exit status 0" rc_is 0
    expect "PATCH /balloon 204" [ "$_patch" = 204 ]
    expect "the balloon inflated to 400 MiB" [ "$_inflated" = 0 ]
    expect "less than 150 MiB was free after inflating" [ "${_free0:-0}" -lt $((150 * 1024)) ]
    expect "the guest wrote its 150 MiB" [ "$_dd" = 0 ]
    expect "the guest took pages back from the balloon" [ "${_actual:-400}" -lt 400 ]
    expect "no OOM kill" no_oom_kill
    expect "no Rust panic" no_rust_panic
}
