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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_guest_msgs() -> Vec<GuestMsg> {
        vec![
            GuestMsg::Hello { version: VERSION },
            GuestMsg::Stdout(b"out\0\xff".to_vec()),
            GuestMsg::Stderr(vec![]),
            GuestMsg::Started,
            GuestMsg::Heartbeat,
            GuestMsg::Exit(137),
            GuestMsg::Error("no such file".into()),
            GuestMsg::File {
                share: 1,
                mode: 0o644,
                path: "a/b.txt".into(),
            },
            GuestMsg::FileData(vec![7; 1000]),
            GuestMsg::Dir {
                share: 0,
                mode: 0o755,
                path: "a".into(),
            },
        ]
    }

    #[test]
    fn round_trip_any_chunking() {
        let msgs = all_guest_msgs();
        let mut stream = Vec::new();
        for m in &msgs {
            m.encode(&mut stream);
        }
        for chunk in [1, 2, 3, 5, 7, 64, stream.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                d.push(c);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(GuestMsg::parse(f).unwrap());
                }
            }
            assert_eq!(got, msgs, "chunk size {chunk}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn host_messages_round_trip() {
        let msgs = vec![
            HostMsg::Time {
                secs: 1 << 40,
                nanos: 999_999_999,
            },
            HostMsg::Stdin(b"\x00\x01line\n".to_vec()),
            HostMsg::StdinEof,
            HostMsg::Spec(b"arg=true\0cwd=/\0".to_vec()),
            HostMsg::Signal(10),
            HostMsg::Signal(1),
            HostMsg::Signal(MAX_SIGNAL),
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            m.encode(&mut stream);
        }
        let mut d = Decoder::new();
        d.push(&stream);
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            got.push(HostMsg::parse(f).unwrap());
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn huge_length_is_rejected_before_buffering() {
        let mut d = Decoder::new();
        d.push(&[kind::STDOUT, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::TooLong { len: u32::MAX, .. })
        ));
        // The stream stays failed, and ignores further input.
        d.push(&[0; 100]);
        assert!(d.next_frame().is_err());
        let mut d = Decoder::new();
        let over = (MAX_PAYLOAD as u32 + 1).to_le_bytes();
        d.push(&[kind::STDOUT, over[0], over[1], over[2], over[3]]);
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut d = Decoder::new();
        d.push(&[kind::STDOUT, 4, 0]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[0, 0, b'a', b'b']);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(b"cd");
        assert_eq!(
            d.next_frame(),
            Ok(Some(Frame {
                kind: kind::STDOUT,
                payload: b"abcd".to_vec()
            }))
        );
    }

    #[test]
    fn bad_payloads_are_errors() {
        let f = |kind, payload: &[u8]| Frame {
            kind,
            payload: payload.to_vec(),
        };
        assert!(GuestMsg::parse(f(kind::HELLO, &[1, 0])).is_err());
        assert!(GuestMsg::parse(f(kind::EXIT, &[0, 1, 0, 0])).is_err()); // 256
        assert!(GuestMsg::parse(f(kind::EXIT, &[])).is_err());
        assert!(GuestMsg::parse(f(kind::STARTED, &[1])).is_err());
        assert!(GuestMsg::parse(f(kind::FILE, &[1, 0, 0])).is_err());
        assert!(GuestMsg::parse(f(kind::FILE, &[0, 0, 0, 0, 0, 0, 0, 0, 0xff])).is_err());
        assert!(GuestMsg::parse(f(kind::DIR, &[0; 7])).is_err());
        assert_eq!(
            GuestMsg::parse(f(0x7f, &[])),
            Err(DecodeError::UnknownKind(0x7f))
        );
        // Host kinds are not guest messages and vice versa.
        assert!(GuestMsg::parse(f(kind::STDIN, &[])).is_err());
        assert!(HostMsg::parse(f(kind::STDOUT, &[])).is_err());
        assert!(HostMsg::parse(f(kind::TIME, &[0; 11])).is_err());
        let mut t = [0u8; 12];
        t[8..].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        assert!(HostMsg::parse(f(kind::TIME, &t)).is_err());
        assert!(HostMsg::parse(f(kind::STDIN_EOF, &[0])).is_err());
    }

    #[test]
    fn long_streams_do_not_grow_the_buffer() {
        let mut d = Decoder::new();
        let mut frame = Vec::new();
        encode(kind::STDOUT, &[0xab; 4096], &mut frame);
        for _ in 0..1000 {
            d.push(&frame);
            assert!(d.next_frame().unwrap().is_some());
        }
        assert!(d.buf.capacity() < 64 * 1024);
    }
}
