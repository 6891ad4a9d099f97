//! The node door of a control replica (`smolfleet serve --role control,edge --node-listen
//! ADDR`): HTTPS whose server certificate the fleet CA signed, where nodes
//!
//! * `POST /fleet/v1/join` — present a one-time join token and a CSR (no client certificate
//!   yet); get back their node id, a client certificate of the CA and the CA certificate;
//! * `POST /fleet/v1/heartbeat` — with that certificate (mutual TLS): renew their lease.
//!
//! A request without a client certificate, or with one no node holds, is refused (401 / 403);
//! one of another CA fails the handshake. This is the nodes' protocol, not the public `/v1`
//! API (it is not in openapi.json): bodies are small JSON objects, errors `{"error": "..."}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::error::FleetError;
use crate::fleetca::{fingerprint, FleetCa};
use crate::nodes::{Joining, Lease};
use crate::store::Db;
use crate::tls::TlsListener;

/// A join request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    /// The one-time token (`smoljoin_…`).
    pub token: String,
    /// The node's certificate request (PEM); its key stays on the node.
    pub csr: String,
    /// What the node calls itself.
    pub name: String,
    /// What it offers.
    pub memory_mib: i64,
    /// What it offers.
    pub cpus: i64,
}

/// A join's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Joined {
    /// `node-…`.
    pub node_id: String,
    /// The node's client certificate (PEM).
    pub certificate: String,
    /// The fleet CA's certificate (PEM).
    pub ca: String,
    /// How long a heartbeat holds (ms).
    pub lease_ms: i64,
}

/// A renewal: a new key's certificate request, over mutual TLS with the current certificate.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewRequest {
    /// PEM.
    pub csr: String,
}

/// A renewal's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewedCert {
    /// The node's new certificate (PEM); the one it renewed with is refused from now on.
    pub certificate: String,
}

/// A heartbeat.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// What it offers now.
    pub memory_mib: i64,
    /// What it offers now.
    pub cpus: i64,
    /// Where its API answers (`https://HOST:PORT`; none: it runs no machines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// The machines its fleet holds, by the control plane's ids (none: it does not take part
    /// in reconciliation; `reconcile.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines: Option<Vec<String>>,
    /// The node asks to be cordoned: this many creates or starts in a row failed to boot
    /// (none: it asks nothing). A ready node is cordoned; an operator uncordons it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_boots: Option<u64>,
    /// Its labels (`labels.rs`; none: those it told before stay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<crate::labels::Labels>,
}

/// A heartbeat's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Renewed {
    /// The node.
    pub node_id: String,
    /// Its state (`ready`, `cordoned`).
    pub state: String,
    /// How long this heartbeat holds (ms).
    pub lease_ms: i64,
    /// Of the heartbeat's `machines`, those with no placement on this node (orphans once they
    /// stay so for the node's grace period).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unplaced: Vec<String>,
}

/// The client certificate of a connection, by its SHA-256 (none: the client sent none).
#[derive(Debug, Clone)]
pub struct Peer {
    cert_sha256: Option<String>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        let (_, conn) = stream.io().get_ref();
        Peer {
            cert_sha256: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| fingerprint(c)),
        }
    }
}

struct Door {
    db: Db,
    ca: FleetCa,
    lease: Lease,
    /// How long the node certificates it signs are valid.
    cert_validity: std::time::Duration,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    tracing::warn!(%status, %message, "node door: refused");
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn failed(e: FleetError) -> Response {
    tracing::error!(error = %e, "node door: store call failed");
    let status = match e {
        FleetError::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

async fn join(State(door): State<Arc<Door>>, Json(req): Json<JoinRequest>) -> Response {
    if crate::fleetca::token_ca(&req.token) != Some(door.ca.fingerprint().as_str()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "join token refused: not a token of this fleet's CA",
        );
    }
    let node_id = crate::db::new_id("node-");
    let certificate = match door.ca.sign_node(&req.csr, &node_id, door.cert_validity) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let der = match crate::fleetca::first_cert(&certificate) {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let joining = Joining {
        id: node_id.clone(),
        name: req.name.clone(),
        cert_sha256: fingerprint(&der),
        memory_mib: req.memory_mib.max(0),
        cpus: req.cpus.max(0),
    };
    let hash = crate::keys::hash(&req.token);
    match door.db.join_node(&hash, &joining, door.lease).await {
        Ok(true) => {
            tracing::info!(node = %node_id, name = %req.name, "node joined");
            (
                StatusCode::CREATED,
                Json(Joined {
                    node_id,
                    certificate,
                    ca: door.ca.cert_pem().to_owned(),
                    lease_ms: door.lease.lease_ms,
                }),
            )
                .into_response()
        }
        Ok(false) => refuse(
            StatusCode::FORBIDDEN,
            "join token refused: unknown, already used or expired (make one with `smolfleet \
             node join-token`)",
        ),
        Err(e) => failed(e),
    }
}

/// `POST /fleet/v1/renew`: a node's new certificate for the key of its request, the one it
/// connected with replaced in the store (so refused from now on) in one statement.
async fn renew(
    State(door): State<Arc<Door>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<RenewRequest>,
) -> Response {
    let Some(old) = peer.cert_sha256 else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a node certificate is required (mutual TLS): join first",
        );
    };
    let node_id = match door.db.node_of_cert(&old).await {
        Ok(Some(id)) => id,
        Ok(None) => {
            return refuse(
                StatusCode::FORBIDDEN,
                "no node holds this certificate (removed from the fleet, or renewed already)",
            )
        }
        Err(e) => return failed(e),
    };
    let certificate = match door.ca.sign_node(&req.csr, &node_id, door.cert_validity) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let new = match crate::fleetca::first_cert(&certificate) {
        Ok(d) => fingerprint(&d),
        Err(e) => return failed(e),
    };
    match door.db.rotate_node_cert(&node_id, &old, &new).await {
        Ok(true) => {
            tracing::info!(node = %node_id, "node certificate renewed");
            Json(RenewedCert { certificate }).into_response()
        }
        Ok(false) => refuse(
            StatusCode::FORBIDDEN,
            "this certificate was renewed already (or the node removed)",
        ),
        Err(e) => failed(e),
    }
}

async fn heartbeat(
    State(door): State<Arc<Door>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(beat): Json<Heartbeat>,
) -> Response {
    let Some(cert) = peer.cert_sha256 else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a node certificate is required (mutual TLS): join first",
        );
    };
    match door
        .db
        .heartbeat(&cert, door.lease, beat.memory_mib.max(0), beat.cpus.max(0))
        .await
    {
        Ok(Some((node_id, mut state))) => {
            if let (Some(n), "ready") = (beat.failed_boots, state.as_str()) {
                match door.db.set_node_state(&node_id, "cordoned").await {
                    Ok(_) => {
                        tracing::warn!(node = %node_id, failed_boots = n, "node cordoned itself: its last boots failed (`smolfleet node uncordon` once it is fixed)");
                        state = "cordoned".into();
                    }
                    Err(e) => return failed(e),
                }
            }
            // labels first: a node is placeable once its API is known, by then with them
            if let Some(told) = &beat.labels {
                match crate::labels::checked(told).map(serde_json::to_string) {
                    Some(Ok(json)) => {
                        if let Err(e) = door.db.set_node_labels(&node_id, &json).await {
                            return failed(e);
                        }
                    }
                    _ => {
                        tracing::warn!(node = %node_id, "a heartbeat's labels are not well formed; its labels are kept as they were")
                    }
                }
            }
            if let Some(url) = &beat.api_url {
                if let Err(e) = door.db.set_node_api(&node_id, url).await {
                    return failed(e);
                }
            }
            let unplaced = match &beat.machines {
                Some(held) => crate::reconcile::answer(&door.db, &node_id, held).await,
                None => Vec::new(),
            };
            Json(Renewed {
                node_id,
                state,
                lease_ms: door.lease.lease_ms,
                unplaced,
            })
            .into_response()
        }
        Ok(None) => refuse(
            StatusCode::FORBIDDEN,
            "no node holds this certificate (removed from the fleet?)",
        ),
        Err(e) => failed(e),
    }
}

/// The door's service over `db`, signing with `ca` node certificates valid `cert_validity`,
/// leasing `lease`.
pub fn router(db: Db, ca: FleetCa, lease: Lease, cert_validity: std::time::Duration) -> Router {
    Router::new()
        .route("/fleet/v1/join", post(join))
        .route("/fleet/v1/heartbeat", post(heartbeat))
        .route("/fleet/v1/renew", post(renew))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(Arc::new(Door {
            db,
            ca,
            lease,
            cert_validity,
        }))
}

/// The fleet CA of `db` (made by `smolfleet init`).
pub async fn load_ca(db: &Db) -> Result<FleetCa, FleetError> {
    match db.ca().await? {
        Some((cert, key)) => FleetCa::from_pem(&cert, &key),
        None => Err(FleetError::Ca {
            message: "the store has no fleet CA: run `smolfleet init` with the same --db first"
                .into(),
        }),
    }
}

/// Serves the door on `listener` with a server certificate for `names` until `shutdown`.
pub async fn serve(
    db: Db,
    listener: TcpListener,
    names: &[String],
    lease: Lease,
    cert_validity: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), FleetError> {
    let ca = load_ca(&db).await?;
    let config = ca.node_door_config(names)?;
    let listener = TlsListener::new(listener, config)?;
    let addr: SocketAddr =
        axum::serve::Listener::local_addr(&listener).map_err(|source| FleetError::Io {
            context: "read the node door's address".into(),
            source,
        })?;
    tracing::info!(%addr, ?names, "node door serving (mutual TLS)");
    let app = router(db, ca, lease, cert_validity).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| FleetError::Io {
            context: format!("serve the node door on {addr}"),
            source,
        })
}
