//! What the shim needs to know that containerd does not tell it: where
//! `capsule` and the guest kernel are, and the microVM's shape.
//!
//! Read from [`CONFIG_FILE`] (`key = value` lines, `#` comments; optional),
//! then overridden by `CAPSULE_SHIM_<KEY>` environment variables (the shim
//! inherits containerd's environment).

use std::path::{Path, PathBuf};

/// The shim's configuration file.
pub const CONFIG_FILE: &str = "/etc/capsule/containerd-shim.conf";

/// How the container's root directory reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsMode {
    /// Live over virtio-fs (`capsule exec --fs-root`): nothing copied,
    /// writes land in the bundle's rootfs at once. Needs a virtiofsd.
    Virtiofs,
    /// Packed into the guest's initramfs (`capsule exec --rootfs`): no
    /// virtiofsd needed, but the container's writes stay in the VM.
    Copy,
}

/// The shim's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    /// The `capsule` binary.
    pub capsule: PathBuf,
    /// Guest kernel (bzImage or vmlinux) with virtio-mmio, vsock and
    /// virtio-fs built in (`resources/guest-kernel.config`).
    pub kernel: PathBuf,
    /// vCPUs per microVM.
    pub cpus: u8,
    /// Guest memory per microVM, as `capsule exec --memory` takes it.
    pub memory: String,
    /// How the rootfs reaches the guest.
    pub rootfs: RootfsMode,
    /// More kernel command line, if any.
    pub append: Option<String>,
}

impl ShimConfig {
    /// The configuration from [`CONFIG_FILE`] (if it exists) and the
    /// environment. `capsule` defaults to the binary beside the shim's own,
    /// else `capsule` in `PATH`.
    pub fn load() -> Result<Self, String> {
        let text = match std::fs::read_to_string(CONFIG_FILE) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {CONFIG_FILE}: {e}")),
        };
        let beside = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("capsule")))
            .filter(|p| p.is_file());
        let default_capsule = beside.unwrap_or_else(|| PathBuf::from("capsule"));
        Self::parse(&text, |k| std::env::var(k).ok(), &default_capsule)
    }

    /// Parses the file's `text`, then applies `env` (`CAPSULE_SHIM_KERNEL`,
    /// ...). The kernel is required.
    pub fn parse(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        default_capsule: &Path,
    ) -> Result<Self, String> {
        let mut cfg = Self {
            capsule: default_capsule.to_path_buf(),
            kernel: PathBuf::new(),
            cpus: 1,
            memory: "256M".into(),
            rootfs: RootfsMode::Virtiofs,
            append: None,
        };
        let mut pairs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("{CONFIG_FILE} line {}: expected key = value", n + 1))?;
            pairs.push((k.trim().to_string(), v.trim().to_string()));
        }
        for key in ["capsule", "kernel", "cpus", "memory", "rootfs", "append"] {
            if let Some(v) = env(&format!("CAPSULE_SHIM_{}", key.to_uppercase())) {
                pairs.push((key.to_string(), v));
            }
        }
        for (k, v) in pairs {
            match k.as_str() {
                "capsule" => cfg.capsule = PathBuf::from(v),
                "kernel" => cfg.kernel = PathBuf::from(v),
                "cpus" => {
                    cfg.cpus = v
                        .parse()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| format!("cpus = {v}: expected 1 to 254"))?
                }
                "memory" => cfg.memory = v,
                "rootfs" => {
                    cfg.rootfs = match v.as_str() {
                        "virtiofs" => RootfsMode::Virtiofs,
                        "copy" => RootfsMode::Copy,
                        _ => return Err(format!("rootfs = {v}: expected virtiofs or copy")),
                    }
                }
                "append" => cfg.append = Some(v).filter(|s| !s.is_empty()),
                _ => return Err(format!("{CONFIG_FILE}: unknown key {k}")),
            }
        }
        if cfg.kernel.as_os_str().is_empty() {
            return Err(format!(
                "no guest kernel: set kernel = PATH in {CONFIG_FILE} or CAPSULE_SHIM_KERNEL"
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn file_then_environment() {
        let text = "# capsule shim\nkernel = /k/bzImage\ncpus=2\n\nmemory = 512M\nrootfs = copy\n";
        let c = ShimConfig::parse(text, no_env, Path::new("/bin/capsule")).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k/bzImage"));
        assert_eq!((c.cpus, c.memory.as_str()), (2, "512M"));
        assert_eq!(c.rootfs, RootfsMode::Copy);
        assert_eq!(c.capsule, PathBuf::from("/bin/capsule"));
        let env = |k: &str| (k == "CAPSULE_SHIM_KERNEL").then(|| "/other".to_string());
        let c = ShimConfig::parse(text, env, Path::new("capsule")).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/other"));
    }

    #[test]
    fn bad_files_are_refused() {
        let p = Path::new("capsule");
        assert!(ShimConfig::parse("", no_env, p)
            .unwrap_err()
            .contains("no guest kernel"));
        for bad in [
            "kernel=/k\ncpus=0",
            "kernel=/k\ncpus=x",
            "kernel=/k\nrootfs=nfs",
            "kernel=/k\nwhat=1",
            "kernel",
        ] {
            assert!(ShimConfig::parse(bad, no_env, p).is_err(), "{bad}");
        }
    }
}
