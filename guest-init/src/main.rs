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
//! 4. bind-mounts each share on its guest directory (read-only ones
//!    remounted read-only) and notes the state of the writable ones;
//! 5. runs the command with pipes for stdin, stdout and stderr and forwards
//!    them over the port as frames, with a heartbeat every second;
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

mod command;
mod hostfs;
mod net;
mod sys;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use exec_proto::{
    Decoder, ExecSpec, GuestMsg, HostMsg, CONFIG_PATH, CONSOLE_CHANNEL_ARG, SHARE_DIR, VERSION,
    VSOCK_PORT,
};

/// Console port to the host (with `capsule.channel=console`).
const PORT: &str = "/dev/hvc0";
/// How long the channel may take to appear (driver probing).
const CHANNEL_WAIT: Duration = Duration::from_secs(5);
/// How long the init waits for its last frames to reach the host.
const FINISH_WAIT: Duration = Duration::from_secs(10);
/// Where `--disk` is mounted.
const DISK_ROOT: &str = "/.capsule/root";
/// Read size for files sent back to the host, and for host frames.
const CHUNK: usize = 64 * 1024;
/// Read size for the command's output (a data frame's largest payload):
/// with the pipes enlarged to [`OUTPUT_PIPE_SIZE`], one read, one frame
/// and one socket write move this much while the command goes on writing.
const OUTPUT_CHUNK: usize = exec_proto::MAX_PAYLOAD;
/// Size asked for the command's stdout and stderr pipes (Linux's default
/// `pipe-max-size`; 64 KiB if refused).
const OUTPUT_PIPE_SIZE: i32 = 1 << 20;
/// Stop reading host frames while this much stdin waits for the command.
const STDIN_HIGH_WATER: usize = 1 << 20;
/// Heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long to wait for the host's time after `Hello`.
const TIME_WAIT: Duration = Duration::from_secs(30);
/// File systems tried for `--disk`.
const DISK_FS: [&str; 5] = ["ext4", "ext3", "ext2", "xfs", "btrfs"];
/// PATH when the user gives none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The channel to the host, both ways: a vsock stream, or the console
/// port.
struct Channel {
    /// Blocking writer: the host always drains, so writes only wait briefly.
    tx: File,
    /// Read without blocking (the console port is opened `O_NONBLOCK`, the
    /// socket is read with `MSG_DONTWAIT`).
    rx: File,
    /// Whether `rx` is a socket.
    socket: bool,
    decoder: Decoder,
    last_sent: Instant,
}

impl Channel {
    /// The vsock channel, or the console one if the command line asks.
    fn open() -> Result<Self, String> {
        let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if cmdline.split_whitespace().any(|a| a == CONSOLE_CHANNEL_ARG) {
            Self::open_console().map_err(|e| format!("cannot open {PORT}: {e}"))
        } else {
            Self::open_vsock()
                .map_err(|e| format!("cannot connect to the host's vsock port {VSOCK_PORT}: {e}"))
        }
    }

    /// Connects to the host's port, retrying while the driver is not
    /// there yet (`ENODEV`) or the connection is refused or reset.
    fn open_vsock() -> io::Result<Self> {
        let deadline = Instant::now() + CHANNEL_WAIT;
        let sock = loop {
            match sys::vsock_connect(libc::VMADDR_CID_HOST, VSOCK_PORT) {
                Ok(fd) => break fd,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.raw_os_error(),
                            Some(
                                libc::ENODEV
                                    | libc::ECONNRESET
                                    | libc::ECONNREFUSED
                                    | libc::ETIMEDOUT
                                    | libc::EINTR
                            )
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        let tx = File::from(sock);
        let rx = tx.try_clone()?;
        Ok(Self {
            tx,
            rx,
            socket: true,
            decoder: Decoder::new(),
            last_sent: Instant::now(),
        })
    }

    fn open_console() -> io::Result<Self> {
        // The port appears when virtio-console probes; normally before init.
        let deadline = Instant::now() + CHANNEL_WAIT;
        let tx = loop {
            match OpenOptions::new().write(true).open(PORT) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline && e.kind() == io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        sys::make_raw(tx.as_raw_fd())?;
        let rx = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(PORT)?;
        Ok(Self {
            tx,
            rx,
            socket: false,
            decoder: Decoder::new(),
            last_sent: Instant::now(),
        })
    }

    /// One read that does not block.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.socket {
            sys::recv_nonblocking(self.rx.as_raw_fd(), buf)
        } else {
            self.rx.read(buf)
        }
    }

    fn send(&mut self, msg: &GuestMsg) -> io::Result<()> {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        self.tx.write_all(&buf)?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Sends a data frame of `kind` with `payload`, header and payload in
    /// one gathered write (no copy of the payload into a frame).
    fn send_data(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let head = exec_proto::header(kind, payload.len());
        let mut parts = [io::IoSlice::new(&head), io::IoSlice::new(payload)];
        let mut parts = &mut parts[..];
        while !parts.is_empty() {
            match self.tx.write_vectored(parts) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Reads what the host sent; returns the complete messages.
    fn receive(&mut self) -> io::Result<Vec<HostMsg>> {
        let mut buf = [0u8; CHUNK];
        loop {
            match self.read_some(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut msgs = Vec::new();
        while let Some(frame) = self.decoder.next_frame().map_err(io::Error::other)? {
            msgs.push(HostMsg::parse(frame).map_err(io::Error::other)?);
        }
        Ok(msgs)
    }

    /// Before power-off: makes sure the last frames left the guest. A
    /// console write returns once the host took the bytes; a socket write
    /// only queues them (the vsock driver sends from a work queue), so the
    /// init says it is done sending and waits, at most
    /// [`FINISH_WAIT`], for the host to end the connection or the VM
    /// (the host stops the VM as soon as `Exit` arrives).
    fn finish(&mut self) {
        if !self.socket {
            return;
        }
        // SAFETY: plain system call on the socket this channel owns.
        unsafe { libc::shutdown(self.tx.as_raw_fd(), libc::SHUT_WR) };
        let deadline = Instant::now() + FINISH_WAIT;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let mut fds = [libc::pollfd {
                fd: self.rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if sys::poll(&mut fds, 100).is_err() {
                return;
            }
            match self.read_some(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn heartbeat_due(&self) -> bool {
        self.last_sent.elapsed() >= HEARTBEAT
    }
}

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
    let early_stdin = wait_for_time(chan)?;

    let spec = spec?;
    modules?;

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
    let snapshots = mount_shares(&spec, &root)?;
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
    Ok(())
}

/// Waits for the host's `Time` and sets the clock. Returns stdin messages
/// that arrived right behind it.
fn wait_for_time(chan: &mut Channel) -> Result<Vec<HostMsg>, String> {
    let deadline = Instant::now() + TIME_WAIT;
    loop {
        let mut fds = [libc::pollfd {
            fd: chan.rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(&mut fds, 200).map_err(|e| format!("poll: {e}"))?;
        let mut msgs = chan
            .receive()
            .map_err(|e| format!("bad message from the host: {e}"))?;
        if let Some(pos) = msgs.iter().position(|m| matches!(m, HostMsg::Time { .. })) {
            if let HostMsg::Time { secs, nanos } = msgs[pos] {
                if let Err(e) = sys::set_clock(secs, nanos) {
                    eprintln!("capsule-init: cannot set the clock: {e}");
                }
            }
            msgs.remove(pos);
            return Ok(msgs);
        }
        if Instant::now() > deadline {
            return Err("the host did not send the time".into());
        }
    }
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
struct Stamp {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
    mode: u32,
}

type Snapshot = HashMap<PathBuf, Stamp>;

fn stamp(meta: &fs::Metadata) -> Stamp {
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
fn walk(dir: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
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

fn share_source(index: usize) -> PathBuf {
    PathBuf::from(format!("{SHARE_DIR}/{index}"))
}

fn in_root(root: &Path, guest_path: &[u8]) -> PathBuf {
    let rel = Path::new(OsStr::from_bytes(guest_path));
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    root.join(rel)
}

fn mount_shares(spec: &ExecSpec, root: &Path) -> Result<Vec<Option<Snapshot>>, String> {
    let mut snaps = Vec::new();
    for (i, (dir, rw)) in spec.shares.iter().enumerate() {
        let src = share_source(i);
        let _ = fs::create_dir_all(&src);
        let target = in_root(root, dir);
        if spec.live {
            hostfs::mount_live_share(i, &target, *rw)?;
            snaps.push(None);
            continue;
        }
        let shown = String::from_utf8_lossy(dir);
        fs::create_dir_all(&target).map_err(|e| format!("cannot create share {shown}: {e}"))?;
        sys::mount(
            src.to_str(),
            target.as_os_str().as_bytes(),
            None,
            libc::MS_BIND,
        )
        .map_err(|e| format!("cannot mount share {shown}: {e}"))?;
        if *rw {
            let snap = walk(&src)
                .map_err(|e| format!("cannot list share {shown}: {e}"))?
                .into_iter()
                .map(|(p, m)| (p, stamp(&m)))
                .collect();
            snaps.push(Some(snap));
        } else {
            sys::mount(
                None,
                target.as_os_str().as_bytes(),
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            )
            .map_err(|e| format!("cannot make share {shown} read-only: {e}"))?;
            snaps.push(None);
        }
    }
    Ok(snaps)
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
