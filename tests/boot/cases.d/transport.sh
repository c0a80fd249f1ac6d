# shellcheck shell=sh
# tests/boot/cases.d/transport.sh: the transport capsule picks when none
# is named (src/builder/transport.rs). Sourced by tests/boot/cases.sh;
# POSIX sh.
#
# transport_auto boots the test vmlinux (PCI, MSI and virtio-pci built in,
# its symbol table kept) with a disk and no --transport: capsule says it
# picked virtio-pci from the symbol table, and the guest finds the disk as
# a virtio-pci function with MSI-X interrupts and reads it.
#
# transport_auto_pci_off boots the same with `pci=off` on the command line:
# capsule keeps virtio-mmio and says why, and the guest, which has no PCI
# bus now, finds the disk on virtio-mmio.

ALL_CASES="$ALL_CASES transport_auto transport_auto_pci_off"

# transport_disk NAME: an 8 MiB disk image for case NAME, its first
# sector marked.
transport_disk() {
    _img="$WORK/$1.img"
    rm -f "$_img"
    dd if=/dev/zero of="$_img" bs=1048576 count=8 2>/dev/null
    printf 'transport-disk-%s' 42 | dd of="$_img" conv=notrunc 2>/dev/null
    echo "$_img"
}

# The guest's part: its PCI functions, the driver of the device the disk's
# virtio device sits on (virtio-pci or virtio-mmio), what the disk says.
TRANSPORT_INPUT='for d in /sys/bus/pci/devices/*; do [ -e "$d" ] && echo pcidev=$(cat $d/vendor):$(cat $d/device):$(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null); done
v=$(readlink -f /sys/block/vda/device); echo vda-transport=$(basename $(readlink $(dirname $v)/driver))
echo disk-says=$(head -c 17 /dev/vda)
grep -E "PCI-MSI|virtio" /proc/interrupts
poweroff -f'

# transport_boot CASE EXTRA: boots the test vmlinux with a marked disk and
# no --transport, EXTRA appended to the command line, and checks what
# both cases expect: status 0, the disk read, no panic.
transport_boot() {
    _img="$(transport_disk "$1")"
    export CAPSULE_LOG=info
    run_capsule "$1" "$TRANSPORT_INPUT" \
        run --kernel "$VMLINUX" --initrd "$INITRD" --disk "$_img,ro" --cpus 1 --memory 128M \
        --cmdline "console=ttyS0 reboot=k panic=1$2"
    rm -f "$_img"
    expect "exit status 0" rc_is 0
    expect "the guest read the disk" out_has_line "disk-says=transport-disk-42"
    expect "no Rust panic" no_rust_panic
}

case_transport_auto() {
    transport_boot transport_auto ""
    expect "capsule picked virtio-pci from the kernel's symbol table" \
        grep -q 'virtio transport: pci (its symbol table has pci_bus_type, pci_msi_enabled and virtio_pci_modern_probe' "$ERR"
    expect "the disk is a virtio-pci function" out_has_line "pcidev=0x1af4:0x1042:virtio-pci"
    expect "vda sits on virtio-pci" out_has_line "vda-transport=virtio-pci"
    expect "MSI-X interrupts on the block request queue" pci_msix_used req
    expect "no warning about the transport" sh -c "! grep -q 'PCI bus 0\|cannot drive virtio-pci' '$ERR'"
}

case_transport_auto_pci_off() {
    transport_boot transport_auto_pci_off " pci=off"
    expect "capsule kept virtio-mmio, because of pci=off" \
        grep -q 'virtio transport: mmio (the command line has pci=off' "$ERR"
    expect "no PCI function in the guest" sh -c "! grep -q '^pcidev=' '$OUT'"
    expect "vda sits on virtio-mmio" out_has_line "vda-transport=virtio-mmio"
}
