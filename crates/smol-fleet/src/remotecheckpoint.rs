//! Checkpoints of machines on remote nodes (issue 15; SPEC §10.5.9 as `checkpoint.rs` serves
//! it on one host).
//!
//! A checkpoint's file stays on the node that took it (it is the machine's RAM and disk: the
//! replica never copies it), and the replica records it with that node (`checkpoints.node_id`,
//! schema 9), so listing a machine's checkpoints reads the replica's rows only and a restore
//! goes back to that node: the restored machine is recorded, linked to its checkpoint and
//! reserved on that node in one transaction ([`crate::Store::reserve_restored`]), then made
//! there under the replica's id, as a branch is (`remotebranch.rs`). A delete removes the row
//! (refused while a machine restored from it exists), then the node's file. The node's fleet
//! records each checkpoint under the id the replica sends in [`ID_HEADER`].

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rusqlite::{Connection, OptionalExtension};
use smolmachines::wire::{CheckpointInfo, CreateMachineBody};
use smolmachines::{Error, ErrorCode};

use crate::db::{new_id, CheckpointRow, MachineRow};
use crate::error::{ApiError, FleetError};
use crate::placement::{Need, Placed};
use crate::remote::{request, send, unavailable, NodeAt, Remote};
use crate::server::Fleet;

type ApiResult<T> = Result<T, ApiError>;

/// Schema version 9: the node that holds a checkpoint's file (none: this server's own).
pub(crate) const SCHEMA_V9: &str = "ALTER TABLE checkpoints ADD COLUMN node_id TEXT;\n";

/// Node `?1` with its API and liveness (as `remote::MACHINE_NODE` reads them).
pub(crate) const NODE_AT: &str = "
SELECT id, api_url,
       CASE WHEN lease_until IS NULL OR lease_until >= {now_ms} THEN 'live'
            WHEN lost_at >= {now_ms} THEN 'suspect'
            ELSE 'lost' END,
       lease_until, lease_until - {now_ms}
  FROM nodes WHERE id = ?1";

/// The header a replica names the checkpoint it asks a node for with.
pub(crate) const ID_HEADER: &str = "x-smol-checkpoint-id";

/// The most a node's JSON answer may hold.
const ANSWER_LIMIT: usize = 1 << 20;

/// Node `id` (SQLite).
pub fn node_at(c: &Connection, id: &str) -> Result<Option<NodeAt>, FleetError> {
    c.query_row(&crate::nodes::sqlite(NODE_AT), [id], |r| {
        Ok(NodeAt {
            id: r.get(0)?,
            api_url: r.get(1)?,
            liveness: r.get(2)?,
            lease_until: r.get(3)?,
            lease_left_ms: r.get(4)?,
            deleting: false,
            placement: None,
        })
    })
    .optional()
    .map_err(|e| FleetError::db("find a node", e))
}

/// The id a checkpoint is recorded under: on a node, the replica's (when it is one of ours,
/// `ckpt-` and hex), else a new one.
pub(crate) fn id_for(fleet: &Fleet, headers: &HeaderMap) -> String {
    let given = headers
        .get(ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            v.strip_prefix("ckpt-").is_some_and(|h| {
                (1..=32).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit())
            })
        });
    match given {
        Some(id) if fleet.on_node() => id.to_string(),
        _ => new_id("ckpt-"),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(Error::coded(ErrorCode::SmolvmError, e.to_string()))
}

/// The node's answer: its status and JSON bytes.
async fn answer(node: &NodeAt, resp: Response) -> ApiResult<(StatusCode, axum::body::Bytes)> {
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), ANSWER_LIMIT)
        .await
        .map_err(|e| unavailable(node, e))?;
    Ok((status, bytes))
}

/// The node's answer again, as it was (status, JSON body).
fn as_is(status: StatusCode, bytes: axum::body::Bytes) -> Response {
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// `POST /v1/machines/{id}/checkpoints` of `row`, a machine on `node`: the node takes it (the
/// file stays there), the replica records it with the node; 201 with the checkpoint. The
/// node's refusal (not branchable, stopped: 409) is answered as it is.
pub(crate) async fn create(
    fleet: &Fleet,
    remote: &Remote,
    row: &MachineRow,
    node: &NodeAt,
) -> Response {
    match create_inner(fleet, remote, row, node).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn create_inner(
    fleet: &Fleet,
    remote: &Remote,
    row: &MachineRow,
    node: &NodeAt,
) -> ApiResult<Response> {
    let ckpt_id = new_id("ckpt-");
    let mut req = request(
        Method::POST,
        &format!("/v1/machines/{}/checkpoints", row.id),
        None,
    )?;
    req.headers_mut().insert(
        ID_HEADER,
        HeaderValue::from_str(&ckpt_id).map_err(internal)?,
    );
    tracing::info!(machine = %row.id, node = %node.id, checkpoint = %ckpt_id, "taking a checkpoint on the machine's node");
    let taken = {
        let _busy = fleet.busy(&row.engine_name).await;
        let resp = send(remote, node, req).await?;
        answer(node, resp).await?
    };
    let (status, bytes) = taken;
    if status != StatusCode::CREATED {
        return Ok(as_is(status, bytes));
    }
    let info: CheckpointInfo = serde_json::from_slice(&bytes)
        .map_err(|e| unavailable(node, format!("an answer not understood: {e}")))?;
    let k = CheckpointRow {
        id: ckpt_id.clone(),
        tenant_id: row.tenant_id.clone(),
        machine_id: row.id.clone(),
        spec: row.spec.clone(),
        status: info.status.clone(),
        size_bytes: info.size_bytes,
        arch: info.arch.clone(),
        created_at: 0,
        node_id: Some(node.id.clone()),
    };
    let stored = match fleet.db().insert_checkpoint(&k).await {
        Ok(s) => s,
        Err(e) => {
            remove_on_node(remote, node, &ckpt_id).await;
            return Err(e.into());
        }
    };
    let mut out = crate::checkpoint::info_of(&stored);
    out.source_pause_ms = info.source_pause_ms;
    out.elapsed_ms = info.elapsed_ms;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `POST /v1/checkpoints/{id}/restore` of checkpoint `k`, whose file is on node `node_id`:
/// `row` (the restored machine, named) recorded, linked and reserved there, then made by the
/// node; 201 with the replica's record.
pub(crate) async fn restore(
    fleet: &Fleet,
    k: &CheckpointRow,
    node_id: &str,
    row: MachineRow,
) -> ApiResult<Response> {
    let remote = fleet
        .remote()
        .ok_or_else(|| internal("a checkpoint on a node, and this server reaches no nodes"))?;
    let node = fleet.db().node_at(node_id).await?.ok_or_else(|| {
        ApiError(Error::coded(
            ErrorCode::InvalidState,
            format!(
                "checkpoint {} is on node {node_id}, which is no longer in the fleet",
                k.id
            ),
        ))
    })?;
    let spec: CreateMachineBody = serde_json::from_str(&row.spec).map_err(internal)?;
    let need = Need::of(&spec);
    let _busy = fleet.busy(&row.id).await;
    let operation = match fleet
        .db()
        .reserve_restored(&row, need, &node.id, &k.id)
        .await?
    {
        Placed::Placed { operation_id, .. } => operation_id,
        Placed::NameTaken => {
            return Err(ApiError(Error::Conflict {
                name: row.name.clone(),
            }))
        }
        Placed::NoCheckpoint => {
            return Err(ApiError(Error::NotFound {
                what: format!("checkpoint {}", k.id),
            }))
        }
        Placed::NoCapacity => {
            return Err(ApiError::retry_later(format!(
                "checkpoint {}'s node {} cannot take a machine of {} MiB and {} vCPUs now \
                 (it is full, cordoned or not live); a checkpoint is restored on the node \
                 that holds it",
                k.id, node.id, need.memory_mib, need.cpus
            )))
        }
    };
    tracing::info!(checkpoint = %k.id, machine = %row.id, node = %node.id, "restoring a checkpoint on its node");
    let body = serde_json::to_vec(&serde_json::json!({ "name": row.id })).map_err(internal)?;
    let made = async {
        let req = request(
            Method::POST,
            &format!("/v1/checkpoints/{}/restore", k.id),
            Some(body),
        )?;
        let resp = send(remote, &node, req).await?;
        answer(&node, resp).await
    }
    .await;
    let failed = match made {
        Ok((StatusCode::CREATED, _)) => None,
        Ok((status, bytes)) => Some(as_is(status, bytes)),
        Err(e) => Some(e.into_response()),
    };
    if let Some(resp) = failed {
        tracing::warn!(checkpoint = %k.id, machine = %row.id, status = %resp.status(), "restore on the node failed; releasing the name and the reservation");
        crate::remote::release_unmade(fleet, std::slice::from_ref(&row), &[operation]).await;
        return Ok(resp);
    }
    if let Err(e) = fleet.db().finish_operation(&operation, "done").await {
        tracing::error!(operation = %operation, error = %e, "cannot finish a restore operation");
    }
    let stored = fleet
        .db()
        .machine(&row.tenant_id, &row.id)
        .await?
        .ok_or_else(|| ApiError::machine_not_found(&row.id))?;
    let info = crate::routes::info_of_row(fleet, &stored).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Removes checkpoint `id`'s file from node `node_id` once its row is gone (a node that does
/// not answer keeps the file: logged, the row decides what exists).
pub(crate) async fn delete(fleet: &Fleet, id: &str, node_id: &str) {
    let Some(remote) = fleet.remote() else {
        tracing::error!(checkpoint = %id, node = %node_id, "a checkpoint on a node, and this server reaches no nodes: its file stays there");
        return;
    };
    match fleet.db().node_at(node_id).await {
        Ok(Some(node)) => remove_on_node(remote, &node, id).await,
        Ok(None) => {
            tracing::warn!(checkpoint = %id, node = %node_id, "the checkpoint's node left the fleet; nothing to remove")
        }
        Err(e) => {
            tracing::error!(checkpoint = %id, node = %node_id, error = %e, "cannot find the checkpoint's node: its file stays there")
        }
    }
}

/// `DELETE /v1/checkpoints/{id}` on `node` (logged when it fails).
async fn remove_on_node(remote: &Remote, node: &NodeAt, id: &str) {
    let sent = async {
        let req = request(Method::DELETE, &format!("/v1/checkpoints/{id}"), None)?;
        let resp = send(remote, node, req).await?;
        answer(node, resp).await
    }
    .await;
    match sent {
        Ok((s, _)) if s == StatusCode::NO_CONTENT || s == StatusCode::NOT_FOUND => {
            tracing::info!(checkpoint = %id, node = %node.id, "checkpoint file removed on its node")
        }
        Ok((s, body)) => {
            tracing::error!(checkpoint = %id, node = %node.id, status = %s, answer = %String::from_utf8_lossy(&body), "the node kept the checkpoint's file")
        }
        Err(e) => {
            tracing::error!(checkpoint = %id, node = %node.id, error = %e.0, "cannot reach the checkpoint's node: its file stays there")
        }
    }
}
