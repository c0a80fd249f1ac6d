//! The host checks of `capsule doctor`: KVM, and what the optional
//! features (user-mode networking, TAP, virtio-fs, sandboxing) need.

use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

use super::Check;
use crate::vstate::vm::{group_name, KVM_API_VERSION, REQUIRED_CAPS};

/// The KVM checks, in the order a user fixes them; they stop at the first
/// failure that makes the rest meaningless (no device, no access).
pub fn kvm_checks(kvm_path: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    if let Err(fail) = kvm_checks_into(kvm_path, &mut out) {
        out.push(fail);
    }
    out
}

/// Pushes the passed KVM checks onto `out` and the others' results; the
/// failure that stops them is the error.
fn kvm_checks_into(kvm_path: &Path, out: &mut Vec<Check>) -> Result<(), Check> {
    let dev = kvm_path.display();
    let meta = kvm_device(kvm_path)?;
    out.push(Check::ok(format!("{dev} exists")));
    let kvm = open_kvm(kvm_path, &meta)?;
    out.push(Check::ok(format!(
        "{dev} is readable and writable by this user"
    )));
    out.push(api_version(&kvm));
    out.push(capabilities(&kvm));
    out.push(kvm_kind(&Kind::detect()));
    Ok(())
}

/// The KVM device's metadata, if it exists and is a character device.
fn kvm_device(kvm_path: &Path) -> Result<std::fs::Metadata, Check> {
    use std::os::unix::fs::FileTypeExt;
    let dev = kvm_path.display();
    let meta = std::fs::metadata(kvm_path).map_err(|e| {
        Check::fail(
            format!("{dev} does not exist ({e})"),
            "load the KVM module (modprobe kvm_intel or kvm_amd) and enable \
             virtualization (VT-x/AMD-V) in the firmware; on a cloud VM, pick an \
             instance type with nested virtualization",
        )
    })?;
    if !meta.file_type().is_char_device() {
        return Err(Check::fail(
            format!("{dev} is not a character device"),
            "point --kvm at the KVM device, normally /dev/kvm",
        ));
    }
    Ok(meta)
}

/// KVM, opened read-write as capsule opens it; a failure names the
/// device's owner, group and mode, and how to join the group.
fn open_kvm(kvm_path: &Path, meta: &std::fs::Metadata) -> Result<Kvm, Check> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dev = kvm_path.display();
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_path)
    {
        // SAFETY: `f` is an open /dev/kvm descriptor whose ownership
        // moves into the Kvm handle.
        Ok(f) => Ok(unsafe {
            <Kvm as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f))
        }),
        Err(e) => {
            let group = group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
            Err(Check::fail(
                format!(
                    "cannot open {dev} ({e}; owner uid {}, group {group}, mode {:o})",
                    meta.uid(),
                    meta.permissions().mode() & 0o777
                ),
                format!(
                    "add yourself to its group (sudo usermod -aG {group} $USER, then log in \
                     again), or on a CI runner open it with a udev rule (docs/ci.md)"
                ),
            ))
        }
    }
}

/// Whether KVM's API version is the one capsule speaks.
fn api_version(kvm: &Kvm) -> Check {
    let version = kvm.get_api_version();
    if version == KVM_API_VERSION {
        Check::ok(format!("KVM API version {version}"))
    } else {
        Check::fail(
            format!("KVM API version {version}, capsule needs {KVM_API_VERSION}"),
            "use a Linux host kernel from 2.6.22 or later",
        )
    }
}

/// Whether KVM has every capability capsule needs; a failure names those
/// it lacks.
fn capabilities(kvm: &Kvm) -> Check {
    let missing: Vec<String> = REQUIRED_CAPS
        .iter()
        .filter(|c| !kvm.check_extension(**c))
        .map(|c| format!("{c:?}"))
        .collect();
    if missing.is_empty() {
        Check::ok("KVM has the capabilities capsule needs (irqchip, user memory, irqfd, PIT2, TSS)")
    } else {
        Check::fail(
            format!("KVM lacks {}", missing.join(", ")),
            "use a newer host kernel or another KVM provider",
        )
    }
}

/// Who provides /dev/kvm.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// The `kvm_pvm` module: software virtualization by page-table
    /// switching, where the host exposes no VMX/SVM.
    Pvm,
    /// kvm_intel/kvm_amd on bare metal.
    Hardware(&'static str),
    /// kvm_intel/kvm_amd inside a VM (nested virtualization); the string
    /// is the outer hypervisor's CPUID signature.
    Nested(&'static str, String),
    /// None of the known modules is loaded.
    Unknown,
}

impl Kind {
    /// Looks at the loaded modules and the CPUID hypervisor leaves.
    pub fn detect() -> Self {
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            return Kind::Pvm;
        }
        let module = if loaded("kvm_intel") {
            "kvm_intel"
        } else if loaded("kvm_amd") {
            "kvm_amd"
        } else {
            return Kind::Unknown;
        };
        match hypervisor_signature() {
            Some(sig) => Kind::Nested(module, sig),
            None => Kind::Hardware(module),
        }
    }
}

/// The CPUID signature of the hypervisor this host runs under, if any
/// (leaf 1 ECX bit 31 says whether there is one; leaf 0x4000_0000 names it).
fn hypervisor_signature() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    if __cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    let leaf = __cpuid(0x4000_0000);
    let bytes: Vec<u8> = [leaf.ebx, leaf.ecx, leaf.edx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .filter(|b| *b != 0)
        .collect();
    Some(String::from_utf8_lossy(&bytes).trim().to_string())
}

/// The line saying what kind of KVM this is and what it means.
pub fn kvm_kind(kind: &Kind) -> Check {
    match kind {
        Kind::Pvm => Check::fail(
            "KVM here is PVM (kvm_pvm: software virtualization without VMX/SVM): only \
             PVM-enabled guest kernels run; stock Linux guests cannot run, under any VMM",
            "use a host with hardware virtualization or nested virtualization (a bare-metal \
             machine, a GitHub-hosted Linux runner, a cloud instance type with nested \
             virtualization); this project's tests/boot/run.sh runs guests in a nested \
             QEMU harness instead",
        ),
        Kind::Hardware(m) => Check::ok(format!("hardware KVM ({m})")),
        Kind::Nested(m, sig) if sig.starts_with("TCGTCG") => Check::ok(format!(
            "KVM ({m}) inside a QEMU TCG guest: the CPU is software-emulated, guests run \
             but slowly"
        )),
        Kind::Nested(m, sig) => Check::ok(format!(
            "nested KVM ({m}) inside a VM (hypervisor \"{sig}\"): guests run, somewhat \
             slower than on bare metal"
        )),
        Kind::Unknown => Check::warn(
            "KVM provider unknown (none of kvm_intel, kvm_amd, kvm_pvm is loaded)",
            "if guests fail to start, check dmesg for KVM messages",
        ),
    }
}

/// Transparent huge pages: capsule advises its guest RAM `MADV_HUGEPAGE`,
/// which helps unless THP is off altogether.
pub fn thp() -> Check {
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    let Ok(text) = std::fs::read_to_string(path) else {
        return Check::warn(
            "transparent huge pages: not available",
            "guest RAM uses 4 KiB pages (slower); a kernel with CONFIG_TRANSPARENT_HUGEPAGE helps",
        );
    };
    let mode = text
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or_default();
    if mode == "always" || mode == "madvise" {
        Check::ok(format!(
            "transparent huge pages: {mode} (guest RAM gets 2 MiB pages)"
        ))
    } else {
        Check::warn(
            format!("transparent huge pages: {mode}"),
            format!("guest RAM uses 4 KiB pages (slower): echo madvise | sudo tee {path}"),
        )
    }
}

/// `name` as a command: a path if it has a `/`, else looked up in `PATH`.
pub fn find_program(name: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let p = Path::new(name);
    if p.as_os_str().as_encoded_bytes().contains(&b'/') {
        return exec(p).then(|| p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|c| exec(c))
}

/// passt, for `--net user` (`CAPSULE_PASST` or `passt` in `PATH`).
pub fn passt() -> Check {
    let name = std::env::var_os("CAPSULE_PASST").unwrap_or_else(|| "passt".into());
    match find_program(&name) {
        Some(p) => Check::ok(format!("passt: {} (--net user)", p.display())),
        None => Check::warn(
            format!("passt: {} not found", name.to_string_lossy()),
            "--net user needs it: apt-get install passt, or set CAPSULE_PASST to its path",
        ),
    }
}

/// virtiofsd, for virtio-fs shares (`CAPSULE_VIRTIOFSD`, `virtiofsd` in
/// `PATH`, or where Debian and Fedora install it).
pub fn virtiofsd() -> Check {
    let found = match std::env::var_os("CAPSULE_VIRTIOFSD") {
        Some(v) => find_program(&v),
        None => find_program("virtiofsd".as_ref()).or_else(|| {
            ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
                .iter()
                .map(PathBuf::from)
                .find(|p| find_program(p.as_os_str()).is_some())
        }),
    };
    match found {
        Some(p) => Check::ok(format!("virtiofsd: {} (virtio-fs shares)", p.display())),
        None => Check::warn(
            "virtiofsd: not found",
            "virtio-fs shares need it: apt-get install virtiofsd (or cargo install \
             virtiofsd), or set CAPSULE_VIRTIOFSD to its path",
        ),
    }
}

/// The capability number of `CAP_NET_ADMIN` (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// Whether this process has `CAP_NET_ADMIN` in its effective set.
fn has_cap_net_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// /dev/net/tun and CAP_NET_ADMIN, for `--net tap=`.
pub fn tun() -> Check {
    let path = "/dev/net/tun";
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        return Check::warn(
            format!("TAP: cannot open {path} ({e})"),
            "--net tap= needs it: modprobe tun, or fix its permissions (mode 0666 is usual)",
        );
    }
    if has_cap_net_admin() {
        Check::ok("TAP: /dev/net/tun usable, CAP_NET_ADMIN held (capsule can create TAP devices)")
    } else {
        Check::warn(
            "TAP: /dev/net/tun usable, but no CAP_NET_ADMIN",
            "--net tap=NAME needs a TAP device made for you first: sudo ip tuntap add NAME \
             mode tap user $USER (or use --net user)",
        )
    }
}

/// /dev/vhost-net, for `--net tap=NAME,vhost=on`.
pub fn vhost_net() -> Check {
    let path = "/dev/vhost-net";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Check::ok("vhost-net: /dev/vhost-net usable (--net tap=NAME,vhost=on)"),
        Err(e) => Check::warn(
            format!("vhost-net: cannot open {path} ({e})"),
            "--net tap=NAME,vhost=on needs it: modprobe vhost_net, or access to it \
             (it is root's by default)",
        ),
    }
}

/// Whether an unprivileged user namespace can be created (passt sandboxes
/// itself in one), tried in a child process so this one is unchanged.
pub fn user_namespaces() -> Check {
    // SAFETY: fork in this single-threaded process (doctor runs before any
    // thread is started); the child only calls unshare and _exit, both
    // async-signal-safe, and the parent reaps it.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; in the child.
        unsafe {
            let r = libc::unshare(libc::CLONE_NEWUSER);
            libc::_exit(if r == 0 { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child just forked; `status` is a valid out
    // pointer.
    let ok = pid > 0
        && unsafe { libc::waitpid(pid, &mut status, 0) } == pid
        && libc::WIFEXITED(status)
        && libc::WEXITSTATUS(status) == 0;
    if ok {
        Check::ok("user namespaces: available (passt sandboxes itself in one)")
    } else {
        Check::warn(
            "user namespaces: cannot create one",
            "passt (--net user) needs them: sysctl kernel.unprivileged_userns_clone=1 \
             (Debian), kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu), or \
             user.max_user_namespaces > 0",
        )
    }
}

/// cgroup v2 (the unified hierarchy) at /sys/fs/cgroup.
pub fn cgroup_v2() -> Check {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Check::ok("cgroup v2: mounted at /sys/fs/cgroup")
    } else if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        Check::warn(
            "cgroup v2: hybrid hierarchy (v2 only at /sys/fs/cgroup/unified)",
            "resource limits for VMs work best with the unified hierarchy \
             (systemd.unified_cgroup_hierarchy=1 on the host's command line)",
        )
    } else {
        Check::warn(
            "cgroup v2: not mounted",
            "resource limits for VMs need it: boot the host with \
             systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup",
        )
    }
}

/// seccomp filters (the `seccomp` syscall answers whether the kill-process
/// action exists) and Landlock (its ABI version).
pub fn sandboxing() -> Vec<Check> {
    let action: u32 = 0x8000_0000; // SECCOMP_RET_KILL_PROCESS
                                   // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 passed by pointer
                                   // and changes nothing.
    let seccomp = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            2, // SECCOMP_GET_ACTION_AVAIL
            0,
            &action as *const u32,
        )
    } == 0;
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION (1) and a null
    // attribute, the call only returns the ABI version.
    let landlock = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    vec![
        if seccomp {
            Check::ok("seccomp: filters supported")
        } else {
            Check::warn(
                "seccomp: filters not supported",
                "capsule cannot confine itself: use a host kernel with CONFIG_SECCOMP_FILTER",
            )
        },
        if landlock > 0 {
            Check::ok(format!("Landlock: ABI version {landlock}"))
        } else {
            Check::warn(
                "Landlock: not available",
                "file access cannot be restricted: use a host kernel from 5.13 on with \
                 CONFIG_SECURITY_LANDLOCK and landlock in lsm=",
            )
        },
    ]
}
