# tests/boot/cases.d/disk_uring.sh: virtio-blk with engine=io_uring (sourced
# by cases.sh; uses disk.sh's helpers).
#
# disk_uring boots with its root file system and a data disk both on the
# io_uring engine, writes random data through the file system and raw to
# the data disk (fsync), reads it back after dropping the guest's caches,
# runs parallel direct reads (several requests in flight), and checks the
# checksums the guest printed against the host's files once the VM ended.
# disk_uring_refused: engine=io_uring on an ephemeral disk is refused at
# start with one error line, and so is engine=io_uring while the kernel
# has io_uring disabled (kernel.io_uring_disabled=2 for the moment of the
# run; the L1 is the harness's own machine): no silent fallback to the
# synchronous engine.

# shellcheck disable=SC2016  # $... in guest commands is for the guest shell
ALL_CASES="$ALL_CASES disk_uring disk_uring_refused"

# uring_md5 NAME: the checksum the guest printed as NAME=<md5>.
uring_md5() {
    sed -n "s/^$1=\([0-9a-f]\{32\}\)\$/\1/p" "$OUT" | tail -n 1
}

case_disk_uring() {
    disk_prereqs || return
    _img="$(disk_copy disk_uring)"
    _data="$WORK/disk_uring.data.img"
    head -c 16777216 /dev/urandom >"$_data"
    # The device logs its engine at info level (the runner puts
    # CAPSULE_LOG back after the case).
    export CAPSULE_LOG="${CAPSULE_LOG:-warn},devices::virtio::block=info"
    run_capsule disk_uring 'dd if=/dev/urandom of=/root/r.bin bs=1M count=8 2>/dev/null; sync; echo fs-$((1+1))
echo w=$(md5sum </root/r.bin | cut -d" " -f1)
dd if=/root/r.bin of=/dev/vdb bs=1M conv=fsync 2>/dev/null; echo vdb-written-$((1+1))
echo 3 >/proc/sys/vm/drop_caches
echo fsback=$(md5sum </root/r.bin | cut -d" " -f1)
echo vdbback=$(head -c 8388608 /dev/vdb | md5sum | cut -d" " -f1)
for i in 0 1 2 3 4 5 6 7; do dd if=/dev/vdb of=/dev/null bs=256k skip=$((i*8)) count=8 iflag=direct 2>/dev/null & done; wait; echo parallel-$((1+1))
echo tail=$(dd if=/dev/vdb bs=1M skip=8 count=8 2>/dev/null | md5sum | cut -d" " -f1)
poweroff -f' \
        run --kernel "$BZIMAGE" --cpus 2 --memory 256M --disk "$_img,engine=io_uring" \
        --disk "$_data,engine=io_uring" --cmdline "$DISK_CMDLINE_RW"
    _w="$(uring_md5 w)"
    expect "exit status 0" rc_is 0
    expect "root file system on /dev/vda" root_on_vda
    expect "both disks on the io_uring engine" \
        [ "$(grep -c 'io_uring engine' "$ERR")" -eq 2 ]
    expect "the guest wrote 8 MiB through ext4 and synced" out_has_line "fs-2"
    expect "the guest printed the data's md5" [ -n "$_w" ]
    expect "the guest wrote it raw to vdb with fsync" out_has_line "vdb-written-2"
    expect "ext4 reads it back after drop_caches" [ "$(uring_md5 fsback)" = "$_w" ]
    expect "vdb reads it back after drop_caches" [ "$(uring_md5 vdbback)" = "$_w" ]
    expect "8 parallel direct readers finished" out_has_line "parallel-2"
    expect "vdb's untouched second half reads as on the host" \
        [ "$(uring_md5 tail)" = "$(dd if="$_data" bs=1M skip=8 count=8 2>/dev/null | md5sum | cut -d' ' -f1)" ]
    expect "the host's data file has the data (md5)" \
        [ "$(head -c 8388608 "$_data" | md5sum | cut -d' ' -f1)" = "$_w" ]
    expect "the host's root image has the file (debugfs, md5)" \
        [ "$(debugfs_cat "$_img" /root/r.bin | md5sum | cut -d' ' -f1)" = "$_w" ]
    expect "no Rust panic" no_rust_panic
}

case_disk_uring_refused() {
    disk_prereqs || return
    _img="$(disk_copy disk_uring_refused)"
    _before="$(md5_of "$_img")"
    run_capsule disk_uring_refused '' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 128M \
        --disk "$_img,ephemeral,engine=io_uring"
    expect "exit status 1" rc_is 1
    expect "exactly one 'capsule: error:' line" one_error_line
    expect "the error names the image and the way out" \
        eval 'grep "^capsule: error:" "$ERR" | grep -q "$_img.*engine=sync"'
    expect "the image is untouched" same_md5 "$_before" "$(md5_of "$_img")"
    expect "no Rust panic" no_rust_panic

    _sysctl=/proc/sys/kernel/io_uring_disabled
    _was="$(cat "$_sysctl" 2>/dev/null || echo missing)"
    if [ "$_was" = missing ] || ! echo 2 >"$_sysctl"; then
        expect "kernel.io_uring_disabled can be set (Linux 6.6 or later, root)" false
        return
    fi
    run_capsule disk_uring_disabled '' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 128M \
        --disk "$_img,engine=io_uring"
    echo "$_was" >"$_sysctl"
    expect "io_uring disabled: exit status 1" rc_is 1
    expect "io_uring disabled: exactly one 'capsule: error:' line" one_error_line
    expect "io_uring disabled: the error says io_uring is unavailable" \
        eval 'grep "^capsule: error:" "$ERR" | grep -q "io_uring is unavailable.*engine=sync"'
    expect "io_uring disabled: the guest never ran" eval '! out_has "$READY"'
    expect "io_uring disabled: no Rust panic" no_rust_panic
}
