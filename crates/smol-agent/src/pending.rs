//! The hidden temporary files of `write_file`s in flight (`files::write`), listed on the
//! machine's disk so that the agent's next start removes those a killed VMM (or agent) left
//! beside their targets. The list holds NUL-terminated paths, is appended to before each
//! temporary file is made and emptied whenever no write is in flight; without a disk it lives
//! on the initramfs, where a reboot clears everything anyway. Each entry is synced to the
//! disk before the file it names is created.
//!
//! Off (no list) unless [`enable`] was called: the agent serving a unix socket in the unit
//! tests keeps nothing.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the agent in a guest keeps the list.
pub const LIST: &str = "/var/lib/smol-agent/pending-writes";

struct State {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    in_flight: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    path: None,
    file: None,
    in_flight: 0,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the list at `path` from now on, after removing what an earlier agent's list names
/// (its writes can no longer complete: their sessions are gone).
pub fn enable(path: &Path) {
    let removed = sweep(path);
    if removed > 0 {
        eprintln!("smol-agent: removed {removed} temporary file(s) of interrupted writes");
    }
    state().path = Some(path.to_path_buf());
}

/// Removes every file the list at `path` names that is still a hidden temporary file of a
/// write (`.<name>.smol-<id>`), then the list; how many were removed.
pub fn sweep(path: &Path) -> usize {
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    let mut removed = 0;
    for entry in bytes.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let tmp = PathBuf::from(std::ffi::OsStr::from_bytes(entry));
        if !is_temporary(&tmp) {
            continue;
        }
        if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_file()) {
            crate::quiet::remove_quietly(&tmp);
            removed += 1;
        }
    }
    crate::quiet::remove_quietly(path);
    removed
}

/// Whether `p` has the name of a write's temporary file: `.<name>.smol-<digits>`.
pub fn is_temporary(p: &Path) -> bool {
    let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some((head, id)) = name.rsplit_once(".smol-") else {
        return false;
    };
    head.starts_with('.')
        && head.len() > 1
        && !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit())
}

/// A temporary file is about to be made at `tmp`: listed first. A list that cannot be
/// written is said once and the write goes on (the file would only be left behind).
fn begin(tmp: &Path) {
    let mut s = state();
    s.in_flight += 1;
    let Some(path) = s.path.clone() else {
        return;
    };
    if s.file.is_none() {
        if let Some(d) = path.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => s.file = Some(f),
            Err(e) => {
                eprintln!(
                    "smol-agent: {}: {e}; interrupted writes may leave files",
                    path.display()
                );
                s.path = None;
                return;
            }
        }
    }
    let mut entry = tmp.as_os_str().as_bytes().to_vec();
    entry.push(0);
    if let Some(f) = s.file.as_mut() {
        // on the disk before the file it names is made (delayed allocation could otherwise
        // commit the file's entry first): one data sync per write, beside the write's own
        if let Err(e) = f.write_all(&entry).and_then(|_| f.sync_data()) {
            eprintln!("smol-agent: {}: {e}", path.display());
        }
    }
}

/// A write that [`begin`] listed ended (its file renamed into place or removed): the list is
/// emptied once no write is in flight.
fn end() {
    let mut s = state();
    s.in_flight = s.in_flight.saturating_sub(1);
    if s.in_flight == 0 {
        if let Some(f) = s.file.as_ref() {
            if let Err(e) = f.set_len(0) {
                eprintln!("smol-agent: emptying the list of writes in flight: {e}");
            }
        }
    }
}

/// A listed write in flight: [`end`] when dropped (also when its future is cancelled).
pub struct InFlight(());

impl InFlight {
    /// [`begin`] for `tmp`.
    pub fn begin(tmp: &Path) -> InFlight {
        begin(tmp);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised() {
        for yes in ["/r/.f.smol-3", "/.a.b.smol-12", "x/.f.smol-1"] {
            assert!(is_temporary(Path::new(yes)), "{yes}");
        }
        for no in [
            "/r/f.smol-3",
            "/r/.f.smol-",
            "/r/.f.smol-3x",
            "/r/.f",
            "/",
            ".smol-3",
        ] {
            assert!(!is_temporary(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn a_sweep_removes_only_listed_temporary_files_and_the_list() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join(".f.smol-7");
        let done = d.path().join(".g.smol-8"); // renamed away already
        let other = d.path().join("kept");
        let dir = d.path().join(".dir.smol-9");
        std::fs::write(&tmp, b"half").unwrap();
        std::fs::write(&other, b"mine").unwrap();
        std::fs::create_dir(&dir).unwrap();
        let list = d.path().join("list");
        let mut bytes = Vec::new();
        for p in [&tmp, &done, &other, &dir] {
            bytes.extend_from_slice(p.as_os_str().as_bytes());
            bytes.push(0);
        }
        std::fs::write(&list, bytes).unwrap();
        assert_eq!(sweep(&list), 1);
        assert!(!tmp.exists() && other.exists() && dir.exists() && !list.exists());
        assert_eq!(sweep(&list), 0, "no list: nothing to do");
    }
}
