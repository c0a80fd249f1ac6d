//! Finding a kernel image's build configuration: the copy the kernel
//! embeds itself (`CONFIG_IKCONFIG`), a `config`/`.config` file beside the
//! image, or the distribution's `/boot/config-RELEASE`.
//!
//! An ELF vmlinux holds the embedded configuration as it is; a bzImage
//! holds the vmlinux compressed, so its payload is decompressed first
//! (gzip, xz, zstd and LZ4, which between them cover the usual distribution
//! and self-built kernels).

use std::io::Read;
use std::path::{Path, PathBuf};

/// The marker in front of the gzipped configuration in `kernel/configs.c`.
const IKCFG_START: &[u8] = b"IKCFG_ST";
/// The marker after it.
const IKCFG_END: &[u8] = b"IKCFG_ED";
/// The largest kernel (decompressed) capsule is willing to read.
const MAX_IMAGE: u64 = 512 << 20;
/// The largest configuration text accepted.
const MAX_CONFIG: u64 = 16 << 20;

/// Errors reading a kernel image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    /// Neither ELF nor bzImage.
    #[error("{0} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(PathBuf),
    /// The bzImage's payload is malformed or compressed in a way capsule
    /// cannot read.
    #[error("cannot decompress the bzImage payload: {0}")]
    Payload(#[from] PayloadError),
}

/// Why a bzImage's payload could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// A compression capsule has no decoder for.
    #[error("{0} compression is not supported")]
    Unsupported(&'static str),
    /// The decoder failed.
    #[error("{compression}: {source}")]
    Decode {
        /// The compression.
        compression: &'static str,
        /// What the decoder said.
        source: std::io::Error,
    },
    /// A block of an LZ4 stream is damaged.
    #[error("lz4: {0}")]
    Lz4(#[source] lz4_flex::block::DecompressError),
    /// The decompressed kernel is larger than capsule reads.
    #[error("lz4: the kernel is too large")]
    TooLarge,
    /// What came out is not an ELF file.
    #[error("the payload is not an ELF vmlinux")]
    NotElf,
}

/// Where a kernel's configuration was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Embedded in the image (`CONFIG_IKCONFIG`).
    Embedded,
    /// A file (beside the image, or in /boot).
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Embedded => f.write_str("embedded in the image (CONFIG_IKCONFIG)"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What is known about a kernel image.
#[derive(Debug, Default)]
pub struct KernelInfo {
    /// `uname -r` of the kernel, when the image says.
    pub release: Option<String>,
    /// Its configuration and where it came from, when found.
    pub config: Option<(Source, String)>,
    /// Places looked at without success, for the message when nothing is
    /// found; also why the embedded copy could not be read.
    pub tried: Vec<String>,
}

/// Reads `path` and finds its release and configuration.
pub fn inspect(path: &Path) -> Result<KernelInfo, Error> {
    let read_err = |e| Error::Read(path.to_path_buf(), e);
    let mut raw = Vec::new();
    // A FIFO or a device named as the kernel is refused, never waited on.
    crate::hostfile::open_regular(path)
        .map_err(read_err)?
        .take(MAX_IMAGE)
        .read_to_end(&mut raw)
        .map_err(read_err)?;
    let mut info = KernelInfo::default();
    let vmlinux = if raw.starts_with(b"\x7fELF") {
        Some(raw)
    } else if let Some(bz) = BzImage::parse(&raw) {
        info.release = bz.release();
        match bz.decompress() {
            Ok(v) => Some(v),
            Err(e) => {
                info.tried.push(format!("the embedded copy ({e})"));
                None
            }
        }
    } else {
        return Err(Error::NotAKernel(path.to_path_buf()));
    };
    if let Some(image) = vmlinux {
        if info.release.is_none() {
            info.release = banner_release(&image);
        }
        match embedded_config(&image) {
            Some(cfg) => {
                info.config = Some((Source::Embedded, cfg));
                return Ok(info);
            }
            None => info
                .tried
                .push("the embedded copy (built without CONFIG_IKCONFIG)".into()),
        }
    }
    let mut candidates = Vec::new();
    if let Some(dir) = path.parent() {
        candidates.push(dir.join("config"));
        candidates.push(dir.join(".config"));
    }
    if let Some(r) = &info.release {
        candidates.push(PathBuf::from(format!("/boot/config-{r}")));
    }
    for c in candidates {
        if let Some(text) = read_config_file(&c) {
            info.config = Some((Source::File(c), text));
            return Ok(info);
        }
        info.tried.push(c.display().to_string());
    }
    Ok(info)
}

/// The text of `path` if it is a readable kernel configuration file.
fn read_config_file(path: &Path) -> Option<String> {
    let mut text = String::new();
    crate::hostfile::open_regular(path)
        .ok()?
        .take(MAX_CONFIG)
        .read_to_string(&mut text)
        .ok()?;
    text.lines()
        .any(|l| l.starts_with("CONFIG_") || l.starts_with("# CONFIG_"))
        .then_some(text)
}

/// The gzipped configuration between the `IKCFG_ST`/`IKCFG_ED` markers,
/// decompressed. The start marker is also a string elsewhere in some
/// kernels, so each occurrence is tried until one is followed by gzip data.
pub fn embedded_config(image: &[u8]) -> Option<String> {
    let mut from = 0;
    while let Some(pos) = find(&image[from..], IKCFG_START) {
        let start = from + pos + IKCFG_START.len();
        from = start;
        let rest = &image[start..];
        if !rest.starts_with(&[0x1f, 0x8b]) {
            continue;
        }
        let end = find(rest, IKCFG_END).unwrap_or(rest.len());
        let mut text = String::new();
        let ok = flate2::read::GzDecoder::new(&rest[..end])
            .take(MAX_CONFIG)
            .read_to_string(&mut text)
            .is_ok();
        if ok && !text.is_empty() {
            return Some(text);
        }
    }
    None
}

/// The release from the `Linux version RELEASE (...)` banner in a vmlinux.
pub fn banner_release(image: &[u8]) -> Option<String> {
    let mut from = 0;
    while let Some(pos) = find(&image[from..], b"Linux version ") {
        let start = from + pos + b"Linux version ".len();
        from = start;
        let word: Vec<u8> = image[start..]
            .iter()
            .take_while(|b| b.is_ascii_graphic())
            .copied()
            .take(64)
            .collect();
        // The banner is a format string in some builds ("%s"); skip those.
        if word.first().is_some_and(u8::is_ascii_digit) {
            return String::from_utf8(word).ok();
        }
    }
    None
}

/// The first position of `needle` in `hay` (a kernel is tens of MiB:
/// candidates are found by their first byte before comparing).
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut at = 0;
    while let Some(p) = hay.get(at..)?.iter().position(|&b| b == first) {
        let start = at + p;
        if hay.get(start + 1..start + needle.len())? == rest {
            return Some(start);
        }
        at = start + 1;
    }
    None
}

/// The parts of a bzImage (Linux x86 boot protocol 2.08 or later) that
/// matter here.
pub struct BzImage<'a> {
    image: &'a [u8],
    payload: &'a [u8],
}

impl<'a> BzImage<'a> {
    /// The setup header's `HdrS` magic, boot protocol version and payload
    /// location, checked against the file's size.
    pub fn parse(image: &'a [u8]) -> Option<Self> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(image.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(image.get(o..o + 4)?.try_into().ok()?));
        if image.get(0x202..0x206)? != b"HdrS" || u16_at(0x206)? < 0x208 {
            return None;
        }
        let setup_sects = match *image.get(0x1f1)? {
            0 => 4,
            n => usize::from(n),
        };
        let pm_start = (setup_sects + 1) * 512;
        let offset = pm_start.checked_add(usize::try_from(u32_at(0x248)?).ok()?)?;
        let len = usize::try_from(u32_at(0x24c)?).ok()?;
        let payload = image.get(offset..offset.checked_add(len)?)?;
        Some(Self { image, payload })
    }

    /// The release from the header's kernel version string.
    pub fn release(&self) -> Option<String> {
        let ptr = u16::from_le_bytes(self.image.get(0x20e..0x210)?.try_into().ok()?);
        let start = usize::from(ptr) + 0x200;
        let word: Vec<u8> = self
            .image
            .get(start..)?
            .iter()
            .take_while(|b| b.is_ascii_graphic())
            .take(64)
            .copied()
            .collect();
        (!word.is_empty())
            .then(|| String::from_utf8(word).ok())
            .flatten()
    }

    /// The compression of the payload, by its magic number.
    pub fn compression(&self) -> &'static str {
        let p = self.payload;
        if p.starts_with(&[0x1f, 0x8b]) {
            "gzip"
        } else if p.starts_with(b"\xfd7zXZ\0") {
            "xz"
        } else if p.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            "zstd"
        } else if p.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
            "lz4"
        } else if p.starts_with(b"BZh") {
            "bzip2"
        } else if p.starts_with(&[0x5d, 0x00]) {
            "lzma"
        } else if p.starts_with(&[0x89, b'L', b'Z', b'O']) {
            "lzo"
        } else if p.starts_with(b"\x7fELF") {
            "none"
        } else {
            "unknown"
        }
    }

    /// The vmlinux inside: the payload decompressed.
    pub fn decompress(&self) -> Result<Vec<u8>, Error> {
        let p = self.payload;
        let mut out = Vec::new();
        let res = match self.compression() {
            "none" => {
                out.extend_from_slice(p);
                Ok(0)
            }
            "gzip" => flate2::read::GzDecoder::new(p)
                .take(MAX_IMAGE)
                .read_to_end(&mut out),
            "xz" => lzma_rust2::XzReader::new(p, false)
                .take(MAX_IMAGE)
                .read_to_end(&mut out),
            "zstd" => ruzstd::decoding::StreamingDecoder::new(p)
                .map_err(|e| PayloadError::Decode {
                    compression: "zstd",
                    source: std::io::Error::other(e),
                })?
                .take(MAX_IMAGE)
                .read_to_end(&mut out),
            "lz4" => return lz4_legacy(p),
            other => return Err(PayloadError::Unsupported(other).into()),
        };
        res.map_err(|source| PayloadError::Decode {
            compression: self.compression(),
            source,
        })?;
        if !out.starts_with(b"\x7fELF") {
            return Err(PayloadError::NotElf.into());
        }
        Ok(out)
    }
}

/// LZ4's legacy frame format, as the kernel writes it (`lz4 -l`): the
/// magic number, then blocks of a little-endian 32-bit compressed size
/// and the block, each at most 8 MiB decompressed. The kernel's build
/// appends the decompressed size after the last block; a "block size"
/// longer than what is left ends the stream, as in the kernel's own
/// decompressor.
pub fn lz4_legacy(mut p: &[u8]) -> Result<Vec<u8>, Error> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    let mut out = Vec::new();
    // One block's room, zeroed once: zeroing 8 MiB for every block made a
    // file of many empty blocks (5 bytes each) cost minutes.
    let mut block = Vec::new();
    while p.len() >= 4 {
        let n = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
        p = &p[4..];
        if n == MAGIC {
            continue;
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n == 0 || n > p.len() {
            break;
        }
        if block.is_empty() {
            block = vec![0u8; BLOCK_MAX];
        }
        let got =
            lz4_flex::block::decompress_into(&p[..n], &mut block).map_err(PayloadError::Lz4)?;
        out.extend_from_slice(&block[..got]);
        if out.len() as u64 > MAX_IMAGE {
            return Err(PayloadError::TooLarge.into());
        }
        p = &p[n..];
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(PayloadError::NotElf.into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn embedded_config_between_markers() {
        let cfg = "CONFIG_VIRTIO_MMIO=y\n# CONFIG_ACPI is not set\n";
        let mut image = b"\x7fELF junk IKCFG_ST is also a string here ".to_vec();
        image.extend(IKCFG_START);
        image.extend(gzip(cfg.as_bytes()));
        image.extend(IKCFG_END);
        image.extend(b"more");
        assert_eq!(embedded_config(&image).as_deref(), Some(cfg));
        assert_eq!(embedded_config(b"\x7fELF no config here"), None);
        // A marker followed by garbage that looks like gzip: no config.
        assert_eq!(embedded_config(b"IKCFG_ST\x1f\x8bxxxxIKCFG_ED"), None);
    }

    #[test]
    fn banner_skips_format_strings() {
        let image = b"Linux version %s (%s)\0Linux version 6.1.0-57-cloud-amd64 (x) #1";
        assert_eq!(
            banner_release(image).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        assert_eq!(banner_release(b"nothing"), None);
    }

    /// A bzImage-shaped file around `payload`: the header fields
    /// `BzImage::parse` reads, one setup sector.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 2 * 512];
        f[0x1f1] = 1;
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        f[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        f[0x300..0x309].copy_from_slice(b"6.9.0-foo");
        f[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend([0u8; 16]);
        f.extend(payload);
        f.extend(1234u32.to_le_bytes()); // the kernel build's size trailer
        f
    }

    #[test]
    fn lz4_legacy_blocks_and_trailer() {
        let mut vmlinux = b"\x7fELF".to_vec();
        vmlinux.extend((0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()));
        let mut payload = 0x184c_2102u32.to_le_bytes().to_vec();
        for chunk in vmlinux.chunks(60_000) {
            let block = lz4_flex::block::compress(chunk);
            payload.extend((block.len() as u32).to_le_bytes());
            payload.extend(block);
        }
        let file = fake_bzimage(&payload);
        let bz = BzImage::parse(&file).unwrap();
        assert_eq!(bz.compression(), "lz4");
        assert_eq!(bz.release().as_deref(), Some("6.9.0-foo"));
        assert_eq!(bz.decompress().unwrap(), vmlinux);
    }

    /// Empty blocks cost nothing. Each block used to zero an 8 MiB buffer
    /// first, so a small crafted file of many empty blocks (5 bytes each)
    /// kept `capsule doctor` busy: 2,900 of them (a 15 KB bzImage) took a
    /// second in the fuzz build, and this test's 20,000 did not finish in
    /// 300 s as a debug build.
    #[test]
    fn lz4_legacy_empty_blocks_are_cheap() {
        let mut payload = 0x184c_2102u32.to_le_bytes().to_vec();
        for _ in 0..20_000 {
            // A block of one token byte: no literals, no match.
            payload.extend(1u32.to_le_bytes());
            payload.push(0);
        }
        let block = lz4_flex::block::compress(b"\x7fELF after the empty blocks");
        payload.extend((block.len() as u32).to_le_bytes());
        payload.extend(block);
        let start = std::time::Instant::now();
        assert_eq!(
            lz4_legacy(&payload).unwrap(),
            b"\x7fELF after the empty blocks"
        );
        // Milliseconds now: the bound only has to tell the two apart.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn zstd_payload() {
        let vmlinux = b"\x7fELF and a kernel, compressed with zstd".repeat(100);
        let payload = ruzstd::encoding::compress_to_vec(
            &vmlinux[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let file = fake_bzimage(&payload);
        let bz = BzImage::parse(&file).unwrap();
        assert_eq!(bz.compression(), "zstd");
        assert_eq!(bz.decompress().unwrap(), vmlinux);
    }

    #[test]
    fn find_positions() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"abcab", b"abd"), None);
        assert_eq!(find(b"ab", b"abd"), None);
        assert_eq!(find(b"xxab", b"ab"), Some(2));
    }

    #[test]
    fn gzip_payload_and_unsupported_ones() {
        let file = fake_bzimage(&gzip(b"\x7fELF a kernel"));
        assert_eq!(
            BzImage::parse(&file).unwrap().decompress().unwrap(),
            b"\x7fELF a kernel"
        );
        let file = fake_bzimage(b"BZh9 whatever");
        let e = BzImage::parse(&file).unwrap().decompress().unwrap_err();
        assert!(e.to_string().contains("bzip2"), "{e}");
        // A payload that is not a vmlinux.
        let file = fake_bzimage(&gzip(b"not an elf"));
        assert!(BzImage::parse(&file).unwrap().decompress().is_err());
        // Header fields pointing past the end of the file.
        let mut file = fake_bzimage(b"x");
        file[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(BzImage::parse(&file).is_none());
        assert!(BzImage::parse(b"short").is_none());
    }
}
