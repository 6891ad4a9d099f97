//! The `.smolcheckpoint` file format (docs/CHECKPOINTS.md): one file, written front to back
//! and streamed (no section is held in memory), verified whole before a restore starts
//! anything.
//!
//! ```text
//! "SMOLCKPT" u32-le format version, u32-le 0          16-byte header
//! section "state"  the device state (QEMU migration stream, RAM not in it)
//! section "ram"    records: u64-le offset, u64-le length, that many bytes; the RAM file's
//!                  data extents only (holes are zero pages)
//! section "disk"   the disk, its qcow2 chain flattened into one standalone qcow2
//! manifest         JSON: versions, arch, the machine, and every section's offset, length and
//!                  sha256
//! u64-le manifest length, 32-byte sha256 of the manifest, "SMOLCKPT"   48-byte trailer
//! ```
//!
//! Format 2 is the same file written with a chunk store (`local::checkpoint_store`): no section
//! bytes between the header and the manifest; the manifest's `chunks` names the store and, per
//! section, the chunks its bytes are made of (each section's length and sha256 are those of
//! its bytes, as in format 1). [`export`] turns one into a standalone format-1 file.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checkpoint_store::{ChunkReader, ChunkWriter, Store, MAX_CHUNK};
use super::record::Record;
use crate::error::{Error, Result};

/// The file's magic (header and trailer).
pub const MAGIC: &[u8; 8] = b"SMOLCKPT";
/// The format version of a standalone file (this host writes and reads it).
pub const FORMAT: u32 = 1;
/// The format version of a file whose sections live in a chunk store.
pub const FORMAT_CHUNKED: u32 = 2;
/// Header bytes.
const HEADER: u64 = 16;
/// Trailer bytes.
const TRAILER: u64 = 48;
/// The longest manifest read (a larger length is a damaged file, not a reason to allocate).
const MAX_MANIFEST: u64 = 16 << 20;
/// The sections, in file order.
pub const SECTIONS: [&str; 3] = ["state", "ram", "disk"];
/// Copy buffer.
const CHUNK: usize = 1 << 20;

/// Size and sha256 of a boot asset (kernel, initramfs) at checkpoint time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetId {
    /// Its path on the checkpointing host.
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

impl AssetId {
    /// The identity of the file at `path`. Blocking.
    pub fn of(path: &Path) -> std::io::Result<AssetId> {
        let mut f = File::open(path)?;
        let mut h = Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        Ok(AssetId {
            path: path.to_path_buf(),
            size,
            sha256: h.finish(),
        })
    }
}

/// One section: where it lies in the file, and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// `state`, `ram` or `disk`.
    pub name: String,
    /// Offset of its first byte in the file.
    pub offset: u64,
    /// Its bytes.
    pub length: u64,
    /// Lower-case hex sha256 of its bytes.
    pub sha256: String,
}

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The smol that wrote it.
    pub smol_version: String,
    /// The protocol generation the host and the guest agent had negotiated.
    pub protocol_generation: u16,
    /// The VMM's version (`QEMU emulator version 7.2.x`): restores need the same.
    pub qemu_version: String,
    /// Host and guest architecture.
    pub arch: String,
    /// When it was taken (Unix seconds).
    pub created_unix: u64,
    /// The machine as the engine recorded it (cpus, memory, disk size, image, ports, network,
    /// labels, workload, kernel and initramfs paths).
    pub machine: Record,
    /// The kernel it booted.
    pub kernel: AssetId,
    /// The initramfs it booted.
    pub initrd: AssetId,
    /// The RAM file's length (the guest's memory).
    pub ram_bytes: u64,
    /// The sections, in file order.
    pub sections: Vec<Section>,
    /// Format 2: where the sections' bytes are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Chunks>,
}

/// The chunks of a format-2 checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunks {
    /// The store's absolute path when the checkpoint was written.
    pub store: PathBuf,
    /// Per section (in [`SECTIONS`] order), the sha256 names of its chunks, in order.
    pub sections: Vec<Vec<String>>,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The checkpoint file's length.
    pub bytes: u64,
    /// With a store: bytes of chunks the store had already (not written again).
    pub reused: u64,
}

/// Incremental sha256 (aws-lc).
pub struct Hasher(aws_lc_rs::digest::Context);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
}

impl Hasher {
    /// A new hasher.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds bytes.
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    /// Lower-case hex of everything added.
    pub fn finish(self) -> String {
        self.0
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
    fn raw(self) -> Vec<u8> {
        self.0.finish().as_ref().to_vec()
    }
}

/// Where a section's bytes go: the checkpoint file, or a store's chunks (which `cut` ends).
pub trait Sink: Write {
    /// A chunk boundary here (nothing for a plain file).
    fn cut(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Sink for BufWriter<W> {}

impl Sink for ChunkWriter<'_> {
    fn cut(&mut self) -> std::io::Result<()> {
        ChunkWriter::cut(self)
    }
}

/// A writer that counts and hashes what goes through it.
struct Hashing<'a> {
    w: &'a mut dyn Sink,
    h: Hasher,
    n: u64,
}

impl Sink for Hashing<'_> {
    fn cut(&mut self) -> std::io::Result<()> {
        self.w.cut()
    }
}

impl Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.h.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// The files a checkpoint is made of (the pause window's copies, or a frozen base's own).
pub struct Parts<'a> {
    /// The device state.
    pub state: &'a Path,
    /// The RAM file (sparse).
    pub ram: &'a Path,
    /// The flattened disk.
    pub disk: &'a Path,
}

fn storage(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Storage {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes a checkpoint of `parts` to `tmp` (created; the caller renames it into place),
/// its sections into `store` when given (format 2): `manifest` gets the sections filled in.
/// Blocking.
pub fn write(
    tmp: &Path,
    parts: &Parts<'_>,
    manifest: &mut Manifest,
    store: Option<&Store>,
) -> Result<Written> {
    manifest.ram_bytes = std::fs::metadata(parts.ram)
        .map_err(|e| storage(parts.ram, e))?
        .len();
    write_with(tmp, manifest, store, |name, w| match name {
        "state" => copy_file(parts.state, w),
        "ram" => write_extents(parts.ram, w),
        _ => copy_file(parts.disk, w),
    })
}

/// Writes `manifest`'s checkpoint to `tmp`, each section's bytes given by `fill`.
fn write_with(
    tmp: &Path,
    manifest: &mut Manifest,
    store: Option<&Store>,
    mut fill: impl FnMut(&str, &mut dyn Sink) -> Result<()>,
) -> Result<Written> {
    let err = |e: std::io::Error| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            Error::NoSpace {
                detail: format!("writing the checkpoint {}: {e}", tmp.display()),
            }
        } else {
            storage(tmp, e)
        }
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(err)?;
    let mut w = BufWriter::with_capacity(CHUNK, f);
    manifest.format = if store.is_some() {
        FORMAT_CHUNKED
    } else {
        FORMAT
    };
    w.write_all(MAGIC).map_err(err)?;
    w.write_all(&manifest.format.to_le_bytes()).map_err(err)?;
    w.write_all(&0u32.to_le_bytes()).map_err(err)?;
    let mut offset = HEADER;
    let mut reused = 0u64;
    manifest.sections.clear();
    manifest.chunks = store.map(|s| Chunks {
        store: s.root().to_path_buf(),
        sections: Vec::new(),
    });
    for name in SECTIONS {
        // RAM chunks are one extent record each (cut by write_extents); the others 1 MiB
        let mut chunks =
            store.map(|s| ChunkWriter::new(s, if name == "ram" { MAX_CHUNK } else { CHUNK }));
        let sink: &mut dyn Sink = match chunks.as_mut() {
            Some(c) => c,
            None => &mut w,
        };
        let mut hw = Hashing {
            w: sink,
            h: Hasher::new(),
            n: 0,
        };
        fill(name, &mut hw)?;
        let (n, h) = (hw.n, hw.h.finish());
        manifest.sections.push(Section {
            name: name.to_string(),
            offset,
            length: n,
            sha256: h,
        });
        match (chunks, manifest.chunks.as_mut()) {
            (Some(mut c), Some(m)) => {
                c.cut().map_err(err)?;
                reused += c.reused;
                m.sections.push(std::mem::take(&mut c.hashes));
            }
            _ => offset += n,
        }
    }
    if let Some(s) = store {
        s.sync()?;
    }
    let json = serde_json::to_vec(manifest).map_err(|e| storage(tmp, e))?;
    let mut h = Hasher::new();
    h.update(&json);
    w.write_all(&json).map_err(err)?;
    w.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(err)?;
    w.write_all(&h.raw()).map_err(err)?;
    w.write_all(MAGIC).map_err(err)?;
    let f = w.into_inner().map_err(|e| err(e.into_error()))?;
    f.sync_all().map_err(err)?;
    Ok(Written {
        bytes: offset + json.len() as u64 + TRAILER,
        reused,
    })
}

/// The checkpoint file to write at `output`, made absolute, with its directory and its file
/// name; `InvalidConfig` naming `what` when it is not a file path in an existing directory.
pub fn output_path(output: &Path, what: &str) -> Result<(PathBuf, PathBuf, std::ffi::OsString)> {
    let abs = std::path::absolute(output)
        .map_err(|e| Error::invalid(format!("{what} {}: {e}", output.display())))?;
    let (Some(dir), Some(fname)) = (abs.parent(), abs.file_name()) else {
        return Err(Error::invalid(format!(
            "{what} {} is not a file path",
            abs.display()
        )));
    };
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "the directory of the {what} {} does not exist",
            abs.display()
        )));
    }
    if abs.is_dir() {
        return Err(Error::invalid(format!(
            "the {what} {} is a directory",
            abs.display()
        )));
    }
    let (dir, fname) = (dir.to_path_buf(), fname.to_os_string());
    Ok((abs, dir, fname))
}

/// Writes the checkpoint `source` (verified; either format) as a new standalone format-1
/// file `tmp`. Blocking. Returns the bytes written.
pub fn export(source: &Verified, tmp: &Path) -> Result<u64> {
    let mut manifest = source.manifest.clone();
    let written = write_with(tmp, &mut manifest, None, |name, w| {
        let mut r = source.open(name)?;
        std::io::copy(&mut r, w).map_err(|e| source.read_err(name, e))?;
        Ok(())
    })?;
    Ok(written.bytes)
}

fn copy_file(src: &Path, w: &mut dyn Sink) -> Result<()> {
    let mut f = BufReader::with_capacity(CHUNK, File::open(src).map_err(|e| storage(src, e))?);
    std::io::copy(&mut f, w).map_err(|e| storage(src, e))?;
    Ok(())
}

/// The data extents of `ram` as records, one per 1 MiB of guest memory at most (so that a
/// store's chunk is one record, at the same guest addresses in every checkpoint).
fn write_extents(ram: &Path, w: &mut dyn Sink) -> Result<()> {
    let f = File::open(ram).map_err(|e| storage(ram, e))?;
    let len = f.metadata().map_err(|e| storage(ram, e))?.len();
    let fd = f.as_raw_fd();
    let mut at: i64 = 0;
    let mut buf = vec![0u8; CHUNK];
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(storage(ram, e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(storage(ram, std::io::Error::last_os_error()));
        }
        let (mut start, end) = (data as u64, hole as u64);
        while start < end {
            let window_end = (start / CHUNK as u64 + 1) * CHUNK as u64;
            let n = end.min(window_end) - start;
            let want = n as usize;
            f.read_exact_at(&mut buf[..want], start)
                .map_err(|e| storage(ram, e))?;
            w.cut()
                .and_then(|()| w.write_all(&start.to_le_bytes()))
                .and_then(|()| w.write_all(&n.to_le_bytes()))
                .and_then(|()| w.write_all(&buf[..want]))
                .map_err(|e| storage(ram, e))?;
            start += n;
        }
        at = hole;
    }
    Ok(())
}

/// A checkpoint file whose manifest and every section's checksum were verified.
pub struct Verified {
    /// The file.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// Reads and checks the whole file at `path` (header, trailer, manifest checksum and shape,
/// every section's length and sha256, in the file or in its store's chunks), writing nothing.
/// Blocking. A file that is not a whole, unaltered checkpoint is [`Error::InvalidCheckpoint`];
/// a missing one `NotFound`.
pub fn verify(path: &Path) -> Result<Verified> {
    let (mstart, manifest) = read_manifest(path)?;
    let bad = |reason: String| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let names: Vec<&str> = manifest.sections.iter().map(|s| s.name.as_str()).collect();
    if names != SECTIONS {
        return Err(bad(format!("sections {names:?}, expected {SECTIONS:?}")));
    }
    match &manifest.chunks {
        None => {
            let mut at = HEADER;
            for s in &manifest.sections {
                if s.offset != at || s.offset.checked_add(s.length).is_none_or(|e| e > mstart) {
                    return Err(bad(format!(
                        "section {} does not lie where it should",
                        s.name
                    )));
                }
                at += s.length;
            }
            if at != mstart {
                return Err(bad("bytes between the sections and the manifest".into()));
            }
        }
        Some(c) => {
            if mstart != HEADER {
                return Err(bad(
                    "section bytes in a file whose sections are chunks".into()
                ));
            }
            if c.sections.len() != SECTIONS.len() {
                return Err(bad(format!(
                    "{} chunk lists for {} sections",
                    c.sections.len(),
                    SECTIONS.len()
                )));
            }
        }
    }
    let v = Verified {
        path: path.to_path_buf(),
        manifest,
    };
    let mut buf = vec![0u8; CHUNK];
    for s in &v.manifest.sections {
        let mut r = v.open(&s.name)?;
        let mut h = Hasher::new();
        let mut n = 0u64;
        loop {
            let got = r.read(&mut buf).map_err(|e| v.read_err(&s.name, e))?;
            if got == 0 {
                break;
            }
            h.update(&buf[..got]);
            n += got as u64;
        }
        if n != s.length {
            return Err(bad(format!(
                "section {}: {n} bytes, the manifest says {}",
                s.name, s.length
            )));
        }
        if h.finish() != s.sha256 {
            return Err(bad(format!(
                "section {}: sha256 differs (the file was altered)",
                s.name
            )));
        }
    }
    Ok(v)
}

/// Reads and checks the header, the trailer and the manifest of `path` (not the sections).
/// Returns where the manifest starts, and the manifest.
fn read_manifest(path: &Path) -> Result<(u64, Manifest)> {
    let bad = |reason: String| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound {
                what: format!("checkpoint file {}", path.display()),
            })
        }
        Err(e) => return Err(storage(path, e)),
    };
    let meta = f.metadata().map_err(|e| storage(path, e))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let len = meta.len();
    if len < HEADER + TRAILER {
        return Err(bad(format!("{len} bytes: too short to be a checkpoint")));
    }
    let mut head = [0u8; HEADER as usize];
    f.read_exact_at(&mut head, 0)
        .map_err(|e| storage(path, e))?;
    if &head[..8] != MAGIC {
        return Err(bad("not a .smolcheckpoint file (no SMOLCKPT header)".into()));
    }
    let format = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if format != FORMAT && format != FORMAT_CHUNKED {
        return Err(bad(format!(
            "format version {format}; this smol reads versions {FORMAT} and {FORMAT_CHUNKED}"
        )));
    }
    let mut tail = [0u8; TRAILER as usize];
    f.read_exact_at(&mut tail, len - TRAILER)
        .map_err(|e| storage(path, e))?;
    if &tail[40..] != MAGIC {
        return Err(bad(
            "no SMOLCKPT trailer: the file is truncated or was not completely written".into(),
        ));
    }
    let mlen = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
    if mlen == 0 || mlen > MAX_MANIFEST || mlen > len - HEADER - TRAILER {
        return Err(bad(format!("manifest length {mlen} does not fit the file")));
    }
    let mstart = len - TRAILER - mlen;
    let mut json = vec![0u8; mlen as usize];
    f.read_exact_at(&mut json, mstart)
        .map_err(|e| storage(path, e))?;
    let mut h = Hasher::new();
    h.update(&json);
    if h.raw() != tail[8..40] {
        return Err(bad(
            "the manifest's sha256 differs (the file was altered)".into()
        ));
    }
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| bad(format!("manifest: {e}")))?;
    if manifest.format != format || manifest.chunks.is_some() != (format == FORMAT_CHUNKED) {
        return Err(bad(format!(
            "manifest format {} in a format-{format} file",
            manifest.format
        )));
    }
    Ok((mstart, manifest))
}

/// The store of the format-2 checkpoint at `path` (its manifest only is read).
pub fn store_of(path: &Path) -> Option<PathBuf> {
    read_manifest(path).ok()?.1.chunks.map(|c| c.store)
}

/// The chunks the checkpoint at `path` names in the store at `root`, if it is a format-2
/// checkpoint of that store (its manifest only is read). `None` for anything else (a
/// missing file, another store's, a standalone one).
pub fn chunks_of(path: &Path, root: &Path) -> Option<Vec<String>> {
    let (_, manifest) = read_manifest(path).ok()?;
    let chunks = manifest.chunks?;
    (chunks.store == root).then(|| chunks.sections.concat())
}

impl Verified {
    fn section(&self, name: &str) -> &Section {
        self.manifest
            .sections
            .iter()
            .find(|s| s.name == name)
            .expect("verified sections")
    }

    fn bad(&self, reason: String) -> Error {
        Error::InvalidCheckpoint {
            path: self.path.clone(),
            reason,
        }
    }

    /// The bytes of section `name`, from the file or from the store's chunks (each chunk
    /// checked as it is read).
    pub fn open(&self, name: &str) -> Result<Box<dyn Read>> {
        let s = self.section(name);
        match &self.manifest.chunks {
            None => {
                let mut f = File::open(&self.path).map_err(|e| storage(&self.path, e))?;
                f.seek(SeekFrom::Start(s.offset))
                    .map_err(|e| storage(&self.path, e))?;
                Ok(Box::new(BufReader::with_capacity(CHUNK, f).take(s.length)))
            }
            Some(c) => {
                let i = SECTIONS.iter().position(|n| *n == name).expect("a section");
                Ok(Box::new(ChunkReader::new(&c.store, &c.sections[i])))
            }
        }
    }

    /// The error of a failed read of section `name`: a damaged chunk is an invalid checkpoint.
    fn read_err(&self, name: &str, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::InvalidData {
            self.bad(format!("section {name}: {e}"))
        } else {
            storage(&self.path, e)
        }
    }

    /// Copies section `name` (`state` or `disk`) to a new file `to`. Blocking.
    pub fn extract(&self, name: &str, to: &Path) -> Result<()> {
        let s = self.section(name);
        let mut r = self.open(name)?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(|e| storage(to, e))?;
        let mut w = BufWriter::with_capacity(CHUNK, out);
        let n = std::io::copy(&mut r, &mut w).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => self.read_err(name, e),
            _ => storage(to, e),
        })?;
        w.flush().map_err(|e| storage(to, e))?;
        if n != s.length {
            return Err(self.bad(format!("section {name} ended early")));
        }
        Ok(())
    }

    /// Writes the RAM section's extents into a new sparse file `to` of the RAM's length.
    /// Blocking.
    pub fn extract_ram(&self, to: &Path) -> Result<()> {
        let s = self.section("ram");
        let ram_len = self.manifest.ram_bytes;
        let mut src = self.open("ram")?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(|e| storage(to, e))?;
        out.set_len(ram_len).map_err(|e| storage(to, e))?;
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut left = s.length;
        while left > 0 {
            let mut hdr = [0u8; 16];
            if left < 16 {
                return Err(self.bad("section ram: a record header is cut".into()));
            }
            src.read_exact(&mut hdr)
                .map_err(|e| self.read_err("ram", e))?;
            left -= 16;
            let off = u64::from_le_bytes(hdr[..8].try_into().expect("8 bytes"));
            let n = u64::from_le_bytes(hdr[8..].try_into().expect("8 bytes"));
            if n > left || off.checked_add(n).is_none_or(|e| e > ram_len) {
                return Err(self.bad(format!(
                    "section ram: an extent of {n} bytes at {off} does not fit"
                )));
            }
            let mut done = 0u64;
            while done < n {
                let want = (n - done).min(buf.len() as u64) as usize;
                src.read_exact(&mut buf[..want])
                    .map_err(|e| self.read_err("ram", e))?;
                out.write_all_at(&buf[..want], off + done)
                    .map_err(|e| storage(to, e))?;
                done += want as u64;
            }
            left -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "checkpoint_file_tests.rs"]
pub(crate) mod tests;
