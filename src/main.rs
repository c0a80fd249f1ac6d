//! The `capsule` command line.

#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        reason = "test fixtures cast small, known values"
    )
)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

mod cli;
mod execverb;
mod firecracker_cli;
mod snapverbs;
mod tools;
mod verbs;
use capsule::runtime::Registration;
use cli::{parse_memory, Cli, Command, RunArgs};
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
    let (reg, opts) = match run_options(&args) {
        Ok(o) => o,
        Err(code) => return code,
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

/// What `run` needs before the VM: the configuration file, the VM's
/// registration under its name, the API socket and the console; else the
/// status to exit with (the error said).
fn run_options(args: &RunArgs) -> Result<(Option<Registration>, capsule::api::Options), u8> {
    use capsule::api;
    use capsule::builder::Console;
    let config = match &args.config_file {
        Some(p) => match api::read_config_file(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("capsule: error: {e}");
                return Err(status::ERROR);
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
            return Err(status::ERROR);
        }
        None => None,
    };
    let api_sock = match (&args.api_sock, &reg) {
        (Some(p), Some(r)) => {
            if let Err(e) = r.link_api_socket(p) {
                eprintln!("capsule: error: {e}");
                return Err(status::ERROR);
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
                return Err(status::ERROR);
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
    Ok((reg, opts))
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
