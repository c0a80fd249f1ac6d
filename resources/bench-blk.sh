#!/usr/bin/env bash
# resources/bench-blk.sh: virtio-blk benchmark, from inside the guest.
#
# Boots capsule's test kernel, in capsule (its default synchronous block
# engine over virtio-mmio, `--transport mmio` named, as capsule's own
# default picks virtio-pci for this kernel; again as `capsule-uring` with
# the data disk on `,engine=io_uring`; and as `capsule-pci`, the default
# engine with `--transport pci`: virtio-pci with MSI-X), in QEMU (-M microvm, the same
# virtio-blk devices over virtio-mmio) and, when their builds are present
# (capsule_anchors_dir in resources/lib.sh; otherwise their columns are
# left out with a note), in Firecracker (`--no-api --config-file`, its
# default synchronous block engine, virtio-mmio; and again as
# `firecracker-async` with the data drive's `io_engine: "Async"`, its
# io_uring engine) and Cloud Hypervisor (its
# command line, virtio-blk over virtio-pci, its default engine), with a
# benchmark root image (busybox + fio,
# as /dev/vda, read-only) and a raw data image (/dev/vdb), and runs fio on
# /dev/vdb with O_DIRECT and libaio: sequential write and read (1 MiB
# blocks, queue depth 4) and 4 KiB random reads and writes (queue depths 32
# and 1), and the same jobs once per round on the data file itself, with
# no VM (the `limit` column: the physical limit of each row). capsule,
# Firecracker and Cloud Hypervisor boot the build's vmlinux (Firecracker
# takes no bzImage), QEMU its bzImage. Runs alternate between VMMs. Each VM
# run measures every job once; the table shows min / median / max over the
# runs, then the ratios of capsule's median to each peer's (c/PEER) and of
# each capsule column's median to the best peer's (c/best, u/best for
# capsule-uring, p/best for capsule-pci; the best peer is the highest
# median of QEMU, Firecracker (either engine) and Cloud Hypervisor).
# This is a benchmark, not a test: it prints numbers, it does not judge
# them.
#
# In nested mode (resources/harness/mode.sh) the runs happen inside the
# TCG L1 guest and the data image is in L1's RAM (tmpfs): absolute figures
# are far below what hardware KVM gives; they show the VMM's own costs.
# When an L1 dies or hangs (TCG), the VM runs it finished are kept and a
# new L1 does the rest, up to 3 L1 sessions.
#
# Usage: resources/bench-blk.sh
# Env:   BENCH_RUNS   VM runs (default 5)
#        BENCH_SIZE   MiB of data disk and of each sequential job (default 256)
#        CAPSULE_HARNESS=direct|nested   force a mode
#        BENCH_RESULTS  a file the runs' lines are appended to and the table
#                       is computed from: several invocations (e.g. several
#                       short holds of the nested harness) make one table
#        CAPSULE_ANCHORS  where the Firecracker / Cloud Hypervisor builds are
#        BENCH_VMMS   which columns to run (default: capsule capsule-uring
#                     capsule-pci qemu, the peers found, limit)
#        BENCH_CAPSULE_BASE (another capsule binary, e.g. main's before a
#                     change: a capsule-base column beside capsule's, in
#                     the same L1, alternating)
#        BENCH_VM_TIMEOUT  seconds one VM run may take before it is
#                     killed and counted as failed (default 900)
#        BENCH_TABLE_ONLY=1  (with BENCH_RESULTS) print that file's table;
#                     run and build nothing
#        BENCH_JOBS   the jobs each VM run does (default: all six, seqwrite
#                     seqread randread randwrite randread1 randwrite1)
#        BENCH_DETAIL=1  also the interrupts the guest took per job
#                     (/proc/interrupts) and, in nested mode, L1's KVM
#                     counters per VM run (exits, injections, MMIO and
#                     interrupt-window exits...), their medians after the
#                     table (sampled once a second, with BENCH_PIN_CPU on
#                     L1's other CPUs)
#        BENCH_PIN_CPU=N (nested mode) every VMM runs on L1 CPU N alone,
#                     all alike (docs/harness.md, "Pinned to one L1 CPU")
#        BENCH_TRACE=1  (nested mode) trace L1's KVM, and after a run whose
#                     guest shut down (triple fault) print the last
#                     BENCH_TRACE_LINES (default 150) events before it
# stdout: the table; progress goes to stderr.
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# write_jobs FIO FILE SIZE_MIB DIRECT [DETAIL]: the fio jobs, as POSIX sh
# that prints one "bench-blk: JOB ..." line per job: the same jobs in the
# guest (on /dev/vdb, DIRECT=1: O_DIRECT, so the guest's page cache is out
# of it) and, for the `limit` column, in the harness's own host (on the
# data file itself, with nothing between fio and the file but the host
# kernel: the physical limit of this machine for each row; DIRECT=0,
# buffered, the way the VMMs reach the file, through the host's page
# cache). Only the jobs named in BENCH_JOBS run (default: all six). With
# DETAIL=1 (the guest, BENCH_DETAIL=1) each job also prints the
# interrupts the guest took during it, per /proc/interrupts line
# ("bench-blk: detail JOB irq NAME COUNT"): the device's interrupts and
# the IPIs between the vCPUs, however each VMM delivers them.
write_jobs() {
    cat <<JOBS
# irqs: "NAME COUNT" per /proc/interrupts line, the count summed over the
# vCPUs (a numbered line is named NUMBER-DEVICE).
irqs() {
    awk 'NR > 1 {
        n = 0
        for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) n += \$i
        name = \$1; sub(":", "", name)
        if (name ~ /^[0-9]+\$/) name = name "-" \$NF
        print name, n
    }' /proc/interrupts
}
# job NAME FIO_ARGS...: one fio job, as a "bench-blk:" line.
job() {
    name=\$1
    shift
    case " $bench_jobs " in
    *" \$name "*) ;;
    *) return ;;
    esac
    [ "${5:-0}" != 1 ] || irqs >/tmp/bench-blk-irq0
    if ! out=\$($1 --name="\$name" --filename=$2 --direct=$4 \\
        --ioengine=libaio --group_reporting --output-format=terse \\
        --terse-version=3 "\$@" 2>/tmp/bench-blk-err); then
        echo "bench-blk: error \$name: \$(head -c 300 /tmp/bench-blk-err)"
        return
    fi
    echo "\$out" | awk -F';' -v n="\$name" '{
        printf "bench-blk: %s read_kibps=%s read_iops=%s write_kibps=%s write_iops=%s\\n",
            n, \$7, \$8, \$48, \$49 }'
    [ "${5:-0}" != 1 ] || irqs | awk -v n="\$name" 'NR == FNR { before[\$1] = \$2; next }
        \$2 - before[\$1] > 0 { printf "bench-blk: detail %s irq %s %d\\n", n, \$1, \$2 - before[\$1] }' \\
        /tmp/bench-blk-irq0 -
}
job seqwrite --rw=write --bs=1M --iodepth=4 --size=${3}M
job seqread --rw=read --bs=1M --iodepth=4 --size=${3}M
job randread --rw=randread --bs=4k --iodepth=32 --size=${3}M --runtime=10 --time_based
job randwrite --rw=randwrite --bs=4k --iodepth=32 --size=${3}M --runtime=10 --time_based
job randread1 --rw=randread --bs=4k --iodepth=1 --size=${3}M --runtime=10 --time_based
job randwrite1 --rw=randwrite --bs=4k --iodepth=1 --size=${3}M --runtime=10 --time_based
JOBS
}

# write_guest_init FILE SIZE_MIB: the benchmark image's /sbin/init.
write_guest_init() {
    cat >"$1" <<INIT
#!/bin/sh
export PATH=/bin:/sbin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
echo "bench-blk: start \$(nproc) vCPUs, vdb \$((\$(cat /sys/block/vdb/size) / 2048)) MiB"
INIT
    write_jobs /opt/tools/fio /dev/vdb "$2" 1 "${BENCH_DETAIL:-0}" >>"$1"
    cat >>"$1" <<INIT
# Firecracker has no ACPI: its guest ends through the i8042 reset.
if grep -q bench_end=reboot /proc/cmdline; then reboot -f; fi
poweroff -f
INIT
    chmod 755 "$1"
}

# write_runner FILE: the script that boots the benchmark VM BENCH_RUNS times
# with each VMM, alternating (on the host in direct mode, in L1 in nested
# mode). POSIX sh. Prints the guest's lines as "bench-blk: VMM JOB ...".
write_runner() {
    cat >"$1" <<'RUNNER'
#!/bin/sh
# Env: CAPSULE [CAPSULE_BASE] QEMU QEMU_FW BZIMAGE VMLINUX BENCH_ROOT DATA_DIR BENCH_RUNS
#      BENCH_SIZE VMMS (the columns to run) TOOLS (where the peers are)
#      VM_TIMEOUT (seconds per VM run)
#      LIMIT_JOBS (the jobs for the `limit` column, copied to DATA_DIR)
set -u
CMDLINE="console=ttyS0 reboot=k panic=1 root=/dev/vda ro quiet"
data="$DATA_DIR/bench-data.img"
cat >"$DATA_DIR/fc.json" <<EOF
{
  "boot-source": { "kernel_image_path": "$VMLINUX", "boot_args": "$CMDLINE bench_end=reboot" },
  "drives": [
    { "drive_id": "root", "path_on_host": "$BENCH_ROOT", "is_root_device": false, "is_read_only": true },
    { "drive_id": "data", "path_on_host": "$data", "is_root_device": false, "is_read_only": false }
  ],
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 512 }
}
EOF
cp "$LIMIT_JOBS" "$DATA_DIR/limit-jobs.sh"
# The same with the data drive on Firecracker's io_uring engine.
sed 's|"path_on_host": "'"$data"'", |&"io_engine": "Async", |' "$DATA_DIR/fc.json" \
    >"$DATA_DIR/fc-async.json"
# boot VMM: one benchmark VM; the guest's lines on stdout (in a subshell
# of its own, which becomes the VMM: run_one's timeout kills the VMM).
boot() {
    case "$1" in
    capsule | capsule-base)
        bin="$CAPSULE"
        [ "$1" = capsule ] || bin="$CAPSULE_BASE"
        exec "$bin" run --kernel "$VMLINUX" --cpus 2 --memory 512M --transport mmio \
            --disk "$BENCH_ROOT,ro" --disk "$data" --cmdline "$CMDLINE" </dev/null
        ;;
    capsule-uring)
        exec "$CAPSULE" run --kernel "$VMLINUX" --cpus 2 --memory 512M --transport mmio \
            --disk "$BENCH_ROOT,ro" --disk "$data,engine=io_uring" --cmdline "$CMDLINE" </dev/null
        ;;
    capsule-pci)
        exec "$CAPSULE" run --kernel "$VMLINUX" --cpus 2 --memory 512M --transport pci \
            --disk "$BENCH_ROOT,ro" --disk "$data" --cmdline "$CMDLINE" </dev/null
        ;;
    firecracker-async)
        exec "$TOOLS/firecracker" --no-api --no-seccomp --config-file "$DATA_DIR/fc-async.json" </dev/null
        ;;
    firecracker)
        exec "$TOOLS/firecracker" --no-api --no-seccomp --config-file "$DATA_DIR/fc.json" </dev/null
        ;;
    cloud-hypervisor)
        # image_type=raw: with the format probed (its default), it refuses
        # the guest's writes to sector 0 of a raw image (EIO), which the
        # sequential write job starts with.
        exec "$TOOLS/cloud-hypervisor" --kernel "$VMLINUX" --cmdline "$CMDLINE" \
            --cpus boot=2 --memory size=512M --serial tty --console off \
            --disk path="$BENCH_ROOT",readonly=on,image_type=raw path="$data",image_type=raw </dev/null
        ;;
    limit)
        # No VM: fio on the data file from the harness's host itself.
        exec sh "$DATA_DIR/limit-jobs.sh"
        ;;
    *)
        # Same devices, same order: virtio-blk over virtio-mmio, the host
        # page cache in between (QEMU's default cache=writeback).
        exec "$QEMU" -M microvm -accel kvm -cpu host -m 512M -smp 2 \
            -nodefaults -no-user-config -display none -no-reboot -L "$QEMU_FW" \
            -serial stdio -kernel "$BZIMAGE" -append "$CMDLINE" \
            -drive id=root,file="$BENCH_ROOT",format=raw,if=none,readonly=on \
            -drive id=data,file="$data",format=raw,if=none \
            -device virtio-blk-device,drive=root -device virtio-blk-device,drive=data \
            </dev/null
        ;;
    esac
}
# run_one VMM: boot VMM, killed after VM_TIMEOUT seconds: a VMM whose
# guest hangs must not hold the bench (and the harness) for the rest of its
# time limit.
run_one() {
    boot "$1" &
    b=$!
    s=""
    if [ "${DETAIL:-0}" = 1 ]; then
        # A sample taken as the VM goes (its counters gone) is not kept.
        (
            while kill -0 "$b" 2>/dev/null; do
                kvm_stats >"$DATA_DIR/kvm.tmp"
                ! grep -q '^exits [1-9]' "$DATA_DIR/kvm.tmp" || mv "$DATA_DIR/kvm.tmp" "$DATA_DIR/kvm.last"
                sleep 1
            done
        ) </dev/null >/dev/null 2>&1 &
        s=$!
        # Off the CPU the VMM is pinned to: there, this loop's once-a-
        # second work cost capsule's sequential rows about 30 %.
        kvm_unpinned "$s"
    fi
    (
        sleep "$VM_TIMEOUT" >/dev/null 2>&1
        # capsule logs its queues and vCPUs on SIGUSR2 (on stderr, which
        # the session log keeps): where the hung run stood.
        case "$1" in capsule*) kill -USR2 "$b" 2>/dev/null && sleep 3 ;; esac
        kill -9 "$b" 2>/dev/null && echo "bench-blk: error timeout: no end after $VM_TIMEOUT s"
    ) &
    w=$!
    wait "$b"
    kill "$w" 2>/dev/null
    [ -z "$s" ] || wait "$s"
}
i=0
# kvm_stats: "NAME VALUE" of each of KVM's global counters (debugfs),
# which sum over the VMs that exist: sampled while the one VM runs.
D=/sys/kernel/debug
kvm_stats() {
    grep -s '' "$D"/kvm/* | sed -n 's|^.*/\([^/:]*\):\([0-9]*\)$|\1 \2|p'
}
[ "${DETAIL:-0}" != 1 ] || [ -d "$D/kvm" ] || mount -t debugfs debugfs "$D" 2>/dev/null
# TRACE=1: L1's KVM tracepoints into its ring buffer; after a run whose
# guest shut down (a triple fault), the events before the shutdown.
# shellcheck source=resources/kvm-host.sh
. "$(dirname "$0")/kvm-host.sh"
[ "${TRACE:-0}" != 1 ] || kvm_trace_start bench-blk:
kvm_pin bench-blk:
while [ "$i" -lt "$BENCH_RUNS" ]; do
    i=$((i + 1))
    for vmm in $VMMS; do
        rm -f "$data"
        dd if=/dev/zero of="$data" bs=1048576 count="$BENCH_SIZE" 2>/dev/null
        echo "bench-blk: run $i $vmm"
        [ "${TRACE:-0}" != 1 ] || kvm_trace_clear
        rm -f "$DATA_DIR/kvm.last"
        run_one "$vmm" | tr -d '\r' | grep '^bench-blk:' | sed "s/^bench-blk: /bench-blk: $vmm /"
        # L1's KVM counters over the whole run (boot and every job, up to
        # the last sample, at most a second before the VM ended).
        [ ! -s "$DATA_DIR/kvm.last" ] || awk -v v="$vmm" '$2 > 0 {
            printf "bench-blk: %s detail run kvm %s %d\n", v, $1, $2 }' "$DATA_DIR/kvm.last"
        [ "${TRACE:-0}" != 1 ] || kvm_trace_shutdown bench-blk: "$vmm run $i" "${TRACE_LINES:-150}"
    done
    rm -f "$data"
done
RUNNER
    chmod 755 "$1"
}

# finished_runs: of a runner's output on stdin, the lines of the VM runs
# that finished, each complete one (every job's line) followed by a
# "bench-blk: VMM done" line; a run with an error line keeps it (and is
# run again). The last run is left out if L1 died in its middle. A run
# that ended early otherwise (its guest reset, its VMM exited) leaves one
# "VMM ended after K of N jobs" line instead of its jobs, and is run
# again. A guest that booted twice in one run (a reset its VMM survives)
# is measured from its last boot.
finished_runs() {
    awk -v want="$(wc -w <<<"$bench_jobs")" '
        function flush(last) {
            if (vmm == "") return
            if (jobs == want && !err) printf "%sbench-blk: %s done\n", block, vmm
            else if (err) printf "%s", block
            else if (!last) printf "bench-blk: %s ended after %d of %d jobs\n", vmm, jobs, want
        }
        /^bench-blk: run [0-9]+ / { flush(0); vmm = $4; block = ""; jobs = 0; err = 0; next }
        vmm != "" && index($0, "bench-blk: " vmm " ") == 1 {
            if ($3 == "start") { block = ""; jobs = 0; err = 0; next }
            block = block $0 "\n"
            if ($3 == "error") err = 1
            else if ($3 != "detail") jobs++
        }
        END { flush(1) }'
}

# complete_runs VMM FILE: VM runs of VMM in FILE with every job's line.
complete_runs() {
    grep -c "^bench-blk: $1 done$" "$2" || true
}

# detail: with BENCH_DETAIL's lines in $results, the interrupts the guest
# took per job, median over each VMM's runs (lines of 50 or more).
detail() {
    local lines key m
    lines="$(sed -n 's/^bench-blk: \([a-z-]*\) detail \([a-z0-9]*\) \(irq\|kvm\) \([^ ]*\) \([0-9]*\)$/\1 \2 \3:\4 \5/p' "$results")"
    [[ -n "$lines" ]] || return 0
    echo "per job: the interrupts the guest took (irq:, /proc/interrupts summed over vCPUs); per VM run (\"run\"): L1's KVM counters (kvm:, debugfs); medians over the runs:"
    while read -r key; do
        read -r -a m <<<"$(awk -v k="$key" '$1 " " $2 " " $3 == k { print $4 }' <<<"$lines" | min_median_max %.0f)"
        [[ ${m[1]} -lt 50 ]] || printf '  %-18s %-10s %-28s %10s\n' $key "${m[1]}"
    done < <(cut -d' ' -f1-3 <<<"$lines" | sort -u)
}

# table: the table of $results (every VM run's lines) for the columns
# $vmms, with $peers, $mode, $size and $runs as run.
table() {
    local vmm n
    echo
    echo "virtio-blk inside the guest, capsule beside each peer (fio, O_DIRECT, libaio, /dev/vdb ${size} MiB; 2 vCPUs, 512 MiB; mode=$mode; VM runs per column in parentheses, alternating)"
    [[ -n "$peers" ]] || echo "(Firecracker and Cloud Hypervisor not found in $(capsule_anchors_dir): their columns are left out)"
    printf '%-34s' "measurement (min / median / max)"
    for vmm in $vmms; do
        n="$(complete_runs "$vmm" "$results")"
        printf ' %20s' "$vmm ($n)"
    done
    # short VMM: the ratio columns' names.
    short() {
        case "$1" in
        firecracker) echo fc ;; firecracker-async) echo fca ;; cloud-hypervisor) echo ch ;;
        capsule) echo c ;; capsule-uring) echo u ;; capsule-pci) echo p ;; capsule-base) echo b ;; *) echo "$1" ;;
        esac
    }
    for vmm in $vmms; do [[ $vmm == capsule* ]] || printf ' %7s' "c/$(short "$vmm")"; done
    for vmm in $vmms; do [[ $vmm != capsule* ]] || printf ' %7s' "$(short "$vmm")/best"; done
    echo
    # ratio A B: A / B with two decimals, "-" without both.
    ratio() {
        awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0 && a != "-" && a != "") printf "%.2f", a / b; else print "-" }'
    }
    row() { # LABEL JOB FIELD DIVISOR
        local x cm="" best="" c=() i=0
        printf '%-34s' "$1"
        for vmm in $vmms; do
            read -r -a x <<<"$(sed -n "s/^bench-blk: $vmm $2 .*$3=\([0-9.]*\).*/\1/p" "$results" |
                awk -v d="$4" '{ print $1 / d }' | min_median_max %.0f)"
            case "$vmm" in
            capsule) cm="${x[1]}" ;;
            capsule-*) ;;
            limit) ;;
            *) best="$(awk -v a="$best" -v b="${x[1]}" \
                'BEGIN { if (b != "-" && (a == "" || b + 0 > a + 0)) print b; else print a }')" ;;
            esac
            c+=("${x[1]}")
            printf ' %20s' "${x[0]} / ${x[1]} / ${x[2]}"
        done
        for vmm in $vmms; do
            [[ $vmm == capsule* ]] || printf ' %7s' "$(ratio "$cm" "${c[$i]}")"
            i=$((i + 1))
        done
        i=0
        for vmm in $vmms; do
            [[ $vmm != capsule* ]] || printf ' %7s' "$(ratio "${c[$i]}" "${best:--}")"
            i=$((i + 1))
        done
        echo
    }
    row "sequential write, MiB/s (1 MiB)" seqwrite write_kibps 1024
    row "sequential read, MiB/s (1 MiB)" seqread read_kibps 1024
    row "random read, IOPS (4 KiB, QD 32)" randread read_iops 1
    row "random write, IOPS (4 KiB, QD 32)" randwrite write_iops 1
    row "random read, IOPS (4 KiB, QD 1)" randread1 read_iops 1
    row "random write, IOPS (4 KiB, QD 1)" randwrite1 write_iops 1
    detail
    echo "(limit: fio on the data file in the harness's own host, no VM: the physical limit of each row; c/limit is capsule's share of it)"
    for vmm in $vmms; do
        n="$(grep -c "^bench-blk: $vmm ended after " "$results" || true)"
        [[ $n == 0 ]] || echo "($vmm: $n run(s) ended before their last job, the guest reset or the VMM gone; they were run again)"
    done
    return 0
}

main() {
    bench_jobs="${BENCH_JOBS:-seqwrite seqread randread randwrite randread1 randwrite1}"
    local j
    for j in $bench_jobs; do
        [[ " seqwrite seqread randread randwrite randread1 randwrite1 " == *" $j "* ]] ||
            die "BENCH_JOBS: unknown job '$j' (seqwrite seqread randread randwrite randread1 randwrite1)"
    done
    # BENCH_TABLE_ONLY=1: the table of BENCH_RESULTS, nothing run or built
    # (e.g. after sessions a dying harness cut short).
    if [[ "${BENCH_TABLE_ONLY:-}" == 1 ]]; then
        results="${BENCH_RESULTS:-}" size="${BENCH_SIZE:-256}" mode="(as run)"
        [[ -n "$results" && -r "$results" ]] || die "BENCH_TABLE_ONLY=1 needs a readable BENCH_RESULTS file"
        runs="$(complete_runs capsule "$results")"
        peers="$(grep -o '^bench-blk: \(firecracker\|firecracker-async\|cloud-hypervisor\) ' "$results" |
            sort -u | cut -d' ' -f2 | tr '\n' ' ')"
        vmms=""
        for vmm in capsule capsule-base capsule-uring capsule-pci qemu firecracker firecracker-async cloud-hypervisor limit; do
            grep -q "^bench-blk: $vmm " "$results" && vmms+="$vmm "
        done
        table
        return
    fi
    runs="${BENCH_RUNS:-5}"
    size="${BENCH_SIZE:-256}"
    [[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"
    [[ "$size" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SIZE must be a positive number of MiB"

    "$CAPSULE_RESOURCES_DIR/install-deps.sh" fio
    export CAPSULE_SKIP_DEPS=1
    capsule="$("$CAPSULE_RESOURCES_DIR/build-capsule.sh")"
    kdir="$("$CAPSULE_RESOURCES_DIR/build-guest-kernel.sh")"
    mode="$("$CAPSULE_RESOURCES_DIR/harness/mode.sh")"

    work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-blk.XXXXXX")"
    trap 'rm -rf "$work"' EXIT

    log "building the benchmark root image (busybox, fio)"
    root="$work/root"
    populate_busybox_root "$root"
    copy_tools "$root/opt/tools" fio
    write_guest_init "$root/sbin/init" "$size"
    image_mib=$(($(du -sm "$root" | cut -f1) + 32))
    truncate -s "${image_mib}M" "$work/bench-root.ext4"
    mkfs.ext4 -q -F -E root_owner=0:0 -d "$root" "$work/bench-root.ext4"
    write_runner "$work/bench-run.sh"
    cp "$CAPSULE_RESOURCES_DIR/kvm-host.sh" "$work/kvm-host.sh"
    copy_tools "$work/tools" qemu-system-x86_64 fio
    peers="$(copy_peers "$work/tools")"
    # Firecracker once more, with its io_uring engine on the data drive.
    if [[ " $peers " == *" firecracker "* ]]; then
        peers="${peers/firecracker/firecracker firecracker-async}"
    fi
    copy_qemu_firmware "$work/qemu-fw"

    {
        echo '#!/bin/sh'
        echo '# bench-blk: the jobs on the data file, no VM (the limit column).'
        # shellcheck disable=SC2016 # expanded by the runner
        write_jobs '$TOOLS/fio' '$DATA_DIR/bench-data.img' "$size" 0
    } >"$work/limit-jobs.sh"
    local base=""
    if [[ -n "${BENCH_CAPSULE_BASE:-}" ]]; then
        [[ -x "$BENCH_CAPSULE_BASE" ]] || die "BENCH_CAPSULE_BASE: $BENCH_CAPSULE_BASE is not an executable"
        cp "$BENCH_CAPSULE_BASE" "$work/capsule-base"
        base=capsule-base
    fi
    local vmms="${BENCH_VMMS:-capsule $base capsule-uring capsule-pci qemu $peers limit}" vmm
    [[ -n "$base" || " $vmms " != *" capsule-base "* ]] || die "BENCH_VMMS has capsule-base: set BENCH_CAPSULE_BASE"
    # A peer asked for by name but not found has no column (copy_peers
    # said why).
    for vmm in $vmms; do
        case "$vmm" in
        firecracker* | cloud-hypervisor)
            [[ " $peers " == *" $vmm "* ]] || vmms="$(tr ' ' '\n' <<<"$vmms" | grep -vx "$vmm" | tr '\n' ' ')"
            ;;
        esac
    done
    local vm_timeout="${BENCH_VM_TIMEOUT:-900}"
    [[ "$vm_timeout" =~ ^[1-9][0-9]*$ ]] || die "BENCH_VM_TIMEOUT must be a positive number of seconds"
    log "mode: $mode; $runs runs per VMM"
    results="$work/results"
    if [[ "$mode" == direct ]]; then
        CAPSULE="$capsule" CAPSULE_BASE="${base:+$work/capsule-base}" QEMU="$work/tools/qemu-system-x86_64" QEMU_FW="$work/qemu-fw" \
            BZIMAGE="$kdir/bzImage" VMLINUX="$kdir/vmlinux" BENCH_ROOT="$work/bench-root.ext4" \
            VMMS="$vmms" VM_TIMEOUT="$vm_timeout" TOOLS="$work/tools" LIMIT_JOBS="$work/limit-jobs.sh" \
            DATA_DIR="$work" BENCH_RUNS="$runs" BENCH_SIZE="$size" \
            sh "$work/bench-run.sh" | tee "$results" >&2
    else
        # The nested harness's L1 may die or hang (TCG): the VM runs that
        # finished are kept and a new L1 does the rest, up to 3 L1 sessions.
        : >"$results"
        local session need left rounds n
        for session in 1 2 3; do
            need="" rounds=0
            for vmm in $vmms; do
                left=$((runs - $(complete_runs "$vmm" "$results")))
                [[ $left -gt 0 ]] || continue
                need+=" $vmm"
                [[ $left -le $rounds ]] || rounds=$left
            done
            [[ -n "$need" ]] || break
            log "L1 session $session: $rounds round(s) of$need"
            cat >"$work/bench-l1.sh" <<EOF
#!/bin/sh
export CAPSULE=/capsule/capsule CAPSULE_BASE=/capsule/capsule-base BZIMAGE=/capsule/bzImage BENCH_ROOT=/capsule/bench-root.ext4
export QEMU=/capsule/tools/qemu-system-x86_64 QEMU_FW=/capsule/qemu-fw
export DATA_DIR=/tmp BENCH_RUNS=$rounds BENCH_SIZE=$size
export VMLINUX=/capsule/vmlinux VMMS='$need' VM_TIMEOUT=$vm_timeout TOOLS=/capsule/tools LIMIT_JOBS=/capsule/limit-jobs.sh
export TRACE=${BENCH_TRACE:-0} TRACE_LINES=${BENCH_TRACE_LINES:-150} DETAIL=${BENCH_DETAIL:-0}
export CAPSULE_PIN_CPU='${BENCH_PIN_CPU:-}'
exec sh /capsule/bench-run.sh
EOF
            n=$(wc -w <<<"$need")
            CAPSULE_L1_TIMEOUT=$((300 + rounds * 300 * n)) \
                "$CAPSULE_RESOURCES_DIR/harness/run-in-l1.sh" \
                "$work/bench-l1.sh" "$capsule" "$kdir/bzImage" "$kdir/vmlinux" "$work/bench-root.ext4" \
                "$work/bench-run.sh" "$work/tools" "$work/qemu-fw" "$work/limit-jobs.sh" "$work/kvm-host.sh" \
                ${base:+"$work/capsule-base"} </dev/null |
                tr -d '\r' | tee "$work/session.log" >&2 || true
            finished_runs <"$work/session.log" >>"$results"
        done
    fi
    grep '^bench-blk: [a-z-]* error' "$results" >&2 || true
    if grep -qE '^bench-blk: capsule(-uring|-pci)? error' "$results"; then
        die "a fio job failed in capsule"
    fi
    if [[ -n "${BENCH_RESULTS:-}" ]]; then
        grep '^bench-blk: ' "$results" >>"$BENCH_RESULTS" || true
        results="$BENCH_RESULTS"
        runs="$(complete_runs capsule "$results")"
    fi

    table
}

main "$@"
