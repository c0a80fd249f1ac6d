//! What the host puts in the initramfs for the init: the command
//! description ([`ExecSpec`] at [`CONFIG_PATH`], with its interfaces as
//! [`NetSpec`]s), and where the init finds the rest (modules, shares, its
//! own binary) and the virtio-fs tags it mounts.

use std::fmt;

/// Why an [`ExecSpec`] cannot be written or read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// A field holds a NUL byte (the record separator): the record's key.
    Nul(&'static str),
    /// A module name holds '/'.
    ModulePath,
    /// A record without '='.
    NoEquals,
    /// A share record without a mode or a directory: which is missing.
    Share(&'static str),
    /// A file record without a mode or a path: which is missing.
    File(&'static str),
    /// A tmpfs record without its directory, or options holding ':'.
    Tmpfs,
    /// A net record that is not UTF-8.
    NetNotUtf8,
    /// A net record that does not parse: its text.
    Net(String),
    /// A record of an unknown key (or a module name with '/').
    UnknownRecord,
    /// No `arg` record.
    NoCommand,
    /// A `tty` or `user` record that does not parse: its key.
    Numbers(&'static str),
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nul(key) => write!(f, "{key} contains a NUL byte"),
            Self::ModulePath => f.write_str("a module name contains '/'"),
            Self::NoEquals => f.write_str("record without '='"),
            Self::Share(what) => write!(f, "share without {what}"),
            Self::File(what) => write!(f, "file record without {what}"),
            Self::Tmpfs => f.write_str("bad tmpfs record (OPTIONS:DIR, no ':' in OPTIONS)"),
            Self::NetNotUtf8 => f.write_str("net record is not UTF-8"),
            Self::Net(text) => write!(f, "bad net record {text:?}"),
            Self::UnknownRecord => f.write_str("unknown record"),
            Self::NoCommand => f.write_str("no command"),
            Self::Numbers(key) => write!(f, "bad {key} record"),
        }
    }
}

impl std::error::Error for SpecError {}

/// The command description the host puts in the initramfs at
/// [`CONFIG_PATH`]: NUL-terminated `key=value` records, so any byte but NUL
/// may appear in arguments and values.
///
/// Keys: `arg` (repeated, in order), `env` (`K=V`, repeated), `cwd`,
/// `disk` (`1`: mount `/dev/vda` as root), `share` (`INDEX:MODE:GUESTDIR`,
/// MODE `ro` or `rw`, repeated), `live` (`1`: share `i` is the virtio-fs
/// tag [`share_tag`]`(i)`, mounted in place, nothing copied; file `i` is
/// on the virtio-fs tag [`FILES_TAG`], or [`FILES_RW_TAG`] if writable,
/// instead of in the initramfs), `file` (`INDEX:MODE:GUESTPATH`, MODE `ro` or `rw`,
/// repeated: the host file [`FILES_DIR`]`/INDEX` bind-mounted on
/// GUESTPATH), `tmpfs` (`OPTIONS:GUESTDIR`, OPTIONS comma-separated
/// without ':', repeated: a tmpfs mounted there), `hostroot`
/// (`1`: the root is the virtio-fs tag [`HOST_ROOT_TAG`], read-only, under
/// a tmpfs overlay), `fsroot` (`1`: the root is the virtio-fs tag
/// [`FS_ROOT_TAG`], read-write, nothing copied: `capsule exec --fs-root`),
/// `module` (a file in [`MODULE_DIR`], repeated, in load order), `await`
/// (`1`: no command here; the init of an exec template boots, says
/// hello and waits for [`crate::HostMsg::Spec`]), `tty` (`ROWS COLS`:
/// the command runs on a pseudo-terminal of that size, its stdin, stdout
/// and stderr, output as `Stdout`), `user` (`UID GID [GID...]`: the
/// command runs as that user, group and supplementary groups), `watch`
/// (`1`, exec connections only: no command; the connection carries the
/// guest's events, [`crate::GuestMsg::Oom`], until it closes).
pub const CONFIG_PATH: &str = "/.capsule/config";
/// Where the init finds the kernel modules it loads first.
pub const MODULE_DIR: &str = "/.capsule/modules";
/// The virtio-fs tag of the host's `/` with `--host-root`.
pub const HOST_ROOT_TAG: &str = "capsule-root";
/// The virtio-fs tag of the command's root with `--fs-root DIR`.
pub const FS_ROOT_TAG: &str = "capsule-fsroot";

/// A static IPv4 configuration of one guest interface (`net` record:
/// `IFACE ADDR/PREFIX GATEWAY [mtu=N] [DNS...]`, space-separated; a
/// gateway of `0.0.0.0` is none: no default route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The interface (`eth0`, ...).
    pub interface: String,
    /// Its address.
    pub address: std::net::Ipv4Addr,
    /// Its prefix length (0 to 32).
    pub prefix: u8,
    /// The default gateway.
    pub gateway: std::net::Ipv4Addr,
    /// Name servers.
    pub dns: Vec<std::net::Ipv4Addr>,
    /// The interface's MTU (`None`: the driver's default).
    pub mtu: Option<u16>,
}

impl NetSpec {
    fn to_record(&self) -> String {
        let mut r = format!(
            "{} {}/{} {}",
            self.interface, self.address, self.prefix, self.gateway
        );
        if let Some(m) = self.mtu {
            r.push_str(&format!(" mtu={m}"));
        }
        for d in &self.dns {
            r.push(' ');
            r.push_str(&d.to_string());
        }
        r
    }

    fn parse(val: &[u8]) -> Result<Self, SpecError> {
        let text = std::str::from_utf8(val).map_err(|_| SpecError::NetNotUtf8)?;
        let mut words = text.split(' ');
        let bad = || SpecError::Net(text.to_owned());
        let interface = words.next().filter(|w| !w.is_empty() && w.len() < 16);
        let interface = interface.ok_or_else(bad)?.to_string();
        let (addr, prefix) = words
            .next()
            .and_then(|w| w.split_once('/'))
            .ok_or_else(bad)?;
        let address = addr.parse().map_err(|_| bad())?;
        let prefix = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        let gateway = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let mut mtu = None;
        let mut dns = Vec::new();
        for w in words {
            match w.strip_prefix("mtu=") {
                Some(m) => mtu = Some(m.parse().map_err(|_| bad())?),
                None => dns.push(w.parse().map_err(|_| bad())?),
            }
        }
        Ok(Self {
            interface,
            address,
            prefix,
            gateway,
            dns,
            mtu,
        })
    }
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Who the command runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
}

/// Space-separated decimal numbers, at least `min` of them.
fn numbers<T: std::str::FromStr>(
    val: &[u8],
    min: usize,
    key: &'static str,
) -> Result<Vec<T>, SpecError> {
    let text = std::str::from_utf8(val).map_err(|_| SpecError::Numbers(key))?;
    let nums = text
        .split(' ')
        .map(|w| w.parse().map_err(|_| SpecError::Numbers(key)))
        .collect::<Result<Vec<T>, _>>()?;
    if nums.len() < min {
        return Err(SpecError::Numbers(key));
    }
    Ok(nums)
}

/// The value of a `share` or `file` record: `INDEX:MODE:PATH`.
fn indexed_record(index: usize, writable: bool, path: &[u8]) -> Vec<u8> {
    let mut v = format!("{index}:{}:", if writable { "rw" } else { "ro" }).into_bytes();
    v.extend_from_slice(path);
    v
}

/// A `share` or `file` record's (PATH, whether MODE is `rw`); `Err`
/// names the missing part: "mode", or `path` (what the record calls it).
fn parse_indexed<'a>(val: &[u8], path: &'a str) -> Result<(Vec<u8>, bool), &'a str> {
    let mut parts = val.splitn(3, |&b| b == b':');
    let _index = parts.next();
    let mode = parts.next().ok_or("mode")?;
    let p = parts.next().ok_or(path)?;
    Ok((p.to_vec(), mode == b"rw"))
}

/// The virtio-fs tag of live share `index`.
pub fn share_tag(index: usize) -> String {
    format!("capsule-share-{index}")
}
/// Where the init finds file share `i` (`capsule exec --share
/// HOSTFILE:GUESTFILE`): `FILES_DIR/i`, bind-mounted on its guest path;
/// when shares are live, a writable one is `FILES_RW_DIR/i` instead.
pub const FILES_DIR: &str = "/.capsule/files";
/// The virtio-fs tag of the read-only file shares' directory (mounted at
/// [`FILES_DIR`]) when shares are live.
pub const FILES_TAG: &str = "capsule-files";
/// Where the writable file shares are when shares are live.
pub const FILES_RW_DIR: &str = "/.capsule/files-rw";
/// The virtio-fs tag of the writable file shares' directory (mounted at
/// [`FILES_RW_DIR`]): a separate device, so that a guest that mounts it
/// itself still cannot write a file it was given read-only.
pub const FILES_RW_TAG: &str = "capsule-files-rw";
/// Where the init finds share `i`'s files: `SHARE_DIR/i`.
pub const SHARE_DIR: &str = "/.capsule/share";
/// Where the init binary is in the initramfs (the kernel's `rdinit=`).
pub const INIT_PATH: &str = "/.capsule/init";

/// What the command is and where it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<Vec<u8>>,
    /// Environment, `K=V`.
    pub env: Vec<Vec<u8>>,
    /// Working directory.
    pub cwd: Vec<u8>,
    /// Mount `/dev/vda` as the root first.
    pub disk: bool,
    /// Shares: (guest directory, writable).
    pub shares: Vec<(Vec<u8>, bool)>,
    /// Single host files: (guest path, writable), file `i` at
    /// [`FILES_DIR`]`/i`, bound over its guest path inside the root.
    pub files: Vec<(Vec<u8>, bool)>,
    /// tmpfs mounts: (guest directory, comma-separated options such as
    /// `size=64m,mode=1777,nosuid`).
    pub tmpfs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The shares are virtio-fs mounts, not copies.
    pub live: bool,
    /// The root is the host's `/` over virtio-fs with a tmpfs overlay.
    pub host_root: bool,
    /// The root is a host directory over virtio-fs ([`FS_ROOT_TAG`]),
    /// read-write.
    pub fs_root: bool,
    /// Kernel modules to load first, in order (file names in [`MODULE_DIR`]).
    pub modules: Vec<Vec<u8>>,
    /// Interfaces to configure before the command runs.
    pub nets: Vec<NetSpec>,
    /// The command is not here: the init (of an exec template) waits for
    /// it over the channel, as a [`crate::HostMsg::Spec`], reconnecting if
    /// the channel resets (a clone's restored vsock device resets it).
    pub await_command: bool,
    /// Run the command on a pseudo-terminal of this (initial) size.
    pub tty: Option<WinSize>,
    /// Run the command as this user (root when `None`).
    pub user: Option<User>,
    /// No command: an exec connection that carries the guest's events.
    pub watch: bool,
}

impl ExecSpec {
    /// Serializes the spec. Fails if a field contains a NUL byte.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SpecError> {
        let mut out = Vec::new();
        let mut rec = |key: &'static str, val: &[u8]| -> Result<(), SpecError> {
            if val.contains(&0) {
                return Err(SpecError::Nul(key));
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(val);
            out.push(0);
            Ok(())
        };
        for a in &self.argv {
            rec("arg", a)?;
        }
        for e in &self.env {
            rec("env", e)?;
        }
        rec("cwd", &self.cwd)?;
        rec("disk", if self.disk { b"1" } else { b"0" })?;
        for (i, (dir, rw)) in self.shares.iter().enumerate() {
            rec("share", &indexed_record(i, *rw, dir))?;
        }
        for (i, (path, rw)) in self.files.iter().enumerate() {
            rec("file", &indexed_record(i, *rw, path))?;
        }
        for (dir, options) in &self.tmpfs {
            if options.contains(&b':') {
                return Err(SpecError::Tmpfs);
            }
            let mut v = options.clone();
            v.push(b':');
            v.extend_from_slice(dir);
            rec("tmpfs", &v)?;
        }
        if self.live {
            rec("live", b"1")?;
        }
        if self.host_root {
            rec("hostroot", b"1")?;
        }
        if self.fs_root {
            rec("fsroot", b"1")?;
        }
        for m in &self.modules {
            if m.contains(&b'/') {
                return Err(SpecError::ModulePath);
            }
            rec("module", m)?;
        }
        for n in &self.nets {
            rec("net", n.to_record().as_bytes())?;
        }
        if self.await_command {
            rec("await", b"1")?;
        }
        if let Some(ws) = self.tty {
            rec("tty", format!("{} {}", ws.rows, ws.cols).as_bytes())?;
        }
        if let Some(u) = &self.user {
            let mut v = format!("{} {}", u.uid, u.gid);
            for g in &u.groups {
                v.push_str(&format!(" {g}"));
            }
            rec("user", v.as_bytes())?;
        }
        if self.watch {
            rec("watch", b"1")?;
        }
        Ok(out)
    }

    /// Parses what [`Self::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SpecError> {
        let mut spec = Self::default();
        for rec in bytes.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let eq = rec
                .iter()
                .position(|&b| b == b'=')
                .ok_or(SpecError::NoEquals)?;
            let (key, val) = (&rec[..eq], &rec[eq + 1..]);
            match key {
                b"arg" => spec.argv.push(val.to_vec()),
                b"env" => spec.env.push(val.to_vec()),
                b"cwd" => spec.cwd = val.to_vec(),
                b"disk" => spec.disk = val == b"1",
                b"share" => spec
                    .shares
                    .push(parse_indexed(val, "directory").map_err(SpecError::Share)?),
                b"file" => spec
                    .files
                    .push(parse_indexed(val, "path").map_err(SpecError::File)?),
                b"tmpfs" => {
                    let colon = val.iter().position(|&b| b == b':');
                    let (options, dir) = val.split_at(colon.ok_or(SpecError::Tmpfs)?);
                    spec.tmpfs.push((dir[1..].to_vec(), options.to_vec()));
                }
                b"net" => spec.nets.push(NetSpec::parse(val)?),
                b"live" => spec.live = val == b"1",
                b"hostroot" => spec.host_root = val == b"1",
                b"fsroot" => spec.fs_root = val == b"1",
                b"await" => spec.await_command = val == b"1",
                b"watch" => spec.watch = val == b"1",
                b"tty" => {
                    let n = numbers::<u16>(val, 2, "tty")?;
                    if n.len() != 2 {
                        return Err(SpecError::Numbers("tty"));
                    }
                    spec.tty = Some(WinSize {
                        rows: n[0],
                        cols: n[1],
                    });
                }
                b"user" => {
                    let n = numbers::<u32>(val, 2, "user")?;
                    spec.user = Some(User {
                        uid: n[0],
                        gid: n[1],
                        groups: n[2..].to_vec(),
                    });
                }
                b"module" if !val.contains(&b'/') && !val.is_empty() => {
                    spec.modules.push(val.to_vec())
                }
                _ => return Err(SpecError::UnknownRecord),
            }
        }
        if spec.argv.is_empty() && !spec.await_command && !spec.watch {
            return Err(SpecError::NoCommand);
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trip() {
        let spec = ExecSpec {
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo a=b; x:y".to_vec()],
            env: vec![b"K=V=W".to_vec()],
            cwd: b"/work dir".to_vec(),
            disk: true,
            shares: vec![(b"/in".to_vec(), false), (b"/out:x".to_vec(), true)],
            files: vec![
                (b"/etc/resolv.conf".to_vec(), false),
                (b"/dev/termination-log".to_vec(), true),
            ],
            tmpfs: vec![
                (b"/run".to_vec(), b"size=64m,mode=755,nosuid".to_vec()),
                (b"/a:b".to_vec(), Vec::new()),
            ],
            live: true,
            host_root: true,
            fs_root: true,
            modules: vec![b"virtio_mmio.ko".to_vec(), b"fuse.ko.xz".to_vec()],
            nets: vec![NetSpec {
                interface: "eth0".into(),
                address: [192, 168, 77, 1].into(),
                prefix: 24,
                gateway: [192, 168, 77, 254].into(),
                dns: vec![[9, 9, 9, 9].into()],
                mtu: Some(1450),
            }],
            await_command: false,
            tty: Some(WinSize {
                rows: 40,
                cols: 132,
            }),
            user: Some(User {
                uid: 1000,
                gid: 100,
                groups: vec![10, 4_000_000_000],
            }),
            watch: false,
        };
        let bytes = spec.to_bytes().unwrap();
        assert_eq!(ExecSpec::from_bytes(&bytes).unwrap(), spec);
        // A template's spec has no command: it awaits one.
        let template = ExecSpec {
            cwd: b"/".to_vec(),
            await_command: true,
            ..Default::default()
        };
        let bytes = template.to_bytes().unwrap();
        assert_eq!(ExecSpec::from_bytes(&bytes).unwrap(), template);
        // An events watch has no command either.
        let watch = ExecSpec {
            watch: true,
            ..Default::default()
        };
        let bytes = watch.to_bytes().unwrap();
        assert_eq!(ExecSpec::from_bytes(&bytes).unwrap(), watch);
        for bad in [
            "tty=24",
            "tty=24 80 1",
            "tty=x 80",
            "tty=70000 80",
            "user=5",
            "user=5 -1",
            "user=1 2 x",
        ] {
            let key = if bad.starts_with("tty") {
                "tty"
            } else {
                "user"
            };
            let rec = format!("arg=x\0{bad}\0");
            assert_eq!(
                ExecSpec::from_bytes(rec.as_bytes()),
                Err(SpecError::Numbers(key)),
                "{bad}"
            );
        }
        let bad = ExecSpec {
            argv: vec![b"a\0b".to_vec()],
            ..Default::default()
        };
        assert_eq!(bad.to_bytes(), Err(SpecError::Nul("arg")));
        // A tmpfs's options end at the first ':'; the directory may hold
        // more.
        let colon = ExecSpec {
            argv: vec![b"x".to_vec()],
            tmpfs: vec![(b"/t".to_vec(), b"size=1:2".to_vec())],
            ..Default::default()
        };
        assert_eq!(colon.to_bytes(), Err(SpecError::Tmpfs));
        assert_eq!(
            ExecSpec::from_bytes(b"arg=x\0tmpfs=size=1m\0"),
            Err(SpecError::Tmpfs)
        );
        assert_eq!(
            ExecSpec::from_bytes(b"arg=x\0file=0:ro\0"),
            Err(SpecError::File("path"))
        );
        assert_eq!(ExecSpec::from_bytes(b"cwd=/\0"), Err(SpecError::NoCommand));
        assert_eq!(ExecSpec::from_bytes(b"nokey\0"), Err(SpecError::NoEquals));
        for bad in [
            "eth0",
            "eth0 1.2.3.4/33 1.1.1.1",
            "eth0 1.2.3.4 1.1.1.1",
            "eth0 1.2.3.4/8 x",
            "eth0 1.2.3.4/8 1.1.1.1 mtu=x",
            "eth0 1.2.3.4/8 1.1.1.1 mtu=70000",
        ] {
            let rec = format!("arg=x\0net={bad}\0");
            assert_eq!(
                ExecSpec::from_bytes(rec.as_bytes()),
                Err(SpecError::Net(bad.into())),
                "{bad}"
            );
        }
        // A module name cannot climb out of the module directory.
        assert_eq!(
            ExecSpec::from_bytes(b"arg=x\0module=../../bin/sh\0"),
            Err(SpecError::UnknownRecord)
        );
        let climbing = ExecSpec {
            argv: vec![b"x".to_vec()],
            modules: vec![b"../x.ko".to_vec()],
            ..Default::default()
        };
        assert_eq!(climbing.to_bytes(), Err(SpecError::ModulePath));
    }
}
