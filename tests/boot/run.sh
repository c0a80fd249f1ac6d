#!/usr/bin/env bash
# tests/boot/run.sh: capsule's boot tests, host side.
#
# Installs the dependencies, builds the static capsule binary, the guest
# kernel and the guest initramfs, picks the harness mode
# (resources/harness/mode.sh) and runs tests/boot/cases.sh: directly on
# this host's /dev/kvm in `direct` mode, or inside one nested L1 guest for
# all cases in `nested` mode (resources/harness/run-in-l1.sh). Prints each
# case's result and ends with exactly one line
#     boot: N passed, M failed
# A case that was expected but not reported (the harness could not run, or
# died half-way) counts as failed; the exit status is non-zero if M > 0.
#
# Usage: tests/boot/run.sh
# Env:   CAPSULE_HARNESS=direct|nested  force a mode
#        CASES="a b"                     run a subset (see cases.sh --list)
#        CASE_TIMEOUT                    seconds per case (default 180)
#        CAPSULE_L1_TIMEOUT              nested mode: seconds for the whole L1 run (default 600 +
#                                        30 per case, at least 900; plus twice CASE_TIMEOUT, a Debian case's own
#                                        timeout, for each one selected)
#        CAPSULE_L1_RETRIES              nested mode: new L1s for the cases that an L1
#                                        that hung or died did not report (default 8; fewer
#                                        if two L1s in a row report no case)
#        CAPSULE_PIN_CPU                 nested mode: the L1 CPU the cases and all they
#                                        start run on (default 0; empty: unpinned;
#                                        docs/harness.md, "Pinned to one L1 CPU")
#        CAPSULE_BOOT_TESTS_LOG          keep the full case output here
#        CAPSULE_CACHE                   cache root for kernels and images
#        CAPSULE_LOG                     capsule's log filter, passed to the cases
#        CAPSULE_SECCOMP                 kill|trap|log: what a forbidden call does, passed to the cases
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
resources="$here/../../resources"
# shellcheck source=resources/lib.sh
source "$resources/lib.sh"

# write_l1_wrapper PATH "CASE...": the script that runs cases.sh in L1, with
# the paths of the files run-in-l1.sh puts under /capsule.
write_l1_wrapper() {
    local log_line="" bench_line=""
    if [[ -n "${CAPSULE_LOG:-}" ]]; then
        log_line="export CAPSULE_LOG='$CAPSULE_LOG'"
    fi
    # Sizes for the optional bench_exec_stdout case (resources/bench-exec.sh).
    if [[ -n "${BENCH_EXEC_MIB:-}${BENCH_CONSOLE_MIB:-}" ]]; then
        bench_line="export BENCH_EXEC_MIB='${BENCH_EXEC_MIB:-256}' BENCH_CONSOLE_MIB='${BENCH_CONSOLE_MIB:-16}'"
    fi
    if [[ "${BENCH_EXEC_ROWS:-}" =~ ^[a-z\ ]+$ ]]; then
        bench_line="$bench_line
export BENCH_EXEC_ROWS='$BENCH_EXEC_ROWS'"
    fi
    # Rounds of the optional bench_exec_confinement case.
    if [[ "${BENCH_RUNS:-}" =~ ^[1-9][0-9]*$ ]]; then
        bench_line="$bench_line
export BENCH_RUNS='$BENCH_RUNS'"
    fi
    # Rounds of exec_snapshot_parallel, to hunt a rare clone failure.
    if [[ "${EXEC_PAR_ROUNDS:-}" =~ ^[1-9][0-9]*$ ]]; then
        bench_line="$bench_line
export EXEC_PAR_ROUNDS='$EXEC_PAR_ROUNDS'"
    fi
    if [[ -n "${CAPSULE_SECCOMP:-}" ]]; then
        log_line="$log_line
export CAPSULE_SECCOMP='$CAPSULE_SECCOMP'"
    fi
    cat >"$1" <<EOF
#!/bin/sh
export CAPSULE=/capsule/capsule BZIMAGE=/capsule/bzImage VMLINUX=/capsule/vmlinux
export INITRD=/capsule/initramfs.cpio.gz KERNEL_RELEASE='$(cat "$kdir/kernelrelease")'
export ROOTFS=/capsule/rootfs.ext4 TOOLS=/capsule/tools
export CASE_TIMEOUT='$case_timeout' CASES='$2' KVM_HOST_LIB=/capsule/kvm-host.sh
export DEBIAN_IMAGE=/capsule/debian NOACPI_VMLINUX=/capsule/noacpi/vmlinux
export ACTION_DIR=/capsule ACTION_RUNNER=/capsule/run-action-locally.sh
export CAPSULE_PIN_CPU='${CAPSULE_PIN_CPU-0}'
$log_line
$bench_line
exec sh /capsule/boot/cases.sh
EOF
}

# All of the work is in main(), parsed whole before it runs: editing this
# file while it runs cannot corrupt the run.
main() {
    start=$SECONDS
    mapfile -t all_cases < <(sh "$here/cases.sh" --list)
    if [[ -n "${CASES:-}" ]]; then
        read -r -a expected <<<"$CASES"
    else
        expected=("${all_cases[@]}")
    fi

    # fail_all REASON: the cases could not run at all: every one of them failed.
    fail_all() {
        echo "boot tests: could not run: $1"
        for c in "${expected[@]}"; do
            echo "  FAIL $c: not run ($1)"
        done
        echo "boot: 0 passed, ${#expected[@]} failed"
        exit 1
    }

    "$resources/install-deps.sh" || fail_all "installing dependencies failed"
    export CAPSULE_SKIP_DEPS=1
    capsule="$("$resources/build-capsule.sh")" || fail_all "building capsule failed"
    kdir="$("$resources/build-guest-kernel.sh")" || fail_all "building the guest kernel failed"
    initrd="$("$resources/build-guest-initramfs.sh")" || fail_all "building the guest initramfs failed"
    rootfs="$("$resources/build-guest-rootfs.sh")" || fail_all "building the guest root image failed"
    # The Debian image (a few hundred MiB, carried into L1's RAM) only when
    # a Debian case runs.
    debian=""
    l1_debian=()
    if [[ " ${expected[*]} " == *" debian_"* ]]; then
        debian="$("$resources/build-debian-image.sh")" || fail_all "building the Debian guest image failed"
        l1_debian=("$debian:debian")
    fi
    # The kernel without ACPI (a few minutes to build once) only when its
    # case runs.
    noacpi=""
    l1_noacpi=()
    if [[ " ${expected[*]} " == *" noacpi_"* ]]; then
        noacpi="$("$resources/build-guest-kernel-noacpi.sh")" || fail_all "building the no-ACPI guest kernel failed"
        l1_noacpi=("$noacpi:noacpi")
    fi
    mode="$("$resources/harness/mode.sh")" || fail_all "choosing the harness mode failed"
    case_timeout="${CASE_TIMEOUT:-180}"
    log "build phase took $((SECONDS - start))s; ${#expected[@]} cases"

    echo "boot tests: mode=$mode"

    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-boot-tests.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    caselog="$work/cases.log"
    # debugfs checks disks; ip (iproute2, for `ip tuntap`) serves the
    # network cases, tc the containerd shim's pod network (containerd_net),
    # and the static passt built by build-passt.sh the
    # user-mode one (with passt.avx2, which passt runs in its place on CPUs
    # with AVX2); git serves the virtio-fs cases (`git status` on a share).
    copy_tools "$work/tools" debugfs curl ip tc || fail_all "collecting the host tools failed"
    # Debian's git (install-deps.sh), whatever else PATH has first.
    PATH="/usr/bin:$PATH" copy_tools "$work/tools" git || fail_all "collecting git failed"
    passt="$("$resources/build-passt.sh")" || fail_all "building passt failed"
    cp "$passt" "$passt.avx2" "$work/tools/bin/" || fail_all "copying passt failed"
    # The vsock cases' relay, built with capsule, for L1 and the guest.
    cp "$(dirname "$capsule")/capsule-vsock" "$work/tools/bin/" || fail_all "copying capsule-vsock failed"
    # The virtio-fs cases' virtiofsd (the wrapper runs it with the shared
    # libraries beside it, so it also runs in L1).
    virtiofsd="$("$resources/build-virtiofsd.sh")" || fail_all "building virtiofsd failed"
    cp -r "$(dirname "$virtiofsd")" "$work/tools/virtiofsd" || fail_all "copying virtiofsd failed"
    # The containerd cases' containerd and ctr (Debian's, through
    # copy_tools' loader wrapper) and the static shim, only when one runs.
    if [[ " ${expected[*]} " == *" containerd_"* ]]; then
        ctrd="$("$resources/build-containerd-shim.sh")" || fail_all "building the containerd shim failed"
        PATH="$ctrd/containerd/usr/bin:$PATH" copy_tools "$work/tools/containerd" containerd ctr ||
            fail_all "collecting containerd failed"
        cp "$ctrd/containerd-shim-capsule-v2" "$work/tools/containerd/" || fail_all "copying the shim failed"
        # util-linux's script: a terminal for `ctr run -t` (containerd_tty).
        copy_tools "$work/tools/containerd" script || fail_all "collecting script failed"
        # containerd_runc's baseline: Debian's runc and runc shim. Both
        # re-execute /proc/self/exe, so they cannot run through the loader
        # wrapper: they go as they are, with the libraries they need, and
        # the case puts those where the loader looks (L1's root is a
        # throwaway initramfs).
        if [[ " ${expected[*]} " == *" containerd_runc "* ]]; then
            native="$work/tools/containerd/native"
            mkdir -p "$native/bin" "$native/lib"
            for b in "$ctrd/containerd/usr/sbin/runc" "$ctrd/containerd/usr/bin/containerd-shim-runc-v2"; do
                cp "$b" "$native/bin/" || fail_all "copying $b failed"
                ldd "$b" | awk '/=>/ { print $3 } /^\t\// { print $1 }' | while read -r lib; do
                    [[ -z "$lib" ]] || cp -L "$lib" "$native/lib/"
                done
            done
        fi
    fi

    rc=0
    if [[ "$mode" == direct ]]; then
        CAPSULE="$capsule" BZIMAGE="$kdir/bzImage" VMLINUX="$kdir/vmlinux" INITRD="$initrd" \
            ROOTFS="$rootfs" DEBIAN_IMAGE="$debian" NOACPI_VMLINUX="${noacpi:+$noacpi/vmlinux}" TOOLS="$work/tools" KERNEL_RELEASE="$(cat "$kdir/kernelrelease")" CASE_TIMEOUT="$case_timeout" \
            CASES="${expected[*]}" KVM_HOST_LIB="$resources/kvm-host.sh" \
            ACTION_DIR="$here/../.." ACTION_RUNNER="$resources/run-action-locally.sh" \
            sh "$here/cases.sh" </dev/null 2>&1 | tee "$caselog" || rc=$?
    else
        # One L1 boot for all cases. If L1 itself fails (hangs, times out or
        # dies without reporting: statuses 124-126), the cases it did not
        # report are run again in a new L1, up to eight times
        # (CAPSULE_L1_RETRIES), while L1s make progress: two in a row that
        # report no case end it. Eight, not four: a clean-clone run on
        # 2026-12-06 lost five L1s in 28 minutes (the L1 kernel's oops in
        # its page-fault entry, docs/harness.md), and its last two cases
        # were never run.
        # A full distribution boots for a minute or more in the harness: each
        # Debian case may take its whole timeout (twice CASE_TIMEOUT) on top.
        # durability_kill9 boots 20 guests, about 20 s each in the harness.
        # The base grows with the number of cases: the default suite (65
        # cases) ran 870 s into its first L1 and got 47 cases done on a
        # loaded machine (2026-12-05, QEMU 10 + Linux 6.12), so a flat 900 s
        # cut a healthy L1 short and reran 18 cases. A hung L1 is still
        # caught within CAPSULE_L1_HANG (90 s without its heartbeat), and a
        # stuck case within its CASE_TIMEOUT, whatever this total is.
        timeout_l1=$((600 + 30 * ${#expected[@]}))
        [[ $timeout_l1 -ge 900 ]] || timeout_l1=900
        for c in "${expected[@]}"; do
            [[ "$c" != debian_* ]] || timeout_l1=$((timeout_l1 + 2 * case_timeout))
            [[ "$c" != durability_* ]] || timeout_l1=$((timeout_l1 + 900))
        done
        timeout_l1="${CAPSULE_L1_TIMEOUT:-$timeout_l1}"
        retries="${CAPSULE_L1_RETRIES:-8}"
        remaining=("${expected[@]}")
        : >"$caselog"
        attempt=0
        idle=0
        while :; do
            attempt=$((attempt + 1))
            write_l1_wrapper "$work/boot-tests-l1.sh" "${remaining[*]}"
            rc=0
            CAPSULE_L1_TIMEOUT="$timeout_l1" "$resources/harness/run-in-l1.sh" \
                "$work/boot-tests-l1.sh" "$capsule" "$kdir/bzImage" "$kdir/vmlinux" \
                "$initrd" "$rootfs" "$work/tools" "$here:boot" "$resources/kvm-host.sh" \
                "$here/../../action.yml" "$resources/run-action-locally.sh" \
                ${l1_debian[@]+"${l1_debian[@]}"} ${l1_noacpi[@]+"${l1_noacpi[@]}"} </dev/null | tee -a "$caselog" || rc=$?
            unreported=()
            for c in "${remaining[@]}"; do
                tr -d '\r' <"$caselog" | grep -aE "^boot-case: (PASS|FAIL) $c( |:|\$)" >/dev/null ||
                    unreported+=("$c")
            done
            if [[ ${#unreported[@]} -eq ${#remaining[@]} ]]; then
                idle=$((idle + 1))
            else
                idle=0
            fi
            if [[ $rc -lt 124 || $rc -gt 126 || ${#unreported[@]} -eq 0 || $attempt -gt $retries || $idle -ge 2 ]]; then
                break
            fi
            log "L1 failed (status $rc) before reporting ${#unreported[@]} case(s): running them again in a new L1: ${unreported[*]}"
            echo "boot tests: L1 failed (status $rc); rerunning the unreported cases in a new L1: ${unreported[*]}"
            remaining=("${unreported[@]}")
        done
    fi
    log "cases.sh ($mode) finished with status $rc after $((SECONDS - start))s in total"
    if [[ -n "${CAPSULE_BOOT_TESTS_LOG:-}" ]]; then
        cp "$caselog" "$CAPSULE_BOOT_TESTS_LOG"
    fi

    # Tally: one result per expected case; anything missing is a failure.
    passed=0
    failed=0
    echo "boot tests: results"
    for c in "${expected[@]}"; do
        line="$(tr -d '\r' <"$caselog" | grep -aE "^boot-case: (PASS|FAIL) $c( |:|\$)" | tail -n1 || true)"
        if [[ "$line" == "boot-case: PASS "* ]]; then
            passed=$((passed + 1))
            echo "  PASS ${line#boot-case: PASS }"
        elif [[ -n "$line" ]]; then
            failed=$((failed + 1))
            echo "  FAIL ${line#boot-case: FAIL }"
        else
            failed=$((failed + 1))
            echo "  FAIL $c: no result reported (harness status $rc)"
        fi
    done
    # Every reported name must be an expected case. A case may be reported
    # more than once (an L1 that died while printing is followed by a new
    # one, and a console can repeat a line); the last report counts, above.
    unknown="$(tr -d '\r' <"$caselog" | sed -nE 's/^boot-case: (PASS|FAIL) ([A-Za-z0-9_]+).*/\2/p' | sort -u |
        while read -r c; do [[ " ${expected[*]} " == *" $c "* ]] || printf '%s ' "$c"; done)"
    if [[ -n "$unknown" ]]; then
        echo "  harness: results reported for cases that were not expected: $unknown"
        [[ $failed -gt 0 ]] || failed=1
    fi
    if [[ $rc -ne 0 && $failed -eq 0 ]]; then
        echo "  harness: exited with status $rc although every case passed"
        failed=1
    fi
    retried="$(tr -d '\r' <"$caselog" | grep -ac '^boot-case: RETRY ' || true)"
    if [[ "$retried" -gt 0 ]]; then
        echo "  note: $retried rerun(s) of a case after a guest triple fault or boot stall:"
        tr -d '\r' <"$caselog" | grep -a '^boot-case: RETRY ' | sed 's/^boot-case: RETRY /    /'
    fi
    echo "boot: $passed passed, $failed failed"
    [[ $failed -eq 0 ]]
}

main "$@"
