//! Local image sources: an OCI image layout directory, a `docker save` archive, and a plain
//! root file system directory. Blobs are copied into the cache and verified like pulled ones.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::{ImageError, ImageResult};
use super::oci::{
    digest_hex, pick_platform, sha256_digest, ConfigFile, Descriptor, LayerCompression, Manifest,
    ManifestKind, Sha256, OCI_MANIFEST,
};
use super::pull::now;
use super::reference::ImageSource;
use super::store::{Cache, RefRecord};
use super::ImageConfig;

/// Imports a local source into the cache; returns the record to write.
pub(crate) fn import(cache: &Cache, source: &ImageSource) -> ImageResult<RefRecord> {
    match source {
        ImageSource::OciLayout { path, tag } => {
            import_oci_layout(cache, source, path, tag.as_deref())
        }
        ImageSource::DockerArchive { path, tag } => {
            import_docker_archive(cache, source, path, tag.as_deref())
        }
        ImageSource::Dir { path } => import_dir(source, path),
        ImageSource::Registry(r) => Err(ImageError::InvalidReference {
            reference: r.whole(),
            reason: "not a local source".into(),
        }),
    }
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn import_oci_layout(
    cache: &Cache,
    source: &ImageSource,
    dir: &Path,
    tag: Option<&str>,
) -> ImageResult<RefRecord> {
    let name = source.canonical();
    let invalid = |reason: String| ImageError::InvalidImage {
        reference: name.clone(),
        reason,
    };
    let index_path = dir.join("index.json");
    let bytes = fs::read(&index_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::NotFound {
            reference: name.clone(),
            detail: format!("{} does not exist", index_path.display()),
        },
        _ => ImageError::io_at("read", &index_path, e),
    })?;
    let index: Index =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("index.json: {e}")))?;
    let entries: Vec<Descriptor> = match tag {
        Some(t) => index
            .manifests
            .iter()
            .filter(|d| {
                d.annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|n| n == t)
            })
            .cloned()
            .collect(),
        None => index.manifests.clone(),
    };
    if entries.is_empty() {
        let tags: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|d| d.annotations.as_ref()?.get(REF_NAME).cloned())
            .collect();
        return Err(ImageError::NotFound {
            reference: name.clone(),
            detail: format!("the layout has tags {tags:?}"),
        });
    }
    let blob = |digest: &str| -> ImageResult<PathBuf> {
        Ok(dir.join("blobs/sha256").join(digest_hex(&name, digest)?))
    };
    let read_blob = |d: &Descriptor, what: &str| -> ImageResult<Vec<u8>> {
        let p = blob(&d.digest)?;
        let b = fs::read(&p).map_err(|e| ImageError::io_at("read", &p, e))?;
        let actual = sha256_digest(&b);
        if actual != d.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("{what} in {}", dir.display()),
                expected: d.digest.clone(),
                actual,
            });
        }
        Ok(b)
    };
    let mut extra_blobs = Vec::new();
    let mut desc = if entries.len() == 1 {
        entries[0].clone()
    } else {
        pick_platform(&name, &entries)?
    };
    let (manifest_bytes, config, layers) = loop {
        let b = read_blob(&desc, "manifest")?;
        match Manifest::parse(&name, &b)? {
            ManifestKind::Image { config, layers } => break (b, config, layers),
            ManifestKind::Index(inner) => {
                if extra_blobs.len() > 4 {
                    return Err(invalid("indexes nested too deep".into()));
                }
                cache.put_blob(&desc.digest, "image index", &b)?;
                extra_blobs.push(desc.digest.clone());
                desc = pick_platform(&name, &inner)?;
            }
        }
    };
    cache.put_blob(&desc.digest, "manifest", &manifest_bytes)?;
    let config_bytes = read_blob(&config, "image config")?;
    cache.put_blob(&config.digest, "image config", &config_bytes)?;
    let config_file = ConfigFile::parse(&name, &config_bytes)?;
    for (i, l) in layers.iter().enumerate() {
        let p = blob(&l.digest)?;
        let f = File::open(&p).map_err(|e| ImageError::io_at("open layer", &p, e))?;
        cache.copy_blob(&l.digest, &format!("layer {i} in {}", dir.display()), f)?;
    }
    Ok(RefRecord {
        reference: name,
        digest: desc.digest.clone(),
        config_digest: Some(config.digest.clone()),
        layers: layers.iter().map(|l| l.digest.clone()).collect(),
        extra_blobs,
        size: config.size + layers.iter().map(|l| l.size).sum::<u64>(),
        architecture: config_file.architecture.clone(),
        os: config_file.os.clone(),
        config: ImageConfig::from_file(&config_file),
        dir: None,
        recorded_at: now(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Where each member of a tar archive is: (offset of its data, size), following symlinks and
/// hard links between members (`docker save` links identical layers).
fn index_tar(path: &Path) -> ImageResult<BTreeMap<String, (u64, u64)>> {
    let f = File::open(path).map_err(|e| ImageError::io_at("open", path, e))?;
    let mut ar = tar::Archive::new(f);
    let mut files = BTreeMap::new();
    let mut links = Vec::new();
    let bad = |e: std::io::Error| ImageError::InvalidImage {
        reference: path.display().to_string(),
        reason: format!("not a tar archive: {e}"),
    };
    for entry in ar.entries_with_seek().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let name = clean(&entry.path_bytes());
        let kind = entry.header().entry_type();
        if kind.is_file() {
            files.insert(name, (entry.raw_file_position(), entry.size()));
        } else if kind.is_symlink() || kind.is_hard_link() {
            if let Some(t) = entry.link_name_bytes() {
                let t = clean(&t);
                let target = if kind.is_symlink() {
                    let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                    clean(base.join(&t).as_os_str().as_bytes())
                } else {
                    t
                };
                links.push((name, target));
            }
        }
    }
    for _ in 0..4 {
        for (name, target) in &links {
            if let Some(v) = files.get(target).copied() {
                files.entry(name.clone()).or_insert(v);
            }
        }
    }
    Ok(files)
}

/// `./a/../b/c` -> `b/c` (lexically; member names only, nothing is written).
fn clean(p: &[u8]) -> String {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in p.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    String::from_utf8_lossy(&out.join(&b'/')).into_owned()
}

fn import_docker_archive(
    cache: &Cache,
    source: &ImageSource,
    path: &Path,
    tag: Option<&str>,
) -> ImageResult<RefRecord> {
    let name = source.canonical();
    let invalid = |reason: String| ImageError::InvalidImage {
        reference: name.clone(),
        reason,
    };
    let members = index_tar(path)?;
    let f = File::open(path).map_err(|e| ImageError::io_at("open", path, e))?;
    let member = |m: &str| -> ImageResult<std::io::Take<File>> {
        let (off, size) = *members
            .get(&clean(m.as_bytes()))
            .ok_or_else(|| invalid(format!("the archive has no {m}")))?;
        let mut g = f
            .try_clone()
            .map_err(|e| ImageError::io_at("open", path, e))?;
        g.seek(SeekFrom::Start(off))
            .map_err(|e| ImageError::io_at("seek", path, e))?;
        Ok(g.take(size))
    };
    let mut manifest = Vec::new();
    member("manifest.json")?
        .read_to_end(&mut manifest)
        .map_err(|e| ImageError::io_at("read manifest.json of", path, e))?;
    let entries: Vec<SaveEntry> =
        serde_json::from_slice(&manifest).map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let entry = match tag {
        Some(t) => {
            let want = t.parse::<oci_client::Reference>().map(|r| r.whole()).ok();
            entries.iter().find(|e| {
                e.repo_tags.iter().flatten().any(|rt| {
                    rt == t
                        || want.is_some()
                            && rt.parse::<oci_client::Reference>().map(|r| r.whole()).ok() == want
                })
            })
        }
        None if entries.len() == 1 => entries.first(),
        None => {
            return Err(invalid(format!(
                "the archive has {} images; name one: docker-archive:{}:REPO:TAG",
                entries.len(),
                path.display()
            )))
        }
    }
    .ok_or_else(|| ImageError::NotFound {
        reference: name.clone(),
        detail: "no such tag in the archive".into(),
    })?;

    let mut config_bytes = Vec::new();
    member(&entry.config)?
        .read_to_end(&mut config_bytes)
        .map_err(|e| ImageError::io_at("read image config of", path, e))?;
    let config_digest = sha256_digest(&config_bytes);
    // The config is named by its digest (`<hex>.json` or `blobs/sha256/<hex>`): check it.
    let stem = Path::new(&entry.config)
        .file_name()
        .map(|s| s.to_string_lossy().trim_end_matches(".json").to_string())
        .unwrap_or_default();
    if stem.len() == 64 && format!("sha256:{stem}") != config_digest {
        return Err(ImageError::DigestMismatch {
            what: format!("image config in {}", path.display()),
            expected: format!("sha256:{stem}"),
            actual: config_digest,
        });
    }
    let config_file = ConfigFile::parse(&name, &config_bytes)?;
    let diff_ids = config_file
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(invalid(format!(
            "{} layers but {} diff_ids",
            entry.layers.len(),
            diff_ids.len()
        )));
    }
    cache.put_blob(&config_digest, "image config", &config_bytes)?;

    let mut layers = Vec::new();
    for (i, l) in entry.layers.iter().enumerate() {
        // Hash first (the name of the blob is its digest), then copy verified.
        let mut head = [0u8; 4];
        let mut r = member(l)?;
        let n = r
            .read(&mut head)
            .map_err(|e| ImageError::io_at("read layer of", path, e))?;
        let compression = LayerCompression::sniff(&head[..n]);
        let mut h = Sha256::new();
        let mut size = 0u64;
        let mut r = member(l)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| ImageError::io_at("read layer of", path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        let digest = h.finish();
        // An uncompressed layer is its own diff: check it now (others at unpack time).
        if compression == LayerCompression::None && digest != diff_ids[i] {
            return Err(ImageError::DigestMismatch {
                what: format!("layer {i} ({l}) in {}", path.display()),
                expected: diff_ids[i].clone(),
                actual: digest,
            });
        }
        cache.copy_blob(
            &digest,
            &format!("layer {i} of {}", path.display()),
            member(l)?,
        )?;
        let media_type = match compression {
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        layers.push(Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: None,
        });
    }
    // An OCI manifest for it, so the image is addressed like a pulled one.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("JSON");
    let manifest_digest = sha256_digest(&manifest_bytes);
    cache.put_blob(&manifest_digest, "manifest", &manifest_bytes)?;
    Ok(RefRecord {
        reference: name,
        digest: manifest_digest,
        config_digest: Some(config_digest),
        layers: layers.iter().map(|l| l.digest.clone()).collect(),
        extra_blobs: Vec::new(),
        size: config_bytes.len() as u64 + layers.iter().map(|l| l.size).sum::<u64>(),
        architecture: config_file.architecture.clone(),
        os: config_file.os.clone(),
        config: ImageConfig::from_file(&config_file),
        dir: None,
        recorded_at: now(),
    })
}

/// A fingerprint of a directory tree: names, types, sizes, modes, owners, times, link targets.
/// Any change to the tree gives another fingerprint (and so another block image).
pub(crate) fn fingerprint(dir: &Path) -> ImageResult<(String, u64)> {
    let mut h = Sha256::new();
    let mut total = 0u64;
    fn walk(root: &Path, rel: &Path, h: &mut Sha256, total: &mut u64) -> ImageResult<()> {
        let p = root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&p)
            .map_err(|e| ImageError::io_at("list", &p, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let full = root.join(&r);
            let m = fs::symlink_metadata(&full).map_err(|e| ImageError::io_at("stat", &full, e))?;
            h.update(r.as_os_str().as_bytes());
            h.update(&[0]);
            for v in [
                m.mode() as u64,
                m.uid() as u64,
                m.gid() as u64,
                m.size(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
                m.rdev(),
                m.nlink(),
            ] {
                h.update(&v.to_le_bytes());
            }
            if m.file_type().is_symlink() {
                if let Ok(t) = fs::read_link(&full) {
                    h.update(t.as_os_str().as_bytes());
                }
            }
            h.update(&[0]);
            *total += m.size();
            if m.is_dir() {
                walk(root, &r, h, total)?;
            }
        }
        Ok(())
    }
    walk(dir, Path::new(""), &mut h, &mut total)?;
    Ok((h.finish(), total))
}

fn import_dir(source: &ImageSource, dir: &Path) -> ImageResult<RefRecord> {
    let name = source.canonical();
    if !dir.is_dir() {
        return Err(ImageError::NotFound {
            reference: name,
            detail: "not a directory".into(),
        });
    }
    let (digest, size) = fingerprint(dir)?;
    Ok(RefRecord {
        reference: name,
        digest,
        config_digest: None,
        layers: Vec::new(),
        extra_blobs: Vec::new(),
        size,
        architecture: "amd64".into(),
        os: "linux".into(),
        config: ImageConfig::default(),
        dir: Some(dir.to_path_buf()),
        recorded_at: now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_cleaned() {
        assert_eq!(clean(b"./abc/layer.tar"), "abc/layer.tar");
        assert_eq!(clean(b"abc/../def/layer.tar"), "def/layer.tar");
        assert_eq!(clean(b"blobs//sha256/x"), "blobs/sha256/x");
    }

    #[test]
    fn fingerprint_changes_with_the_tree() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a"), "1").unwrap();
        let (f1, s1) = fingerprint(d.path()).unwrap();
        assert_eq!(fingerprint(d.path()).unwrap().0, f1);
        fs::write(d.path().join("b"), "22").unwrap();
        let (f2, s2) = fingerprint(d.path()).unwrap();
        assert_ne!(f1, f2);
        assert_eq!(s2, s1 + 2);
    }
}
