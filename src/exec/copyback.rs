//! Copy-back: files and directories the guest sends from a writable
//! share are created in the share's host directory, and nowhere else.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::session::Session;

/// A writable share's host side, for copy-back.
#[derive(Debug)]
pub(super) struct ShareBack {
    pub(super) host: PathBuf,
    pub(super) writable: bool,
}

impl Session {
    pub(super) fn copy_failed(&mut self, path: &str, e: io::Error) {
        log::warn!("cannot copy back {path}: {e}");
        self.copy_error
            .get_or_insert_with(|| format!("cannot copy {path} back from the guest: {e}"));
    }

    /// Creates `path` in writable share `share`, refusing anything that
    /// would leave the share's host directory.
    pub(super) fn create(
        &self,
        share: u32,
        path: &str,
        dir: bool,
        mode: u32,
    ) -> io::Result<Option<File>> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        let root = match self.shares.get(share as usize) {
            Some(s) if s.writable => &s.host,
            _ => return Err(invalid("not a writable share")),
        };
        let target = safe_join(root, path).ok_or_else(|| invalid("unsafe path"))?;
        let perm = mode & 0o777;
        if dir {
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(invalid("exists and is not a directory")),
                Err(_) => fs::DirBuilder::new().mode(perm | 0o700).create(&target)?,
            }
            return Ok(None);
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(perm)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)?;
        f.set_permissions(fs::Permissions::from_mode(perm))?;
        Ok(Some(f))
    }
}

/// `root/rel` if `rel` is a plain relative path whose existing parents
/// under `root` are real directories (no symlinks, no `..`).
fn safe_join(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    if rel.as_os_str().is_empty() {
        return None;
    }
    let mut path = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        let Component::Normal(name) = c else {
            return None;
        };
        path.push(name);
        if i + 1 < comps.len() {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => return None,
            }
        }
    }
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use exec_proto::{Decoder, GuestMsg};

    use crate::exec::lock;
    use crate::exec::session::tests::session;
    use crate::exec::session::Sink;

    #[test]
    fn safe_join_stays_inside() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = dir.as_path();
        fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        assert_eq!(safe_join(root, "d/f"), Some(root.join("d/f")));
        assert_eq!(safe_join(root, "f"), Some(root.join("f")));
        assert_eq!(safe_join(root, "../f"), None);
        assert_eq!(safe_join(root, "d/../../f"), None);
        assert_eq!(safe_join(root, "/etc/passwd"), None);
        assert_eq!(safe_join(root, "evil/passwd"), None);
        assert_eq!(safe_join(root, "missing/f"), None);
        assert_eq!(safe_join(root, ""), None);
    }

    #[test]
    fn copy_back_writes_only_inside_writable_shares() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = dir.as_path().to_path_buf();
        std::os::unix::fs::symlink("/etc/hostname", root.join("link")).unwrap();
        let s = Arc::new(Mutex::new(session(vec![
            ShareBack {
                host: root.clone(),
                writable: true,
            },
            ShareBack {
                host: root.clone(),
                writable: false,
            },
        ])));
        let mut sink = Sink {
            session: s.clone(),
            decoder: Decoder::new(),
        };
        let mut stream = Vec::new();
        let msgs = [
            GuestMsg::Hello {
                version: exec_proto::VERSION,
            },
            GuestMsg::Dir {
                share: 0,
                mode: 0o755,
                path: "sub".into(),
            },
            GuestMsg::File {
                share: 0,
                mode: 0o640,
                path: "sub/result.bin".into(),
            },
            GuestMsg::FileData(vec![1, 2, 3]),
            GuestMsg::FileData(vec![4]),
            // Hostile or not allowed: none of these may write anything.
            GuestMsg::File {
                share: 0,
                mode: 0o644,
                path: "../escape".into(),
            },
            GuestMsg::FileData(b"x".to_vec()),
            GuestMsg::File {
                share: 0,
                mode: 0o644,
                path: "link".into(),
            },
            GuestMsg::File {
                share: 1,
                mode: 0o644,
                path: "ro".into(),
            },
            GuestMsg::File {
                share: 7,
                mode: 0o644,
                path: "nope".into(),
            },
            GuestMsg::Exit(42),
        ];
        for m in &msgs {
            m.encode(&mut stream);
        }
        for chunk in stream.chunks(3) {
            sink.write_all(chunk).unwrap();
        }
        let s = lock(&s);
        assert_eq!(s.exit, Some(42));
        assert!(s.copy_error.is_some());
        assert_eq!(fs::read(root.join("sub/result.bin")).unwrap(), [1, 2, 3, 4]);
        assert!(!dir.as_path().parent().unwrap().join("escape").exists());
        assert!(!root.join("ro").exists());
        assert!(!root.join("nope").exists());
        assert!(fs::symlink_metadata(root.join("link"))
            .unwrap()
            .is_symlink());
    }
}
