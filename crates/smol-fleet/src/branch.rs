//! Pause, resume and branch (SPEC §10.5.2, §10.5.10): `POST /v1/machines/{id}/pause`,
//! `…/resume`, `…/branches` and its legacy twin `…/fork`, over the engine's
//! `Machine::pause`, `resume` and `branch_with` (docs/BRANCH.md).
//!
//! A clone is recorded like a created machine (a row of the tenant, its create body derived
//! from the source's), so get, list, exec, stop, start and delete know it.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use smolmachines::config::validate_name;
use smolmachines::wire::{
    BranchBatchBody, BranchBatchResponse, BranchBody, CreateMachineBody, MachineInfo, PortRequest,
};
use smolmachines::{Error, ErrorCode};

use crate::db::{new_id, MachineRow};
use crate::error::ApiError;
use crate::http::{body_bytes, parse_json};
use crate::routes::{free_port, info_of_row, row_of};
use crate::server::{Fleet, Tenant, JSON_LIMIT};

type ApiResult<T> = Result<T, ApiError>;

/// `POST /v1/machines/{id}/pause`: the machine's vCPUs stop, it keeps its memory; exec and
/// files are 409 (`INVALID_STATE`) until a resume. Pausing a paused machine is a no-op; a
/// stopped one is 409. 200 with the record (state `paused`).
pub async fn pause_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    let row = row_of(&fleet, &tenant, &id).await?;
    {
        let _busy = fleet.busy(&row.engine_name).await;
        fleet.handle(&row.engine_name).await?.pause().await?;
    }
    tracing::info!(machine = %id, "paused");
    Ok(Json(info_of_row(&fleet, &row).await?))
}

/// `POST /v1/machines/{id}/resume`: a paused machine goes on where it was; resuming a
/// running one is a no-op (idempotent), a stopped one is 409. 200 with the record.
pub async fn resume_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    let row = row_of(&fleet, &tenant, &id).await?;
    {
        let _busy = fleet.busy(&row.engine_name).await;
        fleet.handle(&row.engine_name).await?.resume().await?;
    }
    tracing::info!(machine = %id, "resumed");
    Ok(Json(info_of_row(&fleet, &row).await?))
}

/// `POST /v1/machines/{id}/branches`: a running clone of a running, branchable source; 201
/// with the clone's record.
pub async fn branch_machine(
    fleet: State<Fleet>,
    tenant: Extension<Tenant>,
    id: Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    branch(fleet, tenant, id, body).await
}

/// `POST /v1/machines/{id}/fork`: the legacy name of [`branch_machine`] (`forkable` for
/// `branchable`; either is read on either route).
pub async fn fork_machine(
    fleet: State<Fleet>,
    tenant: Extension<Tenant>,
    id: Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    branch(fleet, tenant, id, body).await
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(Error::coded(ErrorCode::SmolvmError, e.to_string()))
}

/// The record of a new clone `name` of `source`: the source's create body with the clone's
/// name, ports (none asked for: the engine publishes the source's guest ports again) and
/// branchability, and the source's lifetimes. Its id is new, except on a node, whose fleet
/// records a clone under the id the control plane gave as its name (`nodeapi.rs`,
/// `remotebranch.rs`).
pub(crate) fn clone_row(
    fleet: &Fleet,
    source: &MachineRow,
    name: &str,
    ports: &[smolmachines::PortSpec],
    branchable: bool,
) -> ApiResult<MachineRow> {
    let mut spec: CreateMachineBody = serde_json::from_str(&source.spec).map_err(|e| {
        internal(format!(
            "the stored create body of {} does not parse: {e}",
            source.id
        ))
    })?;
    spec.name = Some(name.to_string());
    if !ports.is_empty() {
        spec.ports = ports
            .iter()
            .map(|p| PortRequest {
                port: p.guest,
                host_port: None,
            })
            .collect();
    }
    spec.branchable = Some(branchable);
    spec.forkable = None;
    let id = if fleet.on_node() {
        name.to_string()
    } else {
        new_id("mach-")
    };
    Ok(MachineRow {
        id: id.clone(),
        tenant_id: source.tenant_id.clone(),
        name: name.to_string(),
        engine_name: id,
        spec: serde_json::to_string(&spec).map_err(internal)?,
        created_at: 0,
        auto_stop_seconds: source.auto_stop_seconds,
        ttl_seconds: source.ttl_seconds,
        expires_at: None,
        ephemeral: source.ephemeral,
        last_activity_at: None,
    })
}

/// Removes the records of clones that were not made (logged, not returned: the caller
/// answers the failure that got here).
async fn release(fleet: &Fleet, rows: &[MachineRow]) {
    for r in rows {
        let i = r.id.clone();
        if let Err(e) = fleet.db().delete_machine(&i).await {
            tracing::error!(machine = %r.id, error = %e, "cannot remove a clone's record");
        }
    }
}

/// `POST /v1/machines/{id}/branches/batch`: several running clones, all or nothing (a
/// failure deletes the clones made and releases every name); 201 `{"clones": [...]}` in the
/// order of the names.
pub async fn branch_batch(
    fleet: State<Fleet>,
    tenant: Extension<Tenant>,
    id: Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    batch(fleet, tenant, id, body).await
}

/// `POST /v1/machines/{id}/fork-batch`: the legacy name of [`branch_batch`].
pub async fn fork_batch(
    fleet: State<Fleet>,
    tenant: Extension<Tenant>,
    id: Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    batch(fleet, tenant, id, body).await
}

async fn batch(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    let req: BranchBatchBody = parse_json(&body)?;
    crate::ingress::check_port_count(req.ports.len())?;
    let source = row_of(&fleet, &tenant, &id).await?;
    let opts = req.into_options(&source.name)?;
    let names = opts.clone_names()?;
    let mut rows = Vec::with_capacity(names.len());
    for n in &names {
        rows.push(clone_row(&fleet, &source, n, &opts.ports, opts.branchable)?);
    }
    let _source_busy = fleet.busy(&source.engine_name).await;
    let mut busy = Vec::with_capacity(rows.len());
    for r in &rows {
        busy.push(fleet.busy(&r.id).await);
    }
    // every name reserved, or none
    for (i, r) in rows.iter().enumerate() {
        let row = r.clone();
        let stored = fleet.db().insert_machine(&row).await;
        if !matches!(stored, Ok(true)) {
            release(&fleet, &rows[..i]).await;
            return Err(match stored {
                Err(e) => e.into(),
                _ => ApiError(Error::Conflict {
                    name: r.name.clone(),
                }),
            });
        }
    }
    tracing::info!(source = %id, n = rows.len(), freeze_source = opts.freeze_source, "branching a batch");
    let engine_opts = smolmachines::BranchBatchOptions {
        names: rows.iter().map(|r| r.engine_name.clone()).collect(),
        count: None,
        ..opts
    };
    let made = match fleet.handle(&source.engine_name).await {
        Ok(m) => m.branch_batch(engine_opts).await,
        Err(e) => Err(e),
    };
    let clones = match made {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(source = %id, error = %e, "batch failed; releasing its names");
            release(&fleet, &rows).await;
            return Err(ApiError(e));
        }
    };
    for (r, c) in rows.iter().zip(clones) {
        fleet.keep(&r.engine_name, c).await;
    }
    drop(busy);
    let mut out = BranchBatchResponse::default();
    for r in &rows {
        let (t, i) = (tenant.0.clone(), r.id.clone());
        let stored = fleet
            .db()
            .machine(&t, &i)
            .await?
            .ok_or_else(|| ApiError::machine_not_found(&r.id))?;
        out.clones.push(info_of_row(&fleet, &stored).await?);
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// The branch: the body checked (422 schema, 400 a bad name or port, 422 `freezeSource`),
/// the clone's name reserved (409 when taken), the engine's branch (409 for a source that
/// is not branchable, paused or stopped), the clone kept and recorded.
async fn branch(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    let req: BranchBody = parse_json(&body)?;
    validate_name(&req.name)?;
    crate::ingress::check_port_count(req.ports.len())?;
    let name = req.name.clone();
    let mut opts = req.into_options()?;
    // the node picks the host side of each published port, as at create
    for p in opts.ports.iter_mut().filter(|p| p.host == 0) {
        p.host = free_port()?;
    }
    let source = row_of(&fleet, &tenant, &id).await?;

    let row = clone_row(&fleet, &source, &name, &opts.ports, opts.branchable)?;
    let clone_id = row.id.clone();
    // both in flight: the sweeper leaves the source and the half-made clone alone
    let _source_busy = fleet.busy(&source.engine_name).await;
    let _clone_busy = fleet.busy(&clone_id).await;
    let r = row.clone();
    if !fleet.db().insert_machine(&r).await? {
        return Err(ApiError(Error::Conflict { name }));
    }
    tracing::info!(source = %id, machine = %clone_id, %name, branchable = opts.branchable, freeze_source = opts.freeze_source, "branching a machine");
    let made = match fleet.handle(&source.engine_name).await {
        Ok(m) => m.branch_with(&clone_id, opts).await,
        Err(e) => Err(e),
    };
    let clone = match made {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(source = %id, machine = %clone_id, error = %e, "branch failed; releasing the name");
            let i = clone_id.clone();
            if let Err(de) = fleet.db().delete_machine(&i).await {
                tracing::error!(machine = %clone_id, error = %de, "cannot remove the failed clone's record");
            }
            return Err(ApiError(e));
        }
    };
    fleet.keep(&clone_id, clone).await;
    let t = tenant.0.clone();
    let i = clone_id.clone();
    let stored = fleet
        .db()
        .machine(&t, &i)
        .await?
        .ok_or_else(|| ApiError::machine_not_found(&clone_id))?;
    let info = info_of_row(&fleet, &stored).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}
