# shellcheck shell=sh
# tests/boot/cases.d/kernel_map.sh: an ELF kernel mapped from its file
# instead of copied (src/kernel_map.rs; opt-in, CAPSULE_KERNEL_MAP=1),
# sourced by tests/boot/cases.sh; POSIX sh for busybox ash in L1. Uses
# snapshot.sh's snap_* helpers.
#
# kernel_map_rewrite: a VM boots a copy of $VMLINUX, mapped from the file
# under a read lease; the file is then rewritten in place with random
# bytes while the guest runs. The rewrite's open waits until capsule has
# copied the kernel into guest RAM and let the lease go, and the guest
# runs on (its kernel text is still the file's old bytes: without the
# copy it would have run random bytes, or faulted on the truncated file).
#
# kernel_map_snapshot: a VM whose kernel is mapped is snapshotted at once
# (most of the kernel's pages never faulted in, which the memory file
# would leave out as zero); the clone restored from it runs commands and
# powers off.

ALL_CASES="$ALL_CASES kernel_map_rewrite kernel_map_snapshot"

# kmap_boot CASE: starts a named VM on a copy of $VMLINUX in $SNAP_DIR
# (fresh), waits for its prompt; sets KMAP_PID, KMAP_NAME, KMAP_START and
# KMAP_FILE. Returns 1 (the case given up) if it does not boot.
kmap_boot() {
    snap_fresh "$1"
    KMAP_START=$(now)
    KMAP_FILE="$SNAP_DIR/vmlinux"
    KMAP_NAME="kmap$$"
    cp "$VMLINUX" "$KMAP_FILE"
    # The map is opt-in: the copy is the default.
    export CAPSULE_KERNEL_MAP=1
    snap_start orig run --name "$KMAP_NAME" --kernel "$KMAP_FILE" --initrd "$INITRD" \
        --cpus 2 --memory 256M --cmdline "$SNAP_CMDLINE"
    KMAP_PID=$SNAP_PID
    unset CAPSULE_KERNEL_MAP
    if ! snap_wait orig "$READY" "$CASE_TIMEOUT"; then
        snap_give_up "the VM did not boot" "$KMAP_PID" "$KMAP_START"
        return 1
    fi
    snap_wait orig "$PROMPT" 15 || true
    expect "the kernel was mapped from its file" \
        grep -q "KiB mapped from $KMAP_FILE (read lease held)" "$ERR"
}

# kmap_work TAG PID: types a loop of commands on TAG's console and expects it
# to finish, then a power-off, and waits for PID (its capsule); sets RC
# to its exit status.
kmap_work() {
    snap_type "$1" 'i=0; while [ $i -lt 200 ]; do cat /proc/version /proc/cpuinfo >/dev/null; i=$((i+1)); done; echo LOOP-$i'
    expect "$1: the guest runs commands" snap_wait "$1" "^LOOP-200" 120
    snap_type "$1" 'poweroff -f'
    wait "$2"
    RC=$?
    expect "$1: exit status 0 (got $RC)" [ "$RC" -eq 0 ]
    expect "$1: no Rust panic" sh -c "! grep -q 'panicked at' '$SNAP_DIR/$1.raw' '$SNAP_DIR/$1.err'"
    expect "$1: no guest kernel oops or WARNING" \
        sh -c "! tr -d '\r' <'$SNAP_DIR/$1.raw' | grep -q 'WARNING: CPU:\|Oops\|general protection'"
}

case_kernel_map_rewrite() {
    kmap_boot kernel_map_rewrite || return
    _t0=$(uptime_ms)
    head -c 12582912 /dev/urandom >"$KMAP_FILE"
    _t1=$(uptime_ms)
    echo "kernel_map_rewrite: the rewrite's open waited for capsule; it took $((_t1 - _t0)) ms in all"
    expect "capsule copied the kernel and released the file before the rewrite" \
        grep -q 'kernel file opened for writing elsewhere' "$ERR"
    expect "the lease was released" \
        grep -q 'mapped pages copied into guest RAM; file lease released' "$ERR"
    kmap_work orig "$KMAP_PID"
    touch "$SNAP_DIR/done"
    SECS=$(($(now) - KMAP_START))
}

case_kernel_map_snapshot() {
    kmap_boot kernel_map_snapshot || return
    snap_save_stop "$KMAP_NAME" "$KMAP_PID" "$KMAP_START" || return
    expect "the snapshot copied the mapped kernel first" \
        grep -q 'mapped pages copied into guest RAM; file lease released' "$ERR"
    # The file may change now: the clone reads its memory file only.
    head -c 4096 /dev/urandom >"$KMAP_FILE"
    snap_start c1 run --restore "$SNAP_DIR/snap"
    _c1=$SNAP_PID
    sleep 1
    kmap_work c1 "$_c1"
    touch "$SNAP_DIR/done"
    SECS=$(($(now) - KMAP_START))
    OUT="$SNAP_DIR/c1.raw" ERR="$SNAP_DIR/c1.err"
}
