//! The one place where a core error becomes a Python exception (SPEC §8).
//!
//! The exception classes live in `smol/errors.py` (so they have Python constructors and
//! attributes). This module passes an error's stable code ([`smolmachines::Error::code`]), its
//! message and its typed fields, taken from its problem body ([`Error::to_problem`]: `hint`,
//! `status`, `problem_code`, `retryable`, `retry_after_s`, `port`, `exit_code`, `log_tail`, ...)
//! to `smol.errors._from_native`, which picks the class of the code and builds the instance.
//! `_error_from_problem` does the same for a problem+json body (status + bytes) through
//! [`Error::from_problem`], so a fleet error becomes the exception a local one would.

use pyo3::exceptions::PyBaseException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use smolmachines::{Error, ErrorCode};

static FACTORY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Maps a core error to its typed Python exception. Every error of the core goes through here.
pub(crate) fn to_py_err(py: Python<'_>, e: Error) -> PyErr {
    match fields(py, &e) {
        Ok(extra) => build(py, e.code().as_str(), &e.to_string(), extra),
        Err(err) => err,
    }
}

/// The exception of a stream's error event: its code and message.
pub(crate) fn coded_err(py: Python<'_>, code: ErrorCode, message: &str) -> PyErr {
    to_py_err(py, Error::coded(code, message))
}

/// A binding-level error with `code` (a stable code string) and `message`.
pub(crate) fn new_err(py: Python<'_>, code: &str, message: &str) -> PyErr {
    build(py, code, message, PyDict::new(py))
}

/// The error's typed fields as keyword names of `smol.errors` (snake case).
fn fields<'py>(py: Python<'py>, e: &Error) -> PyResult<Bound<'py, PyDict>> {
    let p = e.to_problem();
    let d = PyDict::new(py);
    d.set_item("status", p.status)?;
    d.set_item("problem_code", p.code)?;
    d.set_item("retryable", p.retryable.unwrap_or(false))?;
    d.set_item("retry_after_s", p.retry_after_s)?;
    if let Some(h) = p.hint {
        d.set_item("hint", h)?;
    }
    let text = [
        ("machine", p.machine),
        ("state", p.state),
        ("operation", p.operation),
        ("path", p.path),
        ("reason", p.reason),
        ("log_tail", p.log_tail),
        ("command", p.command),
        ("stdout", p.stdout),
        ("stderr", p.stderr),
        ("program", p.program),
        ("package", p.package),
        ("needed_for", p.needed_for),
        ("scope", p.scope),
        ("registry", p.registry),
        ("context", p.context),
    ];
    for (k, v) in text {
        if let Some(v) = v {
            d.set_item(k, v)?;
        }
    }
    if let Some(port) = p.port {
        d.set_item("port", port)?;
    }
    if let Some(c) = p.exit_code {
        d.set_item("exit_code", c)?;
    }
    if let Some(m) = p.requested_mib {
        d.set_item("requested_mib", m)?;
    }
    if let Some(m) = p.available_mib {
        d.set_item("available_mib", m)?;
    }
    Ok(d)
}

fn build(py: Python<'_>, code: &str, message: &str, extra: Bound<'_, PyDict>) -> PyErr {
    let made = FACTORY
        .import(py, "smol.errors", "_from_native")
        .and_then(|f| f.call1((code, message, extra)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        // smol.errors itself failed to import: that error says why.
        Err(e) => e,
    }
}

/// `_error_from_problem(status, body, retry_after=None)`: the exception of an HTTP error
/// response (any body: problem+json, other JSON, text, empty) via the core's
/// [`Error::from_problem`]. Internal (tests, and the cloud client later).
#[pyfunction]
#[pyo3(name = "_error_from_problem", signature = (status, body, retry_after = None))]
pub(crate) fn error_from_problem(
    py: Python<'_>,
    status: u16,
    body: &[u8],
    retry_after: Option<&str>,
) -> Py<PyBaseException> {
    to_py_err(py, Error::from_problem(status, body, retry_after)).into_value(py)
}
