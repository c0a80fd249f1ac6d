//! A tiny guest on /dev/kvm reaches PCI bus 0 the ways a driver does,
//! through real MMIO and port-I/O exits: the ECAM window the MCFG table
//! announces (the host bridge, a virtio function, its extended space,
//! absent functions, a misaligned access), configuration mechanism #1,
//! and the virtio function's `VIRTIO_PCI_CAP_PCI_CFG` window reached
//! through ECAM (a common configuration register written and read back
//! without the BAR ever being mapped). With a virtiofsd on the host, a
//! `--fs` share over `--transport pci` is a virtio-fs function there.

mod common;
use common::guest::*;
use common::run::*;

/// capsule's ECAM window (`arch::layout::PCI_ECAM_START`): bus 0.
const ECAM: u32 = 0xf000_0000;
/// Device 1's configuration space in it: the first virtio function.
const DEV1: u32 = 1 << 15;
/// The `VIRTIO_PCI_CAP_PCI_CFG` capability of a virtio function: after
/// the four structure capabilities (0x40, 0x50, 0x60, 0x70) and MSI-X
/// (0x84), checked below by its header.
const PCI_CFG_CAP: u32 = 0x90;

impl Asm {
    /// ecx |= eax ^ want: a mismatch leaves a bit in ecx.
    fn check_eax(&mut self, want: u32) -> &mut Self {
        self.0.push(0x35); // xor eax, imm32
        self.0.extend(want.to_le_bytes());
        self.0.extend([0x09, 0xc1]); // or ecx, eax
        self
    }
    /// mov eax, dword [rbx + off], then [`Self::check_eax`].
    fn check_u32(&mut self, off: u32, want: u32) -> &mut Self {
        self.0.extend([0x8b, 0x83]);
        self.0.extend(off.to_le_bytes());
        self.check_eax(want)
    }
    /// mov dword [rbx + off], v
    fn store_u32(&mut self, off: u32, v: u32) -> &mut Self {
        self.0.extend([0xc7, 0x83]);
        self.0.extend(off.to_le_bytes());
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Mechanism #1: address `a` to 0xCF8, a dword from 0xCFC into eax.
    fn conf1_read(&mut self, a: u32) -> &mut Self {
        self.mov_dx(0xcf8);
        self.0.push(0xb8); // mov eax, imm32
        self.0.extend(a.to_le_bytes());
        self.0.push(0xef); // out dx, eax
        self.mov_dx(0xcfc);
        self.0.push(0xed); // in eax, dx
        self
    }
}

/// The guest: every check ORs its mismatch into ecx; it prints
/// `pci-ok` if none, else `pci-bad`, and powers off.
fn pci_guest() -> Asm {
    let mut a = Asm::default();
    a.map_fourth_gib(ECAM);
    a.0.extend([0x31, 0xc9]); // xor ecx, ecx
    let cap = DEV1 + PCI_CFG_CAP;
    a.check_u32(0, 0x0d57_8086) // host bridge ids
        .check_u32(0x100, 0) // its extended space: empty
        .check_u32(DEV1, 0x1045_1af4) // virtio-balloon (0x1040 + 5)
        .check_u32(DEV1 + 0x10, 0xe000_0000) // BAR 0 where capsule put it
        .check_u32(DEV1 + 0x1001, u32::MAX) // misaligned: all ones
        .check_u32(DEV1 | (1 << 12), u32::MAX) // function 1: absent
        .check_u32(2 << 15, u32::MAX) // device 2: absent
        // id 9 (vendor), next 0 (last), length 20, cfg_type 5 (PCI_CFG)
        .check_u32(cap, 0x0514_0009)
        // The window at BAR 0 offset 0, 4 bytes: device_feature_select.
        .store_u32(cap + 4, 0)
        .store_u32(cap + 8, 0)
        .store_u32(cap + 12, 4)
        .store_u32(cap + 16, 1)
        .check_u32(cap + 16, 1)
        // device_status (offset 0x14, 1 byte): 0 before any driver.
        .store_u32(cap + 8, 0x14)
        .store_u32(cap + 12, 1)
        .check_u32(cap + 16, 0)
        // A length of 3: reads zero.
        .store_u32(cap + 12, 3)
        .check_u32(cap + 16, 0)
        // The same function through the configuration ports.
        .conf1_read(0x8000_0800)
        .check_eax(0x1045_1af4)
        .conf1_read(0x8000_0800 | (PCI_CFG_CAP + 8))
        .check_eax(0x14);
    verdict(a)
}

/// Ends a guest whose checks ORed their mismatches into ecx: prints
/// `pci-ok` if there were none, else `pci-bad`, and powers off.
fn verdict(mut a: Asm) -> Asm {
    a.0.extend([0x85, 0xc9]); // test ecx, ecx
    let jnz = a.0.len();
    a.0.extend([0x75, 0]); // jnz bad (patched below)
    a.print("pci-ok\n")
        .outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    let bad = a.0.len();
    a.0[jnz + 1] = u8::try_from(bad - (jnz + 2)).expect("a short jump");
    a.print("pci-bad\n")
        .outb(ACPI_SLEEP_CONTROL, (5 << 2) | (1 << 5))
        .halt_forever();
    a
}

#[test]
fn a_guest_reaches_pci_through_ecam_ports_and_the_pci_cfg_window() {
    let out = run_guest(
        "pci-ecam.elf",
        &pci_guest(),
        &["--transport", "pci", "--balloon", "amount_mib=0"],
        None,
    );
    assert_eq!(
        (stdout(&out).as_str(), out.status.code()),
        ("pci-ok\n", Some(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same guest with virtio-mmio: no PCI bus, so the ECAM window is
/// unbacked (reads all ones) and the checks fail, which shows the test
/// above can fail.
#[test]
fn without_pci_the_same_guest_finds_nothing() {
    let out = run_guest("pci-ecam-mmio.elf", &pci_guest(), &[], None);
    assert_eq!(
        (stdout(&out).as_str(), out.status.code()),
        ("pci-bad\n", Some(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The virtiofsd capsule would use here: `CAPSULE_VIRTIOFSD`, else
/// Debian 12's (qemu-system-common); none: the test below has nothing
/// to start.
fn virtiofsd() -> Option<String> {
    std::env::var("CAPSULE_VIRTIOFSD")
        .ok()
        .or_else(|| Some("/usr/lib/qemu/virtiofsd".to_string()))
        .filter(|p| std::path::Path::new(p).is_file())
}

/// `--fs` with `--transport pci` (once refused): the VM starts with a
/// virtiofsd, and the guest finds a virtio-fs function (0x1040 + 26) on
/// bus 0 through ECAM and the configuration ports.
#[test]
fn a_virtio_fs_share_is_a_pci_function() {
    let Some(daemon) = virtiofsd() else {
        eprintln!("no virtiofsd here (CAPSULE_VIRTIOFSD, /usr/lib/qemu/virtiofsd): not run");
        return;
    };
    let mut a = Asm::default();
    a.map_fourth_gib(ECAM);
    a.0.extend([0x31, 0xc9]); // xor ecx, ecx
    a.check_u32(DEV1, 0x105a_1af4)
        .check_u32(DEV1 + 0x10, 0xe000_0000)
        .conf1_read(0x8000_0800)
        .check_eax(0x105a_1af4);
    let kernel = write_guest("pci-fs.elf", &verdict(a));
    let share = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pci-fs-share");
    std::fs::create_dir_all(&share).unwrap();
    let out = capsule_env(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--transport",
            "pci",
            "--fs",
            &format!("{}:share", share.display()),
        ],
        &[("CAPSULE_VIRTIOFSD", &daemon)],
    );
    assert_eq!(
        (stdout(&out).as_str(), out.status.code()),
        ("pci-ok\n", Some(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
