//! The cloud target: [`CloudBackend`], a client of a smolfleet `/v1` REST API (SPEC §10)
//! behind the same seam as the local engine.
//!
//! It speaks as the published Python client 1.32.2 does (`../shared/research/CLOUD-CLIENTS.md`):
//! the same paths, bodies (the core's [`crate::wire`] types), headers, timeouts and retries.
//! Error responses become the core's typed errors through [`Error::from_problem`] (a body of
//! our own server is the same variant it was; others follow SPEC §8.3, with the message
//! `cloud {METHOD} {path} → {status}: {sentence} [request id: …]`).
//!
//! * Selection (SPEC §2.2, [`crate::backend::backend_for`]): `target = cloud`, an `api_key`,
//!   or `SMOL_CLOUD_TOKEN`. Key: `api_key` → `SMOL_CLOUD_TOKEN`; base URL: `base_url` →
//!   `SMOL_CLOUD_URL` → `https://api.smolmachines.com`. The key is sent only as
//!   `authorization: Bearer …` and never logged; `Debug` redacts it.
//! * Create (SPEC §9.5): credentials stored, `POST /v1/machines`, `POST …/start` (best
//!   effort), readiness (§9.4); on any failure, or when the create future is dropped, the
//!   half-made machine is deleted.
//! * Connect / open (as the published client): `GET /v1/machines/{x}`, on 404 a match by name
//!   or id in the list; no start (an exec starts a stopped cloud machine by itself).
//! * Checkpoints (`checkpoint.rs`): kept by the server; a restore is the server's, then
//!   start and readiness as at create.
//! * Not on this target: `run(image)`, `pull_image`, `list_images` (the trait's defaults),
//!   mounts, a machine-level `user`, UDP ports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, MachineBackend};
use crate::config::{Capabilities, ConnectOptions, MachineConfig, MachineSummary, Target};
use crate::error::{Error, ErrorCode, Result};
use crate::wire::{CreateMachineBody, CredentialBody, MachineInfo, MachineList};

mod checkpoint;
mod http;
mod machine;
mod stream;

pub use machine::CloudMachine;

use http::{encode_segment, Client, Req};

/// The base URL when neither `base_url` nor `SMOL_CLOUD_URL` says one.
pub const DEFAULT_BASE_URL: &str = "https://api.smolmachines.com";

/// The message of a cloud target without a key (the published client's).
pub const NO_KEY_MESSAGE: &str = "cloud target requires an api_key — pass \
    ConnectOptions(api_key=...), set SMOL_CLOUD_TOKEN, or run `smol auth login`";

/// Create's readiness deadline when the config gives none.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A smolfleet server: machines created, listed and driven over `/v1`.
#[derive(Debug, Clone)]
pub struct CloudBackend {
    client: Arc<Client>,
}

/// Base URL and key of a [`ConnectOptions`] given the environment's `SMOL_CLOUD_TOKEN` and
/// `SMOL_CLOUD_URL` (empty values count as unset).
pub(crate) fn resolve(
    conn: &ConnectOptions,
    env_token: Option<String>,
    env_url: Option<String>,
) -> Result<(String, String)> {
    let non_empty = |s: Option<String>| s.filter(|v| !v.is_empty());
    let key = non_empty(conn.api_key.clone())
        .or_else(|| non_empty(env_token))
        .ok_or_else(|| Error::invalid(NO_KEY_MESSAGE))?;
    let url = non_empty(conn.base_url.clone())
        .or_else(|| non_empty(env_url))
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
    Ok((normalize_base(&url)?, key))
}

/// `url` without trailing `/`s; it must be an `http://` or `https://` URL without a query.
fn normalize_base(url: &str) -> Result<String> {
    let trimmed = url.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(trimmed)
        .map_err(|e| Error::invalid(format!("cloud base URL {url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(Error::invalid(format!(
            "cloud base URL must be http:// or https://HOST, got {url:?}"
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(Error::invalid(format!(
            "cloud base URL must not have a query or fragment, got {url:?}"
        )));
    }
    Ok(trimmed.to_string())
}

impl CloudBackend {
    /// The backend of `conn` (SPEC §2.3): key `api_key` → `SMOL_CLOUD_TOKEN`, base URL
    /// `base_url` → `SMOL_CLOUD_URL` → [`DEFAULT_BASE_URL`]. No key is `InvalidConfig`.
    pub fn from_options(conn: &ConnectOptions) -> Result<CloudBackend> {
        let (base, key) = resolve(
            conn,
            std::env::var("SMOL_CLOUD_TOKEN").ok(),
            std::env::var("SMOL_CLOUD_URL").ok(),
        )?;
        CloudBackend::new(&base, &key)
    }

    /// A backend of the server at `base_url` with `api_key`.
    pub fn new(base_url: &str, api_key: &str) -> Result<CloudBackend> {
        if api_key.is_empty() {
            return Err(Error::invalid(NO_KEY_MESSAGE));
        }
        let base = normalize_base(base_url)?;
        Ok(CloudBackend {
            client: Arc::new(Client::new(base, api_key.to_string())?),
        })
    }

    /// At most `n` retries of a retryable response (default 3; 0 turns them off).
    pub fn with_max_retries(self, n: u32) -> CloudBackend {
        self.client.set_max_retries(n);
        self
    }

    /// The base URL (no trailing `/`).
    pub fn base_url(&self) -> &str {
        self.client.base()
    }

    async fn lookup(&self, x: &str) -> Result<MachineInfo> {
        lookup(&self.client, x).await
    }
}

/// The record of machine `x`: by id, else (on 404) the listed machine whose name or id is `x`
/// (CLOUD-CLIENTS.md §3, `Machine.connect`); the 404 when none is.
pub(crate) async fn lookup(client: &Client, x: &str) -> Result<MachineInfo> {
    match client
        .json::<MachineInfo>(&Req::get(format!("/v1/machines/{}", encode_segment(x))))
        .await
    {
        Ok(info) => Ok(info),
        Err(e) if e.code() == ErrorCode::NotFound => {
            let list: MachineList = client.json(&Req::get("/v1/machines")).await?;
            list.into_vec()
                .into_iter()
                .find(|m| m.name.as_deref() == Some(x) || m.id == x)
                .ok_or(e)
        }
        Err(e) => Err(e),
    }
}

/// `GET /v1/machines` with one `label=k%3Dv` per label (ANDed by the server).
pub(crate) fn list_path(labels: &BTreeMap<String, String>) -> String {
    let query: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("label={}", encode_segment(&format!("{k}={v}"))))
        .collect();
    if query.is_empty() {
        "/v1/machines".into()
    } else {
        format!("/v1/machines?{}", query.join("&"))
    }
}

/// The create requests of `config`, in order: one `PUT /v1/credentials/{name}` per
/// credential with a value, then `POST /v1/machines`. Fields the cloud refuses are refused
/// here, once, through [`Capabilities::CLOUD`]; no image is `InvalidConfig`.
pub(crate) fn create_requests(config: &MachineConfig) -> Result<Vec<Req>> {
    config.refuse_unsupported(&Capabilities::CLOUD)?;
    let body = CreateMachineBody::try_from(config)?;
    let mut reqs: Vec<Req> = config
        .credentials
        .iter()
        .filter_map(|c| {
            CredentialBody::of(c)
                .map(|b| Req::put(format!("/v1/credentials/{}", encode_segment(&c.name))).json(&b))
        })
        .collect();
    reqs.push(Req::post("/v1/machines").json(&body));
    Ok(reqs)
}

#[async_trait::async_trait]
impl Backend for CloudBackend {
    fn target(&self) -> Target {
        Target::Cloud
    }

    async fn create(&self, config: MachineConfig) -> Result<Arc<dyn MachineBackend>> {
        let mut reqs = create_requests(&config)?;
        let create = reqs.pop().expect("create_requests ends with the create");
        for r in &reqs {
            self.client.empty(r).await?;
        }
        let info: MachineInfo = self.client.json(&create).await?;
        if info.id.is_empty() {
            return Err(Error::coded(
                ErrorCode::SmolvmError,
                format!("{} → 201: the record has no id", create.what()),
            ));
        }
        let m = Arc::new(CloudMachine::new(self.client.clone(), info));
        // from here on, a failure or a dropped future deletes the machine (SPEC §9.5)
        let guard = machine::DeleteGuard::new(&m);
        let started = m.start_request(config.is_branchable()).await.err();
        if let Some(e) = &started {
            tracing::warn!(machine = %m.id(), error = %e, "cloud start failed; waiting for readiness anyway");
        }
        let timeout = config.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT);
        let wait_for_ports = config.wait_for_ports.unwrap_or(true);
        match m.wait_ready(timeout, wait_for_ports).await {
            Ok(()) => {
                guard.disarm();
                Ok(m)
            }
            Err(e) => {
                guard.delete_now().await;
                Err(match started {
                    Some(s) => http::append_message(e, &format!(" (start failed: {s})")),
                    None => e,
                })
            }
        }
    }

    async fn connect(&self, name: &str) -> Result<Arc<dyn MachineBackend>> {
        let info = self.lookup(name).await?;
        Ok(Arc::new(CloudMachine::new(self.client.clone(), info)))
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn MachineBackend>> {
        let info = self.lookup(name).await?;
        Ok(Arc::new(CloudMachine::new(self.client.clone(), info)))
    }

    async fn restore_checkpoint(
        &self,
        id: &str,
        name: &str,
        opts: &crate::config::RestoreOptions,
    ) -> Result<Arc<dyn MachineBackend>> {
        Ok(Arc::new(
            checkpoint::restore(&self.client, id, name, opts).await?,
        ))
    }

    async fn delete_checkpoint(&self, id: &str) -> Result<()> {
        self.client.empty(&checkpoint::delete_request(id)).await
    }

    async fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<MachineSummary>> {
        let req = Req::get(list_path(labels));
        let list: MachineList = self.client.json(&req).await?;
        list.into_vec()
            .into_iter()
            .map(|mut m| {
                m.state = machine::state_of(&m.state)?.as_str().to_string();
                MachineSummary::try_from(&m)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
