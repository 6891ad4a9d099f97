//! Applies OCI layers to a root file system directory with the semantics of the OCI image spec
//! (and of overlayfs): whiteouts (`.wh.NAME`) delete from lower layers, an opaque marker
//! (`.wh..wh..opq`) hides a directory's lower content, later entries replace earlier ones,
//! hard links, symlinks, device nodes, FIFOs, modes, owners, times and xattrs are kept.
//!
//! No entry is ever written outside the root: paths are normalised lexically (a `..` that climbs
//! above the root is refused), and the directories on the way are resolved component by
//! component without trusting the host's symlink resolution: a symlink met on the way is
//! followed inside the root (an absolute target starts at the root), and one that leads above
//! the root refuses the entry. The final component is never followed: a file replaces a
//! symlink instead of writing through it.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::error::{ImageError, ImageResult};
use super::oci::LayerCompression;

/// Normalises a tar entry path to a path relative to the root, refusing any `..` that would
/// climb above it. `""` is the root itself.
pub(crate) fn normalise_entry_path(raw: &[u8]) -> Result<PathBuf, String> {
    let p = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Prefix(_) => return Err("has a path prefix".into()),
            Component::ParentDir => {
                if !out.pop() {
                    return Err("climbs above the root with `..`".into());
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// A decompressing reader for a layer blob.
pub(crate) fn decompress<'a>(
    compression: LayerCompression,
    r: impl io::BufRead + 'a,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        LayerCompression::None => Box::new(r),
        LayerCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    })
}

/// Metadata of an entry, from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// Applies layers, in order, to one root directory.
pub(crate) struct Unpacker {
    root: PathBuf,
    privileged: bool,
    /// Relative, symlink-free paths known to be directories (cleared when any directory goes).
    known_dirs: HashSet<PathBuf>,
    /// What could not be reproduced (device nodes without privileges, refused xattrs).
    pub warnings: Vec<String>,
    buf: Vec<u8>,
}

impl Unpacker {
    /// An unpacker for `root` (an existing, empty directory). Ownership and device nodes are
    /// reproduced when running as root.
    pub fn new(root: &Path) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let privileged = unsafe { libc::geteuid() } == 0;
        Unpacker {
            root: root.to_path_buf(),
            privileged,
            known_dirs: HashSet::new(),
            warnings: Vec::new(),
            buf: vec![0u8; 256 * 1024],
        }
    }

    /// Applies one (decompressed) layer tar stream. `layer` names it in errors.
    pub fn apply_layer(&mut self, layer: &str, tar_stream: impl Read) -> ImageResult<()> {
        let invalid = |reason: String| ImageError::InvalidImage {
            reference: layer.to_string(),
            reason,
        };
        let mut ar = tar::Archive::new(tar_stream);
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        let mut deferred_dirs: Vec<(PathBuf, u32, SystemTime)> = Vec::new();
        let entries = ar
            .entries()
            .map_err(|e| invalid(format!("not a tar stream: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| invalid(format!("corrupt tar stream: {e}")))?;
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XGlobalHeader
                    | tar::EntryType::XHeader
                    | tar::EntryType::GNULongName
                    | tar::EntryType::GNULongLink
            ) {
                continue;
            }
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let unsafe_path = |reason: String| ImageError::UnsafePath {
                layer: layer.to_string(),
                path: shown.clone(),
                reason,
            };
            let rel = normalise_entry_path(&raw).map_err(unsafe_path)?;
            let (parent_comps, name): (Vec<OsString>, OsString) = match rel.file_name() {
                Some(n) => (
                    rel.parent()
                        .map(|p| p.components().map(|c| c.as_os_str().to_owned()).collect())
                        .unwrap_or_default(),
                    n.to_owned(),
                ),
                None => {
                    // The root itself ("./"): only its metadata.
                    if kind.is_dir() {
                        let meta = self.meta(&mut entry)?;
                        self.set_owner_xattrs(&self.root.clone(), &meta)?;
                        deferred_dirs.push((PathBuf::new(), meta.mode, meta.mtime));
                        continue;
                    }
                    return Err(unsafe_path("a non-directory entry names the root".into()));
                }
            };
            let name_bytes = name.as_bytes();

            // Whiteouts delete from lower layers; they are never materialised.
            if let Some(target) = name_bytes.strip_prefix(b".wh.") {
                let Some(parent) = self.resolve_dir(layer, &shown, &parent_comps, false)? else {
                    continue;
                };
                if target == b"." || target == b".." {
                    return Err(unsafe_path("a whiteout of `.` or `..`".into()));
                }
                if target == b".wh..opq" {
                    self.clear_lower(&parent, &this_layer)
                        .map_err(|e| self.io_err("apply opaque whiteout", &parent, e))?;
                } else if target.starts_with(b".wh.") || target.is_empty() {
                    // Other AUFS metadata (.wh..wh.plnk, ...): nothing to do.
                } else {
                    let rel = parent.join(OsStr::from_bytes(target));
                    if !this_layer.contains(&rel) {
                        self.remove_path(&rel)?;
                    }
                }
                continue;
            }

            let parent = self
                .resolve_dir(layer, &shown, &parent_comps, true)?
                .expect("created");
            let rel = parent.join(&name);
            mark_with_ancestors(&mut this_layer, &rel);
            let host = self.root.join(&rel);
            let meta = self.meta(&mut entry)?;
            match kind {
                tar::EntryType::Directory => {
                    match fs::symlink_metadata(&host) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            self.remove_path(&rel)?;
                            self.mkdir(&host)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => self.mkdir(&host)?,
                        Err(e) => return Err(self.io_err("inspect", &rel, e)),
                    }
                    self.known_dirs.insert(rel.clone());
                    self.set_owner_xattrs(&host, &meta)?;
                    deferred_dirs.push((rel, meta.mode, meta.mtime));
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    self.remove_path(&rel)?;
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&host)
                        .map_err(|e| self.io_err("create", &rel, e))?;
                    self.copy_data(&mut entry, &mut f, &rel)?;
                    if self.privileged {
                        std::os::unix::fs::fchown(&f, Some(meta.uid), Some(meta.gid))
                            .map_err(|e| self.io_err("chown", &rel, e))?;
                    }
                    f.set_permissions(fs::Permissions::from_mode(meta.mode))
                        .map_err(|e| self.io_err("chmod", &rel, e))?;
                    self.set_xattrs(&host, &meta);
                    let t = fs::FileTimes::new()
                        .set_modified(meta.mtime)
                        .set_accessed(meta.mtime);
                    f.set_times(t)
                        .map_err(|e| self.io_err("set times", &rel, e))?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| invalid(format!("symlink {shown} has no target")))?
                        .into_owned();
                    self.remove_path(&rel)?;
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &host)
                        .map_err(|e| self.io_err("symlink", &rel, e))?;
                    if self.privileged {
                        std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid))
                            .map_err(|e| self.io_err("chown", &rel, e))?;
                    }
                    self.set_xattrs(&host, &meta);
                    set_times_nofollow(&host, meta.mtime)
                        .map_err(|e| self.io_err("set times", &rel, e))?;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| invalid(format!("hard link {shown} has no target")))?
                        .into_owned();
                    let src_rel = normalise_entry_path(&target).map_err(&unsafe_path)?;
                    let src_name = src_rel
                        .file_name()
                        .ok_or_else(|| unsafe_path("a hard link to the root".into()))?
                        .to_owned();
                    let src_parent: Vec<OsString> = src_rel
                        .parent()
                        .map(|p| p.components().map(|c| c.as_os_str().to_owned()).collect())
                        .unwrap_or_default();
                    let src_dir = self
                        .resolve_dir(layer, &shown, &src_parent, false)?
                        .ok_or_else(|| {
                            invalid(format!(
                                "hard link {shown} -> {} : target does not exist",
                                src_rel.display()
                            ))
                        })?;
                    let src = self.root.join(src_dir.join(&src_name));
                    match fs::symlink_metadata(&src) {
                        Ok(m) if !m.is_dir() => {}
                        _ => {
                            return Err(invalid(format!(
                                "hard link {shown} -> {}: target is missing or a directory",
                                src_rel.display()
                            )))
                        }
                    }
                    if src == host {
                        continue;
                    }
                    self.remove_path(&rel)?;
                    // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                    fs::hard_link(&src, &host).map_err(|e| self.io_err("hard link", &rel, e))?;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    self.remove_path(&rel)?;
                    let (fmt, dev) = match kind {
                        tar::EntryType::Char => (libc::S_IFCHR, true),
                        tar::EntryType::Block => (libc::S_IFBLK, true),
                        _ => (libc::S_IFIFO, false),
                    };
                    if dev && !self.privileged {
                        self.warnings
                            .push(format!("{shown}: device node skipped (needs root)"));
                        continue;
                    }
                    let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                    let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                    let c = cpath(&host)?;
                    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
                    let rc = unsafe {
                        libc::mknod(
                            c.as_ptr(),
                            fmt | (meta.mode & 0o7777),
                            libc::makedev(major, minor),
                        )
                    };
                    if rc != 0 {
                        return Err(self.io_err("mknod", &rel, io::Error::last_os_error()));
                    }
                    if self.privileged {
                        std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid))
                            .map_err(|e| self.io_err("chown", &rel, e))?;
                    }
                    fs::set_permissions(&host, fs::Permissions::from_mode(meta.mode))
                        .map_err(|e| self.io_err("chmod", &rel, e))?;
                    self.set_xattrs(&host, &meta);
                    set_times_nofollow(&host, meta.mtime)
                        .map_err(|e| self.io_err("set times", &rel, e))?;
                }
                other => {
                    self.warnings
                        .push(format!("{shown}: tar entry type {other:?} skipped"));
                }
            }
        }
        // Directory modes and times last: creating their content changed the times, and a
        // read-only directory must stay writable while it is filled.
        for (rel, mode, mtime) in deferred_dirs.into_iter().rev() {
            let host = self.root.join(&rel);
            // A later entry may have replaced the directory (with a symlink, say): never
            // follow it.
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            fs::set_permissions(&host, fs::Permissions::from_mode(mode))
                .map_err(|e| self.io_err("chmod", &rel, e))?;
            set_times_nofollow(&host, mtime).map_err(|e| self.io_err("set times", &rel, e))?;
        }
        Ok(())
    }

    fn io_err(&self, what: &str, rel: &Path, e: io::Error) -> ImageError {
        ImageError::io_at(what, &self.root.join(rel), e)
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> ImageResult<Meta> {
        let h = entry.header();
        let mut m = Meta {
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(h.mtime().unwrap_or(0)),
            xattrs: Vec::new(),
        };
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    if let Ok(c) = CString::new(name) {
                        m.xattrs.push((c, value.to_vec()));
                    }
                    continue;
                }
                let text = String::from_utf8_lossy(value);
                match key {
                    "uid" => m.uid = text.parse().unwrap_or(m.uid),
                    "gid" => m.gid = text.parse().unwrap_or(m.gid),
                    "mtime" => {
                        if let Ok(secs) = text.parse::<f64>() {
                            if secs.is_finite() && secs >= 0.0 {
                                m.mtime = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(m)
    }

    fn copy_data(&mut self, r: &mut impl Read, f: &mut File, rel: &Path) -> ImageResult<()> {
        loop {
            let n = match r.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ImageError::InvalidImage {
                        reference: rel.display().to_string(),
                        reason: format!("layer data unreadable: {e}"),
                    })
                }
            };
            f.write_all(&self.buf[..n])
                .map_err(|e| ImageError::io_at("write", &self.root.join(rel), e))?;
        }
    }

    fn set_owner_xattrs(&mut self, host: &Path, meta: &Meta) -> ImageResult<()> {
        if self.privileged {
            std::os::unix::fs::lchown(host, Some(meta.uid), Some(meta.gid))
                .map_err(|e| ImageError::io_at("chown", host, e))?;
        }
        self.set_xattrs(host, meta);
        Ok(())
    }

    fn set_xattrs(&mut self, host: &Path, meta: &Meta) {
        if meta.xattrs.is_empty() {
            return;
        }
        let Ok(c) = cpath(host) else { return };
        for (name, value) in &meta.xattrs {
            // SAFETY: `c` and `name` are valid NUL-terminated strings and `value` a live
            // buffer of the given length, all outliving the call.
            let rc = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc != 0 {
                self.warnings.push(format!(
                    "{}: xattr {} not set: {}",
                    host.display(),
                    name.to_string_lossy(),
                    io::Error::last_os_error()
                ));
            }
        }
    }

    fn mkdir(&mut self, host: &Path) -> ImageResult<()> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(host)
            .map_err(|e| ImageError::io_at("mkdir", host, e))
    }

    /// Removes whatever is at `rel` (not following a final symlink).
    fn remove_path(&mut self, rel: &Path) -> ImageResult<()> {
        let host = self.root.join(rel);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {
                self.known_dirs.clear();
                fs::remove_dir_all(&host).map_err(|e| ImageError::io_at("remove", &host, e))
            }
            Ok(_) => fs::remove_file(&host).map_err(|e| ImageError::io_at("remove", &host, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io_at("inspect", &host, e)),
        }
    }

    /// Removes from directory `dir` everything this layer did not create (an opaque marker).
    fn clear_lower(&mut self, dir: &Path, keep: &HashSet<PathBuf>) -> io::Result<()> {
        for ent in fs::read_dir(self.root.join(dir))? {
            let ent = ent?;
            let rel = dir.join(ent.file_name());
            let is_dir = ent.file_type()?.is_dir();
            if keep.contains(&rel) {
                if is_dir {
                    self.clear_lower(&rel, keep)?;
                }
            } else if is_dir {
                self.known_dirs.clear();
                fs::remove_dir_all(ent.path())?;
            } else {
                fs::remove_file(ent.path())?;
            }
        }
        Ok(())
    }

    /// Resolves the directory named by `comps` inside the root, following symlinks inside
    /// the root. Missing directories are created (0755) when `create`, else `None`.
    fn resolve_dir(
        &mut self,
        layer: &str,
        shown: &str,
        comps: &[OsString],
        create: bool,
    ) -> ImageResult<Option<PathBuf>> {
        let unsafe_path = |reason: String| ImageError::UnsafePath {
            layer: layer.to_string(),
            path: shown.to_string(),
            reason,
        };
        let mut todo: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut cur = PathBuf::new();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                if !cur.pop() {
                    return Err(unsafe_path(
                        "a symlink on its path leads outside the root".into(),
                    ));
                }
                continue;
            }
            if c.is_empty() || c == "." {
                continue;
            }
            let cand = cur.join(&c);
            if self.known_dirs.contains(&cand) {
                cur = cand;
                continue;
            }
            let host = self.root.join(&cand);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => {
                    self.known_dirs.insert(cand.clone());
                    cur = cand;
                }
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(unsafe_path("too many levels of symlinks".into()));
                    }
                    let target = fs::read_link(&host)
                        .map_err(|e| ImageError::io_at("readlink", &host, e))?;
                    if target.is_absolute() {
                        cur = PathBuf::new();
                    }
                    for comp in target.components().rev() {
                        match comp {
                            Component::Normal(n) => todo.push_front(n.to_owned()),
                            Component::ParentDir => todo.push_front("..".into()),
                            _ => {}
                        }
                    }
                }
                Ok(_) => {
                    return Err(ImageError::InvalidImage {
                        reference: layer.to_string(),
                        reason: format!("{shown}: {} is not a directory", cand.display()),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    self.mkdir(&host)?;
                    self.known_dirs.insert(cand.clone());
                    cur = cand;
                }
                Err(e) => return Err(ImageError::io_at("inspect", &host, e)),
            }
        }
        Ok(Some(cur))
    }
}

fn mark_with_ancestors(set: &mut HashSet<PathBuf>, rel: &Path) {
    let mut p = Some(rel);
    while let Some(q) = p {
        if q.as_os_str().is_empty() || !set.insert(q.to_path_buf()) {
            break;
        }
        p = q.parent();
    }
}

fn cpath(p: &Path) -> ImageResult<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ImageError::InvalidImage {
        reference: p.display().to_string(),
        reason: "path contains a NUL byte".into(),
    })
}

fn set_times_nofollow(p: &Path, t: SystemTime) -> io::Result<()> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as _,
    };
    let times = [ts, ts];
    let c = CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path and `times` an array of two timespecs, both
    // alive for the duration of the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
