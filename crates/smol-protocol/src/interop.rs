//! A generation-1 peer and a peer of this crate negotiate generation 1 and work end to end over
//! the real mux, on an in-memory duplex.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::mux::{Incoming, Mux, MuxConfig, OpenError, Stream};
use crate::*;

fn hello(speaks: Generations) -> Hello {
    Hello {
        version: speaks.max,
        software: "test".into(),
        kernel: String::new(),
        uptime_ms: 0,
        min_version: speaks.min,
        session: None,
    }
}

async fn next_hello(incoming: &mut mpsc::UnboundedReceiver<Incoming>) -> Hello {
    match tokio::time::timeout(Duration::from_secs(5), incoming.recv()).await {
        Ok(Some(Incoming::Hello(h))) => h,
        other => panic!("expected a hello, got {other:?}"),
    }
}

/// An agent of generation 1 on the real mux: echoes an exec's argv and stdin, keeps files in
/// memory.
async fn old_agent(mux: Mux, mut incoming: mpsc::UnboundedReceiver<Incoming>) {
    let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    while let Some(inc) = incoming.recv().await {
        let Incoming::Open(stream, op) = inc else {
            continue;
        };
        tokio::spawn(serve_one(stream, op, files.clone()));
    }
    drop(mux);
}

async fn serve_one(mut s: Stream, op: Op, files: Arc<Mutex<HashMap<String, Vec<u8>>>>) {
    let id = s.id();
    let mut input = Vec::new();
    let end = match op {
        Op::Exec(req) => {
            assert_eq!(req.user, None, "generation 1 has no users");
            if req.stdin {
                read_until_eof(&mut s, &mut input).await;
            }
            let mut out = req.argv.join(" ").into_bytes();
            out.extend_from_slice(&input);
            s.tx.send_data(Chan::Stdout, &out).await.unwrap();
            Frame::Exit {
                id,
                code: 3,
                timed_out: false,
            }
        }
        Op::WriteFile { path, .. } => {
            read_until_eof(&mut s, &mut input).await;
            files.lock().unwrap().insert(path, input);
            Frame::Done { id }
        }
        Op::ReadFile { path } => {
            let data = files.lock().unwrap().get(&path).cloned();
            match data {
                Some(d) => {
                    s.tx.send_data(Chan::File, &d).await.unwrap();
                    Frame::Done { id }
                }
                None => Frame::Error {
                    id,
                    error: RemoteError::new(ErrorKind::NotFound, path),
                },
            }
        }
        Op::Ping => Frame::Done { id },
        other => panic!("a generation-1 agent got {other:?}"),
    };
    s.tx.send(end).unwrap();
}

async fn read_until_eof(s: &mut Stream, into: &mut Vec<u8>) {
    loop {
        match s.rx.recv().await.unwrap() {
            Frame::Data { data, .. } => into.extend_from_slice(&data),
            Frame::Eof { .. } => return,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn finish(s: &mut Stream) -> (Vec<u8>, Frame) {
    let mut out = Vec::new();
    loop {
        match s.rx.recv().await.unwrap() {
            Frame::Data { data, .. } => out.extend_from_slice(&data),
            f if f.is_terminal() => return (out, f),
            _ => {}
        }
    }
}

/// The host speaks 1..=2, the agent only 1: both settle on 1, exec and file operations work,
/// and what generation 1 lacks is refused on the host, by name, before anything is sent.
#[tokio::test]
async fn a_generation_1_agent_and_todays_host_speak_generation_1() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let old = Generations::only(1);
    let (agent, mut agent_in) = Mux::spawn_with(
        ar,
        aw,
        MuxConfig {
            speaks: old,
            peer_hello: None,
        },
    );
    let (host, mut host_in) = Mux::spawn(br, bw);
    host.send_hello(hello(Generations::CURRENT)).unwrap();
    agent.send_hello(hello(old)).unwrap();
    let agent_saw = next_hello(&mut agent_in).await;
    assert_eq!(agent_saw.speaks(), Generations::CURRENT);
    assert_eq!(agent.negotiated(), Some(Ok(1)));
    let host_saw = next_hello(&mut host_in).await;
    assert_eq!(host_saw.speaks(), old);
    assert_eq!(host.negotiated(), Some(Ok(1)));
    assert_eq!(host.generation(), 1);
    tokio::spawn(old_agent(agent, agent_in));

    // exec with stdin
    let mut s = host
        .open(Op::Exec(ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            env: vec![],
            workdir: None,
            timeout_ms: Some(1000),
            stdin: true,
            user: None,
        }))
        .unwrap();
    s.tx.send_data(Chan::Stdin, b" and stdin").await.unwrap();
    s.tx.send_eof(Chan::Stdin).unwrap();
    let (out, end) = finish(&mut s).await;
    assert_eq!(out, b"echo hi and stdin");
    assert!(matches!(end, Frame::Exit { code: 3, .. }), "{end:?}");

    // a file, written and read back byte for byte (more than a chunk)
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
    let mut w = host
        .open(Op::WriteFile {
            path: "/f".into(),
            mode: None,
        })
        .unwrap();
    w.tx.send_data(Chan::File, &data).await.unwrap();
    w.tx.send_eof(Chan::File).unwrap();
    assert!(matches!(finish(&mut w).await.1, Frame::Done { .. }));
    let mut r = host.open(Op::ReadFile { path: "/f".into() }).unwrap();
    let (back, end) = finish(&mut r).await;
    assert!(matches!(end, Frame::Done { .. }), "{end:?}");
    assert_eq!(back, data);

    // generation 2's operations and fields are refused here, by name
    let refused = [
        Op::Exec(ExecRequest {
            argv: vec!["id".into()],
            env: vec![],
            workdir: None,
            timeout_ms: None,
            stdin: false,
            user: Some("nobody".into()),
        }),
        Op::MountImage {
            path: "/i".into(),
            fstype: "erofs".into(),
            size: 1,
            target: "/m".into(),
        },
    ];
    let open = host.open_streams();
    for op in refused {
        match host.open(op) {
            Err(OpenError::NotInGeneration(n)) => {
                assert_eq!((n.needs, n.generation), (2, 1));
                assert!(n.to_string().contains("needs protocol generation 2"), "{n}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(host.open_streams(), open);
    // the agent got none of them (it panics on any op it does not know): the next works
    let mut p = host.open(Op::Ping).unwrap();
    assert!(matches!(finish(&mut p).await.1, Frame::Done { .. }));
}

/// A generation-1 agent written as bytes only (the frozen generation-1 encoding, nothing of
/// this crate): the host's exec reaches it as exactly the bytes generation 1 wrote, and its
/// answers decode.
#[tokio::test]
async fn the_host_writes_generation_1_bytes_for_a_generation_1_agent() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (br, bw) = tokio::io::split(b);
    let (host, mut host_in) = Mux::spawn(br, bw);
    let mut old = Framed::new(a, LengthDelimitedCodec::new());
    let raw = |hex: &str| -> Bytes {
        let mut b = BytesMut::new();
        for i in (0..hex.len()).step_by(2) {
            b.put_u8(u8::from_str_radix(&hex[i..i + 2], 16).unwrap());
        }
        b.freeze()
    };
    // the old agent's hello: version 1, software "x", kernel "k", uptime 300
    old.send(raw("00010178016bac02")).await.unwrap();
    let h = next_hello(&mut host_in).await;
    assert_eq!(h.speaks(), Generations::only(1));
    assert_eq!(host.negotiated(), Some(Ok(1)));

    let mut s = host
        .open(Op::Exec(ExecRequest {
            argv: vec!["ls".into()],
            env: vec![("A".into(), "b".into())],
            workdir: Some("/".into()),
            timeout_ms: Some(5),
            stdin: true,
            user: None,
        }))
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .expect("nothing reached the old agent")
        .unwrap()
        .unwrap();
    assert_eq!(got, raw("01010001026c73010141016201012f010501"));
    // its answers: Data(stdout) [0, 255] and Exit{-1, timed out} of stream 1
    old.send(raw("0201010200ff")).await.unwrap();
    old.send(raw("06010101")).await.unwrap();
    let (out, end) = finish(&mut s).await;
    assert_eq!(out, [0, 255]);
    assert_eq!(
        end,
        Frame::Exit {
            id: 1,
            code: -1,
            timed_out: true
        }
    );
}

/// An agent newer than the host that cannot go down, and one older than the oldest the host
/// still speaks: both sides see the mismatch, naming both ranges.
#[tokio::test]
async fn no_common_generation_is_a_typed_mismatch_on_both_sides() {
    let newer = Generations::new(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2);
    for (host_speaks, agent_speaks, expect_old) in [
        (Generations::CURRENT, newer, false),
        (Generations::new(2, 3), Generations::only(1), true),
    ] {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (agent, mut agent_in) = Mux::spawn_with(
            ar,
            aw,
            MuxConfig {
                speaks: agent_speaks,
                peer_hello: None,
            },
        );
        let (host, mut host_in) = Mux::spawn_with(
            br,
            bw,
            MuxConfig {
                speaks: host_speaks,
                peer_hello: None,
            },
        );
        host.send_hello(hello(host_speaks)).unwrap();
        agent.send_hello(hello(agent_speaks)).unwrap();
        next_hello(&mut host_in).await;
        next_hello(&mut agent_in).await;
        match host.negotiated() {
            Some(Err(VersionMismatch::PeerTooOld { peer, ours })) if expect_old => {
                assert_eq!((peer, ours), (agent_speaks, host_speaks))
            }
            Some(Err(VersionMismatch::PeerTooNew { peer, ours })) if !expect_old => {
                assert_eq!((peer, ours), (agent_speaks, host_speaks))
            }
            other => panic!("{agent_speaks:?}: {other:?}"),
        }
        assert!(matches!(agent.negotiated(), Some(Err(_))));
    }
}
