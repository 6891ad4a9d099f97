//! Unit tests of the mux: hello, streams, flow control, closing, goodbyes, limits.

use super::*;
use std::time::Duration;

fn pair() -> (
    (Mux, mpsc::UnboundedReceiver<Incoming>),
    (Mux, mpsc::UnboundedReceiver<Incoming>),
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    (Mux::spawn(ar, aw), Mux::spawn(br, bw))
}

/// A frame that does not decode ends the connection with a goodbye to the peer, whose
/// open operations then fail at once with the reason (instead of waiting forever).
#[tokio::test]
async fn an_undecodable_frame_is_answered_with_goodbye() {
    use tokio::io::AsyncWriteExt;
    // a raw peer of the agent's mux
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (ar, aw) = tokio::io::split(a);
    let (agent, _ain) = Mux::spawn(ar, aw);
    let (br, mut bw) = tokio::io::split(b);
    let mut from_agent = FramedRead::new(br, FrameCodec::default());
    // a length prefix and bytes that are no frame (variant 200)
    bw.write_all(&[0, 0, 0, 2, 200, 1]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), from_agent.next())
        .await
        .expect("no goodbye");
    match got {
        Some(Ok(Frame::Goodbye { reason })) => {
            assert!(reason.contains("read failed"), "{reason}")
        }
        other => panic!("expected a goodbye, got {other:?}"),
    }
    assert!(agent.is_closed());

    // the side that receives a goodbye fails its open operations with the reason
    let ((host, _hin), (agent, _ain)) = pair();
    let mut s = host.open(Op::Ping).unwrap();
    agent
        .shared
        .out
        .send(Frame::Goodbye {
            reason: "cannot decode".into(),
        })
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), s.rx.recv())
        .await
        .expect("the operation kept waiting")
        .unwrap_err();
    assert!(e.to_string().contains("cannot decode"), "{e}");
    assert!(host.is_closed());
}

/// A closed mux's reader takes no more bytes: the next mux on the same source gets every
/// frame (the agent's next session after a host reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_reader_leaves_the_next_frames_to_its_successor() {
    // one socket read through a duplicate descriptor per mux, as the agent reads its port
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = || {
        let dup = ours.try_clone().unwrap();
        dup.set_nonblocking(true).unwrap();
        tokio::net::UnixStream::from_std(dup).unwrap()
    };
    theirs.set_nonblocking(true).unwrap();
    let theirs = tokio::net::UnixStream::from_std(theirs).unwrap();
    let mut peer = tokio_util::codec::FramedWrite::new(theirs, FrameCodec::default());
    for round in 0..50u32 {
        let (old, _old_in) = Mux::spawn(reader(), tokio::io::sink());
        tokio::task::yield_now().await;
        old.close("session ended");
        let (new, mut new_in) = Mux::spawn(reader(), tokio::io::sink());
        futures::SinkExt::send(
            &mut peer,
            Frame::Open {
                id: round,
                op: Op::Ping,
            },
        )
        .await
        .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), new_in.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the old reader took the frame"));
        assert!(matches!(got, Some(Incoming::Open(_, Op::Ping))), "{got:?}");
        new.close("session ended");
    }
}

#[tokio::test]
async fn hello_open_data_roundtrip() {
    let ((host, _hin), (agent, mut ain)) = pair();
    agent
        .send_hello(Hello {
            version: 1,
            software: "t".into(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: 1,
            session: None,
        })
        .unwrap();
    let mut s = host.open(Op::Ping).unwrap();
    let (gs, op) = match ain.recv().await.unwrap() {
        Incoming::Open(s, op) => (s, op),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(op, Op::Ping);
    gs.tx.send_data(Chan::Stdout, b"hello").await.unwrap();
    gs.tx.send(Frame::Done { id: gs.id() }).unwrap();
    assert_eq!(
        s.rx.recv().await.unwrap(),
        Frame::Data {
            id: s.id(),
            chan: Chan::Stdout,
            data: Bytes::from_static(b"hello")
        }
    );
    assert!(s.rx.recv().await.unwrap().is_terminal());
}

/// A receiver that does not pull stops the sender after one window; pulling resumes it.
#[tokio::test]
async fn flow_control_bounds_in_flight_bytes() {
    let ((host, _hin), (_agent, mut ain)) = pair();
    let mut s = host.open(Op::Ping).unwrap();
    let gs = match ain.recv().await.unwrap() {
        Incoming::Open(s, _) => s,
        _ => unreachable!(),
    };
    let total = STREAM_WINDOW as usize * 3;
    let tx = gs.tx.clone();
    let sent = Arc::new(AtomicU32::new(0));
    let sent2 = sent.clone();
    let producer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; MAX_CHUNK]);
        for _ in 0..total / MAX_CHUNK {
            tx.send_owned(Chan::Stdout, chunk.clone()).await.unwrap();
            sent2.fetch_add(MAX_CHUNK as u32, Ordering::SeqCst);
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sent.load(Ordering::SeqCst), STREAM_WINDOW);
    let mut got = 0;
    while got < total {
        if let Frame::Data { data, .. } = s.rx.recv().await.unwrap() {
            got += data.len();
        }
    }
    producer.await.unwrap();
    assert_eq!(got, total);
}

#[tokio::test]
async fn closing_fails_pending_streams_and_credit_waiters() {
    let ((host, _hin), (agent, mut ain)) = pair();
    let mut s = host.open(Op::Ping).unwrap();
    let gs = match ain.recv().await.unwrap() {
        Incoming::Open(s, _) => s,
        _ => unreachable!(),
    };
    // exhaust the agent's send window, then close the host side.
    gs.tx
        .send_data(Chan::Stdout, &vec![0u8; STREAM_WINDOW as usize])
        .await
        .unwrap();
    let blocked = tokio::spawn({
        let tx = gs.tx.clone();
        async move { tx.send_data(Chan::Stdout, b"x").await }
    });
    host.close("test");
    let err = loop {
        match s.rx.recv().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.reason, "test");
    assert!(host.open(Op::Ping).is_err());
    // the agent sees its peer vanish, which releases the blocked sender.
    agent.closed().await;
    assert!(blocked.await.unwrap().is_err());
}

/// An operation queued before the hellos settled on a generation that lacks it is never
/// written: its stream fails at once with the reason.
#[tokio::test]
async fn an_open_queued_before_the_hello_is_refused_by_the_writer() {
    let ((host, _hin), (_agent, mut ain)) = pair();
    let mut s = host
        .open(Op::MountImage {
            path: "/i".into(),
            fstype: "erofs".into(),
            size: 1,
            target: "/m".into(),
        })
        .unwrap();
    // the writer has not run yet (current-thread runtime): a generation-1 peer's hello
    host.shared.negotiate(&Hello {
        version: 1,
        software: "old".into(),
        kernel: String::new(),
        uptime_ms: 0,
        min_version: 1,
        session: None,
    });
    assert_eq!(host.generation(), 1);
    match tokio::time::timeout(Duration::from_secs(5), s.rx.recv()).await {
        Ok(Ok(Frame::Error { error, .. })) => {
            assert_eq!(error.kind, crate::ErrorKind::Unsupported);
            assert!(error.message.contains("MountImage"), "{}", error.message);
        }
        other => panic!("{other:?}"),
    }
    // the peer got nothing, and the connection still works
    let mut p = host.open(Op::Ping).unwrap();
    match ain.recv().await.unwrap() {
        Incoming::Open(gs, Op::Ping) => gs.tx.send(Frame::Done { id: gs.id() }).unwrap(),
        other => panic!("{other:?}"),
    }
    assert!(p.rx.recv().await.unwrap().is_terminal());
}

/// A request over the frame limit is refused at `open`, nothing is sent, and the
/// connection keeps working; a too-big answer is replaced by an error for the peer.
#[tokio::test]
async fn frames_over_the_limit_fail_their_stream_not_the_connection() {
    let ((host, _hin), (_agent, mut ain)) = pair();
    let big = crate::ExecRequest {
        argv: vec!["true".into()],
        env: vec![("BIG".into(), "x".repeat(400 * 1024))],
        workdir: None,
        timeout_ms: None,
        stdin: false,
        user: None,
    };
    match host.open(Op::Exec(big)) {
        Err(OpenError::TooLarge { size, limit }) => {
            assert!(size > 400 * 1024, "{size}");
            assert_eq!(limit, MAX_FRAME);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(host.open_streams(), 0);
    // the agent answers a ping with an error too big to send: the host gets an error
    let mut p = host.open(Op::Ping).unwrap();
    let gs = match ain.recv().await.unwrap() {
        Incoming::Open(gs, Op::Ping) => gs,
        other => panic!("{other:?}"),
    };
    let huge = RemoteError::new(ErrorKind::Io, "y".repeat(MAX_FRAME + 1));
    gs.tx
        .send(Frame::Error {
            id: gs.id(),
            error: huge,
        })
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), p.rx.recv()).await {
        Ok(Ok(Frame::Error { error, .. })) => {
            assert!(error.message.contains("not sent"), "{}", error.message)
        }
        other => panic!("{other:?}"),
    }
    // both sides still talk
    let mut p = host.open(Op::Ping).unwrap();
    match ain.recv().await.unwrap() {
        Incoming::Open(gs, Op::Ping) => gs.tx.send(Frame::Done { id: gs.id() }).unwrap(),
        other => panic!("{other:?}"),
    }
    assert!(p.rx.recv().await.unwrap().is_terminal());
    assert!(!host.is_closed());
}

#[tokio::test]
async fn dropped_receiver_forgets_the_stream() {
    let ((host, _hin), _agent) = pair();
    let s = host.open(Op::Ping).unwrap();
    assert_eq!(host.open_streams(), 1);
    drop(s);
    assert_eq!(host.open_streams(), 0);
}
