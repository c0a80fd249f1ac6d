/*
 * kvm-keypin: holds L1's KVM APIC static keys away from zero for the whole
 * life of the nested harness's L1, so that booting and tearing down guests
 * does not live-patch L1's kernel text.
 *
 * Why: KVM counts vCPUs whose local APIC is software-disabled (every vCPU at
 * creation, until its guest enables the APIC) and hardware-disabled in two
 * static keys (apic_sw_disabled, apic_hw_disabled in arch/x86/kvm/lapic.c).
 * Each 0 <-> 1 transition rewrites the branch sites in kvm.ko with
 * text_poke_bp(): an int3 is written over live code on one CPU while the
 * other CPUs may be executing it. QEMU's multi-threaded TCG does not keep
 * such cross-modifying code coherent between its vCPU threads, and the L1
 * hangs seen in the harness were caught exactly there (2026-12-04: one L1
 * vCPU in kprobe_int3_handler, the other in error_return, after 4 boots).
 * One idle VM whose first vCPU never enables its APIC, and whose second has
 * the APIC disabled in IA32_APIC_BASE, keeps both counts >= 1, so guests
 * coming and going only move them between 1 and N: no patching.
 *
 * It prints "kvm-keypin: holding" when the keys are held and then sleeps
 * until it is killed. Built static by resources/harness/run-in-l1.sh.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MSR_IA32_APICBASE 0x1b
#define APIC_DEFAULT_BASE 0xfee00000ULL

static int fail(const char *what)
{
    fprintf(stderr, "kvm-keypin: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return fail("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return fail("KVM_CREATE_VM");
    /* The local APICs are KVM's only with an in-kernel irqchip. */
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        return fail("KVM_CREATE_IRQCHIP");
    /* vCPU 0: created with its APIC software-disabled; it never runs. */
    if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0)
        return fail("KVM_CREATE_VCPU 0");
    /* vCPU 1: its APIC disabled in IA32_APIC_BASE (hardware-disabled). */
    int vcpu1 = ioctl(vm, KVM_CREATE_VCPU, 1);
    if (vcpu1 < 0)
        return fail("KVM_CREATE_VCPU 1");
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry entry;
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.hdr.nmsrs = 1;
    msrs.entry.index = MSR_IA32_APICBASE;
    msrs.entry.data = APIC_DEFAULT_BASE; /* enable bit (11) clear */
    if (ioctl(vcpu1, KVM_SET_MSRS, &msrs) != 1)
        return fail("KVM_SET_MSRS IA32_APIC_BASE");
    printf("kvm-keypin: holding\n");
    fflush(stdout);
    for (;;)
        pause();
}
