//! Portable checkpoints (SPEC §10.5.9): `POST /v1/machines/{id}/checkpoints`, `GET …` (the
//! machine's), `POST /v1/checkpoints/{id}/restore` and `DELETE /v1/checkpoints/{id}`, over the
//! engine's `Machine::checkpoint`, `restore_checkpoint_on` and the fleet's own storage
//! (docs/CHECKPOINTS.md, docs/FLEET.md).
//!
//! A checkpoint is one file, `<home>/checkpoints/<ckpt-id>.smolcheckpoint` (the engine's
//! format), and a row of the tenant in `fleet.db` (source machine, its create body, size, arch,
//! time, status): both outlive the server and the source machine. A restored machine is
//! recorded like a branch clone (the source's create body with its own name, branchable) and
//! linked to its checkpoint, which cannot be deleted while that machine exists.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use smolmachines::config::validate_name;
use smolmachines::wire::{
    CheckpointInfo, CreateMachineBody, NetworkMode, NetworkPolicy, RestoreBody,
};
use smolmachines::{CheckpointOptions, Error, ErrorCode, Machine, RestoreOptions};

use crate::db::{self, new_id, CheckpointDeleted, CheckpointRow, MachineRow, Restored};
use crate::error::ApiError;
use crate::http::{body_bytes, parse_json};
use crate::routes::{info_of_row, row_of};
use crate::server::{Fleet, Tenant, JSON_LIMIT};

type ApiResult<T> = Result<T, ApiError>;

/// The directory of a fleet's checkpoint files.
pub(crate) const DIR: &str = "checkpoints";

/// The status of a checkpoint that can be restored.
const READY: &str = "ready";

/// The file of checkpoint `id` (ids are the server's own `ckpt-` + hex: never a client's path).
fn file_of(fleet: &Fleet, id: &str) -> std::path::PathBuf {
    fleet.home().join(DIR).join(format!("{id}.smolcheckpoint"))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(Error::coded(ErrorCode::SmolvmError, e.to_string()))
}

fn not_found(id: &str) -> ApiError {
    ApiError(Error::NotFound {
        what: format!("checkpoint {id}"),
    })
}

/// The wire form of a stored checkpoint.
pub(crate) fn info_of(k: &CheckpointRow) -> CheckpointInfo {
    CheckpointInfo {
        id: k.id.clone(),
        machine_id: k.machine_id.clone(),
        status: k.status.clone(),
        size_bytes: k.size_bytes,
        arch: k.arch.clone(),
        created_at: db::rfc3339(k.created_at),
        download_url: None,
        reused_bytes: None,
        path: None,
        source_pause_ms: None,
        elapsed_ms: None,
    }
}

/// `POST /v1/machines/{id}/checkpoints`: a checkpoint of the tenant's running (or paused)
/// branchable machine, which keeps running; 201 with the checkpoint (status `ready`). A
/// machine created without `branchable`, or stopped, is 409 (the engine's `INVALID_STATE`).
pub async fn create_checkpoint(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let row = row_of(&fleet, &tenant, &id).await?;
    let dir = fleet.home().join(DIR);
    tokio::fs::create_dir_all(&dir).await.map_err(|source| {
        ApiError(Error::Io {
            context: format!("create the checkpoint directory {}", dir.display()),
            source,
        })
    })?;
    // a node's fleet records it under the replica's id (`remotecheckpoint.rs`)
    let ckpt_id = crate::remotecheckpoint::id_for(&fleet, &headers);
    let path = file_of(&fleet, &ckpt_id);
    tracing::info!(machine = %id, checkpoint = %ckpt_id, "taking a checkpoint");
    let taken = {
        let _busy = fleet.busy(&row.engine_name).await;
        let m = fleet.handle(&row.engine_name).await?;
        m.checkpoint(CheckpointOptions {
            output: Some(path.clone()),
            store: None,
        })
        .await?
    };
    let k = CheckpointRow {
        id: ckpt_id.clone(),
        tenant_id: tenant.0.clone(),
        machine_id: row.id.clone(),
        spec: row.spec.clone(),
        status: READY.into(),
        size_bytes: taken.size_bytes,
        arch: taken.arch.clone(),
        created_at: 0,
        node_id: None,
    };
    let stored = match fleet.db().insert_checkpoint(&k).await {
        Ok(s) => s,
        Err(e) => {
            remove_file(&path).await;
            return Err(e.into());
        }
    };
    tracing::info!(
        machine = %id,
        checkpoint = %ckpt_id,
        size_bytes = taken.size_bytes,
        pause_ms = taken.source_pause_ms.unwrap_or(0),
        "checkpoint stored"
    );
    Ok((StatusCode::CREATED, Json(info_of(&stored))).into_response())
}

/// `GET /v1/machines/{id}/checkpoints`: the checkpoints taken of machine `id` (oldest first),
/// also once the machine is deleted; 404 for an id that is neither a machine of the tenant
/// nor the source of one of its checkpoints.
pub async fn list_checkpoints(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<CheckpointInfo>>> {
    let (t, m) = (tenant.0.clone(), id.clone());
    let rows = fleet.db().checkpoints_of(&t, &m).await?;
    if rows.is_empty() {
        row_of(&fleet, &tenant, &id).await?;
    }
    Ok(Json(rows.iter().map(info_of).collect()))
}

/// The network policy a machine created with `p` has (none given: blocked, as the node's
/// default).
fn effective(p: Option<&NetworkPolicy>) -> NetworkPolicy {
    p.cloned().unwrap_or(NetworkPolicy {
        mode: NetworkMode::Blocked,
        cidrs: Vec::new(),
        hosts: Vec::new(),
    })
}

/// `POST /v1/checkpoints/{id}/restore` `{name, network?}`: a new machine of the tenant from
/// its checkpoint `id`, with the checkpointed memory, processes and disk; 201 with its
/// record. The node restores it live (it answers `running`; the client's `start` is a no-op
/// and its readiness wait passes at once). A taken name is 409, a checkpoint that is not the
/// tenant's 404, a bad name 400; a `network` other than the checkpointed machine's is 501
/// (`NOT_SUPPORTED`: the device state holds its network devices), none keeps it.
pub async fn restore_checkpoint(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    let req: RestoreBody = parse_json(&body)?;
    validate_name(&req.name)?;
    let (t, i) = (tenant.0.clone(), id.clone());
    let k = fleet
        .db()
        .checkpoint(&t, &i)
        .await?
        .ok_or_else(|| not_found(&id))?;
    let mut spec: CreateMachineBody = serde_json::from_str(&k.spec).map_err(|e| {
        internal(format!(
            "the stored create body of checkpoint {id} does not parse: {e}"
        ))
    })?;
    if let Some(v) = req.network {
        let asked: NetworkPolicy = serde_json::from_value(v)
            .map_err(|e| ApiError::unprocessable(format!("network: {e}")))?;
        let had = effective(spec.network.as_ref());
        if effective(Some(&asked)) != had {
            return Err(ApiError(Error::NotSupported {
                message: format!(
                    "checkpoint {id} was taken of a machine with network {:?}; a restored \
                     machine keeps its network devices (omit network, or ask for {:?})",
                    had.mode, had.mode
                ),
            }));
        }
    }
    let name = req.name;
    spec.name = Some(name.clone());
    // a restored machine's RAM is a file of its own: it is branchable
    spec.branchable = Some(true);
    spec.forkable = None;
    // a node's fleet records it under the replica's id, given as its name
    let machine_id = if fleet.on_node() {
        name.clone()
    } else {
        new_id("mach-")
    };
    let row = MachineRow {
        id: machine_id.clone(),
        tenant_id: tenant.0.clone(),
        name: name.clone(),
        engine_name: machine_id.clone(),
        spec: serde_json::to_string(&spec).map_err(internal)?,
        created_at: 0,
        auto_stop_seconds: spec.auto_stop_seconds,
        ttl_seconds: spec.ttl_seconds,
        expires_at: None,
        ephemeral: spec.ephemeral == Some(true),
        last_activity_at: None,
    };
    // a checkpoint on a node is restored there (`remotecheckpoint.rs`)
    if let Some(node_id) = &k.node_id {
        return crate::remotecheckpoint::restore(&fleet, &k, node_id, row).await;
    }
    // in flight until restored: the sweeper leaves the half-made machine alone
    let _busy = fleet.busy(&machine_id).await;
    let (r, ck) = (row.clone(), id.clone());
    match fleet.db().insert_restored(&r, &ck).await? {
        Restored::Reserved => {}
        Restored::NameTaken => return Err(ApiError(Error::Conflict { name })),
        Restored::NoCheckpoint => return Err(not_found(&id)),
    }
    tracing::info!(checkpoint = %id, machine = %machine_id, %name, "restoring a checkpoint");
    let file = file_of(&fleet, &id);
    let restored = Machine::restore_checkpoint_on(
        &**fleet.engine(),
        &file.display().to_string(),
        &machine_id,
        RestoreOptions::default(),
    )
    .await;
    let m = match restored {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(checkpoint = %id, machine = %machine_id, error = %e, "restore failed; releasing the name");
            let i = machine_id.clone();
            if let Err(de) = fleet.db().delete_machine(&i).await {
                tracing::error!(machine = %machine_id, error = %de, "cannot remove the failed restore's record");
            }
            return Err(ApiError(e));
        }
    };
    fleet.keep(&machine_id, m).await;
    let (t, i) = (tenant.0.clone(), machine_id.clone());
    let stored = fleet
        .db()
        .machine(&t, &i)
        .await?
        .ok_or_else(|| ApiError::machine_not_found(&machine_id))?;
    let info = info_of_row(&fleet, &stored).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// `DELETE /v1/checkpoints/{id}`: the row and the file; 204. 404 when it is not the
/// tenant's; 409 (`INVALID_STATE`) while a machine restored from it exists.
pub async fn delete_checkpoint(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let (t, i) = (tenant.0.clone(), id.clone());
    let on_node = match fleet.db().checkpoint(&t, &i).await? {
        Some(k) => k.node_id,
        None => return Err(not_found(&id)),
    };
    match fleet.db().delete_checkpoint(&t, &i).await? {
        CheckpointDeleted::Deleted => {}
        CheckpointDeleted::NotFound => return Err(not_found(&id)),
        CheckpointDeleted::InUse(machines) => {
            return Err(ApiError(Error::coded(
                ErrorCode::InvalidState,
                format!(
                    "checkpoint {id} is in use: machine {} was restored from it (delete {} \
                     first)",
                    machines.join(", "),
                    if machines.len() == 1 { "it" } else { "them" }
                ),
            )))
        }
    }
    match on_node {
        Some(node) => crate::remotecheckpoint::delete(&fleet, &id, &node).await,
        None => remove_file(&file_of(&fleet, &id)).await,
    }
    tracing::info!(checkpoint = %id, "checkpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a checkpoint file whose row is gone (or was never stored); a failure is logged:
/// the row decides what exists.
async fn remove_file(path: &std::path::Path) {
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(file = %path.display(), "checkpoint file already gone")
        }
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot remove a checkpoint file")
        }
    }
}
