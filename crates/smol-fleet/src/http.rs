//! The HTTP contract every route shares: `x-request-id`, Bearer authentication (401 with an
//! empty body on every path without a valid key), the per-key rate limit (429) and scopes
//! (403, the table of `scopes.rs`), JSON bodies (malformed 400, schema 422, too large 413),
//! raw query parsing.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use smolmachines::Error;

use crate::db::new_id;
use crate::error::ApiError;
use crate::server::{Fleet, Tenant};
use crate::{keys, scopes};

/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// Whether a client's request id may be echoed: `[A-Za-z0-9._-]{1,128}`.
pub fn safe_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Sets `x-request-id` on every response: the client's when safe, else a new `req-…`.
pub async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| safe_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| new_id("req-"));
    tracing::debug!(request_id = %id, method = %req.method(), path = %req.uri().path(), "request");
    let mut resp = next.run(req).await;
    match HeaderValue::from_str(&id) {
        Ok(v) => {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        Err(e) => tracing::error!(error = %e, "request id is not a header value"),
    }
    resp
}

fn unauthorized() -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp
}

/// The Bearer credential of `req`, if any.
fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty())
}

/// Paths answered without a key (SPEC §10.1: only `/health`).
fn public(req: &Request) -> bool {
    req.method() == Method::GET && req.uri().path() == "/health"
}

/// Admits a request with a valid key (its [`Tenant`] put in the extensions); anything else
/// is 401 with an empty body, whatever the path.
pub async fn authenticate(State(fleet): State<Fleet>, mut req: Request, next: Next) -> Response {
    // a host- or header-routed ingress request needs a key whatever its path (`proxy.rs`)
    let ingress = fleet.apps().route(req.headers()).is_some();
    if public(&req) && !ingress {
        return next.run(req).await;
    }
    let Some(key) = bearer(&req).filter(|k| keys::well_formed(k)) else {
        return unauthorized();
    };
    let hash = keys::hash(key);
    let found = fleet.last_known().key(&fleet, &hash).await;
    let key = match found {
        Ok(Some(k)) => k,
        Ok(None) => return unauthorized(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    // the rate limit counts every authenticated request of the key, refused ones included
    let remaining = match fleet.limiter().take(&key.id, std::time::Instant::now()) {
        Ok(n) => n,
        Err(refused) => {
            tracing::debug!(key = %key.id, "rate limited");
            let rate = fleet.limiter().rate();
            return ApiError(Error::RateLimited {
                message: format!(
                    "more than {} requests a second with this key",
                    rate.per_second
                ),
                retry_after: Some(refused.retry_after),
            })
            .into_response();
        }
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let scope = if ingress {
        Some(scopes::INGRESS)
    } else {
        route.and_then(|r| scopes::required(req.method(), &r))
    };
    if let Some(scope) = scope {
        if !scopes::grants(&key.scopes, scope) {
            tracing::debug!(key = %key.id, scope, "missing scope");
            return scopes::forbidden(scope);
        }
    }
    req.extensions_mut().insert(Tenant(key.tenant_id));
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert(RATELIMIT_REMAINING, HeaderValue::from(remaining));
    resp
}

/// The tokens left in the key's bucket, on every authenticated response (SPEC §10.1).
pub const RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";

/// Refuses a request whose declared `content-length` is over its route's limit before any of
/// the body is read (413); a body without a length is cut at the same limit while read.
/// Proxied requests (`…/connect/…`) have no limit: their bodies stream to the guest.
pub async fn declared_length(req: Request, next: Next) -> Response {
    if req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| p.as_str().starts_with("/v1/machines/{id}/connect/"))
    {
        return next.run(req).await;
    }
    let files = req.uri().path().contains("/files/");
    let (what, limit) = if files {
        ("the file", crate::server::FILE_LIMIT)
    } else {
        ("the request body", crate::server::JSON_LIMIT)
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::too_large(what, limit).into_response();
    }
    next.run(req).await
}

/// A JSON body: not JSON is 400, JSON that does not fit the schema (a missing or mistyped
/// field) 422; unknown fields are ignored by the wire types.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::unprocessable(e),
        _ => ApiError::malformed(e),
    })
}

/// The body's bytes, or the problem for why there are none (413 over the limit).
pub fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    what: &str,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(what, limit)
        } else {
            ApiError::malformed(r.body_text())
        }
    })
}

/// The values of `name` in a raw query string (`a=1&a=2`), percent-decoded (`+` is a space).
pub fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k) == name).then(|| decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_echoed_only_when_safe() {
        assert!(safe_request_id("req-1.A_b"));
        assert!(!safe_request_id(""));
        assert!(!safe_request_id("a b"));
        assert!(!safe_request_id("a\u{e9}"));
        assert!(!safe_request_id(&"a".repeat(129)));
        assert!(safe_request_id(&"a".repeat(128)));
    }

    #[test]
    fn queries_repeat_and_decode() {
        let q = Some("label=k%3Dv&x=1&label=a%3Db+c&label");
        assert_eq!(query_values(q, "label"), ["k=v", "a=b c", ""]);
        assert_eq!(query_values(q, "x"), ["1"]);
        assert!(query_values(None, "x").is_empty());
    }
}
