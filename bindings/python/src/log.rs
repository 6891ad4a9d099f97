//! The engine's `tracing` events, forwarded to Python's `logging` (logger `smol` and its
//! children, e.g. `smol.smolmachines.local.machine`).
//!
//! Engine threads never take the GIL to log: a `tracing` layer puts each enabled event on a
//! bounded queue, and a daemon thread of the Python package (`smol/_log.py`) drains it with
//! [`_next_logs`] (GIL released while it waits) and hands the records to `logging`. The layer's
//! level follows the effective level of the `smol` logger: the thread reports it with
//! [`_set_log_level`] whenever it changes, so a quiet logger costs one atomic load per event.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use pyo3::prelude::*;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Records kept while Python is not draining; older ones are dropped (and counted).
const QUEUE_CAP: usize = 4096;

/// Python `logging` levels.
const DEBUG: u8 = 10;
const INFO: u8 = 20;
const WARNING: u8 = 30;
const ERROR: u8 = 40;

/// The lowest Python level forwarded (WARNING until the package reports the logger's level).
static MIN_LEVEL: AtomicU8 = AtomicU8::new(WARNING);
static DROPPED: AtomicU64 = AtomicU64::new(0);

struct Queue {
    records: Mutex<VecDeque<(u8, String, String)>>,
    ready: Condvar,
}

fn queue() -> &'static Queue {
    static Q: OnceLock<Queue> = OnceLock::new();
    Q.get_or_init(|| Queue {
        records: Mutex::new(VecDeque::new()),
        ready: Condvar::new(),
    })
}

fn py_level(l: &Level) -> u8 {
    match *l {
        Level::ERROR => ERROR,
        Level::WARN => WARNING,
        Level::INFO => INFO,
        // TRACE is below DEBUG (Python has no TRACE level): 5
        Level::DEBUG => DEBUG,
        Level::TRACE => 5,
    }
}

/// Collects an event's message and fields as one line: `message key=value ...`.
#[derive(Default)]
struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        } else {
            let sep = if self.0.is_empty() { "" } else { " " };
            self.0.push_str(&format!("{sep}{}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let sep = if self.0.is_empty() { "" } else { " " };
            self.0.push_str(&format!("{sep}{}={value}", field.name()));
        }
    }
}

struct ToPython;

impl<S: Subscriber> Layer<S> for ToPython {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // the level changes at run time: ask `enabled` at every event
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        py_level(meta.level()) >= MIN_LEVEL.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Line::default();
        event.record(&mut line);
        let q = queue();
        let Ok(mut records) = q.records.lock() else {
            return;
        };
        if records.len() >= QUEUE_CAP {
            records.pop_front();
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        records.push_back((
            py_level(meta.level()),
            meta.target().replace("::", "."),
            line.0,
        ));
        q.ready.notify_one();
    }
}

/// Installs the layer as the process's `tracing` subscriber (once; a subscriber installed by
/// someone else first wins, and then nothing is forwarded).
pub(crate) fn install() {
    static DONE: OnceLock<bool> = OnceLock::new();
    DONE.get_or_init(|| {
        tracing_subscriber::registry()
            .with(ToPython)
            .try_init()
            .is_ok()
    });
}

/// Up to `max` queued records, waiting up to `timeout_s` for the first; `(levelno, target,
/// message)` each. A record saying how many were dropped comes first when the queue overflowed.
#[pyfunction]
#[pyo3(signature = (timeout_s, max = 256))]
fn _next_logs(py: Python<'_>, timeout_s: f64, max: usize) -> Vec<(u8, String, String)> {
    py.detach(|| {
        let q = queue();
        let Ok(guard) = q.records.lock() else {
            return Vec::new();
        };
        let wait = Duration::from_secs_f64(timeout_s.clamp(0.0, 60.0));
        let Ok((mut records, _)) = q.ready.wait_timeout_while(guard, wait, |r| r.is_empty()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            out.push((
                WARNING,
                "smol".to_string(),
                format!("{dropped} log records dropped (Python did not read them in time)"),
            ));
        }
        let n = records.len().min(max);
        out.extend(records.drain(..n));
        out
    })
}

/// Sets the lowest level forwarded (a Python `logging` level number).
#[pyfunction]
fn _set_log_level(levelno: i64) {
    MIN_LEVEL.store(levelno.clamp(1, 255) as u8, Ordering::Relaxed);
}

/// Emits one event through the engine's `tracing` (for the package's tests).
#[pyfunction]
fn _emit_log(levelno: i64, message: &str) {
    match levelno {
        ..=10 => tracing::debug!(target: "smolmachines::test", "{message}"),
        11..=20 => tracing::info!(target: "smolmachines::test", "{message}"),
        21..=30 => tracing::warn!(target: "smolmachines::test", "{message}"),
        _ => tracing::error!(target: "smolmachines::test", "{message}"),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    install();
    m.add_function(wrap_pyfunction!(_next_logs, m)?)?;
    m.add_function(wrap_pyfunction!(_set_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(_emit_log, m)?)?;
    Ok(())
}
