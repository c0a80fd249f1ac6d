//! The ioctl request numbers the filters allow, computed from the kernel's
//! `_IOC` encoding and the kvm-bindings structures (kvm-ioctls keeps its
//! own numbers private).

use kvm_bindings::*;

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const KVMIO: u64 = 0xAE;

/// `_IOC(dir, type, nr, size)` as in `include/uapi/asm-generic/ioctl.h`.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(IOC_NONE, KVMIO, nr, 0)
}
const fn ior<T>(nr: u64) -> u64 {
    ioc(IOC_READ, KVMIO, nr, std::mem::size_of::<T>())
}
const fn iow<T>(nr: u64) -> u64 {
    ioc(IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(IOC_READ | IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>())
}

/// vhost's ioctl type (`VHOST_VIRTIO` in `include/uapi/linux/vhost.h`).
const VHOST: u64 = 0xAF;
const fn vhost_iow<T>(nr: u64) -> u64 {
    ioc(IOC_WRITE, VHOST, nr, std::mem::size_of::<T>())
}
const fn vhost_iowr<T>(nr: u64) -> u64 {
    ioc(IOC_READ | IOC_WRITE, VHOST, nr, std::mem::size_of::<T>())
}

/// A named ioctl request.
pub type Ioctl = (&'static str, u64);

/// What a vCPU thread does to its own vCPU while it runs.
pub const KVM_VCPU_RUN: &[Ioctl] = &[
    ("KVM_RUN", io(0x80)),
    // The triple-fault report reads where the vCPU was.
    ("KVM_GET_REGS", ior::<kvm_regs>(0x81)),
    ("KVM_GET_SREGS", ior::<kvm_sregs>(0x83)),
];

/// vCPU state save and restore (snapshots: the vCPU thread saves its own
/// state while paused, and may load it on resume).
pub const KVM_VCPU_STATE: &[Ioctl] = &[
    ("KVM_SET_REGS", iow::<kvm_regs>(0x82)),
    ("KVM_SET_SREGS", iow::<kvm_sregs>(0x84)),
    ("KVM_GET_MSRS", iowr::<kvm_msrs>(0x88)),
    ("KVM_SET_MSRS", iow::<kvm_msrs>(0x89)),
    ("KVM_GET_FPU", ior::<kvm_fpu>(0x8c)),
    ("KVM_SET_FPU", iow::<kvm_fpu>(0x8d)),
    ("KVM_GET_LAPIC", ior::<kvm_lapic_state>(0x8e)),
    ("KVM_SET_LAPIC", iow::<kvm_lapic_state>(0x8f)),
    ("KVM_SET_CPUID2", iow::<kvm_cpuid2>(0x90)),
    ("KVM_GET_CPUID2", iowr::<kvm_cpuid2>(0x91)),
    ("KVM_GET_MP_STATE", ior::<kvm_mp_state>(0x98)),
    ("KVM_SET_MP_STATE", iow::<kvm_mp_state>(0x99)),
    ("KVM_GET_VCPU_EVENTS", ior::<kvm_vcpu_events>(0x9f)),
    ("KVM_SET_VCPU_EVENTS", iow::<kvm_vcpu_events>(0xa0)),
    ("KVM_GET_DEBUGREGS", ior::<kvm_debugregs>(0xa1)),
    ("KVM_SET_DEBUGREGS", iow::<kvm_debugregs>(0xa2)),
    ("KVM_SET_TSC_KHZ", io(0xa2)),
    ("KVM_GET_TSC_KHZ", io(0xa3)),
    ("KVM_GET_XSAVE", ior::<kvm_xsave>(0xa4)),
    ("KVM_SET_XSAVE", iow::<kvm_xsave>(0xa5)),
    ("KVM_GET_XCRS", ior::<kvm_xcrs>(0xa6)),
    ("KVM_SET_XCRS", iow::<kvm_xcrs>(0xa7)),
    ("KVM_KVMCLOCK_CTRL", io(0xad)),
];

/// What the VMM thread does to the VM while it runs: device interrupts
/// and notifications, memory slots (ballooning, hot-plug).
pub const KVM_VM_RUN: &[Ioctl] = &[
    ("KVM_CHECK_EXTENSION", io(0x03)),
    (
        "KVM_SET_USER_MEMORY_REGION",
        iow::<kvm_userspace_memory_region>(0x46),
    ),
    ("KVM_IRQ_LINE", iow::<kvm_irq_level>(0x61)),
    ("KVM_IRQFD", iow::<kvm_irqfd>(0x76)),
    ("KVM_IOEVENTFD", iow::<kvm_ioeventfd>(0x79)),
    ("KVM_SIGNAL_MSI", iow::<kvm_msi>(0xa5)),
    // MSI-X vectors (`--transport pci`): the guest programs a vector's
    // address and data from a vCPU, which routes its GSI.
    ("KVM_SET_GSI_ROUTING", iow::<kvm_irq_routing>(0x6a)),
];

/// VM state save and restore and dirty-page tracking (snapshots).
pub const KVM_VM_STATE: &[Ioctl] = &[
    // On the /dev/kvm descriptor: which MSRs a snapshot saves.
    ("KVM_GET_MSR_INDEX_LIST", iowr::<kvm_msr_list>(0x02)),
    ("KVM_GET_DIRTY_LOG", iow::<kvm_dirty_log>(0x42)),
    ("KVM_GET_IRQCHIP", iowr::<kvm_irqchip>(0x62)),
    // Historically _IOR, although it writes.
    ("KVM_SET_IRQCHIP", ior::<kvm_irqchip>(0x63)),
    ("KVM_SET_CLOCK", iow::<kvm_clock_data>(0x7b)),
    ("KVM_GET_CLOCK", ior::<kvm_clock_data>(0x7c)),
    ("KVM_GET_PIT2", ior::<kvm_pit_state2>(0x9f)),
    ("KVM_SET_PIT2", iow::<kvm_pit_state2>(0xa0)),
];

/// What a running TAP backend does (offloads on activation and reset).
pub const TUN_RUN: &[Ioctl] = &[
    ("TUNSETOFFLOAD", libc::TUNSETOFFLOAD),
    ("TUNSETVNETHDRSZ", libc::TUNSETVNETHDRSZ),
    ("TUNGETIFF", libc::TUNGETIFF),
];

/// What a vhost-net device does while the VM runs: hand the rings and
/// the TAP to the kernel on activation, take them back on reset and when
/// the device is dropped. (`VHOST_SET_OWNER` and `VHOST_GET_FEATURES`
/// come before any filter.)
pub const VHOST_NET_RUN: &[Ioctl] = {
    use vhost::vhost_kern::vhost_binding::{
        vhost_memory, vhost_vring_addr, vhost_vring_file, vhost_vring_state,
    };
    &[
        ("VHOST_SET_FEATURES", vhost_iow::<u64>(0x00)),
        ("VHOST_SET_MEM_TABLE", vhost_iow::<vhost_memory>(0x03)),
        ("VHOST_SET_VRING_NUM", vhost_iow::<vhost_vring_state>(0x10)),
        ("VHOST_SET_VRING_ADDR", vhost_iow::<vhost_vring_addr>(0x11)),
        ("VHOST_SET_VRING_BASE", vhost_iow::<vhost_vring_state>(0x12)),
        (
            "VHOST_GET_VRING_BASE",
            vhost_iowr::<vhost_vring_state>(0x12),
        ),
        ("VHOST_SET_VRING_KICK", vhost_iow::<vhost_vring_file>(0x20)),
        ("VHOST_SET_VRING_CALL", vhost_iow::<vhost_vring_file>(0x21)),
        ("VHOST_SET_VRING_ERR", vhost_iow::<vhost_vring_file>(0x22)),
        ("VHOST_NET_SET_BACKEND", vhost_iow::<vhost_vring_file>(0x30)),
    ]
};

/// The terminal: restored by the fail-stop hook, the signal handlers and
/// the guard (on any thread), read for raw mode.
pub const TERMINAL: &[Ioctl] = &[
    ("TCGETS", libc::TCGETS),
    ("TCSETS", libc::TCSETS),
    ("TCSETSW", libc::TCSETSW),
    ("TCSETSF", libc::TCSETSF),
    ("TIOCGWINSZ", libc::TIOCGWINSZ),
];

/// Non-blocking mode of sockets: the standard library's `set_nonblocking`
/// is `ioctl(FIONBIO)`.
pub const FILE: &[Ioctl] = &[("FIONBIO", libc::FIONBIO), ("FIOCLEX", libc::FIOCLEX)];

#[cfg(test)]
mod tests {
    use super::*;

    fn find(list: &[Ioctl], name: &str) -> u64 {
        list.iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Numbers from the kernel headers (`strace -X raw` shows the same).
    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(find(KVM_VCPU_RUN, "KVM_RUN"), 0xae80);
        assert_eq!(find(KVM_VCPU_RUN, "KVM_GET_REGS"), 0x8090_ae81);
        assert_eq!(find(KVM_VCPU_RUN, "KVM_GET_SREGS"), 0x8138_ae83);
        assert_eq!(find(KVM_VM_RUN, "KVM_IRQFD"), 0x4020_ae76);
        assert_eq!(find(KVM_VM_RUN, "KVM_IOEVENTFD"), 0x4040_ae79);
        assert_eq!(find(KVM_VM_RUN, "KVM_SET_GSI_ROUTING"), 0x4008_ae6a);
        assert_eq!(find(KVM_VM_RUN, "KVM_SET_USER_MEMORY_REGION"), 0x4020_ae46);
        assert_eq!(find(KVM_VM_STATE, "KVM_GET_DIRTY_LOG"), 0x4010_ae42);
        assert_eq!(find(KVM_VM_STATE, "KVM_GET_IRQCHIP"), 0xc208_ae62);
        assert_eq!(find(KVM_VCPU_STATE, "KVM_GET_XSAVE"), 0x9000_aea4);
        assert_eq!(find(TUN_RUN, "TUNSETOFFLOAD"), 0x4004_54d0);
        assert_eq!(find(VHOST_NET_RUN, "VHOST_SET_FEATURES"), 0x4008_af00);
        assert_eq!(find(VHOST_NET_RUN, "VHOST_SET_MEM_TABLE"), 0x4008_af03);
        assert_eq!(find(VHOST_NET_RUN, "VHOST_SET_VRING_ADDR"), 0x4028_af11);
        assert_eq!(find(VHOST_NET_RUN, "VHOST_GET_VRING_BASE"), 0xc008_af12);
        assert_eq!(find(VHOST_NET_RUN, "VHOST_NET_SET_BACKEND"), 0x4008_af30);
    }

    /// The same numbers as the vhost crate's own (which it uses).
    #[test]
    fn vhost_numbers_match_the_vhost_crate() {
        use vhost::vhost_kern::vhost_binding as b;
        for (name, want) in [
            ("VHOST_SET_FEATURES", b::VHOST_SET_FEATURES()),
            ("VHOST_SET_MEM_TABLE", b::VHOST_SET_MEM_TABLE()),
            ("VHOST_SET_VRING_NUM", b::VHOST_SET_VRING_NUM()),
            ("VHOST_SET_VRING_ADDR", b::VHOST_SET_VRING_ADDR()),
            ("VHOST_SET_VRING_BASE", b::VHOST_SET_VRING_BASE()),
            ("VHOST_GET_VRING_BASE", b::VHOST_GET_VRING_BASE()),
            ("VHOST_SET_VRING_KICK", b::VHOST_SET_VRING_KICK()),
            ("VHOST_SET_VRING_CALL", b::VHOST_SET_VRING_CALL()),
            ("VHOST_SET_VRING_ERR", b::VHOST_SET_VRING_ERR()),
            ("VHOST_NET_SET_BACKEND", b::VHOST_NET_SET_BACKEND()),
        ] {
            assert_eq!(find(VHOST_NET_RUN, name), want, "{name}");
        }
        assert_eq!(VHOST_NET_RUN.len(), 10);
    }
}
