//! The allow-lists, as data: for each kind of capsule thread, the system
//! calls it may make once its filter is installed, each with the argument
//! values it may use where that matters, and why it is there.
//!
//! They were derived from the code paths each thread runs, then checked
//! by running capsule with `CAPSULE_SECCOMP=log` (every call outside the
//! list is allowed but logged by the kernel with the thread's name) over
//! the VMM and API test suites and reading the log, and by the boot cases
//! in the nested harness with the filters enforcing (`docs/security.md`,
//! "Confinement": how to add a call).
//! Calls that features being built now will need are listed too, marked
//! with the feature, so that those features do not die of `SIGSYS`.
//!
//! What runs *before* a thread's filter (opening files, creating the VM,
//! mapping guest memory, starting passt or virtiofsd, spawning threads) is
//! not listed: filters go on after setup.

mod common;

use super::ioctls::{self, Ioctl};
use super::ThreadKind;
use common::common;

/// A constraint on one argument of an allowed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Only {
    /// Any arguments.
    Any,
    /// Argument `arg` (its low 32 bits) is one of `values`.
    OneOf {
        /// Argument index (0-based).
        arg: u8,
        /// The named values allowed.
        values: Vec<(&'static str, u64)>,
    },
    /// Argument `arg` (its low 32 bits) has none of the bits of `mask`.
    Without {
        /// Argument index (0-based).
        arg: u8,
        /// The forbidden flag, by name.
        flag: &'static str,
        /// Its bits.
        mask: u64,
    },
}

/// One allowed system call.
#[derive(Debug, Clone)]
pub struct Allow {
    /// The call's name.
    pub name: &'static str,
    /// Its number on x86_64.
    pub nr: i64,
    /// What its arguments may be.
    pub only: Only,
    /// Why threads of this kind make it (the features or code paths).
    pub why: String,
}

fn any(name: &'static str, nr: i64, why: &'static str) -> Allow {
    Allow {
        name,
        nr,
        only: Only::Any,
        why: why.into(),
    }
}

fn ioctl_only(list: &[&[Ioctl]], why: &'static str) -> Allow {
    Allow {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        only: Only::OneOf {
            arg: 1,
            values: list.iter().flat_map(|l| l.iter().copied()).collect(),
        },
        why: why.into(),
    }
}

fn no_exec(name: &'static str, nr: i64, why: &'static str) -> Allow {
    Allow {
        name,
        nr,
        only: Only::Without {
            arg: 2,
            flag: "PROT_EXEC",
            mask: libc::PROT_EXEC as u64,
        },
        why: why.into(),
    }
}

fn fcntl_only(cmds: &[(&'static str, libc::c_int)], why: &'static str) -> Allow {
    Allow {
        name: "fcntl",
        nr: libc::SYS_fcntl,
        only: Only::OneOf {
            arg: 1,
            values: cmds.iter().map(|&(n, c)| (n, c as u64)).collect(),
        },
        why: why.into(),
    }
}

fn families(name: &'static str, nr: i64, why: &'static str) -> Allow {
    Allow {
        name,
        nr,
        only: Only::OneOf {
            arg: 0,
            values: vec![("AF_UNIX", libc::AF_UNIX as u64)],
        },
        why: why.into(),
    }
}

/// The main thread once the VM runs: the device event loop, the API's
/// VMM side (pause, resume, Ctrl-Alt-Del, logger), `capsule exec`'s
/// session and copy-back, and the teardown.
fn vmm() -> Vec<Allow> {
    [
        common(),
        event_loop(),
        device_io(),
        descriptors_and_locks(),
        runtime_files(),
        helper_processes(),
        sockets(),
        memory_files(),
        metrics_timer(),
        standard_library(),
        vmm_ioctls(),
    ]
    .concat()
}

/// The device event loop: epoll, eventfds, polls.
fn event_loop() -> Vec<Allow> {
    use libc::*;
    let ev = "device event loop";
    vec![
        any("epoll_wait", SYS_epoll_wait, ev),
        any("epoll_pwait", SYS_epoll_pwait, ev),
        any("epoll_ctl", SYS_epoll_ctl, ev),
        any("epoll_create1", SYS_epoll_create1, ev),
        any("eventfd2", SYS_eventfd2, ev),
        any("poll", SYS_poll, ev),
        any("ppoll", SYS_ppoll, ev),
    ]
}

/// The devices' backend I/O: disk images, TAP and console descriptors,
/// flushes, io_uring, discards.
fn device_io() -> Vec<Allow> {
    use libc::*;
    let io = "virtio-blk, virtio-net, virtio-console I/O";
    vec![
        any("read", SYS_read, io),
        any("readv", SYS_readv, io),
        any("writev", SYS_writev, io),
        any("pread64", SYS_pread64, io),
        any("pwrite64", SYS_pwrite64, io),
        any("preadv", SYS_preadv, io),
        any("pwritev", SYS_pwritev, io),
        any("preadv2", SYS_preadv2, io),
        any("pwritev2", SYS_pwritev2, io),
        any("lseek", SYS_lseek, io),
        any("fsync", SYS_fsync, "virtio-blk flush"),
        any("fdatasync", SYS_fdatasync, "virtio-blk flush"),
        any(
            "io_uring_enter",
            SYS_io_uring_enter,
            "virtio-blk engine=io_uring: submissions and waits (the ring is set up before the filter)",
        ),
        any(
            "fallocate",
            SYS_fallocate,
            "virtio-blk discard and write-zeroes",
        ),
    ]
}

/// Duplicating descriptors, and the `fcntl` locks and leases (limited to
/// those commands): disk image locks and the file-mapped kernel's lease.
fn descriptors_and_locks() -> Vec<Allow> {
    use libc::*;
    vec![
        any("dup", SYS_dup, "duplicating descriptors"),
        fcntl_only(
            &[("F_OFD_SETLK", F_OFD_SETLK), ("F_OFD_GETLK", F_OFD_GETLK)],
            "virtio-blk image locks (snapshots: disks reopened on restore)",
        ),
        fcntl_only(
            &[("F_GETLEASE", F_GETLEASE), ("F_SETLEASE", F_SETLEASE)],
            "the file-mapped kernel's read lease: seen broken, released (kernel_map)",
        ),
        any("dup2", SYS_dup2, "a detached VM's stderr to vmm.log"),
        any("dup3", SYS_dup3, "a detached VM's stderr to vmm.log"),
    ]
}

/// Files and directories: `exec`'s copy-back, the logger, and removing
/// the runtime directory and sockets at teardown.
fn runtime_files() -> Vec<Allow> {
    use libc::*;
    let fs = "exec copy-back, logger and log rotation, runtime directory and socket removal";
    vec![
        any("fstat", SYS_fstat, fs),
        any("newfstatat", SYS_newfstatat, fs),
        any("statx", SYS_statx, fs),
        any("openat", SYS_openat, fs),
        any("getdents64", SYS_getdents64, fs),
        any("mkdir", SYS_mkdir, fs),
        any("mkdirat", SYS_mkdirat, fs),
        any("unlink", SYS_unlink, fs),
        any("unlinkat", SYS_unlinkat, fs),
        any("rmdir", SYS_rmdir, fs),
        any("rename", SYS_rename, fs),
        any("renameat", SYS_renameat, fs),
        any("renameat2", SYS_renameat2, fs),
        any("fchmod", SYS_fchmod, fs),
        any("fchmodat", SYS_fchmodat, fs),
        any("utimensat", SYS_utimensat, fs),
        any("readlink", SYS_readlink, fs),
        any("readlinkat", SYS_readlinkat, fs),
    ]
}

/// Stopping and reaping the helper processes started before the filter.
fn helper_processes() -> Vec<Allow> {
    use libc::*;
    vec![
        any("kill", SYS_kill, "stop passt and virtiofsd"),
        any("wait4", SYS_wait4, "reap passt and virtiofsd"),
        any("waitid", SYS_waitid, "reap passt and virtiofsd"),
    ]
}

/// Sockets: passt's stream, vhost-user, vsock and API connections; new
/// sockets are Unix ones only.
fn sockets() -> Vec<Allow> {
    use libc::*;
    vec![
        any("sendto", SYS_sendto, "passt stream; vsock"),
        any("recvfrom", SYS_recvfrom, "passt stream; vsock"),
        any(
            "sendmsg",
            SYS_sendmsg,
            "vhost-user (virtio-fs, SCM_RIGHTS); vsock",
        ),
        any(
            "recvmsg",
            SYS_recvmsg,
            "vhost-user (virtio-fs, SCM_RIGHTS); vsock",
        ),
        any("shutdown", SYS_shutdown, "vsock; API connections"),
        any("getsockopt", SYS_getsockopt, "vsock: SO_ERROR of a connect"),
        any("accept4", SYS_accept4, "vsock: host-initiated connections"),
        any(
            "connect",
            SYS_connect,
            "vsock: guest-initiated connections to Unix sockets",
        ),
        families("socket", SYS_socket, "vsock: Unix sockets only"),
    ]
}

/// Memory files: the snapshot memory file's size, virtio-fs's shared
/// guest memory.
fn memory_files() -> Vec<Allow> {
    use libc::*;
    vec![
        any(
            "ftruncate",
            SYS_ftruncate,
            "snapshots: memory file size; virtio-fs: memfd size",
        ),
        any(
            "memfd_create",
            SYS_memfd_create,
            "virtio-fs: shared guest memory",
        ),
    ]
}

/// The Firecracker-compatible API's periodic metrics flush.
fn metrics_timer() -> Vec<Allow> {
    use libc::*;
    vec![
        any(
            "timerfd_create",
            SYS_timerfd_create,
            "API compat: periodic metrics flush",
        ),
        any(
            "timerfd_settime",
            SYS_timerfd_settime,
            "API compat: periodic metrics flush",
        ),
    ]
}

/// What the standard library asks of the kernel on the main thread.
fn standard_library() -> Vec<Allow> {
    vec![any(
        "sched_getaffinity",
        libc::SYS_sched_getaffinity,
        "standard library: available parallelism",
    )]
}

/// The main thread's ioctls, limited to the request numbers its devices
/// and snapshots use.
fn vmm_ioctls() -> Vec<Allow> {
    vec![ioctl_only(
        &[
            ioctls::KVM_VM_RUN,
            ioctls::KVM_VM_STATE,
            ioctls::KVM_VCPU_RUN,
            ioctls::KVM_VCPU_STATE,
            ioctls::TUN_RUN,
            ioctls::VHOST_NET_RUN,
            ioctls::FILE,
        ],
        "KVM: interrupts, notifications, memory slots; snapshots: VM and vCPU state, dirty log; TAP offloads; vhost-net stopped when its device is dropped",
    )]
}

/// A vCPU thread: `KVM_RUN` and the device register accesses it handles
/// (console output, activating virtio devices, powering off).
fn vcpu() -> Vec<Allow> {
    use libc::*;
    let dev = "device register accesses handled on the vCPU (serial output, virtio activation)";
    let mut v = common();
    v.extend([
        // A detached VM's console.log rotates on the thread that writes
        // the guest's serial output; openat and rename are common.
        any("statx", SYS_statx, "detached console.log rotation"),
        // The boot-time marker (a guest port write) sums the threads' CPU
        // time from /proc/self/task/*/schedstat.
        any(
            "getdents64",
            SYS_getdents64,
            "boot-time marker: list /proc/self/task",
        ),
        any("read", SYS_read, dev),
        any("writev", SYS_writev, dev),
        any("lseek", SYS_lseek, dev),
        any(
            "epoll_ctl",
            SYS_epoll_ctl,
            "virtio activation registers queue events",
        ),
        any(
            "sendmsg",
            SYS_sendmsg,
            "virtio-fs: vhost-user messages on activation",
        ),
        any(
            "recvmsg",
            SYS_recvmsg,
            "virtio-fs: vhost-user replies on activation",
        ),
        any(
            "io_uring_enter",
            SYS_io_uring_enter,
            "virtio-blk engine=io_uring: a device reset waits for the requests in flight",
        ),
    ]);
    v.push(ioctl_only(
        &[
            ioctls::KVM_VCPU_RUN,
            ioctls::KVM_VCPU_STATE,
            ioctls::KVM_VM_RUN,
            ioctls::TUN_RUN,
            ioctls::VHOST_NET_RUN,
        ],
        "KVM_RUN; snapshots: vCPU state; TAP offloads on virtio-net activation; vhost-net rings on activation and reset",
    ));
    v
}

/// The API thread: HTTP over the Unix socket, requests handed to the main
/// thread through a channel and an eventfd.
fn api() -> Vec<Allow> {
    use libc::*;
    let http = "HTTP over the API socket";
    let mut v = common();
    v.extend([
        any("poll", SYS_poll, http),
        any("ppoll", SYS_ppoll, http),
        any("accept4", SYS_accept4, http),
        any("read", SYS_read, http),
        any("recvfrom", SYS_recvfrom, http),
        any("sendto", SYS_sendto, http),
        any("writev", SYS_writev, http),
        any("shutdown", SYS_shutdown, http),
        any("getsockopt", SYS_getsockopt, http),
        any("setsockopt", SYS_setsockopt, http),
    ]);
    v.push(ioctl_only(&[ioctls::FILE], "non-blocking connections"));
    v
}

/// `capsule exec`'s stdin reader: reads stdin into a channel.
fn exec_stdin() -> Vec<Allow> {
    let mut v = common();
    v.push(any("read", libc::SYS_read, "read stdin"));
    v
}

/// A named VM's `wait.sock` acceptor.
fn waiters() -> Vec<Allow> {
    let mut v = common();
    v.push(any(
        "accept4",
        libc::SYS_accept4,
        "accept `capsule wait` connections",
    ));
    v
}

/// The allow-list of a kind of thread, one entry per call (argument
/// constraints of the same call merged).
pub fn allowed(kind: ThreadKind) -> Vec<Allow> {
    let list = match kind {
        ThreadKind::Vmm => vmm(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Api => api(),
        ThreadKind::ExecStdin => exec_stdin(),
        ThreadKind::Waiters => waiters(),
    };
    merge(list)
}

/// Merges entries for the same call: `Any` wins over constraints; value
/// lists on the same argument are united. Other constraints stay separate
/// entries (the filter allows the call if any of them holds).
fn merge(list: Vec<Allow>) -> Vec<Allow> {
    let mut out: Vec<Allow> = Vec::new();
    for a in list {
        if let Some(o) = out.iter_mut().find(|o| o.nr == a.nr && o.only == Only::Any) {
            if !o.why.split("; ").any(|w| w == a.why) {
                o.why = format!("{}; {}", o.why, a.why);
            }
            continue;
        }
        if a.only == Only::Any {
            out.retain(|o| o.nr != a.nr);
            out.push(a);
            continue;
        }
        let same_arg = out.iter_mut().find(|o| {
            o.nr == a.nr
                && matches!((&o.only, &a.only),
                    (Only::OneOf { arg: x, .. }, Only::OneOf { arg: y, .. }) if x == y)
        });
        match (same_arg, a.only.clone()) {
            (Some(o), Only::OneOf { values: more, .. }) => {
                if let Only::OneOf { values, .. } = &mut o.only {
                    for v in more {
                        if !values.contains(&v) {
                            values.push(v);
                        }
                    }
                }
            }
            _ => {
                if !out.iter().any(|o| o.nr == a.nr && o.only == a.only) {
                    out.push(a);
                }
            }
        }
    }
    out.sort_by_key(|a| a.name);
    out
}
