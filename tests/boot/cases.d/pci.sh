# shellcheck shell=sh
# tests/boot/cases.d/pci.sh: the virtio-pci transport (sourced by cases.sh).
#
# pci_blk_net boots with `--transport pci`, the root file system on a
# virtio-blk disk (a copy of $ROOTFS, as in disk.sh) and a virtio-net NIC
# on TAP (as in net.sh), and checks in the guest that both are PCI
# functions driven by virtio-pci with MSI-X interrupts, that the disk
# reads and writes (checked on the image afterwards) and that the NIC
# pings the host. It also checks that Linux took the ECAM window the MCFG
# table announces (found reserved, not refused) and reached the host
# bridge's extended configuration space through it.
#
# pci_snapshot boots the same machine (TAP NIC, root on a copy of $ROOTFS),
# writes a file, has its PCI-MSI interrupt counts printed, is snapshotted
# (`capsule snapshot NAME DIR --stop`: pause, PUT /snapshot/create, kill)
# and restored into a new capsule process (`run --restore DIR`, resumed):
# the restored guest reads the file written before, writes and syncs
# another (found in the image afterwards), drops its caches and reads
# again, pings the host through the re-created TAP (its neighbour cache
# flushed: the new TAP has a new MAC address), and its MSI-X counts
# on the block request queue and the net receive queue grew past those
# printed before the snapshot.

# pci_vhost_net boots a busybox initramfs with `--transport pci` and one
# NIC on a TAP with `vhost=on`: the guest sees a virtio-pci function with
# MSI-X, pings the host and moves 16 MiB each way over TCP (md5-checked)
# with L1's vhost-net moving the frames, and its receive and transmit
# queues counted MSI-X interrupts. Meanwhile the host asks for a snapshot
# of the running VM (`capsule snapshot NAME DIR`), which is refused with
# the reason (vhost-net holds the rings), and the VM goes on (a TCP
# connection from the host after the refusal reaches the guest). Last,
# the guest unbinds the function from virtio-pci and binds it again (the
# driver resets the device and sets it up anew): the rings go back to
# vhost-net and the NIC pings the host again.
#
# pci_virtiofs shares a host directory (`--fs`, a virtiofsd) over PCI:
# the guest mounts it, reads a file made before boot, writes one that the
# host sees while the VM runs and reads the host's answer; the function is
# a virtio-pci virtio-fs device whose request queue counted MSI-X
# interrupts, and a snapshot asked for meanwhile is refused (virtio-fs has
# no saved state) without harm to the VM. Then the guest unmounts it,
# unbinds and binds the function again (a device reset and a new
# activation: virtiofsd gets the rings anew) and reads the file again.

# shellcheck disable=SC2016  # $(...) in case inputs is for the guest shell
ALL_CASES="$ALL_CASES pci_blk_net pci_snapshot pci_vhost_net pci_virtiofs"

# pci_functions_are_virtio: the guest listed two virtio functions (vendor
# 0x1af4, modern ids 0x1041 net, 0x1042 block) bound to virtio-pci.
pci_functions_are_virtio() {
    out_has_line "pcidev=0x1af4:0x1042:virtio-pci" && out_has_line "pcidev=0x1af4:0x1041:virtio-pci"
}

# pci_msix_used QUEUE: the guest's /proc/interrupts (printed after the
# disk and network traffic) has a PCI-MSI line (PCI-MSIX on newer
# kernels) for a virtio QUEUE ("req" or "input") that counted interrupts.
pci_msix_used() {
    awk -v q="$1" '/PCI-MSI/ && $NF ~ "^virtio[0-9]+-" q {
        n = 0
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
        if (n > 0) found = 1
    } END { exit !found }' "$OUT"
}

case_pci_blk_net() {
    disk_prereqs || return
    net_prepare
    tap_up cappci0 10.0.9.1/24
    _img="$(disk_copy pci_blk_net)"
    run_capsule pci_blk_net 'for d in /sys/bus/pci/devices/*; do echo pcidev=$(cat $d/vendor):$(cat $d/device):$(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null); done
cat /root/hello.txt
dmesg | grep -E "MMCONFIG|ECAM|PNP0C02" | sed "s/^/ecam-dmesg: /"
grep -i mmconfig /proc/iomem | sed "s/^/ecam-iomem: /"
hb=/sys/bus/pci/devices/0000:00:00.0/config; echo hostbridge-config=$(wc -c <$hb) hostbridge-ext=$(od -An -tx4 -j256 -N4 $hb | tr -d " ")
dd if=/dev/vda of=/dev/null bs=1M count=16 2>/dev/null && echo read-$((1+1))
echo "capsule-pci-data-$((40+2))" >/root/written.txt; sync; echo written-$((1+1))
ip addr add 10.0.9.2/24 dev eth0; ip link set eth0 up; ping -c 3 -w 30 10.0.9.1 </dev/null && echo PING-OK
grep -E "PCI-MSI|virtio" /proc/interrupts
poweroff -f' \
        run --kernel "$BZIMAGE" --cpus 2 --memory 256M --transport pci --disk "$_img" \
        --net tap=cappci0 --cmdline "$DISK_CMDLINE_RW"
    expect "exit status 0" rc_is 0
    expect "root file system on /dev/vda" root_on_vda
    expect "both devices are virtio-pci functions" pci_functions_are_virtio
    expect "MSI-X interrupts on the block request queue" pci_msix_used req
    expect "MSI-X interrupts on the net receive queue" pci_msix_used input
    expect "the image's own file read in the guest" out_has_line "written on the host by build-guest-rootfs.sh"
    expect "16 MiB read from the disk" out_has_line "read-2"
    expect "the guest wrote and synced" out_has_line "written-2"
    expect "the written file is in the host image (debugfs)" \
        file_in_image_is "$_img" /root/written.txt "capsule-pci-data-42"
    expect "guest pings the host over TAP" out_has_line "PING-OK"
    expect "no Rust panic" no_rust_panic
    expect "no kernel warning" no_kernel_warning
    expect "the kernel kept the BARs capsule assigned" pci_bars_kept
    expect "Linux uses the MCFG's ECAM window, found reserved" pci_ecam_used
    expect "the host bridge's extended configuration space read through ECAM" \
        out_has_line "hostbridge-config=4096 hostbridge-ext=00000000"
    # What the guest said about ECAM, for the log.
    grep -E "^(ecam-dmesg|ecam-iomem|hostbridge-config)" "$OUT" | sed 's/^/pci_blk_net: /'
}

# pci_ecam_used: the guest's dmesg (printed with an "ecam-dmesg: " prefix)
# says Linux 6.1 took the MCFG's ECAM window of bus 0 (capsule's
# layout::PCI_ECAM_START, 1 MiB) and found it reserved, and nothing says
# it was refused or left unused.
pci_ecam_used() {
    _ecam="[mem 0xf0000000-0xf00fffff]"
    grep -F "ecam-dmesg: " "$OUT" >"$OUT.ecam"
    grep -qF "PCI: MMCONFIG for domain 0000 [bus 00-00] at $_ecam" "$OUT.ecam" &&
        grep -qF "MMCONFIG at $_ecam reserved in" "$OUT.ecam" &&
        ! grep -qE "MMCONFIG.*not reserved|not using MMCONFIG|MMCONFIG is disabled|only partially covers|ECAM.*not reserved" "$OUT"
}

# pci_bars_kept: the guest kernel claimed every BAR where capsule put it
# (inside the root bridge's window): no reassignment, no failure.
pci_bars_kept() {
    out_has "PCI0" && ! grep -qE "can't claim|no space for|failed to assign|BAR [0-9]+: assigned" "$OUT"
}

# pci_msi_count FILE NAME: the number the guest printed as NAME=N in FILE.
pci_msi_count() {
    tr -d '\r' <"$1" | sed -n "s/^$2=\([0-9][0-9]*\)\$/\1/p" | tail -n 1
}

# pci_grew A B: both are numbers and B > A.
pci_grew() {
    [ -n "$1" ] && [ -n "$2" ] && [ "$2" -gt "$1" ]
}

case_pci_snapshot() {
    disk_prereqs || return
    SNAP_DIR="$WORK/pci_snapshot"
    rm -rf "$SNAP_DIR"
    mkdir -p "$SNAP_DIR"
    OUT="$SNAP_DIR/orig.raw" ERR="$SNAP_DIR/orig.err"
    net_prepare
    _img="$SNAP_DIR/disk.img"
    cp "$ROOTFS" "$_img"
    _start=$(now)
    _name="pcisnap$$"
    tap_up cappcis0 10.0.19.1/24
    snap_start orig run --name "$_name" --kernel "$BZIMAGE" --cpus 2 --memory 256M \
        --transport pci --disk "$_img" --net tap=cappcis0 --cmdline "$DISK_CMDLINE_RW"
    _orig=$SNAP_PID
    if ! snap_wait orig "$READY" "$CASE_TIMEOUT"; then
        snap_give_up "original did not boot" "$_orig" "$_start"
        return
    fi
    snap_wait orig "$PROMPT" 15 || true
    # msi QUEUE: the guest's PCI-MSI(X) interrupts on its virtio QUEUE lines.
    snap_type orig 'msi() { awk "/PCI-MSI/ && \$NF ~ /^virtio[0-9]+-$1/ {for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) n += \$i} END {print n + 0}" /proc/interrupts; }'
    snap_type orig 'ip addr add 10.0.19.2/24 dev eth0; ip link set eth0 up; ping -c 2 -w 20 10.0.19.1 </dev/null >/dev/null && echo PING""1-OK; echo pre-snapshot-$((6*7)) >/root/pre.txt; sync; echo "MSI""REQ-A=$(msi req)"; echo "MSI""NET-A=$(msi input)"'
    expect "original pinged the host" snap_wait orig "^PING1-OK" 60
    expect "original printed its MSI-X counts" snap_wait orig "^MSINET-A=" 30
    snap_save_stop "$_name" "$_orig" "$_start" || return
    expect "snapshot file written" [ -s "$SNAP_DIR/snap/snapshot" ]
    expect "the snapshot says virtio-pci" sh -c "tail -c +25 '$SNAP_DIR/snap/snapshot' | grep -q '\"transport\":\"pci\"'"

    tap_up cappcis0 10.0.19.1/24
    snap_start rest run --restore "$SNAP_DIR/snap"
    _rest=$SNAP_PID
    sleep 2
    snap_type rest 'cat /root/pre.txt; echo post-restore-$((7*6)) >/root/post.txt; sync; echo 3 >/proc/sys/vm/drop_caches; echo "again-$(cat /root/pre.txt)"; dd if=/dev/vda of=/dev/null bs=1M count=8 2>/dev/null && echo READ""-OK'
    # The host's TAP is a new device with a new MAC address: the guest
    # forgets the one it resolved before the snapshot (else it sends to
    # the old one until its neighbour entry times out, about 30 s).
    snap_type rest 'ip neigh flush dev eth0; ping -c 3 -w 30 10.0.19.1 </dev/null >/dev/null && echo PING""2-OK; echo "MSI""REQ-B=$(msi req)"; echo "MSI""NET-B=$(msi input)"'
    expect "restored: the file written before the snapshot" snap_wait rest "^pre-snapshot-42" 60
    expect "restored: read back after dropping caches" snap_wait rest "^again-pre-snapshot-42" 60
    expect "restored: 8 MiB read from the disk" snap_wait rest "^READ-OK" 60
    expect "restored: pings the host over the TAP" snap_wait rest "^PING2-OK" 60
    expect "restored: printed its MSI-X counts" snap_wait rest "^MSINET-B=" 30
    _ra=$(pci_msi_count "$SNAP_DIR/orig.raw" MSIREQ-A) _rb=$(pci_msi_count "$SNAP_DIR/rest.raw" MSIREQ-B)
    _na=$(pci_msi_count "$SNAP_DIR/orig.raw" MSINET-A) _nb=$(pci_msi_count "$SNAP_DIR/rest.raw" MSINET-B)
    echo "pci_snapshot: MSI-X interrupts on req $_ra before, $_rb after; on input $_na before, $_nb after"
    expect "block MSI-X interrupts after restore ($_ra -> $_rb)" pci_grew "$_ra" "$_rb"
    expect "net MSI-X interrupts after restore ($_na -> $_nb)" pci_grew "$_na" "$_nb"
    snap_type rest 'poweroff -f'
    wait "$_rest"
    RC=$?
    touch "$SNAP_DIR/done"
    SECS=$(($(now) - _start))
    expect "restored: exit status 0 (got $RC)" [ "$RC" -eq 0 ]
    expect "the restored guest's file is in the image (debugfs)" \
        file_in_image_is "$_img" /root/post.txt "post-restore-42"
    grep -h 'snapshot written\|restored .* in ' "$SNAP_DIR"/*.err | sed 's/^/pci_snapshot: /'
    tr -d '\r' <"$SNAP_DIR/rest.raw" >"$SNAP_DIR/stdout"
    cat "$SNAP_DIR/orig.err" "$SNAP_DIR/rest.err" >"$SNAP_DIR/stderr"
    tr -d '\r' <"$SNAP_DIR/orig.raw" >>"$SNAP_DIR/stdout"
    OUT="$SNAP_DIR/stdout" ERR="$SNAP_DIR/stderr"
    expect "no Rust panic" no_rust_panic
    expect "no kernel warning" no_kernel_warning
}

# pci_try_snapshot CASE NAME: in the background, once CASE's console shows
# `snap-try-2`, asks for a snapshot of the running VM NAME (capsule
# snapshot, which resumes the VM when the snapshot fails) and writes what
# it said and its status to $WORK/CASE.snap, then runs the command in
# $PCI_AFTER_SNAPSHOT (if set).
pci_try_snapshot() {
    _snapout="$WORK/$1.snap"
    # The case's directory goes now, not in run_capsule after the job
    # started: a retried case's old `done` would stop the job at once.
    rm -rf "$_snapout" "$WORK/$1" "$WORK/$1.snapdir"
    (
        wait_for "$WORK/$1/stdout.raw" "snap-try-2" "$CASE_TIMEOUT" "$WORK/$1/done" || exit 0
        "$CAPSULE" snapshot "$2" "$WORK/$1.snapdir" >"$_snapout.tmp" 2>&1
        echo "status=$?" >>"$_snapout.tmp"
        mv "$_snapout.tmp" "$_snapout"
        if [ -n "${PCI_AFTER_SNAPSHOT:-}" ]; then sh -c "$PCI_AFTER_SNAPSHOT"; fi
    ) &
    PCI_SNAPSHOT_PID=$!
}

# pci_snapshot_refused CASE WHY: the snapshot asked for by
# pci_try_snapshot failed (status 1) with one error line saying WHY, and
# wrote no memory file.
pci_snapshot_refused() {
    grep -qx "status=1" "$WORK/$1.snap" &&
        grep -q "^capsule: error: .*this VM cannot be snapshotted: $2" "$WORK/$1.snap" &&
        [ ! -s "$WORK/$1.snapdir/memory" ]
}

case_pci_vhost_net() {
    net_prepare
    net_vhost_prepare
    _net=10.0.29
    _data="$WORK/pci-vhost-data.bin" _back="$WORK/pci-vhost-back.bin"
    rm -f "$_back" "$_back.done"
    dd if=/dev/urandom of="$_data" bs=1048576 count=16 2>/dev/null
    _sum="$(md5sum <"$_data" | cut -d' ' -f1)"
    tap_up cappciv0 "$_net.1/24"
    nc -l -p 5001 -e cat "$_data" </dev/null >/dev/null 2>&1 &
    _s1=$!
    nc -l -p 5002 -e sh -c "cat >'$_back'; touch '$_back.done'" </dev/null >/dev/null 2>&1 &
    _s2=$!
    _name="pcivhost$$"
    PCI_AFTER_SNAPSHOT="nc $_net.2 7000 -e echo after-snapshot-from-host </dev/null"
    pci_try_snapshot pci_vhost_net "$_name"
    export CAPSULE_LOG=info
    # As in net.sh's transfers, the guest waits for its last bytes to be
    # acknowledged (no connection to 5002, 0x138A, still sending) before
    # it goes on.
    run_capsule pci_vhost_net 'for d in /sys/bus/pci/devices/*; do echo pcidev=$(cat $d/vendor):$(cat $d/device):$(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null); done
ip addr add '"$_net"'.2/24 dev eth0; ip link set eth0 up; ping -c 3 -w 30 '"$_net"'.1 </dev/null && echo PING-OK
t0=$(date +%s); nc '"$_net"'.1 5001 -e sh -c "cat >/tmp/in" </dev/null; t1=$(date +%s); echo "in-sum $(md5sum </tmp/in)"
nc '"$_net"'.1 5002 -e cat /tmp/in </dev/null; i=0; while [ $i -lt 600 ] && grep -qE ":138A 0[1489B] " /proc/net/tcp; do sleep 0.2; i=$((i+1)); done; echo "tcp-times host-to-guest=$((t1-t0))s guest-to-host=$(($(date +%s)-t1))s"
(nc -l -p 7000 -e sh -c "cat >/tmp/got" </dev/null) & sleep 1; echo snap-try-$((1+1)); wait; cat /tmp/got
grep -E "PCI-MSI|virtio" /proc/interrupts
echo 0000:00:01.0 >/sys/bus/pci/drivers/virtio-pci/unbind; echo 0000:00:01.0 >/sys/bus/pci/drivers/virtio-pci/bind; echo rebound-$((1+1)); ls /sys/class/net
ip addr add '"$_net"'.2/24 dev eth0; ip link set eth0 up; ping -c 3 -w 30 '"$_net"'.1 </dev/null && echo PING-AGAIN-OK
poweroff -f' \
        run --name "$_name" --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 2 --memory 256M \
        --transport pci --net "tap=cappciv0,vhost=on"
    unset PCI_AFTER_SNAPSHOT
    _i=0
    while [ $_i -lt 50 ] && [ ! -e "$_back.done" ]; do
        sleep 0.1 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    kill "$_s1" "$_s2" "$PCI_SNAPSHOT_PID" 2>/dev/null
    expect "exit status 0" rc_is 0
    expect "the NIC is a virtio-pci function" out_has_line "pcidev=0x1af4:0x1041:virtio-pci"
    expect "the NIC was built on vhost-net" stderr_has "data path in the kernel (vhost-net)"
    expect "the driver's activation handed the rings to vhost-net" stderr_has "vhost-net moves its frames"
    expect "guest pings the host over TAP" out_has_line "PING-OK"
    expect "16 MiB host→guest arrived intact (md5 $_sum)" out_has "in-sum $_sum"
    expect "16 MiB guest→host arrived intact" file_md5_is "$_back" "$_sum"
    expect "MSI-X interrupts on the net receive queue" pci_msix_used input
    expect "MSI-X interrupts on the net transmit queue" pci_msix_used output
    expect "the snapshot was refused: vhost-net holds the rings" \
        pci_snapshot_refused pci_vhost_net "a vhost-net device's rings are in the kernel's hands"
    expect "the VM went on after the refused snapshot" out_has_line "after-snapshot-from-host"
    expect "no vhost-net ring error" sh -c "! grep -q 'vhost-net cannot use queue' '$ERR'"
    expect "after the driver was unbound and bound again (a device reset), the NIC pings again" \
        out_has_line "PING-AGAIN-OK"
    expect "the rings were handed to vhost-net again" \
        test "$(grep -c 'vhost-net moves its frames' "$ERR")" -ge 2
    expect "no Rust panic" no_rust_panic
    expect "no kernel warning" no_kernel_warning
    sed 's/^/    pci_vhost_net: snapshot: /' "$WORK/pci_vhost_net.snap" 2>/dev/null
    # For the log: the NIC's MSI-X lines and how long the transfers took.
    grep -E "PCI-MSI.*virtio[0-9]+-(input|output|config)" "$OUT" | sed 's/^/    pci_vhost_net: /'
    sed -n 's/^\(tcp-times .*\)/    pci_vhost_net: \1/p' "$OUT" | head -n1
    rm -f "$_data" "$_back" "$_back.done"
}

case_pci_virtiofs() {
    virtiofs_prereqs || return
    _vfs="$WORK/pci_virtiofs.share"
    rm -rf "$_vfs"
    mkdir -p "$_vfs"
    echo "made-on-host-before-boot" >"$_vfs/pre.txt"
    _name="pcivfs$$"
    # The host answers (ack.txt) only after the snapshot attempt, so the
    # guest's last file operations come after it too.
    PCI_AFTER_SNAPSHOT="echo \"\$(cat '$_vfs/g.txt' 2>/dev/null) seen-by-host\" >'$_vfs/ack.tmp'; mv '$_vfs/ack.tmp' '$_vfs/ack.txt'"
    pci_try_snapshot pci_virtiofs "$_name"
    export CAPSULE_LOG=info
    run_capsule pci_virtiofs 'for d in /sys/bus/pci/devices/*; do echo pcidev=$(cat $d/vendor):$(cat $d/device):$(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null); done
mkdir -p /mnt/s && mount -t virtiofs share /mnt/s && echo mounted-$((1+1))
cat /mnt/s/pre.txt
echo guestdata-$((40+2)) >/mnt/s/g.txt && echo snap-try-$((1+1))
i=0; while [ ! -f /mnt/s/ack.txt ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; cat /mnt/s/ack.txt
echo more-$((6*7)) >/mnt/s/after.txt && echo written-after-$((1+1))
grep -E "PCI-MSI|virtio" /proc/interrupts
umount /mnt/s; echo 0000:00:01.0 >/sys/bus/pci/drivers/virtio-pci/unbind; echo 0000:00:01.0 >/sys/bus/pci/drivers/virtio-pci/bind; echo rebound-$((1+1))
mount -t virtiofs share /mnt/s && sed "s/^/reread-/" /mnt/s/after.txt
poweroff -f' \
        run --name "$_name" --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M \
        --transport pci --fs "$_vfs:share"
    unset PCI_AFTER_SNAPSHOT
    kill "$PCI_SNAPSHOT_PID" 2>/dev/null
    virtiofs_done
    expect "exit status 0" rc_is 0
    expect "the share is a virtio-pci function (virtio-fs, 0x105a)" \
        out_has_line "pcidev=0x1af4:0x105a:virtio-pci"
    expect "the guest mounted the share" out_has_line "mounted-2"
    expect "the guest read the host's file" out_has_line "made-on-host-before-boot"
    expect "the host saw the guest's file while the VM ran, the guest saw the host's answer" \
        out_has_line "guestdata-42 seen-by-host"
    expect "the guest's last file reached the host" \
        test "$(cat "$_vfs/after.txt" 2>/dev/null)" = "more-42"
    expect "MSI-X interrupts on the request queue" pci_msix_used requests
    expect "after the driver was unbound and bound again (a device reset), the share mounts and reads" \
        out_has_line "reread-more-42"
    expect "the share was activated twice (virtiofsd got the rings again)" \
        test "$(grep -c 'the guest driver activated the share' "$ERR")" -ge 2
    expect "the snapshot was refused: virtio-fs has no saved state" \
        pci_snapshot_refused pci_virtiofs "virtio-fs shares have no saved state yet"
    expect "no error from capsule" no_capsule_error
    expect "no Rust panic" no_rust_panic
    expect "no kernel warning" no_kernel_warning
    sed 's/^/    pci_virtiofs: snapshot: /' "$WORK/pci_virtiofs.snap" 2>/dev/null
    grep -E "PCI-MSI.*virtio[0-9]+-(hiprio|requests|config)" "$OUT" | sed 's/^/    pci_virtiofs: /'
}
