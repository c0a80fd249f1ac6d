//! The `capsule` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use capsule::builder::{self, Console};
use capsule::config::{self, VmConfig};
use clap::{Parser, Subcommand};
use devices::exit::GuestExit;

/// Exit statuses (documented in README.md).
mod status {
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
    Exec(ExecArgs),
}

#[derive(clap::Args, Debug)]
#[command(arg_required_else_help = true)]
struct ExecArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Host directory packed into the initramfs as the guest's root.
    #[arg(long, value_name = "DIR", conflicts_with = "disk")]
    rootfs: Option<PathBuf>,
    /// Raw disk image (ext4, ...) mounted as the command's root.
    /// `,ro`: read-only. `,ephemeral`: the image is never modified.
    #[arg(long, value_name = "IMG[,ro|,ephemeral]")]
    disk: Option<config::DiskConfig>,
    /// Share a host directory at GUESTDIR (repeatable). The files are
    /// copied into the guest when it starts (not live); for a writable
    /// share (the default; `:ro` for read-only) files the command creates
    /// or changes under GUESTDIR are copied back into HOSTDIR when it
    /// exits (deletions are not).
    #[arg(long = "share", value_name = "HOSTDIR:GUESTDIR[:ro]")]
    shares: Vec<capsule::exec::Share>,
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
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(arch::layout::MAX_VCPUS)))]
    cpus: u8,
    /// Guest memory, e.g. 512M or 2G (a plain number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    memory: u64,
    /// KVM device to use.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

fn parse_secs(what: &str, secs: f64) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{what} must be a positive number of seconds"))
}

fn exec(args: ExecArgs, started: std::time::Instant) -> u8 {
    use capsule::exec::{self, Outcome};
    let mut env = Vec::new();
    for e in args.env {
        if e.contains('=') {
            env.push(e);
        } else {
            match std::env::var(&e) {
                Ok(v) => env.push(format!("{e}={v}")),
                Err(_) => {
                    eprintln!("capsule: error: --env {e}: not set in capsule's environment");
                    return status::EXEC_ERROR;
                }
            }
        }
    }
    let timeout = match args.timeout.map(|t| parse_secs("--timeout", t)).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("capsule: error: {e}");
            return status::EXEC_ERROR;
        }
    };
    let boot_timeout = match parse_secs("--boot-timeout", args.boot_timeout) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("capsule: error: {e}");
            return status::EXEC_ERROR;
        }
    };
    let config = exec::ExecConfig {
        vm: VmConfig {
            kernel: args.kernel,
            initrd: args.initrd,
            initramfs: None,
            cmdline: args.append,
            vcpus: args.cpus,
            mem_size: args.memory,
            kvm_path: args.kvm,
            disks: args.disk.into_iter().collect(),
        },
        rootfs: args.rootfs,
        shares: args.shares,
        env,
        workdir: args.workdir,
        argv: args.command,
        timeout,
        boot_timeout,
        started,
    };
    match exec::run(config) {
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

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
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
    /// vanish when the VM ends.
    #[arg(long = "disk", value_name = "PATH[,ro|,ephemeral]")]
    disks: Vec<config::DiskConfig>,
    /// KVM device to use.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
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

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("CAPSULE_LOG", "warn"))
        .format(|buf, record| {
            writeln!(
                buf,
                "capsule: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}

fn run(args: RunArgs) -> Result<GuestExit, builder::Error> {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        initramfs: None,
        cmdline: args.cmdline,
        vcpus: args.cpus,
        mem_size: args.memory,
        kvm_path: args.kvm,
        disks: args.disks,
    };
    builder::build(&config, Console::stdio())?.run()
}

fn main() -> ExitCode {
    let started = capsule::process_start();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let is_exec = std::env::args_os().nth(1).is_some_and(|a| a == "exec");
            if is_exec && e.use_stderr() {
                // exec is for scripts: one line, and docker-style status.
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                eprintln!("capsule: error: {}", first.trim_start_matches("error: "));
                return ExitCode::from(status::EXEC_ERROR);
            }
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                status::USAGE
            } else {
                status::OK
            });
        }
    };
    init_logging();
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Exec(args) => {
            let code = exec(args, started);
            let _ = std::io::stdout().flush();
            return ExitCode::from(code);
        }
    };
    let code = match run(args) {
        Ok(GuestExit::PowerOff) | Ok(GuestExit::Reset) => status::OK,
        Ok(GuestExit::Panic) => {
            eprintln!("capsule: the guest kernel panicked");
            status::GUEST_PANIC
        }
        Ok(GuestExit::Fault) => {
            eprintln!("capsule: error: the VM stopped on a vCPU fault (see the log above)");
            status::ERROR
        }
        Err(e) => {
            eprintln!("capsule: error: {e}");
            status::ERROR
        }
    };
    let _ = std::io::stdout().flush();
    ExitCode::from(code)
}
