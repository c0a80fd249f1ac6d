//! The confinement options of `run` and `exec`: seccomp filters
//! ([`crate::seccomp`]) and Landlock ([`crate::landlock`]).

use std::path::PathBuf;

/// Seccomp and Landlock options (flattened into `run` and `exec`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfineArgs {
    /// Run without seccomp filters (a warning says so). Default: every
    /// thread of capsule is confined to the system calls it needs.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Compiled seccomp filters to use instead of capsule's own, in the
    /// format Firecracker loads (seccompiler-bin's output; `capsule
    /// seccomp --compile FILE` writes capsule's own): a filter for each of
    /// `vmm`, `api` and `vcpu` threads.
    #[arg(long, value_name = "FILE", conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,
    /// Do not restrict capsule's file access with Landlock.
    #[arg(long)]
    pub no_landlock: bool,
    /// Another path capsule may reach once the VM runs (repeatable):
    /// `PATH` read-only, `PATH:rw` read-write (e.g. where `PUT /logger`
    /// may put a log after start).
    #[arg(long, value_name = "PATH[:rw]")]
    pub landlock_allow: Vec<String>,
}

/// Errors of [`configure`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Seccomp could not be set up.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    /// Landlock could not be set up.
    #[error(transparent)]
    Landlock(#[from] crate::landlock::Error),
}

/// Confines a helper thread (API, exec stdin, wait.sock) as it starts,
/// before it handles anything: Landlock (the paths registered so far),
/// then its seccomp filter.
pub fn helper_thread(kind: crate::seccomp::ThreadKind) -> Result<(), Error> {
    crate::landlock::restrict_helper()?;
    crate::seccomp::install(kind)?;
    Ok(())
}

/// Prepares the filters and the Landlock policy the VM's threads will
/// apply once it is set up (`main` calls this for `run` and `exec`).
pub fn configure(args: &ConfineArgs) -> Result<(), Error> {
    let mode = crate::seccomp::Mode::from_env()?;
    crate::seccomp::configure(args.no_seccomp, args.seccomp_filter.as_deref(), mode)?;
    crate::setup_step("seccomp configured");
    crate::landlock::configure(!args.no_landlock, &args.landlock_allow)?;
    Ok(())
}
