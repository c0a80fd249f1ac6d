//! What a parsed Firecracker command line asks for: the [`Plan`] capsule
//! runs, with the values Firecracker refuses refused here.

use std::path::PathBuf;

use capsule::api;
use capsule::api::action::VmmAction;
use capsule::api::types;

use super::{check_id, parse_error, status, FcArgs, Refusal, DEFAULT_API_SOCK, DEFAULT_ID};

/// Everything the arguments ask for, checked, before anything runs.
#[derive(Debug)]
pub struct Plan {
    /// The API socket, unless `--no-api`.
    pub api_sock: Option<PathBuf>,
    /// `--config-file`.
    pub config_file: Option<PathBuf>,
    /// `--id`.
    pub id: String,
    /// Actions applied before the configuration file (logger, metrics).
    pub setup: Vec<VmmAction>,
    /// `--http-api-max-payload-size`.
    pub max_payload: usize,
    /// `--no-seccomp` / `--seccomp-filter`.
    pub seccomp: Seccomp,
}

/// What the seccomp options asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seccomp {
    /// Neither option: capsule's default.
    Default,
    /// `--no-seccomp`.
    Off,
    /// `--seccomp-filter FILE`.
    Filter(PathBuf),
}

/// Turns parsed arguments into a [`Plan`], refusing values Firecracker
/// refuses. The checks run in Firecracker's order, so that a command
/// line with several faults is refused for the same one.
pub fn plan(a: &FcArgs) -> Result<Plan, Refusal> {
    let id = a.value("id").unwrap_or(DEFAULT_ID).to_string();
    check_id(&id)?;
    let max_payload = max_payload(a)?;
    let mmds_limit = a.number::<usize>("mmds-size-limit", "usize")?;
    for t in ["start-time-us", "start-time-cpu-us", "parent-cpu-time-us"] {
        if let Some(v) = a.number::<u64>(t, "u64")? {
            log::debug!("--{t} {v}");
        }
    }
    check_level(a.value("level"))?;
    let setup = setup_actions(a, mmds_limit)?;
    let seccomp = seccomp(a)?;
    Ok(Plan {
        api_sock: (!a.flag("no-api"))
            .then(|| PathBuf::from(a.value("api-sock").unwrap_or(DEFAULT_API_SOCK))),
        config_file: a.value("config-file").map(PathBuf::from),
        id,
        setup,
        max_payload,
        seccomp,
    })
}

/// `--http-api-max-payload-size` (at least one byte), or capsule's
/// default.
fn max_payload(a: &FcArgs) -> Result<usize, Refusal> {
    let max_payload = a
        .number::<usize>("http-api-max-payload-size", "usize")?
        .unwrap_or(api::http::MAX_BODY);
    if max_payload == 0 {
        return Err(parse_error(
            "'http-api-max-payload-size' must be at least 1 byte.".to_string(),
        ));
    }
    Ok(max_payload)
}

/// Refuses a `--level` the logger does not know.
fn check_level(level: Option<&str>) -> Result<(), Refusal> {
    if let Some(l) = level {
        if capsule::logger::parse_level(l).is_none() {
            return Err(Refusal {
                status: status::BAD_CONFIGURATION,
                message: format!(
                    "Invalid value for logger level: {l}. Possible values: [Off, Error, Warning, Info, Debug, Trace]"
                ),
            });
        }
    }
    Ok(())
}

/// The actions the logger, metrics and metadata options stand for, in
/// the order they are applied, before any configuration file.
fn setup_actions(a: &FcArgs, mmds_limit: Option<usize>) -> Result<Vec<VmmAction>, Refusal> {
    let mut setup = Vec::new();
    setup.extend(logger(a));
    if let Some(p) = a.value("metrics-path") {
        setup.push(VmmAction::PutMetrics(types::Metrics {
            metrics_path: p.to_string(),
            emit_id: None,
            properties: None,
        }));
    }
    if let Some(limit) = mmds_limit {
        setup.push(VmmAction::SetMmdsSizeLimit(limit));
    }
    if let Some(p) = a.value("metadata") {
        setup.push(metadata(p)?);
    }
    Ok(setup)
}

/// The logger configuration, if any logger option is given.
fn logger(a: &FcArgs) -> Option<VmmAction> {
    let level = a.value("level");
    let logger_wanted = level.is_some()
        || a.value("log-path").is_some()
        || a.value("module").is_some()
        || a.flag("show-level")
        || a.flag("show-log-origin");
    logger_wanted.then(|| {
        VmmAction::PutLogger(types::Logger {
            log_path: a.value("log-path").map(str::to_string),
            level: level.map(str::to_string),
            show_level: Some(a.flag("show-level")),
            show_log_origin: Some(a.flag("show-log-origin")),
            module: a.value("module").map(str::to_string),
        })
    })
}

/// The metadata service's initial data, read from the JSON file `p`
/// (`--metadata`).
fn metadata(p: &str) -> Result<VmmAction, Refusal> {
    let refuse = |why: String| Refusal {
        status: status::GENERIC,
        message: format!("--metadata {p}: {why}"),
    };
    let text = std::fs::read_to_string(p).map_err(|e| refuse(e.to_string()))?;
    let data = serde_json::from_str(&text).map_err(|e| refuse(e.to_string()))?;
    Ok(VmmAction::PutMmds(data))
}

/// What `--no-seccomp` and `--seccomp-filter` ask for; both at once are
/// refused.
fn seccomp(a: &FcArgs) -> Result<Seccomp, Refusal> {
    Ok(match (a.flag("no-seccomp"), a.value("seccomp-filter")) {
        (true, Some(_)) => {
            return Err(parse_error(
                "The argument 'no-seccomp' cannot be used with 'seccomp-filter'.".to_string(),
            ))
        }
        (true, None) => Seccomp::Off,
        (false, Some(f)) => Seccomp::Filter(PathBuf::from(f)),
        (false, None) => Seccomp::Default,
    })
}
