//! What a machine's end leaves to clean up, each step logged rather than failing: how the VMM
//! ended (for errors), port listeners, files and directories that may be gone, helper processes.

pub(super) fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("the VMM exited with status {c}"),
            (None, Some(9)) => "the VMM was killed (SIGKILL)".into(),
            (None, Some(sig)) => format!("the VMM was killed by signal {sig}"),
            _ => "the VMM exited".into(),
        },
        Err(e) => format!("waiting for the VMM failed: {e}"),
    }
}

/// Stops port listeners and waits until they are gone, so their host ports are free when the
/// caller goes on (an aborted task drops its listener only when the runtime gets to it).
pub(super) async fn close_ports(tasks: Vec<(u16, tokio::task::JoinHandle<()>)>) {
    for (_, t) in &tasks {
        t.abort();
    }
    for (port, t) in tasks {
        match t.await {
            Err(e) if e.is_panic() => tracing::warn!(port, "a port listener panicked"),
            _ => {}
        }
    }
}

/// Removes a file that may be gone already; other failures are logged.
pub(super) fn remove_file_logged(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove"),
    }
}

/// Removes a directory tree that may be gone already (blocking); other failures are logged.
pub(super) fn remove_dir_logged(path: &std::path::Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove"),
    }
}

/// Kills helper processes and reaps them (waiting happens off the runtime when there is one).
pub(super) fn end_children(mut children: Vec<std::process::Child>) {
    if children.is_empty() {
        return;
    }
    for c in &mut children {
        // Helpers lead their own session (setsid), so the group is the helper and whatever it
        // forked (virtiofsd's sandboxed child): all of it goes at once.
        // SAFETY: signals the process group of a child we started; no memory involved.
        let group = unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        if group != 0 {
            if let Err(e) = c.kill() {
                tracing::debug!(pid = c.id(), error = %e, "helper already gone");
            }
        }
    }
    let reap = move || {
        for mut c in children {
            if let Err(e) = c.wait() {
                tracing::warn!(pid = c.id(), error = %e, "cannot reap a helper process");
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(reap);
        }
        Err(_) => reap(),
    }
}

/// Undoes a name reserved by a branch or a restore that failed before the machine existed:
/// its directories and its record (`what` names the operation in the log).
pub(super) async fn undo_reservation(
    db: &std::sync::Arc<super::state::StateDb>,
    dirs: [std::path::PathBuf; 3],
    name: &str,
    what: &str,
) {
    let n = name.to_string();
    let undone = db
        .call(move |db| {
            for d in &dirs {
                remove_dir_logged(d);
            }
            db.delete(&n)
        })
        .await;
    if let Err(u) = undone {
        tracing::warn!(error = %u, "cannot remove the record of a failed {what}");
    }
}
