//! The seeds of the fuzz targets (fuzz/, docs/FUZZING.md), made from real frames, tars,
//! references and bodies. Each seed is checked to read as what it stands for (frames decode,
//! tars unpack, references parse, bodies read), and every seed must be in the checked-in corpus
//! `fuzz/corpus/<target>/<sha256 prefix>`: a change of an encoding fails here until the corpus
//! is made again with
//!
//! ```text
//! SMOL_FUZZ_CORPUS=write cargo test --release -p smolmachines --test fuzz_corpus
//! ```
//!
//! (which adds the missing seeds; libFuzzer's own finds are never written to the corpus).

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use smol_protocol::codec::FrameCodec;
use smol_protocol::{
    Chan, ErrorKind, ExecRequest, Frame, Hello, Op, RemoteError, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use smolmachines::image::fuzzing::unpack_layers;
use smolmachines::image::ImageSource;
use tokio_util::codec::{Decoder, Encoder};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn hello(version: u16, session: Option<u64>) -> Frame {
    Frame::Hello(Hello {
        version,
        software: "0.1.0".into(),
        kernel: "6.1.0-smol".into(),
        uptime_ms: 812,
        min_version: MIN_PROTOCOL_VERSION,
        session,
    })
}

fn exec(argv: &[&str], stdin: bool) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        workdir: Some("/tmp".into()),
        timeout_ms: Some(5000),
        stdin,
        user: None,
    }
}

fn encode(generation: u16, frames: &[Frame]) -> Vec<u8> {
    let mut c = FrameCodec::new(generation);
    let mut b = BytesMut::new();
    for f in frames {
        c.encode(f.clone(), &mut b).expect("encode");
    }
    b.to_vec()
}

/// Decodes every frame of `bytes`; fails on an error or bytes left over.
fn decode_all(generation: u16, bytes: &[u8]) -> Vec<Frame> {
    let mut c = FrameCodec::new(generation);
    let mut b = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = c.decode(&mut b).expect("a seed decodes") {
        out.push(f);
    }
    assert!(b.is_empty(), "bytes left after the frames");
    out
}

fn data(id: u32, chan: Chan, bytes: &[u8]) -> Frame {
    Frame::Data {
        id,
        chan,
        data: Bytes::copy_from_slice(bytes),
    }
}

/// What a guest sends the host: its hello, answers for streams 1 (Ping) and 2 (ReadFile).
fn guest_sessions() -> Vec<(u16, Vec<Frame>)> {
    let g = PROTOCOL_VERSION;
    let err = |id| Frame::Error {
        id,
        error: RemoteError::new(ErrorKind::NotFound, "/f: no such file"),
    };
    vec![
        (g, vec![hello(g, Some(7)), Frame::Done { id: 1 }]),
        (
            g,
            vec![
                hello(g, Some(7)),
                Frame::Done { id: 1 },
                data(2, Chan::File, b"hello world\n"),
                Frame::Eof {
                    id: 2,
                    chan: Chan::File,
                },
                Frame::Done { id: 2 },
            ],
        ),
        (g, vec![hello(g, Some(7)), err(1), err(2)]),
        (
            g,
            vec![
                hello(g, Some(0)),
                hello(g, Some(7)),
                Frame::Credit { id: 2, bytes: 4096 },
                Frame::Exit {
                    id: 1,
                    code: 0,
                    timed_out: false,
                },
                Frame::Goodbye {
                    reason: "the agent restarted".into(),
                },
            ],
        ),
        (1, vec![hello(1, None), Frame::Done { id: 1 }]),
    ]
}

/// What a host sends the agent, with the generation the agent's session settled (0: none yet).
fn host_sessions() -> Vec<(u8, u16, Vec<Frame>)> {
    let g = PROTOCOL_VERSION;
    let pick = (g - MIN_PROTOCOL_VERSION + 1) as u8;
    vec![
        (
            0,
            g,
            vec![
                hello(g, Some(7)),
                Frame::Open {
                    id: 1,
                    op: Op::Ping,
                },
            ],
        ),
        (
            pick,
            g,
            vec![
                Frame::Open {
                    id: 1,
                    op: Op::Exec(exec(&["cat"], true)),
                },
                data(1, Chan::Stdin, b"input\n"),
                Frame::Eof {
                    id: 1,
                    chan: Chan::Stdin,
                },
                Frame::Credit {
                    id: 1,
                    bytes: 65536,
                },
            ],
        ),
        (
            pick,
            g,
            vec![
                Frame::Open {
                    id: 3,
                    op: Op::WriteFile {
                        path: "/tmp/f".into(),
                        mode: Some(0o644),
                    },
                },
                data(3, Chan::File, &[0u8; 300]),
                Frame::Eof {
                    id: 3,
                    chan: Chan::File,
                },
                Frame::Open {
                    id: 5,
                    op: Op::ReadFileStream {
                        path: "/etc/hostname".into(),
                    },
                },
                Frame::Cancel { id: 5 },
            ],
        ),
        (
            pick,
            g,
            vec![
                Frame::Open {
                    id: 2,
                    op: Op::Identity {
                        hostname: "clone-1".into(),
                        seed: vec![7; 32],
                    },
                },
                Frame::Open {
                    id: 4,
                    op: Op::Spawn {
                        exec: exec(&["sleep", "9"], false),
                        log: Some("/tmp/log".into()),
                    },
                },
                Frame::Open {
                    id: 6,
                    op: Op::Connect { port: 8080 },
                },
                hello(g, Some(8)),
            ],
        ),
        (
            pick,
            g,
            vec![
                Frame::Open {
                    id: 1,
                    op: Op::MountImage {
                        path: "/dev/vdb".into(),
                        fstype: "erofs".into(),
                        size: 1 << 20,
                        target: "/run/img".into(),
                    },
                },
                Frame::Open {
                    id: 2,
                    op: Op::ExecIn {
                        exec: exec(&["python3", "-V"], false),
                        rootfs: "/run/img".into(),
                    },
                },
                Frame::Goodbye {
                    reason: "host closing".into(),
                },
            ],
        ),
        (
            1,
            1,
            vec![Frame::Open {
                id: 1,
                op: Op::Exec(exec(&["uname", "-a"], false)),
            }],
        ),
    ]
}

enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(1_000_000);
        let (path, body): (&str, &[u8]) = match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                (p, b"")
            }
            E::File(p, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (p, d)
            }
            E::Sym(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name_literal(t).unwrap();
                (p, b"")
            }
            E::Hard(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name_literal(t).unwrap();
                (p, b"")
            }
        };
        h.set_size(body.len() as u64);
        h.set_path(path).unwrap();
        h.set_cksum();
        b.append(&h, body).unwrap();
    }
    b.into_inner().unwrap()
}

/// Layer sets (joined by the oci_unpack target's `--layer--` line).
fn layer_sets() -> Vec<Vec<Vec<u8>>> {
    use E::*;
    vec![
        vec![tar_of(&[
            Dir("etc"),
            File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            Sym("etc/localtime", "/usr/share/zoneinfo/UTC"),
            Hard("etc/passwd-", "etc/passwd"),
        ])],
        vec![
            tar_of(&[Dir("a"), File("a/x", b"x"), File("a/y", b"y"), Dir("b")]),
            tar_of(&[
                File("a/.wh.x", b""),
                File("b/.wh..wh..opq", b""),
                File("b/z", b"z"),
            ]),
        ],
        vec![
            tar_of(&[Dir("usr"), Dir("usr/lib"), Sym("lib", "usr/lib")]),
            tar_of(&[File("lib/libc.so", b"\x7fELF"), Sym("abs", "/usr")]),
            tar_of(&[
                File("abs/lib/x", b"through an absolute link"),
                File(".wh.lib", b""),
            ]),
        ],
        vec![tar_of(&[
            Sym("up", "../../.."),
            Dir("d"),
            File("d/f", b"f"),
        ])],
    ]
}

fn references() -> Vec<&'static str> {
    vec![
        "alpine",
        "python:3.12",
        "docker.io/library/alpine:latest",
        "127.0.0.1:5000/library/python:3.12-slim",
        "ghcr.io/o/r@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "localhost/app:v1",
        "registry.example.com:443/team/sub/app",
        "oci:/tmp/layout:v1",
        "docker-archive:/tmp/img.tar:repo:tag",
        "dir:/tmp/rootfs",
    ]
}

fn bodies() -> Vec<(u8, &'static str)> {
    vec![
        (0, r#"{"source":{"type":"image","reference":"alpine"}}"#),
        (
            0,
            r#"{"name":"web","source":{"type":"image","reference":"python:3.12"},"resources":{"cpus":2,"memoryMb":1024,"diskGb":10},"ports":[{"port":8080,"hostPort":18080}],"env":{"A":"1"},"labels":{"team":"x"},"workdir":"/app","command":["python3","-m","http.server"],"autoStopSeconds":300,"ttlSeconds":3600,"branchable":true}"#,
        ),
        (
            0,
            r#"{"source":{"type":"image","reference":"alpine"},"network":{"mode":"allowCidrs","cidrs":["10.0.0.0/8"],"hosts":["pypi.org"]},"resources":null,"ports":null}"#,
        ),
        (1, r#"{"command":["uname","-a"]}"#),
        (
            1,
            r#"{"command":"echo hi >&2","env":{"X":"y"},"cwd":"/tmp","timeoutSeconds":2.5,"stdin":"data","user":"nobody","background":false}"#,
        ),
        (2, r#"{"name":"clone-1","ports":[{"port":80}],"freezeSource":true}"#),
        (2, r#"{"name":"c","branchable":true,"forkable":false}"#),
        (3, r#"{"count":4,"namePrefix":"b"}"#),
        (3, r#"{"names":["a","b"],"ports":null}"#),
        (4, r#"{"ports":[{"port":8080,"hostPort":18080},{"port":22}]}"#),
        (
            5,
            r#"{"envVar":"TOKEN","hosts":["api.example.com"],"value":"s3cret"}"#,
        ),
        (
            6,
            "\x10event: stdout\ndata: {\"data\":\"aGk=\"}\n\nevent: exit\ndata: {\"exitCode\":0}\n\n",
        ),
    ]
}

/// Frames the egress filter reads (Ethernet + IPv4/IPv6 + TCP/UDP, DNS queries and answers),
/// each with its 14-byte Ethernet header.
fn egress_frames() -> Vec<Vec<u8>> {
    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![
            0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55, 0x52, 0x54, 0, 0x12, 0x34, 0x56,
        ];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, seg: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        h[2..4].copy_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(seg);
        eth(0x0800, &h)
    }
    fn v6(dst: [u8; 16], proto: u8, seg: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        h.extend_from_slice(&[proto, 64]);
        h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x15]);
        h.extend_from_slice(&dst);
        h.extend_from_slice(seg);
        eth(0x86dd, &h)
    }
    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut s = vec![0u8; 20];
        s[0..2].copy_from_slice(&sport.to_be_bytes());
        s[2..4].copy_from_slice(&dport.to_be_bytes());
        s[4..8].copy_from_slice(&1000u32.to_be_bytes());
        s[12] = 5 << 4;
        s[13] = flags;
        s
    }
    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut s = sport.to_be_bytes().to_vec();
        s.extend_from_slice(&dport.to_be_bytes());
        s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        s.extend_from_slice(&[0, 0]);
        s.extend_from_slice(payload);
        s
    }
    fn name(n: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for l in n.split('.') {
            out.push(l.len() as u8);
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
        out
    }
    let query = |n: &str| {
        let mut m = vec![0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend(name(n));
        m.extend_from_slice(&[0, 1, 0, 1]);
        m
    };
    let answer = |n: &str| {
        let mut m = vec![0xbe, 0xef, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        m.extend(name(n));
        m.extend_from_slice(&[0, 1, 0, 1]);
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 1, 2, 3]);
        m.extend_from_slice(&[0xc0, 12, 0, 28, 0, 1, 0, 0, 0, 30, 0, 16]);
        m.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        m
    };
    let (guest, dns) = ([10, 0, 2, 15], [10, 0, 2, 3]);
    let mut loopback6 = [0u8; 16];
    loopback6[15] = 1;
    vec![
        eth(0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]),
        v4(guest, [10, 1, 2, 3], 6, &tcp(40000, 443, 0x02)),
        v4(guest, [169, 254, 169, 254], 6, &tcp(40000, 80, 0x02)),
        v4(guest, [93, 184, 216, 34], 6, &tcp(40000, 443, 0x10)),
        v4(guest, [127, 0, 0, 1], 17, &udp(5000, 9001, b"x")),
        v4(guest, dns, 17, &udp(33333, 53, &query("www.example.com"))),
        v4(guest, dns, 17, &udp(33333, 53, &query("denied.test"))),
        v4(dns, guest, 17, &udp(53, 33333, &answer("www.example.com"))),
        v4(guest, dns, 6, &tcp(40000, 53, 0x02)),
        v6(loopback6, 6, &tcp(40000, 80, 0x02)),
        v6(
            [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            17,
            &udp(1, 2, b"q"),
        ),
    ]
}

/// Every seed, by target.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // the codec: each frame kind alone, then whole sessions, in their generation
    for (g, frames) in guest_sessions() {
        for f in &frames {
            out.push(("frame_codec", encode(g, std::slice::from_ref(f))));
        }
        out.push(("host_mux", encode(g, &frames)));
    }
    for (pick, g, frames) in host_sessions() {
        for f in &frames {
            out.push(("frame_codec", encode(g, std::slice::from_ref(f))));
        }
        let mut seed = vec![pick];
        seed.extend(encode(g, &frames));
        out.push(("agent_mux", seed));
    }
    for layers in layer_sets() {
        out.push(("oci_unpack", layers.join(&b"\n--layer--\n"[..])));
    }
    for r in references() {
        out.push(("image_reference", r.as_bytes().to_vec()));
    }
    for (pick, body) in bodies() {
        let mut seed = vec![pick];
        seed.extend_from_slice(body.as_bytes());
        out.push(("fleet_bodies", seed));
    }
    for f in egress_frames() {
        out.push(("egress_frame", f));
    }
    out
}

#[test]
fn seeds_read_as_what_they_stand_for() {
    for (g, frames) in guest_sessions() {
        assert_eq!(decode_all(g, &encode(g, &frames)), frames);
    }
    for (_, g, frames) in host_sessions() {
        assert_eq!(decode_all(g, &encode(g, &frames)), frames);
    }
    for layers in layer_sets() {
        let dir = tempfile::tempdir().unwrap();
        let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
        // the last set's link climbs out: kept as a link, never followed
        unpack_layers(dir.path(), &refs).unwrap_or_else(|e| panic!("{e}"));
    }
    let whiteouts = {
        let dir = tempfile::tempdir().unwrap();
        let sets = layer_sets();
        let refs: Vec<&[u8]> = sets[1].iter().map(Vec::as_slice).collect();
        unpack_layers(dir.path(), &refs).unwrap();
        (
            dir.path().join("a/x").exists(),
            dir.path().join("a/y").exists(),
            dir.path().join("b/z").exists(),
        )
    };
    assert_eq!(whiteouts, (false, true, true));
    for r in references() {
        ImageSource::parse(r).unwrap_or_else(|e| panic!("{r}: {e}"));
    }
    for (pick, body) in bodies() {
        let ok = match pick {
            0 => serde_json::from_str::<smolmachines::wire::CreateMachineBody>(body).is_ok(),
            1 => serde_json::from_str::<smolmachines::wire::CommandBody>(body).is_ok(),
            2 => serde_json::from_str::<smolmachines::wire::BranchBody>(body).is_ok(),
            3 => serde_json::from_str::<smolmachines::wire::BranchBatchBody>(body).is_ok(),
            4 => serde_json::from_str::<smolmachines::wire::SetPortsBody>(body).is_ok(),
            5 => serde_json::from_str::<smolmachines::wire::CredentialBody>(body).is_ok(),
            _ => {
                let events = smolmachines::wire::SseDecoder::new().push(&body.as_bytes()[1..]);
                events.len() == 2
            }
        };
        assert!(ok, "{pick}: {body}");
    }
    // each frame gets the filter's verdict (a reply it builds must read as a frame again)
    for f in egress_frames() {
        smolmachines::local::egress::fuzz_frame(&f);
    }
}

#[test]
fn the_checked_in_corpus_holds_every_seed() {
    let write = std::env::var("SMOL_FUZZ_CORPUS").as_deref() == Ok("write");
    let mut missing = Vec::new();
    for (target, seed) in seeds() {
        let name = format!("{:x}", Sha256::digest(&seed));
        let path = corpus_dir().join(target).join(&name[..16]);
        if path.is_file() {
            assert_eq!(std::fs::read(&path).unwrap(), seed, "{}", path.display());
            continue;
        }
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &seed).unwrap();
        } else {
            missing.push(format!("{target}/{}", &name[..16]));
        }
    }
    assert!(
        missing.is_empty(),
        "seeds missing from fuzz/corpus (SMOL_FUZZ_CORPUS=write makes them): {missing:?}"
    );
}
