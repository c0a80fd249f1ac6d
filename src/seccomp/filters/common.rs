//! What every capsule thread's filter starts with: the allocator, the
//! standard library's primitives, logging and its rotation, and the
//! fail-stop and signal paths, grouped by concern.

use super::{any, fcntl_only, ioctl_only, no_exec, Allow};
use crate::seccomp::ioctls;

/// What every capsule thread needs: the allocator, the standard library's
/// thread and time primitives, logging (a `write` to stderr or the log
/// file), and the fail-stop and signal paths (restore the terminal, raise
/// the signal again, exit), which may run on any thread.
pub(super) fn common() -> Vec<Allow> {
    [
        memory_allocator(),
        threads_and_time(),
        writes_and_closes(),
        signals_and_exit(),
        log_rotation(),
        terminal_and_descriptor_flags(),
    ]
    .concat()
}

/// The allocator's calls; `PROT_EXEC` is refused so that no thread can
/// make memory executable once its filter is on.
fn memory_allocator() -> Vec<Allow> {
    use libc::*;
    let mem = "memory allocator";
    vec![
        any("brk", SYS_brk, mem),
        no_exec("mmap", SYS_mmap, mem),
        no_exec("mprotect", SYS_mprotect, mem),
        any("munmap", SYS_munmap, mem),
        any("mremap", SYS_mremap, mem),
        any(
            "madvise",
            SYS_madvise,
            "memory allocator; balloon (MADV_DONTNEED)",
        ),
    ]
}

/// The standard library's locks, clocks, sleeps and random seeds.
fn threads_and_time() -> Vec<Allow> {
    use libc::*;
    vec![
        any("futex", SYS_futex, "locks, channels, condition variables"),
        any(
            "clock_gettime",
            SYS_clock_gettime,
            "time (when the vDSO falls back)",
        ),
        any("clock_nanosleep", SYS_clock_nanosleep, "sleeps"),
        any("nanosleep", SYS_nanosleep, "sleeps"),
        any("sched_yield", SYS_sched_yield, "spin loops in locks"),
        any("getrandom", SYS_getrandom, "hash map seeds; virtio-rng"),
    ]
}

/// Logging and eventfd signalling (`write`), and dropping descriptors.
fn writes_and_closes() -> Vec<Allow> {
    use libc::*;
    vec![
        any("write", SYS_write, "logging, eventfds"),
        any("close", SYS_close, "dropping descriptors"),
    ]
}

/// Signal handlers, raising a signal again, and thread and process exit:
/// the fail-stop and termination paths may run on any thread.
fn signals_and_exit() -> Vec<Allow> {
    use libc::*;
    vec![
        any("restart_syscall", SYS_restart_syscall, "interrupted sleeps"),
        any(
            "rt_sigreturn",
            SYS_rt_sigreturn,
            "return from the vCPU kick and termination signal handlers",
        ),
        any(
            "rt_sigprocmask",
            SYS_rt_sigprocmask,
            "signal masks (raise, thread exit)",
        ),
        any(
            "rt_sigaction",
            SYS_rt_sigaction,
            "die of a termination signal: reset its handler",
        ),
        any("sigaltstack", SYS_sigaltstack, "thread exit"),
        any("getpid", SYS_getpid, "raise"),
        any("gettid", SYS_gettid, "raise"),
        any("tgkill", SYS_tgkill, "raise; vCPU kicks (SIGRTMIN)"),
        any("exit", SYS_exit, "thread exit"),
        any("exit_group", SYS_exit_group, "process exit (fail-stop)"),
    ]
}

/// The logger rotates a detached VM's vmm.log on whichever thread logs
/// the line that fills it; Landlock keeps these to the runtime directory.
fn log_rotation() -> Vec<Allow> {
    use libc::*;
    vec![
        any(
            "newfstatat",
            SYS_newfstatat,
            "logging: is vmm.log full (fstat)",
        ),
        any("fstat", SYS_fstat, "logging: is vmm.log full (fstat)"),
        any(
            "openat",
            SYS_openat,
            "logging: vmm.log rotation (Landlock: runtime directory only)",
        ),
        any("rename", SYS_rename, "logging: vmm.log rotation"),
        any("renameat", SYS_renameat, "logging: vmm.log rotation"),
        any("renameat2", SYS_renameat2, "logging: vmm.log rotation"),
        any(
            "dup2",
            SYS_dup2,
            "logging: vmm.log rotation (new file on stderr)",
        ),
        any(
            "dup3",
            SYS_dup3,
            "logging: vmm.log rotation (new file on stderr)",
        ),
    ]
}

/// The terminal ioctls (restoring it on the way out) and the descriptor
/// flag commands of `fcntl`, each limited to the commands used.
fn terminal_and_descriptor_flags() -> Vec<Allow> {
    use libc::*;
    vec![
        ioctl_only(
            &[ioctls::TERMINAL],
            "restore the terminal (fail-stop, signals)",
        ),
        fcntl_only(
            &[
                ("F_GETFD", F_GETFD),
                ("F_SETFD", F_SETFD),
                ("F_GETFL", F_GETFL),
                ("F_SETFL", F_SETFL),
                ("F_DUPFD_CLOEXEC", F_DUPFD_CLOEXEC),
            ],
            "descriptor flags (non-blocking FIFOs, close-on-exec); debug builds check a descriptor is open before closing it",
        ),
    ]
}
