//! The compiled filters, run on a small classic-BPF interpreter: what
//! each thread kind really lets through, arguments included.

use super::*;

const ALLOW: u32 = 0x7fff_0000;

/// Runs `prog` on a `seccomp_data` for call `nr` with `args`; returns the
/// action.
fn run(prog: &BpfProgram, nr: i64, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&(nr as i32).to_le_bytes());
    data[4..8].copy_from_slice(&0xc000_003eu32.to_le_bytes()); // AUDIT_ARCH_X86_64
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let word =
        |off: u32| u32::from_le_bytes(data[off as usize..off as usize + 4].try_into().unwrap());
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let i = &prog[pc];
        pc += 1;
        match i.code {
            0x20 => acc = word(i.k),    // ld w abs
            0x54 => acc &= i.k,         // alu and k
            0x06 => return i.k,         // ret k
            0x05 => pc += i.k as usize, // ja
            0x15 | 0x25 | 0x35 | 0x45 => {
                let t = match i.code {
                    0x15 => acc == i.k,
                    0x25 => acc > i.k,
                    0x35 => acc >= i.k,
                    _ => acc & i.k != 0,
                };
                pc += usize::from(if t { i.jt } else { i.jf });
            }
            c => panic!("instruction {c:#x} not modelled"),
        }
    }
}

fn allows(kind: ThreadKind, nr: i64, args: [u64; 6]) -> bool {
    run(&compile(kind, Mode::Kill).unwrap(), nr, args) == ALLOW
}

#[test]
fn every_filter_compiles_in_every_mode() {
    for kind in ThreadKind::ALL {
        for mode in [Mode::Kill, Mode::Trap, Mode::Log] {
            let p = compile(kind, mode).unwrap();
            assert!(p.len() < 4096, "{}: {} instructions", kind.name(), p.len());
        }
    }
}

/// What each kind of thread was seen calling (`CAPSULE_SECCOMP=log` over
/// the tiny-guest and API tests, and the boot cases' failures,
/// `docs/security.md`), with arguments where the filter looks at them.
#[test]
fn each_thread_kind_allows_what_it_was_seen_calling() {
    use libc::*;
    let common = [
        SYS_futex,
        SYS_write,
        SYS_close,
        SYS_munmap,
        SYS_madvise,
        SYS_brk,
        SYS_exit,
        SYS_exit_group,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_getrandom,
        SYS_clock_nanosleep,
        SYS_tgkill,
        SYS_getpid,
        SYS_gettid,
        SYS_sched_yield,
    ];
    let seen: &[(ThreadKind, &[i64])] = &[
        (
            ThreadKind::Vmm,
            &[
                SYS_epoll_wait,
                SYS_epoll_ctl,
                SYS_read,
                SYS_readv,
                SYS_writev,
                SYS_pread64,
                SYS_pwrite64,
                SYS_preadv,
                SYS_pwritev,
                SYS_fdatasync,
                SYS_fallocate,
                SYS_lseek,
                SYS_openat,
                SYS_unlink,
                SYS_unlinkat,
                SYS_rmdir,
                SYS_getdents64,
                SYS_statx,
                SYS_newfstatat,
                SYS_kill,
                SYS_wait4,
                SYS_recvfrom,
                SYS_sendto,
                SYS_accept4,
                SYS_dup2,
                SYS_rename,
                SYS_mkdir,
                SYS_fchmod,
            ],
        ),
        (
            ThreadKind::Vcpu,
            &[SYS_read, SYS_writev, SYS_openat, SYS_rename, SYS_getdents64],
        ),
        (
            ThreadKind::Api,
            &[
                SYS_poll,
                SYS_accept4,
                SYS_read,
                SYS_recvfrom,
                SYS_sendto,
                SYS_setsockopt,
            ],
        ),
        (ThreadKind::ExecStdin, &[SYS_read]),
        (ThreadKind::Waiters, &[SYS_accept4]),
    ];
    for (kind, calls) in seen {
        for &nr in common.iter().chain(calls.iter()) {
            assert!(
                allows(*kind, nr, [0; 6]),
                "{}: call {nr} refused",
                kind.name()
            );
        }
        // Memory without PROT_EXEC, the terminal restored.
        let rw = (PROT_READ | PROT_WRITE) as u64;
        assert!(allows(*kind, SYS_mmap, [0, 4096, rw, 0x22, u64::MAX, 0]));
        assert!(allows(
            *kind,
            SYS_mprotect,
            [0, 4096, PROT_NONE as u64, 0, 0, 0]
        ));
        assert!(allows(*kind, SYS_ioctl, [0, TCSETS, 0, 0, 0, 0]));
        assert!(allows(*kind, SYS_fcntl, [0, F_GETFD as u64, 0, 0, 0, 0]));
        assert!(allows(*kind, SYS_fcntl, [0, F_SETFL as u64, 0, 0, 0, 0]));
    }
    let kvm = |name: &str| {
        ioctls::KVM_VCPU_RUN
            .iter()
            .chain(ioctls::KVM_VM_RUN)
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    };
    assert!(allows(
        ThreadKind::Vcpu,
        SYS_ioctl,
        [0, kvm("KVM_RUN"), 0, 0, 0, 0]
    ));
    assert!(allows(
        ThreadKind::Vcpu,
        SYS_ioctl,
        [0, kvm("KVM_GET_REGS"), 0, 0, 0, 0]
    ));
    assert!(allows(
        ThreadKind::Vmm,
        SYS_ioctl,
        [0, kvm("KVM_IRQFD"), 0, 0, 0, 0]
    ));
    assert!(allows(
        ThreadKind::Vmm,
        SYS_ioctl,
        [0, TUNSETOFFLOAD, 0, 0, 0, 0]
    ));
    assert!(allows(
        ThreadKind::Vmm,
        SYS_socket,
        [AF_UNIX as u64, 1, 0, 0, 0, 0]
    ));
}

#[test]
fn what_no_thread_may_do() {
    use libc::*;
    let rwx = (PROT_READ | PROT_WRITE | PROT_EXEC) as u64;
    for kind in ThreadKind::ALL {
        let name = kind.name();
        for nr in [
            SYS_execve,
            SYS_execveat,
            SYS_clone,
            SYS_clone3,
            SYS_fork,
            SYS_vfork,
            SYS_ptrace,
            SYS_mount,
            SYS_setuid,
            SYS_bpf,
            SYS_init_module,
            SYS_process_vm_writev,
            SYS_perf_event_open,
            SYS_kexec_load,
            SYS_keyctl,
            SYS_unshare,
            SYS_chroot,
        ] {
            assert!(!allows(kind, nr, [0; 6]), "{name}: call {nr} allowed");
        }
        // No new executable memory, no making memory executable.
        assert!(
            !allows(kind, SYS_mmap, [0, 4096, rwx, 0x22, u64::MAX, 0]),
            "{name}"
        );
        assert!(
            !allows(kind, SYS_mprotect, [0, 4096, PROT_EXEC as u64, 0, 0, 0]),
            "{name}"
        );
        // No new VM, no other KVM or device ioctl.
        assert!(
            !allows(kind, SYS_ioctl, [0, 0xae01, 0, 0, 0, 0]),
            "{name}: KVM_CREATE_VM"
        );
        assert!(
            !allows(kind, SYS_ioctl, [0, TUNSETIFF, 0, 0, 0, 0]),
            "{name}: TUNSETIFF"
        );
        assert!(
            !allows(kind, SYS_ioctl, [0, 0x5412, 0, 0, 0, 0]),
            "{name}: TIOCSTI"
        );
        // No signal-driven I/O or leases on descriptors.
        assert!(
            !allows(kind, SYS_fcntl, [0, F_SETOWN as u64, 0, 0, 0, 0]),
            "{name}: F_SETOWN"
        );
        // No network sockets.
        for family in [AF_INET, AF_INET6, AF_NETLINK, AF_PACKET] {
            assert!(
                !allows(kind, SYS_socket, [family as u64, 1, 0, 0, 0, 0]),
                "{name}: {family}"
            );
        }
    }
    // Threads that need no file system beyond log rotation (openat,
    // which Landlock keeps to the runtime directory) remove nothing and
    // reach no other process or socket.
    for kind in [ThreadKind::Api, ThreadKind::ExecStdin, ThreadKind::Waiters] {
        for nr in [
            SYS_open,
            SYS_unlinkat,
            SYS_unlink,
            SYS_rmdir,
            SYS_connect,
            SYS_kill,
            SYS_socket,
        ] {
            assert!(
                !allows(kind, nr, [0; 6]),
                "{}: call {nr} allowed",
                kind.name()
            );
        }
    }
    // Only the event loop and vCPUs touch KVM.
    assert!(!allows(ThreadKind::Api, SYS_ioctl, [0, 0xae80, 0, 0, 0, 0]));
}

#[test]
fn filter_files_round_trip_and_garbage_is_refused() {
    let mut map = BTreeMap::new();
    for kind in [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu] {
        map.insert(kind.name().to_string(), compile(kind, Mode::Trap).unwrap());
    }
    let bytes = file::encode(&map);
    assert_eq!(file::decode(&bytes).unwrap(), map);
    assert!(matches!(
        file::decode(&bytes[..bytes.len() - 3]),
        Err(file::DecodeError::Truncated(_))
    ));
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(matches!(
        file::decode(&extra),
        Err(file::DecodeError::Trailing(1))
    ));
    assert!(file::decode(&u64::MAX.to_le_bytes()).is_err());
    // An empty program is refused (the kernel would refuse it later).
    let mut empty = BTreeMap::new();
    empty.insert("vmm".to_string(), Vec::new());
    assert!(matches!(
        file::decode(&file::encode(&empty)),
        Err(file::DecodeError::Count { count: 0, .. })
    ));
}

#[test]
fn trap_message_names_thread_and_call() {
    let mut buf = [0u8; 256];
    let mut name = [0u8; 16];
    name[..5].copy_from_slice(b"vcpu0");
    let n = trap::message(&mut buf, &name, 101);
    let line = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(
        line.starts_with("capsule: error: seccomp: thread 'vcpu0' made a forbidden system call 101; stopping (status 159)"),
        "{line}"
    );
    assert!(line.ends_with('\n'));
}

/// docs/security.md shows the lists as `capsule seccomp` prints them.
#[test]
fn security_doc_shows_the_current_lists() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/security.md")).unwrap();
    let updated =
        render::update_doc(&doc).expect("docs/security.md lacks the seccomp-filters markers");
    assert!(
        updated == doc,
        "docs/security.md is out of date: run `capsule seccomp --doc docs/security.md`"
    );
}
