//! `Op::WriteFile` and `Op::ReadFile`.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use smol_protocol::mux::Stream;
use smol_protocol::{Chan, ErrorKind, Frame, RemoteError, MAX_CHUNK};

fn absolute(path: &str) -> Result<&Path, RemoteError> {
    if !path.starts_with('/') {
        return Err(crate::serve::invalid(format!(
            "path must be absolute, got {path:?}"
        )));
    }
    Ok(Path::new(path))
}

fn closed(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::new(ErrorKind::Io, e.to_string())
}

/// Writes the bytes that follow on `stream` to `path`. A regular file is replaced atomically
/// (written beside it, then renamed), so a failed write leaves the old content intact.
pub async fn write(stream: Stream, path: &str, mode: Option<u32>) -> Result<Frame, RemoteError> {
    let Stream { tx, mut rx } = stream;
    let target = absolute(path)?;
    // Write through a symlink to its target.
    let target: PathBuf = match fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf())
        }
        _ => target.to_path_buf(),
    };
    let existing = fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(RemoteError::new(
            ErrorKind::IsADirectory,
            format!("{path}: is a directory"),
        ));
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| RemoteError::from_io(&e, &parent.display().to_string()))?;
    }
    let in_place = existing.as_ref().is_some_and(|m| !m.is_file());
    let mode = mode.unwrap_or_else(|| {
        existing
            .as_ref()
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644)
    });
    let tmp = if in_place {
        target.clone()
    } else {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        target.with_file_name(format!(".{name}.smol-{}", tx.id()))
    };
    let io_err = |e: std::io::Error| RemoteError::from_io(&e, path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    let result: Result<(), RemoteError> = async {
        loop {
            match rx.recv().await.map_err(closed)? {
                Frame::Data {
                    chan: Chan::File,
                    data,
                    ..
                } => file.write_all(&data).map_err(io_err)?,
                Frame::Eof {
                    chan: Chan::File, ..
                } => break,
                Frame::Cancel { .. } => return Err(closed("write cancelled by the host")),
                _ => {}
            }
        }
        if !in_place {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err)?;
            fs::rename(&tmp, &target).map_err(io_err)?;
        }
        Ok(())
    }
    .await;
    if result.is_err() && !in_place {
        crate::quiet::remove_quietly(&tmp);
    }
    result.map(|_| Frame::Done { id: tx.id() })
}

/// Sends the content of `path` on `stream`.
pub async fn read(stream: Stream, path: &str) -> Result<Frame, RemoteError> {
    let Stream { tx, mut rx } = stream;
    let p = absolute(path)?;
    let io_err = |e: std::io::Error| RemoteError::from_io(&e, path);
    let meta = fs::metadata(p).map_err(io_err)?;
    if meta.is_dir() {
        return Err(RemoteError::new(
            ErrorKind::IsADirectory,
            format!("{path}: is a directory"),
        ));
    }
    let mut file = fs::File::open(p).map_err(io_err)?;
    loop {
        let mut buf = Vec::with_capacity(MAX_CHUNK);
        let n = (&mut file)
            .take(MAX_CHUNK as u64)
            .read_to_end(&mut buf)
            .map_err(io_err)?;
        if n == 0 {
            break;
        }
        tokio::select! {
            r = tx.send_owned(Chan::File, buf) => r.map_err(closed)?,
            f = rx.recv() => match f {
                Ok(Frame::Cancel { .. }) | Err(_) => return Err(closed("read cancelled by the host")),
                Ok(_) => {}
            },
        }
    }
    Ok(Frame::Done { id: tx.id() })
}
