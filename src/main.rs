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
    /// Network device (repeatable; the guest sees eth0, eth1, ... in
    /// order). `tap=NAME`: a host TAP device, created if missing (needs
    /// CAP_NET_ADMIN). `user`: user-mode networking through passt, no
    /// privileges needed, DHCP in the guest; `publish=HOST:GUEST` forwards
    /// a host TCP port to the guest (repeatable). `mac=MAC` sets the MAC
    /// address (default 02:ca:75:00:00:NN for device NN).
    #[arg(
        long = "net",
        value_name = "tap=NAME[,mac=MAC] | user[,publish=HOST:GUEST...][,mac=MAC]"
    )]
    nets: Vec<config::NetConfig>,
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
        cmdline: args.cmdline,
        vcpus: args.cpus,
        mem_size: args.memory,
        kvm_path: args.kvm,
        disks: args.disks,
        nets: args.nets,
    };
    builder::build(&config, Console::stdio())?.run()
}

fn main() -> ExitCode {
    capsule::process_start();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                status::USAGE
            } else {
                status::OK
            });
        }
    };
    init_logging();
    let Command::Run(args) = cli.command;
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
