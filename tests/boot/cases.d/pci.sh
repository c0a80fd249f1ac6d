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

# shellcheck disable=SC2016  # $(...) in case inputs is for the guest shell
ALL_CASES="$ALL_CASES pci_blk_net pci_snapshot"

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
