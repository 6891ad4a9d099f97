//! Branches of machines on remote nodes (issue 15: "branch/fork stay on the source's node"):
//! `POST /v1/machines/{id}/branches`, `…/fork`, `…/branches/batch` and `…/fork-batch` of a
//! machine that `remote.rs` placed on a node.
//!
//! A clone runs on its source's node (its RAM is a copy-on-write view of the source's file
//! there), so the replica records it like a create: the clone's row, its reservation on the
//! source's node ([`crate::Store::reserve_on`]: the source's memory and vCPUs, refused 503
//! `retryable` when that node is not ready or full) and its `create` operation, in one
//! transaction, before the node is asked. The node's fleet branches under the ids the replica
//! gave as names (`branch.rs`), so the node's heartbeat reports them and no orphan is made.
//! A node that refuses (a source that is not branchable, paused, stopped; a tmpfs that is
//! full) answers the client as it is, and the records and reservations go; a replica that
//! dies after the commit leaves operations the sweep settles (`operations.rs`: the node has the
//! clone → done, it has not → failed and released).

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use smolmachines::config::validate_name;
use smolmachines::wire::{BranchBatchBody, BranchBatchResponse, BranchBody, CreateMachineBody};
use smolmachines::{Error, ErrorCode};

use crate::branch::clone_row;
use crate::db::MachineRow;
use crate::error::ApiError;
use crate::http::parse_json;
use crate::placement::{Need, Placed};
use crate::remote::{request, send, NodeAt, Remote};
use crate::routes::info_of_row;
use crate::server::{Fleet, JSON_LIMIT};

type ApiResult<T> = Result<T, ApiError>;

/// Which branch route a request is for (`tail`: the path after `/v1/machines/{id}/`).
pub(crate) fn route_of(tail: &str) -> Option<Batch> {
    match tail {
        "branches" | "fork" => Some(Batch::One),
        "branches/batch" | "fork-batch" => Some(Batch::Many),
        _ => None,
    }
}

/// One clone, or a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Batch {
    One,
    Many,
}

/// `POST /v1/machines/{source}/{tail}` of a `source` on `node`: the clones recorded and
/// reserved there, made by the node, answered as the control plane records them.
pub(crate) async fn branch(
    fleet: &Fleet,
    remote: &Remote,
    source: &MachineRow,
    node: &NodeAt,
    tail: &str,
    kind: Batch,
    body: Body,
) -> Response {
    match branch_inner(fleet, remote, source, node, tail, kind, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn branch_inner(
    fleet: &Fleet,
    remote: &Remote,
    source: &MachineRow,
    node: &NodeAt,
    tail: &str,
    kind: Batch,
    body: Body,
) -> ApiResult<Response> {
    let body = read_body(body).await?;
    let spec: CreateMachineBody = serde_json::from_str(&source.spec).map_err(|e| {
        internal(format!(
            "the stored create body of {} does not parse: {e}",
            source.id
        ))
    })?;
    let need = Need::of(&spec);
    // the clones' rows, and the body the node gets: the same request, named by their ids
    let (rows, node_body) = match kind {
        Batch::One => {
            let mut req: BranchBody = parse_json(&body)?;
            validate_name(&req.name)?;
            crate::ingress::check_port_count(req.ports.len())?;
            let opts = req.clone().into_options()?;
            let row = clone_row(fleet, source, &req.name, &opts.ports, opts.branchable)?;
            req.name = row.id.clone();
            (vec![row], to_json(&req)?)
        }
        Batch::Many => {
            let mut req: BranchBatchBody = parse_json(&body)?;
            crate::ingress::check_port_count(req.ports.len())?;
            let opts = req.clone().into_options(&source.name)?;
            let mut rows = Vec::new();
            for n in opts.clone_names()? {
                rows.push(clone_row(fleet, source, &n, &opts.ports, opts.branchable)?);
            }
            req.names = rows.iter().map(|r| r.id.clone()).collect();
            req.count = None;
            req.name_prefix = None;
            (rows, to_json(&req)?)
        }
    };
    // in flight: the sweeper leaves the source and the half-made clones alone
    let _source_busy = fleet.busy(&source.engine_name).await;
    let mut busy = Vec::with_capacity(rows.len());
    for r in &rows {
        busy.push(fleet.busy(&r.id).await);
    }
    // every clone recorded and reserved on the source's node, or none
    let mut operations = Vec::with_capacity(rows.len());
    for r in &rows {
        let on = [node.id.clone()];
        let refused = match fleet.db().reserve_on(r, need, &on).await {
            Ok(Placed::Placed { operation_id, .. }) => {
                operations.push(operation_id);
                continue;
            }
            Ok(Placed::NameTaken) => ApiError(Error::Conflict {
                name: r.name.clone(),
            }),
            Ok(Placed::NoCapacity) => no_room(node, need, rows.len()),
            Ok(Placed::NoCheckpoint) => internal("a branch was reserved as a restore"),
            Err(e) => e.into(),
        };
        crate::remote::release_unmade(fleet, &rows[..operations.len()], &operations).await;
        return Err(refused);
    }
    let path = format!("/v1/machines/{}/{tail}", source.id);
    tracing::info!(source = %source.id, node = %node.id, n = rows.len(), "branching a machine on its node");
    let answer = match request(Method::POST, &path, Some(node_body)) {
        Ok(req) => send(remote, node, req).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(resp) if resp.status() == StatusCode::CREATED => {
            drain(resp, &source.id).await;
            crate::remote::finish_operations(fleet, &operations, "done").await;
        }
        Ok(resp) => {
            tracing::warn!(source = %source.id, node = %node.id, status = %resp.status(), "the node refused the branch; releasing the clones' names and reservations");
            crate::remote::release_unmade(fleet, &rows, &operations).await;
            return Ok(resp);
        }
        Err(e) => {
            tracing::warn!(source = %source.id, node = %node.id, error = %e.0, "branch on the node failed; releasing the clones' names and reservations");
            crate::remote::release_unmade(fleet, &rows, &operations).await;
            return Err(e);
        }
    }
    drop(busy);
    let mut infos = Vec::with_capacity(rows.len());
    for r in &rows {
        let stored = fleet
            .db()
            .machine(&r.tenant_id, &r.id)
            .await?
            .ok_or_else(|| ApiError::machine_not_found(&r.id))?;
        infos.push(info_of_row(fleet, &stored).await?);
    }
    Ok(match kind {
        Batch::One => (StatusCode::CREATED, Json(infos.remove(0))).into_response(),
        Batch::Many => {
            let out = BranchBatchResponse { clones: infos };
            (StatusCode::CREATED, Json(out)).into_response()
        }
    })
}

/// 503 `retryable`: the source's node takes no new machine now.
fn no_room(node: &NodeAt, need: Need, n: usize) -> ApiError {
    ApiError::retry_later(format!(
        "the source's node {} cannot take {n} clone(s) of {} MiB and {} vCPUs now \
         (it is full, cordoned or not live); a clone runs on its source's node",
        node.id, need.memory_mib, need.cpus
    ))
}

/// The request's body, at most [`JSON_LIMIT`] (413 beyond).
async fn read_body(body: Body) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, JSON_LIMIT).await.map_err(|e| {
        let e = e.into_inner();
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            ApiError::too_large("the request body", JSON_LIMIT)
        } else {
            ApiError::malformed(e)
        }
    })
}

fn to_json(v: &impl serde::Serialize) -> ApiResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(internal)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(Error::coded(ErrorCode::SmolvmError, e.to_string()))
}

/// Reads the rest of a node's answer (its connection goes back to the pool).
async fn drain(resp: Response, source: &str) {
    if let Err(e) = axum::body::to_bytes(resp.into_body(), 1 << 20).await {
        tracing::debug!(%source, error = %e, "the node's answer to a branch broke off");
    }
}
