# shellcheck shell=sh
# tests/boot/cases.d/pci.sh: the virtio-pci transport (sourced by cases.sh).
#
# pci_blk_net boots with `--transport pci`, the root file system on a
# virtio-blk disk (a copy of $ROOTFS, as in disk.sh) and a virtio-net NIC
# on TAP (as in net.sh), and checks in the guest that both are PCI
# functions driven by virtio-pci with MSI-X interrupts, that the disk
# reads and writes (checked on the image afterwards) and that the NIC
# pings the host.

# shellcheck disable=SC2016  # $(...) in case inputs is for the guest shell
ALL_CASES="$ALL_CASES pci_blk_net"

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
}

# pci_bars_kept: the guest kernel claimed every BAR where capsule put it
# (inside the root bridge's window): no reassignment, no failure.
pci_bars_kept() {
    out_has "PCI0" && ! grep -qE "can't claim|no space for|failed to assign|BAR [0-9]+: assigned" "$OUT"
}
