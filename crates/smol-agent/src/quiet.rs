//! Best-effort steps: a failure is logged on the console (stderr, which PID 1 points at
//! `/dev/console`, i.e. the machine's `console.log`) and never ends the agent. The agent has no
//! `tracing` subscriber; every line starts with `smol-agent:` like its other messages.

use std::fmt::Display;
use std::io;
use std::path::Path;

/// Logs `what: error` on the console.
pub fn warn(what: impl Display, error: impl Display) {
    eprintln!("smol-agent: {what}: {error}");
}

/// Runs a best-effort step: an error is logged with `what` (the step and its path), then
/// dropped. Returns whether the step succeeded.
pub fn logged(what: impl Display, result: io::Result<()>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            warn(what, e);
            false
        }
    }
}

/// Removes a file that may be gone already (`NotFound` is the expected case and silent);
/// any other failure is logged with the path.
pub fn remove_quietly(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn(format_args!("removing {}", path.display()), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_reports_success_and_failure() {
        assert!(logged("nothing", Ok(())));
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("no/such/dir/file");
        assert!(!logged("writing", std::fs::write(&missing, b"x")));
    }

    #[test]
    fn remove_quietly_removes_and_tolerates_a_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        remove_quietly(&f);
        assert!(!f.exists());
        // Gone already: the expected case, nothing happens.
        remove_quietly(&f);
        // A directory cannot be removed as a file: logged, not a panic.
        remove_quietly(d.path());
        assert!(d.path().exists());
    }
}
