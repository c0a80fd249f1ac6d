//! The API's request and response bodies. Field names are those of
//! Firecracker's API, so its clients (and its `--config-file` JSON) work
//! unchanged for the parts capsule implements. Unknown fields are refused.

use serde::{Deserialize, Serialize};
use serde_json::Value;

fn is_none<T>(v: &Option<T>) -> bool {
    v.is_none()
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "is_none")]
    pub boot_args: Option<String>,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /machine-config` (and its `GET`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u64,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (only `false` is supported).
    #[serde(default, skip_serializing_if = "is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking (only `false` is supported).
    #[serde(default, skip_serializing_if = "is_none")]
    pub track_dirty_pages: Option<bool>,
    /// CPU template (only `"None"` is supported).
    #[serde(default, skip_serializing_if = "is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages (only `"None"` is supported).
    #[serde(default, skip_serializing_if = "is_none")]
    pub huge_pages: Option<String>,
    /// The virtio transport, `"mmio"` or `"pci"` (a capsule extension;
    /// absent: the command line's `--transport`, else the one capsule
    /// picks for the kernel, shown here once the VM runs if it is
    /// `"pci"`).
    #[serde(default, skip_serializing_if = "is_none")]
    pub transport: Option<crate::config::Transport>,
}

/// `PATCH /machine-config`: the fields to change; the others keep their
/// values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "is_none")]
    pub vcpu_count: Option<u64>,
    /// Guest memory in MiB.
    #[serde(default, skip_serializing_if = "is_none")]
    pub mem_size_mib: Option<u64>,
    /// See [`MachineConfig::smt`].
    #[serde(default, skip_serializing_if = "is_none")]
    pub smt: Option<bool>,
    /// See [`MachineConfig::track_dirty_pages`].
    #[serde(default, skip_serializing_if = "is_none")]
    pub track_dirty_pages: Option<bool>,
    /// See [`MachineConfig::cpu_template`].
    #[serde(default, skip_serializing_if = "is_none")]
    pub cpu_template: Option<String>,
    /// See [`MachineConfig::huge_pages`].
    #[serde(default, skip_serializing_if = "is_none")]
    pub huge_pages: Option<String>,
    /// See [`MachineConfig::transport`].
    #[serde(default, skip_serializing_if = "is_none")]
    pub transport: Option<crate::config::Transport>,
}

impl MachineConfig {
    /// This configuration with the fields `u` gives replaced.
    pub fn patched(&self, u: MachineConfigUpdate) -> Self {
        Self {
            vcpu_count: u.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: u.smt.or(self.smt),
            track_dirty_pages: u.track_dirty_pages.or(self.track_dirty_pages),
            cpu_template: u.cpu_template.or_else(|| self.cpu_template.clone()),
            huge_pages: u.huge_pages.or_else(|| self.huge_pages.clone()),
            transport: u.transport.or(self.transport),
        }
    }
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or named pipe that receives the metrics, one JSON object a line.
    pub metrics_path: String,
    /// Put the instance id in each line (`"id"`).
    #[serde(default, skip_serializing_if = "is_none")]
    pub emit_id: Option<bool>,
    /// Key-value pairs put in each line under `"properties"`.
    #[serde(default, skip_serializing_if = "is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// A token bucket of a rate limiter (Firecracker's `TokenBucket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens (bytes or operations) the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at the start.
    #[serde(default, skip_serializing_if = "is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time: u64,
}

impl TokenBucket {
    /// The device-side configuration.
    pub fn bucket(&self) -> devices::rate_limiter::BucketConfig {
        devices::rate_limiter::BucketConfig {
            size: self.size,
            one_time_burst: self.one_time_burst.unwrap_or(0),
            refill_time_ms: self.refill_time,
        }
    }

    /// The API's form of the device-side `bucket`.
    pub fn from_bucket(bucket: &devices::rate_limiter::BucketConfig) -> Self {
        Self {
            size: bucket.size,
            one_time_burst: (bucket.one_time_burst != 0).then_some(bucket.one_time_burst),
            refill_time: bucket.refill_time_ms,
        }
    }
}

/// A rate limiter: bandwidth (bytes) and ops (requests) buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// The device-side configuration.
    pub fn limits(&self) -> crate::config::Limits {
        crate::config::Limits {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::bucket),
            ops: self.ops.as_ref().map(TokenBucket::bucket),
        }
    }

    /// The API's form of the device-side `limits`; `None` if they limit
    /// nothing.
    pub fn from_limits(limits: &crate::config::Limits) -> Option<Self> {
        let l = Self {
            bandwidth: limits.bandwidth.as_ref().map(TokenBucket::from_bucket),
            ops: limits.ops.as_ref().map(TokenBucket::from_bucket),
        };
        (l != Self::default()).then_some(l)
    }
}

/// `PUT /entropy`: a virtio-rng device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Limits on the random bytes and requests the guest gets.
    #[serde(default, skip_serializing_if = "is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id (must match the path).
    pub drive_id: String,
    /// Host path of the raw image.
    #[serde(default, skip_serializing_if = "is_none")]
    pub path_on_host: Option<String>,
    /// The guest's root device (`root=` is added to the command line).
    pub is_root_device: bool,
    /// Read-only for the guest.
    #[serde(default, skip_serializing_if = "is_none")]
    pub is_read_only: Option<bool>,
    /// Root partition UUID (with `is_root_device`).
    #[serde(default, skip_serializing_if = "is_none")]
    pub partuuid: Option<String>,
    /// `"Writeback"` (the default: a guest's flush is an `fdatasync` of the
    /// image) or `"Unsafe"` (flushes complete without one).
    #[serde(default, skip_serializing_if = "is_none")]
    pub cache_type: Option<String>,
    /// Limits on the guest's requests (bytes and operations).
    #[serde(default, skip_serializing_if = "is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// `"Sync"` (the default: requests one after the other) or `"Async"`
    /// (through an io_uring, as `--disk ...,engine=io_uring`).
    #[serde(default, skip_serializing_if = "is_none")]
    pub io_engine: Option<String>,
    /// vhost-user socket: not supported, refused when present.
    #[serde(default, skip_serializing_if = "is_none")]
    pub socket: Option<String>,
}

/// `PUT /vsock`: the vsock device and its host Unix socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket capsule listens on for host-initiated connections;
    /// guest connections to host port P go to `<uds_path>_P`.
    pub uds_path: String,
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "is_none")]
    pub vsock_id: Option<String>,
}

/// `PATCH /drives/{drive_id}`: a new image and/or new limits for a
/// running VM's drive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's id (must match the path).
    pub drive_id: String,
    /// A new image: the guest sees a media change.
    #[serde(default, skip_serializing_if = "is_none")]
    pub path_on_host: Option<String>,
    /// New limits.
    #[serde(default, skip_serializing_if = "is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`: new limits for a running VM's
/// interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's id (must match the path).
    pub iface_id: String,
    /// New limits on what the guest receives.
    #[serde(default, skip_serializing_if = "is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New limits on what the guest sends.
    #[serde(default, skip_serializing_if = "is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id (must match the path).
    pub iface_id: String,
    /// Host TAP device name.
    pub host_dev_name: String,
    /// Guest MAC address.
    #[serde(default, skip_serializing_if = "is_none")]
    pub guest_mac: Option<String>,
    /// MTU to advertise.
    #[serde(default, skip_serializing_if = "is_none")]
    pub mtu: Option<u16>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Flush metrics (capsule has no metrics: refused).
    FlushMetrics,
    /// Build and boot the VM.
    InstanceStart,
    /// Type Ctrl-Alt-Del on the guest's keyboard.
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// `PATCH /vm` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Park the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The wanted state.
    pub state: VmState,
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// File or named pipe for the log (appended to).
    #[serde(default, skip_serializing_if = "is_none")]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`
    /// (case-insensitive).
    #[serde(default, skip_serializing_if = "is_none")]
    pub level: Option<String>,
    /// Write the level in each line.
    #[serde(default, skip_serializing_if = "is_none")]
    pub show_level: Option<bool>,
    /// Write the source file and line in each line.
    #[serde(default, skip_serializing_if = "is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log messages whose module path starts with this.
    #[serde(default, skip_serializing_if = "is_none")]
    pub module: Option<String>,
}

/// `PUT /serial`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// File or named pipe that receives the guest's serial output.
    #[serde(default, skip_serializing_if = "is_none")]
    pub serial_out_path: Option<String>,
    /// Not supported: refused when present.
    #[serde(default, skip_serializing_if = "is_none")]
    pub rate_limiter: Option<Value>,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// Always `"capsule"`.
    pub app_name: String,
    /// The instance id (`--id`, or the VM's `--name`).
    pub id: String,
    /// `"Not started"`, `"Running"` or `"Paused"`.
    pub state: String,
    /// capsule's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    /// capsule's version, under Firecracker's field name.
    pub firecracker_version: String,
}

/// `GET /vm/config`, and the `--config-file` format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    /// Kernel, command line, initrd.
    #[serde(rename = "boot-source", default, skip_serializing_if = "is_none")]
    pub boot_source: Option<BootSource>,
    /// Block devices, in the order the guest sees them.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default, skip_serializing_if = "is_none")]
    pub machine_config: Option<MachineConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Logger.
    #[serde(default, skip_serializing_if = "is_none")]
    pub logger: Option<Logger>,
    /// Serial output (capsule extension of the config file; the API's
    /// `PUT /serial`). Not reported by `GET /vm/config`, whose schema has
    /// no such section.
    #[serde(default, skip_serializing)]
    pub serial: Option<SerialDevice>,
    /// The balloon device.
    #[serde(default, skip_serializing_if = "is_none")]
    pub balloon: Option<super::balloon::Balloon>,
    /// Firecracker devices capsule does not have: refused when present.
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<Value>,
    /// Metrics output.
    #[serde(default, skip_serializing_if = "is_none")]
    pub metrics: Option<Metrics>,
    /// See `cpu_config`.
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<Value>,
    /// The metadata service's settings.
    #[serde(rename = "mmds-config", default, skip_serializing_if = "is_none")]
    pub mmds_config: Option<super::mmds::MmdsConfig>,
    /// See `cpu_config`.
    #[serde(default, skip_serializing)]
    pub pmem: Option<Value>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "is_none")]
    pub vsock: Option<Vsock>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "is_none")]
    pub entropy: Option<EntropyDevice>,
}

impl FullVmConfig {
    /// The Firecracker sections present that capsule does not implement.
    pub fn unsupported_sections(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let present = |o: &Option<Value>| o.as_ref().is_some_and(|v| !v.is_null());
        for (name, o) in [
            ("cpu-config", &self.cpu_config),
            ("memory-hotplug", &self.memory_hotplug),
            ("pmem", &self.pmem),
        ] {
            if present(o) {
                v.push(name);
            }
        }
        v
    }
}

/// Why a request body was refused; the message is fit for
/// `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The request has no body.
    #[error("the request needs a JSON body")]
    Empty,
    /// The body is not the JSON this request takes.
    #[error("invalid request body: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parses a JSON body into `T`.
pub fn from_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    if body.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_bodies() {
        let ok: BootSource = from_body(br#"{"kernel_image_path":"/k","boot_args":"x"}"#).unwrap();
        assert_eq!(ok.boot_args.as_deref(), Some("x"));
        let e = from_body::<BootSource>(br#"{"kernel_image_path":"/k","nope":1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `nope`"), "{e}");
        let e = from_body::<MachineConfig>(br#"{"vcpu_count":"2","mem_size_mib":1}"#).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        assert!(from_body::<Vm>(br#"{"state":"Frozen"}"#).is_err());
        assert!(matches!(from_body::<Vm>(b""), Err(BodyError::Empty)));
        assert!(from_body::<Vm>(b"{").is_err());
        let a: InstanceActionInfo = from_body(br#"{"action_type":"SendCtrlAltDel"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::SendCtrlAltDel);
    }

    #[test]
    fn the_transport_is_mmio_or_pci_and_optional() {
        use crate::config::Transport;
        let m: MachineConfig = from_body(br#"{"vcpu_count":1,"mem_size_mib":128}"#).unwrap();
        assert_eq!(m.transport, None, "Firecracker's bodies are still taken");
        assert!(!serde_json::to_string(&m).unwrap().contains("transport"));
        let m: MachineConfig =
            from_body(br#"{"vcpu_count":1,"mem_size_mib":128,"transport":"pci"}"#).unwrap();
        assert_eq!(m.transport, Some(Transport::Pci));
        assert_eq!(
            serde_json::to_value(&m).unwrap()["transport"],
            serde_json::json!("pci")
        );
        for bad in [r#""usb""#, r#""PCI""#, "1", r#""""#] {
            let body = format!(r#"{{"vcpu_count":1,"mem_size_mib":128,"transport":{bad}}}"#);
            let e = from_body::<MachineConfig>(body.as_bytes()).unwrap_err();
            assert!(e.to_string().starts_with("invalid request body: "), "{e}");
            if bad.starts_with('"') {
                assert!(e.to_string().contains("expected `mmio` or `pci`"), "{e}");
            }
        }
        let u: MachineConfigUpdate = from_body(br#"{"transport":"mmio"}"#).unwrap();
        assert_eq!(m.patched(u).transport, Some(Transport::Mmio));
        let c: FullVmConfig = serde_json::from_str(
            r#"{"machine-config":{"vcpu_count":1,"mem_size_mib":128,"transport":"pci"}}"#,
        )
        .unwrap();
        assert_eq!(c.machine_config.unwrap().transport, Some(Transport::Pci));
    }

    #[test]
    fn full_config_names() {
        let c: FullVmConfig = serde_json::from_str(
            r#"{"boot-source":{"kernel_image_path":"/k"},
                "machine-config":{"vcpu_count":2,"mem_size_mib":256},
                "drives":[{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false}],
                "network-interfaces":[], "vsock": null}"#,
        )
        .unwrap();
        assert!(c.unsupported_sections().is_empty());
        let out = serde_json::to_value(&c).unwrap();
        assert_eq!(out["machine-config"]["vcpu_count"], 2);
        assert_eq!(out["drives"][0]["drive_id"], "rootfs");
        let c: FullVmConfig = serde_json::from_str(r#"{"pmem":[{"id":"p"}]}"#).unwrap();
        assert_eq!(c.unsupported_sections(), ["pmem"]);
        let c: FullVmConfig =
            serde_json::from_str(r#"{"balloon":{"amount_mib":1,"deflate_on_oom":true}}"#).unwrap();
        assert!(c.unsupported_sections().is_empty());
        assert_eq!(c.balloon.unwrap().amount_mib, 1);
    }
}
