# tests/boot/cases.d/disk.sh: virtio-blk boot cases (sourced by cases.sh).
#
# The guest's root file system is a copy of $ROOTFS (an ext4 image made by
# resources/build-guest-rootfs.sh with `mkfs.ext4 -d`), attached with
# --disk. What the guest wrote is checked on the image file afterwards with
# debugfs ($TOOLS/debugfs), and images that must not change are compared
# by checksum.

ALL_CASES="$ALL_CASES disk_root_write disk_ro disk_ephemeral disk_two disk_locked"

# Kernel command line for a root file system on the first disk.
DISK_CMDLINE_RW="console=ttyS0 reboot=k panic=1 root=/dev/vda rw"
DISK_CMDLINE_RO="console=ttyS0 reboot=k panic=1 root=/dev/vda ro"

# disk_copy CASE: a fresh copy of the root image for CASE; prints its path.
disk_copy() {
    _img="$WORK/$1.img"
    cp "$ROOTFS" "$_img" && echo "$_img"
}

# disk_prereqs: whether the root image and debugfs are there; if not, the
# case fails (it must not pass without running).
disk_prereqs() {
    if [ -n "${ROOTFS:-}" ] && [ -f "$ROOTFS" ] && [ -x "${TOOLS:-}/debugfs" ]; then
        return 0
    fi
    CASE_ERRORS="not run: ROOTFS (guest root image) or TOOLS/debugfs missing"
    SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
    return 1
}

# debugfs_cat IMAGE PATH: the contents of PATH in the ext4 IMAGE.
debugfs_cat() {
    "$TOOLS/debugfs" -R "cat $2" "$1" 2>/dev/null
}

md5_of() { md5sum "$1" | cut -d' ' -f1; }

file_in_image_is() { [ "$(debugfs_cat "$1" "$2")" = "$3" ]; }
file_not_in_image() { ! "$TOOLS/debugfs" -R "stat $2" "$1" 2>&1 | grep -q '^Inode:'; }
same_md5() { [ "$1" = "$2" ]; }
# The guest booted to its init with its root file system on /dev/vda.
root_on_vda() { out_has "EXT4-fs (vda): mounted filesystem" && out_has "$READY"; }
err_has() { grep -q -- "$1" "$ERR"; }

case_disk_root_write() {
    disk_prereqs || return
    _img="$(disk_copy disk_root_write)"
    run_capsule disk_root_write 'cat /root/hello.txt
echo "capsule-disk-data-$((40+2))" >/root/written.txt; sync; echo written-$((1+1))
echo serial=$(cat /sys/block/vda/serial)
poweroff -f' \
        run --kernel "$BZIMAGE" --cpus 1 --memory 256M --disk "$_img" --cmdline "$DISK_CMDLINE_RW"
    expect "exit status 0" rc_is 0
    expect "root file system on /dev/vda" root_on_vda
    expect "the image's own file read in the guest" out_has_line "written on the host by build-guest-rootfs.sh"
    expect "the guest wrote and synced" out_has_line "written-2"
    expect "GET_ID serial is the image's file name" out_has_line "serial=disk_root_write.img"
    expect "the written file is in the host image (debugfs)" \
        file_in_image_is "$_img" /root/written.txt "capsule-disk-data-42"
    expect "no Rust panic" no_rust_panic
}

case_disk_ro() {
    disk_prereqs || return
    _img="$(disk_copy disk_ro)"
    _before="$(md5_of "$_img")"
    run_capsule disk_ro 'echo ro=$(cat /sys/block/vda/ro)
echo x >/root/new.txt || echo write-refused-$((1+1))
mount -o remount,rw / || echo remount-refused-$((1+1))
dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync || echo dd-refused-$((1+1))
poweroff -f' \
        run --kernel "$BZIMAGE" --cpus 1 --memory 256M --disk "$_img,ro" --cmdline "$DISK_CMDLINE_RO"
    expect "exit status 0" rc_is 0
    expect "root file system on /dev/vda" root_on_vda
    expect "the guest sees a read-only disk" out_has_line "ro=1"
    expect "a file write fails" out_has_line "write-refused-2"
    expect "remounting read-write fails" out_has_line "remount-refused-2"
    expect "a raw write to /dev/vda fails" out_has_line "dd-refused-2"
    expect "the image is byte-identical" same_md5 "$_before" "$(md5_of "$_img")"
    expect "no Rust panic" no_rust_panic
}

case_disk_ephemeral() {
    disk_prereqs || return
    _img="$(disk_copy disk_ephemeral)"
    _before="$(md5_of "$_img")"
    run_capsule disk_ephemeral 'dd if=/dev/urandom of=/root/big.bin bs=1M count=8 2>/dev/null; sync
echo 3 >/proc/sys/vm/drop_caches; echo big=$(wc -c </root/big.bin)
echo "ephemeral-$((40+2))" >/root/e.txt; sync; echo 3 >/proc/sys/vm/drop_caches; cat /root/e.txt
poweroff -f' \
        run --kernel "$BZIMAGE" --cpus 1 --memory 256M --disk "$_img,ephemeral" --cmdline "$DISK_CMDLINE_RW"
    expect "exit status 0" rc_is 0
    expect "the guest wrote 8 MiB and read its size back" out_has_line "big=8388608"
    expect "the guest reads back its own write after dropping caches" out_has_line "ephemeral-42"
    expect "the image is byte-identical" same_md5 "$_before" "$(md5_of "$_img")"
    expect "debugfs reads the image" \
        file_in_image_is "$_img" /root/hello.txt "written on the host by build-guest-rootfs.sh"
    expect "the written file is not in the image" file_not_in_image "$_img" /root/e.txt
    expect "no Rust panic" no_rust_panic
}

case_disk_two() {
    disk_prereqs || return
    _img="$(disk_copy disk_two)"
    _data="$WORK/disk_two.data.img"
    head -c 4194304 /dev/urandom >"$_data"
    _data_md5="$(md5_of "$_data")"
    run_capsule disk_two 'echo vdb-sectors=$(cat /sys/block/vdb/size)
echo vdb-md5=$(md5sum </dev/vdb | cut -d" " -f1)
printf capsule-vdb-write | dd of=/dev/vdb bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null; echo vdb-written-$((1+1))
blkdiscard -o 0 -l 1048576 /dev/vdb && sync && echo vdb-discarded-$((1+1))
poweroff -f' \
        run --kernel "$BZIMAGE" --cpus 2 --memory 256M --disk "$_img" --disk "$_data" \
        --cmdline "$DISK_CMDLINE_RW"
    expect "exit status 0" rc_is 0
    expect "root file system on /dev/vda" root_on_vda
    expect "the second disk has 8192 sectors" out_has_line "vdb-sectors=8192"
    expect "the guest reads the second disk's bytes (md5)" out_has_line "vdb-md5=$_data_md5"
    expect "the guest wrote to the second disk" out_has_line "vdb-written-2"
    expect "the write is at offset 1 MiB of the host file" \
        [ "$(dd if="$_data" bs=512 skip=2048 count=1 2>/dev/null | head -c 17)" = "capsule-vdb-write" ]
    expect "the guest discarded the first MiB" out_has_line "vdb-discarded-2"
    expect "the discarded MiB reads as zeros in the host file" \
        cmp -s -n 1048576 "$_data" /dev/zero
    expect "no Rust panic" no_rust_panic
}

case_disk_locked() {
    disk_prereqs || return
    _t0=$(now)
    _img="$(disk_copy disk_locked)"
    # A first VM that has the image open (writable: an exclusive lock).
    _h="$WORK/disk_locked.holder"
    rm -rf "$_h"
    mkdir -p "$_h"
    mkfifo "$_h/in"
    exec 7<>"$_h/in"
    timeout -k 10 "$CASE_TIMEOUT" "$CAPSULE" run --kernel "$BZIMAGE" --initrd "$INITRD" \
        --cpus 1 --memory 128M --disk "$_img" <"$_h/in" >"$_h/out" 2>"$_h/err" &
    _holder=$!
    _holder_ready=0
    if wait_for "$_h/out" "$READY" "$CASE_TIMEOUT" "$_h/never"; then _holder_ready=1; fi

    # A second VM asking for the same image, read-only: a shared lock
    # conflicts with the first VM's exclusive one too.
    run_capsule disk_locked_ro '' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 128M --disk "$_img,ro"
    _ro_rc=$RC
    _ro_err="$(cat "$ERR")"
    run_capsule disk_locked '' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 128M --disk "$_img"

    printf 'poweroff -f\n' >&7
    _holder_rc=0
    wait "$_holder" || _holder_rc=$?
    exec 7>&-
    SECS=$(($(now) - _t0))
    if [ "$_holder_ready" -ne 1 ]; then
        # What the holder printed, for the report (it is not OUT or ERR).
        {
            echo "--- the first VM (holder), status $_holder_rc: last console lines ---"
            tr -d '\r' <"$_h/out" | tail -n 15
            echo "--- its stderr ---"
            tail -n 10 "$_h/err"
        } >>"$ERR"
    fi

    expect "the first VM booted with the image" [ "$_holder_ready" -eq 1 ]
    expect "a second writable VM: exit status 1" rc_is 1
    expect "a second writable VM: exactly one 'capsule: error:' line" one_error_line
    expect "the error names the image and says it is in use" err_has "$_img is in use"
    expect "a second read-only VM: exit status 1" [ "$_ro_rc" -eq 1 ]
    expect "a second read-only VM: the error says the image is in use" \
        eval 'printf "%s\n" "$_ro_err" | grep -q "is in use"'
    expect "the first VM ran on and exited 0" [ "$_holder_rc" -eq 0 ]
    expect "no Rust panic" no_rust_panic
}
