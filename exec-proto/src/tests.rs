//! The frame codec's tests: every message round-trips, however the
//! stream is cut; malformed frames are errors.

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
        GuestMsg::Oom(1),
        GuestMsg::Oom(u32::MAX),
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
        HostMsg::Resize(WinSize { rows: 24, cols: 80 }),
        HostMsg::Resize(WinSize {
            rows: u16::MAX,
            cols: 0,
        }),
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
    assert!(HostMsg::parse(f(kind::RESIZE, &[24, 0, 80])).is_err());
    assert!(HostMsg::parse(f(kind::RESIZE, &[0; 5])).is_err());
    assert!(GuestMsg::parse(f(kind::OOM, &[1, 0])).is_err());
    assert!(GuestMsg::parse(f(kind::RESIZE, &[0; 4])).is_err());
    assert!(HostMsg::parse(f(kind::OOM, &[0; 4])).is_err());
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
