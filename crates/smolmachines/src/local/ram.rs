//! Guest RAM in a file, for branch sources (`MachineConfig.branchable`), and the sparse copies
//! that freeze it (and a disk layer) at a branch.
//!
//! A branchable machine's RAM is a QEMU `memory-backend-file` with `share=on` on tmpfs: the
//! guest's memory is the file's pages, so a migration with `x-ignore-shared` saves only the
//! device state and a copy of the file is the memory at that instant (TCG-NOTES §5 C). The file
//! is `<run dir>/machines/<name>/ram` when the run directory is on tmpfs, else
//! `/dev/shm/smol-<uid>-<hash of the run directory>/<name>/ram` (a file on a disk file system
//! would make every guest write a disk write-back). The directory goes with the machine.
//!
//! *Orphans:* an engine's root under `/dev/shm` holds a file `engine` naming its
//! `<run dir>/machines` (written by [`dir`] once the root exists), so when a run directory is
//! removed without its machines (a test's temporary engine), a later process's reaper scan
//! removes the root ([`remove_orphans`]: its machines' VMMs, if any still run, keep what they
//! mapped); a root without that file is removed when it holds
//! nothing but directories, all empty and untouched for [`ORPHAN_AGE`].

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Name of a branchable machine's RAM file in its RAM directory.
pub const FILE: &str = "ram";
/// The file in an engine's root under `/dev/shm` that names its `<run dir>/machines`.
const OWNER_FILE: &str = "engine";
/// Where engines' RAM roots are made when their run directory is not on tmpfs.
const SHM: &str = "/dev/shm";
/// How long an orphaned-looking root must be untouched before it is removed.
pub const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(600);
/// `statfs` magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `path` is on tmpfs.
pub fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_type as i64 == TMPFS_MAGIC
}

/// The directory of machine `name`'s RAM files, `machines` being the engine's
/// `<run dir>/machines` (see the module documentation).
pub fn dir(machines: &Path, name: &str) -> PathBuf {
    // the run directory itself may not exist yet: look at the closest existing ancestor
    let probe = machines
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if on_tmpfs(probe) {
        return machines.join(name);
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in machines.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    let root = Path::new(SHM).join(format!("{}{h:08x}", root_prefix()));
    claim(&root, machines);
    root.join(name)
}

/// `smol-<uid>-`: the start of this user's engine roots under `/dev/shm`.
fn root_prefix() -> String {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    format!("smol-{uid}-")
}

/// Writes `root`'s owner file (naming `machines`) when the root exists without one.
fn claim(root: &Path, machines: &Path) {
    let owner = root.join(OWNER_FILE);
    if !root.is_dir() || owner.exists() {
        return;
    }
    let tmp = root.join(format!(".{OWNER_FILE}.{:x}", rand::random::<u32>()));
    let written = std::fs::write(&tmp, machines.as_os_str().as_encoded_bytes())
        .and_then(|()| std::fs::rename(&tmp, &owner));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(path = %owner.display(), error = %e, "RAM root: owner file not written");
    }
}

/// Removes this user's engine roots under `/dev/shm` whose run directory is gone, or (without
/// an owner file) that hold only empty directories untouched for [`ORPHAN_AGE`]; how many.
/// Blocking; a failure is logged.
pub fn remove_orphans() -> usize {
    remove_orphans_in(Path::new(SHM), &root_prefix(), ORPHAN_AGE)
}

fn remove_orphans_in(shm: &Path, prefix: &str, age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(shm) else {
        return 0;
    };
    let old = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|e| e >= age)
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let root = e.path();
        let named = e.file_name().to_string_lossy().starts_with(prefix);
        if !named || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let orphan = match std::fs::read(root.join(OWNER_FILE)) {
            Ok(machines) => {
                let machines = PathBuf::from(std::ffi::OsString::from(
                    String::from_utf8_lossy(&machines).into_owned(),
                ));
                // the run directory, not `machines`, which is made with the first machine
                let run = machines.parent().unwrap_or(&machines).to_path_buf();
                // (the run directory is made before any machine's RAM directory)
                !run.exists()
            }
            Err(_) => {
                old(&root)
                    && std::fs::read_dir(&root).is_ok_and(|d| {
                        d.flatten().all(|m| {
                            let p = m.path();
                            m.file_type().is_ok_and(|t| t.is_dir())
                                && old(&p)
                                && std::fs::read_dir(&p).is_ok_and(|mut c| c.next().is_none())
                        })
                    })
            }
        };
        if !orphan {
            continue;
        }
        match std::fs::remove_dir_all(&root) {
            Ok(()) => {
                tracing::info!(path = %root.display(), "removed an orphaned RAM root");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(path = %root.display(), error = %e, "cannot remove an orphaned RAM root")
            }
        }
    }
    removed
}

/// Removes a machine's RAM directory (blocking) and, when it was under `/dev/shm`, the engine's
/// directory there once it is empty. A directory that is gone already is fine.
pub fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove a RAM directory")
        }
    }
    let Some(root) = dir.parent().filter(|p| p.starts_with(SHM)) else {
        return;
    };
    // empty but for its owner file: that goes too (the next `dir` of the engine writes it
    // again)
    let only_owner = std::fs::read_dir(root).is_ok_and(|d| {
        d.flatten()
            .all(|e| e.file_name() == std::ffi::OsStr::new(OWNER_FILE))
    });
    if only_owner {
        let _ = std::fs::remove_file(root.join(OWNER_FILE));
    }
    if let Err(e) = std::fs::remove_dir(root) {
        // another machine of the engine still has its directory there
        tracing::trace!(path = %root.display(), error = %e, "RAM root kept");
    }
}

fn storage(path: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::NoSpace {
            detail: format!("copying to {}: {e}", path.display()),
        }
    } else {
        Error::Storage {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// Copies `src` to a new file `dst` (same length), only its data extents: holes stay holes,
/// so a sparse RAM file of a 512 MiB guest that touched 60 MiB costs 60 MiB. Blocking.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<u64> {
    let from = std::fs::File::open(src).map_err(|e| storage(src, e))?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| storage(dst, e))?;
    let len = from.metadata().map_err(|e| storage(src, e))?.len();
    to.set_len(len).map_err(|e| storage(dst, e))?;
    let fi = from.as_raw_fd();
    let mut copied = 0u64;
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fi, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(storage(src, e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(storage(src, std::io::Error::last_os_error()));
        }
        copy_range(&from, &to, data as u64, (hole - data) as u64, dst)?;
        copied += (hole - data) as u64;
        at = hole;
    }
    Ok(copied)
}

/// Copies `n` bytes at `off` of `from` to the same offset of `to`: `copy_file_range`, else
/// (a kernel or file system without it) `pread` / `pwrite`.
fn copy_range(
    from: &std::fs::File,
    to: &std::fs::File,
    off: u64,
    n: u64,
    dst: &Path,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut done, mut fallback) = (0u64, false);
    while done < n {
        if !fallback {
            let mut oi = (off + done) as i64;
            let mut oo = (off + done) as i64;
            let want = (n - done).min(1 << 30) as usize;
            // SAFETY: both descriptors are ours; the offsets are plain integers we own.
            let r = unsafe {
                libc::copy_file_range(from.as_raw_fd(), &mut oi, to.as_raw_fd(), &mut oo, want, 0)
            };
            if r > 0 {
                done += r as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match (r, e.raw_os_error()) {
                (0, _) => return Err(storage(dst, std::io::ErrorKind::UnexpectedEof.into())),
                (_, Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)) => {
                    tracing::debug!(error = %e, "copy_file_range unavailable; copying by hand");
                    fallback = true;
                    continue;
                }
                _ => return Err(storage(dst, e)),
            }
        }
        let mut buf = vec![0u8; (n - done).min(1 << 20) as usize];
        let got = from
            .read_at(&mut buf, off + done)
            .map_err(|e| storage(dst, e))?;
        if got == 0 {
            return Err(storage(dst, std::io::ErrorKind::UnexpectedEof.into()));
        }
        to.write_all_at(&buf[..got], off + done)
            .map_err(|e| storage(dst, e))?;
        done += got as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn a_sparse_copy_keeps_content_and_holes() {
        let d = tempfile::tempdir_in("/dev/shm").unwrap();
        let src = d.path().join("src");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = d.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // holes stayed holes: far less than 64 MiB allocated
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20);
        // never over an existing file
        assert!(copy_sparse(&src, &dst).is_err());
    }

    #[test]
    fn ram_lives_on_tmpfs() {
        assert!(on_tmpfs(Path::new("/dev/shm")));
        let d = dir(Path::new("/nonexistent-smol-test/run/machines"), "m1");
        let probe = if on_tmpfs(Path::new("/")) {
            PathBuf::from("/nonexistent-smol-test/run/machines/m1")
        } else {
            d.clone()
        };
        assert_eq!(d, probe);
        assert!(d.ends_with("m1"));
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        assert_eq!(dir(shm.path(), "m2"), shm.path().join("m2"));
    }

    #[test]
    fn orphaned_roots_go_and_the_others_stay() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let run = tempfile::tempdir().unwrap();
        let root = |n: &str| shm.path().join(format!("smol-t-{n}"));
        // owned by a run directory that is gone, with a RAM file: removed
        std::fs::create_dir_all(root("gone").join("m1")).unwrap();
        std::fs::write(root("gone").join("m1").join("ram"), b"x").unwrap();
        std::fs::write(
            root("gone").join(OWNER_FILE),
            "/nonexistent-smol/run/machines",
        )
        .unwrap();
        // owned by a run directory that exists: kept
        std::fs::create_dir_all(root("live").join("m1")).unwrap();
        let machines = run.path().join("machines");
        claim(&root("live"), &machines);
        assert_eq!(
            std::fs::read(root("live").join(OWNER_FILE)).unwrap(),
            machines.as_os_str().as_encoded_bytes()
        );
        // no owner: only empty directories -> removed; a file -> kept
        std::fs::create_dir_all(root("empty").join("m1")).unwrap();
        std::fs::create_dir_all(root("full").join("m1")).unwrap();
        std::fs::write(root("full").join("m1").join("ram"), b"x").unwrap();
        // another user's prefix: never looked at
        std::fs::create_dir_all(shm.path().join("smol-u-gone")).unwrap();
        // an owner whose run directory is gone: at once; empty directories: once old enough
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(remove_orphans_in(shm.path(), "smol-t-", hour), 1);
        assert!(!root("gone").exists() && root("empty").exists());
        assert_eq!(
            remove_orphans_in(shm.path(), "smol-t-", std::time::Duration::ZERO),
            1
        );
        assert!(!root("empty").exists());
        assert!(root("live").join("m1").exists() && root("full").join("m1").join("ram").exists());
        assert!(shm.path().join("smol-u-gone").exists());
        // a root with nothing but its owner file goes with its last machine directory
        remove_dir(&root("live").join("m1"));
        assert!(!root("live").exists());
    }
}
