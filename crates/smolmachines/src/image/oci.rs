//! The OCI / Docker v2 JSON documents this engine reads: manifests, indexes, image configs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{ImageError, ImageResult};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media types a manifest request accepts.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `v8` for arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A manifest or an index, as far as this engine reads them.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Must be 2.
    pub schema_version: u32,
    /// May be absent in OCI documents.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The image config (image manifests).
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// The layers, base first (image manifests).
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    /// The entries (indexes / manifest lists).
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

/// What kind of document a manifest is.
pub enum ManifestKind {
    /// An image manifest: config + layers.
    Image {
        /// The config descriptor.
        config: Descriptor,
        /// The layers, base first.
        layers: Vec<Descriptor>,
    },
    /// An index: pick an entry.
    Index(Vec<Descriptor>),
}

impl Manifest {
    /// Parses and classifies a manifest document.
    pub fn parse(reference: &str, bytes: &[u8]) -> ImageResult<ManifestKind> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ImageError::InvalidImage {
            reference: reference.to_string(),
            reason: format!("manifest is not valid JSON: {e}"),
        })?;
        if m.schema_version != 2 {
            return Err(ImageError::UnsupportedMediaType {
                reference: reference.to_string(),
                media_type: format!("manifest schema version {}", m.schema_version),
            });
        }
        match m.media_type.as_deref() {
            None | Some(OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST) => {}
            Some(other) => {
                return Err(ImageError::UnsupportedMediaType {
                    reference: reference.to_string(),
                    media_type: other.to_string(),
                })
            }
        }
        if let Some(entries) = m.manifests {
            return Ok(ManifestKind::Index(entries));
        }
        match (m.config, m.layers) {
            (Some(config), Some(layers)) => {
                for l in &layers {
                    LayerCompression::from_media_type(reference, &l.media_type)?;
                }
                Ok(ManifestKind::Image { config, layers })
            }
            _ => Err(ImageError::InvalidImage {
                reference: reference.to_string(),
                reason: "manifest has neither layers nor manifests".into(),
            }),
        }
    }
}

/// Picks the linux/amd64 entry of an index (the only one when the index has exactly one image
/// without a platform, as OCI layouts written by tools often do).
pub fn pick_platform(reference: &str, entries: &[Descriptor]) -> ImageResult<Descriptor> {
    let images: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| d.media_type.is_empty() || ACCEPTED_MANIFESTS.contains(&d.media_type.as_str()))
        .collect();
    if let Some(d) = images.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    }) {
        return Ok((*d).clone());
    }
    if images.len() == 1 && images[0].platform.is_none() {
        return Ok(images[0].clone());
    }
    let available = entries
        .iter()
        .map(|d| match &d.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "unknown".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(ImageError::NoMatchingPlatform {
        reference: reference.to_string(),
        wanted: "linux/amd64".into(),
        available,
    })
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl LayerCompression {
    /// From a layer media type (OCI and Docker; non-distributable variants included).
    pub fn from_media_type(reference: &str, mt: &str) -> ImageResult<Self> {
        let base = mt
            .strip_prefix("application/vnd.oci.image.layer.nondistributable.v1.")
            .map(|s| format!("application/vnd.oci.image.layer.v1.{s}"))
            .unwrap_or_else(|| mt.to_string());
        Ok(match base.as_str() {
            "application/vnd.oci.image.layer.v1.tar" => LayerCompression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => LayerCompression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd" => LayerCompression::Zstd,
            // Written by `docker save` into OCI layouts of Docker 25+.
            "application/vnd.docker.image.rootfs.diff.tar" | "" => LayerCompression::None,
            other => {
                return Err(ImageError::UnsupportedMediaType {
                    reference: reference.to_string(),
                    media_type: other.to_string(),
                })
            }
        })
    }

    /// From the first bytes of a blob (used where the media type says nothing useful).
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            LayerCompression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            LayerCompression::Zstd
        } else {
            LayerCompression::None
        }
    }
}

/// The image config file (the parts this engine reads).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigFile {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// The container defaults.
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    /// The layer diff ids.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// `config.config` of an image config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Default working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Entrypoint argv.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `user[:group]`.
    #[serde(default)]
    pub user: Option<String>,
}

/// `config.rootfs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// sha256 of each uncompressed layer, base first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ConfigFile {
    /// Parses a config blob.
    pub fn parse(reference: &str, bytes: &[u8]) -> ImageResult<Self> {
        serde_json::from_slice(bytes).map_err(|e| ImageError::InvalidImage {
            reference: reference.to_string(),
            reason: format!("image config is not valid JSON: {e}"),
        })
    }
}

/// An incremental SHA-256 (aws-lc, the crypto library rustls already brings: assembly with
/// SHA extensions, fast even in debug builds).
pub struct Sha256(aws_lc_rs::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
}

impl Sha256 {
    /// A new hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// `sha256:<hex>` of everything added.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex(self.0.finish().as_ref()))
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finish()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Checks that a digest is `sha256:<64 hex>` and returns the hex part.
pub fn digest_hex<'a>(reference: &str, digest: &'a str) -> ImageResult<&'a str> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h)
        }
        _ => Err(ImageError::InvalidImage {
            reference: reference.to_string(),
            reason: format!(
                "unsupported or malformed digest {digest:?} (only sha256 is supported)"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{arch}"),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: None,
            }),
            annotations: None,
        }
    }

    #[test]
    fn picks_linux_amd64() {
        let e = vec![
            entry("linux", "arm64"),
            entry("linux", "amd64"),
            entry("windows", "amd64"),
        ];
        assert_eq!(pick_platform("r", &e).unwrap().digest, "sha256:amd64");
        let err = pick_platform("r", &e[..1]).unwrap_err();
        assert!(err.to_string().contains("linux/arm64"), "{err}");
    }

    #[test]
    fn layer_media_types() {
        use LayerCompression as C;
        let f = |m| LayerCompression::from_media_type("r", m).unwrap();
        assert_eq!(f("application/vnd.oci.image.layer.v1.tar+gzip"), C::Gzip);
        assert_eq!(f("application/vnd.oci.image.layer.v1.tar+zstd"), C::Zstd);
        assert_eq!(
            f("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            C::Gzip
        );
        assert_eq!(f("application/vnd.oci.image.layer.v1.tar"), C::None);
        assert_eq!(
            f("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            C::Gzip
        );
        assert!(LayerCompression::from_media_type("r", "application/x-wasm").is_err());
        assert_eq!(LayerCompression::sniff(&[0x1f, 0x8b, 8]), C::Gzip);
        assert_eq!(LayerCompression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), C::Zstd);
        assert_eq!(LayerCompression::sniff(b"etc/"), C::None);
    }

    #[test]
    fn manifests_are_classified() {
        let img = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:a","size":1},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:b","size":2}]}"#;
        assert!(matches!(
            Manifest::parse("r", img).unwrap(),
            ManifestKind::Image { .. }
        ));
        let v1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(matches!(
            Manifest::parse("r", v1),
            Err(ImageError::UnsupportedMediaType { .. })
        ));
        assert!(Manifest::parse("r", b"not json").is_err());
    }

    #[test]
    fn digests() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(digest_hex("r", &sha256_digest(b"x")).is_ok());
        assert!(digest_hex("r", "sha512:00").is_err());
        assert!(digest_hex("r", "sha256:../../etc").is_err());
    }
}
