//! Firecracker-style metrics: `PUT /metrics` (or `--metrics-path`) names a
//! file or named pipe; each flush (the `FlushMetrics` action, and every
//! [`PERIOD`] on its own) appends one JSON object on one line.
//!
//! As in Firecracker, every counter reports what happened since the
//! previous flush (a delta), and `utc_timestamp_ms` says when the line was
//! written. The groups and keys present (a subset of Firecracker's; the
//! README lists them) are those of [`snapshot`]. Device counters live in
//! `devices::metrics`; API request counters are here.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use devices::metrics::{Counter, BALLOON, BLOCK, ENTROPY, NET, UART, VCPU};
use serde_json::{Map, Value};

use crate::hostfile::OutputKind;

/// How often metrics are written without a `FlushMetrics`.
pub const PERIOD: Duration = Duration::from_secs(60);

/// API requests, by method and resource (Firecracker's
/// `get_api_requests`, `put_api_requests`, `patch_api_requests`).
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// `GET /`.
    pub get_instance_info_count: Counter,
    /// `GET /machine-config`.
    pub get_machine_cfg_count: Counter,
    /// `GET /version`.
    pub get_vmm_version_count: Counter,
    /// `GET /vm/config`.
    pub get_vm_config_count: Counter,
    /// `PUT /actions` (and its failures).
    pub put_actions: (Counter, Counter),
    /// `PUT /boot-source`.
    pub put_boot_source: (Counter, Counter),
    /// `PUT /drives/{id}`.
    pub put_drive: (Counter, Counter),
    /// `PUT /logger`.
    pub put_logger: (Counter, Counter),
    /// `PUT /machine-config`.
    pub put_machine_cfg: (Counter, Counter),
    /// `PUT /metrics`.
    pub put_metrics: (Counter, Counter),
    /// `PUT /network-interfaces/{id}`.
    pub put_network: (Counter, Counter),
    /// `PUT /entropy`.
    pub put_entropy: (Counter, Counter),
    /// `PUT /cpu-config`.
    pub put_cpu_cfg: (Counter, Counter),
    /// `PATCH /machine-config`.
    pub patch_machine_cfg: (Counter, Counter),
    /// `PATCH /drives/{id}`.
    pub patch_drive: (Counter, Counter),
    /// `PATCH /network-interfaces/{id}`.
    pub patch_network: (Counter, Counter),
    /// `PATCH /vm`.
    pub patch_vm: (Counter, Counter),
}

/// The process's API request counters.
pub static API: OnceLock<ApiMetrics> = OnceLock::new();

/// The API counters (created on first use).
pub fn api() -> &'static ApiMetrics {
    API.get_or_init(ApiMetrics::default)
}

/// The `(count, fails)` pair of `action`, if it is counted.
pub fn counters_for(action: &super::action::VmmAction) -> Option<&'static (Counter, Counter)> {
    use super::action::VmmAction as A;
    let m = api();
    Some(match action {
        A::Action(_) => &m.put_actions,
        A::PutBootSource(_) => &m.put_boot_source,
        A::PutDrive(_) => &m.put_drive,
        A::PutLogger(_) => &m.put_logger,
        A::PutMachineConfig(_) => &m.put_machine_cfg,
        A::PutMetrics(_) => &m.put_metrics,
        A::PutNetworkInterface(_) => &m.put_network,
        A::PutEntropy(_) => &m.put_entropy,
        A::PutCpuConfig => &m.put_cpu_cfg,
        A::PatchMachineConfig(_) => &m.patch_machine_cfg,
        A::PatchVm(_) => &m.patch_vm,
        A::PatchDrive(_) => &m.patch_drive,
        A::PatchNetworkInterface(_) => &m.patch_network,
        A::GetInstanceInfo => {
            m.get_instance_info_count.inc();
            return None;
        }
        A::GetMachineConfig => {
            m.get_machine_cfg_count.inc();
            return None;
        }
        A::GetVersion => {
            m.get_vmm_version_count.inc();
            return None;
        }
        A::GetVmConfig => {
            m.get_vm_config_count.inc();
            return None;
        }
        _ => return None,
    })
}

/// A metrics line's values: `(group, key, value)`.
type Values = Vec<(&'static str, &'static str, u64)>;

/// Every counter as `(group, key, value)`, in output order: the devices'
/// and vCPUs', then the API's.
pub fn snapshot() -> Values {
    let mut v = device_counters();
    api_counters(&mut v);
    v
}

/// Appends `counters` of `group` to `v`.
fn push(v: &mut Values, group: &'static str, counters: &[(&'static str, &Counter)]) {
    v.extend(counters.iter().map(|(key, c)| (group, *key, c.get())));
}

/// The counters the devices and vCPUs keep (`devices::metrics`), a
/// group per device kind.
fn device_counters() -> Values {
    let mut v = Vec::new();
    for group in [
        vcpu_counters,
        uart_counters,
        block_counters,
        net_counters,
        entropy_counters,
        balloon_counters,
    ] {
        group(&mut v);
    }
    v
}

/// The vCPUs' exits by kind, and their failures.
fn vcpu_counters(v: &mut Values) {
    push(
        v,
        "vcpu",
        &[
            ("exit_io_in", &VCPU.exit_io_in),
            ("exit_io_out", &VCPU.exit_io_out),
            ("exit_mmio_read", &VCPU.exit_mmio_read),
            ("exit_mmio_write", &VCPU.exit_mmio_write),
            ("failures", &VCPU.failures),
        ],
    );
}

/// The serial port's output bytes, written and missed.
fn uart_counters(v: &mut Values) {
    push(
        v,
        "uart",
        &[
            ("write_count", &UART.write_count),
            ("missed_write_count", &UART.missed_write_count),
        ],
    );
}

/// The block devices' I/O, failures and throttling.
fn block_counters(v: &mut Values) {
    push(
        v,
        "block",
        &[
            ("read_bytes", &BLOCK.read_bytes),
            ("write_bytes", &BLOCK.write_bytes),
            ("read_count", &BLOCK.read_count),
            ("write_count", &BLOCK.write_count),
            ("flush_count", &BLOCK.flush_count),
            ("invalid_reqs_count", &BLOCK.invalid_reqs_count),
            ("execute_fails", &BLOCK.execute_fails),
            ("queue_event_count", &BLOCK.queue_event_count),
            (
                "rate_limiter_throttled_events",
                &BLOCK.rate_limiter_throttled_events,
            ),
        ],
    );
}

/// The network devices' traffic, TAP failures and throttling.
fn net_counters(v: &mut Values) {
    push(
        v,
        "net",
        &[
            ("rx_bytes_count", &NET.rx_bytes_count),
            ("rx_packets_count", &NET.rx_packets_count),
            ("tx_bytes_count", &NET.tx_bytes_count),
            ("tx_packets_count", &NET.tx_packets_count),
            ("tap_read_fails", &NET.tap_read_fails),
            ("tap_write_fails", &NET.tap_write_fails),
            ("tx_malformed_frames", &NET.tx_malformed_frames),
            ("rx_queue_event_count", &NET.rx_queue_event_count),
            ("tx_queue_event_count", &NET.tx_queue_event_count),
            ("rx_rate_limiter_throttled", &NET.rx_rate_limiter_throttled),
            ("tx_rate_limiter_throttled", &NET.tx_rate_limiter_throttled),
        ],
    );
}

/// The entropy device's requests, bytes and failures.
fn entropy_counters(v: &mut Values) {
    push(
        v,
        "entropy",
        &[
            ("entropy_event_count", &ENTROPY.entropy_event_count),
            ("entropy_bytes", &ENTROPY.entropy_bytes),
            ("host_rng_fails", &ENTROPY.host_rng_fails),
            (
                "entropy_rate_limiter_throttled",
                &ENTROPY.entropy_rate_limiter_throttled,
            ),
        ],
    );
}

/// The balloon's inflations, deflations, statistics and free page reports.
fn balloon_counters(v: &mut Values) {
    let b = &BALLOON;
    push(
        v,
        "balloon",
        &[
            ("inflate_count", &b.inflate_count),
            ("deflate_count", &b.deflate_count),
            ("stats_updates_count", &b.stats_updates_count),
            ("stats_update_fails", &b.stats_update_fails),
            ("event_fails", &b.event_fails),
            ("free_page_report_count", &b.free_page_report_count),
            ("free_page_report_freed", &b.free_page_report_freed),
            ("free_page_report_fails", &b.free_page_report_fails),
        ],
    );
}

/// The API's request counters; requests that can fail are counted twice
/// (all, and the failed ones).
fn api_counters(v: &mut Values) {
    let a = api();
    push(
        v,
        "get_api_requests",
        &[
            ("instance_info_count", &a.get_instance_info_count),
            ("machine_cfg_count", &a.get_machine_cfg_count),
            ("vmm_version_count", &a.get_vmm_version_count),
            ("vm_config_count", &a.get_vm_config_count),
        ],
    );
    let mut requests =
        |group: &'static str, pairs: &[(&'static str, &'static str, &(Counter, Counter))]| {
            for (count, fails, (c, f)) in pairs {
                push(v, group, &[(count, c), (fails, f)]);
            }
        };
    requests(
        "put_api_requests",
        &[
            ("actions_count", "actions_fails", &a.put_actions),
            ("boot_source_count", "boot_source_fails", &a.put_boot_source),
            ("drive_count", "drive_fails", &a.put_drive),
            ("logger_count", "logger_fails", &a.put_logger),
            ("machine_cfg_count", "machine_cfg_fails", &a.put_machine_cfg),
            ("metrics_count", "metrics_fails", &a.put_metrics),
            ("network_count", "network_fails", &a.put_network),
            ("entropy_count", "entropy_fails", &a.put_entropy),
            ("cpu_cfg_count", "cpu_cfg_fails", &a.put_cpu_cfg),
        ],
    );
    requests(
        "patch_api_requests",
        &[
            (
                "machine_cfg_count",
                "machine_cfg_fails",
                &a.patch_machine_cfg,
            ),
            ("drive_count", "drive_fails", &a.patch_drive),
            ("network_count", "network_fails", &a.patch_network),
            ("vm_count", "vm_fails", &a.patch_vm),
        ],
    );
}

/// Where metrics go, and the values of the last line written.
struct Sink {
    file: File,
    kind: OutputKind,
    /// Fields put in every line (`id`, `properties`).
    extra: Map<String, Value>,
    last: BTreeMap<(&'static str, &'static str), u64>,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

fn sink() -> std::sync::MutexGuard<'static, Option<Sink>> {
    SINK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why metrics could not be set up or written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `PUT /metrics` a second time.
    #[error("Reinitialization of metrics not allowed.")]
    AlreadyConfigured,
    /// The file could not be opened.
    #[error("cannot open metrics_path {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `FlushMetrics` before `PUT /metrics`.
    #[error("metrics are not configured (PUT /metrics first)")]
    NotConfigured,
    /// The line could not be written.
    #[error("cannot write metrics: {0}")]
    Write(#[source] std::io::Error),
}

/// Sends metrics to `path` (a file, appended to, or a FIFO with a reader)
/// from now on, and writes them every [`PERIOD`]. Only once per process.
/// `extra` fields (the instance `id`, `properties`) go in every line.
pub fn configure(path: &str, extra: Map<String, Value>) -> Result<(), MetricsError> {
    let mut s = sink();
    if s.is_some() {
        return Err(MetricsError::AlreadyConfigured);
    }
    let (file, kind) =
        crate::hostfile::open_output(std::path::Path::new(path)).map_err(|source| {
            MetricsError::Open {
                path: path.to_string(),
                source,
            }
        })?;
    *s = Some(Sink {
        file,
        kind,
        extra,
        last: BTreeMap::new(),
    });
    drop(s);
    let _ = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(|| loop {
            std::thread::sleep(PERIOD);
            if let Err(e) = flush() {
                log::warn!("periodic metrics: {e}");
            }
        })
        .map_err(|e| log::warn!("no periodic metrics: cannot start the thread: {e}"));
    Ok(())
}

/// The JSON line for `values`, with each counter's change since `last`
/// (which is updated).
fn line(
    values: &[(&'static str, &'static str, u64)],
    last: &mut BTreeMap<(&'static str, &'static str), u64>,
    now_ms: u64,
    extra: &Map<String, Value>,
) -> String {
    let mut root = extra.clone();
    root.insert("utc_timestamp_ms".into(), Value::from(now_ms));
    for &(group, key, value) in values {
        let before = last.insert((group, key), value).unwrap_or(0);
        let g = root
            .entry(group)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = g {
            m.insert(key.into(), Value::from(value.saturating_sub(before)));
        }
    }
    let mut s = Value::Object(root).to_string();
    s.push('\n');
    s
}

/// Writes one metrics line if metrics are configured (when the VM ends).
pub fn flush_if_configured() -> Result<(), MetricsError> {
    match flush() {
        Err(MetricsError::NotConfigured) => Ok(()),
        r => r,
    }
}

/// Writes one metrics line now (`FlushMetrics`).
pub fn flush() -> Result<(), MetricsError> {
    let mut guard = sink();
    let Some(s) = guard.as_mut() else {
        return Err(MetricsError::NotConfigured);
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let text = line(&snapshot(), &mut s.last, now_ms, &s.extra);
    // A FIFO is non-blocking: a line its reader cannot take now is lost
    // (never waited for), like a log line.
    match s.file.write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if s.kind == OutputKind::Fifo && e.kind() == std::io::ErrorKind::WouldBlock => {
            log::warn!("metrics line dropped: the metrics FIFO is full");
            Ok(())
        }
        Err(e) => Err(MetricsError::Write(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_hold_deltas_since_the_last_line() {
        let mut last = BTreeMap::new();
        let mut extra = Map::new();
        extra.insert("id".into(), Value::from("vm-1"));
        let l = line(
            &[("vcpu", "exit_io_in", 5), ("net", "rx_bytes_count", 7)],
            &mut last,
            9,
            &extra,
        );
        let v: Value = serde_json::from_str(&l).unwrap();
        assert!(l.ends_with('\n') && !l.trim_end().contains('\n'));
        assert_eq!(v["utc_timestamp_ms"], 9);
        assert_eq!(v["vcpu"]["exit_io_in"], 5);
        assert_eq!(v["id"], "vm-1");
        let l = line(
            &[("vcpu", "exit_io_in", 12), ("net", "rx_bytes_count", 7)],
            &mut last,
            10,
            &Map::new(),
        );
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["vcpu"]["exit_io_in"], 7);
        assert_eq!(v["net"]["rx_bytes_count"], 0);
    }

    #[test]
    fn every_key_is_reported_once() {
        let s = snapshot();
        let mut keys: Vec<_> = s.iter().map(|(g, k, _)| (*g, *k)).collect();
        keys.sort_unstable();
        let n = keys.len();
        keys.dedup();
        assert_eq!(n, keys.len());
    }
}
