//! Firecracker's snapshot API: `PUT /snapshot/create` (a paused VM to a
//! snapshot file and a memory file) and `PUT /snapshot/load` (a new VM
//! from them, before any other configuration). The bodies, their checks
//! and the two actions' work; the routes join the others in
//! [`super::server::route`] through [`route`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::action::{VmmAction, VmmActionError, VmmData};
use super::http::Response;
use super::types::{from_body, BodyError};
use crate::builder::Console;
use crate::snapshot::restore::{self, RestoreConfig};
use crate::vmm::Vmm;

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// Where the state goes.
    pub snapshot_path: String,
    /// `Full` (the default) or `Diff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Only the pages written since the last snapshot.
    Diff,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// `File` or `Uffd`.
    pub backend_type: MemoryBackendType,
    /// The memory file (or, for Uffd, a socket).
    pub backend_path: String,
}

/// How guest memory is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Mapped from a file.
    File,
    /// Served by a userfaultfd handler (not supported).
    Uffd,
}

/// One entry of `network_overrides`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface's id in the snapshot.
    pub iface_id: String,
    /// Its new TAP device.
    pub host_dev_name: String,
}

/// `vsock_override` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The vsock device's new Unix socket.
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (older form of `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// The memory backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Track dirty pages for later Diff snapshots (older name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages for later Diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Resume the VM once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// New TAP devices for the snapshot's interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// A new host socket for the snapshot's vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest's wall clock by the time spent saved (refused:
    /// the KVM clock resumes where it stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
    /// Huge pages for the restored memory (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<serde_json::Value>,
}

/// Routes `/snapshot/...`; `None` if the path is not one of them.
pub fn route(method: &str, segments: &[&str], body: &[u8]) -> Option<Result<VmmAction, Response>> {
    let bad = |e: BodyError| Response::fault(400, e.to_string());
    Some(match (method, segments) {
        ("PUT", ["snapshot", "create"]) => {
            from_body(body).map(VmmAction::CreateSnapshot).map_err(bad)
        }
        ("PUT", ["snapshot", "load"]) => from_body(body).map(VmmAction::LoadSnapshot).map_err(bad),
        (_, ["snapshot", "create" | "load"]) => Err(Response::fault(
            400,
            format!(
                "Invalid request method and/or path: {method} /{}",
                segments.join("/")
            ),
        )),
        _ => return None,
    })
}

/// `PUT /snapshot/create` on the paused VM `vmm`; `ids` name its drives
/// and network devices.
pub fn create(
    vmm: &mut Vmm,
    p: &SnapshotCreateParams,
    ids: &crate::snapshot::DeviceIds,
) -> Result<VmmData, VmmActionError> {
    let kind = match p.snapshot_type {
        Some(SnapshotType::Diff) => crate::snapshot::Kind::Diff,
        _ => crate::snapshot::Kind::Full,
    };
    crate::snapshot::create(
        vmm,
        kind,
        &PathBuf::from(&p.snapshot_path),
        &PathBuf::from(&p.mem_file_path),
        ids,
    )?;
    Ok(VmmData::Empty)
}

/// The restore `p` asks for, checked.
pub fn restore_config(
    p: &SnapshotLoadParams,
    kvm_path: PathBuf,
) -> Result<RestoreConfig, VmmActionError> {
    let mem_path = match (&p.mem_file_path, &p.mem_backend) {
        (Some(path), None) => path.clone(),
        (None, Some(b)) if b.backend_type == MemoryBackendType::File => b.backend_path.clone(),
        (None, Some(_)) => {
            return Err(VmmActionError::Unsupported(
                "mem_backend Uffd is not supported: use backend_type File",
            ))
        }
        _ => {
            return Err(VmmActionError::Unsupported(
                "give exactly one of mem_backend and mem_file_path",
            ))
        }
    };
    if p.clock_realtime == Some(true) {
        return Err(VmmActionError::Unsupported(
            "clock_realtime is not supported: the guest clock resumes where it stopped",
        ));
    }
    if p.huge_pages.as_ref().is_some_and(|h| h != "None") {
        return Err(VmmActionError::Unsupported(
            "huge_pages: a restored VM's memory maps the memory file",
        ));
    }
    Ok(RestoreConfig {
        snapshot_path: PathBuf::from(&p.snapshot_path),
        mem_path: PathBuf::from(mem_path),
        kvm_path,
        resume: p.resume_vm.unwrap_or(false),
        tap_overrides: p
            .network_overrides
            .iter()
            .flatten()
            .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
            .collect(),
        nets: None,
        disks: None,
        base: None,
        vsock: None,
        vsock_uds: p
            .vsock_override
            .as_ref()
            .map(|v| PathBuf::from(&v.uds_path)),
        mmds: Default::default(),
        track_dirty: p.track_dirty_pages == Some(true) || p.enable_diff_snapshots == Some(true),
    })
}

/// `PUT /snapshot/load`: the restored VM and its devices' names.
pub fn load(cfg: &RestoreConfig, console: Console) -> Result<restore::Restored, VmmActionError> {
    Ok(restore::restore(cfg, console)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_body(body: &str) -> Result<RestoreConfig, Box<dyn std::error::Error>> {
        let p: SnapshotLoadParams = from_body(body.as_bytes())?;
        Ok(restore_config(&p, "/dev/kvm".into())?)
    }

    #[test]
    fn load_bodies() {
        let c = load_body(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"},
                "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}"#,
        )
        .unwrap();
        assert_eq!(c.mem_path, PathBuf::from("m"));
        assert!(c.resume);
        assert_eq!(c.tap_overrides, vec![("eth0".into(), "tap9".into())]);
        let c = load_body(r#"{"snapshot_path": "s", "mem_file_path": "m2"}"#).unwrap();
        assert_eq!(c.mem_path, PathBuf::from("m2"));
        assert!(!c.resume);
        assert!(load_body(r#"{"snapshot_path": "s"}"#).is_err());
        assert!(load_body(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#
        )
        .is_err());
        assert!(load_body(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"}}"#
        )
        .unwrap_err()
        .to_string()
        .contains("Uffd"));
        assert!(
            load_body(r#"{"snapshot_path": "s", "mem_file_path": "m", "track_dirty_pages": true}"#)
                .unwrap()
                .track_dirty
        );
        assert!(
            load_body(
                r#"{"snapshot_path": "s", "mem_file_path": "m", "enable_diff_snapshots": true}"#
            )
            .unwrap()
            .track_dirty
        );
        assert!(load_body(r#"{"snapshot_path": "s", "mem_file_path": "m", "bogus": 1}"#).is_err());
    }

    #[test]
    fn routes() {
        let r = route(
            "PUT",
            &["snapshot", "create"],
            br#"{"snapshot_path": "s", "mem_file_path": "m"}"#,
        );
        assert!(matches!(r, Some(Ok(VmmAction::CreateSnapshot(_)))));
        let r = route("GET", &["snapshot", "create"], b"");
        assert!(matches!(r, Some(Err(resp)) if resp.status == 400));
        assert!(route("PUT", &["snapshot"], b"").is_none());
        let r = route(
            "PUT",
            &["snapshot", "create"],
            br#"{"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Weird"}"#,
        );
        assert!(matches!(r, Some(Err(_))));
    }
}
