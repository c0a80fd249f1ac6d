//! The system calls of [`super`]: interface queries and the TAP device,
//! in the calling thread's network namespace (every socket is opened by
//! the thread that asks, so it is the namespace's).

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{choose, default_gateway, default_route_iface, Iface, NetError};

/// `ifreq` for interface `name` (shorter than IFNAMSIZ, checked by the
/// callers' sources: kernel names and [`super::TAP_NAME`]).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .take(libc::IFNAMSIZ - 1)
        .zip(name.bytes())
    {
        *d = s as libc::c_char;
    }
    req
}

/// An `AF_INET` datagram socket for the interface ioctls.
fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, request, req)` on an ifreq.
fn ioctl(fd: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request used here reads or writes one ifreq, which
    // lives for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request as _, req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether interface `name` exists.
pub fn exists(name: &str) -> bool {
    let Ok(s) = socket() else { return false };
    let mut req = ifreq(name);
    ioctl(&s, libc::SIOCGIFINDEX, &mut req).is_ok()
}

/// (name, address, prefix) of each interface's first IPv4 address,
/// loopback ones left out.
fn ipv4_interfaces() -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found: Vec<(String, Ipv4Addr, u8)> = Vec::new();
    let mut p = list;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned, valid until
        // freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        let loopback = ifa.ifa_flags & (libc::IFF_LOOPBACK as libc::c_uint) != 0;
        if loopback || ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: a non-null address's family field is readable.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: for AF_INET, address and mask are sockaddr_in and the
        // name is NUL-terminated, as getifaddrs documents.
        let (name, addr, mask) = unsafe {
            (
                CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned(),
                &*(ifa.ifa_addr as *const libc::sockaddr_in),
                &*(ifa.ifa_netmask as *const libc::sockaddr_in),
            )
        };
        if found.iter().any(|f| f.0 == name) {
            continue;
        }
        let prefix = u8::try_from(u32::from_be(mask.sin_addr.s_addr).leading_ones()).unwrap_or(32);
        found.push((
            name,
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            prefix,
        ));
    }
    // SAFETY: the list getifaddrs returned, not used afterwards.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The namespace's pod interface (see [`super`]), `None` without one.
pub fn pod_iface(ns: &Path) -> Result<Option<Iface>, NetError> {
    let query = |name: &str, what, source| NetError::Query {
        name: name.to_string(),
        what,
        source,
    };
    let candidates = ipv4_interfaces().map_err(|e| query("*", "getifaddrs", e))?;
    // This thread's namespace (/proc/self/net is the thread group
    // leader's).
    let route = std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default();
    let chosen = choose(&candidates, default_route_iface(&route).as_deref())
        .map_err(|names| NetError::Ambiguous(ns.to_owned(), names))?;
    let Some((name, address, prefix)) = chosen.cloned() else {
        return Ok(None);
    };
    let s = socket().map_err(|e| query(&name, "socket", e))?;
    let mut req = ifreq(&name);
    ioctl(&s, libc::SIOCGIFHWADDR, &mut req).map_err(|e| query(&name, "MAC address", e))?;
    let mut mac = [0u8; 6];
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    for (m, b) in mac.iter_mut().zip(hw) {
        *m = b as u8;
    }
    let mut req = ifreq(&name);
    ioctl(&s, libc::SIOCGIFMTU, &mut req).map_err(|e| query(&name, "MTU", e))?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).unwrap_or(0);
    let gateway = default_gateway(&route, &name);
    Ok(Some(Iface {
        name,
        mac,
        address,
        prefix,
        gateway,
        mtu,
    }))
}

/// `TUNSETIFF` flags, as capsule's TAP backend opens its device (a
/// persistent TAP must be reopened with the same kind).
#[expect(clippy::cast_possible_truncation, reason = "the flags fit in 16 bits")]
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

/// Opens TAP `name`, creating it if there is none: the returned
/// descriptor is attached to it until dropped.
pub(super) fn attach_tap(name: &str) -> io::Result<std::fs::File> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_flags = TAP_FLAGS;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which lives for the
    // call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// Opens TAP `name` (creating it) and sets it persistent or not; a TAP
/// no longer persistent goes away when its last descriptor closes.
fn tap_persist(name: &str, persist: bool) -> io::Result<()> {
    let tun = attach_tap(name)?;
    // SAFETY: TUNSETPERSIST takes its argument by value.
    if unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the persistent TAP `name` with `mtu`, up.
pub fn create_tap(name: &str, mtu: u32) -> Result<(), NetError> {
    let query = |what, source| NetError::Query {
        name: name.to_string(),
        what,
        source,
    };
    tap_persist(name, true).map_err(|e| query("create the TAP device", e))?;
    let configured = (|| {
        let s = socket()?;
        let mut req = ifreq(name);
        if let Ok(m) = libc::c_int::try_from(mtu) {
            req.ifr_ifru.ifru_mtu = m;
            ioctl(&s, libc::SIOCSIFMTU, &mut req)?;
        }
        let mut req = ifreq(name);
        ioctl(&s, libc::SIOCGIFFLAGS, &mut req)?;
        #[expect(clippy::cast_possible_truncation, reason = "IFF_UP is 1")]
        let up = libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= up };
        ioctl(&s, libc::SIOCSIFFLAGS, &mut req)
    })();
    if let Err(e) = configured {
        let _ = remove_tap(name);
        return Err(query("MTU and up", e));
    }
    Ok(())
}

/// How long [`remove_tap`] waits for another holder of the TAP to let go.
const REMOVE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Removes the persistent TAP `name`.
///
/// Removing means attaching to it and clearing its persistence, and a
/// (single-queue) TAP takes one descriptor at a time: while another holds
/// it, `TUNSETIFF` fails with `EBUSY`. Any process that spawns children
/// from several threads (the shim, the test harness) hands a copy of
/// every descriptor open at that moment to a child until the child's
/// `exec` closes it, so a TAP just created or just given up by capsule
/// can be busy for a moment: wait for it, up to [`REMOVE_PATIENCE`].
pub fn remove_tap(name: &str) -> io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        match tap_persist(name, false) {
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < REMOVE_PATIENCE =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => {
                log::warn!("cannot remove TAP device {name}: {e}");
                return Err(e);
            }
            Ok(()) => return Ok(()),
        }
    }
}
