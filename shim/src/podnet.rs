//! A container's network namespace inside its microVM, as Kata's default
//! "tcfilter" model does it: when the OCI spec names a network namespace
//! (`linux.namespaces` entry `network` with a `path`: what CRI and CNI
//! give, or `ctr run --with-ns network:/var/run/netns/NAME`), the shim
//!
//! 1. finds the namespace's one interface with an IPv4 address besides
//!    loopback (a CNI veth's pod end) and reads its MAC, address, prefix,
//!    default gateway and MTU, from a thread that entered the namespace;
//! 2. creates a persistent TAP device [`TAP_NAME`] there, with that MTU,
//!    and joins it to the veth both ways with `tc` ingress filters that
//!    redirect every frame to the other device's egress (`matchall`,
//!    `mirred`);
//! 3. runs `capsule exec` in the namespace with `--net tap=capsule0,
//!    mac=VETH'S MAC,ip=ADDR/PREFIX,gw=GATEWAY,mtu=MTU`: the guest's eth0
//!    is the pod's interface, which the guest init configures.
//!
//! `delete` removes the TAP and the veth's filters again. The `tc`
//! binary (iproute2) does the filters: every node CNI runs on has it, and
//! writing tc's netlink messages by hand would be a few hundred lines of
//! unsafe-free but untested-elsewhere code in the shim.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

mod sys;

/// The TAP device the shim creates in the pod's network namespace.
pub const TAP_NAME: &str = "capsule0";

/// Why a container's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The namespace file cannot be opened.
    #[error("network namespace {path}: {source}")]
    Open {
        /// The namespace's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// setns(2) failed.
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        /// The namespace's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Several interfaces and none has the default route.
    #[error("network namespace {0}: several interfaces ({1}) and none with the default route")]
    Ambiguous(PathBuf, String),
    /// An interface query failed.
    #[error("interface {name}: {what}: {source}")]
    Query {
        /// The interface.
        name: String,
        /// What was asked.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// `tc` failed or could not run.
    #[error("tc {args}: {msg} (the pod network needs iproute2's tc in the shim's PATH)")]
    Tc {
        /// Its arguments.
        args: String,
        /// Its error output or why it did not run.
        msg: String,
    },
}

/// The pod end of the namespace's network, as the guest takes it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Its name in the namespace (`eth0`).
    pub name: String,
    /// Its MAC address: the guest's.
    pub mac: [u8; 6],
    /// Its IPv4 address and prefix length.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// The namespace's default gateway through it, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Its MTU.
    pub mtu: u32,
}

impl Iface {
    /// `capsule exec --net`'s value for the TAP that stands for it.
    pub fn net_arg(&self) -> String {
        let m = self.mac;
        let mut s = format!(
            "tap={TAP_NAME},mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x},ip={}/{}",
            m[0], m[1], m[2], m[3], m[4], m[5], self.address, self.prefix
        );
        if let Some(g) = self.gateway {
            s.push_str(&format!(",gw={g}"));
        }
        // capsule takes 68 to 65535; the kernel's veth MTU is in range.
        if (68..=65535).contains(&self.mtu) {
            s.push_str(&format!(",mtu={}", self.mtu));
        }
        s
    }
}

/// The network namespace the container should get, if any: the spec's
/// `network` namespace with a path, unless the container is a CRI pod's
/// sandbox (its pause container), whose namespace the pod's first
/// application container takes over instead (one VM per container: the
/// pause container's VM has nothing to serve).
pub fn netns_path(spec: &Spec) -> Option<PathBuf> {
    let sandbox = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get("io.kubernetes.cri.container-type"))
        .is_some_and(|t| t == "sandbox");
    if sandbox {
        return None;
    }
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// Runs `f` on a thread that has entered the network namespace `ns`:
/// sockets it opens, devices it creates and processes it starts are the
/// namespace's. The shim's other threads stay where they are.
pub fn in_netns<T: Send>(
    ns: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace descriptor; it changes
            // this thread's network namespace only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetError::Enter {
                    path: path.to_owned(),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The default route's gateway through `iface` from `/proc/net/route`
/// text (little-endian hex, as the kernel writes it on x86).
pub fn default_gateway(route: &str, iface: &str) -> Option<Ipv4Addr> {
    route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != iface || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        Some(Ipv4Addr::from(gw.swap_bytes())).filter(|g| !g.is_unspecified())
    })
}

/// The interface of the route text's default route, if any.
fn default_route_iface(route: &str) -> Option<String> {
    route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// Chooses the pod's interface among (name, address, prefix) candidates:
/// the only one, else the one with the default route.
pub fn choose<'a>(
    candidates: &'a [(String, Ipv4Addr, u8)],
    default_iface: Option<&str>,
) -> Result<Option<&'a (String, Ipv4Addr, u8)>, String> {
    match candidates {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => many
            .iter()
            .find(|c| Some(c.0.as_str()) == default_iface)
            .map(Some)
            .ok_or_else(|| {
                let names: Vec<&str> = many.iter().map(|c| c.0.as_str()).collect();
                names.join(", ")
            }),
    }
}

/// A container's pod network: its namespace and the devices the shim set
/// up there.
#[derive(Debug)]
pub struct PodNet {
    ns: File,
    path: PathBuf,
    /// The pod's interface, as the guest takes it over.
    pub iface: Iface,
}

impl PodNet {
    /// Sets up the TAP and the redirects in the namespace at `path`.
    /// `Ok(None)`: the namespace has no interface with an IPv4 address
    /// (the container runs without a network device), or its TAP is
    /// already another container's.
    pub fn setup(path: &Path) -> Result<Option<Self>, NetError> {
        let ns = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| NetError::Open {
                path: path.to_owned(),
                source,
            })?;
        let iface = in_netns(&ns, path, || -> Result<Option<Iface>, NetError> {
            if sys::exists(TAP_NAME) {
                log::warn!(
                    "network namespace {}: {TAP_NAME} exists (another container's): no network device",
                    path.display()
                );
                return Ok(None);
            }
            let Some(iface) = sys::pod_iface(path)? else {
                log::warn!(
                    "network namespace {}: no interface with an IPv4 address: no network device",
                    path.display()
                );
                return Ok(None);
            };
            sys::create_tap(TAP_NAME, iface.mtu)?;
            let joined = tc_redirect(&iface.name, TAP_NAME)
                .and_then(|()| tc_redirect(TAP_NAME, &iface.name));
            if let Err(e) = joined {
                let _ = tc(&["qdisc", "del", "dev", &iface.name, "ingress"]);
                let _ = sys::remove_tap(TAP_NAME);
                return Err(e);
            }
            Ok(Some(iface))
        })??;
        let Some(iface) = iface else {
            return Ok(None);
        };
        log::info!(
            "network namespace {}: {} ({}/{}) joined to {TAP_NAME}",
            path.display(),
            iface.name,
            iface.address,
            iface.prefix
        );
        Ok(Some(Self {
            ns,
            path: path.to_owned(),
            iface,
        }))
    }

    /// Runs `f` (which starts `capsule exec`) in the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        in_netns(&self.ns, &self.path, f)
    }

    /// Removes the TAP and the veth's filters (once capsule is gone: a
    /// TAP still attached cannot be opened to be removed).
    pub fn teardown(&self) {
        let name = self.iface.name.clone();
        let done = in_netns(&self.ns, &self.path, move || {
            if let Err(e) = tc(&["qdisc", "del", "dev", &name, "ingress"]) {
                log::warn!("{e}");
            }
            // remove_tap logs its own failure.
            let _ = sys::remove_tap(TAP_NAME);
        });
        if let Err(e) = done {
            log::warn!("{e}");
        }
    }
}

/// Runs `tc ARGS` (in the calling thread's namespace).
fn tc(args: &[&str]) -> Result<(), NetError> {
    let err = |msg: String| NetError::Tc {
        args: args.join(" "),
        msg,
    };
    let out = Command::new("tc")
        .args(args)
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        return Err(err(text.trim().replace('\n', "; ")));
    }
    Ok(())
}

/// Every frame received on `from` leaves through `to`.
fn tc_redirect(from: &str, to: &str) -> Result<(), NetError> {
    tc(&["qdisc", "add", "dev", from, "ingress"])?;
    tc(&[
        "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "matchall", "action",
        "mirred", "egress", "redirect", "dev", to,
    ])
}

/// `args` (a `capsule exec` command line) with `--net NET` before the
/// command's `--`.
pub fn with_net_arg(mut args: Vec<OsString>, net: &str) -> Vec<OsString> {
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.splice(at..at, ["--net".into(), net.into()]);
    args
}

#[cfg(test)]
mod tests;
