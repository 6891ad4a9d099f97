//! [`CloudMachine`]: one machine of a smolfleet server, driven over `/v1` (SPEC §10.5).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::http::{encode_path, encode_segment, Client, Req, FILE_LIMIT, LONG_TIMEOUT};
use crate::backend::{ExecStream, MachineBackend};
use crate::config::{ExecOptions, ExecResult, MachineState, PortEndpoint, PortSpec, Target};
use crate::error::{Error, ErrorCode, Result};
use crate::wire::{BranchBody, BranchRoute, CommandBody, ExecResponse, MachineInfo, SetPortsBody};

/// How often readiness polls at most (SPEC §9.4: every second; the first polls come sooner).
const POLL_MAX: Duration = Duration::from_secs(1);
/// The first poll interval.
const POLL_FIRST: Duration = Duration::from_millis(100);
/// Step 6 of §9.4: a running machine without ports, this long after the start, is probed.
const PROBE_AFTER: Duration = Duration::from_secs(2);
/// The deadline of that probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// The core state of a cloud state string (SPEC §10.6): `creating` is created, `started` and
/// `running` running, `pausing` / `paused` paused, `frozen` frozen (a frozen branch base),
/// `stopped` / `error` stopped.
pub(crate) fn state_of(s: &str) -> Result<MachineState> {
    Ok(match s {
        "creating" | "created" => MachineState::Created,
        "started" | "running" => MachineState::Running,
        "pausing" | "paused" => MachineState::Paused,
        "frozen" => MachineState::Frozen,
        "stopped" | "stopping" | "error" => MachineState::Stopped,
        "deleted" | "deleting" => MachineState::Deleted,
        other => {
            return Err(Error::coded(
                ErrorCode::SmolvmError,
                format!(
                    "the cloud reported machine state {other:?}, which this client does not know"
                ),
            ))
        }
    })
}

/// The URL of published port `port` (SPEC §4.7, CLOUD-CLIENTS.md §3 `endpoint`): no trailing
/// slash for an empty path or `/`.
pub(crate) fn connect_url(base: &str, id: &str, port: u16, path: Option<&str>) -> String {
    let mut url = format!("{base}/v1/machines/{}/connect/{port}", encode_segment(id));
    match path {
        None | Some("") | Some("/") => {}
        Some(p) => {
            if !p.starts_with('/') {
                url.push('/');
            }
            url.push_str(p);
        }
    }
    url
}

/// The HTTP deadline of an exec (SPEC §9.3): `max(30 s, timeout + 30 s)`, else 30 s.
pub(crate) fn exec_deadline(timeout: Option<Duration>) -> Duration {
    let base = Duration::from_secs(30);
    match timeout {
        Some(t) => crate::config::cap_wait(t).saturating_add(base).max(base),
        None => base,
    }
}

/// The `POST …/exec[?output=]` request of `argv` with `opts`.
pub(crate) fn exec_request(id: &str, argv: &[String], opts: &ExecOptions) -> Result<Req> {
    let body = CommandBody::new(argv, opts)?;
    let mut path = format!("/v1/machines/{}/exec", encode_segment(id));
    if let Some(o) = opts.output {
        path.push_str("?output=");
        path.push_str(o.as_str());
    }
    Ok(Req::post(path)
        .json(&body)
        .timeout(exec_deadline(opts.timeout)))
}

/// The branch requests of clone `name` of machine `id`: `POST …/branches`, then the legacy
/// `POST …/fork` the client falls back to on 404 (long deadlines: the server may queue
/// branches of one source; never retried, as a create).
pub(crate) fn branch_requests(
    id: &str,
    name: &str,
    opts: &crate::config::BranchOptions,
) -> (Req, Req) {
    let req = |route: BranchRoute| {
        Req::post(route.path(&encode_segment(id)))
            .json(&BranchBody::new(route, name, opts))
            .timeout(LONG_TIMEOUT)
    };
    (req(BranchRoute::Branches), req(BranchRoute::Fork))
}

/// `PUT /v1/machines/{id}/files/{path}` (each segment encoded; an absolute path gives
/// `files//…`).
pub(crate) fn file_path(id: &str, path: &str) -> String {
    format!(
        "/v1/machines/{}/files/{}",
        encode_segment(id),
        encode_path(path)
    )
}

/// The deadline of moving `bytes` bytes (SPEC §9.3): 30 s + 1 s per 256 KiB.
pub(crate) fn file_deadline(bytes: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_secs_f64(bytes as f64 / (256.0 * 1024.0))
}

/// One machine of a fleet server.
pub struct CloudMachine {
    client: Arc<Client>,
    id: String,
    name: String,
    /// The last record read (for the synchronous `url()` and `ports()`).
    info: Mutex<MachineInfo>,
    /// Users the server echoed (SPEC §9.7).
    users: Mutex<BTreeSet<String>>,
    deleted: AtomicBool,
}

impl std::fmt::Debug for CloudMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudMachine")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("client", &self.client)
            .finish()
    }
}

impl CloudMachine {
    pub(crate) fn new(client: Arc<Client>, info: MachineInfo) -> CloudMachine {
        CloudMachine {
            client,
            id: info.id.clone(),
            name: info.name.clone().unwrap_or_else(|| info.id.clone()),
            info: Mutex::new(info),
            users: Mutex::new(BTreeSet::new()),
            deleted: AtomicBool::new(false),
        }
    }

    /// The server's id (`mach-…`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The last record read from the server.
    pub fn info(&self) -> MachineInfo {
        self.cached().clone()
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, MachineInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self) -> String {
        format!("/v1/machines/{}", encode_segment(&self.id))
    }

    /// `GET /v1/machines/{id}`, kept for `url()` and `ports()`.
    pub(crate) async fn fetch(&self) -> Result<MachineInfo> {
        let info: MachineInfo = self.client.json(&Req::get(self.path())).await?;
        *self.cached() = info.clone();
        Ok(info)
    }

    /// `POST …/start[?forkable=true]` (long deadline, idempotent; `forkable` for a branch
    /// source, as the published client sends it); its body is not needed.
    pub(crate) async fn start_request(&self, forkable: bool) -> Result<()> {
        let query = if forkable { "?forkable=true" } else { "" };
        let req = Req::post(format!("{}/start{query}", self.path()))
            .timeout(LONG_TIMEOUT)
            .idempotent();
        self.client.empty(&req).await
    }

    /// `POST …/branches` with the clone's body, on 404 `POST …/fork` (SPEC §10.5.10), then
    /// the clone's readiness; a clone that does not get ready is deleted.
    async fn branch_clone(
        &self,
        name: &str,
        opts: &crate::config::BranchOptions,
    ) -> Result<CloudMachine> {
        let (first, legacy) = branch_requests(&self.id, name, opts);
        let info: MachineInfo = match self.client.json(&first).await {
            Err(e) if e.code() == ErrorCode::NotFound => {
                tracing::debug!(machine = %self.id, error = %e, "no branches route; trying the legacy fork route");
                self.client.json(&legacy).await?
            }
            other => other?,
        };
        if info.id.is_empty() {
            return Err(Error::coded(
                ErrorCode::SmolvmError,
                format!("{} → 201: the clone's record has no id", first.what()),
            ));
        }
        let clone = CloudMachine::new(self.client.clone(), info);
        let guard = DeleteGuard::new(&clone);
        match clone.wait_ready(super::DEFAULT_READY_TIMEOUT, true).await {
            Ok(()) => {
                guard.disarm();
                Ok(clone)
            }
            Err(e) => {
                guard.delete_now().await;
                Err(e)
            }
        }
    }

    /// Waits for readiness (SPEC §9.4). With `wait_for_ports` false: until
    /// `/bin/sh -c true` exits 0, every 0.2 s.
    pub(crate) async fn wait_ready(&self, timeout: Duration, wait_for_ports: bool) -> Result<()> {
        let started = Instant::now();
        let deadline = started
            .checked_add(timeout)
            .unwrap_or_else(|| started + crate::config::MAX_WAIT);
        let not_ready = |state: &str| Error::Timeout {
            what: format!(
                "machine {} not ready after {}s (state={state})",
                self.name,
                timeout.as_secs()
            ),
        };
        if !wait_for_ports {
            return self.wait_exec(deadline, not_ready).await;
        }
        let mut interval = POLL_FIRST;
        let mut last_state = "unknown".to_string();
        loop {
            match self.fetch().await {
                Err(e) if matches!(e.code(), ErrorCode::Unauthorized | ErrorCode::NotFound) => {
                    return Err(e)
                }
                Err(e) => tracing::debug!(machine = %self.id, error = %e, "readiness poll failed"),
                Ok(info) => {
                    last_state = info.state.clone();
                    if info.ready == Some(true) {
                        return Ok(());
                    }
                    match info.state.as_str() {
                        "error" => {
                            return Err(Error::coded(
                                ErrorCode::SmolvmError,
                                format!("machine {} entered error state while starting", self.name),
                            ))
                        }
                        s @ ("stopped" | "deleted") => {
                            return Err(Error::coded(
                                ErrorCode::SmolvmError,
                                format!("machine {} entered {s} before becoming ready", self.name),
                            ))
                        }
                        "started" | "running" if info.ready.is_none() => return Ok(()),
                        "started" | "running"
                            if info.ports.is_empty()
                                && started.elapsed() >= PROBE_AFTER
                                && self.probe().await =>
                        {
                            return Ok(())
                        }
                        _ => {}
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(not_ready(&last_state));
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 2).min(POLL_MAX);
        }
    }

    /// Step 6 of §9.4: `sh -c true` answers within 15 s.
    async fn probe(&self) -> bool {
        let argv = ["sh".to_string(), "-c".into(), "true".into()];
        let req = match exec_request(&self.id, &argv, &ExecOptions::default()) {
            Ok(r) => r.timeout(PROBE_TIMEOUT),
            Err(_) => return false,
        };
        match self.client.json::<ExecResponse>(&req).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(machine = %self.id, error = %e, "readiness probe failed");
                false
            }
        }
    }

    async fn wait_exec(&self, deadline: Instant, not_ready: impl Fn(&str) -> Error) -> Result<()> {
        let argv = ["/bin/sh".to_string(), "-c".into(), "true".into()];
        let opts = ExecOptions {
            timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        loop {
            match self.exec(&argv, &opts).await {
                Ok(r) if r.exit_code == 0 => return Ok(()),
                Ok(r) => tracing::debug!(machine = %self.id, exit = r.exit_code, "probe exit"),
                Err(e) if matches!(e.code(), ErrorCode::Unauthorized | ErrorCode::NotFound) => {
                    return Err(e)
                }
                Err(e) => tracing::debug!(machine = %self.id, error = %e, "probe failed"),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(not_ready("unknown"));
            }
            tokio::time::sleep(Duration::from_millis(200).min(deadline - now)).await;
        }
    }

    /// Checks once per user that the server honours a per-command user (SPEC §9.7).
    async fn verify_user(&self, user: &str) -> Result<()> {
        if self
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(user)
        {
            return Ok(());
        }
        let opts = ExecOptions {
            timeout: Some(Duration::from_secs(30)),
            user: Some(user.to_string()),
            ..Default::default()
        };
        let req = exec_request(&self.id, &["true".to_string()], &opts)?;
        let resp: ExecResponse = self.client.json(&req).await?;
        check_user_echo(user, resp.user.as_deref())?;
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_string());
        Ok(())
    }

    fn published(&self) -> Vec<PortSpec> {
        self.cached()
            .ports
            .iter()
            .filter(|p| p.protocol == "tcp")
            .map(|p| PortSpec {
                host: p.host_port.unwrap_or(0),
                guest: p.port,
            })
            .collect()
    }

    async fn set_ports(&self, ports: &[PortSpec]) -> Result<()> {
        let req = Req::put(format!("{}/ports", self.path())).json(&SetPortsBody::from(ports));
        self.client.empty(&req).await?;
        self.fetch().await.map(drop)
    }
}

fn check_user_echo(user: &str, echoed: Option<&str>) -> Result<()> {
    if echoed == Some(user) {
        Ok(())
    } else {
        Err(Error::NotSupported {
            message: format!(
                "this cloud server does not run commands as another user (it did not echo \
                 user {user:?}); leave ExecOptions.user unset"
            ),
        })
    }
}

/// Deletes a half-created machine unless disarmed (SPEC §9.5): at once with
/// [`DeleteGuard::delete_now`], or from a task when the create future is dropped.
pub(crate) struct DeleteGuard {
    armed: Option<(Arc<Client>, String)>,
}

impl DeleteGuard {
    pub fn new(m: &CloudMachine) -> DeleteGuard {
        DeleteGuard {
            armed: Some((m.client.clone(), m.id.clone())),
        }
    }

    pub fn disarm(mut self) {
        self.armed = None;
    }

    pub async fn delete_now(mut self) {
        if let Some((client, id)) = self.armed.take() {
            delete_quietly(&client, &id).await;
        }
    }
}

async fn delete_quietly(client: &Client, id: &str) {
    let req = Req::delete(format!("/v1/machines/{}", encode_segment(id)));
    match client.empty(&req).await {
        Ok(()) => tracing::debug!(machine = id, "half-created cloud machine deleted"),
        Err(e) => {
            tracing::warn!(machine = id, error = %e, "half-created cloud machine not deleted")
        }
    }
}

impl Drop for DeleteGuard {
    fn drop(&mut self) {
        let Some((client, id)) = self.armed.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move { delete_quietly(&client, &id).await });
            }
            Err(_) => tracing::warn!(
                machine = %id,
                "create abandoned outside a runtime: the cloud machine was not deleted"
            ),
        }
    }
}

#[async_trait::async_trait]
impl MachineBackend for CloudMachine {
    fn name(&self) -> &str {
        &self.name
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn target(&self) -> Target {
        Target::Cloud
    }

    async fn state(&self) -> Result<MachineState> {
        if self.deleted.load(Ordering::Acquire) {
            return Ok(MachineState::Deleted);
        }
        state_of(&self.fetch().await?.state)
    }

    async fn ready(&self) -> Result<bool> {
        if self.deleted.load(Ordering::Acquire) {
            return Ok(false);
        }
        let info = self.fetch().await?;
        Ok(match info.ready {
            Some(r) => r,
            None => state_of(&info.state)? == MachineState::Running,
        })
    }

    async fn exec(&self, argv: &[String], opts: &ExecOptions) -> Result<ExecResult> {
        if let Some(u) = &opts.user {
            self.verify_user(u).await?;
        }
        let req = exec_request(&self.id, argv, opts)?;
        let resp: ExecResponse = self.client.json(&req).await?;
        if let Some(u) = &opts.user {
            check_user_echo(u, resp.user.as_deref())?;
        }
        Ok(resp.into_result(opts.background))
    }

    async fn exec_stream(&self, argv: &[String], opts: &ExecOptions) -> Result<ExecStream> {
        if let Some(u) = &opts.user {
            self.verify_user(u).await?;
        }
        super::stream::exec_stream(&self.client, &self.id, argv, opts).await
    }

    async fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        if data.len() > FILE_LIMIT {
            return Err(over_limit(path, data.len()));
        }
        let req = Req::put(file_path(&self.id, path))
            .raw(data.to_vec())
            .timeout(file_deadline(data.len()));
        self.client.empty(&req).await?;
        if let Some(m) = mode {
            let argv = ["chmod".to_string(), format!("{m:o}"), path.to_string()];
            let r = self.exec(&argv, &ExecOptions::default()).await?;
            if r.exit_code != 0 {
                return Err(Error::Guest {
                    message: format!("chmod {m:o} {path} failed: {}", r.stderr.trim()),
                });
            }
        }
        Ok(())
    }

    /// Collects the chunks (the published client sends a file as one body with its length)
    /// and stops at the cloud's limit: memory holds at most [`FILE_LIMIT`] bytes.
    async fn write_file_stream(
        &self,
        path: &str,
        mut chunks: crate::FileChunks,
        mode: Option<u32>,
    ) -> Result<()> {
        use futures::StreamExt;
        let mut data = Vec::new();
        while let Some(chunk) = chunks.next().await {
            data.extend_from_slice(&chunk?);
            if data.len() > FILE_LIMIT {
                return Err(over_limit(path, data.len()));
            }
        }
        self.write_file(path, &data, mode).await
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let req = Req::get(file_path(&self.id, path)).timeout(file_deadline(FILE_LIMIT));
        self.client.bytes(&req, FILE_LIMIT).await
    }

    async fn read_file_stream(&self, path: &str) -> Result<crate::FileReader> {
        super::stream::read_file_stream(&self.client, &file_path(&self.id, path)).await
    }

    async fn start(&self) -> Result<()> {
        self.start_request(false).await?;
        self.wait_ready(super::DEFAULT_READY_TIMEOUT, true).await
    }

    /// `POST …/pause` (long deadline: a cloud pause saves the machine's memory).
    async fn pause(&self) -> Result<()> {
        let req = Req::post(format!("{}/pause", self.path())).timeout(LONG_TIMEOUT);
        self.client.empty(&req).await
    }

    /// `POST …/resume` (idempotent), then readiness (SPEC §9.4).
    async fn resume(&self) -> Result<()> {
        let req = Req::post(format!("{}/resume", self.path()))
            .timeout(LONG_TIMEOUT)
            .idempotent();
        self.client.empty(&req).await?;
        self.wait_ready(super::DEFAULT_READY_TIMEOUT, true).await
    }

    async fn branch(
        &self,
        name: &str,
        opts: &crate::config::BranchOptions,
    ) -> Result<Arc<dyn MachineBackend>> {
        Ok(Arc::new(self.branch_clone(name, opts).await?))
    }

    /// `POST …/checkpoints` (`output` / `store` were refused by [`crate::Machine`]).
    async fn checkpoint(
        &self,
        _opts: &crate::config::CheckpointOptions,
    ) -> Result<crate::wire::CheckpointInfo> {
        self.client
            .json(&super::checkpoint::create_request(&self.id))
            .await
    }

    /// `GET …/checkpoints`.
    async fn checkpoints(&self) -> Result<Vec<crate::wire::CheckpointInfo>> {
        self.client
            .json(&super::checkpoint::list_request(&self.id))
            .await
    }

    async fn stop(&self) -> Result<()> {
        let req = Req::post(format!("{}/stop", self.path()))
            .timeout(LONG_TIMEOUT)
            .idempotent();
        self.client.empty(&req).await
    }

    async fn delete(&self) -> Result<()> {
        self.client.empty(&Req::delete(self.path())).await?;
        self.deleted.store(true, Ordering::Release);
        Ok(())
    }

    fn url(&self) -> Option<String> {
        self.cached().url.clone()
    }

    fn endpoint(&self, guest_port: u16, path: Option<&str>) -> Result<PortEndpoint> {
        if !self.published().iter().any(|p| p.guest == guest_port) {
            return Err(Error::invalid(format!(
                "guest port {guest_port} is not published on machine {}",
                self.name
            )));
        }
        let http_url = connect_url(self.client.base(), &self.id, guest_port, path);
        let ws_url = format!("ws{}", http_url.strip_prefix("http").unwrap_or(&http_url));
        let headers = [("authorization".to_string(), self.client.bearer())].into();
        Ok(PortEndpoint {
            http_url,
            ws_url,
            headers,
        })
    }

    fn check_protocol(&self, protocol: &str) -> Result<()> {
        if protocol == "tcp" {
            Ok(())
        } else {
            Err(Error::NotSupported {
                message: format!("{protocol} ports are not published on the cloud target"),
            })
        }
    }

    fn ports(&self) -> Vec<PortSpec> {
        self.published()
    }

    async fn publish(&self, guest: u16, _host: Option<u16>) -> Result<PortSpec> {
        // the cloud picks host ports itself
        let mut ports = self.published();
        if !ports.iter().any(|p| p.guest == guest) {
            ports.push(PortSpec { host: 0, guest });
            self.set_ports(&ports).await?;
        }
        self.published()
            .into_iter()
            .find(|p| p.guest == guest)
            .ok_or_else(|| {
                Error::coded(
                    ErrorCode::SmolvmError,
                    format!("the cloud did not publish guest port {guest}"),
                )
            })
    }

    async fn unpublish(&self, guest: Option<u16>, host: Option<u16>) -> Result<()> {
        let ports = self.published();
        let hit =
            |p: &PortSpec| guest.is_none_or(|g| p.guest == g) && host.is_none_or(|h| p.host == h);
        if !ports.iter().any(hit) {
            return Err(Error::NotFound {
                what: format!("published port {guest:?}/{host:?} on machine {}", self.name),
            });
        }
        let keep: Vec<PortSpec> = ports.into_iter().filter(|p| !hit(p)).collect();
        self.set_ports(&keep).await
    }
}

/// A file over the cloud's limit, refused on this side (as the published client does).
fn over_limit(path: &str, len: usize) -> Error {
    Error::coded(
        ErrorCode::SmolvmError,
        format!("{path}: {len} bytes is over the cloud's limit of {FILE_LIMIT} bytes per file"),
    )
}
