//! A registry pull (manifest, config, layers downloaded concurrently into the cache) and the
//! making of the root file system and its block image from cached layers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use oci_client::Reference;

use super::blockimg::{self, RootfsFormat};
use super::error::{ImageError, ImageResult};
use super::oci::{digest_hex, pick_platform, ConfigFile, Descriptor, Manifest, ManifestKind};
use super::pipe::LayerStream;
use super::registry::RegistryClient;
use super::scratch::Scratch;
use super::store::{Cache, RefRecord};
use super::unpack::Unpacker;
use super::{blocking, ImageConfig, LayerStatus, Progress, PullEvent, PullOptions};

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn emit(progress: Option<&Progress>, ev: PullEvent) {
    if let Some(p) = progress {
        p(&ev);
    }
}

/// Pulls `reference` into the cache and returns the record to write once its block image is
/// made. The caller holds the shared store lock.
pub(crate) async fn pull_registry(
    cache: &Cache,
    reference: &Reference,
    opts: &PullOptions,
    progress: Option<&Progress>,
) -> ImageResult<RefRecord> {
    let whole = reference.whole();
    let client = Arc::new(RegistryClient::new(reference, opts));
    client.login(reference).await?;
    let (bytes, digest) = client.manifest(reference).await?;
    let mut extra_blobs = Vec::new();
    let (manifest_bytes, manifest_digest, config_desc, layers) =
        match Manifest::parse(&whole, &bytes)? {
            ManifestKind::Image { config, layers } => (bytes, digest, config, layers),
            ManifestKind::Index(entries) => {
                let pick = pick_platform(&whole, &entries)?;
                cache.put_blob(&digest, "image index", &bytes)?;
                extra_blobs.push(digest);
                let by_digest = reference.clone_with_digest(pick.digest.clone());
                let (b2, d2) = client.manifest(&by_digest).await?;
                if d2 != pick.digest {
                    return Err(ImageError::DigestMismatch {
                        what: format!("linux/amd64 manifest of {whole}"),
                        expected: pick.digest,
                        actual: d2,
                    });
                }
                match Manifest::parse(&whole, &b2)? {
                    ManifestKind::Image { config, layers } => (b2, d2, config, layers),
                    ManifestKind::Index(_) => {
                        return Err(ImageError::InvalidImage {
                            reference: whole,
                            reason: "an index entry is itself an index".into(),
                        })
                    }
                }
            }
        };
    for d in layers.iter().chain(std::iter::once(&config_desc)) {
        digest_hex(&whole, &d.digest)?;
    }
    cache.put_blob(&manifest_digest, "manifest", &manifest_bytes)?;
    emit(
        progress,
        PullEvent::Resolved {
            reference: whole.clone(),
            digest: manifest_digest.clone(),
            layers: layers.iter().map(|l| (l.digest.clone(), l.size)).collect(),
        },
    );

    // The config (small), then the layers, a few at a time.
    fetch_blob(
        cache,
        &client,
        reference,
        &config_desc,
        "image config",
        None,
        None,
    )
    .await?;
    let config_file = ConfigFile::parse(&whole, &cache.read_blob(&config_desc.digest)?)?;
    if let Some(rootfs) = &config_file.rootfs {
        if !rootfs.diff_ids.is_empty() && rootfs.diff_ids.len() != layers.len() {
            return Err(ImageError::InvalidImage {
                reference: whole,
                reason: format!(
                    "{} layers but {} diff_ids in the config",
                    layers.len(),
                    rootfs.diff_ids.len()
                ),
            });
        }
    }
    let n = opts.max_concurrent_downloads.max(1);
    futures::stream::iter(layers.iter().enumerate())
        .map(|(i, l)| {
            let client = client.clone();
            async move {
                fetch_blob(cache, &client, reference, l, "layer", Some(i), progress).await
            }
        })
        .buffer_unordered(n)
        .try_collect::<Vec<()>>()
        .await?;

    let size = config_desc.size + layers.iter().map(|l| l.size).sum::<u64>();
    Ok(RefRecord {
        reference: whole,
        digest: manifest_digest,
        config_digest: Some(config_desc.digest.clone()),
        layers: layers.iter().map(|l| l.digest.clone()).collect(),
        extra_blobs,
        size,
        architecture: config_file.architecture.clone(),
        os: config_file.os.clone(),
        config: ImageConfig::from_file(&config_file),
        dir: None,
        recorded_at: now(),
    })
}

/// Downloads one blob into the cache unless it is there. Concurrent pulls of the same blob (in
/// this or another process) wait on its lock, then find it present.
async fn fetch_blob(
    cache: &Cache,
    client: &RegistryClient,
    reference: &Reference,
    desc: &Descriptor,
    what: &str,
    index: Option<usize>,
    progress: Option<&Progress>,
) -> ImageResult<()> {
    let report = |done: u64, status: LayerStatus| {
        if let Some(i) = index {
            emit(
                progress,
                PullEvent::Layer {
                    index: i,
                    digest: desc.digest.clone(),
                    done,
                    total: desc.size,
                    status,
                },
            );
        }
    };
    if cache.has_blob(&desc.digest) {
        report(desc.size, LayerStatus::Cached);
        return Ok(());
    }
    let hex = digest_hex(&desc.digest, &desc.digest)?.to_string();
    let c = cache.clone();
    let lock = blocking(move || c.lock_item(&hex)).await?;
    if cache.has_blob(&desc.digest) {
        report(desc.size, LayerStatus::Cached);
        return Ok(());
    }
    let mut w = cache.blob_writer()?;
    report(0, LayerStatus::Downloading);
    client
        .blob(reference, desc, &mut w, &|n| {
            report(n, LayerStatus::Downloading)
        })
        .await?;
    let (c, expected) = (cache.clone(), desc.digest.clone());
    let what = match index {
        Some(i) => format!("{what} {i} of {}", reference.whole()),
        None => format!("{what} of {}", reference.whole()),
    };
    blocking(move || w.commit(&c, &expected, &what)).await?;
    drop(lock);
    report(desc.size, LayerStatus::Complete);
    Ok(())
}

/// Applies the layers of `rec`, base first, to `root` (existing directory); checks each
/// uncompressed layer against the config's diff_ids. Returns the unpacker's warnings.
pub(crate) fn unpack_layers(
    cache: &Cache,
    rec: &RefRecord,
    root: &Path,
    progress: Option<&Progress>,
) -> ImageResult<Vec<String>> {
    let diff_ids = match &rec.config_digest {
        Some(c) => ConfigFile::parse(&rec.reference, &cache.read_blob(c)?)?
            .rootfs
            .map(|r| r.diff_ids)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let mut u = Unpacker::new(root);
    for (i, digest) in rec.layers.iter().enumerate() {
        emit(
            progress,
            PullEvent::Unpacking {
                index: i,
                count: rec.layers.len(),
            },
        );
        let path = cache.blob_path(digest)?;
        let mut stream =
            LayerStream::open(&path).map_err(|e| ImageError::io_at("open layer", &path, e))?;
        u.apply_layer(digest, &mut stream)?;
        let actual = stream.finish().map_err(|e| ImageError::InvalidImage {
            reference: rec.reference.clone(),
            reason: format!("layer {digest} does not decompress: {e}"),
        })?;
        if let Some(expected) = diff_ids.get(i) {
            if *expected != actual {
                return Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {i} ({digest}) of {}", rec.reference),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
    }
    Ok(u.warnings)
}

/// The block image of `rec`, made once per key and format (other builders wait on its lock).
/// The caller holds the shared store lock.
pub(crate) fn build_rootfs(
    cache: &Cache,
    rec: &RefRecord,
    format: RootfsFormat,
    scratch: &Scratch,
    progress: Option<&Progress>,
) -> ImageResult<PathBuf> {
    let key = rec.rootfs_key().to_string();
    let dest = cache.rootfs_path(&key, format.extension());
    if dest.is_file() {
        return Ok(dest);
    }
    let _l = cache.lock_item(&format!("rootfs-{key}-{}", format.extension()))?;
    if dest.is_file() {
        return Ok(dest);
    }
    // The tree (temporary: only mkfs reads it) goes to the scratch directory, the image to the
    // cache's tmp/ (same file system as rootfs/, for the rename).
    let mut tree_dir = None;
    let src = match &rec.dir {
        Some(dir) => dir.clone(),
        None => {
            let estimate = rec.size.saturating_mul(4);
            let (dir, root) = match scratch.resolve(estimate) {
                Some(s) => {
                    match unpack_in(cache, rec, Some(&s), progress) {
                        // The scratch file system filled up: use the cache's disk instead.
                        Err(ImageError::NoSpace { path }) if path.starts_with(&s) => {
                            unpack_in(cache, rec, None, progress)?
                        }
                        other => other?,
                    }
                }
                None => unpack_in(cache, rec, None, progress)?,
            };
            tree_dir = Some(dir);
            root
        }
    };
    emit(progress, PullEvent::Building { format });
    let work = cache.tmp_dir("image")?;
    let img = work.path().join(format!("image.{}", format.extension()));
    blockimg::build(&src, &img, format)?;
    drop(tree_dir);
    cache.commit_file(&img, &dest)?;
    Ok(dest)
}

/// Unpacks `rec` into a new directory under `scratch` (or the cache's tmp/); returns the
/// directory's guard and the root inside it.
fn unpack_in(
    cache: &Cache,
    rec: &RefRecord,
    scratch: Option<&Path>,
    progress: Option<&Progress>,
) -> ImageResult<(tempfile::TempDir, PathBuf)> {
    let dir = match scratch {
        Some(s) => {
            Scratch::make_dir(s).map_err(|e| ImageError::io_at("create directory in", s, e))?
        }
        None => cache.tmp_dir("unpack")?,
    };
    let root = dir.path().join("rootfs");
    std::fs::create_dir(&root).map_err(|e| ImageError::io_at("mkdir", &root, e))?;
    unpack_layers(cache, rec, &root, progress)?;
    Ok((dir, root))
}
