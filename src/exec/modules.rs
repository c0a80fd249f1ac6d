//! Kernel modules for an exec guest: a distribution kernel (Debian's cloud
//! kernel, Ubuntu's generic) builds virtio-mmio, the console, block,
//! vsock, virtio-fs and overlayfs as modules, so capsule's init loads them
//! before anything else. They come from `--modules DIR` (a
//! `/lib/modules/RELEASE` tree) or, with `--host-root`, from the host's
//! `/lib/modules/<the guest kernel's release>`; the files named by
//! `modules.dep` (each wanted module after its dependencies) are packed
//! into the initramfs.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// What the init needs, whatever the kernel builds in: the virtio-mmio
/// transport, the exec channel's console, disks, network, vsock,
/// virtio-fs, the host root's overlay and the usual root file systems.
/// Names the kernel does not have as modules are skipped (built in, or
/// absent: the init then reports what is missing when it uses it).
pub const WANTED: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "overlay",
    "ext4",
];

/// A module's name as the kernel spells it: the file name without `.ko`
/// (and a compression suffix), `-` as `_`.
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// The module files (relative to the tree) to load for [`WANTED`], each
/// after its dependencies, from the tree's `modules.dep`.
pub fn resolve(dep_file: &str) -> Vec<String> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep_file.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        let list = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(file), (file.to_string(), list));
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((file, list)) = deps.get(name) else {
            return;
        };
        for d in list {
            visit(&module_name(d), deps, seen, order);
        }
        order.push(file.clone());
    }
    for w in WANTED {
        visit(w, &deps, &mut seen, &mut order);
    }
    order
}

/// The files to pack, in load order, from the tree `dir`.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, super::Error> {
    let dep = dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep).map_err(|source| super::Error::ModuleDeps {
        dir: dir.to_path_buf(),
        source,
    })?;
    Ok(resolve(&text).into_iter().map(|f| dir.join(f)).collect())
}

/// The release (`uname -r`) of the kernel image at `path`: from a
/// bzImage's setup header (`kernel_version`), else from the first
/// `Linux version ` string in the file (an ELF vmlinux).
pub fn kernel_release(path: &Path) -> std::io::Result<Option<String>> {
    let mut data = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut data)?;
    let word = |bytes: &[u8]| {
        let end = bytes
            .iter()
            .position(|&b| b == b' ' || b == 0)
            .unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end])
            .ok()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    if data.get(0x202..0x206) == Some(b"HdrS") {
        if let Some(p) = data.get(0x20e..0x210) {
            let at = 0x200 + usize::from(u16::from_le_bytes([p[0], p[1]]));
            if let Some(s) = data.get(at..).and_then(word) {
                return Ok(Some(s));
            }
        }
    }
    let needle = b"Linux version ";
    Ok(data
        .windows(needle.len())
        .position(|w| w == needle)
        .and_then(|i| word(&data[i + needle.len()..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_modules_come_after_their_dependencies() {
        let dep = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/fs/fuse/virtiofs.ko.xz: kernel/fs/fuse/fuse.ko.xz kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/fuse/fuse.ko.xz:
kernel/drivers/net/dummy.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
garbage line
";
        let order = resolve(dep);
        let pos = |m: &str| order.iter().position(|f| f.ends_with(m)).unwrap();
        assert!(pos("/virtio.ko") < pos("/virtio_ring.ko"));
        assert!(pos("/virtio_ring.ko") < pos("/virtio_mmio.ko"));
        assert!(pos("/fuse.ko.xz") < pos("/virtiofs.ko.xz"));
        assert!(pos("/vsock.ko") < pos("/vmw_vsock_virtio_transport_common.ko"));
        assert!(
            order.iter().all(|f| !f.ends_with("dummy.ko")),
            "only what is wanted"
        );
        assert_eq!(order.len(), 8, "each once: {order:?}");
        assert_eq!(module_name("a/b/virtio-blk.ko.zst"), "virtio_blk");
    }

    #[test]
    fn release_from_a_bzimage_header_and_from_a_plain_image() {
        let dir = std::env::temp_dir().join(format!("capsule-kver-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        bz[0x500..0x500 + 30].copy_from_slice(b"6.1.0-28-cloud-amd64 (debian)\0");
        std::fs::write(dir.join("bz"), &bz).unwrap();
        assert_eq!(
            kernel_release(&dir.join("bz")).unwrap().as_deref(),
            Some("6.1.0-28-cloud-amd64")
        );
        std::fs::write(dir.join("elf"), b"\x7fELF....Linux version 6.12.1 (gcc) #1").unwrap();
        assert_eq!(
            kernel_release(&dir.join("elf")).unwrap().as_deref(),
            Some("6.12.1")
        );
        std::fs::write(dir.join("none"), b"nothing").unwrap();
        assert_eq!(kernel_release(&dir.join("none")).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
