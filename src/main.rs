//! The `capsule` command line.

#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        reason = "test fixtures cast small, known values"
    )
)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use capsule::config::{self, VmConfig};
use clap::{Parser, Subcommand};

mod execverb;
mod firecracker_cli;
mod snapverbs;
mod tools;
mod verbs;
use devices::exit::GuestExit;

/// Exit statuses (documented in README.md).
mod status {
    /// Verbs: no VM of that name is running.
    pub const NO_SUCH_VM: u8 = 4;
    /// The guest powered off or rebooted.
    pub const OK: u8 = 0;
    /// capsule failed: bad file, KVM or host error, vCPU fault.
    pub const ERROR: u8 = 1;
    /// Bad command line (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// The guest kernel panicked.
    pub const GUEST_PANIC: u8 = 3;

    /// `exec`: the guest failed (kernel did not boot, panicked, or stopped
    /// making progress).
    pub const EXEC_GUEST_FAILED: u8 = 123;
    /// `exec`: `--timeout` expired.
    pub const EXEC_TIMEOUT: u8 = 124;
    /// `exec`: capsule's own error, bad usage, or the guest could not set
    /// up the command (e.g. an unmountable `--disk`).
    pub const EXEC_ERROR: u8 = 125;
}

#[derive(Parser, Debug)]
#[command(
    name = "capsule",
    version,
    about = "A virtual machine monitor on Linux KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
struct SnapshotArgs {
    /// The VM's name (`run --name`).
    name: String,
    /// The snapshot directory (created if missing).
    dir: PathBuf,
    /// Kill the VM once the snapshot is written instead of resuming it.
    #[arg(long)]
    stop: bool,
    /// Write only the pages written since the VM's last Full snapshot (or
    /// since it was restored from one): a Diff snapshot, restored with
    /// `run --restore DIR --base FULL_DIR`. The VM must track dirty pages
    /// (`run --restore ... --track-dirty-pages`).
    #[arg(long)]
    diff: bool,
}

#[derive(clap::Args, Debug)]
struct CloneArgs {
    /// The snapshot directory.
    dir: PathBuf,
    /// How many clones.
    #[arg(value_parser = clap::value_parser!(u32).range(1..=1000))]
    count: u32,
    /// The clones' name prefix.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Network device of every clone (repeatable, as `run --net`; only
    /// `user` makes sense for several clones: a TAP device is one VM's).
    #[arg(long = "net", value_name = "user[,...]")]
    nets: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct NameArg {
    /// The VM's name (`run --name`).
    name: String,
}

#[derive(clap::Args, Debug)]
struct LsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct StopArgs {
    /// The VM's name.
    name: String,
    /// Seconds to wait for the guest to end after Ctrl-Alt-Del before
    /// killing it.
    #[arg(long, short = 't', value_name = "S", default_value_t = 10.0)]
    timeout: f64,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage. Required unless the VM
    /// is configured with --config-file or over --api-sock.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["api_sock", "config_file", "restore"],
          conflicts_with = "config_file")]
    kernel: Option<PathBuf>,
    /// Start from the snapshot in DIR (`capsule snapshot`) instead of
    /// booting: the VM's shape, memory and devices come from it. --net and
    /// --disk, if given, replace the snapshot's devices one for one.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "config_file", "initrd", "cmdline", "cpus", "memory"])]
    restore: Option<PathBuf>,
    /// With --restore of a Diff snapshot: the Full snapshot it applies to.
    #[arg(long, value_name = "DIR", requires = "restore")]
    base: Option<PathBuf>,
    /// With --restore: log the pages the VM writes, so that `capsule
    /// snapshot --diff` can save only those.
    #[arg(long, requires = "restore")]
    track_dirty_pages: bool,
    /// Serve the Firecracker-compatible API on this Unix socket. Without
    /// --kernel or --config-file the VM waits for API calls
    /// (InstanceStart) to boot.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Boot from a Firecracker JSON configuration file, without API calls.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// No API socket at all (needs --config-file).
    #[arg(long, requires = "config_file", conflicts_with_all = ["api_sock", "name"])]
    no_api: bool,
    /// Instance id reported by `GET /`.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,
    /// Register the VM under NAME for the other verbs (ls, stop, pause, ...);
    /// its API is served on the VM's runtime directory's api.sock.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Run in the background (needs --name): returns once the VM runs; the
    /// console goes to a log (`capsule logs`, `capsule console`).
    #[arg(short = 'd', long, requires = "name")]
    detach: bool,
    /// Internal: this is the background process of `run -d`.
    #[arg(long, hide = true)]
    detached_child: bool,
    /// Initramfs to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long, value_name = "STR", default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(arch::layout::MAX_VCPUS)))]
    cpus: u8,
    /// Guest memory, e.g. 512M or 2G (a plain number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory)]
    memory: u64,
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
    disks: Vec<config::DiskConfig>,
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
    nets: Vec<config::NetConfig>,
    /// virtio-vsock device (Firecracker's model): host programs connect to
    /// the Unix socket PATH (created mode 0600) and write `CONNECT
    /// <port>\n` to reach a guest listener; guest connections to CID 2
    /// port P go to a Unix listener at `PATH_P`.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<config::VsockConfig>,
    /// Share the host directory HOSTDIR with the guest over virtio-fs
    /// (repeatable), served by a virtiofsd that capsule starts
    /// (`CAPSULE_VIRTIOFSD` picks the binary). The guest mounts it with
    /// `mount -t virtiofs TAG DIR`. `,ro`: virtiofsd refuses writes.
    #[arg(long = "fs", value_name = "HOSTDIR:TAG[,ro]")]
    fs: Vec<config::FsConfig>,
    /// virtio-balloon device: `amount_mib=N` target (default 0),
    /// `deflate_on_oom=on|off`, `free_page_reporting=on|off` (free guest
    /// memory goes back to the host), `stats_interval_s=N` (guest
    /// statistics every N seconds; 0: none). Changed while running with
    /// `PATCH /balloon`.
    #[arg(long, value_name = "amount_mib=N,deflate_on_oom=on,free_page_reporting=on,stats_interval_s=N",
          value_parser = capsule::balloon::parse_option, conflicts_with = "restore")]
    balloon: Option<devices::virtio::balloon::BalloonConfig>,
    /// How the guest reaches its virtio devices: `mmio` (virtio-mmio, the
    /// default) or `pci` (modern virtio-pci with MSI-X on PCI bus 0;
    /// every device, vhost-net and virtio-fs included). With
    /// `--config-file` or the API, a `transport` in the machine
    /// configuration wins over it; a restore takes the snapshot's.
    #[arg(long, value_enum, conflicts_with = "restore")]
    transport: Option<config::Transport>,
    /// KVM device to use.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
    #[command(flatten)]
    confine: capsule::confine::ConfineArgs,
    #[command(flatten)]
    jail: capsule::jail::JailArgs,
}

impl RunArgs {
    /// `--jail`: builds the jail and moves in, with the VM's paths
    /// rewritten to the jail's. `Ok(Some(status))` in the keeper process
    /// once the VM has ended; `Ok(None)` in the jailed one.
    fn enter_jail(&mut self) -> Result<Option<u8>, capsule::jail::Error> {
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
    fn vm_config(&self) -> Option<VmConfig> {
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
            transport: self.transport.unwrap_or_default(),
        })
    }
}

impl RunArgs {
    /// The restore `--restore DIR` asks for: resumed at once, with
    /// `--net` / `--disk` replacing the snapshot's devices if given.
    fn restore_config(&self) -> Option<capsule::snapshot::restore::RestoreConfig> {
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

fn parse_memory(s: &str) -> Result<u64, String> {
    let size = config::parse_size(s).map_err(|e| e.to_string())?;
    if size < config::MIN_MEM_SIZE {
        return Err(format!(
            "guest memory must be at least {}",
            config::format_size(config::MIN_MEM_SIZE)
        ));
    }
    Ok(size)
}

/// The exit status for how a guest ended `run` (also `wait`'s status).
fn guest_status(exit: GuestExit) -> u8 {
    match exit {
        GuestExit::PowerOff | GuestExit::Reset => status::OK,
        GuestExit::Panic => {
            eprintln!("capsule: the guest kernel panicked");
            status::GUEST_PANIC
        }
        GuestExit::Fault => {
            eprintln!("capsule: error: the VM stopped on a vCPU fault (see the log above)");
            status::ERROR
        }
        GuestExit::Stopped => stopped_status(),
    }
}

/// The status of a VM stopped by a termination signal N: 128+N (main then
/// dies of the signal itself, which a shell shows the same way).
fn stopped_status() -> u8 {
    let sig = capsule::signals::pending().unwrap_or(libc::SIGTERM);
    128u8.saturating_add(u8::try_from(sig).unwrap_or(0))
}

/// `run`: a VM from the command line, a configuration file or the API
/// (all started through the API's typed actions), optionally named.
fn run(args: RunArgs) -> u8 {
    use capsule::api;
    use capsule::builder::Console;
    let config = match &args.config_file {
        Some(p) => match api::read_config_file(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("capsule: error: {e}");
                return status::ERROR;
            }
        },
        None => None,
    };
    let reg = match args
        .name
        .as_deref()
        .map(capsule::runtime::Registration::new)
    {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            eprintln!("capsule: error: {e}");
            return status::ERROR;
        }
        None => None,
    };
    let api_sock = match (&args.api_sock, &reg) {
        (Some(p), Some(r)) => {
            if let Err(e) = r.link_api_socket(p) {
                eprintln!("capsule: error: {e}");
                return status::ERROR;
            }
            Some(p.clone())
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(r)) => Some(r.dir().join("api.sock")),
        (None, None) => None,
    };
    let console = if args.detached_child {
        match reg.as_ref().map(|r| verbs::detached_console(r.dir())) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                eprintln!("capsule: error: {e}");
                return status::ERROR;
            }
            None => Console::stdio(),
        }
    } else {
        Console::stdio()
    };
    let on_started: Option<Box<dyn FnOnce()>> = match (&reg, args.detached_child) {
        (Some(r), true) => {
            let log = r.dir().join("vmm.log");
            Some(Box::new(move || verbs::redirect_stderr(&log)))
        }
        _ => None,
    };
    let opts = api::Options {
        api_sock,
        config,
        id: args.name.clone().unwrap_or(args.id.clone()),
        kvm_path: args.kvm.clone(),
        console,
        vm: args.vm_config(),
        restore: args.restore_config(),
        on_started,
        setup: Vec::new(),
        transport: args.transport,
    };
    let kernel = args.kernel.clone();
    let code = match api::run(opts) {
        Ok(exit) => {
            let code = guest_status(exit);
            if let (GuestExit::Panic, Some(k)) = (exit, &kernel) {
                tools::explain_panic(k, &args);
            }
            code
        }
        Err(e) => {
            eprintln!("capsule: error: {e}");
            status::ERROR
        }
    };
    if let Some(r) = &reg {
        r.finish(code);
    }
    code
}

fn main() -> ExitCode {
    let started = capsule::process_start();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(args) = firecracker_cli::wanted(&argv) {
        install_process_handlers();
        return ExitCode::from(finish(firecracker_cli::run(&args)));
    }
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return ExitCode::from(code),
    };
    install_process_handlers();
    capsule::setup_step("command line parsed, logger up");
    ExitCode::from(match cli.command {
        Command::Run(args) => run_command(args),
        Command::Exec(args) => execverb::exec_command(args, started),
        Command::Ls(a) => verbs::ls(a.json),
        Command::Stop(a) => verbs::stop(&a.name, a.timeout),
        Command::Kill(a) => verbs::kill(&a.name),
        Command::Pause(a) => verbs::pause(&a.name, true),
        Command::Resume(a) => verbs::pause(&a.name, false),
        Command::Wait(a) => verbs::wait(&a.name),
        Command::Logs(a) => verbs::logs(&a.name),
        Command::Console(a) => verbs::console(&a.name),
        Command::Snapshot(a) => snapverbs::snapshot(&a.name, &a.dir, a.stop, a.diff),
        Command::Clone(a) => {
            let extra: Vec<String> = a
                .nets
                .iter()
                .flat_map(|n| ["--net".to_string(), n.clone()])
                .collect();
            snapverbs::clone(&a.dir, a.count, &a.name, &extra)
        }
        Command::Doctor(a) => tools::doctor(&a),
        Command::Completions(a) => tools::completions::<Cli>(&a),
        Command::Man(a) => tools::man::<Cli>(&a),
        Command::Seccomp(a) => tools::seccomp(&a),
    })
}

/// The logger, the fail-stop panic hook and the termination signal
/// handlers, for every command that got past its command line.
fn install_process_handlers() {
    capsule::logger::init();
    capsule::failstop::install();
    capsule::signals::install();
}

/// The command line, or the status to exit with after clap has printed
/// help, the version or a usage error (for `exec`, which is for scripts:
/// one line and a docker-style status).
fn parse_cli() -> Result<Cli, u8> {
    Cli::try_parse().map_err(|e| {
        let is_exec = std::env::args_os().nth(1).is_some_and(|a| a == "exec");
        if is_exec && e.use_stderr() {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("capsule: error: {}", first.trim_start_matches("error: "));
            return status::EXEC_ERROR;
        }
        let _ = e.print();
        if e.use_stderr() {
            status::USAGE
        } else {
            status::OK
        }
    })
}

/// After a VM ran: flushes stdout, then dies of a termination signal that
/// stopped it, if one did; else `code`.
fn finish(code: u8) -> u8 {
    let _ = std::io::stdout().flush();
    capsule::signals::reraise_pending();
    code
}

/// `capsule run`: detached, in a jail, or here.
fn run_command(mut args: RunArgs) -> u8 {
    if args.detach {
        return verbs::detach(&args.name.clone().unwrap_or_default());
    }
    if (args.api_sock.is_some() || args.name.is_some()) && !args.confine.no_landlock {
        capsule::landlock::off_for_api();
    }
    if let Err(e) = capsule::confine::configure(&args.confine) {
        eprintln!("capsule: error: {e}");
        return status::ERROR;
    }
    capsule::setup_step("confinement configured");
    if args.jail.jail {
        match args.enter_jail() {
            Ok(None) => {}
            Ok(Some(code)) => return code,
            Err(e) => {
                eprintln!("capsule: error: {e}");
                return status::ERROR;
            }
        }
    }
    finish(run(args))
}
