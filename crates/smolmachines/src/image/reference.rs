//! What an `image` string names: a registry reference (normalised the way Docker does) or a
//! local source (OCI layout directory, `docker save` archive, plain root file system directory).

use std::path::{Path, PathBuf};

use oci_client::Reference;

use super::error::{ImageError, ImageResult};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference, e.g. `docker.io/library/alpine:latest`.
    Registry(Reference),
    /// An OCI image layout directory (`oci:PATH[:TAG]`, or a directory with an `oci-layout` file).
    OciLayout {
        /// Absolute path of the layout.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick; the only image when `None`.
        tag: Option<String>,
    },
    /// A `docker save` tar archive (`docker-archive:PATH[:TAG]`, or a tar file path).
    DockerArchive {
        /// Absolute path of the archive.
        path: PathBuf,
        /// The `RepoTags` entry to pick; the only image when `None`.
        tag: Option<String>,
    },
    /// A plain root file system directory (`dir:PATH`, or any other directory path).
    Dir {
        /// Absolute path of the directory.
        path: PathBuf,
    },
}

impl ImageSource {
    /// Parses an image string.
    ///
    /// * `oci:PATH[:TAG]`, `docker-archive:PATH[:TAG]`, `dir:PATH` name local sources explicitly;
    /// * a string starting with `/`, `./`, `../` or `~/` is a local path, classified by what is
    ///   there (a directory with `oci-layout`, another directory, or a tar file);
    /// * anything else is a registry reference, normalised: `alpine` is
    ///   `docker.io/library/alpine:latest`.
    pub fn parse(s: &str) -> ImageResult<Self> {
        let invalid = |reason: &str| ImageError::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.trim().is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, tag) = split_tag(rest);
            return Ok(ImageSource::OciLayout {
                path: absolute(path)?,
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, tag) = split_archive_tag(rest);
            return Ok(ImageSource::DockerArchive {
                path: absolute(path)?,
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("dir:") {
            return Ok(ImageSource::Dir {
                path: absolute(rest)?,
            });
        }
        if is_path_like(s) {
            let path = absolute(s)?;
            let meta = std::fs::metadata(&path).map_err(|e| ImageError::NotFound {
                reference: path.display().to_string(),
                detail: e.to_string(),
            })?;
            return Ok(if meta.is_dir() {
                if path.join("oci-layout").is_file() {
                    ImageSource::OciLayout { path, tag: None }
                } else {
                    ImageSource::Dir { path }
                }
            } else {
                ImageSource::DockerArchive { path, tag: None }
            });
        }
        let r: Reference = s
            .parse()
            .map_err(|e: oci_client::ParseError| invalid(&e.to_string()))?;
        // The cache records an image under its normalised form, which must read back as the
        // same reference: `Q/app` parses as docker.io/Q/app, which does not (repository names
        // are lower case).
        let whole = r.whole();
        if whole.parse::<Reference>().ok().map(|again| again.whole()) != Some(whole.clone()) {
            return Err(invalid(&format!(
                "it normalises to {whole}, which is not a valid reference (repository names are \
                 lower case)"
            )));
        }
        Ok(ImageSource::Registry(r))
    }

    /// The canonical string this source is recorded under in the cache.
    pub fn canonical(&self) -> String {
        match self {
            ImageSource::Registry(r) => r.whole(),
            ImageSource::OciLayout { path, tag } => match tag {
                Some(t) => format!("oci:{}:{t}", path.display()),
                None => format!("oci:{}", path.display()),
            },
            ImageSource::DockerArchive { path, tag } => match tag {
                Some(t) => format!("docker-archive:{}:{t}", path.display()),
                None => format!("docker-archive:{}", path.display()),
            },
            ImageSource::Dir { path } => format!("dir:{}", path.display()),
        }
    }
}

fn is_path_like(s: &str) -> bool {
    s.starts_with('/') || s.starts_with("./") || s.starts_with("../") || s.starts_with("~/")
}

/// `PATH:TAG` where the tag is after the last `:` and contains no `/`.
fn split_tag(s: &str) -> (&str, Option<String>) {
    match s.rsplit_once(':') {
        Some((p, t)) if !t.is_empty() && !t.contains('/') && !p.is_empty() => {
            (p, Some(t.to_string()))
        }
        _ => (s, None),
    }
}

/// `PATH:REPO:TAG` for docker archives (the tag names a `RepoTags` entry, which has a colon).
fn split_archive_tag(s: &str) -> (&str, Option<String>) {
    // A path that exists as given wins (file names may contain colons).
    if Path::new(s).exists() {
        return (s, None);
    }
    let mut idx = None;
    for (i, _) in s.match_indices(':') {
        if Path::new(&s[..i]).is_file() {
            idx = Some(i);
            break;
        }
    }
    match idx {
        Some(i) => (&s[..i], Some(s[i + 1..].to_string())),
        None => (s, None),
    }
}

fn absolute(p: &str) -> ImageResult<PathBuf> {
    let expanded = if let Some(rest) = p.strip_prefix("~/") {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(rest)
    } else {
        PathBuf::from(p)
    };
    std::path::absolute(&expanded).map_err(|e| ImageError::InvalidReference {
        reference: p.to_string(),
        reason: e.to_string(),
    })
}

/// Whether the registry is reached over plain HTTP: loopback hosts, and those listed in
/// `SMOL_INSECURE_REGISTRIES` (comma or space separated `host` or `host:port`).
pub(crate) fn is_insecure_registry(registry: &str, env: Option<&str>) -> bool {
    let host = host_of(registry);
    if host == "localhost" || host == "::1" || host.starts_with("127.") {
        return true;
    }
    env.unwrap_or("")
        .split([',', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| e == registry || e == host)
}

/// The host part of `host[:port]` (brackets of an IPv6 literal removed).
pub(crate) fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    }
}

/// A file name for a canonical reference (reversible, no `/`).
pub(crate) fn escape_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> String {
        match ImageSource::parse(s).unwrap() {
            ImageSource::Registry(r) => r.whole(),
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn docker_style_normalisation() {
        assert_eq!(reg("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(reg("python:3.12"), "docker.io/library/python:3.12");
        assert_eq!(reg("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            reg("127.0.0.1:5000/library/python:3.12"),
            "127.0.0.1:5000/library/python:3.12"
        );
        assert_eq!(reg("localhost/x"), "localhost/x:latest");
        let d = "sha256:".to_string() + &"a".repeat(64);
        assert_eq!(reg(&format!("ghcr.io/o/r@{d}")), format!("ghcr.io/o/r@{d}"));
    }

    /// Found by the image_reference fuzz target (docs/FUZZING.md): `Q/0.dd` was taken as
    /// docker.io/Q/0.dd:latest, a canonical form that does not parse again.
    #[test]
    fn a_reference_whose_normal_form_does_not_parse_is_refused() {
        let crash = std::str::from_utf8(&[0x51, 0x2f, 0x30, 0x2e, 0x64, 0x64]).unwrap();
        match ImageSource::parse(crash) {
            Err(ImageError::InvalidReference { reason, .. }) => {
                assert!(reason.contains("docker.io/Q/0.dd:latest"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(reg("q/0.dd"), "docker.io/q/0.dd:latest");
    }

    #[test]
    fn bad_references_are_typed() {
        for s in ["", "UPPERCASE", "a b", "x@sha256:zz", "alpine:bad!tag"] {
            assert!(
                matches!(
                    ImageSource::parse(s),
                    Err(ImageError::InvalidReference { .. })
                ),
                "{s:?}"
            );
        }
    }

    #[test]
    fn local_sources() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().display().to_string();
        assert_eq!(
            ImageSource::parse(&p).unwrap(),
            ImageSource::Dir {
                path: d.path().into()
            }
        );
        std::fs::write(d.path().join("oci-layout"), "{}").unwrap();
        assert_eq!(
            ImageSource::parse(&p).unwrap(),
            ImageSource::OciLayout {
                path: d.path().into(),
                tag: None
            }
        );
        assert_eq!(
            ImageSource::parse(&format!("oci:{p}:v1")).unwrap(),
            ImageSource::OciLayout {
                path: d.path().into(),
                tag: Some("v1".into())
            }
        );
        let tar = d.path().join("img.tar");
        std::fs::write(&tar, "").unwrap();
        let t = tar.display().to_string();
        assert_eq!(
            ImageSource::parse(&format!("docker-archive:{t}:busybox:1")).unwrap(),
            ImageSource::DockerArchive {
                path: tar.clone(),
                tag: Some("busybox:1".into())
            }
        );
        assert_eq!(
            ImageSource::parse(&t).unwrap().canonical(),
            format!("docker-archive:{t}")
        );
        assert!(matches!(
            ImageSource::parse("/does/not/exist"),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[test]
    fn insecure_registries() {
        assert!(is_insecure_registry("127.0.0.1:5000", None));
        assert!(is_insecure_registry("localhost:5000", None));
        assert!(is_insecure_registry("[::1]:5000", None));
        assert!(!is_insecure_registry("index.docker.io", None));
        assert!(is_insecure_registry(
            "reg.lan:5000",
            Some("other, reg.lan:5000")
        ));
        assert!(is_insecure_registry("reg.lan:5000", Some("reg.lan")));
        assert!(!is_insecure_registry("reg.lan:5000", Some("reg.lan:6000")));
    }

    #[test]
    fn escaped_names_are_flat() {
        let e = escape_name("127.0.0.1:5000/library/python:3.12");
        assert!(!e.contains('/') && !e.contains(':'));
        assert_ne!(escape_name("a/b"), escape_name("a_b"));
    }
}
