//! [`VhostNetOps`] over the kernel's `/dev/vhost-net` (rust-vmm's vhost
//! crate) and a [`Tap`].

use std::io;
use std::sync::Arc;

use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net as KernelNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

use super::backend::NetBackend;
use super::tap::Tap;
use super::vhost_net::{VhostNetError, VhostNetOps, VringSetup};
use crate::GuestMemoryMmap;

/// vhost-net in the kernel, serving one TAP.
pub struct KernelVhostNet {
    net: KernelNet<Arc<GuestMemoryMmap>>,
    tap: Tap,
    features: u64,
}

impl KernelVhostNet {
    /// Opens `/dev/vhost-net`, makes this process its owner (the kernel
    /// starts the worker thread that will move the frames) and reads its
    /// features. `mem` is the guest memory that ring addresses are
    /// translated through.
    pub fn open(tap: Tap, mem: Arc<GuestMemoryMmap>) -> Result<Self, VhostNetError> {
        let net = KernelNet::new(mem).map_err(open_error)?;
        let setup = |step| move |source| VhostNetError::Setup { step, source };
        net.set_owner().map_err(setup("SET_OWNER"))?;
        let features = net.get_features().map_err(setup("GET_FEATURES"))?;
        log::debug!("vhost-net for {}: features {features:#x}", tap.name());
        Ok(Self { net, tap, features })
    }
}

/// Why `/dev/vhost-net` could not be opened, in the user's terms.
fn open_error(e: vhost::Error) -> VhostNetError {
    match e {
        vhost::Error::VhostOpen(e) => match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => VhostNetError::Missing,
            Some(libc::EACCES) | Some(libc::EPERM) => VhostNetError::Permission,
            _ => VhostNetError::Open(e),
        },
        other => VhostNetError::Open(io::Error::other(other)),
    }
}

impl VhostNetOps for KernelVhostNet {
    fn describe(&self) -> String {
        format!("TAP {} (vhost-net)", self.tap.name())
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn offload_features(&self) -> u64 {
        self.tap.offload_features()
    }

    fn set_features(&mut self, features: u64) -> Result<(), vhost::Error> {
        self.net.set_features(features)
    }

    fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        self.net.set_mem_table(regions).map(|_| ())
    }

    fn start_vring(&mut self, index: usize, ring: &VringSetup<'_>) -> Result<(), vhost::Error> {
        self.net.set_vring_num(index, ring.config.queue_size)?;
        self.net.set_vring_addr(index, &ring.config)?;
        self.net.set_vring_base(index, ring.base)?;
        self.net.set_vring_kick(index, ring.kick)?;
        self.net.set_vring_call(index, ring.call)?;
        self.net.set_vring_err(index, ring.err)
    }

    fn set_backend(&mut self, index: usize, attach: bool) -> Result<(), vhost::Error> {
        self.net
            .set_backend(index, attach.then(|| self.tap.as_file()))
    }

    fn stop_vring(&mut self, index: usize) -> Result<u32, vhost::Error> {
        self.net.get_vring_base(index)
    }

    fn set_offloads(&mut self, acked: u64) -> io::Result<()> {
        self.tap.set_offloads(acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(errno: i32) -> VhostNetError {
        open_error(vhost::Error::VhostOpen(io::Error::from_raw_os_error(errno)))
    }

    #[test]
    fn open_failures_say_what_to_do_in_one_line() {
        assert!(matches!(opened(libc::ENOENT), VhostNetError::Missing));
        assert!(matches!(opened(libc::ENXIO), VhostNetError::Missing));
        assert!(matches!(opened(libc::EACCES), VhostNetError::Permission));
        assert!(matches!(opened(libc::EMFILE), VhostNetError::Open(_)));
        for e in [
            opened(libc::ENOENT),
            opened(libc::EACCES),
            opened(libc::EMFILE),
        ] {
            let msg = e.to_string();
            assert!(msg.starts_with("vhost=on: "), "{msg}");
            assert!(msg.contains("/dev/vhost-net"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        assert!(opened(libc::ENOENT)
            .to_string()
            .contains("modprobe vhost_net"));
    }
}
