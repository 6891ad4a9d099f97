//! Key scopes (SPEC §10.1): what each route needs, in one table, and the 403 for a key that
//! lacks it (plain text `missing scope: <scope>`, as the published fleet answers).

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;

/// Implies every other scope.
pub const ADMIN: &str = "admin";

/// Every scope a key can hold (SPEC §10.1).
pub const ALL: &[&str] = &[
    "machine:create",
    "machine:read",
    "machine:exec",
    "machine:delete",
    "machine:files",
    "volume:read",
    "usage:read",
    ADMIN,
];

/// What ingress needs: the connect routes (any method), host- and header-routed requests and
/// `PUT …/ports` (reaching into a machine, as an exec does).
pub const INGRESS: &str = "machine:exec";

/// The routes any method of which needs [`INGRESS`].
const INGRESS_ROUTES: &[&str] = &[
    "/v1/machines/{id}/connect/{port}",
    "/v1/machines/{id}/connect/{port}/",
    "/v1/machines/{id}/connect/{port}/{*path}",
];

/// What each route needs: `(method, route pattern as the router matched it, scope)`. A route
/// that is not here needs only a valid key (`/livez`, `/readyz`, `/openapi.json`, unknown
/// paths). Starting, stopping, pausing and resuming count as exec: an exec starts a stopped
/// machine anyway. A branch makes a new machine: create; so do a checkpoint (a copy of the
/// machine, memory and all) and a restore. Listing checkpoints reads, deleting one deletes.
pub const ROUTE_SCOPES: &[(Method, &str, &str)] = &[
    (Method::POST, "/v1/machines", "machine:create"),
    (Method::GET, "/v1/machines", "machine:read"),
    (Method::GET, "/v1/machines/{id}", "machine:read"),
    (Method::DELETE, "/v1/machines/{id}", "machine:delete"),
    (Method::POST, "/v1/machines/{id}/start", "machine:exec"),
    (Method::POST, "/v1/machines/{id}/stop", "machine:exec"),
    (Method::POST, "/v1/machines/{id}/pause", "machine:exec"),
    (Method::POST, "/v1/machines/{id}/resume", "machine:exec"),
    (Method::POST, "/v1/machines/{id}/branches", "machine:create"),
    (Method::POST, "/v1/machines/{id}/fork", "machine:create"),
    (
        Method::POST,
        "/v1/machines/{id}/branches/batch",
        "machine:create",
    ),
    (
        Method::POST,
        "/v1/machines/{id}/fork-batch",
        "machine:create",
    ),
    (
        Method::POST,
        "/v1/machines/{id}/checkpoints",
        "machine:create",
    ),
    (Method::GET, "/v1/machines/{id}/checkpoints", "machine:read"),
    (
        Method::POST,
        "/v1/checkpoints/{id}/restore",
        "machine:create",
    ),
    (Method::DELETE, "/v1/checkpoints/{id}", "machine:delete"),
    (Method::POST, "/v1/machines/{id}/exec", "machine:exec"),
    (
        Method::POST,
        "/v1/machines/{id}/exec/stream",
        "machine:exec",
    ),
    (
        Method::GET,
        "/v1/machines/{id}/files/{*path}",
        "machine:files",
    ),
    (
        Method::PUT,
        "/v1/machines/{id}/files/{*path}",
        "machine:files",
    ),
    (Method::PUT, "/v1/machines/{id}/ports", INGRESS),
    (Method::GET, "/metrics", ADMIN),
];

/// The scope `method route` needs, if any.
pub fn required(method: &Method, route: &str) -> Option<&'static str> {
    if INGRESS_ROUTES.contains(&route) {
        return Some(INGRESS);
    }
    ROUTE_SCOPES
        .iter()
        .find(|(m, r, _)| m == method && *r == route)
        .map(|(_, _, s)| *s)
}

/// Whether the space-separated `held` scopes grant `scope` (`admin` grants all).
pub fn grants(held: &str, scope: &str) -> bool {
    held.split_whitespace().any(|s| s == scope || s == ADMIN)
}

/// The stored form of a key's scopes: `requested` checked against [`ALL`], deduplicated, in
/// [`ALL`]'s order; none requested is every scope but `admin`.
pub fn normalize<S: AsRef<str>>(requested: &[S]) -> Result<String, String> {
    if requested.is_empty() {
        return Ok(ALL
            .iter()
            .filter(|s| **s != ADMIN)
            .copied()
            .collect::<Vec<_>>()
            .join(" "));
    }
    for r in requested {
        let r = r.as_ref();
        if !ALL.contains(&r) {
            return Err(format!(
                "unknown scope {r:?}; the scopes are {}",
                ALL.join(", ")
            ));
        }
    }
    Ok(ALL
        .iter()
        .filter(|s| requested.iter().any(|r| r.as_ref() == **s))
        .copied()
        .collect::<Vec<_>>()
        .join(" "))
}

/// 403 `missing scope: <scope>` (text/plain).
pub fn forbidden(scope: &str) -> Response {
    let mut resp = Response::new(Body::from(format!("missing scope: {scope}")));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_grants_everything_and_others_only_themselves() {
        assert!(grants("admin", "machine:exec"));
        assert!(grants("machine:read machine:exec", "machine:exec"));
        assert!(!grants("machine:read", "machine:exec"));
        assert!(!grants("machine:read", ADMIN));
        assert!(!grants("", "machine:read"));
    }

    #[test]
    fn scopes_are_checked_and_ordered() {
        let none: [&str; 0] = [];
        assert_eq!(
            normalize(&none).unwrap(),
            "machine:create machine:read machine:exec machine:delete machine:files \
             volume:read usage:read"
        );
        assert_eq!(
            normalize(&["machine:exec", "machine:read", "machine:exec"]).unwrap(),
            "machine:read machine:exec"
        );
        let e = normalize(&["machines:read"]).unwrap_err();
        assert!(
            e.contains("machines:read") && e.contains("machine:read"),
            "{e}"
        );
    }

    #[test]
    fn every_machine_route_has_a_scope() {
        assert_eq!(
            required(&Method::POST, "/v1/machines/{id}/exec"),
            Some("machine:exec")
        );
        assert_eq!(required(&Method::GET, "/livez"), None);
        assert_eq!(required(&Method::GET, "/metrics"), Some(ADMIN));
    }
}
