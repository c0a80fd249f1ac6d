//! `--seccomp-filter FILE`: compiled filters in the format Firecracker
//! loads (what its `seccompiler-bin` writes, before Firecracker moved to
//! `bitcode` serialization): a bincode-encoded map from
//! thread kind (`vmm`, `api`, `vcpu`) to a BPF program. bincode's
//! default encoding is little-endian with 64-bit lengths:
//!
//! ```text
//! u64 entries, then per entry: u64 name length, name (UTF-8),
//!                              u64 instructions, then per instruction:
//!                              u16 code, u8 jt, u8 jf, u32 k
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use seccompiler::{sock_filter, BpfProgram};

/// At most this many bytes are read (Firecracker's default filters take
/// about 30 KiB).
const MAX_FILE: u64 = 1 << 20;
/// The kernel's limit on a filter's instructions (`BPF_MAXINSNS`).
const MAX_INSNS: u64 = 4096;

/// Why a filter file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a compiled filter map.
    #[error("{path} is not a compiled seccomp filter file: {source}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        source: DecodeError,
    },
}

/// What is wrong with a filter file's bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The file is over 1 MiB (`MAX_FILE`).
    #[error("larger than {MAX_FILE} bytes")]
    TooLarge,
    /// A length does not fit this host's address space.
    #[error("length out of range")]
    Length,
    /// The bytes end inside an item.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// A thread kind's name is not UTF-8.
    #[error("a thread name is not UTF-8")]
    Name(#[source] std::str::Utf8Error),
    /// A program is empty or longer than the kernel takes.
    #[error("the filter for '{name}' has {count} instructions (1 to {MAX_INSNS})")]
    Count {
        /// The thread kind.
        name: String,
        /// Its program's instructions.
        count: u64,
    },
    /// A thread kind has two programs.
    #[error("'{0}' appears twice")]
    Twice(String),
    /// Bytes follow the last program.
    #[error("{0} bytes after the last filter")]
    Trailing(usize),
}

/// Reads a filter file: thread kind name → program.
pub fn load(path: &Path) -> Result<BTreeMap<String, BpfProgram>, FileError> {
    let shown = path.display().to_string();
    let bytes = crate::hostfile::read_regular(path).map_err(|source| FileError::Read {
        path: shown.clone(),
        source,
    })?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(FileError::Format {
            path: shown,
            source: DecodeError::TooLarge,
        });
    }
    decode(&bytes).map_err(|source| FileError::Format {
        path: shown,
        source,
    })
}

/// Decodes the bincode map.
pub fn decode(bytes: &[u8]) -> Result<BTreeMap<String, BpfProgram>, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let entries = r.u64()?;
    let mut map = BTreeMap::new();
    for _ in 0..entries {
        let len = r.u64()?;
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(DecodeError::Name)?
            .to_string();
        let count = r.u64()?;
        if count == 0 || count > MAX_INSNS {
            return Err(DecodeError::Count { name, count });
        }
        let mut prog = Vec::new();
        for _ in 0..count {
            let b = r.take(8)?;
            prog.push(sock_filter {
                code: u16::from_le_bytes([b[0], b[1]]),
                jt: b[2],
                jf: b[3],
                k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            });
        }
        if map.insert(name.clone(), prog).is_some() {
            return Err(DecodeError::Twice(name));
        }
    }
    if r.at != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - r.at));
    }
    Ok(map)
}

/// Encodes a map in the same format (`capsule seccomp --compile`).
pub fn encode(map: &BTreeMap<String, BpfProgram>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(map.len() as u64).to_le_bytes());
    for (name, prog) in map {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(prog.len() as u64).to_le_bytes());
        for i in prog {
            out.extend_from_slice(&i.code.to_le_bytes());
            out.push(i.jt);
            out.push(i.jf);
            out.extend_from_slice(&i.k.to_le_bytes());
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError::Length)?;
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(DecodeError::Truncated(self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}
