//! `execStream`: the core's `ExecStream` behind a pull API (`next()` resolves with the events
//! ready at that moment, at least one) and `kill()`, which `index.js` turns into an async
//! generator; leaving its `for await` early calls `kill()`, which kills the command.

use std::sync::Arc;

use futures::FutureExt;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use smolmachines::{ExecEvent, ExecStream};
use tokio::sync::{Mutex, Notify};

/// Most events handed over by one `next()`.
const BATCH: usize = 64;

/// One stream event: `stdout`/`stderr` with `data`, `exit` with `exitCode`, `error` with
/// `message` and the stable `code` (`index.js` adds the typed error of the code).
#[napi(object)]
pub struct NativeEvent {
    pub kind: String,
    pub data: Option<Buffer>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub code: Option<String>,
}

impl From<ExecEvent> for NativeEvent {
    fn from(ev: ExecEvent) -> Self {
        let (kind, data, exit_code, message, code) = match ev {
            ExecEvent::Stdout(d) => ("stdout", Some(d.into()), None, None, None),
            ExecEvent::Stderr(d) => ("stderr", Some(d.into()), None, None, None),
            ExecEvent::Exit(c) => ("exit", None, Some(c), None, None),
            ExecEvent::Error { code, message } => (
                "error",
                None,
                None,
                Some(message),
                Some(code.as_str().to_string()),
            ),
        };
        Self {
            kind: kind.to_string(),
            data,
            exit_code,
            message,
            code,
        }
    }
}

/// A running command's output. Dropping it (garbage collection) also kills the command.
#[napi]
pub struct NativeExecStream {
    stream: Arc<Mutex<ExecStream>>,
    kill: Arc<Notify>,
}

impl NativeExecStream {
    pub fn new(s: ExecStream) -> Self {
        Self {
            stream: Arc::new(Mutex::new(s)),
            kill: Arc::new(Notify::new()),
        }
    }
}

#[napi]
impl NativeExecStream {
    /// The next events (one or more), or `null` after the last one or a kill.
    #[napi]
    pub async fn next(&self) -> Result<Option<Vec<NativeEvent>>> {
        let stream = self.stream.clone();
        let kill = self.kill.clone();
        let mut s = stream.lock().await;
        tokio::select! {
            biased;
            _ = kill.notified() => {
                s.kill();
                Ok(None)
            }
            ev = s.next_event() => {
                let Some(ev) = ev else { return Ok(None) };
                let mut out = vec![NativeEvent::from(ev)];
                while out.len() < BATCH {
                    match s.next_event().now_or_never() {
                        Some(Some(ev)) => out.push(ev.into()),
                        _ => break,
                    }
                }
                Ok(Some(out))
            }
        }
    }

    /// Kills the command; no further events. Idempotent; callable while `next()` is pending.
    #[napi]
    pub fn kill(&self) {
        match self.stream.try_lock() {
            Ok(mut s) => s.kill(),
            // a next() holds the stream: it sees the notification (stored if it is not yet
            // waiting) and kills
            Err(_) => self.kill.notify_one(),
        }
    }
}
