//! Host directories shared with the guest over virtio-fs: one `virtiofsd` per mount, started
//! before QEMU and ending with it. The daemon pivots into the shared directory, so nothing
//! outside it is reachable from the guest (symlinks and `..` resolve inside); a read-only mount
//! is a read-only bind mount in the daemon's own mount namespace, so the host enforces it, not
//! the guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::record::MountRecord;
use crate::config::MountSpec;
use crate::error::{Error, Result};

/// The virtiofsd binary: `SMOL_VIRTIOFSD`, else Debian QEMU's.
pub fn virtiofsd() -> PathBuf {
    std::env::var_os("SMOL_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/qemu/virtiofsd"))
}

/// Checks mount specs and resolves their sources.
pub fn validate(specs: &[MountSpec]) -> Result<Vec<MountRecord>> {
    let mut out: Vec<MountRecord> = Vec::new();
    for m in specs {
        let src = &m.source;
        if !src.starts_with('/') {
            return Err(Error::invalid(format!(
                "mount source {src:?} must be an absolute host path (like {:?})",
                std::path::absolute(src)
                    .map_or_else(|_| "/path/to/dir".into(), |p| p.display().to_string())
            )));
        }
        let meta = match std::fs::metadata(src) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    what: format!("mount source {src} (no such host directory)"),
                })
            }
            Err(e) => {
                return Err(Error::MountSource {
                    source_path: src.clone(),
                    reason: e.to_string(),
                })
            }
        };
        if !meta.is_dir() {
            return Err(Error::invalid(format!(
                "mount source {src} is not a directory: only directories can be mounted \
                 (mount its parent, or copy the file in with write_file)"
            )));
        }
        let source = std::fs::canonicalize(src).map_err(|e| Error::MountSource {
            source_path: src.clone(),
            reason: e.to_string(),
        })?;
        let t = &m.target;
        if !t.starts_with('/') || t == "/" || t.contains(|c: char| c == ':' || c.is_whitespace()) {
            return Err(Error::invalid(format!(
                "mount target {t:?} must be an absolute guest path other than /, without ':' or spaces"
            )));
        }
        if out.iter().any(|o| &o.target == t) {
            return Err(Error::invalid(format!("two mounts on {t}")));
        }
        out.push(MountRecord {
            source,
            target: t.clone(),
            read_only: m.read_only,
        });
    }
    if !out.is_empty() && !virtiofsd().is_file() {
        return Err(super::programs::missing(
            "/usr/lib/qemu/virtiofsd",
            format!(
                "{} is not there (or set SMOL_VIRTIOFSD)",
                virtiofsd().display()
            ),
        ));
    }
    Ok(out)
}

/// Tag of mount `i` (what the guest mounts).
pub fn tag(i: usize) -> String {
    format!("smolfs{i}")
}

/// Socket of mount `i` in the machine directory.
pub fn socket(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("fs{i}.sock"))
}

/// Starts the daemon of mount `i` and waits for its socket.
pub fn spawn(dir: &Path, i: usize, m: &MountRecord) -> Result<Child> {
    let sock = socket(dir, i);
    // A stale socket left in place would end the wait below at once, before the daemon
    // listens.
    crate::cleanup::remove_if_present(&sock).map_err(|e| {
        Error::io(
            format!("removing the stale virtiofsd socket {}", sock.display()),
            e,
        )
    })?;
    let log_path = dir.join(format!("virtiofsd{i}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io("virtiofsd log", e))?;
    let daemon = virtiofsd();
    let mut cmd = if m.read_only {
        let point = dir.join(format!("ro{i}"));
        std::fs::create_dir_all(&point).map_err(|e| Error::io("mount point", e))?;
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind \"$1\" \"$2\" && mount -o remount,bind,ro \"$2\" && \
                 exec \"$3\" --socket-path=\"$4\" -o source=\"$2\" -o cache=auto -o sandbox=namespace",
            )
            .arg("smol-virtiofsd")
            .arg(&m.source)
            .arg(&point)
            .arg(&daemon)
            .arg(&sock);
        c
    } else {
        let mut c = Command::new(&daemon);
        c.arg(format!("--socket-path={}", sock.display()))
            .arg("-o")
            .arg(format!("source={}", m.source.display()))
            .args(["-o", "cache=auto", "-o", "sandbox=namespace"]);
        c
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; the daemon gets its own session like the VMM.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let plan = super::confine::helper(dir);
    super::confine::warn_partial("virtiofsd", &plan);
    super::confine::apply(&mut cmd, plan);
    let mut child = cmd.spawn().map_err(|e| Error::MountSource {
        source_path: m.source.display().to_string(),
        reason: format!("starting {}: {e}", daemon.display()),
    })?;
    let t0 = Instant::now();
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::MountSource {
                source_path: m.source.display().to_string(),
                reason: format!(
                    "virtiofsd exited ({status}): {}",
                    super::vmm::tail(&log_path, 5)
                ),
            });
        }
        if t0.elapsed() > Duration::from_secs(10) {
            crate::cleanup::kill_quietly(&mut child, "virtiofsd");
            return Err(Error::MountSource {
                source_path: m.source.display().to_string(),
                reason: "virtiofsd did not start within 10 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, target: &str) -> MountSpec {
        MountSpec {
            source: source.into(),
            target: target.into(),
            read_only: false,
            staged: false,
        }
    }

    #[test]
    fn validation() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().to_str().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, "x").unwrap();
        match validate(&[spec("rel/dir", "/w")]) {
            Err(Error::InvalidConfig { message }) => {
                assert!(
                    message.contains("\"rel/dir\" must be an absolute"),
                    "{message}"
                )
            }
            other => panic!("a relative source: {other:?}"),
        }
        match validate(&[spec("/no/such/dir", "/w")]) {
            Err(Error::NotFound { what }) => assert!(what.contains("/no/such/dir"), "{what}"),
            other => panic!("a missing source: {other:?}"),
        }
        match validate(&[spec(file.to_str().unwrap(), "/w")]) {
            Err(Error::InvalidConfig { message }) => {
                assert!(message.contains("is not a directory"), "{message}")
            }
            other => panic!("a file as source: {other:?}"),
        }
        assert!(matches!(
            validate(&[spec(src, "w")]),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(matches!(
            validate(&[spec(src, "/")]),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(matches!(
            validate(&[spec(src, "/w"), spec(src, "/w")]),
            Err(Error::InvalidConfig { .. })
        ));
        if virtiofsd().is_file() {
            let ok = validate(&[spec(src, "/w")]).unwrap();
            assert_eq!(ok[0].source, std::fs::canonicalize(d.path()).unwrap());
        }
    }

    #[test]
    fn a_stale_socket_that_cannot_be_removed_is_an_error_before_the_daemon_starts() {
        let d = tempfile::tempdir().unwrap();
        // In the way of the socket: a directory with content (not removable as a file).
        // Left there, it would end the wait for the socket at once.
        let sock = socket(d.path(), 0);
        std::fs::create_dir(&sock).unwrap();
        std::fs::write(sock.join("x"), b"x").unwrap();
        let m = MountRecord {
            source: d.path().to_path_buf(),
            target: "/w".into(),
            read_only: false,
        };
        match spawn(d.path(), 0, &m) {
            Err(Error::Io { context, .. }) => {
                assert!(context.contains("stale virtiofsd socket"), "{context}");
                assert!(context.contains("fs0.sock"), "{context}");
            }
            Err(other) => panic!("expected an I/O error naming the socket, got {other:?}"),
            Ok(mut child) => {
                crate::cleanup::kill_quietly(&mut child, "virtiofsd");
                panic!("virtiofsd started although its socket path was in the way");
            }
        }
        assert!(
            !d.path().join("virtiofsd0.log").exists(),
            "nothing was started"
        );
    }
}
