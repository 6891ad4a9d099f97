//! `smol._native`: the Rust half of the Python module `smol` (distribution `smolmachines`).
//!
//! The pure-Python package (`python/smol`) owns the public surface (dataclasses, `Machine`,
//! `AsyncMachine`, the exception classes); this module drives the Rust core
//! ([`smolmachines::Machine`]) on one process-wide multi-thread tokio runtime. Every call that
//! can block releases the GIL ([`Python::detach`]) for its whole duration, so Python threads
//! driving different machines run in parallel. While it waits, a call still notices Ctrl-C
//! (it polls Python's signal handlers every 100 ms) and the cancel token `AsyncMachine` uses.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;
use tokio_util::sync::CancellationToken;

mod errors;
mod log;
mod machine;
mod stream;

/// How often a blocked call looks at Python's signal handlers (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// The one runtime of the process. Machines spawn their supervisor, port relays and agent
/// connection tasks on it; its worker threads keep running them between Python calls.
pub(crate) fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
            .thread_name("smol-rt")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime of smol._native")
    })
}

/// Why a blocked call ended before its future did.
enum Stop {
    /// A Python signal handler raised (KeyboardInterrupt).
    Signal(PyErr),
    /// The caller's [`CancelToken`] was cancelled.
    Cancelled,
}

/// Runs `fut` to completion on the runtime with the GIL released. The future is dropped (which
/// cancels the operation in the core: an exec's command is killed) when a signal handler raises
/// or `cancel` fires.
pub(crate) fn block<F, T>(py: Python<'_>, cancel: Option<&CancellationToken>, fut: F) -> PyResult<T>
where
    F: Future<Output = smolmachines::Result<T>> + Send,
    T: Send,
{
    let cancel = cancel.cloned();
    let out = py.detach(move || {
        rt().block_on(async move {
            tokio::pin!(fut);
            let start = tokio::time::Instant::now() + SIGNAL_POLL;
            let mut tick = tokio::time::interval_at(start, SIGNAL_POLL);
            loop {
                tokio::select! {
                    biased;
                    r = &mut fut => return Ok(r),
                    _ = cancelled(cancel.as_ref()) => return Err(Stop::Cancelled),
                    _ = tick.tick() => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            return Err(Stop::Signal(e));
                        }
                    }
                }
            }
        })
    });
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(errors::to_py_err(py, e)),
        Err(Stop::Signal(e)) => Err(e),
        Err(Stop::Cancelled) => Err(errors::new_err(
            py,
            "CANCELLED",
            "the operation was cancelled",
        )),
    }
}

async fn cancelled(t: Option<&CancellationToken>) {
    match t {
        Some(t) => t.cancelled().await,
        None => std::future::pending().await,
    }
}

/// A cancel switch for one blocking call (used by `AsyncMachine` so that cancelling the
/// awaiting task kills the command). `cancel()` may be called from any thread.
#[pyclass(frozen, module = "smol._native")]
pub(crate) struct CancelToken(pub(crate) CancellationToken);

#[pymethods]
impl CancelToken {
    #[new]
    fn new() -> Self {
        Self(CancellationToken::new())
    }

    /// Cancels the call this token was given to (idempotent).
    fn cancel(&self) {
        self.0.cancel();
    }

    /// Whether `cancel()` was called.
    #[getter]
    fn cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// `(available, code, reason, accel)`: whether this host can run local machines (SPEC §3.10).
/// Never raises: a panic in the probe is reported as unavailable.
#[pyfunction]
fn local_availability(py: Python<'_>) -> (bool, Option<String>, Option<String>, Option<String>) {
    let probe = py.detach(|| std::panic::catch_unwind(smolmachines::local_availability));
    match probe {
        Ok(a) => (a.available, a.code, a.reason, a.accel),
        Err(_) => (
            false,
            Some("RUNTIME_NOT_INSTALLED".into()),
            Some("the local engine's availability probe failed".into()),
            None,
        ),
    }
}

/// `(source, dir, description)` of the guest assets the local engine uses: `source` is `env`
/// (SMOL_ASSETS), `packaged` (in the installed package) or `home` (the set-up's); `None` when the
/// directory cannot be told (a broken manifest: `local_availability()` says why).
#[pyfunction]
fn local_assets() -> Option<(String, String, String)> {
    let o = smolmachines::local::assets::origin().ok()?;
    Some((
        o.source.as_str().to_string(),
        o.dir.display().to_string(),
        o.to_string(),
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<CancelToken>()?;
    m.add_class::<machine::Machine>()?;
    m.add_class::<stream::ExecStream>()?;
    m.add_function(wrap_pyfunction!(local_availability, m)?)?;
    m.add_function(wrap_pyfunction!(local_assets, m)?)?;
    m.add_function(wrap_pyfunction!(errors::error_from_problem, m)?)?;
    log::register(m)?;
    Ok(())
}
