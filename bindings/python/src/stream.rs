//! `smol._native.ExecStream`: the live output of one command as SPEC §3.9 event dicts.
//!
//! `kill()` may be called from any thread, also while another thread waits in `__next__`: it
//! fires a cancellation token that the waiting call selects on, and whoever holds the core
//! stream then kills it. After a kill no further event is yielded. Dropping the object (garbage
//! collection) drops the core stream, which kills the command.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use smolmachines::{ExecEvent, ExecStream as CoreStream};
use tokio_util::sync::CancellationToken;

use crate::block;

/// Decodes a byte stream as UTF-8 chunk by chunk: a character split across two chunks is
/// kept until its end arrives; invalid bytes become U+FFFD (lossy, like `ExecResult.stdout`).
#[derive(Default)]
pub(crate) struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Decodes `chunk` after the bytes kept from the previous chunk.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let mut out = String::with_capacity(self.pending.len());
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // SAFETY: `valid_up_to` bytes were just checked to be UTF-8.
                    out.push_str(unsafe { std::str::from_utf8_unchecked(valid) });
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // An incomplete character at the end: wait for the next chunk.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// The bytes still kept (an incomplete character at the end of the stream), lossily.
    pub(crate) fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[derive(Default)]
struct Decoders {
    stdout: Utf8Decoder,
    stderr: Utf8Decoder,
}

/// Iterator of event dicts: `{"kind": "stdout"|"stderr", "data": str}`, then
/// `{"kind": "exit", "exit_code": int}` or `{"kind": "error", "message": str, "code": str,
/// "error": SmolError}` (the typed exception of the code, for `raise ev["error"]`).
#[pyclass(frozen, module = "smol._native")]
pub(crate) struct ExecStream {
    stream: Arc<tokio::sync::Mutex<Option<CoreStream>>>,
    killed: CancellationToken,
    done: AtomicBool,
    decoders: Mutex<Decoders>,
    /// Events decided but not yielded yet (the end of the stream).
    queue: Mutex<VecDeque<Py<PyDict>>>,
}

impl ExecStream {
    pub(crate) fn new(s: CoreStream) -> Self {
        Self {
            stream: Arc::new(tokio::sync::Mutex::new(Some(s))),
            killed: CancellationToken::new(),
            done: AtomicBool::new(false),
            decoders: Mutex::new(Decoders::default()),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    fn event<'py>(&self, py: Python<'py>, ev: ExecEvent) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let mut dec = self.decoders.lock().expect("decoder lock");
        match ev {
            ExecEvent::Stdout(b) => {
                d.set_item("kind", "stdout")?;
                d.set_item("data", dec.stdout.push(&b))?;
            }
            ExecEvent::Stderr(b) => {
                d.set_item("kind", "stderr")?;
                d.set_item("data", dec.stderr.push(&b))?;
            }
            ExecEvent::Exit(code) => {
                d.set_item("kind", "exit")?;
                d.set_item("exit_code", code)?;
            }
            ExecEvent::Error { code, message } => {
                // SPEC §3.9's event, plus the stable code and the typed exception of it
                let exc = crate::errors::coded_err(py, code, &message).into_value(py);
                d.set_item("kind", "error")?;
                d.set_item("message", message)?;
                d.set_item("code", code.as_str())?;
                d.set_item("error", exc)?;
            }
        }
        Ok(d)
    }

    /// The bytes of an incomplete last character of each stream, as final data events.
    fn flush(&self, py: Python<'_>, queue: &mut VecDeque<Py<PyDict>>) -> PyResult<()> {
        let mut guard = self.decoders.lock().expect("decoder lock");
        let dec = &mut *guard;
        for (kind, d) in [("stdout", &mut dec.stdout), ("stderr", &mut dec.stderr)] {
            let rest = d.finish();
            if !rest.is_empty() {
                let ev = PyDict::new(py);
                ev.set_item("kind", kind)?;
                ev.set_item("data", rest)?;
                queue.push_back(ev.unbind());
            }
        }
        Ok(())
    }
}

#[pymethods]
impl ExecStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        if self.killed.is_cancelled() {
            return Ok(None);
        }
        if let Some(ev) = self.queue.lock().expect("queue lock").pop_front() {
            return Ok(Some(ev.into_bound(py)));
        }
        if self.done.load(Ordering::Acquire) {
            return Ok(None);
        }
        let stream = self.stream.clone();
        let killed = self.killed.clone();
        let ev = block(py, None, async move {
            let mut guard = stream.lock().await;
            let Some(s) = guard.as_mut() else {
                return Ok(None);
            };
            tokio::select! {
                biased;
                _ = killed.cancelled() => {
                    if let Some(mut s) = guard.take() {
                        s.kill();
                    }
                    Ok(None)
                }
                ev = s.next_event() => Ok(ev),
            }
        });
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                // Ctrl-C while waiting: the command must not outlive the iteration.
                self.kill();
                return Err(e);
            }
        };
        if self.killed.is_cancelled() {
            return Ok(None);
        }
        match ev {
            Some(ev @ (ExecEvent::Stdout(_) | ExecEvent::Stderr(_))) => {
                Ok(Some(self.event(py, ev)?))
            }
            end => {
                // The end: characters cut off at the very end come out before the last event.
                self.done.store(true, Ordering::Release);
                let mut queue = self.queue.lock().expect("queue lock");
                self.flush(py, &mut queue)?;
                if let Some(ev) = end {
                    queue.push_back(self.event(py, ev)?.unbind());
                }
                Ok(queue.pop_front().map(|e| e.into_bound(py)))
            }
        }
    }

    /// Kills the command and ends the iteration. Idempotent; callable from any thread.
    fn kill(&self) {
        self.killed.cancel();
        // Not held: nobody is waiting in `__next__`, so kill here. Held: the waiting call sees
        // the token and kills.
        if let Ok(mut g) = self.stream.try_lock() {
            if let Some(mut s) = g.take() {
                s.kill();
            }
        }
    }

    /// Same as `kill()`.
    fn close(&self) {
        self.kill();
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.kill();
        false
    }
}
