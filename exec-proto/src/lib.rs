//! The byte protocol between `capsule exec` (host) and `capsule-init`
//! (the guest's PID 1), carried over the virtio-console port (`/dev/hvc0`).
//!
//! Every message is a frame: `[kind: u8][len: u32 little endian][payload]`.
//! The stream is ordered and lossless, so a frame's position says when it
//! happened: everything the command wrote before it exited arrives before
//! [`GuestMsg::Exit`].
//!
//! Guest → host (kinds below 0x80):
//!
//! | kind | message | payload |
//! | --- | --- | --- |
//! | 0x01 | `Hello` | protocol version, u32 |
//! | 0x02 | `Stdout` | bytes |
//! | 0x03 | `Stderr` | bytes |
//! | 0x04 | `Started` | empty: the command is about to be executed |
//! | 0x05 | `Heartbeat` | empty, about once a second |
//! | 0x06 | `Exit` | status, u32 (0..=255; 128+N for signal N) |
//! | 0x07 | `Error` | UTF-8 message: the init could not run the command |
//! | 0x08 | `File` | share u32, mode u32, path: starts a file copied back |
//! | 0x09 | `FileData` | bytes appended to the current file |
//! | 0x0a | `Dir` | share u32, mode u32, path: a directory copied back |
//! | 0x0b | `Oom` | kills u32: the guest kernel's OOM killer killed this many more processes |
//!
//! Host → guest (kinds from 0x80):
//!
//! | kind | message | payload |
//! | --- | --- | --- |
//! | 0x81 | `Time` | seconds u64, nanoseconds u32 since the Unix epoch |
//! | 0x82 | `Stdin` | bytes |
//! | 0x83 | `StdinEof` | empty |
//! | 0x84 | `Spec` | an [`ExecSpec`] (its [`ExecSpec::to_bytes`]): the command, for an init that awaits it |
//! | 0x85 | `Signal` | signal number, u32 (1..=64): deliver it to the command |
//! | 0x86 | `Resize` | rows u16, columns u16: the command's terminal size |
//!
//! Kinds were only ever added: an older peer rejects a new kind as
//! unknown, so a sender uses `Oom` and `Resize` only where the spec asked
//! for them (an events watch, a terminal).
//!
//! The decoder never trusts a length: a frame longer than [`MAX_PAYLOAD`]
//! or of an unknown kind is an error, and payloads are parsed with checked
//! slicing. (Errors are hand-written rather than derived with `thiserror`
//! so that this crate, which is built into the static guest init, has no
//! dependencies.)

#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        reason = "test fixtures cast small, known values"
    )
)]

use std::fmt;

mod signals;
mod spec;
pub use signals::*;
pub use spec::*;

/// Protocol version sent in [`GuestMsg::Hello`].
pub const VERSION: u32 = 1;
/// Largest payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Bytes of the frame header.
pub const HEADER_LEN: usize = 5;

/// Frame kinds.
pub mod kind {
    /// Guest → host: the init is up (payload: protocol version).
    pub const HELLO: u8 = 0x01;
    /// Guest → host: command standard output.
    pub const STDOUT: u8 = 0x02;
    /// Guest → host: command standard error.
    pub const STDERR: u8 = 0x03;
    /// Guest → host: the command is being started.
    pub const STARTED: u8 = 0x04;
    /// Guest → host: the guest is alive.
    pub const HEARTBEAT: u8 = 0x05;
    /// Guest → host: the command's exit status.
    pub const EXIT: u8 = 0x06;
    /// Guest → host: the init failed to set up or start the command.
    pub const ERROR: u8 = 0x07;
    /// Guest → host: a file of a writable share follows.
    pub const FILE: u8 = 0x08;
    /// Guest → host: data of the current file.
    pub const FILE_DATA: u8 = 0x09;
    /// Guest → host: a directory of a writable share.
    pub const DIR: u8 = 0x0a;
    /// Guest → host: the guest kernel's OOM killer killed processes.
    pub const OOM: u8 = 0x0b;
    /// Host → guest: the wall-clock time.
    pub const TIME: u8 = 0x81;
    /// Host → guest: standard input data.
    pub const STDIN: u8 = 0x82;
    /// Host → guest: end of standard input.
    pub const STDIN_EOF: u8 = 0x83;
    /// Host → guest: the command to run (an init started from an exec
    /// template awaits it).
    pub const SPEC: u8 = 0x84;
    /// Host → guest: a signal for the command.
    pub const SIGNAL: u8 = 0x85;
    /// Host → guest: the command's terminal has a new size.
    pub const RESIZE: u8 = 0x86;
}

/// The host (CID 2) vsock port the init connects to for the session.
pub const VSOCK_PORT: u32 = 10_000;
/// The guest vsock port the init listens on while the first command runs:
/// each connection runs one more process in the command's root (the
/// containerd shim's `exec`). The host connects, sends [`HostMsg::Spec`]
/// (argv, env, cwd), then `Stdin`/`StdinEof`/`Signal`; the init answers
/// `Started` (or `Error`), `Stdout`/`Stderr` and `Exit`, and closes.
pub const EXEC_VSOCK_PORT: u32 = 10_001;
/// On the guest's kernel command line: use the virtio console
/// (`/dev/hvc0`) for the session instead of vsock.
pub const CONSOLE_CHANNEL_ARG: &str = "capsule.channel=console";

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A frame announced more than [`MAX_PAYLOAD`] bytes.
    TooLong {
        /// Frame kind.
        kind: u8,
        /// Announced length.
        len: u32,
    },
    /// A frame kind this side does not accept.
    UnknownKind(u8),
    /// A payload that does not fit its kind.
    BadPayload {
        /// Frame kind.
        kind: u8,
        /// What is wrong.
        what: &'static str,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { kind, len } => write!(
                f,
                "frame of kind {kind:#04x} announces {len} bytes (at most {MAX_PAYLOAD})"
            ),
            Self::UnknownKind(k) => write!(f, "unknown frame kind {k:#04x}"),
            Self::BadPayload { kind, what } => {
                write!(f, "bad payload in frame of kind {kind:#04x}: {what}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Appends one frame to `out`. Payloads longer than [`MAX_PAYLOAD`] must
/// be split by the caller (this panics on them: a programming error).
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&header(kind, payload.len()));
    out.extend_from_slice(payload);
}

/// The header of a frame of `kind` with `len` payload bytes (for a sender
/// that writes the payload from where it is, after the header).
///
/// # Panics
///
/// If `len` is above [`MAX_PAYLOAD`].
pub fn header(kind: u8, len: usize) -> [u8; HEADER_LEN] {
    let len = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_PAYLOAD)
        .expect("frame payload too long");
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[1..].copy_from_slice(&len.to_le_bytes());
    h
}

/// A raw frame: kind and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind (see [`kind`]).
    pub kind: u8,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// Splits a byte stream into frames, however it is chunked.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    failed: Option<DecodeError>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After
    /// an error the stream is unusable and every later call fails the same.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let rest = &self.buf[self.pos..];
        let Some(header) = rest.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let kind = header[0];
        let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
        if len as usize > MAX_PAYLOAD {
            let e = DecodeError::TooLong { kind, len };
            self.failed = Some(e.clone());
            return Err(e);
        }
        let end = HEADER_LEN + len as usize;
        let Some(payload) = rest.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let frame = Frame {
            kind,
            payload: payload.to_vec(),
        };
        self.pos += end;
        Ok(Some(frame))
    }

    /// Marks the stream as broken (e.g. after a frame failed to parse).
    pub fn fail(&mut self, e: DecodeError) {
        self.failed = Some(e);
    }
}

/// A message from the guest init to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMsg {
    /// The init is running and the channel is up.
    Hello {
        /// The init's protocol version.
        version: u32,
    },
    /// Command standard output.
    Stdout(Vec<u8>),
    /// Command standard error.
    Stderr(Vec<u8>),
    /// The command is about to be executed.
    Started,
    /// The guest is alive.
    Heartbeat,
    /// The command ended with this status.
    Exit(u8),
    /// The init could not run the command.
    Error(String),
    /// A file of writable share `share` at `path` (relative to the share).
    File {
        /// Share index, in command-line order.
        share: u32,
        /// Permission bits.
        mode: u32,
        /// Path relative to the share's root.
        path: String,
    },
    /// Data appended to the last [`GuestMsg::File`].
    FileData(Vec<u8>),
    /// A directory of writable share `share`.
    Dir {
        /// Share index.
        share: u32,
        /// Permission bits.
        mode: u32,
        /// Path relative to the share's root.
        path: String,
    },
    /// The guest kernel's OOM killer killed this many processes since the
    /// last such message (sent on an events watch, [`ExecSpec::watch`]).
    Oom(u32),
}

fn bad(kind: u8, what: &'static str) -> DecodeError {
    DecodeError::BadPayload { kind, what }
}

fn u32_at(p: &[u8], at: usize, kind: u8) -> Result<u32, DecodeError> {
    p.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| bad(kind, "too short"))
}

fn exact_len(p: &[u8], len: usize, kind: u8) -> Result<(), DecodeError> {
    if p.len() == len {
        Ok(())
    } else {
        Err(bad(kind, "wrong length"))
    }
}

fn share_entry(p: &[u8], kind: u8) -> Result<(u32, u32, String), DecodeError> {
    let share = u32_at(p, 0, kind)?;
    let mode = u32_at(p, 4, kind)?;
    let path = String::from_utf8(p[8..].to_vec()).map_err(|_| bad(kind, "path is not UTF-8"))?;
    Ok((share, mode, path))
}

fn share_payload(share: u32, mode: u32, path: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + path.len());
    p.extend_from_slice(&share.to_le_bytes());
    p.extend_from_slice(&mode.to_le_bytes());
    p.extend_from_slice(path.as_bytes());
    p
}

impl GuestMsg {
    /// Parses a frame sent by the guest.
    pub fn parse(frame: Frame) -> Result<Self, DecodeError> {
        let Frame {
            kind: k,
            payload: p,
        } = frame;
        Ok(match k {
            kind::HELLO => {
                exact_len(&p, 4, k)?;
                Self::Hello {
                    version: u32_at(&p, 0, k)?,
                }
            }
            kind::STDOUT => Self::Stdout(p),
            kind::STDERR => Self::Stderr(p),
            kind::STARTED => {
                exact_len(&p, 0, k)?;
                Self::Started
            }
            kind::HEARTBEAT => {
                exact_len(&p, 0, k)?;
                Self::Heartbeat
            }
            kind::EXIT => {
                exact_len(&p, 4, k)?;
                let status = u32_at(&p, 0, k)?;
                Self::Exit(u8::try_from(status).map_err(|_| bad(k, "status above 255"))?)
            }
            kind::ERROR => Self::Error(String::from_utf8_lossy(&p).into_owned()),
            kind::FILE => {
                let (share, mode, path) = share_entry(&p, k)?;
                Self::File { share, mode, path }
            }
            kind::FILE_DATA => Self::FileData(p),
            kind::DIR => {
                let (share, mode, path) = share_entry(&p, k)?;
                Self::Dir { share, mode, path }
            }
            kind::OOM => {
                exact_len(&p, 4, k)?;
                Self::Oom(u32_at(&p, 0, k)?)
            }
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }

    /// Appends this message's frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Hello { version } => encode(kind::HELLO, &version.to_le_bytes(), out),
            Self::Stdout(d) => encode(kind::STDOUT, d, out),
            Self::Stderr(d) => encode(kind::STDERR, d, out),
            Self::Started => encode(kind::STARTED, &[], out),
            Self::Heartbeat => encode(kind::HEARTBEAT, &[], out),
            Self::Exit(s) => encode(kind::EXIT, &u32::from(*s).to_le_bytes(), out),
            Self::Error(m) => encode(kind::ERROR, m.as_bytes(), out),
            Self::File { share, mode, path } => {
                encode(kind::FILE, &share_payload(*share, *mode, path), out)
            }
            Self::FileData(d) => encode(kind::FILE_DATA, d, out),
            Self::Dir { share, mode, path } => {
                encode(kind::DIR, &share_payload(*share, *mode, path), out)
            }
            Self::Oom(n) => encode(kind::OOM, &n.to_le_bytes(), out),
        }
    }
}

/// A message from the host to the guest init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMsg {
    /// Wall-clock time since the Unix epoch.
    Time {
        /// Seconds.
        secs: u64,
        /// Nanoseconds (below 10^9).
        nanos: u32,
    },
    /// Standard input data.
    Stdin(Vec<u8>),
    /// End of standard input.
    StdinEof,
    /// The command to run, as [`ExecSpec::to_bytes`] wrote it: sent after
    /// [`HostMsg::Time`] to an init whose own spec says
    /// [`ExecSpec::await_command`] (a clone of an exec template).
    Spec(Vec<u8>),
    /// Deliver this signal (1..=[`MAX_SIGNAL`]) to the command.
    Signal(u8),
    /// The command's terminal ([`ExecSpec::tty`]) is now this size.
    Resize(WinSize),
}

impl HostMsg {
    /// Parses a frame sent by the host.
    pub fn parse(frame: Frame) -> Result<Self, DecodeError> {
        let Frame {
            kind: k,
            payload: p,
        } = frame;
        Ok(match k {
            kind::TIME => {
                exact_len(&p, 12, k)?;
                let lo = u32_at(&p, 0, k)?;
                let hi = u32_at(&p, 4, k)?;
                let nanos = u32_at(&p, 8, k)?;
                if nanos >= 1_000_000_000 {
                    return Err(bad(k, "nanoseconds out of range"));
                }
                Self::Time {
                    secs: u64::from(lo) | (u64::from(hi) << 32),
                    nanos,
                }
            }
            kind::STDIN => Self::Stdin(p),
            kind::STDIN_EOF => {
                exact_len(&p, 0, k)?;
                Self::StdinEof
            }
            kind::SPEC => Self::Spec(p),
            kind::SIGNAL => {
                exact_len(&p, 4, k)?;
                match u8::try_from(u32_at(&p, 0, k)?) {
                    Ok(sig @ 1..=MAX_SIGNAL) => Self::Signal(sig),
                    _ => return Err(bad(k, "signal number out of range")),
                }
            }
            kind::RESIZE => {
                exact_len(&p, 4, k)?;
                Self::Resize(WinSize {
                    rows: u16::from_le_bytes([p[0], p[1]]),
                    cols: u16::from_le_bytes([p[2], p[3]]),
                })
            }
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }

    /// Appends this message's frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Time { secs, nanos } => {
                let mut p = [0u8; 12];
                p[..8].copy_from_slice(&secs.to_le_bytes());
                p[8..].copy_from_slice(&nanos.to_le_bytes());
                encode(kind::TIME, &p, out);
            }
            Self::Stdin(d) => encode(kind::STDIN, d, out),
            Self::StdinEof => encode(kind::STDIN_EOF, &[], out),
            Self::Spec(d) => encode(kind::SPEC, d, out),
            Self::Signal(sig) => encode(kind::SIGNAL, &u32::from(*sig).to_le_bytes(), out),
            Self::Resize(ws) => {
                let mut p = [0u8; 4];
                p[..2].copy_from_slice(&ws.rows.to_le_bytes());
                p[2..].copy_from_slice(&ws.cols.to_le_bytes());
                encode(kind::RESIZE, &p, out);
            }
        }
    }
}

#[cfg(test)]
mod tests;
