//! The ingress reverse proxy (SPEC §10.5.6): a request for a published guest port, named by
//! the route `ANY /v1/machines/{id}/connect/{port}[/{path}]`, by the host name
//! `{port}-{id}.{apps-domain}` or by the headers `x-smol-machine` + `x-smol-port`
//! (`ingress.rs`), goes to the node's loopback listener of that port, which the engine relays
//! into the guest.
//!
//! * Every form needs the API key of the machine's tenant (another tenant's machine is 404,
//!   as everywhere) and the `machine:exec` scope. The caller's `Authorization` and the routing
//!   headers are not passed to the guest; `x-forwarded-host` / `x-forwarded-proto` are added.
//! * Each proxied request holds the machine busy (`Fleet::busy`, activity for the idle stop of
//!   `sweeper.rs`) until its answer's body or its upgraded connection ends.
//! * Bodies stream both ways (one HTTP/1 client connection per request, frames passed as they
//!   come, so server-sent events arrive as sent); a WebSocket (any `Upgrade`) is passed on and
//!   the two upgraded connections are then copied into each other.
//! * A port that is not published is 404, a stopped machine 503, nothing answering in the
//!   guest 502: problem+json, each with a hint.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use smolmachines::{Error, ErrorCode, MachineState};

use crate::error::ApiError;
use crate::ingress::{invalid, MACHINE_HEADER, PORT_HEADER};
use crate::server::{Fleet, Tenant};

/// An error answered with its problem, `hint` replacing the error's own.
struct Refusal {
    error: Error,
    hint: Option<String>,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal {
            error: e.0,
            hint: None,
        }
    }
}

impl From<Error> for Refusal {
    fn from(error: Error) -> Self {
        Refusal { error, hint: None }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self.hint {
            None => ApiError(self.error).into_response(),
            Some(h) => crate::error::problem_response(&self.error, Some(h)),
        }
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are not passed on, plus the caller's
/// key and the routing headers.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    MACHINE_HEADER,
    PORT_HEADER,
    // a replica's word to the node (`epochs.rs`), not the app's
    crate::epochs::HEADER,
];

/// Whether the request asks to switch protocols (a WebSocket).
fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// `headers` without the hop-by-hop ones (and those `Connection` names); an upgrade keeps
/// `Connection: upgrade` and `Upgrade`.
fn forwardable(headers: &HeaderMap, upgrade: bool, request: bool) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "upgrade")
        .collect();
    let mut out = HeaderMap::new();
    for (k, v) in headers {
        let name = k.as_str();
        let hop = DROPPED.contains(&name) || named.iter().any(|n| n == name);
        // a response's Authorization-like headers are the app's own: only requests lose them
        let keep = !hop || (!request && (name == "authorization" || name.starts_with("x-smol-")));
        if keep {
            out.append(k.clone(), v.clone());
        }
    }
    if upgrade {
        if let Some(u) = headers.get(header::UPGRADE) {
            out.insert(header::UPGRADE, u.clone());
            out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    out
}

/// The middleware of host- and header-routed ingress: such a request (authenticated before
/// it gets here) is proxied; any other goes on to the API routes.
pub async fn by_host(State(fleet): State<Fleet>, req: Request, next: Next) -> Response {
    let target = match fleet.apps().route(req.headers()) {
        None => return next.run(req).await,
        Some(Err(e)) => return ApiError(e).into_response(),
        Some(Ok(t)) => t,
    };
    let Some(tenant) = req.extensions().get::<Tenant>().cloned() else {
        // (authentication admits no ingress request without a key; never proxy one)
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    // a machine on a remote node: its node's connect route (`remote.rs`)
    let req =
        match crate::remote::by_host(&fleet, &tenant, &target.machine, target.port, &path, req)
            .await
        {
            Ok(resp) => return resp,
            Err(req) => req,
        };
    proxy(&fleet, &tenant, &target.machine, target.port, path, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The machine id, guest port and the guest path (with the query) of a
/// `/v1/machines/{id}/connect/{port}[/{path}]` URI, from its raw (still encoded) form.
fn connect_parts(uri: &Uri) -> Result<(String, u16, String), Error> {
    let bad = || {
        invalid(format!(
            "{} is not /v1/machines/{{id}}/connect/{{port}}[/path]",
            uri.path()
        ))
    };
    let rest = uri.path().strip_prefix("/v1/machines/").ok_or_else(bad)?;
    let (id, rest) = rest.split_once('/').ok_or_else(bad)?;
    let rest = rest.strip_prefix("connect/").ok_or_else(bad)?;
    let (port, path) = match rest.split_once('/') {
        Some((p, tail)) => (p, format!("/{tail}")),
        None => (rest, "/".to_string()),
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(format!("port {port:?} must be 1..=65535")))?;
    let path = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    Ok((id.to_string(), port, path))
}

/// `ANY /v1/machines/{id}/connect/{port}[/{path}]` (and a WebSocket upgrade of it): the
/// request as `/{path}` to guest port `port`.
pub async fn connect(State(fleet): State<Fleet>, req: Request) -> Response {
    let Some(tenant) = req.extensions().get::<Tenant>().cloned() else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let (id, port, path) = match connect_parts(req.uri()) {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    proxy(&fleet, &tenant, &id, port, path, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The request to guest port `port` of machine `id`, as `path`.
async fn proxy(
    fleet: &Fleet,
    tenant: &Tenant,
    id: &str,
    port: u16,
    path: String,
    req: Request,
) -> Result<Response, Refusal> {
    let row = crate::routes::row_of(fleet, tenant, id).await?;
    // activity for the sweeper's idle stop, held while the answer or the upgrade lasts
    let busy = fleet.busy(&row.engine_name).await;
    let m = fleet.handle(&row.engine_name).await?;
    let state = m.state().await?;
    if state != MachineState::Running {
        return Err(Refusal {
            error: Error::Coded {
                code: ErrorCode::InvalidState,
                status: 503,
                message: format!(
                    "machine {id} is {}: its ports answer while it runs",
                    state.as_str()
                ),
                problem_code: None,
                retryable: false,
                retry_after: None,
            },
            hint: Some(format!("start it: POST /v1/machines/{id}/start")),
        });
    }
    let Some(host_port) = m.ports().iter().find(|p| p.guest == port).map(|p| p.host) else {
        return Err(Refusal {
            error: Error::NotFound {
                what: format!("published guest port {port} of machine {id}"),
            },
            hint: Some(format!(
                "publish it first: PUT /v1/machines/{id}/ports with every port to publish, \
                 e.g. {{\"ports\": [{{\"port\": {port}}}]}} (Machine.publish({port}))"
            )),
        });
    };
    let nothing_listens = |why: String| Refusal {
        error: Error::Connection {
            message: format!("nothing answered on guest port {port} of machine {id}: {why}"),
        },
        hint: Some(format!(
            "start a server in the machine listening on 127.0.0.1:{port} or 0.0.0.0:{port} (the \
             connection reaches the guest's loopback); GET /v1/machines/{id} says ready once \
             every published port answers"
        )),
    };

    let (mut parts, body) = req.into_parts();
    let upgrade = wants_upgrade(&parts.headers);
    let client_side = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let mut headers = forwardable(&parts.headers, upgrade, true);
    if let Some(h) = parts.headers.get(header::HOST) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h.clone());
    }
    // (the scheme of the apps URLs: https when this server serves TLS or sits behind a TLS proxy)
    let scheme = if fleet.apps().scheme == "https" {
        "https"
    } else {
        "http"
    };
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(scheme),
    );
    let uri: Uri = path
        .parse()
        .map_err(|e| invalid(format!("the path {path:?} is not a request target: {e}")))?;
    let mut out = axum::http::Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", host_port))
        .await
        .map_err(|e| {
            nothing_listens(format!(
                "the node's listener 127.0.0.1:{host_port} refused: {e}"
            ))
        })?;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on a proxied connection");
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| nothing_listens(e.to_string()))?;
    let (machine, guest) = (id.to_string(), port);
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%machine, guest, error = %e, "proxied connection ended");
        }
    });
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|e| nothing_listens(format!("the connection closed before a response ({e})")))?;
    tracing::debug!(machine = %id, guest = port, status = resp.status().as_u16(), "proxied");

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_side) = client_side else {
            return Err(Refusal::from(Error::Connection {
                message: format!("guest port {port} of machine {id} switched protocols unasked"),
            }));
        };
        let guest_side = hyper::upgrade::on(&mut resp);
        let (machine, guest) = (id.to_string(), port);
        tokio::spawn(async move {
            let _busy = busy;
            match tokio::try_join!(client_side, guest_side) {
                Ok((c, g)) => {
                    let (mut c, mut g) = (TokioIo::new(c), TokioIo::new(g));
                    match tokio::io::copy_bidirectional(&mut c, &mut g).await {
                        Ok((up, down)) => {
                            tracing::debug!(%machine, guest, up, down, "upgraded connection closed")
                        }
                        Err(e) => {
                            tracing::debug!(%machine, guest, error = %e, "upgraded connection ended")
                        }
                    }
                }
                Err(e) => tracing::debug!(%machine, guest, error = %e, "upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
        parts.headers = forwardable(&parts.headers, false, false);
        if let Some(u) = upgrade_to {
            parts.headers.insert(header::UPGRADE, u);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers = forwardable(&parts.headers, false, false);
    // each frame passed on as it comes; the machine counts as busy until the body ends
    let frames = Body::new(body).into_data_stream().map(move |frame| {
        let _busy = &busy;
        frame
    });
    Ok(Response::from_parts(parts, Body::from_stream(frames)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_uris_keep_their_encoding() {
        let p = |u: &str| connect_parts(&u.parse::<Uri>().unwrap());
        assert_eq!(
            p("/v1/machines/mach-1/connect/8080").unwrap(),
            ("mach-1".into(), 8080, "/".into())
        );
        assert_eq!(
            p("/v1/machines/mach-1/connect/8080/").unwrap(),
            ("mach-1".into(), 8080, "/".into())
        );
        assert_eq!(
            p("/v1/machines/mach-1/connect/80/a%20b/c?x=1&y=%2F").unwrap(),
            ("mach-1".into(), 80, "/a%20b/c?x=1&y=%2F".into())
        );
        assert!(p("/v1/machines/mach-1/connect/0/x").is_err());
        assert!(p("/v1/machines/mach-1/connect/http").is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_the_key_stay_here() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer smk_x".parse().unwrap());
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert(MACHINE_HEADER, "mach-1".parse().unwrap());
        h.insert(crate::epochs::HEADER, "mach-1 2".parse().unwrap());
        h.insert("content-type", "text/plain".parse().unwrap());
        h.append("x-multi", "a".parse().unwrap());
        h.append("x-multi", "b".parse().unwrap());
        let out = forwardable(&h, false, true);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-multi"]);
        assert_eq!(out.get_all("x-multi").iter().count(), 2);
        // an upgrade keeps what it needs
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "Upgrade".parse().unwrap());
        assert!(wants_upgrade(&h));
        let out = forwardable(&h, true, true);
        assert_eq!(out["upgrade"], "websocket");
        assert_eq!(out["connection"], "upgrade");
        assert!(out.get("authorization").is_none());
    }
}
