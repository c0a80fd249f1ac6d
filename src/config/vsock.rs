//! The virtio-vsock device's options (`--vsock`, `PUT /vsock`) and their parser.

use std::path::PathBuf;

/// A virtio-vsock device with Firecracker's host side: host clients
/// connect to `uds_path`, guest connections to host port P go to
/// `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more, below 2^32 - 1).
    pub guest_cid: u64,
    /// The Unix socket capsule listens on (created mode 0600).
    pub uds_path: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    /// Parses `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", n)) => {
                    cid = Some(
                        n.parse::<u64>()
                            .map_err(|_| format!("invalid vsock CID '{n}'"))?,
                    )
                }
                Some(("uds", p)) if !p.is_empty() => uds = Some(PathBuf::from(p)),
                _ => {
                    return Err(format!(
                        "unknown vsock option '{opt}' (expected cid=N,uds=PATH)"
                    ))
                }
            }
        }
        let config = Self {
            guest_cid: cid.ok_or("vsock needs cid=N")?,
            uds_path: uds.ok_or("vsock needs uds=PATH")?,
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

impl VsockConfig {
    /// Checks the CID: 0-2 are reserved (hypervisor, local, host) and
    /// Linux's CIDs are 32 bits with `u32::MAX` meaning any.
    pub fn validate(&self) -> Result<(), BadCid> {
        if !(3..u64::from(u32::MAX)).contains(&self.guest_cid) {
            return Err(BadCid(self.guest_cid));
        }
        Ok(())
    }
}

/// A vsock CID outside what a guest may have.
#[derive(Debug, thiserror::Error)]
#[error("invalid vsock CID {0} (3 to {max}; 0-2 are reserved)", max = u32::MAX - 1)]
pub struct BadCid(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock() {
        let v: VsockConfig = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!(
            v,
            VsockConfig {
                guest_cid: 3,
                uds_path: "/run/v.sock".into()
            }
        );
        let v: VsockConfig = "uds=a,cid=4294967294".parse().unwrap();
        assert_eq!(v.guest_cid, u64::from(u32::MAX) - 1);
        for bad in [
            "",
            "cid=3",
            "uds=x",
            "cid=2,uds=x",
            "cid=0,uds=x",
            "cid=4294967295,uds=x",
            "cid=x,uds=y",
            "cid=3,uds=",
            "cid=3,uds=x,mode=1",
            "cid=-3,uds=x",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }
}
