//! `--fs HOSTDIR:TAG[,ro]`: one virtio-fs device per share, each served
//! by its own virtiofsd, which capsule starts here and stops when the
//! device is dropped (with the VM).
//!
//! The vhost-user socket never has a name anyone else could connect to:
//! it is bound in a fresh 0700 directory, connected to, and unlinked
//! before virtiofsd starts with the listening end (`unixsock::
//! connected_listener`). The directory is made under `$XDG_RUNTIME_DIR`
//! if set, else `$TMPDIR` (`/tmp`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use devices::virtio::fs::daemon::{self, DaemonConfig, DaemonError, Virtiofsd};
use devices::virtio::fs::{FrontendOps, Fs, FsError, NUM_QUEUES};
use vhost::vhost_user::Frontend;

use crate::config::FsConfig;

/// How long virtiofsd may take to answer one vhost-user request (it
/// starts up before its first answer; the nested harness is slow).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a share could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host directory cannot be looked at (missing, no access).
    #[error("--fs {}: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The host path is not a directory.
    #[error("--fs {}: not a directory", .0.display())]
    NotDir(PathBuf),
    /// Two shares have the same tag.
    #[error("--fs {}: the tag {tag} is used twice", dir.display())]
    TagTwice {
        /// The second share's directory.
        dir: PathBuf,
        /// The tag.
        tag: String,
    },
    /// virtiofsd is missing or cannot be started.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The socket to virtiofsd could not be set up.
    #[error("virtio-fs {tag}: cannot set up the vhost-user socket: {source}")]
    Socket {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: crate::unixsock::BindError,
    },
    /// The device could not be created (handshake, tag).
    #[error("virtio-fs {tag}: {source}")]
    Device {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: FsError,
    },
}

/// What can be checked before any KVM work: every directory exists, no
/// tag is used twice, and a virtiofsd binary is there. Returns the binary
/// (none needed without shares).
pub fn check(shares: &[FsConfig]) -> Result<Option<PathBuf>, Error> {
    if shares.is_empty() {
        return Ok(None);
    }
    for (i, share) in shares.iter().enumerate() {
        match std::fs::metadata(&share.dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::NotDir(share.dir.clone())),
            Err(source) => {
                return Err(Error::Dir {
                    dir: share.dir.clone(),
                    source,
                })
            }
        }
        if shares[..i].iter().any(|s| s.tag == share.tag) {
            return Err(Error::TagTwice {
                dir: share.dir.clone(),
                tag: share.tag.clone(),
            });
        }
    }
    daemon::find_binary().map(Some).map_err(Error::Daemon)
}

/// Where the private socket directory goes.
fn socket_parent() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// Starts virtiofsd for `share` and makes its device.
pub fn open(share: &FsConfig, binary: &Path) -> Result<Fs, Error> {
    let socket_err = |source| Error::Socket {
        tag: share.tag.clone(),
        source,
    };
    let (listener, stream) =
        crate::unixsock::connected_listener(&socket_parent()).map_err(socket_err)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| socket_err(crate::unixsock::BindError::Connect(e)))?;
    let config = DaemonConfig {
        binary: binary.to_path_buf(),
        dir: share.dir.clone(),
        read_only: share.read_only,
        submounts: share.submounts,
        sandbox: std::env::var("CAPSULE_VIRTIOFSD_SANDBOX").ok(),
        debug: log::log_enabled!(log::Level::Debug),
    };
    let daemon = Virtiofsd::spawn(&config, listener.into())?;
    let frontend = FrontendOps::new(Frontend::from_stream(stream, NUM_QUEUES as u64));
    let fs =
        Fs::new(&share.tag, Box::new(frontend), Some(daemon)).map_err(|source| Error::Device {
            tag: share.tag.clone(),
            source,
        })?;
    log::info!(
        "virtio-fs {}: {}{}",
        share.tag,
        share.dir.display(),
        if share.read_only { " (read-only)" } else { "" }
    );
    Ok(fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake with a real virtiofsd (whichever this host has:
    /// `CAPSULE_VIRTIOFSD`, or Debian's; the test fails if there is none,
    /// it does not skip), then the daemon is stopped with the device.
    #[test]
    fn real_virtiofsd_handshake_and_stop() {
        let binary = daemon::find_binary()
            .expect("this test needs a virtiofsd (qemu-system-common's, or CAPSULE_VIRTIOFSD)");
        let dir = std::env::temp_dir().join(format!("capsule-fs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let share = FsConfig {
            dir: dir.clone(),
            tag: "t".into(),
            read_only: false,
            submounts: true,
        };
        // Sandboxes need namespaces or root: none for the unit test.
        std::env::set_var("CAPSULE_VIRTIOFSD_SANDBOX", "none");
        let fs = open(&share, &binary).unwrap();
        use devices::virtio::VirtioDevice;
        assert_eq!(fs.device_type(), 26);
        assert_ne!(fs.avail_features() & (1 << 32), 0, "VERSION_1 offered");
        drop(fs);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A FUSE_INIT request through a real virtiofsd: capsule hands over
    /// shared guest RAM, the rings (as its own addresses) and the
    /// eventfds; a kick on the request queue's eventfd reaches the daemon
    /// without capsule, the daemon answers in guest memory, and its call
    /// becomes a queue interrupt through the event loop.
    #[test]
    fn real_virtiofsd_answers_fuse_init_through_the_rings() {
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};

        use devices::virtio::{InterruptKind, Queue, VirtioDevice, VirtioInterrupt};
        use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
        use virtio_queue::QueueT;
        use vm_memory::{Bytes, GuestAddress};

        #[derive(Default)]
        struct Irq(Mutex<Vec<InterruptKind>>);
        impl VirtioInterrupt for Irq {
            fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
                self.0.lock().unwrap().push(kind);
                Ok(())
            }
        }

        let binary = daemon::find_binary().expect("this test needs a virtiofsd");
        let dir = std::env::temp_dir().join(format!("capsule-fs-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::env::set_var("CAPSULE_VIRTIOFSD_SANDBOX", "none");
        let share = FsConfig {
            dir: dir.clone(),
            tag: "t".into(),
            read_only: false,
            submounts: true,
        };
        let ram =
            crate::vstate::memory::GuestRam::new_shared(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mem = ram.memory().clone();
        let fs = Arc::new(Mutex::new(open(&share, &binary).unwrap()));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(fs.clone());

        // Two queues of 16 at 0x1000 and 0x4000: descriptors, then the
        // available ring, then the used ring (4-byte aligned).
        let ring = |base: u64| {
            let mut q = Queue::new(16).unwrap();
            let (avail, used) = (base + 256, base + 0x200);
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some(avail as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            q
        };
        // FUSE_INIT (opcode 26), unique 7, protocol 7.31: header + init_in.
        let (req, reply) = (0x10000u64, 0x20000u64);
        let mut msg = Vec::new();
        for v in [56u32, 26] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        msg.extend_from_slice(&7u64.to_le_bytes());
        msg.extend_from_slice(&[0u8; 24]);
        for v in [7u32, 31, 0, 0] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        mem.write_slice(&msg, GuestAddress(req)).unwrap();
        // Descriptor 0 (readable, next 1), descriptor 1 (writable).
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(0x4000 + 16 * i);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        };
        desc(0, req, msg.len() as u32, 1, 1);
        desc(1, reply, 4096, 2, 0);
        mem.write_obj(0u16, GuestAddress(0x4000 + 256 + 4)).unwrap(); // ring[0] = 0
        mem.write_obj(1u16, GuestAddress(0x4000 + 256 + 2)).unwrap(); // idx = 1

        let kicks: Vec<vmm_sys_util::eventfd::EventFd> =
            (0..2).map(|_| devices::eventfd().unwrap()).collect();
        let kick = kicks[1].try_clone().unwrap();
        let irq = Arc::new(Irq::default());
        {
            let mut d = fs.lock().unwrap();
            d.set_acked_features(1 << 32);
            d.activate(
                mem.clone(),
                irq.clone(),
                vec![ring(0x1000), ring(0x4000)],
                kicks,
            )
            .unwrap();
        }
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The interrupt may be relayed (a call from an earlier
        // notification) before this request's used entry is visible: wait
        // for both.
        let used = || {
            mem.read_obj::<u16>(GuestAddress(0x4000 + 0x200 + 2))
                .unwrap()
        };
        while !irq.0.lock().unwrap().contains(&InterruptKind::Queue(1)) || used() == 0 {
            assert!(
                Instant::now() < deadline,
                "no interrupt and used entry for the request queue"
            );
            em.run_with_timeout(100).unwrap();
        }
        assert_eq!(used(), 1, "one request answered");
        let error: i32 = mem.read_obj(GuestAddress(reply + 4)).unwrap();
        let unique: u64 = mem.read_obj(GuestAddress(reply + 8)).unwrap();
        let major: u32 = mem.read_obj(GuestAddress(reply + 16)).unwrap();
        assert_eq!((error, unique, major), (0, 7, 7), "FUSE_INIT answered");
        assert!(fs.lock().unwrap().reset());
        drop(em);
        drop(fs);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shares_are_checked_before_anything_starts() {
        let file = std::env::temp_dir().join(format!("capsule-fs-file-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let share = |dir: &Path, tag: &str| FsConfig {
            dir: dir.to_path_buf(),
            tag: tag.into(),
            read_only: false,
            submounts: true,
        };
        assert!(check(&[]).unwrap().is_none());
        let e = check(&[share(&file, "a")]).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let tmp = std::env::temp_dir();
        let e = check(&[share(&tmp, "a"), share(&tmp, "a")]).unwrap_err();
        assert!(e.to_string().contains("used twice"), "{e}");
        let _ = std::fs::remove_file(&file);
    }
}
