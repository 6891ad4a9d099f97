//! The content-addressed cache under `<SMOL_HOME>/images`, shared by every process:
//!
//! ```text
//! images/
//!   blobs/sha256/<hex>     manifests, configs and layers, named by their digest
//!   refs/<escaped ref>     JSON: reference -> manifest digest, config, layers, rootfs key
//!   rootfs/<key>.<fmt>     read-only block images (erofs or ext4), one per manifest digest
//!   tmp/                   files being written (a crash leaves them here, never under blobs/)
//!   locks/                 flock files: one per blob and per rootfs image being made
//!   store.lock             shared by pulls and builds, exclusive for remove / prune
//! ```
//!
//! Every file is written to `tmp/`, verified, fsynced and renamed into place, so a name under
//! `blobs/` or `rootfs/` always holds complete, verified content.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{ImageError, ImageResult};
use super::oci::{digest_hex, Sha256};
use super::reference::escape_name;
use super::ImageConfig;

/// What a reference points at in the cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RefRecord {
    /// The canonical reference (or local source string).
    pub reference: String,
    /// Manifest digest (registry / OCI / docker-archive) or directory fingerprint (dir).
    pub digest: String,
    /// The config blob (absent for plain directories).
    pub config_digest: Option<String>,
    /// The layer blobs, base first.
    pub layers: Vec<String>,
    /// Other blobs this image keeps alive (e.g. the index it was picked from).
    #[serde(default)]
    pub extra_blobs: Vec<String>,
    /// Size in bytes (compressed layers + config, or the tree of a directory).
    pub size: u64,
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// The run defaults from the image config.
    pub config: ImageConfig,
    /// For plain directories: the directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Seconds since the epoch when recorded.
    pub recorded_at: u64,
}

impl RefRecord {
    /// The key of the block image made from this record.
    pub fn rootfs_key(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

/// What `remove` / `prune` reclaimed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// References removed.
    pub refs_removed: Vec<String>,
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// Block images deleted.
    pub rootfs_removed: usize,
    /// Leftover temporary files deleted (from crashed or interrupted pulls).
    pub tmp_removed: usize,
    /// Bytes reclaimed.
    pub bytes_freed: u64,
}

/// A held `flock`; released on drop.
pub(crate) struct FileLock {
    _file: File,
}

fn flock(path: &Path, exclusive: bool) -> ImageResult<FileLock> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| ImageError::io_at("open lock file", path, e))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: the descriptor belongs to `file`, which is open for the whole call; flock
        // does not touch memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(FileLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(ImageError::io_at("lock", path, e));
        }
    }
}

/// The on-disk cache.
#[derive(Debug, Clone)]
pub(crate) struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating) the cache at `root`.
    pub fn open(root: &Path) -> ImageResult<Self> {
        for d in ["blobs/sha256", "refs", "rootfs", "tmp", "locks"] {
            let p = root.join(d);
            fs::create_dir_all(&p)
                .map_err(|e| ImageError::io_at("create cache directory", &p, e))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
        })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Shared lock on the whole store (held by pulls and builds).
    pub fn lock_shared(&self) -> ImageResult<FileLock> {
        flock(&self.root.join("store.lock"), false)
    }

    /// Exclusive lock on the whole store (remove, prune).
    pub fn lock_exclusive(&self) -> ImageResult<FileLock> {
        flock(&self.root.join("store.lock"), true)
    }

    /// Exclusive lock named `name` under `locks/` (a blob or a rootfs image being made).
    pub fn lock_item(&self, name: &str) -> ImageResult<FileLock> {
        flock(&self.root.join("locks").join(format!("{name}.lock")), true)
    }

    /// Path of a blob (whether or not it exists).
    pub fn blob_path(&self, digest: &str) -> ImageResult<PathBuf> {
        let h = digest_hex(digest, digest)?;
        Ok(self.root.join("blobs/sha256").join(h))
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Reads a whole (small) blob.
    pub fn read_blob(&self, digest: &str) -> ImageResult<Vec<u8>> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(|e| ImageError::io_at("read blob", &p, e))
    }

    /// Starts writing a blob into `tmp/`.
    pub fn blob_writer(&self) -> ImageResult<BlobWriter> {
        let (path, file) = self.tmp_file("blob")?;
        Ok(BlobWriter {
            path,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            written: 0,
            committed: false,
        })
    }

    /// Stores bytes under their expected digest (verified).
    pub fn put_blob(&self, expected: &str, what: &str, bytes: &[u8]) -> ImageResult<()> {
        if self.has_blob(expected) {
            return Ok(());
        }
        let _l = self.lock_item(digest_hex(expected, expected)?)?;
        if self.has_blob(expected) {
            return Ok(());
        }
        let mut w = self.blob_writer()?;
        w.write(bytes)?;
        w.commit(self, expected, what)
    }

    /// Copies a blob from a reader, verifying it against `expected`.
    pub fn copy_blob(&self, expected: &str, what: &str, mut r: impl Read) -> ImageResult<u64> {
        let p = self.blob_path(expected)?;
        if p.is_file() {
            return Ok(fs::metadata(&p).map(|m| m.len()).unwrap_or(0));
        }
        let _l = self.lock_item(digest_hex(expected, expected)?)?;
        if p.is_file() {
            return Ok(fs::metadata(&p).map(|m| m.len()).unwrap_or(0));
        }
        let mut w = self.blob_writer()?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(|e| ImageError::Io {
                context: format!("read {what}"),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        let n = w.written();
        w.commit(self, expected, what)?;
        Ok(n)
    }

    /// A new empty file under `tmp/` (removed by the caller, or by the next prune).
    pub fn tmp_file(&self, prefix: &str) -> ImageResult<(PathBuf, File)> {
        let dir = self.root.join("tmp");
        for _ in 0..16 {
            let p = dir.join(format!(
                "{prefix}-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            match OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => return Ok((p, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io_at("create temporary file", &p, e)),
            }
        }
        Err(ImageError::Io {
            context: format!("create temporary file in {}", dir.display()),
            source: std::io::Error::other("too many collisions"),
        })
    }

    /// A new empty directory under `tmp/`, removed when the guard drops.
    pub fn tmp_dir(&self, prefix: &str) -> ImageResult<tempfile::TempDir> {
        let dir = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(&format!("{prefix}-{}-", std::process::id()))
            .tempdir_in(&dir)
            .map_err(|e| ImageError::io_at("create temporary directory", &dir, e))
    }

    /// Path of the block image with this key and format extension.
    pub fn rootfs_path(&self, key: &str, ext: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{key}.{ext}"))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root.join("refs").join(escape_name(reference))
    }

    /// The record of a reference, if any.
    pub fn read_ref(&self, reference: &str) -> ImageResult<Option<RefRecord>> {
        let p = self.ref_path(reference);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ImageError::Io {
                    context: format!("read {}", p.display()),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io_at("read reference", &p, e)),
        }
    }

    /// Records (atomically replaces) a reference.
    pub fn write_ref(&self, rec: &RefRecord) -> ImageResult<()> {
        let json = serde_json::to_vec_pretty(rec).expect("RefRecord serialises");
        let dest = self.ref_path(&rec.reference);
        self.write_atomic(&dest, &json)
    }

    /// Writes a small file atomically (tmp + fsync + rename + fsync of the directory).
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> ImageResult<()> {
        let (tmp, mut f) = self.tmp_file("file")?;
        let res = (|| {
            f.write_all(bytes)
                .and_then(|_| f.sync_all())
                .map_err(|e| ImageError::io_at("write", &tmp, e))?;
            fs::rename(&tmp, dest).map_err(|e| ImageError::io_at("rename into place", dest, e))?;
            sync_dir(dest.parent().unwrap_or(Path::new(".")))
        })();
        if res.is_err() {
            crate::cleanup::remove_quietly(&tmp, "a temporary file");
        }
        res
    }

    /// Moves a finished file from `tmp/` to `dest` (fsync of the file and of the directory).
    pub fn commit_file(&self, tmp: &Path, dest: &Path) -> ImageResult<()> {
        let f = File::open(tmp).map_err(|e| ImageError::io_at("open", tmp, e))?;
        f.sync_all()
            .map_err(|e| ImageError::io_at("fsync", tmp, e))?;
        fs::rename(tmp, dest).map_err(|e| ImageError::io_at("rename into place", dest, e))?;
        sync_dir(dest.parent().unwrap_or(Path::new(".")))
    }

    /// Every recorded reference.
    pub fn list_refs(&self) -> ImageResult<Vec<RefRecord>> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        let rd = fs::read_dir(&dir).map_err(|e| ImageError::io_at("list", &dir, e))?;
        for ent in rd.flatten() {
            let b = match fs::read(ent.path()) {
                Ok(b) => b,
                Err(_) => continue, // removed meanwhile
            };
            if let Ok(r) = serde_json::from_slice::<RefRecord>(&b) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Removes a reference record; `false` if there was none. Caller holds the exclusive lock.
    pub fn remove_ref(&self, reference: &str) -> ImageResult<bool> {
        let p = self.ref_path(reference);
        match fs::remove_file(&p) {
            Ok(()) => {
                sync_dir(&self.root.join("refs"))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::io_at("remove reference", &p, e)),
        }
    }

    /// Deletes every blob and block image no reference uses, and every temporary file.
    /// The caller holds the exclusive store lock, so no pull or build is in progress.
    pub fn collect_garbage(&self, report: &mut PruneReport) -> ImageResult<()> {
        let refs = self.list_refs()?;
        let mut live_blobs = std::collections::HashSet::new();
        let mut live_rootfs = std::collections::HashSet::new();
        for r in &refs {
            live_blobs.insert(r.digest.clone());
            live_blobs.extend(r.config_digest.iter().cloned());
            live_blobs.extend(r.layers.iter().cloned());
            live_blobs.extend(r.extra_blobs.iter().cloned());
            live_rootfs.insert(r.rootfs_key().to_string());
        }
        let sweep =
            |dir: &Path, keep: &dyn Fn(&str) -> bool, count: &mut usize, bytes: &mut u64| {
                let Ok(rd) = fs::read_dir(dir) else { return };
                for ent in rd.flatten() {
                    let name = ent.file_name().to_string_lossy().into_owned();
                    if keep(&name) {
                        continue;
                    }
                    let p = ent.path();
                    let size = disk_usage(&p);
                    let removed = if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        fs::remove_dir_all(&p).is_ok()
                    } else {
                        fs::remove_file(&p).is_ok()
                    };
                    if removed {
                        *count += 1;
                        *bytes += size;
                    }
                }
            };
        let mut bytes = 0;
        sweep(
            &self.root.join("blobs/sha256"),
            &|n| live_blobs.contains(&format!("sha256:{n}")),
            &mut report.blobs_removed,
            &mut bytes,
        );
        sweep(
            &self.root.join("rootfs"),
            &|n| {
                n.split('.')
                    .next()
                    .is_some_and(|stem| live_rootfs.contains(stem))
            },
            &mut report.rootfs_removed,
            &mut bytes,
        );
        sweep(
            &self.root.join("tmp"),
            &|_| false,
            &mut report.tmp_removed,
            &mut bytes,
        );
        let mut locks = 0;
        sweep(&self.root.join("locks"), &|_| false, &mut locks, &mut 0);
        report.bytes_freed += bytes;
        sync_dir(&self.root.join("blobs/sha256"))?;
        Ok(())
    }
}

/// Bytes a file or tree takes on disk.
pub(crate) fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::symlink_metadata(p) else {
        return 0;
    };
    let mut total = m.blocks() * 512;
    if m.is_dir() {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                total += disk_usage(&e.path());
            }
        }
    }
    total
}

/// fsync of a directory, so a rename in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> ImageResult<()> {
    let d = File::open(dir).map_err(|e| ImageError::io_at("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| ImageError::io_at("fsync directory", dir, e))
}

/// A blob being written to `tmp/`, hashed as it goes. Dropped without `commit`, the temporary
/// file is removed.
pub(crate) struct BlobWriter {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    hasher: Sha256,
    written: u64,
    committed: bool,
}

impl BlobWriter {
    /// Appends bytes.
    pub fn write(&mut self, buf: &[u8]) -> ImageResult<()> {
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        self.file
            .as_mut()
            .expect("open until commit")
            .write_all(buf)
            .map_err(|e| ImageError::io_at("write blob", &self.path, e))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Empties the file to start over (a retry from the first byte).
    pub fn reset(&mut self) -> ImageResult<()> {
        let f = self.file.take().expect("open until commit");
        let f = f
            .into_inner()
            .map_err(|e| ImageError::io_at("flush blob", &self.path, e.into_error()))?;
        f.set_len(0)
            .map_err(|e| ImageError::io_at("truncate blob", &self.path, e))?;
        let mut f = f;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))
            .map_err(|e| ImageError::io_at("seek blob", &self.path, e))?;
        self.file = Some(BufWriter::with_capacity(1 << 20, f));
        self.hasher = Sha256::new();
        self.written = 0;
        Ok(())
    }

    /// Verifies the digest, fsyncs and renames the blob into `blobs/`. On a mismatch the
    /// temporary file is deleted and nothing is stored.
    pub fn commit(mut self, cache: &Cache, expected: &str, what: &str) -> ImageResult<()> {
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != expected {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
        let f = self.file.take().expect("open until commit");
        let f = f
            .into_inner()
            .map_err(|e| ImageError::io_at("flush blob", &self.path, e.into_error()))?;
        f.sync_all()
            .map_err(|e| ImageError::io_at("fsync blob", &self.path, e))?;
        drop(f);
        let dest = cache.blob_path(expected)?;
        fs::rename(&self.path, &dest).map_err(|e| ImageError::io_at("store blob", &dest, e))?;
        self.committed = true;
        sync_dir(dest.parent().expect("blob has a parent"))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed {
            drop(self.file.take());
            crate::cleanup::remove_quietly(&self.path, "an unfinished blob");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::oci::sha256_digest;

    #[test]
    fn blobs_are_verified_and_atomic() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let good = sha256_digest(b"hello");
        c.put_blob(&good, "test", b"hello").unwrap();
        assert_eq!(c.read_blob(&good).unwrap(), b"hello");
        let bad = sha256_digest(b"other");
        let e = c.put_blob(&bad, "test", b"hello").unwrap_err();
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        assert!(!c.has_blob(&bad));
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let mut w = c.blob_writer().unwrap();
        w.write(b"partial").unwrap();
        w.reset().unwrap();
        w.write(b"x").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(d.path().join("blobs/sha256")).unwrap().count(),
            0
        );
    }

    #[test]
    fn gc_keeps_what_refs_use() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let (m, l, junk) = (
            sha256_digest(b"m"),
            sha256_digest(b"l"),
            sha256_digest(b"j"),
        );
        c.put_blob(&m, "t", b"m").unwrap();
        c.put_blob(&l, "t", b"l").unwrap();
        c.put_blob(&junk, "t", b"j").unwrap();
        c.tmp_file("stale").unwrap();
        c.write_ref(&RefRecord {
            reference: "r".into(),
            digest: m.clone(),
            config_digest: None,
            layers: vec![l.clone()],
            extra_blobs: vec![],
            size: 1,
            architecture: "amd64".into(),
            os: "linux".into(),
            config: ImageConfig::default(),
            dir: None,
            recorded_at: 0,
        })
        .unwrap();
        let mut rep = PruneReport::default();
        c.collect_garbage(&mut rep).unwrap();
        assert_eq!((rep.blobs_removed, rep.tmp_removed), (1, 1));
        assert!(c.has_blob(&m) && c.has_blob(&l) && !c.has_blob(&junk));
        assert!(c.remove_ref("r").unwrap());
        assert!(!c.remove_ref("r").unwrap());
        let mut rep = PruneReport::default();
        c.collect_garbage(&mut rep).unwrap();
        assert_eq!(rep.blobs_removed, 2);
    }
}
