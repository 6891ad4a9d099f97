//! The typed errors of the image module and their mapping into the crate's [`Error`].

use std::path::PathBuf;

use crate::error::Error;

/// Everything that can go wrong while pulling, importing, unpacking or storing an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The reference cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// What the caller passed.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The registry (or local source) has no such image or tag.
    #[error("image {reference} not found: {detail}")]
    NotFound {
        /// The normalised reference.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The image is not in the local cache (pull it first).
    #[error("image {reference} is not in the local cache")]
    NotPulled {
        /// The normalised reference.
        reference: String,
    },
    /// The registry refused our credentials (or needs some).
    #[error("registry {registry} denied access to {reference}: {detail}")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The normalised reference.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry cannot be reached (connection refused, DNS, timeout), after retries.
    #[error("registry {registry} is unreachable after {attempts} attempt(s): {reason}")]
    RegistryUnreachable {
        /// The registry host.
        registry: String,
        /// How many times we tried.
        attempts: u32,
        /// The last transport error.
        reason: String,
    },
    /// The registry answered with an error we cannot act on.
    #[error("registry {registry}: {message}")]
    Registry {
        /// The registry host.
        registry: String,
        /// The error.
        message: String,
    },
    /// Content did not match the digest that names it; it was refused and not stored.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob (layer, config, manifest, uncompressed layer).
        what: String,
        /// The digest the manifest (or config) names.
        expected: String,
        /// The digest of what was received.
        actual: String,
    },
    /// A layer entry would be written outside the root file system.
    #[error("layer {layer} has an entry that escapes the root: {path:?} ({reason})")]
    UnsafePath {
        /// The layer digest (or file name).
        layer: String,
        /// The entry path.
        path: String,
        /// Why it escapes.
        reason: String,
    },
    /// The manifest, config or a layer is malformed.
    #[error("invalid image {reference}: {reason}")]
    InvalidImage {
        /// The reference or source.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A media type this engine does not handle.
    #[error("unsupported media type {media_type} in {reference}")]
    UnsupportedMediaType {
        /// The reference.
        reference: String,
        /// The media type.
        media_type: String,
    },
    /// A manifest list / index has no linux/amd64 image.
    #[error("image {reference} has no {wanted} variant (it has: {available})")]
    NoMatchingPlatform {
        /// The reference.
        reference: String,
        /// The platform we need, e.g. `linux/amd64`.
        wanted: String,
        /// The platforms it has.
        available: String,
    },
    /// The host file system holding the image cache is full.
    #[error("no space left on the host while writing {}: the image cache is unchanged", path.display())]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// An external tool (mkfs.erofs, mkfs.ext4) is missing or failed.
    #[error("{tool} failed: {message}")]
    Tool {
        /// The program.
        tool: String,
        /// Its stderr or the spawn error.
        message: String,
    },
    /// Any other host I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of the image module.
pub type ImageResult<T> = std::result::Result<T, ImageError>;

/// Whether an I/O error means the file system is full (or over quota).
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl ImageError {
    /// An I/O error while working on `path`; ENOSPC/EDQUOT become [`ImageError::NoSpace`].
    pub(crate) fn io_at(
        context: impl Into<String>,
        path: &std::path::Path,
        e: std::io::Error,
    ) -> Self {
        if is_no_space(&e) {
            return ImageError::NoSpace {
                path: path.to_path_buf(),
            };
        }
        ImageError::Io {
            context: format!("{}: {}", context.into(), path.display()),
            source: e,
        }
    }
}

impl From<ImageError> for Error {
    fn from(e: ImageError) -> Self {
        let message = e.to_string();
        match e {
            ImageError::NotFound { reference, detail } => Error::NotFound {
                what: format!("image {reference} ({detail})"),
            },
            ImageError::NotPulled { .. } => Error::NotFound { what: message },
            ImageError::InvalidReference { .. }
            | ImageError::UnsafePath { .. }
            | ImageError::InvalidImage { .. }
            | ImageError::UnsupportedMediaType { .. }
            | ImageError::NoMatchingPlatform { .. } => Error::InvalidConfig { message },
            ImageError::Unauthorized { .. } => Error::PermissionDenied { detail: message },
            ImageError::NoSpace { path } => Error::Storage {
                path,
                message: "no space left on the host's disk for the image cache (nothing \
                          half-written was kept)"
                    .into(),
            },
            ImageError::RegistryUnreachable {
                registry,
                attempts,
                reason,
            } => {
                let kind = if reason.contains("timed out") || reason.contains("timeout") {
                    std::io::ErrorKind::TimedOut
                } else {
                    std::io::ErrorKind::NotConnected
                };
                Error::Io {
                    context: format!(
                        "image registry {registry} is unreachable after {attempts} attempt(s)"
                    ),
                    source: std::io::Error::new(kind, reason),
                }
            }
            ImageError::Io { context, source } => Error::Io { context, source },
            ImageError::Registry { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::Tool { .. } => Error::Protocol { message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_into_crate_errors_with_stable_codes() {
        let e: Error = ImageError::NotFound {
            reference: "127.0.0.1:5000/x:nope".into(),
            detail: "manifest unknown".into(),
        }
        .into();
        assert_eq!(e.code(), "NOT_FOUND");
        assert!(e.to_string().contains("127.0.0.1:5000/x:nope"));
        let e: Error = ImageError::NoSpace {
            path: "/cache/blob".into(),
        }
        .into();
        assert_eq!(e.code(), "STORAGE_ERROR");
        assert!(e.hint().is_some());
        let e: Error = ImageError::UnsafePath {
            layer: "sha256:ab".into(),
            path: "../etc/passwd".into(),
            reason: "climbs above the root".into(),
        }
        .into();
        assert_eq!(e.code(), "INVALID_CONFIG");
    }

    #[test]
    fn enospc_is_no_space() {
        let e = ImageError::io_at(
            "write",
            std::path::Path::new("/x"),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(e, ImageError::NoSpace { .. }));
        let e = ImageError::io_at(
            "write",
            std::path::Path::new("/x"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(e, ImageError::Io { .. }));
    }
}
