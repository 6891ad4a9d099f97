//! A peer that does not honour flow control (found reviewing the fuzz targets' mux, docs/
//! FUZZING.md): data past a stream's window ends the connection instead of queueing without
//! bound, and credit past the window is not piled up (tokio's semaphore panics past its limit,
//! which ended the reader and left the connection hanging).

use super::*;
use futures::SinkExt;
use tokio_util::codec::FramedWrite;

/// A host mux with one open stream (id 1), and a raw peer writing frames to it.
async fn host_and_raw_peer() -> (
    Mux,
    Stream,
    FramedWrite<tokio::io::WriteHalf<tokio::io::DuplexStream>, FrameCodec>,
    FramedRead<tokio::io::ReadHalf<tokio::io::DuplexStream>, FrameCodec>,
) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (ar, aw) = tokio::io::split(a);
    let (host, _incoming) = Mux::spawn(ar, aw);
    let stream = host.open(Op::Ping).unwrap();
    let (br, bw) = tokio::io::split(b);
    let mut from_host = FramedRead::new(br, FrameCodec::default());
    match from_host.next().await {
        Some(Ok(Frame::Open { id: 1, .. })) => {}
        other => panic!("expected the open, got {other:?}"),
    }
    (
        host,
        stream,
        FramedWrite::new(bw, FrameCodec::default()),
        from_host,
    )
}

#[tokio::test]
async fn data_past_the_window_ends_the_connection() {
    let (host, stream, mut peer, mut from_host) = host_and_raw_peer().await;
    let chunk = Bytes::from(vec![1u8; MAX_CHUNK]);
    // the stream's reader reads nothing: an honest peer stops at the window
    let frames = STREAM_WINDOW as usize / MAX_CHUNK + 1;
    for _ in 0..frames {
        peer.send(Frame::Data {
            id: 1,
            chan: Chan::Stdout,
            data: chunk.clone(),
        })
        .await
        .unwrap();
    }
    let reason = tokio::time::timeout(Duration::from_secs(5), host.closed())
        .await
        .expect("the connection stayed up")
        .to_string();
    assert!(reason.contains("without credit"), "{reason}");
    // the peer is told why
    match tokio::time::timeout(Duration::from_secs(5), from_host.next()).await {
        Ok(Some(Ok(Frame::Goodbye { reason }))) => assert!(reason.contains("window"), "{reason}"),
        other => panic!("expected a goodbye, got {other:?}"),
    }
    drop(stream);
}

#[tokio::test]
async fn data_within_the_window_and_its_credit_keep_the_connection() {
    let (host, mut stream, mut peer, _from_host) = host_and_raw_peer().await;
    // three windows' worth, each window read (and so credited) before the next is sent
    let chunk = Bytes::from(vec![2u8; MAX_CHUNK]);
    let per_window = STREAM_WINDOW as usize / MAX_CHUNK;
    for _ in 0..3 {
        for _ in 0..per_window {
            peer.send(Frame::Data {
                id: 1,
                chan: Chan::Stdout,
                data: chunk.clone(),
            })
            .await
            .unwrap();
        }
        for _ in 0..per_window {
            stream.rx.recv().await.unwrap();
        }
    }
    assert!(!host.is_closed());
}

#[tokio::test]
async fn credit_past_the_window_is_not_piled_up() {
    let (host, stream, mut peer, _from_host) = host_and_raw_peer().await;
    for _ in 0..3 {
        peer.send(Frame::Credit {
            id: 1,
            bytes: u32::MAX,
        })
        .await
        .unwrap();
    }
    peer.send(Frame::Done { id: 1 }).await.unwrap();
    let mut rx = stream.rx;
    let done = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(matches!(done, Ok(Ok(Frame::Done { id: 1 }))), "{done:?}");
    assert_eq!(stream.tx.credit.available_permits(), STREAM_WINDOW as usize);
    assert!(!host.is_closed());
}
