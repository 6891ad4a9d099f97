//! The route handlers of SPEC §10: health, machines CRUD and lifecycle, exec, files.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use smolmachines::config::{generate_name, validate_name};
use smolmachines::wire::{CommandBody, CreateMachineBody, ExecResponse, MachineInfo};
use smolmachines::{Error, ExecOutput, Machine, MachineSummary};

use crate::db::{self, new_id, MachineRow};
use crate::error::ApiError;
use crate::http::{body_bytes, parse_json, query_values};
use crate::server::{Fleet, Tenant, FILE_LIMIT, JSON_LIMIT};

type ApiResult<T> = Result<T, ApiError>;

/// How many generated names are tried before a create gives up (they are random).
const NAME_ATTEMPTS: usize = 8;

/// How long a machine may take to boot into its image (TCG hosts are slow).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// `GET /health` (no key needed): the cluster summary of SPEC §10.5.1.
pub async fn health(State(fleet): State<Fleet>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "apiVersion": 2,
        "version": env!("CARGO_PKG_VERSION"),
        "clusterId": "smolfleet",
        "nodesTotal": 1,
        "nodesReady": 1,
        "uptimeSecs": fleet.uptime_secs(),
    }))
}

/// `GET /livez`.
pub async fn livez() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the database answers.
pub async fn readyz(State(fleet): State<Fleet>) -> ApiResult<Json<serde_json::Value>> {
    fleet.db().call(|c| db::has_tenants(c).map(|_| ())).await?;
    Ok(Json(json!({"status": "ready"})))
}

/// Any other path (authenticated): 404.
pub async fn not_found() -> ApiError {
    ApiError(Error::NotFound {
        what: "route".into(),
    })
}

/// Machine `id` of the request's tenant, or 404.
pub(crate) async fn row_of(fleet: &Fleet, tenant: &Tenant, id: &str) -> ApiResult<MachineRow> {
    let (t, i) = (tenant.0.clone(), id.to_string());
    fleet
        .db()
        .call(move |c| db::machine(c, &t, &i))
        .await?
        .ok_or_else(|| ApiError::machine_not_found(id))
}

/// The create body a row was made from.
fn spec_of(row: &MachineRow) -> Option<CreateMachineBody> {
    match serde_json::from_str(&row.spec) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(machine = %row.id, error = %e, "stored create body does not parse");
            None
        }
    }
}

/// The record of `row` with the engine's view of it (`None`: the engine has no such
/// machine any more, reported as `error`).
fn info_of(row: &MachineRow, summary: Option<&MachineSummary>) -> MachineInfo {
    let spec = spec_of(row);
    let mut info = match summary {
        Some(s) => MachineInfo::from(s),
        None => MachineInfo {
            state: "error".into(),
            ..Default::default()
        },
    };
    info.id = row.id.clone();
    info.name = Some(row.name.clone());
    info.ready = Some(info.state == "running");
    if let Some(spec) = spec {
        info.source = Some(spec.source);
        info.network = spec.network;
        info.env = spec.env;
        info.workdir = spec.workdir;
        info.labels = spec.labels;
    }
    info.ephemeral = false;
    info.capabilities = Some(BTreeMap::from([
        ("exec".to_string(), true),
        ("branch".to_string(), false),
    ]));
    info.created_at = Some(db::rfc3339(row.created_at));
    // the node's own facts stay on the node
    info.persistent = None;
    info.detached = None;
    info.pid = None;
    info.accel = None;
    info
}

/// The engine's summaries by engine name.
async fn summaries(fleet: &Fleet) -> ApiResult<BTreeMap<String, MachineSummary>> {
    let all = Machine::list_on(&**fleet.engine(), &BTreeMap::new()).await?;
    Ok(all.into_iter().map(|s| (s.name.clone(), s)).collect())
}

async fn info_of_row(fleet: &Fleet, row: &MachineRow) -> ApiResult<MachineInfo> {
    let all = summaries(fleet).await?;
    Ok(info_of(row, all.get(&row.engine_name)))
}

/// `POST /v1/machines`: a machine from `source.reference`, created and booted on the node
/// (detached and persistent: it outlives this server); 201 with its record.
pub async fn create_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    let req: CreateMachineBody = parse_json(&body)?;
    if req.source.reference.trim().is_empty() {
        return Err(ApiError::unprocessable(
            "source.reference: a machine needs an image (source {\"type\": \"image\", \"reference\": ...})",
        ));
    }
    for (field, set) in [
        ("autoStopSeconds", req.auto_stop_seconds.is_some()),
        ("ttlSeconds", req.ttl_seconds.is_some()),
    ] {
        if set {
            return Err(ApiError(Error::NotSupported {
                message: format!("{field} is not enforced by this server yet; leave it null"),
            }));
        }
    }
    if let Some(n) = &req.name {
        validate_name(n)?;
    }
    let id = new_id("mach-");
    let mut config = req.clone().into_config(|name| {
        Err(Error::NotSupported {
            message: format!("credential {name:?}: this server has no credential store yet"),
        })
    })?;
    config.name = Some(id.clone());
    // the node picks the host side of each published port (loopback, relayed by the engine)
    for p in config.ports.iter_mut().filter(|p| p.host == 0) {
        p.host = free_port()?;
    }
    config.detach = true;
    config.persistent = true;
    config.ready_timeout = Some(READY_TIMEOUT);
    let spec = serde_json::to_string(&req).map_err(|e| {
        ApiError(Error::coded(
            smolmachines::ErrorCode::SmolvmError,
            e.to_string(),
        ))
    })?;

    // reserve the name first: a duplicate is refused before any engine work
    let mut row = MachineRow {
        id: id.clone(),
        tenant_id: tenant.0.clone(),
        name: String::new(),
        engine_name: id.clone(),
        spec,
        created_at: 0,
    };
    let attempts = if req.name.is_some() { 1 } else { NAME_ATTEMPTS };
    let mut reserved = false;
    for _ in 0..attempts {
        row.name = req.name.clone().unwrap_or_else(generate_name);
        let r = row.clone();
        if fleet.db().call(move |c| db::insert_machine(c, &r)).await? {
            reserved = true;
            break;
        }
    }
    if !reserved {
        return Err(ApiError(Error::Conflict { name: row.name }));
    }
    tracing::info!(machine = %id, name = %row.name, tenant = %tenant.0, image = %req.source.reference, "creating a machine");
    let machine = match Machine::create_on(&**fleet.engine(), config).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(machine = %id, error = %e, "create failed; releasing the name");
            let i = id.clone();
            if let Err(de) = fleet.db().call(move |c| db::delete_machine(c, &i)).await {
                tracing::error!(machine = %id, error = %de, "cannot remove the failed machine's record");
            }
            return Err(ApiError(e));
        }
    };
    fleet.keep(&id, machine).await;
    let created = fleet
        .db()
        .call(move |c| db::machine(c, &row.tenant_id, &row.id))
        .await?
        .ok_or_else(|| ApiError::machine_not_found(&id))?;
    let info = info_of_row(&fleet, &created).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// A host port free on 127.0.0.1 right now (the engine binds it at create; a port taken in
/// between fails the create with the engine's `PortUnavailable`).
fn free_port() -> ApiResult<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| {
        ApiError(Error::Io {
            context: "find a free host port".into(),
            source,
        })
    })?;
    let port = l
        .local_addr()
        .map_err(|source| {
            ApiError(Error::Io {
                context: "find a free host port".into(),
                source,
            })
        })?
        .port();
    Ok(port)
}

/// `GET /v1/machines[?label=k%3Dv…]`: the tenant's machines carrying every label.
pub async fn list_machines(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Vec<MachineInfo>>> {
    let mut want = BTreeMap::new();
    for l in query_values(query.as_deref(), "label") {
        let Some((k, v)) = l.split_once('=') else {
            return Err(ApiError(Error::InvalidConfig {
                message: format!("label filter {l:?} must be key=value"),
            }));
        };
        want.insert(k.to_string(), v.to_string());
    }
    let t = tenant.0.clone();
    let rows = fleet.db().call(move |c| db::machines(c, &t)).await?;
    let all = summaries(&fleet).await?;
    Ok(Json(
        rows.iter()
            .map(|r| info_of(r, all.get(&r.engine_name)))
            .filter(|i| want.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
            .collect(),
    ))
}

/// `GET /v1/machines/{id}`.
pub async fn get_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    let row = row_of(&fleet, &tenant, &id).await?;
    Ok(Json(info_of_row(&fleet, &row).await?))
}

/// `DELETE /v1/machines/{id}`: the VM, its disk and its record; 204.
pub async fn delete_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let row = row_of(&fleet, &tenant, &id).await?;
    match fleet.handle(&row.engine_name).await {
        Ok(m) => m.delete().await?,
        Err(Error::NotFound { .. }) => {
            tracing::warn!(machine = %id, "the node has no such machine; removing its record")
        }
        Err(e) => return Err(ApiError(e)),
    }
    fleet.forget(&row.engine_name).await;
    let i = row.id.clone();
    fleet.db().call(move |c| db::delete_machine(c, &i)).await?;
    tracing::info!(machine = %id, "deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/machines/{id}/start`: boots a stopped machine; returns once its agent answers.
pub async fn start_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    let row = row_of(&fleet, &tenant, &id).await?;
    fleet.running(&row.engine_name).await?;
    Ok(Json(info_of_row(&fleet, &row).await?))
}

/// `POST /v1/machines/{id}/stop`: a clean power-off (the disk stays); idempotent.
pub async fn stop_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    let row = row_of(&fleet, &tenant, &id).await?;
    let m = fleet.handle(&row.engine_name).await?;
    if m.state().await? == smolmachines::MachineState::Running {
        m.stop().await?;
    }
    Ok(Json(info_of_row(&fleet, &row).await?))
}

/// `POST /v1/machines/{id}/exec[?output=text|b64|both]`: runs a command to completion,
/// booting a stopped machine first. A failing command (and a timeout, exit 124) is HTTP 200.
pub async fn exec(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ExecResponse>> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    let output = match query_values(query.as_deref(), "output").last() {
        None => None,
        Some(o) => Some(o.parse::<ExecOutput>()?),
    };
    let row = row_of(&fleet, &tenant, &id).await?;
    let cmd: CommandBody = parse_json(&body)?;
    let user = cmd.user.clone();
    let background = cmd.background;
    let (argv, opts) = cmd.into_exec(output)?;
    let m = fleet.running(&row.engine_name).await?;
    let t0 = Instant::now();
    let r = m.exec(&argv, opts).await?;
    let mut resp = ExecResponse::from_result(&r, output);
    resp.machine_id = Some(row.id);
    resp.duration_ms = Some(t0.elapsed().as_millis() as u64);
    resp.user = user;
    if let (true, Some(pid)) = (background, r.pid) {
        if !resp.stdout.contains("pid=") {
            resp.stdout = format!("pid={pid}\n{}", resp.stdout);
        }
    }
    Ok(Json(resp))
}

/// The guest path of a `files/{path}` suffix: `files//abs` and `files/rel` both name
/// `/abs` / `/rel` (CLOUD-CLIENTS.md §3).
fn guest_path(suffix: &str) -> ApiResult<String> {
    let trimmed = suffix.trim_start_matches('/');
    if trimmed.is_empty() {
        return Err(ApiError(Error::InvalidConfig {
            message: "a file path is required after files/".into(),
        }));
    }
    Ok(format!("/{trimmed}"))
}

/// `PUT /v1/machines/{id}/files/{path}`: writes the raw body (at most 100 MiB); 204.
pub async fn write_file(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path((id, path)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let body = body_bytes(body, "the file", FILE_LIMIT)?;
    let row = row_of(&fleet, &tenant, &id).await?;
    let path = guest_path(&path)?;
    let m = fleet.running(&row.engine_name).await?;
    m.write_file(&path, &body, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/machines/{id}/files/{path}`: the file's raw bytes (413 past 100 MiB).
pub async fn read_file(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let row = row_of(&fleet, &tenant, &id).await?;
    let path = guest_path(&path)?;
    let m = fleet.running(&row.engine_name).await?;
    let data = match m.read_file_stream(&path).await {
        Ok(mut reader) => {
            let mut data = Vec::new();
            while let Some(chunk) = reader.next_chunk().await {
                data.extend_from_slice(&chunk?);
                if data.len() > FILE_LIMIT {
                    // dropping the reader cancels the read in the guest
                    return Err(ApiError::too_large(&path, FILE_LIMIT));
                }
            }
            data
        }
        Err(Error::NotSupported { message }) => {
            tracing::debug!(%message, "streamed read unavailable; reading whole");
            let data = m.read_file(&path).await?;
            if data.len() > FILE_LIMIT {
                return Err(ApiError::too_large(&path, FILE_LIMIT));
            }
            data
        }
        Err(e) => return Err(ApiError(e)),
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}
