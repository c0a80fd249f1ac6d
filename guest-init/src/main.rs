//! `capsule-init`: PID 1 of a `capsule exec` guest.
//!
//! capsule puts this static binary in the initramfs it generates, at
//! [`exec_proto::INIT_PATH`], with the command description at
//! [`exec_proto::CONFIG_PATH`] and the shared host files under
//! [`exec_proto::SHARE_DIR`]. The init:
//!
//! 1. mounts `/proc`, `/sys`, `/dev` (devtmpfs) and `/tmp`;
//! 2. connects a vsock stream to the host (CID 2, port
//!    [`exec_proto::VSOCK_PORT`]) — or, with `capsule.channel=console` on
//!    the command line, opens the virtio-console port `/dev/hvc0` in raw
//!    mode — and says `Hello`; the host answers with the time, which sets
//!    the clock;
//! 3. with `--disk`, mounts `/dev/vda` as the command's root;
//! 4. mounts, inside the command's root, each share on its guest
//!    directory (read-only ones read-only; the state of writable copies
//!    noted), each shared file on its guest path and each tmpfs
//!    (`mounts.rs`);
//! 5. runs the command with pipes for stdin, stdout and stderr and forwards
//!    them over the port as frames, with a heartbeat every second; while
//!    it runs, also runs each process the host asks for on vsock port
//!    [`exec_proto::EXEC_VSOCK_PORT`] (the containerd shim's `exec`), each
//!    over its own connection, and kills them when the command ends;
//! 6. when the command has exited, sends back what changed in the writable
//!    shares, then the exit status, and powers off.
//!
//! If anything before the command fails, an `Error` frame says why (or,
//! without a port, a line on the serial console) and the VM powers off.

#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        reason = "test fixtures cast small, known values"
    )
)]

mod agent;
mod channel;
mod command;
mod hostfs;
mod mounts;
mod net;
mod pump;
mod sys;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use exec_proto::{ExecSpec, GuestMsg, CONFIG_PATH, SHARE_DIR, VERSION};

use channel::Channel;

/// Held by the tests that fork children and by those that wait for a
/// descriptor's last copy to close: a child forked by one test holds
/// copies of every descriptor until it executes, and a reap takes any
/// child of the test process.
#[cfg(test)]
pub(crate) static TEST_CHILDREN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where `--disk` is mounted.
const DISK_ROOT: &str = "/.capsule/root";
/// Read size for files sent back to the host, and for host frames.
pub(crate) const CHUNK: usize = 64 * 1024;
/// Read size for the command's output (a data frame's largest payload):
/// with the pipes enlarged to [`OUTPUT_PIPE_SIZE`], one read, one frame
/// and one socket write move this much while the command goes on writing.
const OUTPUT_CHUNK: usize = exec_proto::MAX_PAYLOAD;
/// Size asked for the command's stdout and stderr pipes (Linux's default
/// `pipe-max-size`; 64 KiB if refused).
const OUTPUT_PIPE_SIZE: i32 = 1 << 20;
/// Stop reading host frames while this much stdin waits for the command.
const STDIN_HIGH_WATER: usize = 1 << 20;
/// File systems tried for `--disk`.
const DISK_FS: [&str; 5] = ["ext4", "ext3", "ext2", "xfs", "btrfs"];
/// PATH when the user gives none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn main() {
    if std::process::id() != 1 {
        eprintln!("capsule-init: this is the guest init of `capsule exec`; it runs as PID 1 only");
        std::process::exit(2);
    }
    let mut chan = None;
    match run(&mut chan) {
        Ok(()) => {}
        Err(msg) => {
            eprintln!("capsule-init: {msg}");
            if let Some(c) = chan.as_mut() {
                let _ = c.send(&GuestMsg::Error(msg));
            }
        }
    }
    if let Some(c) = chan.as_mut() {
        c.finish();
    }
    sys::power_off();
}

fn run(chan_slot: &mut Option<Channel>) -> Result<(), String> {
    mount_basics("").map_err(|e| format!("cannot mount /proc, /sys, /dev: {e}"))?;
    let _ = sys::mount(Some("tmpfs"), b"/tmp", Some("tmpfs"), 0);
    // The spec first: its kernel modules may be what makes the channel's
    // device appear (a distribution kernel's virtio_console, virtio_mmio).
    // Its errors are reported once the channel is open, if it opens.
    let spec = fs::read(CONFIG_PATH)
        .map_err(|e| format!("cannot read {CONFIG_PATH}: {e}"))
        .and_then(|c| ExecSpec::from_bytes(&c).map_err(|e| format!("bad {CONFIG_PATH}: {e}")));
    let modules = match &spec {
        Ok(spec) => hostfs::load_modules(spec),
        Err(_) => Ok(()),
    };
    let chan = chan_slot.insert(Channel::open().map_err(|e| match &modules {
        Err(m) => format!("{e} ({m})"),
        Ok(()) => e,
    })?);
    chan.send(&GuestMsg::Hello { version: VERSION })
        .map_err(|e| format!("cannot write to the host: {e}"))?;
    // An exec template's init has no command of its own: it waits for one
    // (and is snapshotted waiting); each clone's host sends its own.
    let (spec, early_stdin) = if spec.as_ref().is_ok_and(|s| s.await_command) {
        modules?;
        channel::wait_for_command(chan_slot)?
    } else {
        let early = channel::wait_for_time(chan)?;
        modules?;
        (spec?, early)
    };
    let chan = chan_slot.as_mut().ok_or("no channel to the host")?;

    let root = if spec.host_root {
        hostfs::mount_host_root()?
    } else if spec.fs_root {
        hostfs::mount_fs_root()?
    } else if spec.disk {
        mount_disk()?;
        PathBuf::from(DISK_ROOT)
    } else {
        PathBuf::from("/")
    };
    let snapshots = mounts::mount_all(&spec, &root)?;
    net::configure(&spec.nets)?;
    if let Some(text) = net::resolv_conf(&spec.nets) {
        set_resolv_conf(&root, &text);
    }
    let status = command::run_command(chan, &spec, &root, early_stdin)?;
    copy_back(chan, &spec, &snapshots).map_err(|e| format!("cannot copy shares back: {e}"))?;
    // SAFETY: plain system call.
    unsafe { libc::sync() };
    chan.send(&GuestMsg::Exit(status))
        .map_err(|e| format!("cannot report the exit status: {e}"))?;
    Ok(())
}

/// Mounts proc, sysfs and devtmpfs under `prefix` (creating the mount
/// points). devtmpfs may already be there (`CONFIG_DEVTMPFS_MOUNT`).
/// Gives the command `text` as its /etc/resolv.conf: bound over the
/// root's own file (which stays unmodified on its disk), or written where
/// there is none. A failure only costs name resolution: logged.
fn set_resolv_conf(root: &Path, text: &str) {
    const OURS: &str = "/.capsule/resolv.conf";
    let target = root.join("etc/resolv.conf");
    let result = fs::write(OURS, text).and_then(|()| match fs::symlink_metadata(&target) {
        Ok(m) if m.is_file() => sys::mount(
            Some(OURS),
            target.as_os_str().as_bytes(),
            None,
            libc::MS_BIND,
        ),
        Ok(_) => Err(io::Error::other("not a regular file; left as it is")),
        Err(_) => fs::create_dir_all(root.join("etc")).and_then(|()| fs::write(&target, text)),
    });
    if let Err(e) = result {
        eprintln!("capsule-init: cannot set {}: {e}", target.display());
    }
}

pub(crate) fn mount_basics(prefix: &str) -> io::Result<()> {
    for (fs, dir) in [("proc", "proc"), ("sysfs", "sys"), ("devtmpfs", "dev")] {
        let target = format!("{prefix}/{dir}");
        let _ = fs::create_dir_all(&target);
        match sys::mount(Some(fs), target.as_bytes(), Some(fs), 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
    }
    // Pseudo-terminals (a `terminal` process): their slaves appear in the
    // command's root as /dev/pts/N. Without devpts only terminals fail.
    let pts = format!("{prefix}/dev/pts");
    let _ = fs::create_dir_all(&pts);
    if let Err(e) = sys::mount_data(
        "devpts",
        pts.as_bytes(),
        "devpts",
        0,
        "mode=0620,ptmxmode=0666",
    ) {
        if e.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("capsule-init: no terminals: cannot mount {pts}: {e}");
        }
    }
    Ok(())
}

fn mount_disk() -> Result<(), String> {
    fs::create_dir_all(DISK_ROOT).map_err(|e| format!("cannot create {DISK_ROOT}: {e}"))?;
    let mut last = None;
    // Read-write first; a read-only disk (`--disk IMG,ro`) then read-only.
    'outer: for flags in [0, libc::MS_RDONLY] {
        for fs in DISK_FS {
            match sys::mount(Some("/dev/vda"), DISK_ROOT.as_bytes(), Some(fs), flags) {
                Ok(()) => {
                    last = None;
                    break 'outer;
                }
                Err(e) => last = Some(e),
            }
        }
    }
    if let Some(e) = last {
        return Err(format!("cannot mount --disk (/dev/vda) as the root: {e}"));
    }
    mount_basics(DISK_ROOT).map_err(|e| format!("cannot mount /proc, /sys, /dev on --disk: {e}"))
}

/// What a file looked like before the command ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
    mode: u32,
}

pub(crate) type Snapshot = HashMap<PathBuf, Stamp>;

pub(crate) fn stamp(meta: &fs::Metadata) -> Stamp {
    Stamp {
        size: meta.size(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
        ino: meta.ino(),
        mode: meta.mode(),
    }
}

/// Every directory and regular file under `dir`, parents before children,
/// as (path relative to `dir`, metadata). Symlinks and special files are
/// not followed or listed.
pub(crate) fn walk(dir: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(dir.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let meta = entry.metadata()?; // does not follow symlinks
            let path = rel.join(entry.file_name());
            if meta.is_dir() {
                stack.push(path.clone());
                out.push((path, meta));
            } else if meta.is_file() {
                out.push((path, meta));
            }
        }
    }
    Ok(out)
}

pub(crate) fn share_source(index: usize) -> PathBuf {
    PathBuf::from(format!("{SHARE_DIR}/{index}"))
}

fn in_root(root: &Path, guest_path: &[u8]) -> PathBuf {
    let rel = Path::new(OsStr::from_bytes(guest_path));
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    root.join(rel)
}

/// Sends what the command created or changed in the writable shares.
fn copy_back(chan: &mut Channel, spec: &ExecSpec, snaps: &[Option<Snapshot>]) -> io::Result<()> {
    for (i, snap) in snaps.iter().enumerate() {
        // The host names shares by a u32 index; it never sends that many.
        let Ok(share) = u32::try_from(i) else { break };
        let Some(snap) = snap else { continue };
        let src = share_source(i);
        debug_assert!(spec.shares.get(i).is_some_and(|s| s.1));
        for (rel, meta) in walk(&src)? {
            if snap.get(&rel) == Some(&stamp(&meta)) {
                continue;
            }
            let Some(path) = rel.to_str().map(str::to_string) else {
                eprintln!(
                    "capsule-init: not copying back {}: name is not UTF-8",
                    rel.display()
                );
                continue;
            };
            let mode = meta.mode() & 0o7777;
            if meta.is_dir() {
                chan.send(&GuestMsg::Dir { share, mode, path })?;
                continue;
            }
            let mut file = match File::open(src.join(&rel)) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("capsule-init: not copying back {path}: {e}");
                    continue;
                }
            };
            chan.send(&GuestMsg::File { share, mode, path })?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                chan.send(&GuestMsg::FileData(buf[..n].to_vec()))?;
            }
        }
    }
    Ok(())
}
