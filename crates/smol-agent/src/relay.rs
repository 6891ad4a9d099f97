//! `Op::Connect`: a TCP connection to a guest port, relayed over a stream (published ports).

use smol_protocol::mux::Stream;
use smol_protocol::{Chan, ErrorKind, Frame, RemoteError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn closed(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::new(ErrorKind::Io, e.to_string())
}

/// Connects to `127.0.0.1:port` and relays bytes both ways until both directions end.
pub async fn connect(stream: Stream, port: u16) -> Result<Frame, RemoteError> {
    let Stream { tx, mut rx } = stream;
    let id = tx.id();
    let sock = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| RemoteError::from_io(&e, &format!("connect to guest port {port}")))?;
    if let Err(e) = sock.set_nodelay(true) {
        // Still a working connection, only with Nagle's delays.
        crate::quiet::warn(format_args!("guest port {port}: setting TCP_NODELAY"), e);
    }
    // connected: an empty stdout frame says so (the host's readiness probe waits for it; a
    // relay writes nothing for it, so older hosts are unaffected)
    tx.send_owned(Chan::Stdout, Vec::new())
        .await
        .map_err(closed)?;
    let (mut r, mut w) = sock.into_split();
    let up = async {
        loop {
            let mut buf = Vec::with_capacity(64 * 1024);
            let n = r
                .read_buf(&mut buf)
                .await
                .map_err(|e| RemoteError::from_io(&e, "guest socket"))?;
            if n == 0 {
                tx.send_eof(Chan::Stdout).map_err(closed)?;
                return Ok::<(), RemoteError>(());
            }
            tx.send_owned(Chan::Stdout, buf).await.map_err(closed)?;
        }
    };
    let down = async {
        loop {
            match rx.recv().await.map_err(closed)? {
                Frame::Data {
                    chan: Chan::Stdin,
                    data,
                    ..
                } => w
                    .write_all(&data)
                    .await
                    .map_err(|e| RemoteError::from_io(&e, "guest socket"))?,
                Frame::Eof {
                    chan: Chan::Stdin, ..
                } => {
                    // The host's side ended: half-close toward the guest program, which may
                    // still answer. A peer gone already (NotConnected) is the expected
                    // failure; the other direction sees it on its own.
                    match w.shutdown().await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {}
                        Err(e) => crate::quiet::warn(
                            format_args!("guest port {port}: shutting down the write side"),
                            e,
                        ),
                    }
                    return Ok::<(), RemoteError>(());
                }
                Frame::Cancel { .. } => return Err(closed("connection closed by the host")),
                _ => {}
            }
        }
    };
    tokio::try_join!(up, down)?;
    Ok(Frame::Done { id })
}
