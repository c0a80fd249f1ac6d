//! The session's private socket directory and the path of its listener.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A private (0700) directory for the session's sockets, removed (with
/// what is left in it) when dropped.
pub(in crate::exec) struct PrivateDir(pub(in crate::exec) PathBuf);

impl PrivateDir {
    /// Creates `capsule-exec.<pid>.<n>` in `$XDG_RUNTIME_DIR`, else the
    /// temporary directory; never reuses an existing one.
    pub(in crate::exec) fn new() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let mut last = None;
        for i in 0..16u32 {
            let dir = base.join(format!(
                "capsule-exec.{}.{}",
                std::process::id(),
                nanos.wrapping_add(i)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    // Under Landlock (applied once the VM is set up) the
                    // directory and its sockets must still be removable at
                    // the end: its entries, and the directory in `base`.
                    crate::landlock::allow(&dir, crate::landlock::Reach::ReadWrite);
                    crate::landlock::allow(&base, crate::landlock::Reach::RemoveEntries);
                    return Ok(Self(dir));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free directory name")))
    }

    /// A path in the directory.
    pub(in crate::exec) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The path of the listener for guest connections to `port`.
pub(in crate::exec) fn port_path(uds: &Path, port: u32) -> PathBuf {
    devices::virtio::vsock::forward_path(uds, port)
}
