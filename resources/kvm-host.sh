# shellcheck shell=sh
# resources/kvm-host.sh: POSIX sh helpers for the scripts that run next to
# /dev/kvm (tests/boot/cases.sh and resources/bench-net-guest.sh), inside
# the nested harness's L1 (busybox sh) or on a host with hardware KVM.
# Sourced, not run.

# tap_up NAME ADDR: in the background, once the VMM has created the TAP
# device NAME, give it ADDR (CIDR) and bring it up (for at most 60 s).
tap_up() {
    (
        _i=0
        while [ $_i -lt 600 ] && ! ip link show "$1" >/dev/null 2>&1; do
            sleep 0.1 2>/dev/null || sleep 1
            _i=$((_i + 1))
        done
        ip addr add "$2" dev "$1" && ip link set "$1" up
    ) </dev/null >/dev/null 2>&1 &
}

# L1's KVM exits and injected interrupts, counted by the kvm tracepoints'
# histogram triggers (in the kernel: no trace buffer to read out): kvm_exit
# by exit code (hex; SVM: 0x400 nested page fault, 0x7b I/O, 0x7c MSR,
# 0x78 HLT, 0x60 interrupt, 0x72 CPUID, 0x64 VINTR, 0x81 VMMCALL),
# kvm_userspace_exit by reason (2 I/O, 6 MMIO) and kvm_inj_virq by vector.
# Every VM on the machine is counted: run one at a time.
KVM_TRACE=/sys/kernel/tracing
KVM_EXIT_EVENTS="kvm_exit kvm_userspace_exit kvm_inj_virq"

# kvm_event_key EVENT: the field a histogram of EVENT is keyed on (the
# interrupt's field is "vector" in newer kernels, "irq" in older ones).
kvm_event_key() {
    case "$1" in
    kvm_exit) echo exit_reason ;;
    kvm_userspace_exit) echo reason ;;
    *) grep -o 'field:[^;]* \(vector\|irq\);' "$KVM_TRACE/events/kvm/$1/format" 2>/dev/null |
        sed 's/.* \([a-z]*\);$/\1/' | head -n 1 ;;
    esac
}

# kvm_exits_arm PREFIX: start counting (tracefs mounted if need be).
# Prints a "PREFIX error ..." line and counts nothing where the kernel has
# no histograms.
kvm_exits_arm() {
    [ -d "$KVM_TRACE/events" ] || mount -t tracefs nodev "$KVM_TRACE" 2>/dev/null
    for _ev in $KVM_EXIT_EVENTS; do
        _key="$(kvm_event_key "$_ev")"
        [ -n "$_key" ] || continue
        echo "hist:keys=$_key.hex:vals=hitcount:size=256" >"$KVM_TRACE/events/kvm/$_ev/trigger" 2>/dev/null ||
            echo "$1 error exits: no histogram trigger on $_ev"
    done
}

# kvm_exits_report PREFIX: one "PREFIX EVENT KEY=COUNT... total=N" line per
# event counted since kvm_exits_arm; the triggers are removed.
kvm_exits_report() {
    for _ev in $KVM_EXIT_EVENTS; do
        _key="$(kvm_event_key "$_ev")"
        _h="$KVM_TRACE/events/kvm/$_ev/hist"
        [ -n "$_key" ] && [ -r "$_h" ] || continue
        echo "$1 $_ev $(awk -v f="$_key:" '/hitcount:/ { for (i = 1; i <= NF; i++) {
            if ($i == f) k = $(i + 1); if ($i == "hitcount:") { v = $(i + 1); t += v; printf "%s=%s ", k, v } } }
            END { printf "total=%d", t }' "$_h")"
        echo "!hist:keys=$_key.hex:vals=hitcount:size=256" >"$KVM_TRACE/events/kvm/$_ev/trigger" 2>/dev/null
    done
}

# L1's KVM events in its trace buffer, to see what led up to a guest's
# shutdown (a triple fault: docs/harness.md, "The triple fault explained").
KVM_TRACE_EVENTS="kvm_exit kvm_entry kvm_inj_virq kvm_inj_exception kvm_apic_ipi kvm_apic_accept_irq kvm_page_fault kvm_nested_vmexit"

# kvm_trace_start PREFIX: trace KVM_TRACE_EVENTS into an 8 MiB buffer
# (tracefs mounted if need be); a "PREFIX trace: cannot trace ..." line
# for each event the kernel lacks.
kvm_trace_start() {
    [ -d "$KVM_TRACE/events" ] || mount -t tracefs nodev "$KVM_TRACE" 2>/dev/null
    echo 8192 >"$KVM_TRACE/buffer_size_kb"
    for _ev in $KVM_TRACE_EVENTS; do
        echo 1 >"$KVM_TRACE/events/kvm/$_ev/enable" 2>/dev/null || echo "$1 trace: cannot trace kvm:$_ev"
    done
    echo 1 >"$KVM_TRACE/tracing_on"
}

# kvm_trace_clear: empty the buffer (before a VM run).
kvm_trace_clear() {
    : >"$KVM_TRACE/trace"
}

# kvm_trace_shutdown PREFIX WHAT [LINES]: if a guest shut down since the
# last clear, print "PREFIX trace: WHAT: ..." and the LINES (default 150)
# events up to the first shutdown exit, each prefixed "PREFIX trace: ".
kvm_trace_shutdown() {
    grep -qi 'reason.*shutdown' "$KVM_TRACE/trace" 2>/dev/null || return 0
    echo "$1 trace: $2: L1's KVM events up to the guest's shutdown"
    grep -v '^#' "$KVM_TRACE/trace" | grep -i -m1 -B "${3:-150}" 'reason.*shutdown' | sed "s/^/$1 trace: /"
}

# kvm_unpinned PID: with CAPSULE_PIN_CPU=N, move process PID (a helper
# that measures, such as a sampler) to every other CPU, so that it takes
# no time from the VMM pinned to N: on N, bench-blk's once-a-second
# sampler of L1's KVM counters cost capsule's sequential rows about 30 %
# and Firecracker's little (docs/performance.md, 2026-12-07). Nothing
# when unpinned, or when N is the only CPU.
kvm_unpinned() {
    [ -n "${CAPSULE_PIN_CPU:-}" ] || return 0
    _others=$(awk -v p="$CAPSULE_PIN_CPU" '$1 == "processor" && $3 != p {
        printf "%s%s", (n++ ? "," : ""), $3 }' /proc/cpuinfo)
    [ -z "$_others" ] || taskset -p -c "$_others" "$1" >/dev/null 2>&1 || true
}

# kvm_pin PREFIX: with CAPSULE_PIN_CPU=N, this shell and everything it
# starts from now on (the VMMs and their threads) run on CPU N alone. In
# the nested harness that keeps interrupts from other L1 CPUs away from a
# vCPU while it runs its guest, which is when the harness's faults struck
# (docs/harness.md, "Pinned to one L1 CPU"). Prints "PREFIX pinned ..." or
# a warning; empty or unset CAPSULE_PIN_CPU: nothing.
kvm_pin() {
    [ -n "${CAPSULE_PIN_CPU:-}" ] || return 0
    if taskset -p -c "$CAPSULE_PIN_CPU" $$ >/dev/null 2>&1; then
        echo "$1 pinned to CPU $CAPSULE_PIN_CPU (CAPSULE_PIN_CPU)"
    else
        echo "$1 warning: cannot pin to CPU $CAPSULE_PIN_CPU (taskset); running unpinned"
    fi
}
