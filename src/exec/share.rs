//! The guest mounts of `capsule exec`'s command line: `--share
//! HOSTDIR:GUESTDIR[:ro]` (or a file) and `--tmpfs GUESTDIR[:OPTIONS]`.

use std::path::PathBuf;

/// A host directory, or a single file, shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Host directory or file.
    pub host: PathBuf,
    /// Absolute guest path.
    pub guest: String,
    /// The command may write it (a copied directory's changes are copied
    /// back to `host` when it exits).
    pub writable: bool,
}

impl std::str::FromStr for Share {
    type Err = String;

    /// Parses `HOSTDIR:GUESTDIR[:ro|:rw]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, writable) = match s.rsplit_once(':') {
            Some((r, "ro")) => (r, false),
            Some((r, "rw")) => (r, true),
            _ => (s, true),
        };
        let Some((host, guest)) = rest.split_once(':') else {
            return Err(format!("'{s}': expected HOSTDIR:GUESTDIR[:ro]"));
        };
        if host.is_empty() {
            return Err(format!("'{s}': empty host directory"));
        }
        if !guest.starts_with('/') || guest.contains(':') {
            return Err(format!(
                "'{s}': the guest directory must be an absolute path without ':'"
            ));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            writable,
        })
    }
}

/// A tmpfs mounted in the guest (`--tmpfs GUESTDIR[:OPTIONS]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    /// Absolute guest directory, inside the command's root.
    pub guest: String,
    /// Comma-separated mount options: `size=`, `mode=`, `nr_inodes=`,
    /// `uid=`, `gid=`, `ro`, `nosuid`, `nodev`, `noexec`, `noatime` are
    /// honoured, others ignored.
    pub options: String,
}

impl std::str::FromStr for Tmpfs {
    type Err = String;

    /// Parses `GUESTDIR[:OPTIONS]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (guest, options) = s.split_once(':').unwrap_or((s, ""));
        if !guest.starts_with('/') {
            return Err(format!(
                "'{s}': expected GUESTDIR[:OPTIONS], GUESTDIR an absolute path"
            ));
        }
        if options.contains(':') {
            return Err(format!("'{s}': the options cannot hold ':'"));
        }
        Ok(Self {
            guest: guest.to_string(),
            options: options.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse() {
        let s: Share = "/host/in:/in:ro".parse().unwrap();
        assert_eq!(
            s,
            Share {
                host: "/host/in".into(),
                guest: "/in".into(),
                writable: false
            }
        );
        let s: Share = "out:/work/out".parse().unwrap();
        assert!(s.writable);
        assert_eq!(s.host, PathBuf::from("out"));
        let s: Share = "out:/o:rw".parse().unwrap();
        assert!(s.writable);
        assert!("nocolon".parse::<Share>().is_err());
        assert!(":/x".parse::<Share>().is_err());
        assert!("h:relative".parse::<Share>().is_err());
        assert!("h:/a:b:ro".parse::<Share>().is_err());
    }

    #[test]
    fn tmpfs_parse() {
        let t: Tmpfs = "/run:size=64m,mode=755".parse().unwrap();
        assert_eq!(t.guest, "/run");
        assert_eq!(t.options, "size=64m,mode=755");
        let t: Tmpfs = "/dev/shm".parse().unwrap();
        assert_eq!((t.guest.as_str(), t.options.as_str()), ("/dev/shm", ""));
        assert!("run".parse::<Tmpfs>().is_err());
        assert!("/a:size=1:x".parse::<Tmpfs>().is_err());
    }
}
