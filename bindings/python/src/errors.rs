//! The one place where a core error becomes a Python exception (SPEC §8).
//!
//! The exception classes live in `smol/errors.py` (so they have Python constructors and
//! attributes); this module picks the class from the core's variant and passes the stable code of
//! [`smolmachines::Error::code`], the message, the hint and the variant's fields to
//! `smol.errors._from_native`, which builds the instance.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use smolmachines::Error;

static FACTORY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Maps a core error to its typed Python exception. Every error of the core goes through here.
pub(crate) fn to_py_err(py: Python<'_>, e: Error) -> PyErr {
    let class = match &e {
        Error::NotSupported { .. } => "NotSupportedError",
        Error::InvalidConfig { .. } | Error::NotADirectory { .. } => "InvalidConfigError",
        Error::CommandFailed { .. } => "ExecutionError",
        Error::NotFound { .. } | Error::AssetMissing { .. } => "NotFoundError",
        Error::Conflict { .. } | Error::PortUnavailable { .. } => "ConflictError",
        Error::InvalidState { .. } => "InvalidStateError",
        Error::Interrupted { .. } => "MachineInterruptedError",
        Error::BootFailed { .. } => "BootFailedError",
        Error::Timeout { .. } => "SmolTimeoutError",
        Error::HypervisorUnavailable { .. } | Error::KvmUnavailable { .. } => {
            "HypervisorUnavailableError"
        }
        _ => "SmolError",
    };
    let extra = PyDict::new(py);
    let fill = || -> PyResult<()> {
        if let Some(h) = e.hint() {
            extra.set_item("hint", h)?;
        }
        match &e {
            Error::CommandFailed {
                command,
                exit_code,
                stdout,
                stderr,
            } => {
                extra.set_item("command", command)?;
                extra.set_item("exit_code", exit_code)?;
                extra.set_item("stdout", stdout)?;
                extra.set_item("stderr", stderr)?;
            }
            Error::BootFailed { log_tail, .. } => extra.set_item("log_tail", log_tail)?,
            Error::PortUnavailable { port, .. } => extra.set_item("port", port)?,
            _ => {}
        }
        Ok(())
    };
    if let Err(err) = fill() {
        return err;
    }
    build(py, class, e.code(), &e.to_string(), extra)
}

/// A binding-level error of class `class` (a name in `smol.errors`) with `code`.
pub(crate) fn new_err(py: Python<'_>, class: &str, code: &str, message: &str) -> PyErr {
    build(py, class, code, message, PyDict::new(py))
}

fn build(
    py: Python<'_>,
    class: &str,
    code: &str,
    message: &str,
    extra: Bound<'_, PyDict>,
) -> PyErr {
    let made = FACTORY
        .import(py, "smol.errors", "_from_native")
        .and_then(|f| f.call1((class, code, message, extra)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        // smol.errors itself failed to import: that error says why.
        Err(e) => e,
    }
}
