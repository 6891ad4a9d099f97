//! Talking to a registry, on `oci-client` (reqwest + rustls): authentication (anonymous bearer
//! tokens, or basic credentials from the Docker config), plain HTTP for loopback and
//! `SMOL_INSECURE_REGISTRIES`, manifests of every accepted media type, blobs streamed to the
//! cache with retries (resuming with a range request), a bounded connect timeout, and typed
//! errors.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use super::auth::{credentials_for, docker_config_path};
use super::error::{ImageError, ImageResult};
use super::oci::{Descriptor, ACCEPTED_MANIFESTS};
use super::reference::is_insecure_registry;
use super::store::BlobWriter;
use super::PullOptions;

/// One registry, for one repository.
pub(crate) struct RegistryClient {
    client: oci_client::Client,
    auth: RegistryAuth,
    registry: String,
    opts: PullOptions,
}

/// How an error should be handled.
enum Class {
    /// The network: retry, then `RegistryUnreachable`.
    Unreachable(String),
    /// A transient server or transfer problem: retry, then `Registry`.
    Transient(String),
    NotFound(String),
    Unauthorized(String),
    Digest {
        expected: String,
        actual: String,
    },
    Other(String),
}

fn classify_io(e: &std::io::Error) -> Class {
    if let Some(inner) = e.get_ref() {
        if let Some(oci_client::errors::DigestError::VerificationError { expected, actual }) =
            inner.downcast_ref::<oci_client::errors::DigestError>()
        {
            return Class::Digest {
                expected: expected.clone(),
                actual: actual.clone(),
            };
        }
        if let Some(re) = inner.downcast_ref::<reqwest::Error>() {
            return classify_reqwest(re);
        }
    }
    Class::Transient(e.to_string())
}

fn classify_reqwest(re: &reqwest::Error) -> Class {
    if re.is_connect() || re.is_timeout() {
        Class::Unreachable(error_chain(re))
    } else {
        Class::Transient(error_chain(re))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

fn classify(e: &OciDistributionError) -> Class {
    use OciDistributionError as O;
    match e {
        O::RequestError(re) => classify_reqwest(re),
        O::IoError(io) => classify_io(io),
        O::DigestError(oci_client::errors::DigestError::VerificationError { expected, actual }) => {
            Class::Digest {
                expected: expected.clone(),
                actual: actual.clone(),
            }
        }
        O::ServerError { code, message, .. } => match code {
            404 => Class::NotFound(message.clone()),
            401 | 403 => Class::Unauthorized(message.clone()),
            408 | 429 | 500..=599 => Class::Transient(format!("HTTP {code}: {message}")),
            _ => Class::Other(format!("HTTP {code}: {message}")),
        },
        O::RegistryError { envelope, .. } => {
            let text = envelope
                .errors
                .iter()
                .map(|x| format!("{:?}: {}", x.code, x.message))
                .collect::<Vec<_>>()
                .join("; ");
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestBlobUnknown
                )
            }) {
                Class::NotFound(text)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Class::Unauthorized(text)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                Class::Transient(text)
            } else {
                Class::Other(text)
            }
        }
        O::UnauthorizedError { url } => Class::Unauthorized(format!("401 from {url}")),
        O::AuthenticationFailure(m) => Class::Unauthorized(m.clone()),
        O::ImageManifestNotFoundError(m) => Class::NotFound(m.clone()),
        other => Class::Other(other.to_string()),
    }
}

impl RegistryClient {
    /// A client for the registry of `reference`.
    pub fn new(reference: &Reference, opts: &PullOptions) -> Self {
        let insecure = is_insecure_registry(
            reference.registry(),
            std::env::var("SMOL_INSECURE_REGISTRIES").ok().as_deref(),
        );
        let config = ClientConfig {
            protocol: if insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(opts.connect_timeout),
            read_timeout: Some(opts.read_timeout),
            platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
            max_concurrent_download: opts.max_concurrent_downloads.max(1),
            ..Default::default()
        };
        let auth_file = opts.auth_file.clone().unwrap_or_else(docker_config_path);
        let auth = credentials_for(&auth_file, reference.registry())
            .map(|c| RegistryAuth::Basic(c.username, c.password))
            .unwrap_or(RegistryAuth::Anonymous);
        RegistryClient {
            client: oci_client::Client::new(config),
            auth,
            registry: reference.registry().to_string(),
            opts: opts.clone(),
        }
    }

    fn to_error(&self, reference: &Reference, class: Class, attempts: u32) -> ImageError {
        match class {
            Class::Unreachable(reason) => ImageError::RegistryUnreachable {
                registry: self.registry.clone(),
                attempts,
                reason,
            },
            Class::NotFound(detail) => ImageError::NotFound {
                reference: reference.whole(),
                detail,
            },
            Class::Unauthorized(detail) => ImageError::Unauthorized {
                registry: self.registry.clone(),
                reference: reference.whole(),
                detail,
            },
            Class::Digest { expected, actual } => ImageError::DigestMismatch {
                what: format!("blob of {}", reference.whole()),
                expected,
                actual,
            },
            Class::Transient(message) | Class::Other(message) => ImageError::Registry {
                registry: self.registry.clone(),
                message,
            },
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.retry_backoff.as_millis() as u64;
        Duration::from_millis((base << attempt.min(6)).min(8_000))
    }

    /// Runs `f` until it succeeds, fails for good, or the attempts are spent.
    async fn retry<T, F, Fut>(&self, reference: &Reference, mut f: F) -> ImageResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let attempts = self.opts.attempts.max(1);
        let mut n = 0;
        loop {
            n += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let class = classify(&e);
                    let transient = matches!(class, Class::Unreachable(_) | Class::Transient(_));
                    if !transient || n >= attempts {
                        return Err(self.to_error(reference, class, n));
                    }
                    tokio::time::sleep(self.backoff(n - 1)).await;
                }
            }
        }
    }

    /// Checks the registry answers and gets a token for pulling `reference`.
    pub async fn login(&self, reference: &Reference) -> ImageResult<()> {
        self.retry(reference, || {
            self.client
                .auth(reference, &self.auth, RegistryOperation::Pull)
        })
        .await
        .map(|_| ())
    }

    /// The raw manifest (image manifest or index) `reference` names, and its digest (checked
    /// against the digest in the reference and the registry's `Docker-Content-Digest`).
    pub async fn manifest(&self, reference: &Reference) -> ImageResult<(Vec<u8>, String)> {
        let (body, digest) = self
            .retry(reference, || {
                self.client
                    .pull_manifest_raw(reference, &self.auth, ACCEPTED_MANIFESTS)
            })
            .await?;
        let actual = super::oci::sha256_digest(&body);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {}", reference.whole()),
                expected: digest,
                actual,
            });
        }
        Ok((body.to_vec(), digest))
    }

    /// Streams a blob into `w` (restarting or resuming on transfer errors). The caller
    /// commits `w`, which verifies the digest. `on_bytes` gets the running count.
    pub async fn blob(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        w: &mut BlobWriter,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> ImageResult<()> {
        let d = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size as i64,
            ..Default::default()
        };
        let attempts = self.opts.attempts.max(1);
        let mut n = 0;
        loop {
            n += 1;
            let res = self
                .blob_attempt(reference, &d, desc.size, w, on_bytes)
                .await;
            match res {
                Ok(()) => return Ok(()),
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Oci(e)) => {
                    let class = classify(&e);
                    let transient = matches!(class, Class::Unreachable(_) | Class::Transient(_));
                    if !transient || n >= attempts {
                        return Err(self.to_error(reference, class, n));
                    }
                    tokio::time::sleep(self.backoff(n - 1)).await;
                }
            }
        }
    }

    async fn blob_attempt(
        &self,
        reference: &Reference,
        d: &OciDescriptor,
        size: u64,
        w: &mut BlobWriter,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), AttemptError> {
        self.client
            .store_auth_if_needed(reference.resolve_registry(), &self.auth)
            .await;
        // Always a range request (from 0, or from where a failed attempt stopped): a 206
        // stream is not hashed by oci-client, so each byte is hashed once, by the BlobWriter,
        // which checks the digest on commit. A registry that ignores ranges answers 200 with
        // the whole blob: start over.
        let mut stream = match self
            .client
            .pull_blob_stream_partial(reference, d, w.written(), None)
            .await?
        {
            BlobResponse::Partial(s) => s,
            BlobResponse::Full(s) => {
                if w.written() > 0 {
                    w.reset().map_err(AttemptError::Fatal)?;
                }
                s
            }
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(OciDistributionError::IoError)?;
            if w.written() + chunk.len() as u64 > size {
                return Err(AttemptError::Fatal(ImageError::DigestMismatch {
                    what: format!("blob of {}", reference.whole()),
                    expected: d.digest.clone(),
                    actual: format!("(more than the {size} bytes the manifest declares)"),
                }));
            }
            w.write(&chunk).map_err(AttemptError::Fatal)?;
            on_bytes(w.written());
        }
        Ok(())
    }
}

enum AttemptError {
    Oci(OciDistributionError),
    Fatal(ImageError),
}

impl From<OciDistributionError> for AttemptError {
    fn from(e: OciDistributionError) -> Self {
        AttemptError::Oci(e)
    }
}
