//! The host side of the hello against agents of other protocol generations: each fake agent is
//! the real mux of `smol-protocol` limited to the generations an agent of that age spoke,
//! connecting to the host's socket the way QEMU does.

use std::time::Duration;

use smol_protocol::mux::{Incoming, Mux, MuxConfig};
use smol_protocol::{ExecRequest, Frame, Generations, Hello, Op, PROTOCOL_VERSION};
use tokio::net::{UnixListener, UnixStream};

use super::{AgentConn, AgentError, ConnectError};

const DEADLINE: Duration = Duration::from_secs(10);

fn listener() -> (tempfile::TempDir, UnixListener, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, listener, path)
}

/// An agent speaking `speaks`: says hello unasked, answers `Exec` with its argv on stdout and
/// exit 0, `Ping` with `Done`.
async fn fake_agent(path: std::path::PathBuf, speaks: Generations) {
    let sock = UnixStream::connect(&path).await.unwrap();
    let (r, w) = sock.into_split();
    let (mux, mut incoming) = Mux::spawn_with(
        r,
        w,
        MuxConfig {
            speaks,
            peer_hello: None,
        },
    );
    mux.send_hello(Hello {
        version: speaks.max,
        software: "old-agent".into(),
        kernel: "6.1".into(),
        uptime_ms: 1,
        min_version: speaks.min,
        session: None,
    })
    .unwrap();
    while let Some(inc) = incoming.recv().await {
        let Incoming::Open(s, op) = inc else { continue };
        let id = s.id();
        match op {
            Op::Exec(req) => {
                s.tx.send_data(smol_protocol::Chan::Stdout, req.argv.join(" ").as_bytes())
                    .await
                    .unwrap();
                s.tx.send(Frame::Exit {
                    id,
                    code: 0,
                    timed_out: false,
                })
                .unwrap();
            }
            Op::Ping => s.tx.send(Frame::Done { id }).unwrap(),
            other => panic!("the agent got {other:?}, which its generation does not have"),
        }
    }
}

fn req(user: Option<&str>) -> ExecRequest {
    ExecRequest {
        argv: vec!["echo".into(), "ok".into()],
        env: vec![],
        workdir: None,
        timeout_ms: None,
        stdin: false,
        user: user.map(str::to_string),
    }
}

/// A generation-1 agent (the protocol before containers, users and background commands): the
/// host speaks generation 1 with it, runs commands, and refuses what generation 1 lacks with
/// a typed error naming the operation and the agent's generation.
#[tokio::test]
async fn a_generation_1_agent_is_accepted_and_spoken_to_in_generation_1() {
    let (_dir, listener, path) = listener();
    tokio::spawn(fake_agent(path, Generations::only(1)));
    let conn = AgentConn::accept(&listener, DEADLINE).await.unwrap();
    assert_eq!(conn.generation(), 1);
    assert_eq!(conn.hello.software, "old-agent");

    let r = conn.exec(req(None), None).await.unwrap();
    let (code, out) = (r.code, r.stdout);
    assert_eq!((code, out.as_slice()), (0, &b"echo ok"[..]));
    conn.ping().await.unwrap();

    let e = conn.exec(req(Some("nobody")), None).await.unwrap_err();
    let AgentError::NotSupported(n) = &e else {
        panic!("{e:?}")
    };
    assert_eq!((n.needs, n.generation), (2, 1));
    let msg = e.to_string();
    assert!(msg.contains("ExecRequest.user"), "{msg}");
    assert!(msg.contains("protocol generation 1"), "{msg}");
    assert!(msg.contains("make setup"), "{msg}");

    let e = conn.mount_image("/i", "erofs", 1, "/m").await.unwrap_err();
    assert!(
        matches!(&e, AgentError::NotSupported(n) if n.feature.starts_with("MountImage")),
        "{e:?}"
    );
    for op in [
        Op::ExecIn {
            exec: req(None),
            rootfs: "/m".into(),
        },
        Op::Spawn {
            exec: req(None),
            log: None,
        },
    ] {
        let e = conn.exec_op(op, None).await.unwrap_err();
        assert!(matches!(e, AgentError::NotSupported(_)), "{e:?}");
    }
    // nothing of that reached the agent (it panics on them): the connection still works
    conn.ping().await.unwrap();
}

/// An agent of today's generation: generation 2, everything allowed.
#[tokio::test]
async fn a_current_agent_speaks_the_newest_generation() {
    let (_dir, listener, path) = listener();
    tokio::spawn(fake_agent(path, Generations::CURRENT));
    let conn = AgentConn::accept(&listener, DEADLINE).await.unwrap();
    assert_eq!(conn.generation(), PROTOCOL_VERSION);
    let r = conn.exec(req(Some("root")), None).await.unwrap();
    let (code, out) = (r.code, r.stdout);
    assert_eq!((code, out.as_slice()), (0, &b"echo ok"[..]));
}

/// An agent newer than this host that cannot go down: refused at the hello, naming both
/// sides' generations and what to do.
#[tokio::test]
async fn a_newer_agent_that_cannot_go_down_is_refused() {
    let (_dir, listener, path) = listener();
    let newer = Generations::new(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1);
    tokio::spawn(fake_agent(path, newer));
    let e = AgentConn::accept(&listener, DEADLINE).await.unwrap_err();
    let ConnectError::AgentTooNew { agent, host } = &e else {
        panic!("{e:?}")
    };
    assert_eq!((*agent, *host), (newer, Generations::CURRENT));
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("protocol generation {}", PROTOCOL_VERSION + 1)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("cannot go down to {PROTOCOL_VERSION}")),
        "{msg}"
    );
    assert!(msg.contains("make setup"), "{msg}");
}

/// An agent older than the oldest generation the host speaks (a generation 0 that never
/// existed, written as raw bytes: the hello of generation 1 with version 0).
#[tokio::test]
async fn an_agent_older_than_the_oldest_generation_is_refused() {
    let (_dir, listener, path) = listener();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = UnixStream::connect(&path).await.unwrap();
        // length prefix, then the hello: version 0, software "x", kernel "k", uptime 300
        let frame = [0, 0, 0, 8, 0x00, 0x00, 0x01, 0x78, 0x01, 0x6b, 0xac, 0x02];
        sock.write_all(&frame).await.unwrap();
        // keep the connection open until the host closes it
        let mut sink = Vec::new();
        if let Err(e) = sock.read_to_end(&mut sink).await {
            tracing::debug!("fake agent: {e}");
        }
    });
    let e = AgentConn::accept(&listener, DEADLINE).await.unwrap_err();
    let ConnectError::AgentTooOld { agent, host } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(
        (*agent, *host),
        (Generations::only(0), Generations::CURRENT)
    );
    let msg = e.to_string();
    assert!(msg.contains("protocol generation 0"), "{msg}");
    assert!(msg.contains("make setup"), "{msg}");
    // what a caller of create gets: its own type, code BOOT_FAILED, typed generations
    let typed = e.incompatible("web").expect("an incompatible agent");
    let crate::Error::AgentIncompatible {
        name,
        agent,
        host,
        reason,
    } = &typed
    else {
        panic!("{typed:?}")
    };
    assert_eq!((name.as_str(), agent.as_str()), ("web", "0"));
    assert_eq!(host, &Generations::CURRENT.to_string());
    assert_eq!(reason, &msg);
    assert_eq!(typed.code(), "BOOT_FAILED");
    assert!(typed.hint().unwrap().contains("make setup"));
    assert!(ConnectError::Closed.incompatible("web").is_none());
}

/// An agent whose channel first carries what an earlier session left in flight (a branched
/// clone's does: its source's agent had written a hello and an exit that the source's host
/// never read), then its own unasked hello; it echoes the host's nonce only if `echo`.
async fn agent_behind_stale_frames(path: std::path::PathBuf, echo: bool) {
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;
    let mut sock = UnixStream::connect(&path).await.unwrap();
    let hello = |session| Hello {
        version: PROTOCOL_VERSION,
        software: "agent".into(),
        kernel: "6.1".into(),
        uptime_ms: 1,
        min_version: smol_protocol::MIN_PROTOCOL_VERSION,
        session,
    };
    let mut stale = bytes::BytesMut::new();
    let mut codec = smol_protocol::codec::FrameCodec::new(PROTOCOL_VERSION);
    for f in [
        Frame::Hello(hello(Some(999))),
        Frame::Exit {
            id: 1,
            code: 7,
            timed_out: false,
        },
    ] {
        codec.encode(f, &mut stale).unwrap();
    }
    sock.write_all(&stale).await.unwrap();
    let (r, w) = sock.into_split();
    let (mux, mut incoming) = Mux::spawn(r, w);
    mux.send_hello(hello(Some(0))).unwrap();
    while let Some(inc) = incoming.recv().await {
        match inc {
            Incoming::Hello(h) if echo => mux.send_hello(hello(h.session)).unwrap(),
            Incoming::Hello(_) => {}
            Incoming::Open(s, Op::Ping) => s.tx.send(Frame::Done { id: s.id() }).unwrap(),
            Incoming::Open(_, other) => panic!("unexpected {other:?}"),
        }
    }
}

/// The host takes only the hello that echoes its nonce: an earlier session's hello and exit,
/// and the agent's unasked hello, are skipped, and the first operation (stream 1, the id of the
/// stale exit) gets its own answer.
#[tokio::test]
async fn frames_of_an_earlier_session_are_skipped_until_the_nonce_is_echoed() {
    let (_dir, sock, path) = listener();
    tokio::spawn(agent_behind_stale_frames(path, true));
    let conn = AgentConn::accept(&sock, DEADLINE).await.unwrap();
    assert_eq!(conn.hello.software, "agent");
    conn.ping()
        .await
        .expect("the ping is answered by this session");
    // an agent that never echoes the nonce is never taken for this session's
    let (_dir2, sock, path) = listener();
    tokio::spawn(agent_behind_stale_frames(path, false));
    let r = AgentConn::accept(&sock, Duration::from_secs(1)).await;
    assert!(matches!(r, Err(ConnectError::Timeout(_))), "{:?}", r.err());
}
