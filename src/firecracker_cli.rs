//! Firecracker's command line: what capsule accepts when it is invoked as
//! `firecracker` (a symlink or copy named so) or as `capsule firecracker
//! ...`, so that tools written for Firecracker can start capsule instead.
//!
//! The syntax is Firecracker's, not clap's: `--name value` pairs (no
//! `--name=value`, no short options but `-h`), each at most once; `--help`
//! or `--version` anywhere wins over everything else. Errors keep
//! Firecracker's wording and exit statuses (see [`status`]), after
//! capsule's own `capsule: error:` prefix.

use std::ffi::OsString;

use capsule::api;

mod plan;
pub use plan::{plan, Plan, Seccomp};

/// Exit statuses of the Firecracker command line (Firecracker's values).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// A generic error (a file that cannot be opened, a VM that cannot be
    /// built).
    pub const GENERIC: u8 = 1;
    /// A bad configuration value (an unknown log level).
    pub const BAD_CONFIGURATION: u8 = 152;
    /// The arguments could not be parsed (unknown, repeated or missing
    /// argument, a value of the wrong kind).
    pub const ARG_PARSING: u8 = 153;
}

/// Firecracker's default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker's default instance id.
pub const DEFAULT_ID: &str = "anonymous-instance";
/// Longest instance id Firecracker accepts.
const MAX_ID_LEN: usize = 64;

/// Whether `argv` asks for the Firecracker command line: argv[0]'s file
/// name is `firecracker`, or the first argument is `firecracker`. Returns
/// the arguments after that.
pub fn wanted(argv: &[OsString]) -> Option<Vec<OsString>> {
    let name = argv
        .first()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name());
    if name.is_some_and(|n| n == "firecracker") {
        return Some(argv[1..].to_vec());
    }
    if argv.get(1).is_some_and(|a| a == "firecracker") {
        return Some(argv[2..].to_vec());
    }
    None
}

/// The options, each with whether it takes a value, in `--help` order.
const OPTIONS: &[(&str, bool, &str)] = &[
    (
        "api-sock",
        true,
        "Unix socket of the API [default: \"/run/firecracker.socket\"]",
    ),
    (
        "boot-timer",
        false,
        "Accepted; capsule's boot-time marker (I/O port 0x3c4) is always on",
    ),
    (
        "config-file",
        true,
        "JSON configuration of the microVM; boots it at once",
    ),
    (
        "describe-snapshot",
        true,
        "Print the data format version of a snapshot state file",
    ),
    ("help", false, "Show this help"),
    (
        "http-api-max-payload-size",
        true,
        "Largest API request body, in bytes [default: \"51200\"]",
    ),
    (
        "id",
        true,
        "Instance id (1-64 letters, digits, '-') [default: \"anonymous-instance\"]",
    ),
    (
        "level",
        true,
        "Log level: Off, Error, Warning, Info, Debug, Trace",
    ),
    ("log-path", true, "File or named pipe for the log"),
    (
        "metadata",
        true,
        "JSON file whose contents become the MMDS data",
    ),
    (
        "metrics-path",
        true,
        "File or named pipe for the metrics (JSON lines)",
    ),
    (
        "mmds-size-limit",
        true,
        "Accepted and checked; capsule has no MMDS",
    ),
    (
        "module",
        true,
        "Only log messages of modules starting with this",
    ),
    ("no-api", false, "Serve no API socket (needs --config-file)"),
    ("no-seccomp", false, "Install no seccomp filter"),
    (
        "parent-cpu-time-us",
        true,
        "Parent process CPU time (microseconds), for the log",
    ),
    (
        "seccomp-filter",
        true,
        "A seccomp filter file to use instead of capsule's",
    ),
    ("show-level", false, "Write the level in each log line"),
    (
        "show-log-origin",
        false,
        "Write the file and line in each log line",
    ),
    (
        "snapshot-version",
        false,
        "Print the snapshot data format version",
    ),
    (
        "start-time-cpu-us",
        true,
        "Process start CPU time (microseconds), for the log",
    ),
    (
        "start-time-us",
        true,
        "Process start time (wall clock, microseconds), for the log",
    ),
    ("version", false, "Print the version"),
];

/// Why the command line was refused: the message and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Exit status.
    pub status: u8,
    /// Message, after `capsule: error: `.
    pub message: String,
}

fn parse_error(message: String) -> Refusal {
    Refusal {
        status: status::ARG_PARSING,
        message: format!("Arguments parsing error: {message} For more information try --help."),
    }
}

/// The parsed command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FcArgs {
    values: Vec<(&'static str, String)>,
    flags: Vec<&'static str>,
}

impl FcArgs {
    /// The value of option `name`, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether flag `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }

    /// A numeric option, refused (status 153) if it is not a number.
    fn number<T: std::str::FromStr>(&self, name: &str, kind: &str) -> Result<Option<T>, Refusal> {
        self.value(name)
            .map(|v| {
                v.parse::<T>().map_err(|_| {
                    parse_error(format!(
                        "'{name}' parameter expected to be of '{kind}' type, not '{v}'."
                    ))
                })
            })
            .transpose()
    }
}

/// Parses Firecracker's arguments (without argv[0]). `--help` and
/// `--version` are looked for by [`run`] before this.
pub fn parse(args: &[OsString]) -> Result<FcArgs, Refusal> {
    let mut out = FcArgs::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg.to_string_lossy();
        let name = arg.strip_prefix("--").unwrap_or(&arg);
        let Some(&(name, takes_value, _)) = OPTIONS.iter().find(|(n, _, _)| *n == name) else {
            return Err(parse_error(format!(
                "Found argument '{name}' which wasn't expected, or isn't valid in this context."
            )));
        };
        if !arg.starts_with("--") {
            return Err(parse_error(format!(
                "Found argument '{name}' which wasn't expected, or isn't valid in this context."
            )));
        }
        if out.value(name).is_some() || out.flag(name) {
            return Err(parse_error(format!(
                "The argument '{name}' was provided more than once."
            )));
        }
        if takes_value {
            match it.next().map(|v| v.to_string_lossy()) {
                Some(v) if !v.starts_with("--") => out.values.push((name, v.into_owned())),
                _ => {
                    return Err(parse_error(format!(
                        "The argument '{name}' requires a value, but none was supplied."
                    )))
                }
            }
        } else {
            out.flags.push(name);
        }
    }
    if out.flag("no-api") && out.value("config-file").is_none() {
        return Err(parse_error(
            "Argument 'config-file' required, but not found.".to_string(),
        ));
    }
    Ok(out)
}

/// Checks an instance id as Firecracker does: 1 to 64 ASCII letters,
/// digits and `-`.
pub fn check_id(id: &str) -> Result<(), Refusal> {
    let bad = |why: String| {
        Err(Refusal {
            status: status::ARG_PARSING,
            message: format!("Invalid instance ID '{id}': {why}"),
        })
    };
    let len = id.chars().count();
    if len == 0 || len > MAX_ID_LEN {
        return bad(format!("its length is {len}, not 1 to {MAX_ID_LEN}"));
    }
    if let Some((i, c)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return bad(format!(
            "invalid character {c:?} at position {i} (letters, digits and '-' only)"
        ));
    }
    Ok(())
}

/// What `--version` prints: Firecracker's form, naming capsule.
pub fn version_line() -> String {
    format!(
        "Firecracker v{} (capsule, Firecracker-compatible)",
        env!("CARGO_PKG_VERSION")
    )
}

/// The help text (`--help`).
pub fn help() -> String {
    let mut s = format!(
        "{}\n\n\
         capsule accepts Firecracker's options when it is started as `firecracker`\n\
         or as `capsule firecracker`; see README.md, \"Coming from Firecracker\".\n\n\
         optional arguments:\n",
        version_line()
    );
    for (name, takes_value, what) in OPTIONS {
        let left = if *takes_value {
            format!("--{name} <{name}>")
        } else {
            format!("--{name}")
        };
        s.push_str(&format!("  {left:<58}{what}\n"));
    }
    s
}

fn refuse(r: Refusal) -> u8 {
    eprintln!("capsule: error: {}", r.message);
    r.status
}

/// Runs capsule with Firecracker's command line `args` (without argv[0]);
/// returns the exit status.
pub fn run(args: &[OsString]) -> u8 {
    if let Some(status) = help_or_version(args) {
        return status;
    }
    let parsed = match parse(args) {
        Ok(p) => p,
        Err(r) => return refuse(r),
    };
    if let Some(r) = snapshot_tool_refusal(&parsed) {
        return refuse(r);
    }
    let plan = match plan(&parsed) {
        Ok(p) => p,
        Err(r) => return refuse(r),
    };
    if parsed.flag("boot-timer") {
        capsule::builder::enable_fc_boot_timer();
    }
    api::http::set_max_body(plan.max_payload);
    if let Err(r) = check_seccomp_filter(&plan.seccomp) {
        return refuse(r);
    }
    if let Err(e) = apply_seccomp(&plan.seccomp) {
        eprintln!("capsule: error: {e}");
        return status::GENERIC;
    }
    let config = match plan.config_file.as_deref().map(api::read_config_file) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("capsule: error: {e}");
            return status::GENERIC;
        }
        None => None,
    };
    run_vm(plan, config)
}

/// `--help` or `--version` anywhere: prints the help or the version line
/// and returns success, whatever else the command line holds.
fn help_or_version(args: &[OsString]) -> Option<u8> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", help());
        return Some(status::OK);
    }
    if args.iter().any(|a| a == "--version") {
        println!("{}", version_line());
        return Some(status::OK);
    }
    None
}

/// The refusal of Firecracker's snapshot tools (`--snapshot-version`,
/// `--describe-snapshot`), which this capsule does not offer; a snapshot
/// file that cannot be opened is reported as Firecracker reports it.
fn snapshot_tool_refusal(parsed: &FcArgs) -> Option<Refusal> {
    if !parsed.flag("snapshot-version") && parsed.value("describe-snapshot").is_none() {
        return None;
    }
    if let Some(f) = parsed.value("describe-snapshot") {
        if let Err(e) = std::fs::File::open(f) {
            return Some(Refusal {
                status: status::GENERIC,
                message: format!(
                    "When printing Snapshot Data format: Unable to open snapshot state file {f}: {e}"
                ),
            });
        }
    }
    Some(Refusal {
        status: status::GENERIC,
        message: "snapshots are not supported by this capsule".to_string(),
    })
}

/// Refuses a `--seccomp-filter` file that cannot be opened, with
/// Firecracker's message.
fn check_seccomp_filter(s: &Seccomp) -> Result<(), Refusal> {
    if let Seccomp::Filter(f) = s {
        if let Err(e) = std::fs::File::open(f) {
            return Err(Refusal {
                status: status::GENERIC,
                message: format!(
                    "Seccomp error: Filter file open error: {}: {e}",
                    f.display()
                ),
            });
        }
    }
    Ok(())
}

/// Runs the VM `plan` describes, configured from `config` and over the
/// API; returns the exit status the guest's end stands for.
fn run_vm(plan: Plan, config: Option<api::types::FullVmConfig>) -> u8 {
    let opts = api::Options {
        api_sock: plan.api_sock,
        config,
        id: plan.id,
        kvm_path: capsule::config::DEFAULT_KVM_PATH.into(),
        console: capsule::builder::Console::stdio(),
        vm: None,
        restore: None,
        on_started: None,
        setup: plan.setup,
        // Firecracker's own transport, whatever the kernel, unless the
        // configuration file's machine-config names one.
        transport: Some(capsule::config::Transport::Mmio),
    };
    match api::run(opts) {
        Ok(exit) => crate::guest_status(exit),
        Err(e) => {
            eprintln!("capsule: error: {e}");
            status::GENERIC
        }
    }
}

/// Hands the seccomp options to capsule: the choice is recorded and
/// logged (capsule's own filter is configured by its seccomp support).
fn apply_seccomp(s: &Seccomp) -> Result<(), capsule::confine::Error> {
    // Firecracker's API names files after start (logger, metrics,
    // snapshots, drive swaps): Landlock stays off, as for any capsule VM
    // with an API; the seccomp filters go on as asked.
    let args = capsule::confine::ConfineArgs {
        no_seccomp: matches!(s, Seccomp::Off),
        seccomp_filter: match s {
            Seccomp::Filter(p) => Some(p.clone()),
            _ => None,
        },
        no_landlock: false,
        landlock_allow: Vec::new(),
    };
    capsule::landlock::off_for_api();
    capsule::confine::configure(&args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn err(s: &str) -> Refusal {
        match parse(&args(s)).and_then(|a| plan(&a)) {
            Ok(_) => panic!("{s}: accepted"),
            Err(r) => r,
        }
    }

    #[test]
    fn invocation() {
        let v = |s: &str| wanted(&args(s));
        assert_eq!(v("/usr/bin/firecracker --id x"), Some(args("--id x")));
        assert_eq!(v("capsule firecracker --no-api"), Some(args("--no-api")));
        assert_eq!(v("capsule run --kernel k"), None);
        assert_eq!(v("/x/firecracker-old --id x"), None);
    }

    #[test]
    fn parses_like_firecracker() {
        let a = parse(&args("--api-sock /s --id vm-1 --show-level --level Debug")).unwrap();
        assert_eq!(a.value("api-sock"), Some("/s"));
        assert!(a.flag("show-level"));
        let p = plan(&a).unwrap();
        assert_eq!(p.api_sock, Some(PathBuf::from("/s")));
        assert_eq!(p.id, "vm-1");
        assert_eq!(p.max_payload, 51200);
        let p = plan(&parse(&[]).unwrap()).unwrap();
        assert_eq!(p.api_sock, Some(PathBuf::from(DEFAULT_API_SOCK)));
        assert_eq!(p.id, DEFAULT_ID);
        assert!(p.setup.is_empty());
    }

    #[test]
    fn refusals() {
        for (line, status, text) in [
            (
                "--bogus",
                153,
                "Found argument 'bogus' which wasn't expected",
            ),
            ("extra", 153, "Found argument 'extra'"),
            ("--api-sock=/x", 153, "Found argument 'api-sock=/x'"),
            ("--level", 153, "The argument 'level' requires a value"),
            (
                "--id a --id b",
                153,
                "The argument 'id' was provided more than once.",
            ),
            (
                "--no-api",
                153,
                "Argument 'config-file' required, but not found.",
            ),
            ("--level loud", 152, "Invalid value for logger level: loud"),
            ("--id a_b", 153, "Invalid instance ID"),
            ("--http-api-max-payload-size x", 153, "'usize' type"),
            ("--mmds-size-limit -1", 153, "'usize' type"),
            ("--start-time-us x", 153, "'u64' type"),
        ] {
            let r = err(line);
            assert_eq!(r.status, status, "{line}: {r:?}");
            assert!(r.message.contains(text), "{line}: {}", r.message);
            assert!(!r.message.contains('\n'), "{line}");
        }
        assert!(check_id(&"x".repeat(64)).is_ok());
        assert!(check_id(&"x".repeat(65)).is_err());
    }
}
