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

/// The Debian package in a [`ImageError::Tool`] message of a missing program
/// (`not installed (Debian: apt-get install erofs-utils)`).
fn package_in(message: &str) -> Option<&str> {
    let rest = message.split("apt-get install ").nth(1)?;
    let pkg = rest.split(|c: char| c == ')' || c.is_whitespace()).next()?;
    (!pkg.is_empty()).then_some(pkg)
}

/// Image errors keep their kind: a missing image is `NOT_FOUND`, refused credentials
/// `UNAUTHORIZED`, an unreachable registry `CONNECTION` (or `TIMEOUT`), a registry's own
/// failure or bad content `Error::Registry`, a bad reference or image `INVALID_CONFIG`, an image
/// for another platform or format `NOT_SUPPORTED`, a full cache `STORAGE_ERROR`, a missing
/// mkfs `RUNTIME_NOT_INSTALLED`.
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
            | ImageError::InvalidImage { .. } => Error::InvalidConfig { message },
            ImageError::UnsupportedMediaType { .. } | ImageError::NoMatchingPlatform { .. } => {
                Error::NotSupported { message }
            }
            ImageError::Unauthorized { .. } => Error::Unauthorized { message },
            ImageError::NoSpace { path } => Error::Storage {
                path,
                message: "no space left on the host's disk for the image cache (nothing \
                          half-written was kept)"
                    .into(),
            },
            ImageError::RegistryUnreachable { reason, .. } => {
                if reason.contains("timed out") || reason.contains("timeout") {
                    Error::Timeout { what: message }
                } else {
                    Error::Connection { message }
                }
            }
            ImageError::Io { context, source } => Error::Io { context, source },
            ImageError::Registry { registry, .. } => Error::Registry {
                registry: Some(registry),
                message,
            },
            ImageError::DigestMismatch { .. } => Error::Registry {
                registry: None,
                message,
            },
            ImageError::Tool { tool, message: m } => match package_in(&m) {
                Some(package) if m.starts_with("not installed") => Error::ProgramMissing {
                    package: package.to_string(),
                    program: tool,
                    needed_for: "to build an image's block file".into(),
                    problem: "it is not installed".into(),
                },
                _ => Error::Io {
                    context: format!("{tool} failed"),
                    source: std::io::Error::other(m),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

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
    fn registry_failures_keep_their_kind() {
        let e: Error = ImageError::Unauthorized {
            registry: "r.example".into(),
            reference: "r.example/x:1".into(),
            detail: "401".into(),
        }
        .into();
        assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
        assert_eq!(e.code(), ErrorCode::Unauthorized);
        assert!(e.to_string().contains("r.example/x:1"), "{e}");
        let e: Error = ImageError::RegistryUnreachable {
            registry: "127.0.0.1:9".into(),
            attempts: 3,
            reason: "connection refused".into(),
        }
        .into();
        assert_eq!(e.code(), ErrorCode::Connection);
        assert!(e.retryable());
        assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
        let e: Error = ImageError::RegistryUnreachable {
            registry: "10.255.255.1".into(),
            attempts: 3,
            reason: "operation timed out".into(),
        }
        .into();
        assert_eq!(e.code(), ErrorCode::Timeout);
        let e: Error = ImageError::Registry {
            registry: "r.example".into(),
            message: "500 Internal Server Error".into(),
        }
        .into();
        assert!(
            matches!(&e, Error::Registry { registry: Some(r), .. } if r == "r.example"),
            "{e:?}"
        );
        assert_ne!(e.code(), ErrorCode::Unauthorized);
        assert!(!matches!(e, Error::Protocol { .. }));
        let e: Error = ImageError::DigestMismatch {
            what: "layer".into(),
            expected: "sha256:aa".into(),
            actual: "sha256:bb".into(),
        }
        .into();
        assert!(matches!(e, Error::Registry { registry: None, .. }), "{e:?}");
        let e: Error = ImageError::NoMatchingPlatform {
            reference: "x".into(),
            wanted: "linux/amd64".into(),
            available: "linux/arm64".into(),
        }
        .into();
        assert_eq!(e.code(), ErrorCode::NotSupported);
        let e: Error = ImageError::Tool {
            tool: "mkfs.erofs".into(),
            message: "not installed (Debian: apt-get install erofs-utils)".into(),
        }
        .into();
        assert!(
            matches!(&e, Error::ProgramMissing { program, package, .. }
                if program == "mkfs.erofs" && package == "erofs-utils"),
            "{e:?}"
        );
        assert_eq!(e.code(), ErrorCode::RuntimeNotInstalled);
        let e: Error = ImageError::Tool {
            tool: "mkfs.erofs".into(),
            message: "bad superblock (exit status: 1)".into(),
        }
        .into();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("bad superblock"), "{e}");
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
