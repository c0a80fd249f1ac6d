//! The snapshot file: a fixed header, then the state as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CAPSNAP\0"
//!      8     4  format version (u32, little endian), FORMAT_VERSION
//!     12     4  CRC-32 (IEEE) of the payload (u32, little endian)
//!     16     8  payload length in bytes (u64, little endian)
//!     24     n  payload: the SnapshotState as JSON (UTF-8)
//! ```
//!
//! The version is checked before anything else is read, so a snapshot of
//! another format gets its own error; the length and checksum catch a
//! truncated or altered file before the JSON is parsed, so a restored
//! guest never runs on state that is not what was saved.

use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"CAPSNAP\0";
/// The format this capsule writes. Any change to the state structures
/// that an older capsule could not read bumps it. Version 3 added the
/// transport and the virtio-pci state (fields a version-2 file lacks
/// and that read as virtio-mmio, no PCI).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format this capsule still reads (each newer version only
/// added fields with defaults).
pub const OLDEST_FORMAT_VERSION: u32 = 2;
/// Size of the header before the payload.
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted (the state of 254 vCPUs is a few MiB): a
/// corrupted length must not make capsule allocate gigabytes.
const MAX_PAYLOAD: u64 = 64 << 20;

/// Why a snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No capsule snapshot magic.
    #[error("{} is not a capsule snapshot", .0.display())]
    NotASnapshot(PathBuf),
    /// A snapshot of another format version.
    #[error("{} is a snapshot of format version {found}; this capsule reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}", .path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Shorter (or longer) than its header says.
    #[error("{} is truncated or damaged: {found} bytes of state where the header says {expected}", .path.display())]
    Length {
        /// The file.
        path: PathBuf,
        /// Payload bytes the header announces.
        expected: u64,
        /// Payload bytes present.
        found: u64,
    },
    /// The checksum does not match.
    #[error("{} is corrupted: checksum {found:#010x}, expected {expected:#010x}", .path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The header's checksum.
        expected: u32,
        /// The payload's.
        found: u32,
    },
    /// The payload is not the state this capsule expects.
    #[error("{} has invalid state: {source}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// The file's bytes: header and `payload`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_vec(state)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks and parses the bytes of snapshot file `path`.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, FormatError> {
    let path = path.to_path_buf();
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::NotASnapshot(path));
    }
    let word = |at: usize, n: usize| -> Option<&[u8]> { bytes.get(at..at + n) };
    let truncated = |path| FormatError::Length {
        path,
        expected: 0,
        found: bytes.len().saturating_sub(HEADER_LEN) as u64,
    };
    let Some(version) = word(8, 4) else {
        return Err(truncated(path));
    };
    let found = u32::from_le_bytes(version.try_into().expect("4 bytes"));
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&found) {
        return Err(FormatError::Version { path, found });
    }
    let (Some(crc), Some(len)) = (word(12, 4), word(16, 8)) else {
        return Err(truncated(path));
    };
    let expected_crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let expected = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if expected != payload.len() as u64 {
        return Err(FormatError::Length {
            path,
            expected,
            found: payload.len() as u64,
        });
    }
    let crc = crc32fast::hash(payload);
    if crc != expected_crc {
        return Err(FormatError::Checksum {
            path,
            expected: expected_crc,
            found: crc,
        });
    }
    serde_json::from_slice(payload).map_err(|source| FormatError::Parse { path, source })
}

/// Reads and checks snapshot file `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let io_err = |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = crate::hostfile::open_regular(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > HEADER_LEN as u64 + MAX_PAYLOAD {
        return Err(FormatError::NotASnapshot(path.to_path_buf()));
    }
    let mut bytes = Vec::with_capacity(arch::usize_from(len));
    io::Read::read_to_end(&mut &file, &mut bytes).map_err(io_err)?;
    decode(path, &bytes)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it,
/// flushed, then renamed over it, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = create_private(&tmp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates (or truncates) `path` with mode 0600: a snapshot's files hold
/// the guest's memory and state, which are the guest's secrets.
pub fn create_private(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// `path` with `.tmp` appended, in the same directory (so a rename
/// replaces `path` atomically).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct State {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> (State, Vec<u8>) {
        let s = State {
            a: 7,
            b: vec![1, 2, 3],
        };
        let bytes = encode(&s).unwrap();
        (s, bytes)
    }

    fn p() -> &'static Path {
        Path::new("snap")
    }

    #[test]
    fn round_trip() {
        let (s, bytes) = sample();
        assert_eq!(&bytes[..8], b"CAPSNAP\0");
        assert_eq!(decode::<State>(p(), &bytes).unwrap(), s);
    }

    #[test]
    fn other_version_is_refused() {
        let (_, mut bytes) = sample();
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = decode::<State>(p(), &bytes).unwrap_err();
        assert!(
            matches!(e, FormatError::Version { found, .. } if found == FORMAT_VERSION + 1),
            "{e}"
        );
        let want = format!("format version {}", FORMAT_VERSION + 1);
        assert!(e.to_string().contains(&want), "{e}");
    }

    #[test]
    fn the_oldest_version_still_reads() {
        let (s, mut bytes) = sample();
        bytes[8..12].copy_from_slice(&OLDEST_FORMAT_VERSION.to_le_bytes());
        assert_eq!(decode::<State>(p(), &bytes).unwrap(), s);
        bytes[8..12].copy_from_slice(&(OLDEST_FORMAT_VERSION - 1).to_le_bytes());
        assert!(matches!(
            decode::<State>(p(), &bytes),
            Err(FormatError::Version { found: 1, .. })
        ));
    }

    #[test]
    fn truncated_file_is_refused() {
        let (_, bytes) = sample();
        for cut in [bytes.len() - 1, HEADER_LEN, 20, 10] {
            let e = decode::<State>(p(), &bytes[..cut]).unwrap_err();
            assert!(matches!(e, FormatError::Length { .. }), "cut at {cut}: {e}");
        }
        for cut in [0, 4] {
            let e = decode::<State>(p(), &bytes[..cut]).unwrap_err();
            assert!(
                matches!(e, FormatError::NotASnapshot(_)),
                "cut at {cut}: {e}"
            );
        }
    }

    #[test]
    fn corrupted_payload_is_refused() {
        let (_, bytes) = sample();
        for at in HEADER_LEN..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            let e = decode::<State>(p(), &bad).unwrap_err();
            assert!(matches!(e, FormatError::Checksum { .. }), "byte {at}: {e}");
        }
    }

    #[test]
    fn wrong_magic_is_refused() {
        let (_, mut bytes) = sample();
        bytes[0] = b'X';
        assert!(matches!(
            decode::<State>(p(), &bytes),
            Err(FormatError::NotASnapshot(_))
        ));
    }

    #[test]
    fn valid_checksum_but_wrong_state_is_refused() {
        let bytes = encode(&serde_json::json!({"a": "x"})).unwrap();
        assert!(matches!(
            decode::<State>(p(), &bytes),
            Err(FormatError::Parse { .. })
        ));
    }
}
