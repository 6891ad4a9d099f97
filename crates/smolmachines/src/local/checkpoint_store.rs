//! A content-addressed chunk store shared by checkpoints (SPEC §4.8 `checkpoint(output,
//! store=)`, `export_checkpoint`, `prune_checkpoint_store`; docs/CHECKPOINTS.md "A chunk
//! store").
//!
//! ```text
//! <store>/chunks/<2 hex>/<64 hex>   one chunk, named by the sha256 of its bytes
//! <store>/refs/<16 hex>.json        {"checkpoint": "<absolute path>"}: a checkpoint that uses it
//! <store>/lock                      flock: shared while a checkpoint is written, exclusive to prune
//! ```
//!
//! A checkpoint written with a store holds its manifest only (format 2 of
//! `local::checkpoint_file`); the manifest lists, per section, the chunks that make it. RAM
//! chunks are cut at every 1 MiB boundary of guest memory (one extent record each), and the
//! device state and disk every 1 MiB of their bytes, so what did not change between two
//! checkpoints (most of a guest's RAM, a disk's untouched clusters) is stored once. A chunk
//! already there is not written again; each new one is written under a temporary name and
//! renamed, and the store is synced once at the end. Every chunk is checked against its name
//! when it is read. `prune` removes the chunks no remaining checkpoint names.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checkpoint_file::Hasher;
use crate::error::{Error, Result};

/// The most bytes a chunk holds (a RAM record: a 16-byte header and up to 1 MiB).
pub const MAX_CHUNK: usize = (1 << 20) + 16;

/// An open store, holding its lock (shared or exclusive) until dropped.
pub struct Store {
    root: PathBuf,
    _lock: File,
}

#[derive(Serialize, Deserialize)]
struct Ref {
    checkpoint: PathBuf,
}

fn storage(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Storage {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn write_err(path: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::NoSpace {
            detail: format!("writing the checkpoint store {}: {e}", path.display()),
        }
    } else {
        storage(path, e)
    }
}

/// Is `hash` a lower-case hex sha256 (a chunk's name)?
fn is_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Store {
    /// Opens (creating it when `create`) the store at `dir`, locked shared or `exclusive`.
    /// Blocking.
    pub fn open(dir: &Path, create: bool, exclusive: bool) -> Result<Store> {
        if create {
            for sub in ["chunks", "refs"] {
                std::fs::create_dir_all(dir.join(sub)).map_err(|e| write_err(dir, e))?;
            }
        } else if !dir.join("chunks").is_dir() {
            return Err(Error::NotFound {
                what: format!(
                    "checkpoint store {} (no chunks/ directory in it)",
                    dir.display()
                ),
            });
        }
        let root = dir.canonicalize().map_err(|e| storage(dir, e))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))
            .map_err(|e| storage(&root, e))?;
        let how = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own; it is released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), how) } != 0 {
            return Err(storage(&root, std::io::Error::last_os_error()));
        }
        Ok(Store { root, _lock: lock })
    }

    /// The store's canonical path (what manifests record).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn chunk_path(root: &Path, hash: &str) -> PathBuf {
        root.join("chunks").join(&hash[..2]).join(hash)
    }

    /// Stores `bytes` as a chunk; returns its name and whether it was there already.
    pub fn put(&self, bytes: &[u8]) -> Result<(String, bool)> {
        let mut h = Hasher::new();
        h.update(bytes);
        let hash = h.finish();
        let path = Self::chunk_path(&self.root, &hash);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok((hash, true));
        }
        let dir = path.parent().expect("chunks/<2 hex>");
        std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
        let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
        let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(&path, e));
        }
        Ok((hash, false))
    }

    /// Flushes everything written to the store's file system.
    pub fn sync(&self) -> Result<()> {
        let f = File::open(&self.root).map_err(|e| storage(&self.root, e))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(write_err(&self.root, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn ref_path(&self, checkpoint: &Path) -> PathBuf {
        let mut h = Hasher::new();
        h.update(checkpoint.as_os_str().as_encoded_bytes());
        self.root
            .join("refs")
            .join(format!("{}.json", &h.finish()[..16]))
    }

    /// Records that the checkpoint at `checkpoint` (absolute) uses this store.
    pub fn add_ref(&self, checkpoint: &Path) -> Result<()> {
        let path = self.ref_path(checkpoint);
        let json = serde_json::to_vec(&Ref {
            checkpoint: checkpoint.to_path_buf(),
        })
        .map_err(|e| storage(&path, e))?;
        std::fs::write(&path, json).map_err(|e| write_err(&path, e))
    }

    /// Forgets `checkpoint` (deleted); its chunks go at the next [`Store::prune`].
    pub fn remove_ref(&self, checkpoint: &Path) {
        let path = self.ref_path(checkpoint);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a store ref");
            }
        }
    }

    /// Removes every chunk that no checkpoint still using the store names (and the refs of
    /// checkpoints that are gone, and temporary files left by an interrupted write). Needs
    /// the store opened exclusive. Returns the bytes freed.
    pub fn prune(&self) -> Result<u64> {
        let mut live: HashSet<String> = HashSet::new();
        let refs = self.root.join("refs");
        for entry in std::fs::read_dir(&refs).map_err(|e| storage(&refs, e))? {
            let path = entry.map_err(|e| storage(&refs, e))?.path();
            let used = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Ref>(&b).ok())
                .and_then(|r| super::checkpoint_file::chunks_of(&r.checkpoint, &self.root));
            match used {
                Some(hashes) => live.extend(hashes),
                None => {
                    tracing::info!(path = %path.display(), "checkpoint store: a ref whose checkpoint is gone removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let mut freed = 0u64;
        let chunks = self.root.join("chunks");
        for dir in std::fs::read_dir(&chunks).map_err(|e| storage(&chunks, e))? {
            let dir = dir.map_err(|e| storage(&chunks, e))?.path();
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if live.contains(&name) {
                    continue;
                }
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                match std::fs::remove_file(f.path()) {
                    Ok(()) => freed += len,
                    Err(e) => return Err(storage(&f.path(), e)),
                }
            }
        }
        tracing::info!(store = %self.root.display(), freed, "checkpoint store pruned");
        Ok(freed)
    }
}

/// Reads the chunk `hash` of the store at `root`, checked against its name.
pub fn read_chunk(root: &Path, hash: &str, buf: &mut Vec<u8>) -> std::result::Result<(), String> {
    if !is_hash(hash) {
        return Err(format!("chunk name {hash:?} is not a sha256"));
    }
    let path = Store::chunk_path(root, hash);
    buf.clear();
    let f = File::open(&path).map_err(|e| {
        format!(
            "chunk {hash} of the store {}: {e} (was the store pruned or moved?)",
            root.display()
        )
    })?;
    f.take(MAX_CHUNK as u64 + 1)
        .read_to_end(buf)
        .map_err(|e| format!("chunk {hash}: {e}"))?;
    if buf.len() > MAX_CHUNK {
        return Err(format!("chunk {hash} is larger than a chunk can be"));
    }
    let mut h = Hasher::new();
    h.update(buf);
    if h.finish() != hash {
        return Err(format!(
            "chunk {hash} of the store {}: its sha256 differs (the chunk was altered)",
            root.display()
        ));
    }
    Ok(())
}

/// A writer cutting a section's bytes into chunks of the store (at most `limit` bytes each,
/// and wherever [`ChunkWriter::cut`] is called).
pub struct ChunkWriter<'a> {
    store: &'a Store,
    limit: usize,
    buf: Vec<u8>,
    /// The chunks written so far, in order.
    pub hashes: Vec<String>,
    /// Bytes of chunks that were in the store already.
    pub reused: u64,
}

impl<'a> ChunkWriter<'a> {
    /// A writer into `store`, cutting every `limit` bytes (at most [`MAX_CHUNK`]).
    pub fn new(store: &'a Store, limit: usize) -> Self {
        let limit = limit.min(MAX_CHUNK);
        ChunkWriter {
            store,
            limit,
            buf: Vec::with_capacity(limit),
            hashes: Vec::new(),
            reused: 0,
        }
    }

    /// Ends the current chunk (nothing when it is empty).
    pub fn cut(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let (hash, had) = self.store.put(&self.buf).map_err(std::io::Error::other)?;
        if had {
            self.reused += self.buf.len() as u64;
        }
        self.hashes.push(hash);
        self.buf.clear();
        Ok(())
    }
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(self.limit - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == self.limit {
            self.cut()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A section read back from its chunks, each checked as it is read.
pub struct ChunkReader {
    root: PathBuf,
    hashes: Vec<String>,
    next: usize,
    buf: Vec<u8>,
    at: usize,
}

impl ChunkReader {
    /// The section made of `hashes` in the store at `root`.
    pub fn new(root: &Path, hashes: &[String]) -> Self {
        ChunkReader {
            root: root.to_path_buf(),
            hashes: hashes.to_vec(),
            next: 0,
            buf: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            let Some(h) = self.hashes.get(self.next) else {
                return Ok(0);
            };
            self.next += 1;
            read_chunk(&self.root, h, &mut self.buf)
                .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidData, m))?;
            self.at = 0;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// [`Machine::export_checkpoint`](crate::Machine::export_checkpoint): verifies `source` whole
/// (every chunk), then writes it as a standalone format-1 file at `output` (a temporary name,
/// renamed into place; an existing `output` is refused). Blocking. Returns the bytes written.
pub fn export_checkpoint(source: &Path, output: &Path) -> Result<u64> {
    use super::checkpoint_file as file;
    let (output, dir, fname) = file::output_path(output, "export output")?;
    if output.exists() {
        return Err(Error::invalid(format!(
            "the export output {} exists already: export_checkpoint does not overwrite",
            output.display()
        )));
    }
    let v = file::verify(source)?;
    let tmp = dir.join(format!(
        ".{}.{:08x}.tmp",
        fname.to_string_lossy(),
        rand::random::<u32>()
    ));
    let written = file::export(&v, &tmp).and_then(|n| {
        std::fs::rename(&tmp, &output)
            .map_err(|e| Error::io(format!("renaming into {}", output.display()), e))?;
        Ok(n)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
#[path = "checkpoint_store_tests.rs"]
mod tests;
