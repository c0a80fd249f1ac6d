//! A writer for "newc" cpio archives, the format of Linux initramfs images
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header (magic `070701` and 13 fields of 8
//! hex digits), the NUL-terminated name padded to 4 bytes, and the data
//! padded to 4 bytes. The archive ends with an entry named `TRAILER!!!`.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Errors while adding host files to an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// A host file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A name that the format cannot hold.
    #[error("file name {0:?} contains a NUL byte or is too long")]
    BadName(String),
}

/// An archive being built in memory.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    fn entry(
        &mut self,
        name: &[u8],
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let bad = || CpioError::BadName(String::from_utf8_lossy(name).into_owned());
        // newc header fields are 32-bit: a name (below 4096 bytes) or file
        // that does not fit is refused.
        let (Ok(data_len), Ok(name_len)) = (u32::try_from(data.len()), u32::try_from(name.len()))
        else {
            return Err(bad());
        };
        if name.contains(&0) || name.len() >= 4096 {
            return Err(bad());
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == S_IFDIR { 2 } else { 1 },
            0, // mtime
            data_len,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name_len + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name);
        self.out.push(0);
        pad4(&mut self.out);
        self.out.extend_from_slice(data);
        pad4(&mut self.out);
        Ok(())
    }

    /// Adds a directory (`path` relative to the archive root, no leading
    /// slash).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(path.as_bytes(), S_IFDIR | (perm & 0o7777), (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(path.as_bytes(), S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(
            path.as_bytes(),
            S_IFCHR | (perm & 0o7777),
            (major, minor),
            &[],
        )
    }

    /// Adds the contents of host directory `src` under `dest` (which must
    /// already be in the archive, or be empty for the root): directories,
    /// regular files and symlinks, recursively, without following links.
    /// Other file types (sockets, devices, FIFOs) are skipped.
    pub fn tree(&mut self, src: &Path, dest: &str) -> Result<(), CpioError> {
        let read_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| CpioError::Read { path, source }
        };
        let mut entries: Vec<_> = fs::read_dir(src)
            .map_err(read_err(src))?
            .collect::<Result<_, _>>()
            .map_err(read_err(src))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(read_err(&path))?;
            let name = entry.file_name();
            let name = std::str::from_utf8(name.as_bytes())
                .map_err(|_| CpioError::BadName(path.display().to_string()))?;
            let target = if dest.is_empty() {
                name.to_string()
            } else {
                format!("{dest}/{name}")
            };
            let perm = meta.permissions().mode() & 0o7777;
            let ft = meta.file_type();
            if ft.is_dir() {
                self.dir(&target, perm)?;
                self.tree(&path, &target)?;
            } else if ft.is_file() {
                let data = fs::read(&path).map_err(read_err(&path))?;
                self.file(&target, perm, &data)?;
            } else if ft.is_symlink() {
                let link = fs::read_link(&path).map_err(read_err(&path))?;
                self.entry(
                    target.as_bytes(),
                    S_IFLNK | 0o777,
                    (0, 0),
                    link.as_os_str().as_bytes(),
                )?;
            } else {
                log::warn!(
                    "initramfs: skipping {} (not a file, directory or symlink)",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer entry cannot fail: fixed, valid name.
        let _ = self.entry(b"TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: name, mode, rdev, data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Parses an archive back into entries.
    fn parse(mut a: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let start = a.len();
        loop {
            assert_eq!(&a[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let rdev = (field(9), field(10));
            let name = String::from_utf8(a[110..110 + namesize - 1].to_vec()).unwrap();
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = a[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            assert_eq!((start - a.len()) % 4, 0);
            a = &a[next..];
            if name == "TRAILER!!!" {
                assert!(a.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn entries_round_trip() {
        let mut w = CpioWriter::new();
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"\x7fELF...").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        let entries = parse(&w.finish());
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].0, "dev");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].2, (5, 1));
        assert_eq!(entries[1].1, S_IFCHR | 0o600);
        assert_eq!(entries[2].3, b"\x7fELF...");
        assert_eq!(entries[3].3, b"");
    }

    #[test]
    fn trees_are_copied_without_following_links() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = dir.as_path();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/a.bin"), [0u8, 1, 2, 255]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let mut w = CpioWriter::new();
        w.dir("share", 0o755).unwrap();
        w.tree(root, "share").unwrap();
        let entries = parse(&w.finish());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["share", "share/link", "share/sub", "share/sub/a.bin"]
        );
        assert_eq!(entries[1].1 & 0o170000, S_IFLNK);
        assert_eq!(entries[1].3, b"/etc/passwd");
        assert_eq!(entries[3].3, [0, 1, 2, 255]);
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new();
        assert!(w.file("a\0b", 0o644, b"").is_err());
        let err = w.tree(Path::new("/does/not/exist"), "x").unwrap_err();
        assert!(err.to_string().contains("/does/not/exist"));
    }
}
