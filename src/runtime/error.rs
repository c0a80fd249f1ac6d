//! Why a runtime-directory operation or a request to a VM's API failed.
//! Each message is the one line a user sees after `capsule: error:`.

use std::path::PathBuf;

/// An error of the [`crate::runtime`] module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM name outside the allowed alphabet or length.
    #[error("invalid VM name '{0}': use 1 to 64 letters, digits, '_', '-' or '.'")]
    BadName(String),
    /// A runtime directory that is a file or a symbolic link.
    #[error("runtime directory {0} is not a directory; refusing to use it")]
    NotDirectory(PathBuf),
    /// A runtime directory another user owns.
    #[error("runtime directory {dir} is owned by uid {owner}, not by you (uid {me}); refusing to use it")]
    NotOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        me: u32,
    },
    /// A runtime directory with group or other permissions.
    #[error("runtime directory {dir} is mode {mode:04o}, open to other users; refusing to use it (chmod 700 it)")]
    OpenMode {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file-system operation on `path` failed; `what` says which
    /// ("cannot create", "cannot read", ...).
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation, as the start of the message.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A VM of that name is running.
    #[error("a VM named '{name}' is already running (pid {pid})")]
    Running {
        /// The name.
        name: String,
        /// Its capsule process.
        pid: i32,
    },
    /// A VM directory without its pid file that is too young to be stale.
    #[error("{0} exists without a pid file (being set up?); remove it if it is not")]
    Unfinished(PathBuf),
    /// This process's identity (start time, boot id) cannot be read.
    #[error("cannot read this process's start time and boot id from /proc")]
    NoIdentity,
    /// The `wait.sock` of a VM directory cannot be bound.
    #[error("cannot create wait.sock: {0}")]
    WaitSocket(#[source] crate::unixsock::BindError),
    /// The thread answering `capsule wait` cannot start.
    #[error("cannot start the waiter thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Nobody answers on the VM's API socket.
    #[error("cannot connect to the VM's API: {0}")]
    ApiConnect(#[source] std::io::Error),
    /// Sending the request failed.
    #[error("API request failed: {0}")]
    ApiSend(#[source] std::io::Error),
    /// No response came (in time).
    #[error("no API response: {0}")]
    ApiNoResponse(#[source] std::io::Error),
    /// The response's status line is not HTTP.
    #[error("bad API response '{0}'")]
    ApiBadResponse(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}
