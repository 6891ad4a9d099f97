//! `POST /v1/machines/{id}/exec/stream`: a command's output as Server-Sent Events (SPEC
//! §10.5.4), one event per chunk as the guest produces it, `exit` (or `error`) last. When the
//! client goes away the response body is dropped, which drops the engine's stream and so
//! kills the command.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use smolmachines::wire::{CommandBody, StreamEvent};
use smolmachines::{ExecEvent, ExecStream};

use crate::error::ApiError;
use crate::http::{body_bytes, parse_json};
use crate::routes::row_of;
use crate::server::{Fleet, Tenant, JSON_LIMIT};

/// Turns byte chunks into text without splitting a UTF-8 sequence across two events: an
/// incomplete sequence at the end of a chunk waits for the next one (invalid bytes become
/// U+FFFD, as SSE carries text only).
#[derive(Debug, Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // an incomplete sequence at the very end: keep it for the next chunk
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => incomplete_tail(&self.pending),
        };
        let rest = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// How many bytes at the end of `b` start a UTF-8 sequence that is not complete yet.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        if byte & 0xC0 != 0x80 {
            // a lead byte: how long its sequence should be
            let want = match byte {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if want > back { back } else { 0 };
        }
    }
    0
}

struct Pump {
    /// The command is in flight until the response body is done or dropped.
    _busy: crate::sweeper::Busy,
    stream: ExecStream,
    stdout: Utf8Carry,
    stderr: Utf8Carry,
    done: bool,
}

impl Pump {
    /// The next SSE text, `None` after the last event.
    async fn next(&mut self) -> Option<String> {
        loop {
            if self.done {
                return None;
            }
            let ev = match self.stream.next_event().await {
                Some(ev) => ev,
                None => {
                    self.done = true;
                    return Some(
                        StreamEvent::Error("the command's stream ended without an exit".into())
                            .to_sse(),
                    );
                }
            };
            let out = match &ev {
                ExecEvent::Stdout(b) => StreamEvent::Stdout(self.stdout.push(b)),
                ExecEvent::Stderr(b) => StreamEvent::Stderr(self.stderr.push(b)),
                ExecEvent::Exit(_) | ExecEvent::Error { .. } => {
                    self.done = true;
                    let mut text = String::new();
                    for (tail, stdout) in
                        [(self.stdout.finish(), true), (self.stderr.finish(), false)]
                    {
                        if !tail.is_empty() {
                            let e = if stdout {
                                StreamEvent::Stdout(tail)
                            } else {
                                StreamEvent::Stderr(tail)
                            };
                            text.push_str(&e.to_sse());
                        }
                    }
                    text.push_str(&StreamEvent::from(&ev).to_sse());
                    return Some(text);
                }
            };
            match &out {
                StreamEvent::Stdout(t) | StreamEvent::Stderr(t) if t.is_empty() => continue,
                _ => return Some(out.to_sse()),
            }
        }
    }
}

/// `POST /v1/machines/{id}/exec/stream` (boots a stopped machine first, as exec does).
pub async fn exec_stream(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    let row = row_of(&fleet, &tenant, &id).await?;
    let cmd: CommandBody = parse_json(&body)?;
    let (argv, opts) = cmd.into_exec(None)?;
    let busy = fleet.busy(&row.engine_name).await;
    let m = fleet.running(&row.engine_name).await?;
    let stream = m.exec_stream(&argv, opts).await?;
    let pump = Pump {
        _busy: busy,
        stream,
        stdout: Utf8Carry::default(),
        stderr: Utf8Carry::default(),
        done: false,
    };
    let events = futures::stream::unfold(pump, |mut p| async move {
        let text = p.next().await?;
        Some((Ok::<_, Infallible>(Bytes::from(text)), p))
    });
    let mut resp = Response::new(Body::from_stream(events));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_never_split_between_events() {
        let mut c = Utf8Carry::default();
        let s = "é€😀";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(1) {
            out.push_str(&c.push(chunk));
        }
        out.push_str(&c.finish());
        assert_eq!(out, s);
        // invalid bytes are replaced, a complete text passes at once
        assert_eq!(c.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(c.push("ok\n".as_bytes()), "ok\n");
        // an invalid byte followed by the start of a sequence keeps only the start
        assert_eq!(c.push(b"\xff\xe2\x82"), "\u{fffd}");
        assert_eq!(c.push(b"\xac"), "€");
    }
}
