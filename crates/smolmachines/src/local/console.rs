//! The guest console's log on the host (`console.log`, QEMU's serial chardev, opened
//! `append=on`), capped: a guest that writes to its console without end (its root can drive the
//! serial port directly, so no limit inside the guest holds) would otherwise fill the host's disk.
//!
//! While the machine's supervisor runs (the process that booted it), the log is checked every
//! [`CHECK`]; past [`cap`] bytes its last [`KEEP`] bytes move to `console.log.0` and the log
//! starts again empty (QEMU appends, so its next write lands at the new end). A crash report
//! still reads the latest lines. On disk: at most the cap plus what the guest writes in one
//! check (the serial port moved 340 KB/s in a flood under TCG), plus `KEEP`. A detached
//! machine whose owner process ended is trimmed by each reaper run (an engine's first operation
//! on the home, then at most every `REAP_INTERVAL`), not in between (docs/threat-model.md).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The log's size past which it is trimmed.
pub const CAP: u64 = 8 << 20;
/// What a trim keeps (in `console.log.0`).
pub const KEEP: u64 = 1 << 20;
/// How often the supervisor checks the log.
pub const CHECK: Duration = Duration::from_secs(1);

/// The cap in effect: [`CAP`], or `SMOL_TEST_CONSOLE_CAP` bytes (test-only, at least 64 KiB).
pub fn cap() -> u64 {
    std::env::var("SMOL_TEST_CONSOLE_CAP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(CAP, |v| v.max(64 << 10))
}

/// Where a trim keeps the log's last bytes: `console.log` -> `console.log.0`.
pub fn older(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".0");
    log.with_file_name(name)
}

/// Trims `log` when it is past `cap` bytes: its last [`KEEP`] bytes (at most a quarter of the
/// cap) go to [`older`], the log is emptied. Whether it trimmed.
pub fn trim(log: &Path, cap: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    let keep = KEEP.min(cap / 4);
    let mut f = std::fs::File::open(log)?;
    f.seek(SeekFrom::Start(len - keep))?;
    let mut tail = Vec::with_capacity(keep as usize);
    f.take(keep).read_to_end(&mut tail)?;
    let tmp = older(log).with_extension("0.tmp");
    std::fs::write(&tmp, &tail)?;
    std::fs::rename(&tmp, older(log))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// [`trim`] with its outcome logged (a trim at debug level, a failure as a warning).
pub fn trim_logged(log: &Path, cap: u64) {
    match trim(log, cap) {
        Ok(true) => tracing::debug!(log = %log.display(), cap, "console log trimmed"),
        Ok(false) => {}
        Err(e) => tracing::warn!(log = %log.display(), error = %e, "cannot trim the console log"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_past_the_cap_keeps_its_end_and_starts_again() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        assert!(!trim(&log, 1000).unwrap(), "no log yet");
        std::fs::write(&log, vec![b'a'; 1000]).unwrap();
        assert!(!trim(&log, 1000).unwrap(), "at the cap");
        let mut text = vec![b'a'; 2000];
        text.extend_from_slice(b"last line\n");
        std::fs::write(&log, &text).unwrap();
        assert!(trim(&log, 1000).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let kept = std::fs::read(older(&log)).unwrap();
        assert_eq!(kept.len(), 250, "a quarter of the cap");
        assert!(kept.ends_with(b"last line\n"));
        assert_eq!(older(&log), d.path().join("console.log.0"));
    }
}
