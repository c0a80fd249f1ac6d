//! The devices step of [`super::build_with`]: each kind of device opened
//! (disks, network backends, virtiofsd, the vsock socket) and attached
//! over virtio-mmio and to the event loop, one method per kind.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arch::GuestMemoryMmap;
use devices::exit::ExitSignal;
use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::block::{Block, BlockConfig, CacheMode, ID_BYTES};
use devices::virtio::net::{
    self, KernelVhostNet, Net, NetBackend, Passt, PasstConfig, Tap, VhostNet,
};
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, SubscriberOps};

use super::{Console, Error, Extras, Result};
use crate::config::{
    default_mac, DiskCache, DiskConfig, DiskMode, FsConfig, NetBackendConfig, NetConfig,
    VsockConfig,
};
use crate::device_manager::DeviceManager;
use crate::vmm::{Subscriber, VsockHandle};
use crate::vstate::vm::Vm;

/// What adding a device needs: the buses, the VM (for irqfds and
/// ioeventfds), guest memory (for virtio queues) and the event loop.
pub(crate) struct Devices<'a> {
    pub(super) dm: &'a mut DeviceManager,
    pub(super) vm: &'a Vm,
    pub(super) mem: &'a GuestMemoryMmap,
    /// The transport virtio devices are attached over.
    pub(super) transport: super::Transport,
    pub(super) event_manager: &'a mut EventManager<Subscriber>,
    /// The disks added, in order (for snapshots).
    pub(crate) blocks: Vec<Arc<Mutex<Block>>>,
    /// The network devices' MAC addresses, in order.
    pub(crate) macs: Vec<net::MacAddr>,
}

impl Devices<'_> {
    /// COM1 (and its input), the i8042, ACPI PM registers, pvpanic and the
    /// boot-time marker on the port-I/O bus.
    pub(crate) fn add_legacy(&mut self, exit: &ExitSignal, console: Console) -> Result<()> {
        let serial_input = self.dm.attach_legacy_devices(
            self.vm,
            exit,
            console.out,
            console.input,
            crate::process_start(),
        )?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(serial_input)));
        Ok(())
    }

    /// A virtio device, over the VM's transport (`VmConfig::transport`)
    /// and in the event loop: one object, the transport's device and the
    /// loop's subscriber.
    fn add_virtio(&mut self, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<()> {
        match self.transport {
            super::Transport::Mmio => {
                self.dm
                    .attach_virtio_mmio(self.vm, self.mem, device.clone())?;
            }
            super::Transport::Pci => {
                self.dm
                    .attach_virtio_pci(self.vm, self.mem, device.clone())?
            }
        }
        self.event_manager.add_subscriber(device);
        Ok(())
    }

    /// One virtio-blk device per `--disk`, in order (vda, vdb, ...);
    /// returns them, for changes while the VM runs.
    pub(crate) fn add_disks(&mut self, disks: &[DiskConfig]) -> Result<Vec<Arc<Mutex<Block>>>> {
        let mut out = Vec::new();
        for (index, disk) in disks.iter().enumerate() {
            let block = Arc::new(Mutex::new(open_disk(index, disk)?));
            self.blocks.push(block.clone());
            self.add_virtio(block.clone())?;
            out.push(block);
        }
        Ok(out)
    }

    /// One virtio-fs device per `--fs`, each with its own virtiofsd.
    pub(super) fn add_shares(&mut self, shares: &[FsConfig], virtiofsd: &Path) -> Result<()> {
        for share in shares {
            let fs = Arc::new(Mutex::new(crate::fs_share::open(share, virtiofsd)?));
            self.add_virtio(fs)?;
        }
        Ok(())
    }

    /// One virtio-net device per `--net`, in order (eth0, eth1, ...);
    /// returns them, for changes while the VM runs (`None` for a
    /// vhost-net device, which has nothing to change).
    pub(crate) fn add_nets(&mut self, nets: &[NetConfig]) -> Result<Vec<Option<Arc<Mutex<Net>>>>> {
        let macs: Vec<_> = nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.mac.unwrap_or_else(|| default_mac(i)))
            .collect();
        for (i, mac) in macs.iter().enumerate() {
            if let Some(j) = macs[..i].iter().position(|m| m == mac) {
                return Err(Error::DuplicateMac(j, i, *mac));
            }
        }
        self.macs = macs.clone();
        let mut out = Vec::new();
        for (index, (nic, mac)) in nets.iter().zip(macs).enumerate() {
            if nic.vhost {
                let device = open_vhost_net(index, nic, mac, self.mem)?;
                self.add_virtio(Arc::new(Mutex::new(device)))?;
                out.push(None);
                continue;
            }
            let device = Arc::new(Mutex::new(open_net(index, nic, mac)?));
            self.add_virtio(device.clone())?;
            out.push(Some(device));
        }
        Ok(out)
    }

    /// The virtio-rng device, if the VM has one (its state is the
    /// transport's: queues and features; the rate limiter starts full).
    pub(crate) fn add_entropy(
        &mut self,
        limits: Option<devices::rate_limiter::Limits>,
    ) -> Result<()> {
        if let Some(limits) = limits {
            let rng = devices::rate_limiter::RateLimiter::new(limits.bandwidth, limits.ops)
                .and_then(devices::virtio::rng::Rng::with_limiter)
                .map_err(Error::Entropy)?;
            self.add_virtio(Arc::new(Mutex::new(rng)))?;
        }
        Ok(())
    }

    /// The virtio-balloon device, if the VM has one (returned for
    /// `PATCH /balloon` and its statistics).
    pub(crate) fn add_balloon(
        &mut self,
        config: Option<BalloonConfig>,
        mem_size: u64,
    ) -> Result<Option<Arc<Mutex<Balloon>>>> {
        let Some(config) = config else {
            return Ok(None);
        };
        if u64::from(config.amount_mib) > mem_size >> 20 {
            return Err(Error::BalloonSize {
                amount: config.amount_mib,
                mem: mem_size >> 20,
            });
        }
        let balloon = Arc::new(Mutex::new(Balloon::new(config).map_err(Error::Balloon)?));
        self.add_virtio(balloon.clone())?;
        log::info!(
            "balloon: target {} MiB, deflate_on_oom {}, free page reporting {}, statistics every {} s",
            config.amount_mib,
            config.deflate_on_oom,
            config.free_page_reporting,
            config.stats_interval_s
        );
        Ok(Some(balloon))
    }

    /// The virtio-vsock device: its socket is bound (0600, never
    /// replacing anything but a stale socket) before the device exists.
    pub(crate) fn add_vsock(&mut self, v: &VsockConfig) -> Result<VsockHandle> {
        let (listener, file) =
            crate::unixsock::bind(&v.uds_path).map_err(|why| Error::VsockSocket {
                path: v.uds_path.clone(),
                why,
            })?;
        // The socket file is unlinked when the VM ends, under Landlock.
        if let Some(parent) = v.uds_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::landlock::allow(parent, crate::landlock::Reach::RemoveEntries);
        }
        let device = Vsock::new(v.guest_cid, v.uds_path.clone(), listener).map_err(Error::Vsock)?;
        let device = Arc::new(Mutex::new(device));
        self.add_virtio(device.clone())?;
        log::info!(
            "vsock: guest CID {}, host socket {}",
            v.guest_cid,
            v.uds_path.display()
        );
        Ok(VsockHandle {
            device,
            _socket: file,
        })
    }

    /// The caller's devices and subscribers (`capsule exec`'s console and
    /// stdin pump).
    pub(super) fn add_extras(&mut self, extras: Extras) -> Result<()> {
        for dev in extras.devices {
            self.add_virtio(dev)?;
        }
        for sub in extras.subscribers {
            self.event_manager.add_subscriber(sub);
        }
        Ok(())
    }
}

/// Opens disk `index` as a virtio-blk device. The serial the guest reads
/// (GET_ID) is the image's file name, cut to the 20 bytes virtio allows.
fn open_disk(index: usize, disk: &DiskConfig) -> Result<Block> {
    let mut serial: String = disk
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("disk{index}"));
    while serial.len() > ID_BYTES {
        serial.pop();
    }
    let mut block = Block::new(BlockConfig {
        path: disk.path.clone(),
        read_only: disk.mode == DiskMode::ReadOnly,
        ephemeral: disk.mode == DiskMode::Ephemeral,
        serial,
        cache: match disk.cache {
            DiskCache::Writeback => CacheMode::Writeback,
            DiskCache::Unsafe => CacheMode::Unsafe,
        },
        engine: match disk.engine {
            crate::config::DiskEngine::Sync => devices::virtio::block::IoEngine::Sync,
            crate::config::DiskEngine::IoUring => devices::virtio::block::IoEngine::IoUring,
        },
    })
    .map_err(Error::Disk)?;
    block.set_rate_limiter(rate_limiter(&disk.limits).map_err(Error::RateLimiter)?);
    Ok(block)
}

/// The limiter for `limits` (one that limits nothing yet, if they are
/// empty: a `PATCH` may set limits while the VM runs).
fn rate_limiter(
    limits: &crate::config::Limits,
) -> std::io::Result<Option<devices::rate_limiter::RateLimiter>> {
    devices::rate_limiter::RateLimiter::new(limits.bandwidth, limits.ops).map(Some)
}

/// Creates network device `index` with its backend: opens the TAP device
/// or starts passt.
fn open_net(index: usize, nic: &NetConfig, mac: net::MacAddr) -> Result<Net> {
    let mut backend: Box<dyn NetBackend> = match &nic.backend {
        NetBackendConfig::Tap { name } => Box::new(Tap::open(name)?),
        NetBackendConfig::User { publish } => Box::new(Passt::spawn(&PasstConfig {
            binary: net::passt::default_passt_binary(),
            publish: publish.clone(),
            debug: log::log_enabled!(log::Level::Debug),
        })?),
    };
    if let Some(store) = &nic.mmds {
        backend = Box::new(net::MmdsBackend::new(backend, store.0.clone()));
    }
    log::info!(
        "network device {index}: {} with MAC {}",
        backend.describe(),
        net::format_mac(&mac)
    );
    let mut net = Net::new(backend, mac).map_err(|e| Error::Net(index, e))?;
    net.set_tx_batching(nic.tx_batch)
        .map_err(|e| Error::Net(index, e))?;
    let rx = rate_limiter(&nic.rx_limits).map_err(|e| Error::Net(index, e))?;
    let tx = rate_limiter(&nic.tx_limits).map_err(|e| Error::Net(index, e))?;
    net.set_rate_limiters(rx, tx);
    Ok(net)
}

/// Creates network device `index` with its data path in the kernel
/// (`vhost=on`): opens the TAP device, then `/dev/vhost-net`.
fn open_vhost_net(
    index: usize,
    nic: &NetConfig,
    mac: net::MacAddr,
    mem: &GuestMemoryMmap,
) -> Result<VhostNet> {
    let NetBackendConfig::Tap { name } = &nic.backend else {
        return Err(Error::VhostNetConflict(index, "--net user"));
    };
    if nic.mmds.is_some() {
        return Err(Error::VhostNetConflict(index, "the metadata service"));
    }
    if nic.rx_limits != Default::default() || nic.tx_limits != Default::default() {
        return Err(Error::VhostNetConflict(index, "rate limits"));
    }
    let tap = Tap::open(name)?;
    let ops =
        KernelVhostNet::open(tap, Arc::new(mem.clone())).map_err(|e| Error::VhostNet(index, e))?;
    let device = VhostNet::new(Box::new(ops), mac).map_err(|e| Error::VhostNet(index, e))?;
    log::info!(
        "network device {index}: TAP {name} with MAC {}, data path in the kernel (vhost-net)",
        net::format_mac(&mac)
    );
    Ok(device)
}
