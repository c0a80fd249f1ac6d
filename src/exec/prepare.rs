//! Before the VM is built: the command's environment and working
//! directory checked, live shares (virtio-fs) or copies decided, kernel
//! modules found, the initramfs generated and capsule's command line
//! added.

use std::path::PathBuf;

use super::{
    build_initramfs, files, modules, netcfg, Channel, Error, ExecConfig, Share, EXEC_CMDLINE,
};
use crate::builder;
use crate::config::FsConfig;

/// Checks the command's environment and working directory; adds the
/// generated initramfs and capsule's command line to the VM. Returns the
/// directories of the live file shares, to keep until the VM is gone.
pub(super) fn prepare(
    config: &mut ExecConfig,
    channel: Channel,
) -> Result<Vec<super::link::PrivateDir>, Error> {
    check_command(config)?;
    files::split_files(config)?;
    let live = plan_live_shares(config)?;
    let stages = if live {
        files::stage(config)?
    } else {
        Vec::new()
    };
    let modules = module_files(config)?;
    let nets = net_specs(config)?;
    config.vm.initramfs = Some(build_initramfs(config, live, &modules, nets)?);
    let channel_arg = match channel {
        Channel::Console => exec_proto::CONSOLE_CHANNEL_ARG,
        Channel::Vsock => "",
    };
    config.vm.cmdline = format!(
        "{} rdinit={} {channel_arg} {}",
        EXEC_CMDLINE,
        exec_proto::INIT_PATH,
        config.vm.cmdline
    )
    .trim_end()
    .to_string();
    Ok(stages)
}

/// The init's interface records: `--net user`'s (what passt hands out)
/// and those of `--net tap=NAME,ip=...`; a plain TAP gets none.
fn net_specs(config: &ExecConfig) -> Result<Vec<exec_proto::NetSpec>, Error> {
    config
        .vm
        .nets
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match n.backend {
            crate::config::NetBackendConfig::User { .. } => {
                Some(netcfg::user_net(i).map_err(Error::from))
            }
            crate::config::NetBackendConfig::Tap { .. } => config
                .net_ipv4
                .get(i)
                .copied()
                .flatten()
                .map(|ip| Ok(ip.spec(i))),
        })
        .collect()
}

/// Checks the command's environment (`K=V`) and working directory
/// (absolute).
pub(super) fn check_command(config: &ExecConfig) -> Result<(), Error> {
    for e in &config.env {
        if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(Error::Usage(format!("--env '{e}': expected KEY=VALUE")));
        }
    }
    if !config.workdir.starts_with('/') {
        return Err(Error::Usage(format!(
            "--workdir '{}': must be an absolute guest path",
            config.workdir
        )));
    }
    Ok(())
}

/// What the copy fallback means for the user, in its warning.
const COPY_FALLBACK: &str = "--share falls back to copying: files go in when the guest starts and come back when the command exits (deletions and renames do not)";

/// `--fs-root DIR`: the command's root is DIR over virtio-fs, writable;
/// it excludes every other root.
fn add_fs_root(config: &mut ExecConfig, dir: PathBuf) -> Result<(), Error> {
    if config.host_root || config.rootfs.is_some() || !config.vm.disks.is_empty() {
        return Err(Error::Usage(
            "--fs-root excludes --host-root, --rootfs and --disk".into(),
        ));
    }
    if !dir.is_dir() {
        return Err(Error::Usage(format!(
            "--fs-root {}: not a directory",
            dir.display()
        )));
    }
    devices::virtio::fs::daemon::find_binary()
        .map_err(|e| Error::Vm(builder::Error::FsShare(e.into())))?;
    config.vm.fs.push(FsConfig {
        dir,
        tag: exec_proto::FS_ROOT_TAG.into(),
        read_only: false,
        submounts: true,
    });
    Ok(())
}

/// `--host-root`: the current directory is shared writable at its own
/// path (unless a share is there already) and is the default working
/// directory.
fn share_current_dir(config: &mut ExecConfig) -> Result<(), Error> {
    if config.rootfs.is_some() {
        return Err(Error::Usage(
            "--host-root and --rootfs exclude each other".into(),
        ));
    }
    let cwd =
        std::env::current_dir().map_err(|e| Error::Host("cannot find the current directory", e))?;
    let guest = cwd.to_str().map(str::to_string).ok_or_else(|| {
        Error::Usage("--host-root: the current directory's name is not UTF-8".into())
    })?;
    if !guest.contains(':') && !config.shares.iter().any(|s| s.guest == guest) {
        config.shares.push(Share {
            host: cwd,
            guest: guest.clone(),
            writable: true,
        });
    }
    if config.workdir == "/" {
        config.workdir = guest;
    }
    Ok(())
}

/// Decides between live shares (virtio-fs, when a virtiofsd is there)
/// and copies, and adds the virtio-fs devices: the host root and the
/// current directory for `--host-root`, one per `--share`. Returns
/// whether the shares are live. `--host-root` without virtiofsd is an
/// error; `--share` without it falls back to copying, and says so.
fn plan_live_shares(config: &mut ExecConfig) -> Result<bool, Error> {
    if let Some(dir) = config.fs_root.clone() {
        add_fs_root(config, dir)?;
    }
    if config.host_root {
        share_current_dir(config)?;
    }
    if config.shares.is_empty() && config.files.is_empty() && !config.host_root {
        return Ok(config.fs_root.is_some());
    }
    if let Err(e) = devices::virtio::fs::daemon::find_binary() {
        if config.host_root {
            return Err(Error::Vm(builder::Error::FsShare(e.into())));
        }
        // Through the log, like every other capsule message on stderr:
        // `CAPSULE_LOG=error` leaves stderr to the command alone.
        log::warn!("{e}; {COPY_FALLBACK}");
        return Ok(false);
    }
    // virtiofsd's default sandbox (namespaces, pivot_root) needs root. A
    // user who is not root gets copies unless they said how to run it.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let told = std::env::var_os("CAPSULE_VIRTIOFSD").is_some()
        || std::env::var_os("CAPSULE_VIRTIOFSD_SANDBOX").is_some();
    if !config.host_root && !root && !told {
        log::warn!(
            "not root, so virtiofsd cannot sandbox itself (set CAPSULE_VIRTIOFSD_SANDBOX=none to share live anyway); {COPY_FALLBACK}"
        );
        return Ok(false);
    }
    if config.host_root {
        config.vm.fs.push(FsConfig {
            dir: "/".into(),
            tag: exec_proto::HOST_ROOT_TAG.into(),
            read_only: true,
            submounts: false,
        });
    }
    for (i, share) in config.shares.iter().enumerate() {
        config.vm.fs.push(FsConfig {
            dir: share.host.clone(),
            tag: exec_proto::share_tag(i),
            read_only: !share.writable,
            submounts: true,
        });
    }
    log::info!("shares are live over virtio-fs");
    Ok(true)
}

/// The module files to pack: from `--modules`, or with `--host-root`
/// from the host's `/lib/modules/<the kernel's release>` if it is there.
fn module_files(config: &ExecConfig) -> Result<Vec<PathBuf>, Error> {
    let dir = match (&config.modules, config.host_root) {
        (Some(d), _) => d.clone(),
        (None, true) => {
            let release = modules::kernel_release(&config.vm.kernel)
                .map_err(|e| Error::Host("cannot read the kernel", e))?;
            let Some(release) = release else {
                log::info!("no kernel release found in the kernel image: no modules loaded");
                return Ok(Vec::new());
            };
            let dir = PathBuf::from("/lib/modules").join(&release);
            if !dir.join("modules.dep").is_file() {
                log::info!("no {}: no modules loaded", dir.display());
                return Ok(Vec::new());
            }
            dir
        }
        (None, false) => return Ok(Vec::new()),
    };
    let files = modules::files(&dir)?;
    log::info!(
        "loading {} kernel modules from {}",
        files.len(),
        dir.display()
    );
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::tests::exec_config;

    fn fs_root_config(dir: &str) -> ExecConfig {
        ExecConfig {
            fs_root: Some(dir.into()),
            ..exec_config()
        }
    }

    #[test]
    fn only_taps_with_an_address_get_a_net_record() {
        let mut c = exec_config();
        for n in ["tap=t0", "tap=t1,ip=10.88.7.2/24,gw=10.88.7.1,mtu=1400"] {
            let n: crate::exec::ExecNet = n.parse().unwrap();
            c.vm.nets.push(n.net);
            c.net_ipv4.push(n.ipv4);
        }
        let specs = net_specs(&c).unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].interface, "eth1");
        assert_eq!(specs[0].address, std::net::Ipv4Addr::new(10, 88, 7, 2));
        assert_eq!(specs[0].mtu, Some(1400));
        c.net_ipv4.clear();
        assert!(net_specs(&c).unwrap().is_empty());
    }

    #[test]
    fn fs_root_is_checked_before_any_daemon_is_looked_for() {
        let mut c = fs_root_config("/nonexistent/capsule-fs-root");
        let e = plan_live_shares(&mut c).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let mut c = fs_root_config("/");
        c.host_root = true;
        let e = plan_live_shares(&mut c).unwrap_err().to_string();
        assert!(e.contains("excludes"), "{e}");
        let mut c = fs_root_config("/");
        c.rootfs = Some("/".into());
        assert!(plan_live_shares(&mut c).is_err());
        assert!(c.vm.fs.is_empty());
    }

    #[test]
    fn fs_root_is_a_read_write_virtio_fs_device() {
        // With a virtiofsd found: the root's device, writable, under its tag.
        let mut c = fs_root_config("/");
        if devices::virtio::fs::daemon::find_binary().is_err() {
            let e = plan_live_shares(&mut c).unwrap_err().to_string();
            assert!(e.contains("virtiofsd"), "{e}");
            return;
        }
        assert!(plan_live_shares(&mut c).unwrap());
        assert_eq!(c.vm.fs.len(), 1);
        assert_eq!(c.vm.fs[0].tag, exec_proto::FS_ROOT_TAG);
        assert!(!c.vm.fs[0].read_only);
    }
}
