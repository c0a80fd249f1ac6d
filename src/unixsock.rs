//! Binding capsule's Unix sockets (the API socket, a named VM's
//! `api.sock` and `wait.sock`) safely:
//!
//! * Only a *stale socket* at the path is replaced (a socket file nobody
//!   listens on, left by a capsule that was killed). Anything else there —
//!   a regular file, a directory, a FIFO, a symlink — is refused, and a
//!   socket someone listens on is refused as in use.
//! * The socket is mode 0600 whatever the umask, with no moment at which
//!   anybody else could connect. `bind` gives a socket file the mode
//!   `0777 & ~umask`; setting the umask around it would be process-wide and
//!   race with other threads' file creation, and a `chmod` after `bind`
//!   leaves a window. So the socket is bound inside a fresh private (0700)
//!   directory next to the target, `chmod`ed to 0600 there, and then
//!   hard-linked to the target path — `link` fails if anything appeared at
//!   the path meanwhile, so nothing is ever replaced by accident — and the
//!   private directory is removed.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The path does not fit in `sun_path`.
    #[error("the path is longer than {MAX_PATH} bytes")]
    TooLong,
    /// The path ends in `/` or `..`.
    #[error("the path names no file")]
    NoFileName,
    /// The path has a NUL byte.
    #[error("the path contains a NUL byte")]
    Nul,
    /// The path could not be examined.
    #[error("{0}")]
    Stat(#[source] std::io::Error),
    /// Something other than a socket is at the path.
    #[error(
        "it exists and is {0}, not a stale socket; refusing to replace it: remove it or \
         choose another path"
    )]
    NotSocket(&'static str),
    /// A live socket is at the path.
    #[error("another process is serving on it (another capsule?): stop it or choose another path")]
    InUse,
    /// Connecting to the socket at the path failed in an unexpected way.
    #[error("cannot tell whether the socket is in use: {0}")]
    Probe(#[source] std::io::Error),
    /// The stale socket could not be removed.
    #[error("cannot remove the stale socket: {0}")]
    RemoveStale(#[source] std::io::Error),
    /// The private directory to bind in could not be made.
    #[error("cannot create a directory in {dir}: {source}")]
    PrivateDir {
        /// Where it was to be made.
        dir: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// `bind` failed.
    #[error("cannot bind: {0}")]
    Bind(#[source] std::io::Error),
    /// The socket's mode could not be set.
    #[error("cannot set the socket's mode: {0}")]
    Mode(#[source] std::io::Error),
    /// A file appeared at the path while binding.
    #[error("something appeared at the path while binding; refusing to replace it")]
    Raced,
    /// The socket file could not be linked to the path.
    #[error("cannot create the socket file: {0}")]
    Link(#[source] std::io::Error),
    /// Connecting to the new socket failed ([`connected_listener`]).
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
}

/// Longest socket path `bind`/`connect` accept (`sun_path` holds 108
/// bytes with the terminating NUL).
const MAX_PATH: usize = 107;

/// A bound socket's file: removed on drop if it is still ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only unlink the file we created: another capsule may have
        // replaced it after ours went stale. The inode number alone does
        // not say so: a file made after ours was removed can get the same
        // one (seen in a clean-clone CI run), so it must be a socket too.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn c_path(p: &Path) -> Result<CString, BindError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| BindError::Nul)
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// What is at `path`, described for an error message.
fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a socket"
    }
}

/// Makes room at `path`: nothing there, or a stale socket (removed).
fn clear_stale(path: &Path) -> Result<(), BindError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BindError::Stat(e)),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        return Err(BindError::NotSocket(describe(ft)));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            log::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(BindError::RemoveStale)
        }
        Err(e) => Err(BindError::Probe(e)),
    }
}

/// A private directory next to the target; removed on drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn new(parent: &Path) -> Result<Self, BindError> {
        let template = c_path(&parent.join(".capsule-sock-XXXXXX"))?;
        let mut buf = template.into_bytes_with_nul();
        // SAFETY: buf is a NUL-terminated template ending in XXXXXX that
        // mkdtemp rewrites in place; it creates a directory with mode 0700
        // (less any umask bits).
        let p = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(BindError::PrivateDir {
                dir: parent.to_path_buf(),
                source: last_error(),
            });
        }
        buf.pop();
        let dir = Self {
            path: PathBuf::from(std::ffi::OsStr::from_bytes(&buf)),
        };
        use std::os::unix::fs::PermissionsExt;
        // A umask of 0700 or more would leave us unable to bind inside.
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| BindError::PrivateDir {
                dir: parent.to_path_buf(),
                source,
            },
        )?;
        Ok(dir)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A listening Unix socket and a stream already connected to it, with no
/// name anybody else could reach: for a child process (virtiofsd) that is
/// handed the listener and accepts capsule's connection. The socket is
/// bound (mode 0600) inside a fresh private (0700) directory under
/// `parent`, connected to, and then its name and the directory are
/// removed before this returns.
pub fn connected_listener(parent: &Path) -> Result<(UnixListener, UnixStream), BindError> {
    let private = PrivateDir::new(parent)?;
    let dir = std::fs::File::open(&private.path).map_err(|source| BindError::PrivateDir {
        dir: private.path.clone(),
        source,
    })?;
    let path = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
    let listener = UnixListener::bind(&path).map_err(BindError::Bind)?;
    let real = c_path(&private.path.join("s"))?;
    // SAFETY: a valid NUL-terminated path; chmod changes only its mode.
    if unsafe { libc::chmod(real.as_ptr(), 0o600) } != 0 {
        return Err(BindError::Mode(last_error()));
    }
    let stream = UnixStream::connect(&path).map_err(BindError::Connect)?;
    drop(private);
    Ok((listener, stream))
}

/// Binds a listening Unix socket at `path`, mode 0600 (see the module
/// documentation). Refuses a path that holds anything but a stale socket.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), BindError> {
    if path.as_os_str().len() > MAX_PATH {
        return Err(BindError::TooLong);
    }
    if path.file_name().is_none() {
        return Err(BindError::NoFileName);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    clear_stale(path)?;
    let private = PrivateDir::new(&parent)?;
    // Bound through /proc/self/fd so that the temporary path is short
    // whatever the target's length.
    let dir = std::fs::File::open(&private.path).map_err(|source| BindError::PrivateDir {
        dir: parent.clone(),
        source,
    })?;
    let tmp = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
    let listener = UnixListener::bind(&tmp).map_err(BindError::Bind)?;
    let tmp_real = private.path.join("s");
    let tmp_c = c_path(&tmp_real)?;
    // SAFETY: a valid NUL-terminated path; chmod changes only its mode.
    if unsafe { libc::chmod(tmp_c.as_ptr(), 0o600) } != 0 {
        return Err(BindError::Mode(last_error()));
    }
    let target = c_path(path)?;
    // SAFETY: two valid NUL-terminated paths; link creates a new name for
    // the socket file, and fails with EEXIST rather than replace anything.
    if unsafe { libc::link(tmp_c.as_ptr(), target.as_ptr()) } != 0 {
        let e = last_error();
        return Err(if e.raw_os_error() == Some(libc::EEXIST) {
            BindError::Raced
        } else {
            BindError::Link(e)
        });
    }
    drop(private);
    let meta = std::fs::symlink_metadata(path).map_err(BindError::Stat)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// A fresh directory for a test.
#[cfg(test)]
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("capsule-unixsock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn connected_listener_leaves_no_name_behind() {
        let d = scratch("connected");
        let (listener, mut stream) = connected_listener(&d).unwrap();
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "nothing left");
        let (mut theirs, _) = listener.accept().unwrap();
        use std::io::{Read, Write};
        stream.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        theirs.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn refuses_everything_but_a_stale_socket() {
        let d = scratch("refuse");
        let file = d.join("file");
        std::fs::write(&file, "keep me").unwrap();
        let e = bind(&file).unwrap_err().to_string();
        assert!(e.contains("regular file"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        let sub = d.join("dir");
        std::fs::create_dir(&sub).unwrap();
        assert!(bind(&sub).unwrap_err().to_string().contains("a directory"));
        let link = d.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(bind(&link)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
        // A live socket is in use; once its listener is gone it is stale.
        let sock = d.join("sock");
        let (live, f) = bind(&sock).unwrap();
        assert!(bind(&sock).unwrap_err().to_string().contains("serving"));
        std::mem::forget(f);
        drop(live);
        let (_again, _f) = bind(&sock).unwrap();
        // No private directory is left behind.
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".capsule"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn socket_is_private_and_removed_on_drop() {
        let d = scratch("mode");
        let sock = d.join("s.sock");
        let (_l, f) = bind(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        UnixStream::connect(&sock).unwrap();
        drop(f);
        assert!(!sock.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn drop_leaves_a_replaced_socket_alone() {
        let d = scratch("replaced");
        let sock = d.join("s.sock");
        let (l, f) = bind(&sock).unwrap();
        drop(l);
        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&sock, "someone else's").unwrap();
        drop(f);
        assert_eq!(std::fs::read_to_string(&sock).unwrap(), "someone else's");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
