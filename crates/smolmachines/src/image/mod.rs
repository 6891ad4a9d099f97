//! OCI images for the local engine (SPEC §3.8, §4.5): pull from a registry or import a local
//! source into a content-addressed cache shared by every process, unpack the layers with OCI
//! semantics, and make a read-only block image (erofs by default) the guest mounts as the
//! lower layer of its root file system.
//!
//! ```no_run
//! # async fn demo() -> Result<(), smolmachines::image::ImageError> {
//! use smolmachines::image::ImageStore;
//! let store = ImageStore::open_default()?;
//! let info = store.pull("python:3.12", None).await?;    // docker.io/library/python:3.12
//! let config = store.config(&info.reference)?;          // Env, WorkingDir, Entrypoint, Cmd, User
//! let disk = store.rootfs_image(&info.reference).await?; // attach read-only as virtio-blk
//! # Ok(()) }
//! ```
//!
//! Sources: registry references (`alpine`, `127.0.0.1:5000/library/python:3.12`,
//! `ghcr.io/o/r@sha256:...`), OCI layout directories (`oci:PATH[:TAG]`), `docker save`
//! archives (`docker-archive:PATH[:REPO:TAG]`) and plain root file system directories
//! (`dir:PATH`); a bare path is classified by what is there. See [`ImageSource::parse`].
//!
//! The cache (`<SMOL_HOME>/images`, layout in `store.rs`) names blobs by digest and writes
//! every file through `tmp/` + fsync + rename, so a crash or a full disk never leaves a
//! complete-looking blob; `flock`s make concurrent pulls by several processes download each
//! blob once. Block images are erofs by default (uncompressed: the fastest to make, no
//! decompression in the guest, xattrs kept); `SMOL_ROOTFS_FORMAT=ext4|erofs-lz4` or
//! [`PullOptions::format`] choose another. Errors are [`ImageError`] (typed fields), which
//! converts into the crate's [`crate::Error`] with `?`.

mod auth;
mod blockimg;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod local;
mod oci;
mod pipe;
mod pull;
mod reference;
mod registry;
mod scratch;
mod store;
mod unpack;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use blockimg::RootfsFormat;
pub use error::{ImageError, ImageResult};
pub use reference::ImageSource;
pub use scratch::Scratch;
pub use store::PruneReport;

use store::{Cache, RefRecord};

/// An image in the local cache (SPEC §3.8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The canonical reference, e.g. `docker.io/library/alpine:latest`, or the local source
    /// (`oci:/path:tag`, `docker-archive:/path`, `dir:/path`).
    pub reference: String,
    /// The manifest digest (`sha256:...`); for a plain directory, a fingerprint of the tree.
    pub digest: String,
    /// Bytes of the image: compressed layers plus config (or the directory's tree).
    pub size: u64,
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// Operating system, e.g. `linux`.
    pub os: String,
}

/// The run defaults of an image (its config's `Env`, `WorkingDir`, `Entrypoint`, `Cmd`, `User`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE` entries, in the image's order.
    pub env: Vec<String>,
    /// Working directory (absolute), if the image sets one.
    pub working_dir: Option<String>,
    /// Entrypoint argv (empty when unset).
    pub entrypoint: Vec<String>,
    /// Default arguments (empty when unset).
    pub cmd: Vec<String>,
    /// `user[:group]` (name or id), if the image sets one.
    pub user: Option<String>,
}

/// `PATH` for images that do not set one (the value Docker uses).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageConfig {
    /// The image's environment as a map (a later duplicate wins; a `PATH` is always present).
    pub fn env_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for kv in &self.env {
            match kv.split_once('=') {
                Some((k, v)) => m.insert(k.to_string(), v.to_string()),
                None => m.insert(kv.clone(), String::new()),
            };
        }
        m.entry("PATH".to_string())
            .or_insert_with(|| DEFAULT_PATH.to_string());
        m
    }

    /// The image's environment with the caller's on top (the caller wins).
    pub fn merged_env(&self, caller: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut m = self.env_map();
        m.extend(caller.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    }

    /// The argv to run: `command` when given and non-empty (it overrides both ENTRYPOINT and
    /// CMD, as `MachineConfig.command` does), else ENTRYPOINT followed by CMD.
    pub fn argv(&self, command: Option<&[String]>) -> Vec<String> {
        match command {
            Some(c) if !c.is_empty() => c.to_vec(),
            _ => self
                .entrypoint
                .iter()
                .chain(self.cmd.iter())
                .cloned()
                .collect(),
        }
    }

    fn from_file(c: &oci::ConfigFile) -> Self {
        let cc = c.config.clone().unwrap_or_default();
        ImageConfig {
            env: cc.env.unwrap_or_default(),
            working_dir: cc.working_dir.filter(|w| !w.is_empty()),
            entrypoint: cc.entrypoint.unwrap_or_default(),
            cmd: cc.cmd.unwrap_or_default(),
            user: cc.user.filter(|u| !u.is_empty()),
        }
    }
}

/// State of one layer during a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerStatus {
    /// Bytes are arriving.
    Downloading,
    /// Already in the cache; nothing to download.
    Cached,
    /// Downloaded and verified.
    Complete,
}

/// Progress of a pull, reported to the callback.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// The manifest is known.
    Resolved {
        /// Canonical reference.
        reference: String,
        /// Manifest digest.
        digest: String,
        /// `(digest, size)` of each layer, base first.
        layers: Vec<(String, u64)>,
    },
    /// Bytes of one layer.
    Layer {
        /// Index in the manifest (0 = base).
        index: usize,
        /// Layer digest.
        digest: String,
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
        /// What is happening.
        status: LayerStatus,
    },
    /// Applying layer `index` of `count` to the root file system.
    Unpacking {
        /// Layer index.
        index: usize,
        /// Number of layers.
        count: usize,
    },
    /// Making the block image.
    Building {
        /// Its file system.
        format: RootfsFormat,
    },
}

/// The progress callback of [`ImageStore::pull`]; called from the pulling tasks and threads.
pub type Progress = Arc<dyn Fn(&PullEvent) + Send + Sync>;

/// How pulls behave.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Limit on establishing a connection to a registry (default 5 s; with the retries, an
    /// unreachable registry fails within about 25 s).
    pub connect_timeout: Duration,
    /// Limit on a read stalling mid-transfer (default 60 s).
    pub read_timeout: Duration,
    /// Tries per request, transient errors only (default 4).
    pub attempts: u32,
    /// First retry delay, doubled on each retry (default 250 ms).
    pub retry_backoff: Duration,
    /// Layers downloaded at once (default 3).
    pub max_concurrent_downloads: usize,
    /// File system of the block images (default from `SMOL_ROOTFS_FORMAT`, else erofs).
    pub format: RootfsFormat,
    /// Where trees are unpacked before their block image is made (default: tmpfs with room).
    pub scratch: Scratch,
    /// Registry credentials in Docker's `config.json` format (default:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
    pub auth_file: Option<PathBuf>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            attempts: 4,
            retry_backoff: Duration::from_millis(250),
            max_concurrent_downloads: 3,
            format: RootfsFormat::from_env().unwrap_or_default(),
            scratch: Scratch::Auto,
            auth_file: None,
        }
    }
}

/// Makes a read-only block image `dest` (a new file) of the directory `src`, with the tools the
/// image cache uses (`mkfs.erofs`, `mkfs.ext4 -d`).
pub fn build_block_image(src: &Path, dest: &Path, format: RootfsFormat) -> ImageResult<()> {
    blockimg::build(src, dest, format)
}

/// An image ready to boot: what [`ImageStore::ensure`] returns.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Identity.
    pub info: ImageInfo,
    /// Run defaults.
    pub config: ImageConfig,
    /// The read-only block image.
    pub rootfs: PathBuf,
    /// Its file system (for `mount -t`).
    pub format: RootfsFormat,
}

/// The image cache of one engine home (`<SMOL_HOME>/images`), safe to share between threads
/// and processes.
#[derive(Debug, Clone)]
pub struct ImageStore {
    cache: Cache,
    opts: PullOptions,
}

fn info_of(r: &RefRecord) -> ImageInfo {
    ImageInfo {
        reference: r.reference.clone(),
        digest: r.digest.clone(),
        size: r.size,
        architecture: r.architecture.clone(),
        os: r.os.clone(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ImageResult<T> + Send + 'static,
) -> ImageResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Io {
            context: "image worker thread".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}

impl ImageStore {
    /// The store of the engine home `home` (images live in `home/images`).
    pub fn open(home: impl AsRef<Path>) -> ImageResult<Self> {
        Ok(ImageStore {
            cache: Cache::open(&home.as_ref().join("images"))?,
            opts: PullOptions::default(),
        })
    }

    /// The store of the default engine home (`SMOL_HOME`, else `~/.local/share/smol`).
    pub fn open_default() -> ImageResult<Self> {
        Self::open(crate::local::assets::smol_home())
    }

    /// Replaces the pull options.
    pub fn with_options(mut self, opts: PullOptions) -> Self {
        self.opts = opts;
        self
    }

    /// The pull options.
    pub fn options(&self) -> &PullOptions {
        &self.opts
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        self.cache.root()
    }

    /// Fetches (or imports) an image, verifies every blob, unpacks it and makes its block
    /// image; then records the reference. A registry reference is always resolved again (a tag
    /// may have moved); blobs already in the cache are not downloaded again.
    pub async fn pull(&self, image: &str, progress: Option<Progress>) -> ImageResult<ImageInfo> {
        let source = ImageSource::parse(image)?;
        let cache = self.cache.clone();
        let guard = blocking(move || cache.lock_shared()).await?;
        let rec = self.fetch_record(&source, progress.as_ref()).await?;
        let (cache, rec2, opts) = (self.cache.clone(), rec.clone(), self.opts.clone());
        blocking(move || {
            pull::build_rootfs(&cache, &rec2, opts.format, &opts.scratch, progress.as_ref())
        })
        .await?;
        self.cache.write_ref(&rec)?;
        drop(guard);
        Ok(info_of(&rec))
    }

    /// Downloads (or imports) and verifies an image and records its reference, without
    /// unpacking it: the root file system and block image are made on first use
    /// ([`ImageStore::rootfs_image`], [`ImageStore::unpack_to`]), where unsafe layers are refused.
    pub async fn fetch(&self, image: &str, progress: Option<Progress>) -> ImageResult<ImageInfo> {
        let source = ImageSource::parse(image)?;
        let cache = self.cache.clone();
        let guard = blocking(move || cache.lock_shared()).await?;
        let rec = self.fetch_record(&source, progress.as_ref()).await?;
        self.cache.write_ref(&rec)?;
        drop(guard);
        Ok(info_of(&rec))
    }

    async fn fetch_record(
        &self,
        source: &ImageSource,
        progress: Option<&Progress>,
    ) -> ImageResult<RefRecord> {
        match source {
            ImageSource::Registry(r) => {
                pull::pull_registry(&self.cache, r, &self.opts, progress).await
            }
            other => {
                let (cache, other) = (self.cache.clone(), other.clone());
                blocking(move || local::import(&cache, &other)).await
            }
        }
    }

    /// The image ready to boot: from the cache when it is there (no network), else pulled.
    pub async fn ensure(
        &self,
        image: &str,
        progress: Option<Progress>,
    ) -> ImageResult<PreparedImage> {
        let source = ImageSource::parse(image)?;
        let canonical = source.canonical();
        let cached = match &source {
            // A directory may have changed: fingerprint it again.
            ImageSource::Dir { .. } => None,
            _ => self.cache.read_ref(&canonical)?,
        };
        if cached.is_none() {
            self.pull(image, progress).await?;
        }
        let rootfs = self.rootfs_image(&canonical).await?;
        let rec = self.record(&canonical)?;
        Ok(PreparedImage {
            info: info_of(&rec),
            config: rec.config,
            rootfs,
            format: self.opts.format,
        })
    }

    fn record(&self, image: &str) -> ImageResult<RefRecord> {
        let canonical = ImageSource::parse(image)?.canonical();
        self.cache
            .read_ref(&canonical)?
            .ok_or(ImageError::NotPulled {
                reference: canonical,
            })
    }

    /// Every image in the cache.
    pub fn list(&self) -> ImageResult<Vec<ImageInfo>> {
        Ok(self.cache.list_refs()?.iter().map(info_of).collect())
    }

    /// One cached image ([`ImageError::NotPulled`] when it is not there).
    pub fn inspect(&self, image: &str) -> ImageResult<ImageInfo> {
        Ok(info_of(&self.record(image)?))
    }

    /// The run defaults of a cached image.
    pub fn config(&self, image: &str) -> ImageResult<ImageConfig> {
        Ok(self.record(image)?.config)
    }

    /// The read-only block image of a cached image, made now if it is not there yet (once per
    /// manifest digest, shared by every process).
    pub async fn rootfs_image(&self, image: &str) -> ImageResult<PathBuf> {
        let rec = self.record(image)?;
        let (cache, opts) = (self.cache.clone(), self.opts.clone());
        blocking(move || {
            let _g = cache.lock_shared()?;
            pull::build_rootfs(&cache, &rec, opts.format, &opts.scratch, None)
        })
        .await
    }

    /// Unpacks a cached image into `dest` (an empty or missing directory): the tree its block
    /// image is made from.
    pub async fn unpack_to(&self, image: &str, dest: &Path) -> ImageResult<()> {
        let rec = self.record(image)?;
        let (cache, dest) = (self.cache.clone(), dest.to_path_buf());
        blocking(move || {
            let _g = cache.lock_shared()?;
            std::fs::create_dir_all(&dest)
                .map_err(|e| ImageError::io_at("create directory", &dest, e))?;
            pull::unpack_layers(&cache, &rec, &dest, None).map(|_| ())
        })
        .await
    }

    /// Forgets a reference, then deletes every blob and block image no reference uses.
    pub async fn remove(&self, image: &str) -> ImageResult<PruneReport> {
        let canonical = ImageSource::parse(image)?.canonical();
        let cache = self.cache.clone();
        blocking(move || {
            let _g = cache.lock_exclusive()?;
            if !cache.remove_ref(&canonical)? {
                return Err(ImageError::NotPulled {
                    reference: canonical,
                });
            }
            let mut report = PruneReport {
                refs_removed: vec![canonical],
                ..Default::default()
            };
            cache.collect_garbage(&mut report)?;
            Ok(report)
        })
        .await
    }

    /// Deletes what no reference uses: blobs of replaced tags or refused pulls, block images of
    /// removed images, and leftovers of interrupted pulls.
    pub async fn prune(&self) -> ImageResult<PruneReport> {
        let (cache, scratch) = (self.cache.clone(), self.opts.scratch.clone());
        blocking(move || {
            let _g = cache.lock_exclusive()?;
            let mut report = PruneReport::default();
            cache.collect_garbage(&mut report)?;
            let (n, bytes) = scratch.clean_dead();
            report.tmp_removed += n;
            report.bytes_freed += bytes;
            Ok(report)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_and_argv() {
        let c = ImageConfig {
            env: vec!["PATH=/img/bin".into(), "LANG=C.UTF-8".into(), "A=1".into()],
            working_dir: Some("/app".into()),
            entrypoint: vec!["python3".into()],
            cmd: vec!["-V".into()],
            user: None,
        };
        let caller = BTreeMap::from([("A".to_string(), "2".to_string())]);
        let m = c.merged_env(&caller);
        assert_eq!(m["A"], "2");
        assert_eq!(m["PATH"], "/img/bin");
        assert_eq!(m["LANG"], "C.UTF-8");
        assert_eq!(c.argv(None), vec!["python3", "-V"]);
        let cmd = vec!["sh".to_string()];
        assert_eq!(c.argv(Some(&cmd)), vec!["sh"]);
        assert_eq!(ImageConfig::default().env_map()["PATH"], DEFAULT_PATH);
    }
}
