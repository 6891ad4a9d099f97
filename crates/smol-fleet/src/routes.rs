//! The route handlers of SPEC §10: health, machines CRUD and lifecycle, exec, files.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::json;
use smolmachines::config::{generate_name, validate_name};
use smolmachines::wire::{CommandBody, CreateMachineBody, ExecResponse, MachineInfo};
use smolmachines::{Error, ExecOutput, FileChunks, Machine, MachineSummary};

use crate::db::{self, new_id, MachineRow};
use crate::error::ApiError;
use crate::http::{body_bytes, parse_json, query_values};
use crate::server::{Fleet, Tenant, FILE_LIMIT, JSON_LIMIT};

type ApiResult<T> = Result<T, ApiError>;

/// How many generated names are tried before a create gives up (they are random).
const NAME_ATTEMPTS: usize = 8;

/// How long a machine may take to boot into its image (TCG hosts are slow).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The features `GET /health` advertises (SPEC §10.5.1): what this server's routes do.
pub const FEATURES: &[&str] = &[
    "machine.branch",
    "machine.branch_batch",
    // a branch leaves its source running (the original pauses it)
    "machine.branch_source_continues",
    "machine.fork",
    "machine.pause_resume",
    "machine.portable_checkpoint",
];

/// `GET /health` (no key needed): the cluster summary of SPEC §10.5.1, its nodes (this
/// server's engine and the nodes that joined; ready: live and taking placements), and the
/// features it has. A store that
/// does not answer leaves the node counts out (`status: degraded`); /health still answers.
pub async fn health(State(fleet): State<Fleet>) -> Json<serde_json::Value> {
    let mut h = json!({
        "status": "ok",
        "apiVersion": 2,
        "version": env!("CARGO_PKG_VERSION"),
        "clusterId": "smolfleet",
        "uptimeSecs": fleet.uptime_secs(),
        "features": FEATURES,
    });
    match fleet.db().node_status().await {
        Ok(nodes) => {
            // this server's own engine (machines are created on it today) and the nodes that
            // joined (a named row; an unnamed one is an embedded engine's)
            let joined: Vec<_> = nodes.iter().filter(|n| n.name.is_some()).collect();
            let ready = joined.iter().filter(|n| n.shown_state() == "ready").count();
            h["nodesTotal"] = json!(1 + joined.len());
            h["nodesReady"] = json!(1 + ready);
        }
        Err(e) => {
            tracing::warn!(error = %e, "/health: the store does not answer");
            h["status"] = json!("degraded");
        }
    }
    Json(h)
}

/// `GET /livez`.
pub async fn livez() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the database answers.
pub async fn readyz(State(fleet): State<Fleet>) -> ApiResult<Json<serde_json::Value>> {
    fleet.db().has_tenants().await?;
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
        .machine(&t, &i)
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
    let info = match summary {
        Some(s) => MachineInfo::from(s),
        None => MachineInfo {
            state: "error".into(),
            ..Default::default()
        },
    };
    row_onto(row, info)
}

/// `info` (the engine's or a remote node's view) with the record's facts: its id, name,
/// create body and lifetimes. Not ready unless running; never ready with an `errorReason`.
fn row_onto(row: &MachineRow, mut info: MachineInfo) -> MachineInfo {
    let spec = spec_of(row);
    info.id = row.id.clone();
    info.name = Some(row.name.clone());
    info.ready = Some(info.state == "running" && info.error_reason.is_none());
    if let Some(spec) = spec {
        info.source = Some(spec.source);
        info.network = spec.network;
        info.env = spec.env;
        info.workdir = spec.workdir;
        info.labels = spec.labels;
    }
    info.ephemeral = row.ephemeral;
    info.auto_stop_seconds = row.auto_stop_seconds;
    info.ttl_seconds = row.ttl_seconds;
    // as stored (Fleet::finish_lifetime puts this server's newer activity in)
    info.last_activity_at = row.last_activity_at.map(db::rfc3339);
    info.capabilities = Some(BTreeMap::from([
        ("exec".to_string(), true),
        ("branch".to_string(), info.branchable),
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

pub(crate) async fn info_of_row(fleet: &Fleet, row: &MachineRow) -> ApiResult<MachineInfo> {
    if let Some(remote) = crate::remote::info_of(fleet, row).await? {
        return Ok(finish_remote(fleet, row, remote));
    }
    let all = summaries(fleet).await?;
    let mut info = info_of(row, all.get(&row.engine_name));
    fleet.finish_lifetime(row, &mut info);
    finish_pause(fleet, row, &mut info).await;
    crate::ingress::finish(fleet, row, &mut info).await;
    Ok(info)
}

/// The record of `row` over its remote node's view `remote`: not ready unless the node says
/// so (its published ports answer there); the URL is the fleet's, not the node's.
fn finish_remote(fleet: &Fleet, row: &MachineRow, remote: MachineInfo) -> MachineInfo {
    let node_ready = remote.ready;
    let mut info = row_onto(row, remote);
    if node_ready == Some(false) {
        info.ready = Some(false);
    }
    // the fleet's public URL of its first published port (host-routed through this replica)
    info.url = info
        .ports
        .first()
        .map(|p| fleet.apps().url(p.port, &row.id, fleet.listen_port()));
    fleet.finish_lifetime(row, &mut info);
    info
}

/// A machine this server paused reads `paused` (not ready): the engine's record does not
/// hold a pause, its live handle does.
async fn finish_pause(fleet: &Fleet, row: &MachineRow, info: &mut MachineInfo) {
    if info.state != "running" {
        return;
    }
    let Some(m) = fleet.held(&row.engine_name).await else {
        return;
    };
    match m.state().await {
        Ok(smolmachines::MachineState::Paused) => {
            info.state = "paused".into();
            info.ready = Some(false);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(machine = %row.id, error = %e, "cannot read the machine's state"),
    }
}

/// `POST /v1/machines`: a machine from `source.reference`, created and booted on the node
/// (detached and persistent: it outlives this server); 201 with its record.
pub async fn create_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    crate::sweeper::validate_lifetimes(&body)?;
    let req: CreateMachineBody = parse_json(&body)?;
    if req.source.reference.trim().is_empty() {
        return Err(ApiError::unprocessable(
            "source.reference: a machine needs an image (source {\"type\": \"image\", \"reference\": ...})",
        ));
    }
    // a tenant names registry images only: a local source (`dir:`, `oci:`, `docker-archive:`,
    // a path) would boot a machine over the server host's own files
    // (a path that is not there is refused too: the answer must not tell what exists)
    use smolmachines::image::{ImageError, ImageSource};
    if matches!(
        ImageSource::parse(&req.source.reference),
        Ok(ImageSource::OciLayout { .. }
            | ImageSource::DockerArchive { .. }
            | ImageSource::Dir { .. })
            | Err(ImageError::NotFound { .. })
    ) {
        return Err(ApiError::unprocessable(format!(
            "source.reference {:?}: this server takes registry references only \
             (REGISTRY/REPOSITORY:TAG), not files on its host",
            req.source.reference
        )));
    }
    if let Some(n) = &req.name {
        validate_name(n)?;
    }
    crate::ingress::check_port_count(req.ports.len())?;
    let id = new_id("mach-");
    // the fleet enforces these itself (sweeper.rs); the node's machine has no lifetime
    let mut for_node = req.clone();
    for_node.ephemeral = None;
    for_node.auto_stop_seconds = None;
    for_node.ttl_seconds = None;
    let node_body = for_node.clone();
    let mut config = for_node.into_config(|name| {
        Err(Error::NotSupported {
            message: format!("credential {name:?}: this server has no credential store yet"),
        })
    })?;
    let id = if fleet.on_node() {
        // a node's fleet records the machine under the control plane's id (`nodeapi.rs`)
        req.name.clone().unwrap_or(id)
    } else {
        id
    };
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
        auto_stop_seconds: req.auto_stop_seconds,
        ttl_seconds: req.ttl_seconds,
        expires_at: None,
        ephemeral: req.ephemeral == Some(true),
        last_activity_at: None,
    };
    // in flight until created: the sweeper leaves a half-made machine alone
    let _busy = fleet.busy(&id).await;
    let attempts = if req.name.is_some() { 1 } else { NAME_ATTEMPTS };
    if fleet.remote().is_some() {
        // placed on a remote node (`remote.rs`): reserved in one transaction with the record
        let need = crate::placement::Need::of(&req);
        // `node.KEY` labels: the nodes that carry them (400 when none does)
        let wants = crate::labels::required(&req.labels);
        let among = if wants.is_empty() {
            None
        } else {
            let nodes = fleet.db().node_status().await?;
            match crate::labels::candidates(&nodes, &wants) {
                Ok(ids) => Some(ids),
                Err(never) => {
                    // a node that just joined tells its labels in its first heartbeat: until
                    // then it may be the one asked for, so the answer is "not yet", not "never"
                    let untold = crate::labels::untold(&nodes);
                    if untold.is_empty() {
                        return Err(never.into());
                    }
                    return Err(ApiError::retry_later(format!(
                        "labels: no node has told {} yet, and {} joined without telling its \
                         labels yet (its first heartbeat does): retry in a moment",
                        crate::labels::show(&wants),
                        untold.join(", ")
                    )));
                }
            }
        };
        let mut operation = None;
        for _ in 0..attempts {
            row.name = req.name.clone().unwrap_or_else(generate_name);
            let placed = match &among {
                None => fleet.db().reserve(&row, need).await?,
                Some(nodes) => fleet.db().reserve_on(&row, need, nodes).await?,
            };
            match placed {
                crate::placement::Placed::Placed { operation_id, .. } => {
                    operation = Some(operation_id);
                    break;
                }
                crate::placement::Placed::NameTaken => continue,
                crate::placement::Placed::NoCheckpoint => {
                    return Err(ApiError(Error::coded(
                        smolmachines::ErrorCode::SmolvmError,
                        "a create was reserved as a restore",
                    )))
                }
                crate::placement::Placed::NoCapacity => {
                    return Err(ApiError::retry_later(format!(
                        "no ready node{} has room for {} MiB and {} vCPUs",
                        if wants.is_empty() {
                            String::new()
                        } else {
                            format!(" labelled {}", crate::labels::show(&wants))
                        },
                        need.memory_mib,
                        need.cpus
                    )))
                }
            }
        }
        let Some(operation) = operation else {
            return Err(ApiError(Error::Conflict { name: row.name }));
        };
        if let Err(resp) = crate::remote::create_on_node(&fleet, &row, &operation, node_body).await
        {
            return Ok(resp);
        }
        let created = fleet
            .db()
            .machine(&row.tenant_id, &row.id)
            .await?
            .ok_or_else(|| ApiError::machine_not_found(&id))?;
        let info = info_of_row(&fleet, &created).await?;
        return Ok((StatusCode::CREATED, Json(info)).into_response());
    }
    // one host: its engine is the only node, labelled with its `arch` only (a node's own
    // fleet takes what the control plane placed on it by the node's labels)
    let wants = crate::labels::required(&req.labels);
    let host = crate::labels::of_host(&[]).unwrap_or_default();
    if !fleet.on_node() && !crate::labels::meets(&host, &wants) {
        return Err(ApiError(Error::InvalidConfig {
            message: format!(
                "labels: this server's one node is labelled {}, not {} (`node.KEY` labels \
                 ask for node labels; nodes with labels of their own join a multi-host fleet)",
                crate::labels::show(&host),
                crate::labels::show(&wants)
            ),
        }));
    }
    let mut reserved = false;
    for _ in 0..attempts {
        row.name = req.name.clone().unwrap_or_else(generate_name);
        let r = row.clone();
        if fleet.db().insert_machine(&r).await? {
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
            if let Err(de) = fleet.db().delete_machine(&i).await {
                tracing::error!(machine = %id, error = %de, "cannot remove the failed machine's record");
            }
            return Err(ApiError(e));
        }
    };
    fleet.keep(&id, machine).await;
    let created = fleet
        .db()
        .machine(&row.tenant_id, &row.id)
        .await?
        .ok_or_else(|| ApiError::machine_not_found(&id))?;
    let info = info_of_row(&fleet, &created).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// A host port free on 127.0.0.1 right now (the engine binds it at create; a port taken in
/// between fails the create with the engine's `PortUnavailable`).
pub(crate) fn free_port() -> ApiResult<u16> {
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
    let rows = fleet.db().machines(&t).await?;
    let all = summaries(&fleet).await?;
    let mut out = Vec::new();
    for r in &rows {
        if let Some(remote) = crate::remote::info_of(&fleet, r).await? {
            let info = finish_remote(&fleet, r, remote);
            if want.iter().all(|(k, v)| info.labels.get(k) == Some(v)) {
                out.push(info);
            }
            continue;
        }
        let mut info = info_of(r, all.get(&r.engine_name));
        fleet.finish_lifetime(r, &mut info);
        finish_pause(&fleet, r, &mut info).await;
        if want.iter().all(|(k, v)| info.labels.get(k) == Some(v)) {
            crate::ingress::finish(&fleet, r, &mut info).await;
            out.push(info);
        }
    }
    Ok(Json(out))
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
    fleet.destroy(&row).await?;
    tracing::info!(machine = %id, "deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/machines/{id}/start[?forkable=true]`: boots a stopped machine; returns once its
/// agent answers. Branchability is a create-time property (the published client sends
/// `forkable` in the create body too): a machine created branchable boots as a branch source
/// whatever the query says, and `forkable=true` does not make another one branchable (its
/// branches are 409, as on the published server). A `forkable` that is not a boolean is 400.
pub async fn start_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<MachineInfo>> {
    let forkable = match query_values(query.as_deref(), "forkable")
        .last()
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError(Error::InvalidConfig {
                message: format!("forkable={other:?}: true or false"),
            }))
        }
    };
    let row = row_of(&fleet, &tenant, &id).await?;
    if forkable && spec_of(&row).is_none_or(|s| s.branchable.or(s.forkable) != Some(true)) {
        tracing::info!(machine = %id, "start?forkable=true of a machine created without forkable: it cannot be branched");
    }
    fleet.running(&row.engine_name).await?;
    // a started machine's idle clock starts now
    fleet.touch(&row.engine_name);
    Ok(Json(info_of_row(&fleet, &row).await?))
}

/// `POST /v1/machines/{id}/stop`: a clean power-off (the disk stays); idempotent. An
/// ephemeral machine is deleted once stopped (its record comes back as `deleted`).
pub async fn stop_machine(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    let row = row_of(&fleet, &tenant, &id).await?;
    let m = fleet.handle(&row.engine_name).await?;
    if matches!(
        m.state().await?,
        smolmachines::MachineState::Running | smolmachines::MachineState::Paused
    ) {
        m.stop().await?;
    }
    if fleet.delete_if_ephemeral(&row).await? {
        let mut info = info_of(&row, None);
        info.state = "deleted".into();
        info.ready = Some(false);
        return Ok(Json(info));
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
    let _busy = fleet.busy(&row.engine_name).await;
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

/// `PUT /v1/machines/{id}/files/{path}`: streams the raw body into the guest file as it
/// arrives (the server holds a chunk at a time, not the file); 204. A body over 100 MiB is 413
/// (refused from its `content-length`, or once the bytes read pass the limit: the write is
/// cancelled and the guest keeps the old content).
pub async fn write_file(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path((id, path)): Path<(String, String)>,
    body: Body,
) -> ApiResult<StatusCode> {
    let row = row_of(&fleet, &tenant, &id).await?;
    let path = guest_path(&path)?;
    let _busy = fleet.busy(&row.engine_name).await;
    let m = fleet.running(&row.engine_name).await?;
    m.write_file_stream(&path, upload_chunks(body, &path), None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The chunks of an upload, failing with the 413 problem once they pass [`FILE_LIMIT`] and
/// with `Connection` when the client's body breaks off.
fn upload_chunks(body: Body, path: &str) -> FileChunks {
    let path = path.to_string();
    let mut total = 0usize;
    body.into_data_stream()
        .map(move |chunk| match chunk {
            Ok(b) => {
                total += b.len();
                if total > FILE_LIMIT {
                    tracing::debug!(%path, "upload over the limit: cancelled");
                    Err(ApiError::too_large("the file", FILE_LIMIT).0)
                } else {
                    Ok(Vec::from(b))
                }
            }
            Err(e) => Err(Error::Connection {
                message: format!("the upload of {path} broke off: {e}"),
            }),
        })
        .boxed()
}

/// How long the size probe of a download may take.
const SIZE_PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The size of the guest file `path` (symlinks followed) by `stat` in the guest, or `None`
/// when the guest cannot tell (no `stat` in its image, not a file: the read says why).
async fn guest_size(m: &Machine, path: &str) -> Option<u64> {
    let argv = ["stat", "-L", "-c", "%s", "--", path].map(String::from);
    let opts = smolmachines::ExecOptions {
        timeout: Some(SIZE_PROBE_TIMEOUT),
        ..Default::default()
    };
    match m.exec(&argv, opts).await {
        Ok(r) if r.exit_code == 0 => r.stdout.trim().parse().ok(),
        Ok(r) => {
            tracing::debug!(%path, exit = r.exit_code, stderr = %r.stderr.trim(), "no size from stat");
            None
        }
        Err(e) => {
            tracing::debug!(%path, error = %e, "no size from stat");
            None
        }
    }
}

/// `GET /v1/machines/{id}/files/{path}`: the file's raw bytes, streamed from the guest as the
/// client takes them. What fails before the first byte (no such file: 404; over 100 MiB by
/// its size: 413) is a problem; a file that grows past the limit while sent is cut off there
/// (the response ends without its last chunk, so the client sees a broken body).
pub async fn read_file(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let row = row_of(&fleet, &tenant, &id).await?;
    let path = guest_path(&path)?;
    let busy = fleet.busy(&row.engine_name).await;
    let m = fleet.running(&row.engine_name).await?;
    let mut reader = match m.read_file_stream(&path).await {
        Ok(reader) => reader,
        Err(Error::NotSupported { message }) => {
            tracing::debug!(%message, "streamed read unavailable; reading whole");
            let data = m.read_file(&path).await?;
            if data.len() > FILE_LIMIT {
                return Err(ApiError::too_large(&path, FILE_LIMIT));
            }
            return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response());
        }
        Err(e) => return Err(ApiError(e)),
    };
    // the first chunk says whether the file can be read at all; the size, whether it fits
    let (first, size) = tokio::join!(reader.next_chunk(), guest_size(&m, &path));
    let first = first.transpose()?;
    if size.is_some_and(|n| n > FILE_LIMIT as u64) {
        // dropping the reader cancels the read in the guest
        return Err(ApiError::too_large(&path, FILE_LIMIT));
    }
    let mut sent = 0usize;
    let chunks = futures::stream::iter(first.map(Ok))
        .chain(futures::stream::unfold(reader, |mut r| async move {
            r.next_chunk().await.map(|c| (c, r))
        }))
        .map(move |chunk| {
            // the machine is busy until the body is sent (or dropped)
            let _busy = &busy;
            let chunk = chunk?;
            sent += chunk.len();
            if sent > FILE_LIMIT {
                tracing::warn!(%path, "the file grew past the limit while sent: cut off");
                return Err(ApiError::too_large(&path, FILE_LIMIT).0);
            }
            Ok(Bytes::from(chunk))
        });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(chunks),
    )
        .into_response())
}
