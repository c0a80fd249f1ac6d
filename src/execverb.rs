//! `capsule exec`: its arguments, the configuration they make, and the
//! statuses it ends with (docker-style: 123 guest failure, 124 timeout,
//! 125 capsule's own error; else the command's).

use std::path::PathBuf;

use capsule::config::{self, VmConfig};

use crate::{finish, parse_memory, status};

/// Guest memory of an exec VM without `--memory`.
const DEFAULT_MEMORY: u64 = 512 << 20;

#[derive(clap::Args, Debug)]
#[command(arg_required_else_help = true)]
pub struct ExecArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "snapshot")]
    kernel: Option<PathBuf>,
    /// Boot a template guest once, with these options but no command, and
    /// snapshot it into DIR where its init waits for a command; then exit
    /// 0. Each `exec --snapshot DIR -- CMD` runs CMD in a clone of it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["snapshot", "command"])]
    make_snapshot: Option<PathBuf>,
    /// Run the command in a clone of the template in DIR (made with
    /// --make-snapshot): no boot. Options that shape the VM (--kernel,
    /// --cpus, --memory, --disk, ...) come from the template; given, they
    /// must be the same.
    #[arg(long, value_name = "DIR")]
    snapshot: Option<PathBuf>,
    /// Host directory packed into the initramfs as the guest's root.
    #[arg(long, value_name = "DIR", conflicts_with = "disk")]
    rootfs: Option<PathBuf>,
    /// Raw disk image (ext4, ...) mounted as the command's root
    /// (repeatable: the first is the root, /dev/vda; the others are
    /// /dev/vdb, ...; with --host-root none is mounted).
    /// `,ro`: read-only. `,ephemeral`: the image is never modified.
    /// `,cache=unsafe`: flushes skip the image's fdatasync (see `run`).
    /// `,engine=io_uring`: requests through an io_uring (see `run`).
    #[arg(
        long,
        value_name = "IMG[,ro|,ephemeral][,cache=unsafe][,engine=io_uring]"
    )]
    disk: Vec<config::DiskConfig>,
    /// Boot on the host's / shared read-only over virtio-fs, with a tmpfs
    /// overlay for writes and the current directory shared writable (and
    /// the default working directory). Needs virtiofsd.
    #[arg(long, conflicts_with = "rootfs")]
    host_root: bool,
    /// The command's root is DIR, shared live and read-write over
    /// virtio-fs (nothing copied; what the command writes is in DIR at
    /// once). Needs virtiofsd. The containerd shim runs containers so.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["rootfs", "disk", "host_root"])]
    fs_root: Option<PathBuf>,
    /// Load kernel modules from this /lib/modules/RELEASE tree first
    /// (virtio_mmio, virtio_console, virtio_blk, vsock, virtiofs, overlay,
    /// ext4 and their dependencies; what the kernel builds in is skipped).
    /// With --host-root the default is the host's /lib/modules/<the
    /// kernel's release>.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// Network device, as for `run` (repeatable). A TAP device may also
    /// take a static IPv4 configuration that the guest's init applies to
    /// its interface before the command runs: `ip=ADDRESS/PREFIX`, with
    /// `gw=GATEWAY` (the default route) and `mtu=N` (the containerd
    /// shim passes a pod's network so).
    #[arg(
        long = "net",
        value_name = "tap=NAME[,mac=MAC][,ip=A/P[,gw=G][,mtu=N]] | user[,publish=HOST:GUEST...]"
    )]
    nets: Vec<capsule::exec::ExecNet>,
    /// Share a host directory at GUESTDIR (repeatable). With a virtiofsd
    /// (see `--fs` of `run`) the share is live over virtio-fs: nothing is
    /// copied, and creations, deletions and renames are seen both ways at
    /// once. Without one capsule says so and falls back to copying: the
    /// files are copied in when the guest starts, and for a writable share
    /// (the default; `:ro` for read-only) files the command creates or
    /// changes are copied back into HOSTDIR when it exits (deletions are
    /// not).
    ///
    /// A regular file shares the same way (`HOSTFILE:GUESTFILE`): it is
    /// bound over GUESTFILE (created empty in the root if missing). Live,
    /// the file is a hard link in a directory capsule shares (so changes
    /// made in place show), else a copy made at start (as without a
    /// virtiofsd, where a writable file's changes are not copied back).
    #[arg(long = "share", value_name = "HOSTDIR:GUESTDIR[:ro]")]
    shares: Vec<capsule::exec::Share>,
    /// Mount a tmpfs at GUESTDIR (repeatable; inside the command's root),
    /// with comma-separated OPTIONS: size=, mode=, nr_inodes=, uid=, gid=,
    /// ro, nosuid, nodev, noexec, noatime (others are ignored).
    #[arg(long = "tmpfs", value_name = "GUESTDIR[:OPTIONS]")]
    tmpfs: Vec<capsule::exec::Tmpfs>,
    /// Environment variable for the command (repeatable). `--env K` takes
    /// K's value from capsule's environment.
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory of the command in the guest.
    #[arg(long, short = 'w', value_name = "DIR", default_value = "/")]
    workdir: String,
    /// Kill the VM and exit 124 after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// SIGTERM, SIGINT, SIGHUP and SIGQUIT go to the command (as do
    /// SIGUSR1, SIGUSR2, SIGALRM and SIGWINCH); if it has not ended this
    /// many seconds after the first, or at a second one, the VM is stopped
    /// and capsule dies of that signal. `never`: wait for the command.
    #[arg(long, value_name = "SECS|never", default_value = "10")]
    stop_timeout: String,
    /// Exit 123 if the guest's init has not started after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    boot_timeout: f64,
    /// Initramfs loaded before capsule's (its files are visible to the command).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, after capsule's
    /// (`console=ttyS0 quiet reboot=k panic=1 rdinit=/.capsule/init`).
    #[arg(long, value_name = "STR", default_value = "")]
    append: String,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=i64::from(arch::layout::MAX_VCPUS)))]
    cpus: Option<u8>,
    /// Guest memory, e.g. 512M or 2G (a plain number is MiB) [default: 512M].
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    memory: Option<u64>,
    /// KVM device to use.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
    /// Put the VM's vsock socket at PATH (mode 0600; the session's own
    /// listener is PATH_10000): a client that connects, writes `CONNECT
    /// 10001` and reads `OK ...` can run another process in the guest
    /// while the command runs (the containerd shim's exec).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["snapshot", "make_snapshot"])]
    vsock_socket: Option<PathBuf>,
    /// Run the command on a pseudo-terminal in the guest (its stdin,
    /// stdout and stderr; stderr is merged into stdout), as `docker run
    /// -t`: sized as capsule's terminal and resized with it, which is
    /// raw meanwhile.
    #[arg(long, short = 't')]
    tty: bool,
    /// Run the command as UID:GID, with supplementary groups after a
    /// second colon, comma-separated (`1000:1000:27,100`).
    #[arg(long, value_name = "UID:GID[:GID,...]", value_parser = parse_user)]
    user: Option<exec_proto::User>,
    #[command(flatten)]
    confine: capsule::confine::ConfineArgs,
    /// The command and its arguments.
    #[arg(
        last = true,
        required_unless_present = "make_snapshot",
        value_name = "CMD"
    )]
    command: Vec<std::ffi::OsString>,
}

fn parse_secs(what: &str, secs: f64) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{what} must be a positive number of seconds"))
}

/// `--user UID:GID[:GID,...]`.
fn parse_user(arg: &str) -> Result<exec_proto::User, String> {
    let bad = || format!("--user {arg}: expected UID:GID[:GID,...] (numbers)");
    let mut parts = arg.splitn(3, ':');
    let num = |s: Option<&str>| s.and_then(|s| s.parse::<u32>().ok()).ok_or_else(bad);
    let uid = num(parts.next())?;
    let gid = num(parts.next())?;
    let groups = match parts.next() {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|g| g.parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?,
    };
    Ok(exec_proto::User { uid, gid, groups })
}

/// `--stop-timeout`: seconds (0: the VM is stopped at the next check,
/// about 0.1 s after the signal reached the command), or `never`.
fn parse_stop_timeout(arg: &str) -> Result<Option<std::time::Duration>, String> {
    if arg == "never" {
        return Ok(None);
    }
    arg.parse::<f64>()
        .ok()
        .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
        .map(Some)
        .ok_or_else(|| format!("--stop-timeout {arg}: expected seconds or `never`"))
}

/// The `exec` arguments as an [`capsule::exec::ExecConfig`]: `--env K`
/// takes K's value from capsule's environment; the timeouts must be
/// positive.
fn exec_config(
    args: ExecArgs,
    started: std::time::Instant,
) -> Result<capsule::exec::ExecConfig, String> {
    let mut env = Vec::new();
    for e in args.env {
        if e.contains('=') {
            env.push(e);
        } else {
            match std::env::var(&e) {
                Ok(v) => env.push(format!("{e}={v}")),
                Err(_) => return Err(format!("--env {e}: not set in capsule's environment")),
            }
        }
    }
    let timeout = args
        .timeout
        .map(|t| parse_secs("--timeout", t))
        .transpose()?;
    let boot_timeout = parse_secs("--boot-timeout", args.boot_timeout)?;
    let stop_timeout = parse_stop_timeout(&args.stop_timeout)?;
    Ok(capsule::exec::ExecConfig {
        vm: VmConfig {
            kernel: args.kernel.unwrap_or_default(),
            initrd: args.initrd,
            initramfs: None,
            cmdline: args.append,
            vcpus: args.cpus.unwrap_or(config::DEFAULT_VCPUS),
            mem_size: args.memory.unwrap_or(DEFAULT_MEMORY),
            kvm_path: args.kvm,
            disks: args.disk,
            nets: args.nets.iter().map(|n| n.net.clone()).collect(),
            fs: Vec::new(),
            vsock: None,
            entropy: None,
            balloon: None,
            // virtio-mmio whatever the kernel: an exec guest is measured by
            // how soon it runs the command, and PCI enumeration adds to
            // that (docs/performance.md, "The transports at boot"); its
            // init loads the virtio-mmio module from a distribution's
            // kernel (exec::modules).
            transport: Some(capsule::config::Transport::Mmio),
        },
        net_ipv4: args.nets.iter().map(|n| n.ipv4).collect(),
        rootfs: args.rootfs,
        shares: args.shares,
        files: Vec::new(),
        tmpfs: args.tmpfs,
        host_root: args.host_root,
        fs_root: args.fs_root,
        modules: args.modules,
        env,
        workdir: args.workdir,
        argv: args.command,
        timeout,
        stop_timeout,
        boot_timeout,
        vsock_socket: args.vsock_socket,
        tty: args.tty,
        user: args.user,
        started,
    })
}

/// `exec --make-snapshot DIR`: the template of these options.
fn make_template(
    args: ExecArgs,
    started: std::time::Instant,
    dir: &std::path::Path,
) -> Result<capsule::exec::Outcome, capsule::exec::Error> {
    use capsule::exec::{warm, Error};
    let options = warm::TemplateOptions {
        kernel: args.kernel.clone().unwrap_or_default(),
        initrd: args.initrd.clone(),
        append: args.append.clone(),
        cpus: args.cpus.unwrap_or(config::DEFAULT_VCPUS),
        memory: args.memory.unwrap_or(DEFAULT_MEMORY),
        rootfs: args.rootfs.clone(),
        disks: args.disk.clone(),
        modules: args.modules.clone(),
    };
    let config = exec_config(args, started).map_err(Error::Usage)?;
    warm::make_snapshot(config, dir, options)
}

/// `exec --snapshot DIR`: the command in a clone of the template in DIR,
/// whose options the ones given must not contradict.
fn run_in_clone(
    mut args: ExecArgs,
    started: std::time::Instant,
    dir: &std::path::Path,
) -> Result<capsule::exec::Outcome, capsule::exec::Error> {
    use capsule::exec::{warm, Error};
    let t = warm::Template::load(dir)?;
    t.check(&warm::GivenOptions {
        kernel: args.kernel.take(),
        initrd: args.initrd.take(),
        append: std::mem::take(&mut args.append),
        cpus: args.cpus,
        memory: args.memory,
        rootfs: args.rootfs.take(),
        disks: std::mem::take(&mut args.disk),
        modules: args.modules.take(),
    })
    .map_err(Error::Usage)?;
    let o = t.options;
    args.kernel = Some(o.kernel);
    args.initrd = o.initrd;
    args.append = o.append;
    args.cpus = Some(o.cpus);
    args.memory = Some(o.memory);
    args.rootfs = o.rootfs;
    args.disk = o.disks;
    args.modules = o.modules;
    let config = exec_config(args, started).map_err(Error::Usage)?;
    warm::run_snapshot(config, dir)
}

fn exec(args: ExecArgs, started: std::time::Instant) -> u8 {
    use capsule::exec::{self, Outcome};
    let result = match (args.make_snapshot.clone(), args.snapshot.clone()) {
        (Some(dir), _) => make_template(args, started, &dir),
        (None, Some(dir)) => run_in_clone(args, started, &dir),
        (None, None) => exec_config(args, started)
            .map_err(exec::Error::Usage)
            .and_then(exec::run),
    };
    match result {
        Ok(Outcome::Exited(code)) => code,
        Ok(Outcome::TimedOut(t)) => {
            eprintln!(
                "capsule: error: --timeout of {} s expired; the VM was killed",
                t.as_secs_f64()
            );
            status::EXEC_TIMEOUT
        }
        Ok(Outcome::GuestFailed(why, lines)) => {
            eprintln!("capsule: error: {why}");
            if !lines.is_empty() {
                eprintln!("capsule: last guest console lines:");
                for l in lines {
                    eprintln!("  | {l}");
                }
            }
            status::EXEC_GUEST_FAILED
        }
        Ok(Outcome::SetupFailed(why)) => {
            eprintln!("capsule: error: in the guest: {why}");
            status::EXEC_ERROR
        }
        Err(e) => {
            eprintln!("capsule: error: {e}");
            status::EXEC_ERROR
        }
    }
}

/// `capsule exec`.
pub fn exec_command(args: ExecArgs, started: std::time::Instant) -> u8 {
    capsule::failstop::set_status(status::EXEC_ERROR);
    if let Err(e) = capsule::confine::configure(&args.confine) {
        eprintln!("capsule: error: {e}");
        return status::EXEC_ERROR;
    }
    finish(exec(args, started))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stop_timeout_is_seconds_or_never() {
        assert_eq!(parse_stop_timeout("10"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(
            parse_stop_timeout("0.5"),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(parse_stop_timeout("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_stop_timeout("never"), Ok(None));
        for bad in ["-1", "", "soon", "inf"] {
            assert!(parse_stop_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_is_uid_gid_and_groups() {
        let u = |uid, gid, groups: &[u32]| exec_proto::User {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert_eq!(parse_user("1000:100"), Ok(u(1000, 100, &[])));
        assert_eq!(parse_user("0:0:27,100"), Ok(u(0, 0, &[27, 100])));
        for bad in ["1000", "a:1", "1:2:", "1:2:x", "-1:0", ""] {
            assert!(parse_user(bad).is_err(), "{bad}");
        }
    }
}
