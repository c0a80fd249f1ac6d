//! `capsule doctor`: can capsule run VMs on this host, and with this
//! kernel? One line per check, each failure with what to do.
//!
//! A check is *required* (its failure means capsule cannot run VMs here:
//! no usable KVM, or a kernel capsule cannot boot) or *optional* (a
//! feature some options need: passt for `--net user`, TAP, virtiofsd,
//! ...). The exit status is 0 when no required check failed.

mod host;
pub mod kernel;

use std::path::{Path, PathBuf};

pub use host::Kind;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Passed.
    pub ok: bool,
    /// A failure makes capsule unable to run VMs.
    pub required: bool,
    /// What was found.
    pub what: String,
    /// What to do about a failure.
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: impl Into<String>) -> Self {
        Self {
            ok: true,
            required: true,
            what: what.into(),
            fix: None,
        }
    }
    fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            ok: false,
            required: true,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
    fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            required: false,
            ..Self::fail(what, fix)
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "✓" } else { "✗" };
        write!(f, "{mark} {}", self.what)?;
        if let Some(fix) = &self.fix {
            let kind = if self.required { "" } else { "optional; " };
            write!(f, " ({kind}to fix: {fix})")?;
        }
        Ok(())
    }
}

/// What to check.
#[derive(Debug, Default)]
pub struct Options {
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// A guest kernel whose configuration to check.
    pub kernel: Option<PathBuf>,
}

/// Runs every check, in the order they are printed.
pub fn checks(opts: &Options) -> Vec<Check> {
    let mut out = host::kvm_checks(&opts.kvm_path);
    out.push(host::thp());
    out.push(host::passt());
    out.push(host::virtiofsd());
    out.push(host::tun());
    out.push(host::vhost_net());
    out.push(host::user_namespaces());
    out.push(host::cgroup_v2());
    out.extend(host::sandboxing());
    if let Some(k) = &opts.kernel {
        out.extend(kernel_checks(k));
    }
    out
}

/// Prints the checks and a summary; returns whether capsule can run VMs.
pub fn run(opts: &Options) -> bool {
    let all = checks(opts);
    for c in &all {
        println!("{c}");
    }
    let failed = all.iter().filter(|c| !c.ok && c.required).count();
    if failed == 0 {
        println!("capsule can run VMs here.");
    } else {
        println!(
            "capsule cannot run VMs here: {failed} required check{} failed (✗ above).",
            if failed == 1 { "" } else { "s" }
        );
    }
    failed == 0
}

/// A kernel option capsule needs or uses.
struct Want {
    /// What it is, for the user.
    what: &'static str,
    /// The symbols, all of which must be set.
    symbols: &'static [&'static str],
    /// Without it capsule cannot boot the kernel usefully.
    required: bool,
    /// What needs it.
    needed_by: &'static str,
}

const WANTS: &[Want] = &[
    Want {
        what: "64-bit x86 kernel",
        symbols: &["CONFIG_X86_64"],
        required: true,
        needed_by: "capsule boots only x86_64 kernels",
    },
    Want {
        what: "8250 serial console",
        symbols: &["CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE"],
        required: true,
        needed_by: "console=ttyS0, the guest's console",
    },
    Want {
        what: "initramfs",
        symbols: &["CONFIG_BLK_DEV_INITRD"],
        required: true,
        needed_by: "--initrd and capsule exec",
    },
    Want {
        what: "virtio-mmio",
        symbols: &["CONFIG_VIRTIO_MMIO"],
        required: true,
        needed_by: "every virtio device: --disk, --net, capsule exec",
    },
    Want {
        what: "ACPI",
        symbols: &["CONFIG_ACPI"],
        required: false,
        needed_by: "poweroff ending the VM and finding the virtio-mmio devices; without it \
                    use reboot and acpi=off with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
    },
    Want {
        what: "virtio-blk",
        symbols: &["CONFIG_VIRTIO_BLK"],
        required: false,
        needed_by: "--disk",
    },
    Want {
        what: "virtio-net",
        symbols: &["CONFIG_VIRTIO_NET"],
        required: false,
        needed_by: "--net",
    },
    Want {
        what: "virtio-console",
        symbols: &["CONFIG_VIRTIO_CONSOLE"],
        required: false,
        needed_by: "capsule exec's fallback channel (CAPSULE_EXEC_CHANNEL=console)",
    },
    Want {
        what: "vsock",
        symbols: &["CONFIG_VSOCKETS", "CONFIG_VIRTIO_VSOCKETS"],
        required: false,
        needed_by: "capsule exec (its channel) and virtio-vsock devices",
    },
    Want {
        what: "virtio-fs",
        symbols: &["CONFIG_FUSE_FS", "CONFIG_VIRTIO_FS"],
        required: false,
        needed_by: "virtio-fs shares",
    },
];

/// How a symbol is set in a configuration: `y`, `m`, another value, or
/// not at all.
fn value<'a>(config: &'a str, symbol: &str) -> Option<&'a str> {
    config.lines().find_map(|l| {
        l.strip_prefix(symbol)
            .and_then(|rest| rest.strip_prefix('='))
            .filter(|v| *v != "n")
    })
}

/// The checks of a kernel's configuration against the options capsule
/// needs or uses (virtio-mmio, the 8250 console, ACPI, virtio-blk, ...).
pub fn config_checks(config: &str) -> Vec<Check> {
    WANTS
        .iter()
        .map(|w| {
            let values: Vec<Option<&str>> = w.symbols.iter().map(|s| value(config, s)).collect();
            let missing: Vec<&str> = w
                .symbols
                .iter()
                .zip(&values)
                .filter(|(_, v)| v.is_none())
                .map(|(s, _)| *s)
                .collect();
            if !missing.is_empty() {
                let what = format!("kernel: no {} ({} not set)", w.what, missing.join(", "));
                let fix = format!(
                    "needed by {}: build the kernel with {}=y",
                    w.needed_by,
                    missing.join("=y, ")
                );
                return if w.required {
                    Check::fail(what, fix)
                } else {
                    Check::warn(what, fix)
                };
            }
            if values.contains(&Some("m")) {
                Check::ok(format!(
                    "kernel: {} as a module (the guest's initramfs must load it; capsule \
                     exec's does not)",
                    w.what
                ))
            } else {
                Check::ok(format!("kernel: {}", w.what))
            }
        })
        .collect()
}

/// Why `capsule exec` cannot work with the kernel at `path`, if its
/// configuration says so: it lacks virtio-mmio or the session's channel
/// (vsock, or virtio-console with `CAPSULE_EXEC_CHANNEL=console`), or has
/// them only as modules while no module directory is given (`modules`).
/// Used to explain a guest whose init never started.
pub fn exec_kernel_problem(path: &Path, console: bool, modules: bool) -> Option<String> {
    let mut wants = vec![("virtio-mmio", "CONFIG_VIRTIO_MMIO")];
    if console {
        wants.push(("virtio-console", "CONFIG_VIRTIO_CONSOLE"));
    } else {
        wants.push(("vsock", "CONFIG_VSOCKETS"));
        wants.push(("virtio-vsock", "CONFIG_VIRTIO_VSOCKETS"));
    }
    let problem = if modules {
        kernel_problem_modules_ok(path, &wants)
    } else {
        kernel_problem(
            path,
            &wants,
            "capsule exec's initramfs cannot load without --modules",
        )
    }?;
    Some(if console || problem.contains("virtio-mmio") {
        problem
    } else {
        format!(
            "{problem}; or set CAPSULE_EXEC_CHANNEL=console to run the session over the \
             virtio console (CONFIG_VIRTIO_CONSOLE=y) instead"
        )
    })
}

/// Why the kernel of a `capsule run` that panicked may not have seen its
/// devices: no virtio-mmio, or no virtio-blk with `--disk` (virtio-net
/// with `--net`); modules count only when there is an initrd to load them.
pub fn run_kernel_problem(path: &Path, disks: bool, nets: bool, initrd: bool) -> Option<String> {
    if !disks && !nets {
        return None;
    }
    let mut wants = vec![("virtio-mmio", "CONFIG_VIRTIO_MMIO")];
    if disks {
        wants.push(("virtio-blk", "CONFIG_VIRTIO_BLK"));
    }
    if nets {
        wants.push(("virtio-net", "CONFIG_VIRTIO_NET"));
    }
    let modules = if initrd {
        None
    } else {
        Some("nothing loads without an --initrd")
    };
    match modules {
        Some(why) => kernel_problem(path, &wants, why),
        None => kernel_problem_modules_ok(path, &wants),
    }
}

fn kernel_problem(path: &Path, wants: &[(&str, &str)], no_modules: &str) -> Option<String> {
    let (_, config) = kernel::inspect(path).ok()?.config?;
    wants.iter().find_map(|(what, symbol)| {
        let problem = match value(&config, symbol) {
            Some("y") => return None,
            Some("m") => format!("the kernel has {what} only as a module, which {no_modules}"),
            _ => format!("the kernel has no {what} ({symbol} is not set)"),
        };
        Some(problem_line(problem, symbol, path))
    })
}

fn kernel_problem_modules_ok(path: &Path, wants: &[(&str, &str)]) -> Option<String> {
    let (_, config) = kernel::inspect(path).ok()?.config?;
    wants.iter().find_map(|(what, symbol)| {
        value(&config, symbol).is_none().then(|| {
            problem_line(
                format!("the kernel has no {what} ({symbol} is not set)"),
                symbol,
                path,
            )
        })
    })
}

fn problem_line(problem: String, symbol: &str, path: &Path) -> String {
    format!(
        "{problem}: use a kernel built with {symbol}=y (capsule doctor --kernel {} lists what \
         else it lacks)",
        path.display()
    )
}

/// Which of the options capsule needs the kernel at `path` has.
pub fn kernel_checks(path: &Path) -> Vec<Check> {
    let info = match kernel::inspect(path) {
        Ok(i) => i,
        Err(e) => {
            return vec![Check::fail(
                format!("kernel: {e}"),
                "give --kernel an ELF vmlinux or a bzImage",
            )]
        }
    };
    let release = info.release.as_deref().unwrap_or("release unknown");
    let Some((source, config)) = info.config else {
        return vec![Check::warn(
            format!(
                "kernel {} ({release}): cannot find its configuration (tried {})",
                path.display(),
                info.tried.join(", ")
            ),
            "build it with CONFIG_IKCONFIG=y, or put its .config beside it as config",
        )];
    };
    let mut out = vec![Check::ok(format!(
        "kernel {} ({release}): configuration {source}",
        path.display()
    ))];
    out.extend(config_checks(&config));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values() {
        let cfg =
            "CONFIG_X86_64=y\nCONFIG_SERIAL_8250=y\n# CONFIG_SERIAL_8250_CONSOLE is not set\n\
                   CONFIG_BLK_DEV_INITRD=y\nCONFIG_VIRTIO_MMIO=m\nCONFIG_ACPI=y\n\
                   CONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_NET=n\nCONFIG_VIRTIO_BLK_SCSI=y\n";
        let checks = config_checks(cfg);
        let find = |what: &str| checks.iter().find(|c| c.what.contains(what)).unwrap();
        assert!(find("64-bit").ok);
        let console = find("8250");
        assert!(!console.ok && console.required);
        assert!(
            console.what.contains("CONFIG_SERIAL_8250_CONSOLE"),
            "{console}"
        );
        assert!(!console.what.contains("CONFIG_SERIAL_8250,"), "{console}");
        assert!(find("virtio-mmio").ok && find("virtio-mmio").what.contains("module"));
        assert!(find("virtio-blk").ok);
        let net = find("virtio-net");
        assert!(!net.ok && !net.required, "=n is not set: {net}");
        assert!(net.to_string().starts_with("✗ "), "{net}");
        assert!(net.to_string().contains("optional"), "{net}");
    }

    #[test]
    fn pvm_is_a_failure_that_says_what_it_means() {
        let c = host::kvm_kind(&Kind::Pvm);
        assert!(!c.ok && c.required);
        assert!(c.what.contains("stock Linux guests cannot run"), "{c}");
        assert!(host::kvm_kind(&Kind::Hardware("kvm_intel")).ok);
        let nested = host::kvm_kind(&Kind::Nested("kvm_amd", "TCGTCGTCGTCG".into()));
        assert!(
            nested.ok && nested.what.contains("software-emulated"),
            "{nested}"
        );
    }

    #[test]
    fn missing_kvm_device_fails_with_what_to_do() {
        let checks = host::kvm_checks(Path::new("/nonexistent/kvm"));
        assert_eq!(checks.len(), 1);
        assert!(!checks[0].ok && checks[0].required);
        assert!(checks[0].to_string().contains("modprobe kvm_intel"));
    }
}
