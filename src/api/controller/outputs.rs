//! The VMM's outputs: `PUT /logger`, `PUT /serial`, `PUT /metrics` and
//! `FlushMetrics`.

use super::{Controller, Result, State};
use crate::api::action::{VmmActionError, VmmData};
use crate::api::types::{Logger, Metrics, SerialDevice};

impl Controller {
    /// `PUT /logger`.
    pub(super) fn put_logger(&mut self, l: Logger) -> Result<VmmData> {
        configure_logger(&l)?;
        self.resources.logger = Some(l);
        Ok(VmmData::Empty)
    }

    /// `PUT /serial`: before start only.
    pub(super) fn put_serial(&mut self, s: SerialDevice) -> Result<VmmData> {
        self.pre_boot()?;
        if s.rate_limiter.is_some() {
            return Err(VmmActionError::Unsupported(
                "serial rate_limiter is not supported",
            ));
        }
        self.resources.serial = Some(s);
        Ok(VmmData::Empty)
    }

    /// `FlushMetrics`: after start only.
    pub(super) fn flush_metrics(&self) -> Result<VmmData> {
        if self.state == State::NotStarted {
            return Err(VmmActionError::NotBeforeStart);
        }
        crate::api::metrics::flush()?;
        Ok(VmmData::Empty)
    }

    /// `PUT /metrics`.
    pub(super) fn put_metrics(&mut self, m: Metrics) -> Result<VmmData> {
        let mut extra = serde_json::Map::new();
        if m.emit_id == Some(true) {
            extra.insert("id".into(), self.id.clone().into());
        }
        if let Some(p) = &m.properties {
            let props = p
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())));
            extra.insert(
                "properties".into(),
                serde_json::Value::Object(props.collect()),
            );
        }
        crate::api::metrics::configure(&m.metrics_path, extra)?;
        self.resources.metrics = Some(m);
        Ok(VmmData::Empty)
    }
}

fn configure_logger(l: &Logger) -> Result<()> {
    let level = match &l.level {
        Some(s) => {
            crate::logger::parse_level(s).ok_or_else(|| VmmActionError::LogLevel(s.clone()))?
        }
        None => log::LevelFilter::Info,
    };
    let out = match &l.log_path {
        Some(p) => {
            let (file, kind) =
                crate::hostfile::open_output(std::path::Path::new(p)).map_err(|source| {
                    VmmActionError::LogPath {
                        path: p.into(),
                        source,
                    }
                })?;
            // Logging may reopen it (rotation) after setup.
            crate::landlock::allow(std::path::Path::new(p), crate::landlock::Reach::ReadWrite);
            Some(crate::logger::Output::new(file, kind))
        }
        None => None,
    };
    crate::logger::configure(
        crate::logger::Settings {
            level,
            show_level: l.show_level.unwrap_or(false),
            show_origin: l.show_log_origin.unwrap_or(false),
            module: l.module.clone(),
        },
        out,
    );
    Ok(())
}
