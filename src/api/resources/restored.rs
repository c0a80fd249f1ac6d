//! A VM restored from a snapshot described as API bodies: its machine
//! configuration, boot source, drives and network interfaces (under the
//! names the snapshot keeps), vsock and entropy devices and metadata
//! service settings, as the requests that would have made it. So
//! `GET /machine-config` and `GET /vm/config` report the VM that runs,
//! not a VM nothing configured; `PATCH` finds its drives and interfaces;
//! and its next snapshot keeps their names.

use super::{boot_source, VmResources};
use crate::api::mmds::MmdsConfig;
use crate::api::types::*;
use crate::config::{
    DiskCache, DiskConfig, DiskEngine, DiskMode, NetBackendConfig, NetConfig, VmConfig, VsockConfig,
};
use crate::snapshot::{BootFiles, DeviceIds, DriveId, MmdsSettings};

impl VmResources {
    /// The configuration of a VM restored from a snapshot, as the VM
    /// saved had it: made as `config` (the restored VM's) says, its disks
    /// and network devices named `ids` (its drives only if the snapshot
    /// names them), booted from `boot` (if the snapshot names the files),
    /// tracking dirty pages if `track_dirty` (the load asked it to).
    pub fn set_restored(
        &mut self,
        ids: &DeviceIds,
        config: &VmConfig,
        boot: Option<&BootFiles>,
        track_dirty: bool,
    ) {
        self.set_shape(config);
        self.machine.track_dirty_pages = Some(track_dirty);
        self.boot = boot.map(|b| boot_source(&b.kernel, b.initrd.as_deref(), &config.cmdline));
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
        self.vsock = config.vsock.as_ref().map(restored_vsock);
        self.entropy = config.entropy.map(|l| EntropyDevice {
            rate_limiter: RateLimiter::from_limits(&l),
        });
        self.set_restored_mmds(ids, config);
    }

    /// The metadata service of a restored VM whose network devices
    /// (`config`'s, named `ids`) answer for one: its store becomes the
    /// API's (so `PUT /mmds` reaches the guest, however the VM was
    /// restored) and its settings are reported as `mmds-config`.
    fn set_restored_mmds(&mut self, ids: &DeviceIds, config: &VmConfig) {
        let answering = || {
            (ids.ifaces.iter().zip(&config.nets)).filter_map(|(id, n)| Some((id, n.mmds.as_ref()?)))
        };
        let Some((_, store)) = answering().next() else {
            return;
        };
        self.mmds = store.clone();
        let settings = MmdsSettings::of(store);
        self.mmds_config = Some(MmdsConfig {
            version: Some(if settings.v2 { "V2" } else { "V1" }.into()),
            network_interfaces: answering().map(|(id, _)| id.clone()).collect(),
            ipv4_address: Some(settings.ipv4.to_string()),
            imds_compat: Some(settings.imds_compat),
        });
    }
}

/// The `PUT /vsock` body that would have made vsock device `v`.
fn restored_vsock(v: &VsockConfig) -> Vsock {
    Vsock {
        guest_cid: v.guest_cid,
        uds_path: v.uds_path.display().to_string(),
        vsock_id: None,
    }
}

/// The `PUT /drives` body that would have made disk `disk` named `id`.
fn restored_drive(id: &DriveId, disk: &DiskConfig) -> Drive {
    Drive {
        drive_id: id.id.clone(),
        path_on_host: Some(disk.path.display().to_string()),
        is_root_device: id.root,
        is_read_only: Some(disk.mode == DiskMode::ReadOnly),
        partuuid: id.partuuid.clone(),
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
            partuuid: Some("0eaa91a0-01".into()),
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
                root: true,
                partuuid: Some("0eaa91a0-01".into()),
            }
        );
        let mut restored = with_kernel();
        let boot = BootFiles::of(&config);
        restored.set_restored(&ids, &config, boot.as_ref(), false);
        assert_eq!(restored.device_ids(), ids);
        assert_eq!(restored.drive_index("rootfs"), Some(0));
        assert_eq!(restored.drive_index("data"), Some(1));
        assert_eq!(restored.net_index("net1"), Some(0));
        let again = restored.vm_config().unwrap();
        assert_eq!((&again.disks, &again.nets), (&config.disks, &config.nets));
        // A snapshot that names no drive (a command-line VM's) gives none.
        let mut unnamed = with_kernel();
        unnamed.set_restored(&DeviceIds::default(), &config, None, false);
        assert_eq!(unnamed.drive_index("rootfs"), None);
    }

    /// A restored VM reports the machine it is (vCPUs, memory, transport,
    /// dirty page tracking), the files it booted from where the snapshot
    /// names them (no boot source where it does not), its vsock and
    /// entropy devices, and the metadata service settings its interfaces
    /// answer with, from the store they answer from.
    #[test]
    fn a_restored_vm_reports_its_shape_and_devices() {
        use crate::config::{Limits, Transport};
        let mut config = with_kernel().vm_config().unwrap();
        config.vcpus = 2;
        config.mem_size = 256 << 20;
        config.transport = Some(Transport::Pci);
        config.vsock = Some(VsockConfig {
            guest_cid: 7,
            uds_path: "/v.sock".into(),
        });
        config.entropy = Some(Limits::default());
        let store = crate::config::SharedMmds::default();
        MmdsSettings {
            v2: true,
            ipv4: "169.254.170.2".parse().unwrap(),
            imds_compat: false,
        }
        .apply(&store);
        let net = |mmds| NetConfig {
            backend: NetBackendConfig::Tap {
                name: "tap0".into(),
            },
            mac: None,
            rx_limits: Limits::default(),
            tx_limits: Limits::default(),
            mmds,
            vhost: false,
            tx_batch: true,
        };
        config.nets = vec![net(None), net(Some(store.clone()))];
        let ids = DeviceIds {
            drives: Vec::new(),
            ifaces: vec!["eth0".into(), "eth1".into()],
        };
        let mut r = VmResources::new("/dev/kvm".into());
        r.set_restored(&ids, &config, BootFiles::of(&config).as_ref(), true);
        let full = r.full_config();
        let m = full.machine_config.unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 256));
        assert_eq!(
            (m.transport, m.track_dirty_pages),
            (Some(Transport::Pci), Some(true))
        );
        let boot = full.boot_source.unwrap();
        assert_eq!(
            (boot.kernel_image_path.as_str(), boot.boot_args),
            ("/k", Some(config.cmdline.clone()))
        );
        assert_eq!(
            full.vsock.map(|v| (v.guest_cid, v.uds_path)),
            Some((7, "/v.sock".into()))
        );
        assert_eq!(full.entropy, Some(EntropyDevice { rate_limiter: None }));
        let mmds = full.mmds_config.unwrap();
        assert_eq!(mmds.network_interfaces, vec!["eth1".to_string()]);
        assert_eq!(mmds.version.as_deref(), Some("V2"));
        assert_eq!(mmds.ipv4_address.as_deref(), Some("169.254.170.2"));
        assert!(
            std::sync::Arc::ptr_eq(&r.mmds.0, &store.0),
            "the API's store is the devices'"
        );
        // A snapshot that does not name its kernel: no boot source.
        r.set_restored(&ids, &config, None, false);
        assert_eq!(r.full_config().boot_source, None);
    }
}
