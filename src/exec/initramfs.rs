//! The initramfs of an exec guest: the embedded guest init, the command
//! description, the `--rootfs` tree and the `--share` directories, as one
//! cpio archive generated in memory.

use std::os::unix::ffi::OsStrExt;

use exec_proto::ExecSpec;

use super::cpio::CpioWriter;
use super::{Error, ExecConfig};

/// The guest init, built by `build.rs`.
static INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/capsule-init"));

/// Packs the initramfs: `/dev/console`, the init, the command description,
/// the `--rootfs` tree and the shares.
/// With `live`, the shares are virtio-fs mounts and nothing of them is
/// packed; `modules` are packed in order for the init to load; `nets`
/// are the interfaces the init configures.
pub fn build_initramfs(
    config: &ExecConfig,
    live: bool,
    modules: &[std::path::PathBuf],
    nets: Vec<exec_proto::NetSpec>,
) -> Result<Vec<u8>, Error> {
    let spec = exec_spec(config, live, module_names(modules)?, nets).to_bytes()?;
    let mut w = CpioWriter::new();
    if let Some(root) = &config.rootfs {
        pack_rootfs(&mut w, root)?;
    }
    pack_init(&mut w, &spec)?;
    pack_modules(&mut w, modules)?;
    pack_shares(&mut w, config, live)?;
    // Live, the files are on their own virtio-fs devices (`files.rs`).
    if !live {
        pack_files(&mut w, config)?;
    }
    Ok(w.finish())
}

/// The file names of `modules`, as the init finds them in its module
/// directory.
fn module_names(modules: &[std::path::PathBuf]) -> Result<Vec<Vec<u8>>, Error> {
    modules
        .iter()
        .map(|m| {
            m.file_name()
                .map(|n| n.as_bytes().to_vec())
                .ok_or_else(|| Error::Usage(format!("bad module path {}", m.display())))
        })
        .collect()
}

/// The command description the init reads: what to run, where, and what
/// to mount and configure first.
fn exec_spec(
    config: &ExecConfig,
    live: bool,
    modules: Vec<Vec<u8>>,
    nets: Vec<exec_proto::NetSpec>,
) -> ExecSpec {
    ExecSpec {
        argv: config.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: config.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        cwd: config.workdir.as_bytes().to_vec(),
        disk: !config.vm.disks.is_empty() && !config.host_root && config.fs_root.is_none(),
        shares: config
            .shares
            .iter()
            .map(|s| (s.guest.as_bytes().to_vec(), s.writable))
            .collect(),
        files: config
            .files
            .iter()
            .map(|f| (f.guest.as_bytes().to_vec(), f.writable))
            .collect(),
        tmpfs: config
            .tmpfs
            .iter()
            .map(|t| (t.guest.as_bytes().to_vec(), t.options.as_bytes().to_vec()))
            .collect(),
        live,
        host_root: config.host_root,
        fs_root: config.fs_root.is_some(),
        modules,
        nets,
        await_command: config.argv.is_empty(),
        tty: config.tty.then(|| {
            crate::terminal::window_size().unwrap_or(exec_proto::WinSize { rows: 24, cols: 80 })
        }),
        user: config.user.clone(),
        watch: false,
    }
}

/// Packs the `--rootfs` tree at the root of the archive; the entries
/// packed after it are laid over it.
fn pack_rootfs(w: &mut CpioWriter, root: &std::path::Path) -> Result<(), Error> {
    if !root.is_dir() {
        return Err(Error::Usage(format!(
            "--rootfs {}: not a directory",
            root.display()
        )));
    }
    w.tree(root, "")?;
    Ok(())
}

/// Packs what every exec guest has: `/dev/console`, the mount points, the
/// init and its command description `spec`.
fn pack_init(w: &mut CpioWriter, spec: &[u8]) -> Result<(), Error> {
    // Directories may repeat entries of the rootfs tree; the kernel keeps
    // the existing directory.
    w.dir("dev", 0o755)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    for d in ["proc", "sys", "tmp", ".capsule", ".capsule/share"] {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    w.file(
        exec_proto::INIT_PATH.trim_start_matches('/'),
        0o755,
        INIT_BINARY,
    )?;
    w.file(exec_proto::CONFIG_PATH.trim_start_matches('/'), 0o644, spec)?;
    Ok(())
}

/// Packs the kernel `modules` into the module directory, in order (none:
/// no directory).
fn pack_modules(w: &mut CpioWriter, modules: &[std::path::PathBuf]) -> Result<(), Error> {
    if modules.is_empty() {
        return Ok(());
    }
    w.dir(exec_proto::MODULE_DIR.trim_start_matches('/'), 0o755)?;
    for m in modules {
        let data = std::fs::read(m).map_err(|source| Error::Module {
            path: m.clone(),
            source,
        })?;
        let name = m.file_name().unwrap_or_default().to_string_lossy();
        let dest = format!("{}/{name}", exec_proto::MODULE_DIR.trim_start_matches('/'));
        w.file(&dest, 0o644, &data)?;
    }
    Ok(())
}

/// Checks that every `--share` is a directory and, unless `live` (then
/// they are virtio-fs mounts), packs each tree under the share directory.
fn pack_shares(w: &mut CpioWriter, config: &ExecConfig, live: bool) -> Result<(), Error> {
    for (i, share) in config.shares.iter().enumerate() {
        if !share.host.is_dir() {
            return Err(Error::Usage(format!(
                "--share {}: not a directory",
                share.host.display()
            )));
        }
        if live {
            continue;
        }
        let dest = format!("{}/{i}", exec_proto::SHARE_DIR.trim_start_matches('/'));
        w.dir(&dest, 0o755)?;
        w.tree(&share.host, &dest)?;
    }
    Ok(())
}

/// Packs copies of the shared single files into the files directory (none:
/// no directory).
fn pack_files(w: &mut CpioWriter, config: &ExecConfig) -> Result<(), Error> {
    if config.files.is_empty() {
        return Ok(());
    }
    let dir = exec_proto::FILES_DIR.trim_start_matches('/');
    w.dir(dir, 0o755)?;
    for (i, f) in config.files.iter().enumerate() {
        let data = std::fs::read(&f.host).map_err(|e| {
            Error::Usage(format!("--share {}: cannot read it: {e}", f.host.display()))
        })?;
        w.file(&format!("{dir}/{i}"), 0o644, &data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_has_init_and_config() {
        let config = ExecConfig {
            env: vec!["A=b".into()],
            ..crate::exec::tests::exec_config()
        };
        let a = build_initramfs(&config, false, &[], vec![]).unwrap();
        assert!(a.len() > INIT_BINARY.len());
        let find = |needle: &[u8]| a.windows(needle.len()).any(|w| w == needle);
        assert!(find(b".capsule/init\0"));
        assert!(find(b"arg=true\0env=A=b\0"));
        assert!(find(b"dev/console\0"));
    }

    #[test]
    fn copied_files_and_tmpfs_mounts_are_in_the_spec() {
        let file = std::env::temp_dir().join(format!("capsule-initramfs-{}", std::process::id()));
        std::fs::write(&file, "nameserver 10.96.0.10\n").unwrap();
        let config = ExecConfig {
            files: vec![crate::exec::Share {
                host: file.clone(),
                guest: "/etc/resolv.conf".into(),
                writable: false,
            }],
            tmpfs: vec!["/run:size=8m".parse().unwrap()],
            ..crate::exec::tests::exec_config()
        };
        let a = build_initramfs(&config, false, &[], vec![]).unwrap();
        std::fs::remove_file(&file).unwrap();
        let find = |needle: &[u8]| a.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"file=0:ro:/etc/resolv.conf\0"));
        assert!(find(b"tmpfs=size=8m:/run\0"));
        assert!(find(b".capsule/files/0\0"));
        assert!(find(b"nameserver 10.96.0.10\n"));
        // Live, the file is not packed (it is on its own device).
        let config = ExecConfig {
            files: config.files.clone(),
            ..crate::exec::tests::exec_config()
        };
        let a = build_initramfs(&config, true, &[], vec![]).unwrap();
        assert!(!a.windows(17).any(|w| w == b".capsule/files/0\0"));
    }
}
