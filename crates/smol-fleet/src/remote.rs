//! Machines on remote nodes (issue 15): with `--role control,edge --node-listen`, a create is
//! placed by `placement.rs` on a ready node and sent to that node's API (`nodeapi.rs`) over
//! mutual TLS; every later request for the machine (exec, its stream, files, start, stop,
//! delete, ports, connect) goes client → this replica → the node, streamed both ways (the
//! replica holds a chunk at a time, never a whole body).
//!
//! The control plane connects to the node (the node's heartbeat says where its API answers):
//! a request is one HTTP/1.1 exchange, so exec streams, uploads and downloads pass through
//! hyper unchanged; the connection goes back to a per-node pool once its exchange ended
//! cleanly, for the next request (`nodepool.rs`). The node is verified as the node the store
//! names (its certificate, by the fleet CA, carries its id as DNS name); the replica presents
//! a client certificate of the CA with the control subject (`fleetca.rs`).
//!
//! A machine whose node is lost answers `ready=false` with an `errorReason` (never a 404);
//! requests for it are 503 `retryable`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use rusqlite::{params, Connection, OptionalExtension};
use smolmachines::wire::{CreateMachineBody, MachineInfo};
use smolmachines::{Error, ErrorCode};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use crate::db::MachineRow;
use crate::epochs::PlacementEpoch;
use crate::error::{ApiError, FleetError};
use crate::server::{Fleet, Tenant};

/// Schema version 6: where each node's API answers.
pub(crate) const SCHEMA_V6: &str = "ALTER TABLE nodes ADD COLUMN api_url TEXT;\n";

/// Schema version 7: deletes waiting for a node that is away.
pub(crate) const SCHEMA_V7: &str = "
CREATE TABLE tombstones (
    machine_id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
);
";

pub(crate) const TOMBSTONE: &str = "
INSERT INTO tombstones (machine_id, created_at) VALUES (?1, ?2)
ON CONFLICT (machine_id) DO NOTHING";

pub(crate) const SET_NODE_API: &str =
    "UPDATE nodes SET api_url = ?2 WHERE id = ?1 AND (api_url IS NULL OR api_url <> ?2)";

pub(crate) const MACHINE_NODE: &str = "
SELECT n.id, n.api_url,
       CASE WHEN n.lease_until IS NULL OR n.lease_until >= {now_ms} THEN 'live'
            WHEN n.lost_at >= {now_ms} THEN 'suspect'
            ELSE 'lost' END,
       n.lease_until,
       n.lease_until - {now_ms},
       CASE WHEN EXISTS (SELECT 1 FROM tombstones t WHERE t.machine_id = p.machine_id)
            THEN 1 ELSE 0 END,
       p.epoch
  FROM placements p JOIN nodes n ON n.id = p.node_id
 WHERE p.machine_id = ?1";

/// How long reaching a node (TCP and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node's answer to a state read may take.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// The most a node's JSON answer to a state read may hold.
const ANSWER_LIMIT: usize = 1 << 20;

/// The node a machine is placed on, as the database's clock sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAt {
    /// `node-…`.
    pub id: String,
    /// Where its API answers (`https://HOST:PORT`; none: a node that serves no API).
    pub api_url: Option<String>,
    /// `live`, `suspect` or `lost` (`nodes.rs`).
    pub liveness: String,
    /// When its lease ends, Unix ms by the database's clock.
    pub lease_until: Option<i64>,
    /// How long until then, ms, as the database's clock read it (negative: past).
    pub lease_left_ms: Option<i64>,
    /// The machine is deleted, its node's delete waiting for the node (a tombstone).
    pub deleting: bool,
    /// The machine's placement, which every request about it names (`epochs.rs`; none: a
    /// node looked up by id, for no machine of its).
    pub placement: Option<PlacementEpoch>,
}

/// Records node `id`'s API (unchanged: nothing written).
pub fn set_node_api(c: &Connection, id: &str, url: &str) -> Result<(), FleetError> {
    c.execute(SET_NODE_API, params![id, url])
        .map_err(|e| FleetError::db("record a node's API", e))?;
    Ok(())
}

/// The node machine `machine_id` is placed on.
pub fn machine_node(c: &Connection, machine_id: &str) -> Result<Option<NodeAt>, FleetError> {
    c.query_row(&crate::nodes::sqlite(MACHINE_NODE), [machine_id], |r| {
        Ok(NodeAt {
            id: r.get(0)?,
            api_url: r.get(1)?,
            liveness: r.get(2)?,
            lease_until: r.get(3)?,
            lease_left_ms: r.get(4)?,
            deleting: r.get::<_, i64>(5)? != 0,
            placement: Some(PlacementEpoch {
                machine_id: machine_id.to_owned(),
                epoch: r.get(6)?,
            }),
        })
    })
    .optional()
    .map_err(|e| FleetError::db("find a machine's node", e))
}

/// Marks machine `id` deleted while its node is away.
pub fn tombstone(c: &Connection, id: &str) -> Result<(), FleetError> {
    c.execute(TOMBSTONE, params![id, crate::db::now()])
        .map_err(|e| FleetError::db("tombstone a machine", e))?;
    Ok(())
}

/// The tombstoned machines, oldest first.
pub fn tombstoned(c: &Connection) -> Result<Vec<MachineRow>, FleetError> {
    let mut st = c
        .prepare(&format!(
            "SELECT {} FROM machines WHERE id IN (SELECT machine_id FROM tombstones)
             ORDER BY created_at, id",
            crate::db::MACHINE_COLUMNS
        ))
        .map_err(|e| FleetError::db("list tombstoned machines", e))?;
    let rows = st
        .query_map([], crate::db::machine_row)
        .map_err(|e| FleetError::db("list tombstoned machines", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list tombstoned machines", e))
}

/// Runs the deletes that waited for their node, for those whose node is back (each sweep, on
/// every replica: a node answers a second delete of the same machine 404, which also
/// completes it). How many ran.
pub(crate) async fn run_tombstones(fleet: &Fleet) -> Result<usize, FleetError> {
    if fleet.remote().is_none() {
        return Ok(0);
    }
    let mut done = 0;
    for row in fleet.db().tombstoned().await? {
        let live = fleet
            .db()
            .machine_node(&row.id)
            .await?
            .is_some_and(|n| n.liveness == "live");
        if !live {
            continue;
        }
        match fleet.destroy(&row).await {
            Ok(()) => {
                tracing::info!(machine = %row.id, "the delete that waited for its node ran");
                done += 1;
            }
            Err(e) => {
                tracing::warn!(machine = %row.id, error = %e, "a waiting delete failed; tried again next sweep")
            }
        }
    }
    Ok(done)
}

/// How a control replica reaches nodes: its client certificate of the fleet CA.
#[derive(Clone)]
pub struct Remote {
    client: Arc<ClientConfig>,
    pool: Arc<crate::nodepool::NodePool>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}

impl Remote {
    /// Reaches nodes with `client` ([`crate::fleetca::FleetCa::control_client_config`]).
    pub fn new(client: Arc<ClientConfig>) -> Remote {
        Remote {
            client,
            pool: Arc::default(),
        }
    }

    /// How many connections to nodes' APIs this replica opened (`smolfleet_node_connections_total`).
    pub(crate) fn connections_opened(&self) -> u64 {
        self.pool.connections_opened()
    }
}

/// 503 `retryable`: node `node` cannot serve the machine now.
pub(crate) fn unavailable(node: &NodeAt, why: impl std::fmt::Display) -> ApiError {
    ApiError::retry_later(format!(
        "the machine's node {} is unavailable: {why}",
        node.id
    ))
}

/// Why a machine on `node` is not ready, when it is the node's doing.
fn lost_reason(node: &NodeAt) -> String {
    let since = node
        .lease_until
        .map(|ms| format!(" since {}", crate::db::rfc3339(ms / 1000)))
        .unwrap_or_default();
    format!(
        "node {} is lost (no heartbeat{since}); the machine comes back with it",
        node.id
    )
}

/// Sends `req` to `node`'s API over mutual TLS; its answer, the body streamed.
pub(crate) async fn send(
    remote: &Remote,
    node: &NodeAt,
    mut req: Request,
) -> Result<Response, ApiError> {
    if node.liveness == "lost" {
        return Err(unavailable(node, lost_reason(node)));
    }
    let Some(url) = node.api_url.as_deref() else {
        return Err(unavailable(node, "it serves no API"));
    };
    let authority = url
        .strip_prefix("https://")
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_owned();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = path
        .parse::<Uri>()
        .map_err(|e| unavailable(node, format!("{path}: {e}")))?;
    let headers = req.headers_mut();
    // the node knows the replica by its certificate; the client's key stays here
    headers.remove(header::AUTHORIZATION);
    // only a replica names a placement, and only the one it read (`epochs.rs`)
    headers.remove(crate::epochs::HEADER);
    if let Some(v) = node.placement.as_ref().and_then(PlacementEpoch::header) {
        headers.insert(crate::epochs::HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&authority) {
        headers.insert(header::HOST, v);
    }
    let key = format!("{} {authority}", node.id);
    // an idle connection first; one closed before the request went out gives it back
    while let Some(mut sender) = remote.pool.take(&key) {
        match sender.try_send_request(req).await {
            Ok(resp) => {
                remote.pool.give_back(key, sender);
                return Ok(resp.map(Body::new));
            }
            Err(mut e) => match e.take_message() {
                Some(back) => {
                    tracing::debug!(node = %node.id, error = %e.error(), "idle node connection closed; the next one sends the request");
                    req = back;
                }
                None => return Err(unavailable(node, format!("{path}: {}", e.error()))),
            },
        }
    }
    let mut sender = connect(remote, node, &authority).await?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unavailable(node, format!("{path}: {e}")))?;
    remote.pool.give_back(key, sender);
    Ok(resp.map(Body::new))
}

/// A new mutual-TLS connection to `node`'s API at `authority`.
async fn connect(
    remote: &Remote,
    node: &NodeAt,
    authority: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, ApiError> {
    let name = ServerName::try_from(node.id.clone())
        .map_err(|e| unavailable(node, format!("not a server name: {e}")))?;
    let connect = async {
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect to {authority}: {e}"))?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        crate::nodepool::bound_silence(&tcp);
        let tls = TlsConnector::from(remote.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {authority}: {e}"))?;
        hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP with {authority}: {e}"))
    };
    let (sender, conn) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| unavailable(node, format!("no answer in {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unavailable(node, e))?;
    remote.pool.opened();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "node connection ended");
        }
    });
    Ok(sender)
}

/// A request of `method` to `path` with `body` as JSON (none: empty).
pub(crate) fn request(
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Request, ApiError> {
    let mut b = Request::builder().method(method).uri(path);
    if body.is_some() {
        b = b.header(header::CONTENT_TYPE, "application/json");
    }
    b.body(body.map_or_else(Body::empty, Body::from))
        .map_err(|e| ApiError(Error::coded(ErrorCode::SmolvmError, e.to_string())))
}

/// The node that runs machine `machine_id` for this replica, if it has one with an API
/// (`None`: a machine of this replica's own engine).
async fn node_of(fleet: &Fleet, machine_id: &str) -> Result<Option<NodeAt>, FleetError> {
    Ok(fleet
        .db()
        .machine_node(machine_id)
        .await?
        .filter(|n| n.api_url.is_some()))
}

/// The machine of `row` as its node reports it (`None`: not on a remote node). A node that
/// is lost or does not answer gives `state: unknown`, `ready: false` and an `errorReason`.
pub(crate) async fn info_of(
    fleet: &Fleet,
    row: &MachineRow,
) -> Result<Option<MachineInfo>, ApiError> {
    let Some(remote) = fleet.remote() else {
        return Ok(None);
    };
    let Some(node) = node_of(fleet, &row.id).await? else {
        return Ok(None);
    };
    let unreachable = |reason: String| MachineInfo {
        id: row.id.clone(),
        state: "unknown".into(),
        ready: Some(false),
        error_reason: Some(reason),
        ..Default::default()
    };
    if node.deleting {
        let mut info = unreachable(format!(
            "deleted; the delete runs when node {} returns",
            node.id
        ));
        info.state = "deleting".into();
        return Ok(Some(info));
    }
    if node.liveness == "lost" {
        return Ok(Some(unreachable(lost_reason(&node))));
    }
    let read = async {
        let resp = send(
            remote,
            &node,
            request(Method::GET, &format!("/v1/machines/{}", row.id), None)?,
        )
        .await?;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), ANSWER_LIMIT)
            .await
            .map_err(|e| unavailable(&node, e))?;
        if status == StatusCode::NOT_FOUND {
            return Ok(MachineInfo {
                id: row.id.clone(),
                state: "error".into(),
                ready: Some(false),
                error_reason: Some(format!("node {} has no such machine", node.id)),
                ..Default::default()
            });
        }
        if !status.is_success() {
            return Err(unavailable(&node, format!("it answered {status}")));
        }
        serde_json::from_slice::<MachineInfo>(&bytes)
            .map_err(|e| unavailable(&node, format!("an answer not understood: {e}")))
    };
    Ok(Some(match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            tracing::warn!(machine = %row.id, node = %node.id, error = %e.0, "cannot read a remote machine");
            unreachable(e.0.to_string())
        }
        Err(_) => unreachable(format!(
            "node {} did not answer in {READ_TIMEOUT:?}",
            node.id
        )),
    }))
}

/// Sends `method path` (no body) for machine `row` to its node (`None`: not on a remote node):
/// the node's status, its answer read (small JSON answers: stop, delete).
pub(crate) async fn call(
    fleet: &Fleet,
    row: &MachineRow,
    method: Method,
    path: &str,
) -> Result<Option<StatusCode>, ApiError> {
    let Some(remote) = fleet.remote() else {
        return Ok(None);
    };
    let Some(node) = node_of(fleet, &row.id).await? else {
        return Ok(None);
    };
    let resp = send(remote, &node, request(method, path, None)?).await?;
    let status = resp.status();
    if let Err(e) = axum::body::to_bytes(resp.into_body(), ANSWER_LIMIT).await {
        tracing::debug!(machine = %row.id, error = %e, "the node's answer broke off");
    }
    Ok(Some(status))
}

/// Sends the create of `row` (placed on a node by [`crate::Store::reserve`], operation
/// `operation`) to its node. On failure the record and its reservation go, and the node's
/// answer (or a 503) is returned for the client.
pub(crate) async fn create_on_node(
    fleet: &Fleet,
    row: &MachineRow,
    operation: &str,
    mut body: CreateMachineBody,
) -> Result<(), Response> {
    let result = async {
        let remote = fleet
            .remote()
            .ok_or_else(|| ApiError(Error::coded(ErrorCode::SmolvmError, "no remote nodes")))?;
        let node = fleet.db().machine_node(&row.id).await?.ok_or_else(|| {
            ApiError(Error::coded(
                ErrorCode::SmolvmError,
                format!("machine {} was placed, but its placement is gone", row.id),
            ))
        })?;
        // the node records it under the control plane's id
        body.name = Some(row.id.clone());
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| ApiError(Error::coded(ErrorCode::SmolvmError, e.to_string())))?;
        tracing::info!(machine = %row.id, node = %node.id, "creating a machine on its node");
        send(
            remote,
            &node,
            request(Method::POST, "/v1/machines", Some(bytes))?,
        )
        .await
    }
    .await;
    let failed = match result {
        Ok(resp) if resp.status() == StatusCode::CREATED => {
            if let Err(e) = fleet.db().finish_operation(operation, "done").await {
                tracing::error!(machine = %row.id, error = %e, "cannot finish the create operation");
            }
            return Ok(());
        }
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    tracing::warn!(machine = %row.id, status = %failed.status(), "create on the node failed; releasing the name and the reservation");
    release_unmade(fleet, std::slice::from_ref(row), &[operation.to_owned()]).await;
    Err(failed)
}

/// Finishes `operations` in `state` (logged when the store refuses).
pub(crate) async fn finish_operations(fleet: &Fleet, operations: &[String], state: &str) {
    for op in operations {
        if let Err(e) = fleet.db().finish_operation(op, state).await {
            tracing::error!(operation = %op, state, error = %e, "cannot finish an operation");
        }
    }
}

/// Fails `operations` and removes the records (and so the reservations) of `rows`, which
/// their node did not make: a create, clones or a restore that failed there (logged: the
/// caller answers the failure that got here).
pub(crate) async fn release_unmade(fleet: &Fleet, rows: &[MachineRow], operations: &[String]) {
    finish_operations(fleet, operations, "failed").await;
    for r in rows {
        if let Err(e) = fleet.db().delete_machine(&r.id).await {
            tracing::error!(machine = %r.id, error = %e, "cannot remove the record of a machine its node did not make");
        }
    }
}

/// The routes of one machine that a node serves as they are (branches make machines the
/// control plane records first, `remotebranch.rs`; checkpoints are not yet on remote nodes).
fn forwarded(tail: &str) -> bool {
    let first = tail.split('/').next().unwrap_or("");
    matches!(
        first,
        "exec" | "files" | "start" | "stop" | "pause" | "resume" | "ports" | "connect"
    )
}

/// A host-routed ingress request (`{port}-{id}.{domain}`, `proxy.rs`) for a machine on a
/// remote node: sent to the node as `/v1/machines/{id}/connect/{port}{path}`, streamed. The
/// request back (`Err`) when the machine is not on a remote node.
pub(crate) async fn by_host(
    fleet: &Fleet,
    tenant: &Tenant,
    id: &str,
    port: u16,
    path: &str,
    mut req: Request,
) -> Result<Response, Request> {
    let Some(remote) = fleet.remote() else {
        return Err(req);
    };
    let placed = fleet.last_known().route(fleet, &tenant.0, id).await;
    let (row, node) = match placed.map(|r| r.and_then(|(row, n)| Some((row, n?)))) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(req),
        Err(e) => return Ok(ApiError::from(e).into_response()),
    };
    let to = format!("/v1/machines/{id}/connect/{port}{path}");
    match to.parse::<Uri>() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => return Ok(unavailable(&node, format!("{to}: {e}")).into_response()),
    }
    // activity for the machine's idle stop, as a one-host ingress request is
    let busy = fleet.busy(&row.engine_name).await;
    Ok(match send(remote, &node, req).await {
        Ok(resp) => hold_until_sent(resp, busy),
        Err(e) => e.into_response(),
    })
}

/// Middleware: a request for a machine on a remote node goes to that node (`DELETE
/// /v1/machines/{id}` and `/v1/machines/{id}/…`); the rest, and every machine of this
/// replica's own engine, goes on to the routes.
pub(crate) async fn divert(State(fleet): State<Fleet>, req: Request, next: Next) -> Response {
    let Some(remote) = fleet.remote().cloned() else {
        return next.run(req).await;
    };
    let Some(rest) = req.uri().path().strip_prefix("/v1/machines/") else {
        return next.run(req).await;
    };
    let (id, tail) = match rest.split_once('/') {
        Some((i, t)) => (i.to_owned(), Some(t.to_owned())),
        None => (rest.to_owned(), None),
    };
    if id.is_empty() || (tail.is_none() && req.method() != Method::DELETE) {
        return next.run(req).await;
    }
    let Some(tenant) = req.extensions().get::<Tenant>().cloned() else {
        return next.run(req).await;
    };
    let placed = fleet.last_known().route(&fleet, &tenant.0, &id).await;
    let (row, node) = match placed.map(|r| r.and_then(|(row, n)| Some((row, n?)))) {
        Ok(Some(p)) => p,
        Ok(None) => return next.run(req).await,
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let (true, Some(t)) = (node.deleting, tail.as_deref()) {
        // deleted while its node was away: nothing but the delete reaches it again, even
        // once the node is back and before the waiting delete has run there
        return ApiError(Error::InvalidState {
            name: row.name.clone(),
            state: "deleting".into(),
            op: format!(
                "{} {t} (its delete waits for node {})",
                req.method(),
                node.id
            ),
        })
        .into_response();
    }
    match tail.as_deref() {
        None => delete(&fleet, &remote, &row, &node, req).await,
        Some(t) if forwarded(t) => {
            let lifecycle = matches!(t, "start" | "stop");
            if !lifecycle {
                // exec, files, connect: activity for the machine's idle stop (the sweeper of
                // this replica stops it on its node), held until the answer's body ends
                let busy = fleet.busy(&row.engine_name).await;
                return match send(&remote, &node, req).await {
                    Ok(resp) => hold_until_sent(resp, busy),
                    Err(e) => e.into_response(),
                };
            }
            match send(&remote, &node, req).await {
                Ok(resp) if lifecycle && resp.status().is_success() => {
                    if t == "stop" && row.ephemeral {
                        // an ephemeral machine is deleted once stopped, as on one host
                        return match fleet.delete_if_ephemeral(&row).await {
                            Ok(_) => {
                                let info = MachineInfo {
                                    id: row.id.clone(),
                                    name: Some(row.name.clone()),
                                    state: "deleted".into(),
                                    ready: Some(false),
                                    ephemeral: true,
                                    ..Default::default()
                                };
                                axum::Json(info).into_response()
                            }
                            Err(e) => ApiError(e).into_response(),
                        };
                    }
                    // the control plane's view of it (its name, labels, lifetimes)
                    match crate::routes::info_of_row(&fleet, &row).await {
                        Ok(info) => axum::Json(info).into_response(),
                        Err(e) => e.into_response(),
                    }
                }
                Ok(resp) => resp,
                Err(e) => e.into_response(),
            }
        }
        // a machine's checkpoints: taken on its node, listed from this replica's records
        Some("checkpoints") if req.method() == Method::POST => {
            crate::remotecheckpoint::create(&fleet, &remote, &row, &node).await
        }
        Some("checkpoints") => next.run(req).await,
        Some(t) => match crate::remotebranch::route_of(t) {
            Some(kind) if req.method() == Method::POST => {
                crate::remotebranch::branch(&fleet, &remote, &row, &node, t, kind, req.into_body())
                    .await
            }
            _ => ApiError(Error::NotSupported {
                message: format!(
                    "{t} of machine {}: not yet for machines on remote nodes (it is on {})",
                    row.id, node.id
                ),
            })
            .into_response(),
        },
    }
}

/// `resp` with `busy` held until its body is sent or dropped (an upgraded connection, `101`:
/// until now; the proxy's relay counts its own activity).
fn hold_until_sent(resp: Response, busy: crate::sweeper::Busy) -> Response {
    use futures::StreamExt as _;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    resp.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &busy;
            chunk
        }))
    })
}

/// `DELETE /v1/machines/{id}` of a machine on `node`: the node deletes it, then its record
/// and reservation go (a machine the node no longer has goes too). A lost node: 503
/// `retryable` (not yet tombstoned).
async fn delete(
    fleet: &Fleet,
    remote: &Remote,
    row: &MachineRow,
    node: &NodeAt,
    req: Request,
) -> Response {
    if node.liveness == "lost" {
        // the node is away: the delete waits for it (a tombstone), the machine reads `deleting`
        if let Err(e) = fleet.db().tombstone(&row.id).await {
            return ApiError::from(e).into_response();
        }
        tracing::info!(machine = %row.id, node = %node.id, "node lost: the delete waits for it");
        return match crate::routes::info_of_row(fleet, row).await {
            Ok(info) => (StatusCode::ACCEPTED, axum::Json(info)).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let resp = match send(remote, node, req).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let status = resp.status();
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_FOUND {
        return resp;
    }
    if let Err(e) = fleet.db().delete_machine(&row.id).await {
        return ApiError::from(e).into_response();
    }
    tracing::info!(machine = %row.id, node = %node.id, "deleted on its node");
    StatusCode::NO_CONTENT.into_response()
}
