# shellcheck shell=sh
# tests/boot/cases.d/noacpi.sh: a guest kernel built without ACPI, as many
# kernels built for Firecracker are (resources/guest-kernel-noacpi.config,
# built by resources/build-guest-kernel-noacpi.sh), boots unchanged: capsule
# sees from its symbol table that it cannot read the DSDT and announces the
# virtio-mmio disk on its command line (no acpi=off given), and its
# `poweroff`, a halt of every CPU with interrupts disabled, ends capsule
# with status 0. Sourced by tests/boot/cases.sh; POSIX sh.
#
# noacpi_pci_hint boots the same kernel, which has no PCI either, with
# `--transport pci` and a disk: capsule warns before it boots that the
# kernel cannot drive virtio-pci (its symbol table says so), the guest
# finds no disk, and when it powers off capsule says it never looked at
# PCI bus 0.
#
# Needs NOACPI_VMLINUX (tests/boot/run.sh sets it when this case is
# selected); fails loudly without it.

ALL_CASES="$ALL_CASES noacpi_vmlinux noacpi_pci_hint"

# noacpi_kernel_missing: true, and the case failed, without NOACPI_VMLINUX.
noacpi_kernel_missing() {
    [ -n "${NOACPI_VMLINUX:-}" ] && [ -f "${NOACPI_VMLINUX:-}" ] && return 1
    SECS=0
    expect "NOACPI_VMLINUX is set to the no-ACPI kernel (got '${NOACPI_VMLINUX:-}')" false
}

# noacpi_disk NAME: a fresh 8 MiB disk image of zeroes; its path.
noacpi_disk() {
    rm -f "$WORK/$1.img"
    dd if=/dev/zero of="$WORK/$1.img" bs=1024 count=8192 2>/dev/null
    echo "$WORK/$1.img"
}

case_noacpi_vmlinux() {
    noacpi_kernel_missing && return
    _img="$(noacpi_disk noacpi)"
    export CAPSULE_LOG=info
    run_capsule noacpi_vmlinux 'echo vda-sectors=$(cat /sys/block/vda/size)
echo acpi-dir=$(ls -d /sys/firmware/acpi 2>/dev/null || echo none)
poweroff -f' \
        run --kernel "$NOACPI_VMLINUX" --initrd "$INITRD" --disk "$_img" --cpus 2 --memory 256M \
        --cmdline "console=ttyS0 reboot=k panic=1"
    rm -f "$_img"
    expect "exit status 0 (the halt ended the VM)" rc_is 0
    expect "guest ready" out_has "$READY"
    expect "ready line with cpus=2" out_has "cpus=2"
    expect "the kernel has no ACPI" out_has_line "acpi-dir=none"
    expect "capsule said why the disk is on the command line" \
        grep -q 'the kernel has no ACPI (its symbol table has no acpi_init)' "$ERR"
    expect "virtio_mmio.device= on the kernel command line" out_has "virtio_mmio.device=4K@0x"
    expect "the guest sees the 8 MiB disk as vda" out_has_line "vda-sectors=16384"
    expect "the halt was logged as the guest's power-off" \
        grep -q 'every vCPU has halted with interrupts disabled: the guest powered off' "$ERR"
    expect "no Rust panic" no_rust_panic
}

case_noacpi_pci_hint() {
    noacpi_kernel_missing && return
    _img="$(noacpi_disk noacpi_pci)"
    run_capsule noacpi_pci_hint 'echo vda-present=$(ls /sys/block | grep -c "^vda$")
poweroff -f' \
        run --kernel "$NOACPI_VMLINUX" --initrd "$INITRD" --disk "$_img" --transport pci \
        --cpus 1 --memory 128M --cmdline "console=ttyS0 reboot=k panic=1"
    rm -f "$_img"
    expect "exit status 0" rc_is 0
    expect "capsule warned before the boot: the kernel has no PCI" \
        grep -q 'warn: --transport pci, but the kernel cannot drive virtio-pci (its symbol table has no pci_bus_type (no PCI))' "$ERR"
    expect "the guest found no disk" out_has_line "vda-present=0"
    expect "at the end, capsule said the guest never looked at PCI bus 0" \
        grep -q 'warn: the guest never looked at PCI bus 0, where its virtio devices are' "$ERR"
    expect "no Rust panic" no_rust_panic
}
