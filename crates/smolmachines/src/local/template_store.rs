//! Booted templates kept in the engine home across processes (issue 12, `local::template`).
//!
//! A template is a frozen machine (its record in the state database, labelled
//! [`TEMPLATE_LABEL`](super::template::TEMPLATE_LABEL), named by its key `tpl-<hash of its
//! inputs>`; its files where any machine's are: the frozen RAM file on the tmpfs of RAM files,
//! the device state in its run directory, its disk layers in its home directory). Its record
//! is persistent and has no owner, so the reaper leaves it; next to it, under `<home>/booted/`
//! (`<home>/templates/` holds the disks' ext4 templates):
//!
//! - `<key>.lock`: the key's lock (`flock`): *exclusive* while a process checks, removes or
//!   builds the template, *shared* while a create clones it. Its modification time is the
//!   template's last use (GC). A clone needs the template's files only while it is made (its
//!   QEMU maps the RAM file, its disk holds hard links to the template's layers), so the shared
//!   lock is held for that time only.
//! - `<key>.json`: the [`Manifest`]: the key's inputs, the boot id
//!   (`/proc/sys/kernel/random/boot_id`) the template was built under, and the sizes of its RAM
//!   and device-state files. Written last (renamed into place): a template without one is
//!   being built or is broken.
//!
//! A template is used only when its manifest, its boot id, its record (frozen) and its files
//! (sizes as built) all agree; otherwise it is removed and built again: after a reboot (the
//! RAM file is gone, the boot id differs), after damage (a truncated device state), or when a
//! clone of it failed (its manifest is removed then). Changed inputs are another key.
//!
//! *GC* ([`gc`], run by the reaper): a template not in use (its exclusive lock can be taken at
//! once) is removed when its manifest is missing or from another boot, when an input file
//! (kernel, initramfs, image root file system) no longer exists, when it was last used more
//! than `SMOL_TEMPLATE_MAX_AGE_DAYS` (default 7) days ago, or when more than `SMOL_TEMPLATE_MAX`
//! (default 8) templates are kept (the least recently used go). Space: at most that many
//! templates, each about its guest's touched RAM (on tmpfs) and a small disk overlay.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::reaper::Dirs;
use super::state::StateDb;
use super::template::TEMPLATE_LABEL;
use crate::error::Result;

/// The directory of the booted templates' locks and manifests, under the engine home.
pub const DIR: &str = "booted";

/// How long a create waits for a key's lock (another process building that template).
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(300);

/// What a template was built of, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The key (the template machine's name).
    pub key: String,
    /// The inputs the key was made of.
    pub inputs: Inputs,
    /// `/proc/sys/kernel/random/boot_id` when it was built.
    pub boot_id: String,
    /// A random id of this build (a rebuild has another).
    pub build_id: String,
    /// The process that built it.
    pub builder_pid: u32,
    /// When it was built (Unix seconds).
    pub built_unix: u64,
    /// Size of the frozen RAM file.
    pub ram_bytes: u64,
    /// Size of the saved device state.
    pub state_bytes: u64,
}

/// The boot inputs of a template (those its key is a hash of, with the input files' sizes and
/// modification times).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Inputs {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub image: Option<String>,
    pub rootfs: Option<PathBuf>,
    pub qemu: String,
    pub flavor: String,
    pub accel: String,
    pub cpus: u32,
    pub memory_mb: u32,
    pub storage_gb: u32,
    pub linger_ms: u64,
    pub run_dir: PathBuf,
    /// Image slots (`local::slots`): its devices are part of the frozen device state.
    #[serde(default)]
    pub image_slots: usize,
}

impl Inputs {
    /// Whether every input file still exists.
    fn exist(&self) -> bool {
        self.kernel.exists()
            && self.initrd.exists()
            && self.rootfs.as_ref().is_none_or(|r| r.exists())
    }
}

/// This boot's id (empty when unreadable: then every template is from "another boot").
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The lock file of `key` under `home`.
pub fn lock_path(home: &Path, key: &str) -> PathBuf {
    home.join(DIR).join(format!("{key}.lock"))
}

/// The manifest of `key` under `home`.
pub fn manifest_path(home: &Path, key: &str) -> PathBuf {
    home.join(DIR).join(format!("{key}.json"))
}

/// The manifest of `key`, if there is a readable one.
pub fn read_manifest(home: &Path, key: &str) -> std::result::Result<Manifest, String> {
    let path = manifest_path(home, key);
    let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// Writes `m` as its key's manifest (to a temporary name, then renamed into place).
pub(super) fn write_manifest(home: &Path, m: &Manifest) -> std::result::Result<(), String> {
    let path = manifest_path(home, &m.key);
    let tmp = path.with_extension(format!("{:x}.tmp", rand::random::<u32>()));
    let text = serde_json::to_vec_pretty(m).map_err(|e| format!("encoding the manifest: {e}"))?;
    std::fs::create_dir_all(home.join(DIR))
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {}: {e}", path.display())
        })
}

/// Removes `key`'s manifest: the template is not used again, the next create rebuilds it.
pub(super) fn discard(home: &Path, key: &str, why: &str) {
    let path = manifest_path(home, key);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::warn!(
            template = key,
            reason = why,
            "template discarded; the next create rebuilds it"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot discard a template"),
    }
}

/// A held lock on a key (released when dropped).
#[derive(Debug)]
pub struct KeyLock(pub(super) File);

impl KeyLock {
    /// Marks the template used now (the lock file's modification time).
    pub(super) fn touch(&self) {
        if let Err(e) = self.0.set_modified(SystemTime::now()) {
            tracing::debug!(error = %e, "cannot mark a template used");
        }
    }
}

/// The lock of `path`, `exclusive` or shared, if it can be taken at once. Holds only when the
/// file is still the one at `path` (GC removes lock files).
pub fn try_lock(path: &Path, exclusive: bool) -> std::io::Result<Option<KeyLock>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let same = match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    Ok(same.then_some(KeyLock(file)))
}

/// [`try_lock`], waiting up to `wait`.
pub(super) async fn lock(
    path: &Path,
    exclusive: bool,
    wait: Duration,
) -> std::result::Result<KeyLock, String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match try_lock(path, exclusive) {
            Ok(Some(l)) => return Ok(l),
            Ok(None) => {}
            Err(e) => return Err(format!("locking {}: {e}", path.display())),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{} still locked after {wait:?}", path.display()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes the template `key`: its record, its directories, its manifest and (last, with
/// `lock_file`) its lock file. The caller holds its exclusive lock. Blocking.
pub(crate) fn remove(
    db: &StateDb,
    dirs: &Dirs<'_>,
    home: &Path,
    key: &str,
    lock_file: bool,
) -> Result<()> {
    if db.get(key)?.is_some() {
        db.delete(key)?;
    }
    for d in [dirs.run.join(key), dirs.home.join(key)] {
        match std::fs::remove_dir_all(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %d.display(), error = %e, "cannot remove a template directory")
            }
        }
    }
    super::ram::remove_dir(&super::ram::dir(dirs.run, key));
    let mut files = vec![manifest_path(home, key)];
    if lock_file {
        files.push(lock_path(home, key));
    }
    for p in files {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove a template file")
            }
        }
    }
    Ok(())
}

/// What GC keeps.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A template not used for longer is removed.
    pub max_age: Duration,
    /// At most this many templates are kept (the most recently used).
    pub max: usize,
}

impl Policy {
    /// From `SMOL_TEMPLATE_MAX_AGE_DAYS` (default 7) and `SMOL_TEMPLATE_MAX` (default 8).
    pub fn from_env() -> Self {
        let num = |var: &str, default: u64| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Policy {
            max_age: Duration::from_secs(num("SMOL_TEMPLATE_MAX_AGE_DAYS", 7) * 86_400),
            max: num("SMOL_TEMPLATE_MAX", 8) as usize,
        }
    }
}

/// Removes the templates of `home` that `policy` does not keep, never one in use (whose lock
/// cannot be taken at once). Returns how many were removed. Blocking.
pub(crate) fn gc(db: &StateDb, dirs: &Dirs<'_>, home: &Path, policy: Policy) -> Result<usize> {
    let mut keys = std::collections::BTreeSet::new();
    let labels = [(TEMPLATE_LABEL.to_string(), "1".to_string())].into();
    for r in db.list(&labels)? {
        keys.insert(r.name);
    }
    if let Ok(entries) = std::fs::read_dir(home.join(DIR)) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(k) = n.strip_suffix(".lock").or_else(|| n.strip_suffix(".json")) {
                keys.insert(k.to_string());
            }
        }
    }
    if keys.is_empty() {
        return Ok(0);
    }
    let boot = boot_id();
    let now = SystemTime::now();
    let mut removed = 0;
    // (last use, key, its lock) of the templates kept so far
    let mut kept: Vec<(SystemTime, String, KeyLock)> = Vec::new();
    for key in keys {
        let lock = match try_lock(&lock_path(home, &key), true) {
            Ok(Some(l)) => l,
            Ok(None) => {
                tracing::debug!(template = %key, "template GC: in use, kept");
                continue;
            }
            Err(e) => {
                tracing::warn!(template = %key, error = %e, "template GC: cannot lock");
                continue;
            }
        };
        let rec = db.get(&key)?;
        if rec.as_ref().is_some_and(|r| !r.frozen && r.owner_alive()) {
            continue; // a machine of that name being made by a live process
        }
        let used = lock
            .0
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let why = match read_manifest(home, &key) {
            Err(e) => Some(e),
            Ok(m) if m.boot_id != boot => Some("built under another boot".into()),
            Ok(m) if !m.inputs.exist() => Some("an input file no longer exists".into()),
            Ok(_) if rec.as_ref().is_none_or(|r| !r.frozen) => {
                Some("its machine record is missing or not frozen".into())
            }
            Ok(_) if now.duration_since(used).unwrap_or_default() > policy.max_age => {
                Some(format!("not used for {:?}", policy.max_age))
            }
            Ok(_) => None,
        };
        match why {
            Some(why) => {
                tracing::info!(template = %key, reason = %why, "template GC: removed");
                remove(db, dirs, home, &key, true)?;
                removed += 1;
            }
            None => kept.push((used, key, lock)),
        }
    }
    kept.sort_by_key(|k| std::cmp::Reverse(k.0));
    for (_, key, _lock) in kept.into_iter().skip(policy.max) {
        tracing::info!(template = %key, max = policy.max, "template GC: removed (too many templates)");
        remove(db, dirs, home, &key, true)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_exclusive_of_others_and_of_a_removed_file() {
        let home = tempfile::tempdir().unwrap();
        let p = lock_path(home.path(), "tpl-1");
        let shared = try_lock(&p, false).unwrap().expect("free");
        let shared2 = try_lock(&p, false).unwrap().expect("shared twice");
        assert!(
            try_lock(&p, true).unwrap().is_none(),
            "exclusive while shared"
        );
        drop((shared, shared2));
        let ex = try_lock(&p, true).unwrap().expect("free again");
        assert!(
            try_lock(&p, false).unwrap().is_none(),
            "shared while exclusive"
        );
        // a lock file removed under a holder: a new lock is on the new file
        std::fs::remove_file(&p).unwrap();
        assert!(try_lock(&p, true).unwrap().is_some());
        drop(ex);
    }

    #[test]
    fn gc_removes_broken_old_and_extra_templates_but_never_one_in_use() {
        let home = tempfile::tempdir().unwrap();
        let db = StateDb::open(home.path()).unwrap();
        let (run, mhome) = (home.path().join("run"), home.path().join("machines"));
        let dirs = Dirs {
            run: &run,
            home: &mhome,
        };
        let kernel = home.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let make = |key: &str, boot: &str| {
            let mut r = super::super::record::Record::for_test(key);
            r.frozen = true;
            r.persistent = true;
            r.owner = None;
            r.labels.insert(TEMPLATE_LABEL.into(), "1".into());
            db.insert(&r).unwrap();
            std::fs::create_dir_all(mhome.join(key)).unwrap();
            let m = Manifest {
                key: key.into(),
                inputs: Inputs {
                    kernel: kernel.clone(),
                    initrd: kernel.clone(),
                    image: None,
                    rootfs: None,
                    qemu: "q".into(),
                    flavor: "smol".into(),
                    accel: "tcg".into(),
                    cpus: 1,
                    memory_mb: 256,
                    storage_gb: 1,
                    linger_ms: 1,
                    run_dir: run.clone(),
                    image_slots: 0,
                },
                boot_id: boot.into(),
                build_id: "b".into(),
                builder_pid: 1,
                built_unix: 0,
                ram_bytes: 0,
                state_bytes: 0,
            };
            write_manifest(home.path(), &m).unwrap();
            try_lock(&lock_path(home.path(), key), true)
                .unwrap()
                .unwrap();
        };
        let now = boot_id();
        make("tpl-fresh", &now);
        make("tpl-old", &now);
        make("tpl-reboot", "another-boot");
        make("tpl-busy", "another-boot");
        let old = SystemTime::now() - Duration::from_secs(30 * 86_400);
        File::options()
            .write(true)
            .open(lock_path(home.path(), "tpl-old"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let busy = try_lock(&lock_path(home.path(), "tpl-busy"), false)
            .unwrap()
            .unwrap();
        let policy = Policy {
            max_age: Duration::from_secs(86_400),
            max: 8,
        };
        assert_eq!(gc(&db, &dirs, home.path(), policy).unwrap(), 2);
        assert!(db.get("tpl-old").unwrap().is_none());
        assert!(db.get("tpl-reboot").unwrap().is_none());
        assert!(!mhome.join("tpl-old").exists());
        assert!(!manifest_path(home.path(), "tpl-old").exists());
        assert!(db.get("tpl-fresh").unwrap().is_some(), "kept");
        assert!(db.get("tpl-busy").unwrap().is_some(), "in use: kept");
        drop(busy);
        assert_eq!(
            gc(&db, &dirs, home.path(), policy).unwrap(),
            1,
            "tpl-busy, now free"
        );
        // the count bound: none kept
        let none = Policy { max: 0, ..policy };
        assert_eq!(gc(&db, &dirs, home.path(), none).unwrap(), 1);
        assert!(db.get("tpl-fresh").unwrap().is_none());
        // an input gone
        make("tpl-k", &now);
        std::fs::remove_file(&kernel).unwrap();
        assert_eq!(gc(&db, &dirs, home.path(), policy).unwrap(), 1);
    }
}
