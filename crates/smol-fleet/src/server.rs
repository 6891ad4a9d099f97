//! The fleet: its database, its node (the local engine of `<home>/engine`), the live machine
//! handles, and the HTTP service over them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::routing::{any, delete, get, post, put};
use axum::Router;
use smolmachines::local::LocalBackend;
use smolmachines::{Error, Machine, MachineState};
use tokio::net::TcpListener;

use crate::error::FleetError;
use crate::limit::{Limiter, RateLimit};
use crate::metrics::Metrics;
use crate::store::Db;
use crate::{branch, checkpoint, http, metrics, openapi, routes, scopes, stream};

/// The most a JSON request body may hold (413 past it).
pub const JSON_LIMIT: usize = 8 << 20;
/// The most a file upload or download may hold (413 past it; SPEC §10.5.5).
pub const FILE_LIMIT: usize = 100 << 20;

/// The scopes of the bootstrap key.
const ADMIN_SCOPES: &str = scopes::ADMIN;

/// The tenant of an authenticated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// A fleet server's state; cheap to clone.
#[derive(Clone, Debug)]
pub struct Fleet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    home: PathBuf,
    db: Db,
    engine: Arc<LocalBackend>,
    /// Live handles by engine name (one open/attach per machine per server lifetime).
    handles: tokio::sync::Mutex<HashMap<String, Machine>>,
    started: Instant,
    limiter: Limiter,
    metrics: Metrics,
    /// Where the public URLs of published ports live (`ingress.rs`).
    apps: std::sync::RwLock<crate::ingress::Apps>,
    /// The port `serve` listens on (0 before).
    listen_port: std::sync::atomic::AtomicU16,
    /// Activity, operations in flight and the sweep interval (`sweeper.rs`).
    lifetimes: crate::sweeper::Lifetimes,
    /// Where creates go and how nodes are reached (`remote.rs`; `--role control,edge`).
    remote: std::sync::OnceLock<crate::remote::Remote>,
    /// This fleet is a node's (`nodeapi.rs`): a create takes the control plane's id.
    on_node: std::sync::atomic::AtomicBool,
    /// The store's last answers, for while it is down (`lastknown.rs`).
    last_known: crate::lastknown::LastKnown,
    /// Keys and routes kept while the store says they hold (`cache.rs`).
    cache: Arc<crate::cache::Cache>,
}

fn make_home(home: &Path) -> Result<(), FleetError> {
    std::fs::create_dir_all(home).map_err(|source| FleetError::Io {
        context: format!("create the fleet home {}", home.display()),
        source,
    })
}

impl Fleet {
    /// Opens the fleet of `home` (created if missing): `fleet.db` and the engine home
    /// `engine/`. On the first start it creates a tenant and an admin key and returns the key
    /// (shown once; only its hash is kept).
    pub fn open(home: &Path) -> Result<(Fleet, Option<String>), FleetError> {
        make_home(home)?;
        let store = crate::store::sqlite::SqliteStore::open(&home.join("fleet.db"))?;
        let bootstrap = store
            .sqlite()
            .call_sync(|c| crate::db::bootstrap(c, "default", ADMIN_SCOPES))?;
        Ok(Fleet::assemble(home, std::sync::Arc::new(store), bootstrap))
    }

    /// Opens the fleet of `home` (its engine's machines) over `db` (`--db`: its tenants, keys
    /// and records, e.g. PostgreSQL); the bootstrap key as [`Fleet::open`] returns it.
    pub async fn open_on(home: &Path, db: Db) -> Result<(Fleet, Option<String>), FleetError> {
        make_home(home)?;
        let bootstrap = db.bootstrap("default", ADMIN_SCOPES).await?;
        Ok(Fleet::assemble(home, db, bootstrap))
    }

    fn assemble(home: &Path, db: Db, bootstrap: Option<String>) -> (Fleet, Option<String>) {
        if bootstrap.is_some() {
            tracing::info!(
                store = db.kind(),
                "first start: created the default tenant and its admin key"
            );
        }
        let engine = LocalBackend::open_home(home.join("engine"));
        let cache = Arc::new(crate::cache::Cache::default());
        db.watch_changes(cache.clone());
        (
            Fleet {
                inner: Arc::new(Inner {
                    home: home.to_path_buf(),
                    db,
                    engine,
                    handles: tokio::sync::Mutex::new(HashMap::new()),
                    started: Instant::now(),
                    limiter: Limiter::new(crate::limit::DEFAULT_RATE),
                    metrics: Metrics::default(),
                    apps: Default::default(),
                    listen_port: Default::default(),
                    lifetimes: Default::default(),
                    remote: Default::default(),
                    on_node: Default::default(),
                    last_known: Default::default(),
                    cache,
                }),
            },
            bootstrap,
        )
    }

    /// The fleet's home.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// The store's last answers (`lastknown.rs`).
    pub(crate) fn last_known(&self) -> &crate::lastknown::LastKnown {
        &self.inner.last_known
    }

    /// Keys and routes kept while the store says they hold (`cache.rs`).
    pub(crate) fn cache(&self) -> &crate::cache::Cache {
        &self.inner.cache
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The node's engine.
    pub fn engine(&self) -> &Arc<LocalBackend> {
        &self.inner.engine
    }

    /// The per-key rate limit.
    pub fn limiter(&self) -> &Limiter {
        &self.inner.limiter
    }

    /// Sets the per-key rate limit (`smolfleet serve --rate-limit`).
    pub fn set_rate_limit(&self, rate: RateLimit) {
        self.inner.limiter.set(rate);
    }

    /// Places creates on remote nodes and reaches them with `remote` (`--role control,edge`);
    /// once (a second call is ignored).
    pub fn set_remote(&self, remote: crate::remote::Remote) {
        if self.inner.remote.set(remote).is_err() {
            tracing::warn!("remote nodes were set already");
        }
    }

    /// How remote nodes are reached, when creates are placed on them.
    pub(crate) fn remote(&self) -> Option<&crate::remote::Remote> {
        self.inner.remote.get()
    }

    /// Marks this fleet a node's (`nodeapi.rs`).
    pub(crate) fn set_on_node(&self) {
        self.inner
            .on_node
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this fleet is a node's: a create takes the id the control plane gave.
    pub(crate) fn on_node(&self) -> bool {
        self.inner
            .on_node
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn lifetimes(&self) -> &crate::sweeper::Lifetimes {
        &self.inner.lifetimes
    }

    /// Where the public URLs of published ports live.
    pub fn apps(&self) -> crate::ingress::Apps {
        match self.inner.apps.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Sets the apps domain, scheme and port (`smolfleet serve --apps-domain ...`).
    pub fn set_apps(&self, apps: crate::ingress::Apps) {
        match self.inner.apps.write() {
            Ok(mut a) => *a = apps,
            Err(poisoned) => *poisoned.into_inner() = apps,
        }
    }

    /// The port this server listens on, once serving.
    pub fn listen_port(&self) -> Option<u16> {
        Some(
            self.inner
                .listen_port
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .filter(|p| *p != 0)
    }

    /// Records the port this server listens on (`serve`, `serve_tls`).
    pub(crate) fn set_listen_port(&self, port: u16) {
        self.inner
            .listen_port
            .store(port, std::sync::atomic::Ordering::Relaxed);
    }

    /// Seconds since this server started.
    pub fn uptime_secs(&self) -> u64 {
        self.inner.started.elapsed().as_secs()
    }

    /// A new tenant named `name` and an admin key for it: `(tenant id, key)`.
    pub async fn create_tenant(&self, name: &str) -> Result<(String, String), FleetError> {
        let t = self.db().create_tenant(name).await?;
        let (_, key) = self.db().create_key(&t, ADMIN_SCOPES, None).await?;
        Ok((t, key))
    }

    /// The live handle of engine machine `name` (opened on first use, not booted).
    pub(crate) async fn handle(&self, name: &str) -> Result<Machine, Error> {
        if let Some(m) = self.inner.handles.lock().await.get(name) {
            return Ok(m.clone());
        }
        let m = Machine::open_on(&**self.engine(), name).await?;
        Ok(self
            .inner
            .handles
            .lock()
            .await
            .entry(name.to_string())
            .or_insert(m)
            .clone())
    }

    /// The live handle of engine machine `name` if this server holds one (none is opened).
    pub(crate) async fn held(&self, name: &str) -> Option<Machine> {
        self.inner.handles.lock().await.get(name).cloned()
    }

    /// Keeps `m` as the live handle of engine machine `name`.
    pub(crate) async fn keep(&self, name: &str, m: Machine) {
        self.inner.handles.lock().await.insert(name.to_string(), m);
    }

    /// Forgets the handle of engine machine `name`.
    pub(crate) async fn forget(&self, name: &str) {
        self.inner.handles.lock().await.remove(name);
    }

    /// The live handle of engine machine `name`, booted if it is not running.
    pub(crate) async fn running(&self, name: &str) -> Result<Machine, Error> {
        let m = self.handle(name).await?;
        let state = m.state().await?;
        if state == MachineState::Paused {
            // the operation answers the pause itself (409 INVALID_STATE naming `paused`)
            return Ok(m);
        }
        if state != MachineState::Running {
            tracing::info!(machine = %name, "starting a stopped machine");
            m.start().await?;
            crate::ingress::rebind(&m).await;
        }
        Ok(m)
    }

    /// The HTTP service: `/health`, `/livez`, `/readyz` and the `/v1` machine routes, behind
    /// authentication and the request id.
    pub fn router(&self) -> Router {
        let files = get(routes::read_file)
            .put(routes::write_file)
            .layer(DefaultBodyLimit::max(FILE_LIMIT));
        Router::new()
            .route("/health", get(routes::health))
            .route("/livez", get(routes::livez))
            .route("/readyz", get(routes::readyz))
            .route("/metrics", get(metrics::metrics))
            .route("/openapi.json", get(openapi::openapi_json))
            .route(
                "/v1/machines",
                post(routes::create_machine).get(routes::list_machines),
            )
            .route(
                "/v1/machines/{id}",
                get(routes::get_machine).delete(routes::delete_machine),
            )
            .route("/v1/machines/{id}/start", post(routes::start_machine))
            .route("/v1/machines/{id}/stop", post(routes::stop_machine))
            .route("/v1/machines/{id}/pause", post(branch::pause_machine))
            .route("/v1/machines/{id}/resume", post(branch::resume_machine))
            .route("/v1/machines/{id}/branches", post(branch::branch_machine))
            .route("/v1/machines/{id}/fork", post(branch::fork_machine))
            .route(
                "/v1/machines/{id}/branches/batch",
                post(branch::branch_batch),
            )
            .route("/v1/machines/{id}/fork-batch", post(branch::fork_batch))
            .route(
                "/v1/machines/{id}/checkpoints",
                post(checkpoint::create_checkpoint).get(checkpoint::list_checkpoints),
            )
            .route(
                "/v1/checkpoints/{id}/restore",
                post(checkpoint::restore_checkpoint),
            )
            .route(
                "/v1/checkpoints/{id}",
                delete(checkpoint::delete_checkpoint),
            )
            .route("/v1/machines/{id}/exec", post(routes::exec))
            .route("/v1/machines/{id}/exec/stream", post(stream::exec_stream))
            .route("/v1/machines/{id}/files/{*path}", files)
            .route("/v1/machines/{id}/ports", put(crate::ingress::set_ports))
            .route(
                "/v1/machines/{id}/connect/{port}",
                any(crate::proxy::connect),
            )
            .route(
                "/v1/machines/{id}/connect/{port}/",
                any(crate::proxy::connect),
            )
            .route(
                "/v1/machines/{id}/connect/{port}/{*path}",
                any(crate::proxy::connect),
            )
            .fallback(routes::not_found)
            .layer(DefaultBodyLimit::max(JSON_LIMIT))
            // a machine on a remote node: its request goes there, streamed (`remote.rs`)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                crate::remote::divert,
            ))
            .layer(axum::middleware::from_fn(http::declared_length))
            // host- and header-routed ingress: after authentication, before any body limit
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                crate::proxy::by_host,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                http::authenticate,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                metrics::observe,
            ))
            .layer(axum::middleware::from_fn(http::request_id))
            .with_state(self.clone())
    }

    /// Serves the API on `listener` until the task is dropped or `shutdown` resolves; the
    /// sweeper (`sweeper.rs`) runs as long as this does.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), FleetError> {
        use axum::serve::ListenerExt;
        let addr = listener.local_addr().map_err(|source| FleetError::Io {
            context: "read the listener's address".into(),
            source,
        })?;
        tracing::info!(%addr, home = %self.home().display(), "smolfleet serving");
        deny_node_networks();
        self.inner
            .listen_port
            .store(addr.port(), std::sync::atomic::Ordering::Relaxed);
        let _sweeper = crate::sweeper::start(self.clone());
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| FleetError::Io {
                context: format!("serve on {addr}"),
                source,
            })
    }
}

/// The node's own private networks join every machine's always-denied blocks (issue 14, the
/// fleet: a tenant's guest reaches nothing of the node's networks, whatever its policy); called
/// by [`Fleet::serve`] and `serve_tls` before the first request. Returns the blocks.
pub(crate) fn deny_node_networks() -> Vec<String> {
    use smolmachines::local::egress::node;
    let blocks = node::node_private_networks();
    tracing::info!(blocks = %blocks.join(","), "the node's private networks are denied to every machine");
    node::deny_also(blocks.clone());
    blocks
}
