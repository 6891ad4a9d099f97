//! The per-machine writable disk: a qcow2 overlay over a formatted, sparse ext4 template made
//! once per size. Creating a machine's disk is then a `qemu-img create` (milliseconds), and the
//! qcow2 layer is what later snapshots build on.
//!
//! Both are async: `mkfs.ext4` and `qemu-img` run through `tokio::process`, so a create never
//! blocks a runtime thread.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::error::{Error, Result};

/// Label of the ext4 file system; the agent finds the disk by the virtio-blk serial instead.
pub const SERIAL: &str = "smol-disk";

async fn run(cmd: &mut Command, what: &str, path: &Path) -> Result<()> {
    let program = what.split(' ').next().unwrap_or(what);
    tracing::debug!(command = what, path = %path.display(), "running");
    let out = cmd.output().await.map_err(|e| {
        super::programs::spawn_error(program, e, |e| Error::Storage {
            path: path.to_path_buf(),
            message: format!("{what}: {e}"),
        })
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("No space left") {
        Err(Error::NoSpace {
            detail: format!("{what} {}: {stderr}", path.display()),
        })
    } else {
        Err(Error::Storage {
            path: path.to_path_buf(),
            message: format!("{what} failed: {stderr}"),
        })
    }
}

/// The formatted template of `size_gb` GiB under `<home>/templates`, made on first use.
pub async fn template(home: &Path, size_gb: u32) -> Result<PathBuf> {
    let dir = home.join("templates");
    let path = dir.join(format!("ext4-{size_gb}g.raw"));
    if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()) {
        return Ok(path);
    }
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| Error::Storage {
            path: dir.clone(),
            message: e.to_string(),
        })?;
    let tmp = dir.join(format!(
        ".ext4-{size_gb}g.{}.{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let f = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| Error::Storage {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
    f.set_len(u64::from(size_gb) << 30)
        .await
        .map_err(|e| Error::Storage {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
    drop(f);
    let made = run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", SERIAL, "-m", "0"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&tmp),
        "mkfs.ext4",
        &tmp,
    )
    .await;
    if let Err(e) = made {
        remove_tmp(&tmp).await;
        return Err(e);
    }
    // Publish without ever replacing a template that disks may already be layered on (each
    // mkfs makes a different file system): the first to link it wins, the others use it.
    let linked = tokio::fs::hard_link(&tmp, &path).await;
    remove_tmp(&tmp).await;
    match linked {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(Error::Storage {
            path: path.clone(),
            message: e.to_string(),
        }),
    }
}

async fn remove_tmp(tmp: &Path) {
    if let Err(e) = tokio::fs::remove_file(tmp).await {
        tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a template's temporary file");
    }
}

/// Creates the machine's disk at `path` over the template of `size_gb`.
pub async fn create(home: &Path, path: &Path, size_gb: u32) -> Result<()> {
    let base = template(home, size_gb).await?;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::Storage {
                path: parent.to_path_buf(),
                message: e.to_string(),
            })?;
    }
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(path),
        "qemu-img create",
        path,
    )
    .await
}

/// Creates the disk of a clone at `path`: a qcow2 overlay whose backing file is `backing`, a
/// frozen qcow2 layer named relative to `path`'s directory (so a machine's chain of layers is
/// self-contained in its directory, each layer a hard link: see `local::branch`).
pub async fn create_overlay(path: &Path, backing: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    run(
        Command::new("qemu-img")
            .current_dir(dir)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing])
            .arg(path),
        "qemu-img create",
        path,
    )
    .await
}

/// Writes the disk `src` (a qcow2 overlay and every layer below it) as one standalone qcow2
/// `dst` (a checkpoint's disk): zero and unallocated clusters are not written. `src`'s layers
/// are opened read-only and shared (`-U`), so a running VMM's own layers do not block it.
pub async fn flatten(src: &Path, dst: &Path) -> Result<()> {
    run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "qcow2"])
            .arg(src)
            .arg(dst),
        "qemu-img convert",
        dst,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_use_makes_one_template() {
        let home = tempfile::tempdir().unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let h = home.path().to_path_buf();
                tokio::spawn(async move { template(&h, 1).await.unwrap() })
            })
            .collect();
        let mut paths = Vec::new();
        for t in tasks {
            paths.push(t.await.unwrap());
        }
        assert!(paths.windows(2).all(|w| w[0] == w[1]));
        let left: Vec<_> = std::fs::read_dir(home.path().join("templates"))
            .unwrap()
            .collect();
        assert_eq!(left.len(), 1, "temporary files left: {left:?}");
    }

    #[tokio::test]
    async fn disk_over_a_shared_template() {
        let home = tempfile::tempdir().unwrap();
        let d1 = home.path().join("m/a/disk.qcow2");
        let d2 = home.path().join("m/b/disk.qcow2");
        create(home.path(), &d1, 1).await.unwrap();
        create(home.path(), &d2, 1).await.unwrap();
        let t = template(home.path(), 1).await.unwrap();
        // sparse: a 1 GiB template takes a few MiB
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&t).unwrap().blocks() * 512 < 64 << 20);
        let info = std::process::Command::new("qemu-img")
            .arg("info")
            .arg(&d1)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains("qcow2") && info.contains("backing file"),
            "{info}"
        );
        assert!(d2.exists());
    }

    /// A missing program is a typed error naming it and its package; a failing one a storage
    /// error (through tokio::process: no panic, no hang).
    #[tokio::test]
    async fn a_missing_or_failing_tool_is_a_typed_error() {
        let home = tempfile::tempdir().unwrap();
        let e = run(
            &mut Command::new("/nonexistent/qemu-img"),
            "qemu-img create",
            home.path(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, Error::ProgramMissing { program, .. } if program == "qemu-img"),
            "{e:?}"
        );
        let e = run(&mut Command::new("false"), "false", home.path())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Storage { .. }), "{e:?}");
    }
}
