//! One frozen snapshot per protocol generation: the bytes of every frame kind exactly as that
//! generation's peers write them. An old agent's bytes must decode to the same frames, and
//! what this crate writes for a peer of that generation must be those bytes.
//!
//! If a snapshot fails, the wire format of a released generation changed: that is never right.
//! A new field or variant goes into a new generation (bump [`PROTOCOL_VERSION`], add its
//! snapshot here, keep the old ones). See `VERSIONING.md`.

use serde::Deserialize;

use crate::codec::{CodecError, FrameCodec};
use crate::generation::{decode, encode};
use crate::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn exec(user: Option<&str>) -> ExecRequest {
    ExecRequest {
        argv: vec!["ls".into()],
        env: vec![("A".into(), "b".into())],
        workdir: Some("/".into()),
        timeout_ms: Some(5),
        stdin: true,
        user: user.map(str::to_string),
    }
}

fn bare(argv0: &str) -> ExecRequest {
    ExecRequest {
        argv: vec![argv0.into()],
        env: vec![],
        workdir: None,
        timeout_ms: None,
        stdin: false,
        user: None,
    }
}

/// The hello of both snapshots, as their peers wrote it (no `min_version`).
fn hello() -> Frame {
    Frame::Hello(Hello {
        version: 1,
        software: "x".into(),
        kernel: "k".into(),
        uptime_ms: 300,
        min_version: 1,
        session: None,
    })
}

/// Every frame of generation 1 (commit da92c19, the last one of generation 1) and its bytes.
fn generation_1() -> Vec<(Frame, &'static str)> {
    vec![
        (hello(), "00010178016bac02"),
        (
            Frame::Open {
                id: 1,
                op: Op::Exec(exec(None)),
            },
            "01010001026c73010141016201012f010501",
        ),
        (
            Frame::Open {
                id: 2,
                op: Op::WriteFile {
                    path: "/f".into(),
                    mode: Some(0o755),
                },
            },
            "010201022f6601ed03",
        ),
        (
            Frame::Open {
                id: 3,
                op: Op::ReadFile { path: "/f".into() },
            },
            "010302022f66",
        ),
        (
            Frame::Open {
                id: 4,
                op: Op::Ping,
            },
            "010403",
        ),
        (
            Frame::Open {
                id: 5,
                op: Op::Shutdown,
            },
            "010504",
        ),
        (
            Frame::Open {
                id: 6,
                op: Op::Connect { port: 8080 },
            },
            "010605903f",
        ),
        (
            Frame::Data {
                id: 1,
                chan: Chan::Stdout,
                data: bytes::Bytes::from_static(&[0, 255]),
            },
            "0201010200ff",
        ),
        (
            Frame::Eof {
                id: 1,
                chan: Chan::Stdin,
            },
            "030100",
        ),
        (Frame::Credit { id: 1, bytes: 128 }, "04018001"),
        (Frame::Cancel { id: 1 }, "0501"),
        (
            Frame::Exit {
                id: 1,
                code: -1,
                timed_out: true,
            },
            "06010101",
        ),
        (Frame::Done { id: 2 }, "0702"),
        (
            Frame::Error {
                id: 3,
                error: RemoteError::new(ErrorKind::NoSpace, "m"),
            },
            "080305016d",
        ),
    ]
}

/// Every frame of generation 2 (generation 1 plus `ExecRequest.user`, `MountImage`, `ExecIn`,
/// `Spawn` and `Goodbye`) and its bytes.
fn generation_2() -> Vec<(Frame, &'static str)> {
    vec![
        (hello(), "00010178016bac02"),
        (
            Frame::Open {
                id: 1,
                op: Op::Exec(exec(Some("u"))),
            },
            "01010001026c73010141016201012f010501010175",
        ),
        (
            Frame::Open {
                id: 2,
                op: Op::WriteFile {
                    path: "/f".into(),
                    mode: Some(0o755),
                },
            },
            "010201022f6601ed03",
        ),
        (
            Frame::Open {
                id: 3,
                op: Op::ReadFile { path: "/f".into() },
            },
            "010302022f66",
        ),
        (
            Frame::Open {
                id: 4,
                op: Op::Ping,
            },
            "010403",
        ),
        (
            Frame::Open {
                id: 5,
                op: Op::Shutdown,
            },
            "010504",
        ),
        (
            Frame::Open {
                id: 6,
                op: Op::Connect { port: 8080 },
            },
            "010605903f",
        ),
        (
            Frame::Open {
                id: 7,
                op: Op::MountImage {
                    path: "/i".into(),
                    fstype: "erofs".into(),
                    size: 4096,
                    target: "/m".into(),
                },
            },
            "010706022f690565726f66738020022f6d",
        ),
        (
            Frame::Open {
                id: 8,
                op: Op::ExecIn {
                    exec: bare("ls"),
                    rootfs: "/m".into(),
                },
            },
            "01080701026c730000000000022f6d",
        ),
        (
            Frame::Open {
                id: 9,
                op: Op::Spawn {
                    exec: bare("ls"),
                    log: Some("/l".into()),
                },
            },
            "01090801026c73000000000001022f6c",
        ),
        (
            Frame::Data {
                id: 1,
                chan: Chan::Stdout,
                data: bytes::Bytes::from_static(&[0, 255]),
            },
            "0201010200ff",
        ),
        (
            Frame::Eof {
                id: 1,
                chan: Chan::Stdin,
            },
            "030100",
        ),
        (Frame::Credit { id: 1, bytes: 128 }, "04018001"),
        (Frame::Cancel { id: 1 }, "0501"),
        (
            Frame::Exit {
                id: 1,
                code: -1,
                timed_out: true,
            },
            "06010101",
        ),
        (Frame::Done { id: 2 }, "0702"),
        (
            Frame::Error {
                id: 3,
                error: RemoteError::new(ErrorKind::NoSpace, "m"),
            },
            "080305016d",
        ),
        (Frame::Goodbye { reason: "r".into() }, "090172"),
    ]
}

/// Every frame of generation 3 (generation 2 plus `ReadFileStream`) and its bytes.
fn generation_3() -> Vec<(Frame, &'static str)> {
    let mut frames = generation_2();
    frames.push((
        Frame::Open {
            id: 10,
            op: Op::ReadFileStream { path: "/f".into() },
        },
        "010a09022f66",
    ));
    frames
}

/// Every frame of generation 4 (generation 3 plus `Identity`) and its bytes.
fn generation_4() -> Vec<(Frame, &'static str)> {
    let mut frames = generation_3();
    frames.push((
        Frame::Open {
            id: 11,
            op: Op::Identity {
                hostname: "h".into(),
                seed: vec![1, 2],
            },
        },
        "010b0a0168020102",
    ));
    frames
}

/// Checks one generation's snapshot in both directions, through the codec as a mux uses it.
fn check(generation: u16, snapshot: Vec<(Frame, &'static str)>) {
    use tokio_util::codec::{Decoder, Encoder};
    for (frame, bytes) in snapshot {
        // the peer's bytes decode to the frame ...
        let back = decode(&unhex(bytes), generation).unwrap();
        assert_eq!(back, frame, "generation {generation}: {bytes} decodes");
        // ... and the frame is written as those bytes (a hello carries `min_version` and
        // `session`, here `01` and `00` (none), after them, which the generation's peers skip:
        // `old_peers_read_todays_hello`)
        let ours = hex(&encode(frame.clone(), generation).unwrap());
        if matches!(frame, Frame::Hello(_)) {
            assert_eq!(
                ours,
                format!("{bytes}0100"),
                "generation {generation}: hello"
            );
        } else {
            assert_eq!(ours, bytes, "generation {generation}: {frame:?}");
        }
        // the same through the codec, with its length prefix
        let mut wire = bytes::BytesMut::new();
        let mut codec = FrameCodec::new(generation);
        codec.encode(frame.clone(), &mut wire).unwrap();
        assert_eq!(
            u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize,
            wire.len() - 4
        );
        assert_eq!(codec.decode(&mut wire).unwrap(), Some(frame));
    }
}

#[test]
fn wire_snapshot_generation_1() {
    assert_eq!(
        MIN_PROTOCOL_VERSION, 1,
        "generation 1 dropped: say so in VERSIONING.md"
    );
    check(1, generation_1());
}

#[test]
fn wire_snapshot_generation_2() {
    check(2, generation_2());
}

#[test]
fn wire_snapshot_generation_3() {
    check(3, generation_3());
}

#[test]
fn wire_snapshot_generation_4() {
    assert_eq!(PROTOCOL_VERSION, 4, "a new generation: add its snapshot");
    check(4, generation_4());
}

/// What generation 4 added is refused for a generation-3 peer (never sent), by name.
#[test]
fn generation_4_frames_are_refused_for_generation_3() {
    let refused: Vec<&str> = generation_4()
        .into_iter()
        .filter_map(|(frame, _)| match encode(frame, 3) {
            Ok(_) => None,
            Err(CodecError::NotInGeneration(n)) => {
                assert_eq!((n.needs, n.generation), (4, 3));
                Some(n.feature)
            }
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(refused, ["Identity (hostname and RNG reseed of a clone)"]);
}

/// What generation 3 added is refused for a generation-2 peer (never sent), by name.
#[test]
fn generation_3_frames_are_refused_for_generation_2() {
    let refused: Vec<&str> = generation_3()
        .into_iter()
        .filter_map(|(frame, _)| match encode(frame, 2) {
            Ok(_) => None,
            Err(CodecError::NotInGeneration(n)) => {
                assert_eq!((n.needs, n.generation), (3, 2));
                Some(n.feature)
            }
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(refused, ["ReadFileStream (streaming file reads)"]);
}

/// What generation 2 added is refused for a generation-1 peer (never sent), by name.
#[test]
fn generation_2_frames_are_refused_for_generation_1() {
    let refused: Vec<&str> = generation_2()
        .into_iter()
        .filter_map(|(frame, _)| match encode(frame, 1) {
            Ok(_) => None,
            Err(CodecError::NotInGeneration(n)) => {
                assert_eq!((n.needs, n.generation), (2, 1));
                Some(n.feature)
            }
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(
        refused,
        [
            "Exec with a user (ExecRequest.user)",
            "MountImage (container images)",
            "ExecIn (containers)",
            "Spawn (background commands)",
            "Goodbye",
        ]
    );
}

/// A generation-1 peer reads a hello as this crate writes it today: with its own types, the
/// way its codec did (`postcard::from_bytes`, which leaves the appended `min_version` unread).
#[test]
fn old_peers_read_todays_hello() {
    #[derive(Debug, Deserialize, PartialEq)]
    struct OldHello {
        version: u16,
        software: String,
        kernel: String,
        uptime_ms: u64,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    enum OldFrame {
        Hello(OldHello),
    }
    let today = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        software: "0.1.0".into(),
        kernel: String::new(),
        uptime_ms: 0,
        min_version: MIN_PROTOCOL_VERSION,
        session: Some(0x1234_5678_9abc_def0),
    });
    let bytes = encode(today.clone(), PROTOCOL_VERSION).unwrap();
    let old: OldFrame = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(
        old,
        OldFrame::Hello(OldHello {
            version: PROTOCOL_VERSION,
            software: "0.1.0".into(),
            kernel: String::new(),
            uptime_ms: 0,
        })
    );
    // and today's decoder reads the range back
    assert_eq!(decode(&bytes, 1).unwrap(), today);
}
