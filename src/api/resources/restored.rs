//! A VM restored from a snapshot described as API bodies: the drives
//! and network interfaces (under the names the snapshot keeps) that
//! would have made it, so that `PATCH` finds them, `GET /vm/config`
//! reports them and the next snapshot keeps their names.

use super::VmResources;
use crate::api::types::*;
use crate::config::{
    DiskCache, DiskConfig, DiskEngine, DiskMode, NetBackendConfig, NetConfig, VmConfig,
};
use crate::snapshot::{DeviceIds, DriveId};

impl VmResources {
    /// The drives and network interfaces of a VM restored from a
    /// snapshot, as the VM saved had them: named `ids` (its drives only
    /// if the snapshot names them), made as `config` (the restored VM's)
    /// says. So `PATCH` finds them, `GET /vm/config` reports them and
    /// the next snapshot keeps their names.
    pub fn set_restored(&mut self, ids: &DeviceIds, config: &VmConfig) {
        self.drives = ids
            .drives
            .iter()
            .zip(&config.disks)
            .map(|(id, disk)| restored_drive(id, disk))
            .collect();
        self.nets = ids
            .ifaces
            .iter()
            .zip(&config.nets)
            .map(|(id, net)| restored_net(id, net))
            .collect();
    }
}

/// The `PUT /drives` body that would have made disk `disk` named `id`.
fn restored_drive(id: &DriveId, disk: &DiskConfig) -> Drive {
    Drive {
        drive_id: id.id.clone(),
        path_on_host: Some(disk.path.display().to_string()),
        is_root_device: id.root,
        is_read_only: Some(disk.mode == DiskMode::ReadOnly),
        // On the saved command line (`root=PARTUUID=`), not saved apart.
        partuuid: None,
        cache_type: Some(
            match disk.cache {
                DiskCache::Writeback => "Writeback",
                DiskCache::Unsafe => "Unsafe",
            }
            .into(),
        ),
        rate_limiter: RateLimiter::from_limits(&disk.limits),
        io_engine: Some(
            match disk.engine {
                DiskEngine::Sync => "Sync",
                DiskEngine::IoUring => "Async",
            }
            .into(),
        ),
        socket: None,
    }
}

/// The `PUT /network-interfaces` body that would have made network
/// device `net` named `id` (no `host_dev_name` for passt's, which has
/// no TAP).
fn restored_net(id: &str, net: &NetConfig) -> NetworkInterface {
    NetworkInterface {
        iface_id: id.to_owned(),
        host_dev_name: match &net.backend {
            NetBackendConfig::Tap { name } => name.clone(),
            NetBackendConfig::User { .. } => String::new(),
        },
        guest_mac: net.mac.as_ref().map(devices::virtio::net::format_mac),
        mtu: None,
        rx_rate_limiter: RateLimiter::from_limits(&net.rx_limits),
        tx_rate_limiter: RateLimiter::from_limits(&net.tx_limits),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::with_kernel;
    use super::*;

    /// A VM restored from a snapshot of an API-configured VM has its
    /// drives and interfaces under the same names, at the same guest
    /// indexes (the root drive first), made as they were.
    #[test]
    fn a_restored_vm_has_the_saved_vms_devices() {
        let mut r = with_kernel();
        let drive = |id: &str, root: bool| Drive {
            drive_id: id.into(),
            path_on_host: Some(format!("/{id}.img")),
            is_root_device: root,
            is_read_only: Some(root),
            partuuid: None,
            cache_type: Some("Unsafe".into()),
            rate_limiter: None,
            io_engine: Some("Async".into()),
            socket: None,
        };
        r.set_drive(drive("data", false)).unwrap();
        r.set_drive(Drive {
            rate_limiter: Some(RateLimiter {
                bandwidth: None,
                ops: Some(TokenBucket {
                    size: 10,
                    one_time_burst: Some(5),
                    refill_time: 100,
                }),
            }),
            ..drive("rootfs", true)
        })
        .unwrap();
        r.set_net(NetworkInterface {
            iface_id: "net1".into(),
            host_dev_name: "tap1".into(),
            guest_mac: Some("02:00:00:00:00:07".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: Some(RateLimiter {
                bandwidth: Some(TokenBucket {
                    size: 4096,
                    one_time_burst: None,
                    refill_time: 10,
                }),
                ops: None,
            }),
        })
        .unwrap();
        let (ids, config) = (r.device_ids(), r.vm_config().unwrap());
        assert_eq!(
            ids.drives[0],
            DriveId {
                id: "rootfs".into(),
                root: true
            }
        );
        let mut restored = with_kernel();
        restored.set_restored(&ids, &config);
        assert_eq!(restored.device_ids(), ids);
        assert_eq!(restored.drive_index("rootfs"), Some(0));
        assert_eq!(restored.drive_index("data"), Some(1));
        assert_eq!(restored.net_index("net1"), Some(0));
        let again = restored.vm_config().unwrap();
        assert_eq!((&again.disks, &again.nets), (&config.disks, &config.nets));
        // A snapshot that names no drive (a command-line VM's) gives none.
        let mut unnamed = with_kernel();
        unnamed.set_restored(&DeviceIds::default(), &config);
        assert_eq!(unnamed.drive_index("rootfs"), None);
    }
}
