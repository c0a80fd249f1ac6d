//! The disks' options (`--disk`, `PUT /drives`) and their parser.

use std::path::PathBuf;

use super::Limits;

/// How a disk image is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskMode {
    /// Read-write; the image is locked exclusively.
    #[default]
    ReadWrite,
    /// Read-only for the guest; the image is locked shared.
    ReadOnly,
    /// Copy-on-write: the guest reads and writes, the image is never
    /// modified and the writes are gone when the VM ends.
    Ephemeral,
}

/// What a disk does with the guest's flushes (`,cache=` on the command
/// line, a drive's `cache_type` in the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskCache {
    /// A flush makes the data durable (`fdatasync` of the image).
    #[default]
    Writeback,
    /// A flush completes without `fdatasync`: fast, but a host crash or
    /// power loss can lose what the guest was told is on disk.
    Unsafe,
}

/// Which engine moves a disk's data (`,engine=` on the command line, a
/// drive's `io_engine` in the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskEngine {
    /// Requests one after the other on the device thread.
    #[default]
    Sync,
    /// Requests in flight together through an io_uring (the API's
    /// `"Async"`).
    IoUring,
}

/// A raw disk image for a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// How it is attached.
    pub mode: DiskMode,
    /// Limits on the guest's requests.
    pub limits: Limits,
    /// What a flush does (absent in configurations saved before it
    /// existed: writeback).
    #[serde(default)]
    pub cache: DiskCache,
    /// Which engine moves the data (absent in configurations saved before
    /// it existed: sync).
    #[serde(default)]
    pub engine: DiskEngine,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// Parses `PATH[,ro|,rw|,ephemeral][,cache=writeback|unsafe]
    /// [,engine=sync|io_uring]` (options in any order): the
    /// options are the comma-separated words at the end; a comma in a
    /// directory name (a word with a `/`) belongs to the path.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = s;
        let mut mode = None;
        let mut cache = None;
        let mut engine = None;
        while let Some((p, opt)) = path.rsplit_once(',') {
            if opt.contains('/') {
                break;
            }
            let conflict = || format!("disk option '{opt}' conflicts with a later one");
            if let Some(m) = opt.strip_prefix("cache=") {
                if cache.is_some() {
                    return Err(conflict());
                }
                cache = Some(match m {
                    "writeback" => DiskCache::Writeback,
                    "unsafe" => DiskCache::Unsafe,
                    _ => {
                        return Err(format!(
                            "unknown disk cache mode '{m}' (expected writeback or unsafe)"
                        ))
                    }
                });
            } else if let Some(e) = opt.strip_prefix("engine=") {
                if engine.is_some() {
                    return Err(conflict());
                }
                engine = Some(match e {
                    "sync" => DiskEngine::Sync,
                    "io_uring" => DiskEngine::IoUring,
                    _ => {
                        return Err(format!(
                            "unknown disk engine '{e}' (expected sync or io_uring)"
                        ))
                    }
                });
            } else {
                let m = match opt {
                    "ro" => DiskMode::ReadOnly,
                    "rw" => DiskMode::ReadWrite,
                    "ephemeral" => DiskMode::Ephemeral,
                    _ => {
                        return Err(format!(
                            "unknown disk option '{opt}' (expected ro, rw, ephemeral, cache=MODE or engine=ENGINE)"
                        ))
                    }
                };
                if mode.is_some() {
                    return Err(conflict());
                }
                mode = Some(m);
            }
            path = p;
        }
        if path.is_empty() {
            return Err("missing disk image path".to_string());
        }
        Ok(Self {
            path: PathBuf::from(path),
            mode: mode.unwrap_or_default(),
            limits: Limits::default(),
            cache: cache.unwrap_or_default(),
            engine: engine.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d: DiskConfig = "/img/root.ext4".parse().unwrap();
        assert_eq!(d.mode, DiskMode::ReadWrite);
        assert_eq!(d.path, PathBuf::from("/img/root.ext4"));
        let d: DiskConfig = "a.img,ro".parse().unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode),
            ("a.img", DiskMode::ReadOnly)
        );
        let d: DiskConfig = "a.img,ephemeral".parse().unwrap();
        assert_eq!(d.mode, DiskMode::Ephemeral);
        assert!("a.img,fast".parse::<DiskConfig>().is_err());
        assert!(",ro".parse::<DiskConfig>().is_err());
        assert!("".parse::<DiskConfig>().is_err());
        // A comma inside a directory name is part of the path.
        let d: DiskConfig = "/a,b/c.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/a,b/c.img"));
        assert_eq!(d.cache, DiskCache::Writeback);
    }

    #[test]
    fn disk_cache_modes() {
        let d: DiskConfig = "/dev/vdb,cache=unsafe".parse().unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode, d.cache),
            ("/dev/vdb", DiskMode::ReadWrite, DiskCache::Unsafe)
        );
        let d: DiskConfig = "a.img,ro,cache=unsafe".parse().unwrap();
        assert_eq!((d.mode, d.cache), (DiskMode::ReadOnly, DiskCache::Unsafe));
        let d: DiskConfig = "/x,y/a.img,cache=writeback,ephemeral".parse().unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode, d.cache),
            ("/x,y/a.img", DiskMode::Ephemeral, DiskCache::Writeback)
        );
        for bad in [
            "a.img,cache=none",
            "a.img,cache=",
            "a.img,cache=unsafe,cache=writeback",
            "a.img,ro,ephemeral",
            ",cache=unsafe",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let e = "a.img,cache=none".parse::<DiskConfig>().unwrap_err();
        assert!(e.contains("writeback or unsafe"), "{e}");
    }

    #[test]
    fn disk_engines() {
        let d: DiskConfig = "a.img".parse().unwrap();
        assert_eq!(d.engine, DiskEngine::Sync);
        let d: DiskConfig = "/x,y/a.img,engine=io_uring,ro,cache=unsafe"
            .parse()
            .unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.mode, d.cache, d.engine),
            (
                "/x,y/a.img",
                DiskMode::ReadOnly,
                DiskCache::Unsafe,
                DiskEngine::IoUring
            )
        );
        let d: DiskConfig = "a.img,engine=sync".parse().unwrap();
        assert_eq!(d.engine, DiskEngine::Sync);
        for bad in [
            "a.img,engine=aio",
            "a.img,engine=",
            "a.img,engine=io_uring,engine=sync",
            "a.img,engine=sync,engine=sync",
            ",engine=io_uring",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let e = "a.img,engine=aio".parse::<DiskConfig>().unwrap_err();
        assert!(e.contains("sync or io_uring"), "{e}");
        // Saved before the field existed.
        let d: DiskConfig = "a.img,engine=io_uring".parse().unwrap();
        let mut v = serde_json::to_value(&d).unwrap();
        assert!(v.as_object_mut().unwrap().remove("engine").is_some());
        let old: DiskConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old.engine, DiskEngine::Sync);
    }
}
