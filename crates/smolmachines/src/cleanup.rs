//! Best-effort cleanup with a log line: removing a file that may be gone, ending a helper
//! process that may have exited. The expected case (`NotFound`, an exited child) is silent;
//! every other failure is logged with `tracing` (what, path or pid, the error) and dropped,
//! because the caller is already failing or done and has nothing better to report.

use std::io;
use std::path::Path;
use std::process::Child;

/// Removes `path` if it is there: `NotFound` is success, any other failure is returned (for a
/// removal the caller depends on, e.g. a stale socket it is about to wait for).
pub(crate) fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes a file that may be gone already (`what` says which, for the log line).
pub(crate) fn remove_quietly(path: &Path, what: &str) {
    if let Err(e) = remove_if_present(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove {what}");
    }
}

/// Kills a helper process that may have exited already and reaps it (so it leaves no zombie).
/// Blocking: the wait after SIGKILL is short, but call it off the async runtime.
pub(crate) fn kill_quietly(child: &mut Child, what: &str) {
    let pid = child.id();
    // An exited child not reaped yet still takes the signal (Ok); one reaped already is Ok
    // in today's std and InvalidInput in older ones; anything else is a failed kill(2).
    match child.kill() {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return,
        Err(e) => tracing::warn!(pid, error = %e, "cannot kill {what}"),
    }
    match child.wait() {
        Ok(status) => tracing::debug!(pid, %status, "{what} ended"),
        Err(e) => tracing::warn!(pid, error = %e, "cannot reap {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_if_present_is_ok_when_gone_and_fails_otherwise() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        remove_if_present(&f).unwrap();
        assert!(!f.exists());
        remove_if_present(&f).unwrap();
        // A directory is not removed as a file: the caller hears of it.
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(remove_if_present(&sub).is_err());
        remove_quietly(&sub, "test directory");
        assert!(sub.exists());
    }

    #[test]
    fn kill_quietly_ends_and_reaps_running_and_exited_children() {
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        kill_quietly(&mut running, "sleep");
        // Reaped: nothing is left to wait for.
        assert!(running.try_wait().unwrap().is_some());
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        exited.wait().unwrap();
        kill_quietly(&mut exited, "true");
    }
}
