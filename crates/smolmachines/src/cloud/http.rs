//! The HTTP side of the cloud client: one request description ([`Req`]), sent as the
//! published Python client 1.32.2 sends it (CLOUD-CLIENTS.md §2: `authorization: Bearer`,
//! `content-type` only with a body, `Content-Length: 0` on a body-less POST), with its
//! timeouts and retries (SPEC §9.9), and every error response translated once (SPEC §8.3)
//! through [`Error::from_problem_body`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use reqwest::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{parse_retry_after, Error, ErrorCode, Problem, Result};

/// Deadline of an ordinary call (and of the response headers of a stream).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of `start` (it may include an image pull).
pub(crate) const LONG_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The cloud's limit on one file transfer (SPEC §10.5.5).
pub(crate) const FILE_LIMIT: usize = 100 * 1024 * 1024;
/// Statuses worth another try (SPEC §9.9).
const RETRY_STATUSES: [u16; 5] = [408, 429, 502, 503, 504];
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How much of an error body is read (the clients embed it in a message).
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Retries when the caller sets none (the published client's default).
pub(crate) const DEFAULT_MAX_RETRIES: u32 = 3;

/// The body of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// None at all (`Content-Length: 0` on POST / PUT).
    Empty,
    /// JSON text (`content-type: application/json`).
    Json(Vec<u8>),
    /// Raw bytes (`content-type: application/octet-stream`).
    Raw(Vec<u8>),
}

/// One request to the `/v1` API, before it is sent.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    /// The method.
    pub method: Method,
    /// The path from the base URL, with its query (`/v1/machines/x/exec?output=b64`).
    pub path: String,
    /// The body.
    pub body: Body,
    /// The deadline of the whole exchange; `None`: only the headers have one (a stream).
    pub timeout: Option<Duration>,
    /// Retried on 408 / 502 / 503 / 504 too (429 always is).
    pub idempotent: bool,
    /// `accept`, when the call asks for something (the stream's `text/event-stream`).
    pub accept: Option<&'static str>,
}

impl Req {
    fn new(method: Method, path: impl Into<String>) -> Req {
        let idempotent = matches!(
            method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE
        );
        Req {
            method,
            path: path.into(),
            body: Body::Empty,
            timeout: Some(DEFAULT_TIMEOUT),
            idempotent,
            accept: None,
        }
    }

    pub fn get(path: impl Into<String>) -> Req {
        Req::new(Method::GET, path)
    }

    pub fn post(path: impl Into<String>) -> Req {
        Req::new(Method::POST, path)
    }

    pub fn put(path: impl Into<String>) -> Req {
        Req::new(Method::PUT, path)
    }

    pub fn delete(path: impl Into<String>) -> Req {
        Req::new(Method::DELETE, path)
    }

    /// With a JSON body.
    pub fn json<T: Serialize>(mut self, value: &T) -> Req {
        self.body = Body::Json(serde_json::to_vec(value).expect("wire types always serialise"));
        self
    }

    /// With a raw body.
    pub fn raw(mut self, bytes: Vec<u8>) -> Req {
        self.body = Body::Raw(bytes);
        self
    }

    /// With this deadline.
    pub fn timeout(mut self, d: Duration) -> Req {
        self.timeout = Some(d);
        self
    }

    /// Only the response headers have a deadline (30 s); the body is read for as long as it
    /// lasts.
    pub fn streaming(mut self) -> Req {
        self.timeout = None;
        self
    }

    /// Marks a POST that may be repeated (start, stop).
    pub fn idempotent(mut self) -> Req {
        self.idempotent = true;
        self
    }

    /// With an `accept` header.
    pub fn accept(mut self, v: &'static str) -> Req {
        self.accept = Some(v);
        self
    }

    /// `cloud {METHOD} {path}`, the start of every message about this request.
    pub fn what(&self) -> String {
        format!("cloud {} {}", self.method, self.path)
    }
}

/// Percent-encodes one path segment as Python's `quote(seg, safe="")` does: everything but
/// `A-Z a-z 0-9 _ . - ~`.
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A path (or query value) with each `/`-separated segment encoded, `/` kept: an absolute
/// guest path gives the double slash of `files//workspace/a%20b.txt`.
pub(crate) fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// The API's base URL and key, and the connection pool they share.
pub(crate) struct Client {
    base: String,
    auth: HeaderValue,
    key: String,
    http: reqwest::Client,
    max_retries: AtomicU32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base)
            .field("api_key", &"<redacted>")
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

/// A 2xx response, its body not read yet.
pub(crate) struct Response {
    pub status: u16,
    pub inner: reqwest::Response,
}

impl Client {
    /// A client of `base` (no trailing `/`) with `key`.
    pub fn new(base: String, key: String) -> Result<Client> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| Error::invalid("the api_key holds characters a header cannot carry"))?;
        auth.set_sensitive(true);
        let mut builder = reqwest::Client::builder();
        if is_loopback(&base) {
            // a fleet on this host is never reached through a proxy
            builder = builder.no_proxy();
        }
        let http = builder
            .user_agent(concat!("smolmachines-rust/", env!("CARGO_PKG_VERSION")))
            // below the servers' 30 s+ keep-alive: never reuse a connection the server is
            // about to close (a POST on one would fail with no retry)
            .pool_idle_timeout(Duration::from_secs(25))
            .tcp_nodelay(true)
            .connect_timeout(DEFAULT_TIMEOUT)
            .build()
            .map_err(|e| Error::Connection {
                message: format!("cloud client cannot be built: {}", chain(&e)),
            })?;
        Ok(Client {
            base,
            auth,
            key,
            http,
            max_retries: AtomicU32::new(DEFAULT_MAX_RETRIES),
        })
    }

    pub fn set_max_retries(&self, n: u32) {
        self.max_retries.store(n, Ordering::Relaxed);
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The `authorization` value, for the endpoint headers the SPEC hands the caller.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.key)
    }

    /// Sends `req` (retrying as SPEC §9.9 says); a 2xx response, or the translated error.
    pub async fn send(&self, req: &Req) -> Result<Response> {
        let url = format!("{}{}", self.base, req.path);
        let mut attempt: u32 = 0;
        loop {
            let mut rb = self
                .http
                .request(req.method.clone(), &url)
                .header(AUTHORIZATION, self.auth.clone());
            rb = match &req.body {
                Body::Empty if matches!(req.method, Method::POST | Method::PUT) => {
                    // as the published client: `Content-Length: 0` (hyper sends none)
                    rb.header(CONTENT_LENGTH, "0").body(Vec::<u8>::new())
                }
                Body::Empty => rb,
                Body::Json(b) => rb.header(CONTENT_TYPE, "application/json").body(b.clone()),
                Body::Raw(b) => rb
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(b.clone()),
            };
            if let Some(a) = req.accept {
                rb = rb.header(ACCEPT, a);
            }
            let sent = match req.timeout {
                Some(t) => rb.timeout(t).send().await,
                None => match tokio::time::timeout(DEFAULT_TIMEOUT, rb.send()).await {
                    Ok(r) => r,
                    Err(_) => return Err(timed_out(req, DEFAULT_TIMEOUT)),
                },
            };
            let resp = sent.map_err(|e| transport_error(req, &e))?;
            let status = resp.status().as_u16();
            if (200..300).contains(&status) {
                return Ok(Response {
                    status,
                    inner: resp,
                });
            }
            let retry_after = header(&resp, RETRY_AFTER.as_str());
            let retryable = RETRY_STATUSES.contains(&status) && (status == 429 || req.idempotent);
            if retryable && attempt < self.max_retries.load(Ordering::Relaxed) {
                let wait = retry_after
                    .as_deref()
                    .and_then(parse_retry_after)
                    .unwrap_or_else(|| Duration::from_millis(500) * 2u32.saturating_pow(attempt))
                    .min(MAX_BACKOFF);
                tracing::debug!(
                    what = %req.what(),
                    status,
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    "cloud request retried"
                );
                drop(resp);
                tokio::time::sleep(wait).await;
                attempt += 1;
                continue;
            }
            let request_id = header(&resp, "x-request-id");
            let body = match read_capped(req, resp, ERROR_BODY_LIMIT).await {
                Ok((b, _)) => b,
                Err(e) => {
                    tracing::debug!(what = %req.what(), status, error = %e, "error body unread");
                    Vec::new()
                }
            };
            return Err(translate(
                &req.what(),
                status,
                &body,
                retry_after.as_deref(),
                request_id.as_deref(),
            ));
        }
    }

    /// Sends `req` and reads its JSON answer. A 2xx answer that is not `application/json`
    /// (or not valid JSON of `T`) is an error, never an empty success.
    pub async fn json<T: DeserializeOwned>(&self, req: &Req) -> Result<T> {
        let resp = self.send(req).await?;
        let status = resp.status;
        let ct = header(&resp.inner, CONTENT_TYPE.as_str()).unwrap_or_default();
        let (body, _) = read_capped(req, resp.inner, 64 * 1024 * 1024).await?;
        if !ct.contains("application/json") {
            return Err(Error::coded(
                ErrorCode::SmolvmError,
                format!(
                    "{} → {status}: the response is not JSON (content-type {ct:?})",
                    req.what()
                ),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| {
            Error::coded(
                ErrorCode::SmolvmError,
                format!(
                    "{} → {status}: the response is not what the API sends: {e}",
                    req.what()
                ),
            )
        })
    }

    /// Sends `req`; its body is dropped.
    pub async fn empty(&self, req: &Req) -> Result<()> {
        self.send(req).await.map(drop)
    }

    /// Sends `req` and reads its raw body, at most `limit` bytes (more is an error).
    pub async fn bytes(&self, req: &Req, limit: usize) -> Result<Vec<u8>> {
        let resp = self.send(req).await?;
        let (body, over) = read_capped(req, resp.inner, limit).await?;
        if over {
            return Err(Error::coded(
                ErrorCode::SmolvmError,
                format!("{}: the response is over {limit} bytes", req.what()),
            ));
        }
        Ok(body)
    }
}

/// Whether `base` names this host (`localhost`, `127.0.0.0/8`, `::1`).
pub(crate) fn is_loopback(base: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(base) else {
        return false;
    };
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The body, at most `limit` bytes; whether there was more.
async fn read_capped(
    req: &Req,
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    loop {
        let chunk = match req.timeout {
            Some(_) => resp.chunk().await,
            None => match tokio::time::timeout(DEFAULT_TIMEOUT, resp.chunk()).await {
                Ok(c) => c,
                Err(_) => return Err(timed_out(req, DEFAULT_TIMEOUT)),
            },
        };
        match chunk.map_err(|e| transport_error(req, &e))? {
            None => return Ok((out, false)),
            Some(c) => {
                if out.len() + c.len() > limit {
                    let room = limit - out.len();
                    out.extend_from_slice(&c[..room]);
                    return Ok((out, true));
                }
                out.extend_from_slice(&c);
            }
        }
    }
}

/// An error and its sources, joined by `": "` (reqwest's own message is terse).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn timed_out(req: &Req, t: Duration) -> Error {
    Error::Timeout {
        what: format!("{} timed out after {:.1}s", req.what(), t.as_secs_f64()),
    }
}

/// A failure below HTTP: a deadline is `Timeout`, anything else (DNS, refused, TLS, a
/// connection cut off) `Connection`.
fn transport_error(req: &Req, e: &reqwest::Error) -> Error {
    if e.is_timeout() {
        return timed_out(req, req.timeout.unwrap_or(DEFAULT_TIMEOUT));
    }
    Error::Connection {
        message: format!("cloud request failed: {} ({})", chain(e), req.what()),
    }
}

/// The error of an error response (SPEC §8.3). A body of ours (a problem naming its `kind`)
/// is the same typed error the server had; any other body (plain text, `{"code","error"}`,
/// empty) is the variant of its code or status, its message
/// `cloud {METHOD} {path} → {status}: {sentence} [request id: {id}]`.
pub(crate) fn translate(
    what: &str,
    status: u16,
    body: &[u8],
    retry_after: Option<&str>,
    request_id: Option<&str>,
) -> Error {
    let p = Problem::from_body(status, body);
    let err = Error::from_problem_body(&p, retry_after);
    if p.kind.is_some() && !matches!(err, Error::Coded { .. }) {
        tracing::debug!(what, status, request_id, error = %err, "cloud error response");
        return err;
    }
    let mut msg = format!("{what} → {status}");
    if let Some(s) = p.sentence() {
        msg.push_str(": ");
        msg.push_str(s.trim());
    }
    if let Some(id) = request_id {
        msg.push_str(&format!(" [request id: {id}]"));
    }
    with_message(err, msg)
}

/// `e` with its free text replaced by `msg` (the variants a foreign body can make).
fn with_message(e: Error, msg: String) -> Error {
    match e {
        Error::Unauthorized { .. } => Error::Unauthorized { message: msg },
        Error::Forbidden { scope, .. } => Error::Forbidden {
            message: msg,
            scope,
        },
        Error::PaymentRequired { .. } => Error::PaymentRequired { message: msg },
        Error::RateLimited { retry_after, .. } => Error::RateLimited {
            message: msg,
            retry_after,
        },
        Error::Connection { .. } => Error::Connection { message: msg },
        Error::NotFound { .. } => Error::NotFound { what: msg },
        Error::InvalidConfig { .. } => Error::InvalidConfig { message: msg },
        Error::NotSupported { .. } => Error::NotSupported { message: msg },
        Error::Timeout { .. } => Error::Timeout { what: msg },
        Error::Coded {
            code,
            status,
            problem_code,
            retryable,
            retry_after,
            ..
        } => Error::Coded {
            code,
            status,
            message: msg,
            problem_code,
            retryable,
            retry_after,
        },
        other => other,
    }
}

/// `e` with `suffix` appended to its message, same variant and code (SPEC §9.5's
/// `" (start failed: …)"`); variants without a free-text field are returned as they are.
pub(crate) fn append_message(e: Error, suffix: &str) -> Error {
    let text = match &e {
        Error::Unauthorized { message }
        | Error::Forbidden { message, .. }
        | Error::PaymentRequired { message }
        | Error::RateLimited { message, .. }
        | Error::Connection { message }
        | Error::InvalidConfig { message }
        | Error::NotSupported { message }
        | Error::Coded { message, .. } => message.clone(),
        Error::NotFound { what } | Error::Timeout { what } => what.clone(),
        _ => return e,
    };
    with_message(e, format!("{text}{suffix}"))
}
