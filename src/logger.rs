//! capsule's logger: `CAPSULE_LOG` (env_logger syntax) to stderr by
//! default; the API's `PUT /logger` can redirect it to a file or named
//! pipe and change the level, format and module filter at run time.
//!
//! capsule's own guest-triggered messages are rate-limited where they are
//! logged (`devices::ratelimit`); the virtio-queue crate's are limited
//! here, by target.
//!
//! Every thread logs under one mutex, so a write must never block: a FIFO
//! is written non-blocking, one line per `write` (at most `PIPE_BUF`
//! bytes, so a line goes in whole or not at all), and lines a full FIFO
//! cannot take are dropped and counted; the count is written as soon as
//! the FIFO has room again.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

use devices::ratelimit::{suffix, LogLimit, Verdict};
use log::{LevelFilter, Log, Metadata, Record};

use crate::hostfile::{OutputKind, PIPE_BUF};

/// The log target prefix of a library whose messages a guest can trigger
/// in a loop; they go through a rate limit (`devices::ratelimit`).
const GUEST_DRIVEN_CRATE: &str = "virtio_queue";

/// A logger configuration from the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Most verbose level written.
    pub level: LevelFilter,
    /// Write the level.
    pub show_level: bool,
    /// Write file:line.
    pub show_origin: bool,
    /// Only modules starting with this.
    pub module: Option<String>,
}

struct Override {
    settings: Settings,
    out: Option<Output>,
}

/// Where `PUT /logger` sends the log.
pub struct Output {
    file: File,
    kind: OutputKind,
    /// Lines dropped since the last one written (FIFO full).
    dropped: u64,
}

impl Output {
    /// A log output opened by [`crate::hostfile::open_output`].
    pub fn new(file: File, kind: OutputKind) -> Self {
        Self {
            file,
            kind,
            dropped: 0,
        }
    }

    /// Writes one line; never blocks on a FIFO.
    fn write_line(&mut self, line: &str) {
        if self.kind == OutputKind::File {
            let _ = self.file.write_all(line.as_bytes());
            return;
        }
        if self.dropped > 0 {
            let note = format!(
                "capsule: {} log lines dropped (the log FIFO was full)\n",
                self.dropped
            );
            if !self.write_whole(note.as_bytes()) {
                self.dropped += 1;
                return;
            }
            self.dropped = 0;
        }
        let mut bytes = line.as_bytes();
        if bytes.len() > PIPE_BUF {
            // Longer writes are not atomic: cut, keeping the newline.
            bytes = &bytes[..PIPE_BUF - 1];
            if !self.write_whole(bytes) || !self.write_whole(b"\n") {
                self.dropped += 1;
            }
            return;
        }
        if !self.write_whole(bytes) {
            self.dropped += 1;
        }
    }

    /// One non-blocking write of at most `PIPE_BUF` bytes: all or nothing.
    fn write_whole(&mut self, bytes: &[u8]) -> bool {
        loop {
            match self.file.write(bytes) {
                Ok(n) => return n == bytes.len(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }
}

struct CapsuleLogger {
    env: env_logger::Logger,
    api: Mutex<Option<Override>>,
}

static LOGGER: OnceLock<CapsuleLogger> = OnceLock::new();

impl CapsuleLogger {
    fn with_override<R>(&self, f: impl FnOnce(&mut Option<Override>) -> R) -> R {
        let mut g = self.api.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }
}

impl Log for CapsuleLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.with_override(|o| match o {
            Some(o) => {
                m.level() <= o.settings.level
                    && o.settings
                        .module
                        .as_deref()
                        .is_none_or(|p| m.target().starts_with(p))
            }
            None => self.env.enabled(m),
        })
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        if !r.target().starts_with(GUEST_DRIVEN_CRATE) {
            return self.write(r);
        }
        // virtio-queue logs (at error level) what a guest's broken queue
        // setup or descriptor chain looks like, as often as the guest
        // likes: one rate limit for all its messages.
        static LIMIT: LogLimit = LogLimit::new();
        if let Verdict::Log { suppressed, last } = LIMIT.check() {
            self.write(
                &Record::builder()
                    .metadata(r.metadata().clone())
                    .args(format_args!("{}{}", r.args(), suffix(suppressed, last)))
                    .module_path(r.module_path())
                    .file(r.file())
                    .line(r.line())
                    .build(),
            );
        }
    }

    fn flush(&self) {
        self.env.flush();
    }
}

impl CapsuleLogger {
    fn write(&self, r: &Record<'_>) {
        let handled = self.with_override(|o| {
            let Some(o) = o else { return false };
            let mut line = String::from("capsule: ");
            if o.settings.show_level {
                line.push_str(&format!("[{}] ", r.level()));
            }
            if o.settings.show_origin {
                line.push_str(&format!(
                    "[{}:{}] ",
                    r.file().unwrap_or("?"),
                    r.line().unwrap_or(0)
                ));
            }
            line.push_str(&format!("{}\n", r.args()));
            match &mut o.out {
                Some(f) => f.write_line(&line),
                None => {
                    let _ = std::io::stderr().write_all(line.as_bytes());
                }
            }
            true
        });
        if !handled {
            self.env.log(r);
        }
        crate::logfile::check_stderr();
    }
}

/// Installs the logger (once; later calls do nothing).
pub fn init() {
    let env =
        env_logger::Builder::from_env(env_logger::Env::new().filter_or("CAPSULE_LOG", "warn"))
            .format(|buf, record| {
                writeln!(
                    buf,
                    "capsule: {}: {}",
                    record.level().as_str().to_lowercase(),
                    record.args()
                )
            })
            .build();
    let max = env.filter();
    let logger = LOGGER.get_or_init(|| CapsuleLogger {
        env,
        api: Mutex::new(None),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
    }
}

/// Parses a Firecracker log level name (case-insensitive).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "error" => LevelFilter::Error,
        "warning" | "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => return None,
    })
}

/// Switches the log to `settings`, written to `out` (stderr if `None`).
pub fn configure(settings: Settings, out: Option<Output>) {
    let Some(logger) = LOGGER.get() else { return };
    let level = settings.level;
    logger.with_override(|o| *o = Some(Override { settings, out }));
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(parse_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("TRACE"), Some(LevelFilter::Trace));
        assert_eq!(parse_level("Off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
