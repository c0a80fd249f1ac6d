//! A TAP device as a virtio-net backend.
//!
//! The TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a
//! 12-byte vnet header (`TUNSETVNETHDRSZ`), so frames and their
//! `virtio_net_hdr_v1` pass between the guest and the host kernel
//! unchanged. The checksum and TSO offloads the guest accepts are applied
//! with `TUNSETOFFLOAD`. The descriptor is non-blocking.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

use super::backend::{NetBackend, SendStatus};
use super::VNET_HDR_LEN;
use crate::virtio::features::bit;

/// `TUNSETIFF` flags: a TAP device, no packet-info prefix, with a virtio-net
/// header. `ifr_flags` is a C short; the flags are all below 0x8000.
#[expect(clippy::cast_possible_truncation, reason = "the flags fit in 16 bits")]
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
/// [`VNET_HDR_LEN`] as the C int `TUNSETVNETHDRSZ` takes.
#[expect(clippy::cast_possible_truncation, reason = "12 fits in a C int")]
const VNET_HDR_LEN_INT: libc::c_int = VNET_HDR_LEN as libc::c_int;

/// The TUN/TAP clone device.
const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Errors from opening a TAP device. Each names the device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has characters Linux rejects.
    #[error("invalid TAP device name '{0}' (1 to 15 characters, no '/', ':' or whitespace)")]
    InvalidName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_PATH} for TAP device {name}: {source}")]
    OpenTun {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The device does not exist and capsule may not create it.
    #[error("TAP device {0} does not exist and creating it needs CAP_NET_ADMIN (create it first: ip tuntap add {0} mode tap user $USER)")]
    CannotCreate(String),
    /// The device exists but capsule may not attach to it.
    #[error("no permission to attach to TAP device {0} (is it owned by another user? ip tuntap add {0} mode tap user $USER)")]
    NoPermission(String),
    /// The device is attached to another process.
    #[error("TAP device {0} is busy (attached to another process?)")]
    Busy(String),
    /// The name belongs to an interface that is not a TAP device with a
    /// vnet header (or is one set up with other flags).
    #[error("cannot attach to TAP device {name}: {source} (is it a TAP device, not a TUN device or another interface?)")]
    Attach {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Configuring the vnet header or offloads failed.
    #[error("cannot configure TAP device {name}: {what}: {source}")]
    Configure {
        /// The device.
        name: String,
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A TAP device opened for a virtio-net device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks a Linux interface name.
pub fn valid_if_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Opens (and, with CAP_NET_ADMIN, creates) the TAP device `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_if_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let existed = Path::new("/sys/class/net").join(name).exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;

        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives
        // for the whole call; the fd is an open /dev/net/tun.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) if !existed => TapError::CannotCreate(name),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::NoPermission(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                _ => TapError::Attach { name, source: e },
            });
        }
        if existed {
            log::info!("attached to TAP device {name}");
        } else {
            log::info!("created TAP device {name} (it goes away when capsule exits)");
        }

        let configure = |what, ret: libc::c_int| {
            if ret < 0 {
                Err(TapError::Configure {
                    name: name.to_string(),
                    what,
                    source: io::Error::last_os_error(),
                })
            } else {
                Ok(())
            }
        };
        let hdr_len: libc::c_int = VNET_HDR_LEN_INT;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // is valid for the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        configure("vnet header size", ret)?;
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        configure("offloads", ret)?;
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The open TAP queue (for vhost-net, which reads and writes it).
    pub fn as_file(&self) -> &File {
        &self.file
    }
}

/// The TUN offload flags for the offload features the guest accepted:
/// what the TAP may hand us is what the guest can receive.
pub fn tun_offloads(acked: u64) -> libc::c_uint {
    let mut flags = 0;
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl NetBackend for Tap {
    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn describe(&self) -> String {
        format!("TAP {}", self.name)
    }

    fn offload_features(&self) -> u64 {
        bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
    }

    fn set_offloads(&mut self, acked: u64) -> io::Result<()> {
        let flags = tun_offloads(acked);
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        crate::debug_ratelimited!("TAP {}: offloads {flags:#x}", self.name);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<SendStatus> {
        match self.file.write(frame) {
            Ok(_) => Ok(SendStatus::Sent),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(SendStatus::Full),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_if_name("tap0"));
        assert!(valid_if_name("a-very-long-nam"));
        assert!(!valid_if_name("a-very-long-name"));
        assert!(!valid_if_name(""));
        assert!(!valid_if_name("a/b"));
        assert!(!valid_if_name("a b"));
        assert!(!valid_if_name("a:1"));
        assert!(!valid_if_name(".."));
    }

    #[test]
    fn offload_flags_follow_guest_features() {
        assert_eq!(tun_offloads(0), 0);
        // TSO without checksum offload is meaningless and not applied.
        assert_eq!(tun_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let all = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(
            tun_offloads(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }

    #[test]
    fn invalid_name_is_rejected_before_opening() {
        assert!(matches!(
            Tap::open("no/slash"),
            Err(TapError::InvalidName(_))
        ));
    }
}
