//! Streamed bodies: `exec_stream` over Server-Sent Events (SPEC §10.5.4) and a file read as
//! chunks. A task reads the response; dropping the consumer (or `ExecStream::kill`) ends
//! the task and closes the connection, which the server takes as the end of the command.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::http::{chain, encode_segment, Client, Req};
use crate::backend::ExecStream;
use crate::config::{ExecEvent, ExecOptions};
use crate::error::{Error, ErrorCode, Result};
use crate::wire::{CommandBody, SseDecoder, StreamEvent};

/// Events buffered between the reading task and the consumer.
const EVENT_BUFFER: usize = 64;
/// A file read that receives nothing for this long is abandoned (as locally).
const READ_IDLE: Duration = Duration::from_secs(30);

/// The `POST …/exec/stream` request of `argv` with `opts`.
pub(crate) fn stream_request(id: &str, argv: &[String], opts: &ExecOptions) -> Result<Req> {
    let body = CommandBody::new(argv, opts)?;
    Ok(
        Req::post(format!("/v1/machines/{}/exec/stream", encode_segment(id)))
            .json(&body)
            .accept("text/event-stream")
            .streaming(),
    )
}

fn lost(detail: &str) -> ExecEvent {
    ExecEvent::Error {
        code: ErrorCode::Connection,
        message: format!("cloud exec/stream connection lost: {detail}"),
    }
}

/// Starts `argv` and streams its events; a non-2xx answer is the translated error.
pub(crate) async fn exec_stream(
    client: &Client,
    id: &str,
    argv: &[String],
    opts: &ExecOptions,
) -> Result<ExecStream> {
    let req = stream_request(id, argv, opts)?;
    let mut resp = client.send(&req).await?.inner;
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let pump = async {
            let mut dec = SseDecoder::new();
            loop {
                let events = match resp.chunk().await {
                    Ok(Some(bytes)) => dec.push(&bytes),
                    Ok(None) => {
                        let last = std::mem::take(&mut dec).finish();
                        let ended =
                            matches!(last, Some(StreamEvent::Exit(_) | StreamEvent::Error(_)));
                        if let Some(e) = last {
                            if tx.send(ExecEvent::from(e)).await.is_err() {
                                return;
                            }
                        }
                        if !ended
                            && tx
                                .send(lost("the stream ended before the exit event"))
                                .await
                                .is_err()
                        {
                            tracing::trace!("stream consumer gone");
                        }
                        return;
                    }
                    Err(e) => {
                        if tx.send(lost(&chain(&e))).await.is_err() {
                            tracing::trace!("stream consumer gone");
                        }
                        return;
                    }
                };
                for e in events {
                    let exit = matches!(e, StreamEvent::Exit(_) | StreamEvent::Error(_));
                    if tx.send(ExecEvent::from(e)).await.is_err() || exit {
                        return;
                    }
                }
            }
        };
        tokio::select! {
            _ = pump => {}
            _ = kill_rx => tracing::debug!("cloud exec stream killed: connection closed"),
        }
    });
    Ok(ExecStream::new(rx, kill_tx))
}

/// `GET path` as a stream of chunks; 30 s without a byte is `Timeout`.
pub(crate) async fn read_file_stream(client: &Client, path: &str) -> Result<crate::FileReader> {
    let req = Req::get(path).streaming();
    let what = req.what();
    let mut resp = client.send(&req).await?.inner;
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>>>(4);
    tokio::spawn(async move {
        loop {
            let item = match tokio::time::timeout(READ_IDLE, resp.chunk()).await {
                Ok(Ok(Some(b))) => Ok(b.to_vec()),
                Ok(Ok(None)) => return,
                Ok(Err(e)) => Err(Error::Connection {
                    message: format!("{what}: connection lost: {}", chain(&e)),
                }),
                Err(_) => Err(Error::Timeout {
                    what: format!("{what}: no data for {}s", READ_IDLE.as_secs()),
                }),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(crate::FileReader::new(rx))
}
