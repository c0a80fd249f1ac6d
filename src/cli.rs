//! The command line's clap structures: the commands and their arguments,
//! `run`'s options and the VM, jail and restore they describe.

use std::path::PathBuf;

use capsule::config::{self, VmConfig};
use clap::{Parser, Subcommand};

use crate::{execverb, snapverbs, tools};

#[derive(Parser, Debug)]
#[command(
    name = "capsule",
    version,
    about = "A virtual machine monitor on Linux KVM"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Boot a Linux guest with its serial console on this terminal.
    ///
    /// Exits 0 when the guest powers off or reboots, 3 when the guest
    /// kernel panics, 1 on errors and 2 on bad usage.
    Run(RunArgs),
    /// Run a command in a fresh VM; its output and exit status come back.
    ///
    /// Boots the kernel with an initramfs that capsule generates (its own
    /// small init, the --rootfs tree and the --share directories), runs
    /// CMD, streams its stdout and stderr to capsule's stdout and stderr,
    /// feeds capsule's stdin to it and exits with its status (128+N if it
    /// died of signal N; 126/127 if it cannot be executed / is not found).
    /// Other statuses: 123 the guest failed (kernel did not boot, panicked
    /// or stopped responding; the last console lines go to stderr), 124
    /// --timeout expired (the VM is killed), 125 capsule's own errors and
    /// bad usage.
    Exec(execverb::ExecArgs),
    /// List the VMs started with `run --name` (`--json`: a JSON array).
    Ls(LsArgs),
    /// Stop a VM: Ctrl-Alt-Del, then kill it after --timeout seconds.
    Stop(StopArgs),
    /// Kill a VM at once.
    Kill(NameArg),
    /// Pause a VM's vCPUs.
    Pause(NameArg),
    /// Resume a paused VM.
    Resume(NameArg),
    /// Wait for a VM to end; exits with its `capsule run` status.
    Wait(NameArg),
    /// Print a detached VM's console log.
    Logs(NameArg),
    /// Attach to a detached VM's serial console (detach with Ctrl-]).
    Console(NameArg),
    /// Check that capsule can run VMs here (and, with --kernel, that a
    /// kernel has what capsule needs); exits 0 if it can, 1 if not.
    Doctor(tools::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(tools::CompletionsArgs),
    /// Write man pages (capsule.1, capsule-COMMAND.1) into DIR.
    #[command(hide = true)]
    Man(tools::ManArgs),
    /// Snapshot a running VM into DIR: pause it, write DIR/snapshot and
    /// DIR/memory, resume it (or kill it with --stop).
    Snapshot(SnapshotArgs),
    /// Start N VMs from the snapshot in DIR, in the background, named
    /// NAME-1 ... NAME-N (each a `run --restore DIR --name NAME-i -d`).
    Clone(CloneArgs),
    /// Print the seccomp allow-list of each kind of thread (Markdown, as
    /// in docs/security.md), or write them compiled (--compile).
    #[command(hide = true)]
    Seccomp(tools::SeccompArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct SnapshotArgs {
    /// The VM's name (`run --name`).
    pub(crate) name: String,
    /// The snapshot directory (created if missing).
    pub(crate) dir: PathBuf,
    /// Kill the VM once the snapshot is written instead of resuming it.
    #[arg(long)]
    pub(crate) stop: bool,
    /// Write only the pages written since the VM's last Full snapshot (or
    /// since it was restored from one): a Diff snapshot, restored with
    /// `run --restore DIR --base FULL_DIR`. The VM must track dirty pages
    /// (`run --restore ... --track-dirty-pages`).
    #[arg(long)]
    pub(crate) diff: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct CloneArgs {
    /// The snapshot directory.
    pub(crate) dir: PathBuf,
    /// How many clones.
    #[arg(value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) count: u32,
    /// The clones' name prefix.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: String,
    /// Network device of every clone (repeatable, as `run --net`; only
    /// `user` makes sense for several clones: a TAP device is one VM's).
    #[arg(long = "net", value_name = "user[,...]")]
    pub(crate) nets: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct NameArg {
    /// The VM's name (`run --name`).
    pub(crate) name: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct LsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct StopArgs {
    /// The VM's name.
    pub(crate) name: String,
    /// Seconds to wait for the guest to end after Ctrl-Alt-Del before
    /// killing it.
    #[arg(long, short = 't', value_name = "S", default_value_t = 10.0)]
    pub(crate) timeout: f64,
}

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage. Required unless the VM
    /// is configured with --config-file or over --api-sock.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["api_sock", "config_file", "restore"],
          conflicts_with = "config_file")]
    pub(crate) kernel: Option<PathBuf>,
    /// Start from the snapshot in DIR (`capsule snapshot`) instead of
    /// booting: the VM's shape, memory and devices come from it. --net and
    /// --disk, if given, replace the snapshot's devices one for one.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "config_file", "initrd", "cmdline", "cpus", "memory"])]
    pub(crate) restore: Option<PathBuf>,
    /// With --restore of a Diff snapshot: the Full snapshot it applies to.
    #[arg(long, value_name = "DIR", requires = "restore")]
    pub(crate) base: Option<PathBuf>,
    /// With --restore: log the pages the VM writes, so that `capsule
    /// snapshot --diff` can save only those.
    #[arg(long, requires = "restore")]
    pub(crate) track_dirty_pages: bool,
    /// Serve the Firecracker-compatible API on this Unix socket. Without
    /// --kernel or --config-file the VM waits for API calls
    /// (InstanceStart) to boot.
    #[arg(long, value_name = "PATH")]
    pub(crate) api_sock: Option<PathBuf>,
    /// Boot from a Firecracker JSON configuration file, without API calls.
    #[arg(long, value_name = "FILE")]
    pub(crate) config_file: Option<PathBuf>,
    /// No API socket at all (needs --config-file).
    #[arg(long, requires = "config_file", conflicts_with_all = ["api_sock", "name"])]
    pub(crate) no_api: bool,
    /// Instance id reported by `GET /`.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub(crate) id: String,
    /// Register the VM under NAME for the other verbs (ls, stop, pause, ...);
    /// its API is served on the VM's runtime directory's api.sock.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// Run in the background (needs --name): returns once the VM runs; the
    /// console goes to a log (`capsule logs`, `capsule console`).
    #[arg(short = 'd', long, requires = "name")]
    pub(crate) detach: bool,
    /// Internal: this is the background process of `run -d`.
    #[arg(long, hide = true)]
    pub(crate) detached_child: bool,
    /// Initramfs to load.
    #[arg(long, value_name = "PATH")]
    pub(crate) initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long, value_name = "STR", default_value = config::DEFAULT_CMDLINE)]
    pub(crate) cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(arch::layout::MAX_VCPUS)))]
    pub(crate) cpus: u8,
    /// Guest memory, e.g. 512M or 2G (a plain number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory)]
    pub(crate) memory: u64,
    /// Raw disk image for a virtio-blk device (repeatable; the guest sees
    /// vda, vdb, ... in order). `,ro`: read-only. `,ephemeral`:
    /// copy-on-write, the image is never modified and the guest's writes
    /// vanish when the VM ends. `,cache=unsafe`: the guest's flushes
    /// complete without an fdatasync of the image (a host crash or power
    /// loss can lose data the guest synced); `,cache=writeback` (default)
    /// syncs. `,engine=io_uring`: requests run concurrently through an
    /// io_uring, straight to and from guest memory (not with
    /// `,ephemeral`; capsule refuses to start where io_uring is
    /// unavailable); `,engine=sync` (default) runs them one by one.
    #[arg(
        long = "disk",
        value_name = "PATH[,ro|,ephemeral][,cache=unsafe][,engine=io_uring]"
    )]
    pub(crate) disks: Vec<config::DiskConfig>,
    /// Network device (repeatable; the guest sees eth0, eth1, ... in
    /// order). `tap=NAME`: a host TAP device, created if missing (needs
    /// CAP_NET_ADMIN). `user`: user-mode networking through passt, no
    /// privileges needed, DHCP in the guest; `publish=HOST:GUEST` forwards
    /// a host TCP port to the guest (repeatable). `mac=MAC` sets the MAC
    /// address (default 02:ca:75:00:00:NN for device NN). `vhost=on`
    /// (TAP only): the host kernel's vhost-net moves the frames (needs
    /// /dev/vhost-net).
    #[arg(
        long = "net",
        value_name = "tap=NAME[,mac=MAC][,vhost=on] | user[,publish=HOST:GUEST...][,mac=MAC]"
    )]
    pub(crate) nets: Vec<config::NetConfig>,
    /// virtio-vsock device (Firecracker's model): host programs connect to
    /// the Unix socket PATH (created mode 0600) and write `CONNECT
    /// <port>\n` to reach a guest listener; guest connections to CID 2
    /// port P go to a Unix listener at `PATH_P`.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    pub(crate) vsock: Option<config::VsockConfig>,
    /// Share the host directory HOSTDIR with the guest over virtio-fs
    /// (repeatable), served by a virtiofsd that capsule starts
    /// (`CAPSULE_VIRTIOFSD` picks the binary). The guest mounts it with
    /// `mount -t virtiofs TAG DIR`. `,ro`: virtiofsd refuses writes.
    #[arg(long = "fs", value_name = "HOSTDIR:TAG[,ro]")]
    pub(crate) fs: Vec<config::FsConfig>,
    /// virtio-balloon device: `amount_mib=N` target (default 0),
    /// `deflate_on_oom=on|off`, `free_page_reporting=on|off` (free guest
    /// memory goes back to the host), `stats_interval_s=N` (guest
    /// statistics every N seconds; 0: none). Changed while running with
    /// `PATCH /balloon`.
    #[arg(long, value_name = "amount_mib=N,deflate_on_oom=on,free_page_reporting=on,stats_interval_s=N",
          value_parser = capsule::balloon::parse_option, conflicts_with = "restore")]
    pub(crate) balloon: Option<devices::virtio::balloon::BalloonConfig>,
    /// How the guest reaches its virtio devices: `mmio` (virtio-mmio) or
    /// `pci` (modern virtio-pci with MSI-X on PCI bus 0; every device,
    /// vhost-net and virtio-fs included). Without it capsule picks `pci`
    /// when the kernel image shows it can drive virtio-pci (an ELF
    /// vmlinux whose symbol table or embedded configuration says so) and
    /// the command line has no `pci=off` or `acpi=off`, else `mmio`. With
    /// `--config-file` or the API, a `transport` in the machine
    /// configuration wins over it; a restore takes the snapshot's.
    #[arg(long, value_enum, conflicts_with = "restore")]
    pub(crate) transport: Option<config::Transport>,
    /// KVM device to use.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_KVM_PATH)]
    pub(crate) kvm: PathBuf,
    #[command(flatten)]
    pub(crate) confine: capsule::confine::ConfineArgs,
    #[command(flatten)]
    pub(crate) jail: capsule::jail::JailArgs,
}

impl RunArgs {
    /// `--jail`: builds the jail and moves in, with the VM's paths
    /// rewritten to the jail's. `Ok(Some(status))` in the keeper process
    /// once the VM has ended; `Ok(None)` in the jailed one.
    pub(crate) fn enter_jail(&mut self) -> Result<Option<u8>, capsule::jail::Error> {
        use capsule::jail::{Error, Jail};
        let mut files = Vec::new();
        files.extend(self.kernel.iter().map(|k| (k.clone(), false)));
        files.extend(self.initrd.iter().map(|i| (i.clone(), false)));
        files.extend(
            self.disks
                .iter()
                .map(|d| (d.path.clone(), d.mode == config::DiskMode::ReadWrite)),
        );
        let mut tun = false;
        let vhost = self.nets.iter().any(|n| n.vhost);
        for n in &self.nets {
            match n.backend {
                config::NetBackendConfig::Tap { .. } => tun = true,
                config::NetBackendConfig::User { .. } => {
                    return Err(Error::Usage(
                        "--net user cannot run jailed (passt is not in the jail); use --net tap="
                            .into(),
                    ))
                }
            }
        }
        let (jail, inside) = Jail::plan(
            &self.jail,
            &self.id,
            &files,
            self.memory,
            &self.kvm,
            tun,
            vhost,
        )?;
        let mut inside = inside.into_iter();
        if let Some(k) = &mut self.kernel {
            *k = inside.next().unwrap_or_default();
        }
        if let Some(i) = &mut self.initrd {
            *i = inside.next().unwrap_or_default();
        }
        for d in &mut self.disks {
            d.path = inside.next().unwrap_or_default();
        }
        self.kvm = PathBuf::from("/dev/kvm");
        jail.enter()
    }

    /// The VM `--kernel` and the other options describe, if `--kernel`
    /// was given.
    pub(crate) fn vm_config(&self) -> Option<VmConfig> {
        self.kernel.clone().map(|kernel| VmConfig {
            kernel,
            initrd: self.initrd.clone(),
            initramfs: None,
            cmdline: self.cmdline.clone(),
            vcpus: self.cpus,
            mem_size: self.memory,
            kvm_path: self.kvm.clone(),
            disks: self.disks.clone(),
            nets: self.nets.clone(),
            vsock: self.vsock.clone(),
            fs: self.fs.clone(),
            entropy: None,
            balloon: self.balloon,
            transport: self.transport,
        })
    }
}

impl RunArgs {
    /// The restore `--restore DIR` asks for: resumed at once, with
    /// `--net` / `--disk` replacing the snapshot's devices if given.
    pub(crate) fn restore_config(&self) -> Option<capsule::snapshot::restore::RestoreConfig> {
        let dir = self.restore.as_ref()?;
        Some(capsule::snapshot::restore::RestoreConfig {
            snapshot_path: snapverbs::state_path(dir),
            mem_path: snapverbs::memory_path(dir),
            kvm_path: self.kvm.clone(),
            resume: true,
            tap_overrides: Vec::new(),
            nets: (!self.nets.is_empty()).then(|| self.nets.clone()),
            disks: (!self.disks.is_empty()).then(|| self.disks.clone()),
            base: self
                .base
                .as_ref()
                .map(|b| (snapverbs::state_path(b), snapverbs::memory_path(b))),
            track_dirty: self.track_dirty_pages,
            vsock: self.vsock.clone(),
            vsock_uds: None,
            mmds: Default::default(),
        })
    }
}

pub(crate) fn parse_memory(s: &str) -> Result<u64, String> {
    let size = config::parse_size(s).map_err(|e| e.to_string())?;
    if size < config::MIN_MEM_SIZE {
        return Err(format!(
            "guest memory must be at least {}",
            config::format_size(config::MIN_MEM_SIZE)
        ));
    }
    Ok(size)
}
