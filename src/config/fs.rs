//! The virtio-fs shares' options (`--fs`) and their parser.

use std::path::PathBuf;

/// A host directory shared with the guest over virtio-fs (`--fs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The host directory.
    pub dir: PathBuf,
    /// The mount tag the guest names it by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// virtiofsd refuses the guest's writes.
    pub read_only: bool,
    /// Mount points under `dir` are shown to the guest as submounts
    /// (virtiofsd's default). Off for `exec --host-root`, whose share is
    /// an overlayfs lower layer: overlayfs refuses such automount points
    /// (`EREMOTE`).
    pub submounts: bool,
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    /// Parses `HOSTDIR:TAG[,ro]`. The directory may itself contain `:`;
    /// the tag is what follows the last one.
    fn from_str(s: &str) -> Result<Self, String> {
        let (spec, read_only) = match s.strip_suffix(",ro") {
            Some(spec) => (spec, true),
            None => (s, false),
        };
        let Some((dir, tag)) = spec.rsplit_once(':') else {
            return Err(format!("invalid --fs '{s}' (expected HOSTDIR:TAG[,ro])"));
        };
        if dir.is_empty() {
            return Err(format!("invalid --fs '{s}': empty host directory"));
        }
        if tag.is_empty() || tag.len() > 36 || tag.contains([',', '\0']) {
            return Err(format!(
                "invalid --fs tag '{tag}' (1 to 36 bytes, no comma; expected HOSTDIR:TAG[,ro])"
            ));
        }
        Ok(Self {
            dir: PathBuf::from(dir),
            tag: tag.to_string(),
            read_only,
            submounts: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_shares() {
        let f: FsConfig = "/srv/a:b:tag".parse().unwrap();
        assert_eq!(
            f,
            FsConfig {
                dir: "/srv/a:b".into(),
                tag: "tag".into(),
                read_only: false,
                submounts: true,
            }
        );
        let f: FsConfig = "/x:t,ro".parse().unwrap();
        assert!(f.read_only);
        assert_eq!(f.tag, "t");
        for bad in [
            "/x",
            ":t",
            "/x:",
            "/x:a,b",
            &format!("/x:{}", "t".repeat(37)),
            "/x:t,rw",
        ] {
            assert!(bad.parse::<FsConfig>().is_err(), "{bad}");
        }
    }
}
