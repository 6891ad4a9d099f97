//! Native half of the npm package `smolmachines`: a thin napi-rs layer over the Rust core
//! (`smolmachines::Machine`). Every I/O call is an async fn run on napi's tokio runtime, so the
//! JS event loop never waits on a VM. Errors leave as a JSON payload with their code and typed
//! fields (`errors.rs`); `errors.js` turns that into the typed `SmolError` subclass in one
//! place. Options arrive as JSON text (parsed with serde in `config`), so an
//! unknown or mistyped field is a typed error instead of being dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use napi::bindgen_prelude::*;
use napi_derive::napi;
use smolmachines::{Error, ExecResult, Machine, MAX_WAIT};
use tokio::sync::watch;

mod config;
mod errors;
mod log;
mod stream;

use config::{
    parse, JsBranchBatchOptions, JsBranchOptions, JsCheckpointOptions, JsConfig, JsConnect,
    JsExecOptions, JsRestoreOptions,
};
pub use errors::error_from_problem;
use errors::to_js;
pub use stream::NativeExecStream;

fn conn_from(json: &str) -> Result<smolmachines::ConnectOptions> {
    parse::<JsConnect>("ConnectOptions", json)
        .and_then(JsConnect::into_core)
        .map_err(to_js)
}

fn exec_opts(json: &str, stdin: Option<Buffer>) -> Result<smolmachines::ExecOptions> {
    parse::<JsExecOptions>("ExecOptions", json)
        .and_then(|o| o.into_core(stdin.map(|b| b.to_vec())))
        .map_err(to_js)
}

/// A positive, finite number of milliseconds as a duration (capped at the core's
/// [`MAX_WAIT`], so that a huge value cannot overflow the core's deadline).
fn millis(what: &str, ms: f64) -> Result<Duration> {
    if !(ms.is_finite() && ms > 0.0) {
        return Err(to_js(Error::InvalidConfig {
            message: format!("{what} must be a number of milliseconds > 0, got {ms}"),
        }));
    }
    Ok(Duration::try_from_secs_f64(ms / 1000.0).map_or(MAX_WAIT, smolmachines::config::cap_wait))
}

/// `localAvailability()` (SPEC §3.10): never throws.
#[napi(object)]
pub struct Availability {
    pub available: bool,
    pub code: Option<String>,
    pub reason: Option<String>,
    /// `kvm` or `tcg` when available.
    pub accel: Option<String>,
}

#[napi]
pub fn local_availability() -> Availability {
    let a = smolmachines::local_availability();
    Availability {
        available: a.available,
        code: a.code,
        reason: a.reason,
        accel: a.accel,
    }
}

/// The guest assets the local engine uses (`localAvailability().assets`).
#[napi(object)]
pub struct AssetsInfo {
    /// `env` (SMOL_ASSETS), `packaged` (in the installed package) or `home` (the set-up's).
    pub source: String,
    /// The directory.
    pub dir: String,
    /// The smol version that packaged them (packaged assets).
    pub version: Option<String>,
    /// One line: where they are, why, and what their manifest says.
    pub description: String,
}

/// `None` when the directory cannot be told (a broken manifest: `localAvailability()` says why).
#[napi]
pub fn local_assets() -> Option<AssetsInfo> {
    let o = smolmachines::local::assets::origin().ok()?;
    Some(AssetsInfo {
        source: o.source.as_str().to_string(),
        dir: o.dir.display().to_string(),
        version: o.manifest.as_ref().map(|m| m.version.clone()),
        description: o.to_string(),
    })
}

/// The version of the addon (the workspace's; `require('smolmachines').version`).
#[napi]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Creates and starts a machine (`Machine.create`).
#[napi]
pub async fn create(config: String, conn: String) -> Result<NativeMachine> {
    let config = parse::<JsConfig>("MachineConfig", &config)
        .and_then(JsConfig::into_core)
        .map_err(to_js)?;
    let conn = conn_from(&conn)?;
    let m = Machine::create(config, conn).await.map_err(to_js)?;
    Ok(NativeMachine::new(m))
}

/// Attaches to an existing machine by name (`Machine.connect`).
#[napi]
pub async fn connect(name: String, conn: String) -> Result<NativeMachine> {
    let conn = conn_from(&conn)?;
    let m = Machine::connect(&name, conn).await.map_err(to_js)?;
    Ok(NativeMachine::new(m))
}

/// A new running machine `name` from checkpoint `id` (SPEC §4.8 `Machine.restoreCheckpoint`);
/// `opts` is the JSON of `{ports, keepIdentity, networkPolicy}`.
#[napi]
pub async fn restore_checkpoint(
    id: String,
    name: String,
    conn: Option<String>,
    opts: String,
) -> Result<NativeMachine> {
    let conn = conn.as_deref().map(conn_from).transpose()?;
    let opts = parse::<JsRestoreOptions>("RestoreCheckpointOptions", &opts)
        .and_then(JsRestoreOptions::into_core)
        .map_err(to_js)?;
    let m = Machine::restore_checkpoint(&id, &name, conn, opts)
        .await
        .map_err(to_js)?;
    Ok(NativeMachine::new(m))
}

/// Deletes checkpoint `id` (locally its file; `[NOT_FOUND]` if missing).
#[napi]
pub async fn delete_checkpoint(id: String, conn: Option<String>) -> Result<()> {
    let conn = conn.as_deref().map(conn_from).transpose()?;
    Machine::delete_checkpoint(&id, conn).await.map_err(to_js)
}

/// Writes local checkpoint `source` (made with a chunk store, or standalone) as one standalone
/// `.smolcheckpoint` file `output`; the bytes written. Synchronous (SPEC §4.8).
#[napi]
pub fn export_checkpoint(source: String, output: String) -> Result<f64> {
    smolmachines::local::checkpoint_store::export_checkpoint(source.as_ref(), output.as_ref())
        .map(|n| n as f64)
        .map_err(to_js)
}

/// Removes the chunks of local checkpoint store `store` that no checkpoint names; the bytes
/// freed. Synchronous.
#[napi]
pub fn prune_checkpoint_store(store: String) -> Result<f64> {
    smolmachines::local::checkpoint_store::Store::open(store.as_ref(), false, true)
        .and_then(|s| s.prune())
        .map(|n| n as f64)
        .map_err(to_js)
}

/// A checkpoint as JSON (the core's `PortableCheckpointInfo`, camelCase); `index.js` parses it.
fn checkpoint_json(info: &smolmachines::CheckpointInfo) -> Result<String> {
    serde_json::to_string(info).map_err(|e| napi::Error::from_reason(e.to_string()))
}

/// Sizes of a listed machine (SPEC §3.10 `MachineSizes`).
#[napi(object)]
pub struct NativeSizes {
    pub cpus: u32,
    pub memory_mib: u32,
    /// Writable disk in GiB (absent when unknown).
    pub storage_gib: Option<u32>,
}

/// A published port of a listed machine (SPEC §3.10 `PublishedPort`).
#[napi(object)]
pub struct NativePublishedPort {
    pub guest: u32,
    pub host: Option<u32>,
    pub protocol: String,
}

/// One row of `Machine.list`, already in the SDK's `MachineSummary` shape (SPEC §3.10):
/// `index.js` returns it as it is.
#[napi(object)]
pub struct NativeSummary {
    pub id: String,
    pub name: String,
    pub state: String,
    pub labels: HashMap<String, String>,
    /// The image reference the machine was created from.
    pub image: Option<String>,
    pub persistent: bool,
    pub detached: bool,
    pub branchable: bool,
    /// RFC 3339 UTC with whole seconds, the form of the cloud's `createdAt`.
    pub created_at: Option<String>,
    pub pid: Option<u32>,
    pub accel: Option<String>,
    pub resources: NativeSizes,
    pub ports: Vec<NativePublishedPort>,
}

impl From<smolmachines::MachineSummary> for NativeSummary {
    fn from(r: smolmachines::MachineSummary) -> Self {
        NativeSummary {
            created_at: r.created_at(),
            id: r.id,
            name: r.name,
            state: r.state.as_str().to_string(),
            labels: r.labels.into_iter().collect(),
            image: r.image,
            persistent: r.persistent,
            detached: r.detached,
            branchable: r.branchable,
            pid: r.pid,
            accel: Some(r.accel).filter(|a| !a.is_empty()),
            resources: NativeSizes {
                cpus: r.cpus,
                memory_mib: r.memory_mb,
                storage_gib: Some(r.storage_gb).filter(|&g| g > 0),
            },
            ports: r
                .ports
                .iter()
                .map(|p| NativePublishedPort {
                    guest: p.guest.into(),
                    host: Some(p.host.into()),
                    protocol: "tcp".into(),
                })
                .collect(),
        }
    }
}

/// Every machine of the selected backend carrying all of `labels` (JSON object).
#[napi]
pub async fn list(conn: String, labels: String) -> Result<Vec<NativeSummary>> {
    let conn = conn_from(&conn)?;
    let labels: BTreeMap<String, String> = parse("labels", &labels).map_err(to_js)?;
    let rows = Machine::list(conn, &labels).await.map_err(to_js)?;
    Ok(rows.into_iter().map(NativeSummary::from).collect())
}

/// A finished command; `index.js` adds the strings, `success`, `output`, `assertSuccess`.
#[napi(object)]
pub struct NativeExecResult {
    pub exit_code: i32,
    pub stdout: Buffer,
    pub stderr: Buffer,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
}

impl From<ExecResult> for NativeExecResult {
    fn from(r: ExecResult) -> Self {
        Self {
            exit_code: r.exit_code,
            stdout: r.stdout_bytes.into(),
            stderr: r.stderr_bytes.into(),
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            timed_out: r.timed_out,
        }
    }
}

/// SPEC §3.8.
#[napi(object)]
pub struct NativeImageInfo {
    pub reference: String,
    pub digest: String,
    pub size: f64,
    pub architecture: String,
    pub os: String,
}

impl From<smolmachines::ImageInfo> for NativeImageInfo {
    fn from(i: smolmachines::ImageInfo) -> Self {
        Self {
            reference: i.reference,
            digest: i.digest,
            size: i.size as f64,
            architecture: i.architecture,
            os: i.os,
        }
    }
}

/// SPEC §3.10 `PortEndpoint`.
#[napi(object)]
pub struct NativeEndpoint {
    pub http_url: String,
    pub ws_url: String,
    pub headers: HashMap<String, String>,
}

/// A published port (host on 127.0.0.1 -> guest).
#[napi(object)]
pub struct NativePort {
    pub host: u32,
    pub guest: u32,
}

// --- cancellation of `exec` (AbortSignal) ----------------------------------------------------

static CANCELS: Mutex<BTreeMap<u32, watch::Sender<bool>>> = Mutex::new(BTreeMap::new());
static NEXT_CANCEL: AtomicU32 = AtomicU32::new(1);

/// A token for `exec(..., cancelToken)`; `cancel(token)` makes that exec fail with `[ABORTED]`
/// and kills its command (the core kills a command whose exec future is dropped).
#[napi]
pub fn cancel_token() -> u32 {
    let id = NEXT_CANCEL.fetch_add(1, Ordering::Relaxed);
    let (tx, _) = watch::channel(false);
    CANCELS.lock().expect("cancel registry").insert(id, tx);
    id
}

/// Cancels the exec holding `token` (before or while it runs). Unknown tokens are ignored.
#[napi]
pub fn cancel(token: u32) {
    if let Some(tx) = CANCELS.lock().expect("cancel registry").get(&token) {
        tx.send_replace(true);
    }
}

/// Forgets `token` (the JS side calls it when the exec settled).
#[napi]
pub fn release_cancel_token(token: u32) {
    CANCELS.lock().expect("cancel registry").remove(&token);
}

async fn cancellable<T>(
    token: Option<u32>,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let Some(id) = token else { return fut.await };
    let rx = CANCELS
        .lock()
        .expect("cancel registry")
        .get(&id)
        .map(|tx| tx.subscribe());
    let Some(mut rx) = rx else { return fut.await };
    tokio::select! {
        r = fut => r,
        _ = rx.wait_for(|c| *c) => Err(napi::Error::new(
            Status::GenericFailure,
            "[ABORTED] the operation was aborted".to_string(),
        )),
    }
}

// --- the machine -----------------------------------------------------------------------------

/// A machine handle. The JS class `Machine` wraps it.
#[napi]
pub struct NativeMachine {
    m: Option<Machine>,
    /// The runtime the handle was made on (napi's), entered to drop it.
    rt: tokio::runtime::Handle,
}

impl NativeMachine {
    /// Called inside napi's runtime (from an async fn).
    fn new(m: Machine) -> Self {
        Self {
            m: Some(m),
            rt: tokio::runtime::Handle::current(),
        }
    }

    fn m(&self) -> Machine {
        self.m.clone().expect("machine present until dropped")
    }
}

impl Drop for NativeMachine {
    fn drop(&mut self) {
        // Collected on the JS thread (or at environment teardown, after napi shut its runtime
        // down): let the core's handle go inside the runtime it was made on. Entering a handle
        // of a runtime that was shut down does not panic (napi's own helper would).
        let m = self.m.take();
        let _guard = self.rt.enter();
        drop(m);
    }
}

#[napi]
impl NativeMachine {
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.m().name().to_string()
    }

    /// The target's id: the name locally, `mach-…` on the cloud.
    #[napi(getter)]
    pub fn id(&self) -> String {
        self.m().id().to_string()
    }

    /// `"local"` or `"cloud"`: where this machine is.
    #[napi(getter)]
    pub fn target(&self) -> String {
        self.m().target().as_str().to_string()
    }

    #[napi]
    pub async fn state(&self) -> Result<String> {
        let s = self.m().state().await.map_err(to_js)?;
        Ok(s.as_str().to_string())
    }

    #[napi]
    pub fn url(&self) -> Option<String> {
        self.m().url()
    }

    /// Running, and every published port has a guest listener behind it (SPEC §4.2).
    #[napi]
    pub async fn ready(&self) -> Result<bool> {
        self.m().ready().await.map_err(to_js)
    }

    /// Polls `ready()` every `interval_ms` until it is true; `[TIMEOUT]` after `timeout_ms`.
    /// Both must be finite and > 0 (`[INVALID_CONFIG]`).
    #[napi]
    pub async fn wait_until_ready(&self, timeout_ms: f64, interval_ms: f64) -> Result<()> {
        let timeout = millis("timeoutMs", timeout_ms)?;
        let interval = millis("intervalMs", interval_ms)?;
        self.m()
            .wait_until_ready(timeout, interval)
            .await
            .map_err(to_js)
    }

    #[napi]
    pub async fn exec(
        &self,
        argv: Vec<String>,
        opts: String,
        stdin: Option<Buffer>,
        cancel_token: Option<u32>,
    ) -> Result<NativeExecResult> {
        let opts = exec_opts(&opts, stdin)?;
        let m = self.m();
        cancellable(cancel_token, async move {
            m.exec(&argv, opts).await.map(Into::into).map_err(to_js)
        })
        .await
    }

    #[napi]
    pub async fn run(
        &self,
        image: String,
        argv: Vec<String>,
        opts: String,
        stdin: Option<Buffer>,
    ) -> Result<NativeExecResult> {
        let opts = exec_opts(&opts, stdin)?;
        let r = self.m().run(&image, &argv, opts).await.map_err(to_js)?;
        Ok(r.into())
    }

    #[napi]
    pub async fn exec_stream(
        &self,
        argv: Vec<String>,
        opts: String,
        stdin: Option<Buffer>,
    ) -> Result<NativeExecStream> {
        let opts = exec_opts(&opts, stdin)?;
        let s = self.m().exec_stream(&argv, opts).await.map_err(to_js)?;
        Ok(NativeExecStream::new(s))
    }

    #[napi]
    pub async fn read_file(&self, path: String) -> Result<Buffer> {
        let data = self.m().read_file(&path).await.map_err(to_js)?;
        Ok(data.into())
    }

    #[napi]
    pub async fn write_file(&self, path: String, data: Buffer, mode: Option<u32>) -> Result<()> {
        self.m()
            .write_file(&path, &data[..], mode)
            .await
            .map_err(to_js)
    }

    #[napi]
    pub async fn pull_image(&self, image: String) -> Result<NativeImageInfo> {
        let i = self.m().pull_image(&image).await.map_err(to_js)?;
        Ok(i.into())
    }

    #[napi]
    pub async fn list_images(&self) -> Result<Vec<NativeImageInfo>> {
        let v = self.m().list_images().await.map_err(to_js)?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    #[napi]
    pub async fn start(&self) -> Result<()> {
        self.m().start().await.map_err(to_js)
    }

    #[napi]
    pub async fn stop(&self) -> Result<()> {
        self.m().stop().await.map_err(to_js)
    }

    #[napi]
    pub async fn delete(&self) -> Result<()> {
        self.m().delete().await.map_err(to_js)
    }

    #[napi]
    pub async fn pause(&self) -> Result<()> {
        self.m().pause().await.map_err(to_js)
    }

    #[napi]
    pub async fn resume(&self) -> Result<()> {
        self.m().resume().await.map_err(to_js)
    }

    /// A running clone (SPEC §4.8 `branch`); `opts` is the JSON of `{ports, branchable,
    /// checkpointable, freezeSource}`.
    #[napi]
    pub async fn branch(&self, name: String, opts: String) -> Result<NativeMachine> {
        let opts = parse::<JsBranchOptions>("branch options", &opts)
            .and_then(JsBranchOptions::into_core)
            .map_err(to_js)?;
        let m = self.m().branch_with(&name, opts).await.map_err(to_js)?;
        Ok(NativeMachine::new(m))
    }

    /// Several clones, all or nothing (SPEC §4.8 `branchBatch`).
    #[napi]
    pub async fn branch_batch(&self, opts: String) -> Result<Vec<NativeMachine>> {
        let opts = parse::<JsBranchBatchOptions>("branchBatch options", &opts)
            .and_then(JsBranchBatchOptions::into_core)
            .map_err(to_js)?;
        let clones = self.m().branch_batch(opts).await.map_err(to_js)?;
        Ok(clones.into_iter().map(NativeMachine::new).collect())
    }

    /// Writes a portable checkpoint (SPEC §4.8 `checkpoint`); `opts` is the JSON of
    /// `{output, store}`; the result is the JSON of a `PortableCheckpointInfo`.
    #[napi]
    pub async fn checkpoint(&self, opts: String) -> Result<String> {
        let opts = parse::<JsCheckpointOptions>("CheckpointOptions", &opts)
            .map(JsCheckpointOptions::into_core)
            .map_err(to_js)?;
        let info = self.m().checkpoint(opts).await.map_err(to_js)?;
        checkpoint_json(&info)
    }

    /// This machine's checkpoints as JSON (cloud; locally `[NOT_SUPPORTED]`).
    #[napi]
    pub async fn checkpoints(&self) -> Result<Vec<String>> {
        let v = self.m().checkpoints().await.map_err(to_js)?;
        v.iter().map(checkpoint_json).collect()
    }

    /// Runs `argv` in a throw-away clone, always deleted (SPEC §4.8 `rewardFork`).
    #[napi]
    pub async fn reward_fork(
        &self,
        argv: Vec<String>,
        opts: String,
        stdin: Option<Buffer>,
        name: Option<String>,
    ) -> Result<NativeExecResult> {
        let opts = exec_opts(&opts, stdin)?;
        let r = self
            .m()
            .reward_fork(&argv, opts, name.as_deref())
            .await
            .map_err(to_js)?;
        Ok(r.into())
    }

    #[napi]
    pub fn endpoint(&self, port: u32, path: Option<String>) -> Result<NativeEndpoint> {
        let port = u16::try_from(port).map_err(|_| {
            to_js(Error::InvalidConfig {
                message: format!("port {port} is out of range"),
            })
        })?;
        let e = self.m().endpoint(port, path.as_deref()).map_err(to_js)?;
        Ok(NativeEndpoint {
            http_url: e.http_url,
            ws_url: e.ws_url,
            headers: e.headers.into_iter().collect(),
        })
    }

    #[napi]
    pub fn ports(&self) -> Vec<NativePort> {
        self.m()
            .ports()
            .into_iter()
            .map(|p| NativePort {
                host: p.host.into(),
                guest: p.guest.into(),
            })
            .collect()
    }

    /// Benchmark helper: runs `argv` `n` times from Rust on this machine and returns each
    /// call's wall time in microseconds (the baseline of `bench.mjs`).
    #[napi]
    pub async fn bench_exec(&self, argv: Vec<String>, n: u32) -> Result<Vec<f64>> {
        let m = self.m();
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let t = Instant::now();
            let r = m
                .exec(&argv, smolmachines::ExecOptions::default())
                .await
                .map_err(to_js)?;
            out.push(t.elapsed().as_secs_f64() * 1e6);
            if r.exit_code != 0 {
                return Err(to_js(Error::InvalidConfig {
                    message: format!("bench command exited with {}", r.exit_code),
                }));
            }
        }
        Ok(out)
    }
}
