//! The node agent (`smolfleet node --control URL --token T`), one per host: it joins once with
//! a one-time token (its key made here, only its CSR sent), keeps what it was given in its
//! home (`node.key`, `node.crt`, `ca.crt`, `node.json`), then renews its lease over mutual
//! TLS every third of the lease. It holds no database credentials. Its loopback door
//! (`--listen`, 127.0.0.1 by default) answers health routes only.
//!
//! `--control` may name several replicas (repeat it): a join or heartbeat that cannot reach
//! one goes to the next, so a node outlives any replica but the last.
//!
//! With `--api-listen` it runs the control plane's machines (`nodeapi.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use crate::error::FleetError;
use crate::fleetca;
use crate::nodedoor::{Heartbeat, JoinRequest, Joined, RenewRequest, Renewed, RenewedCert};

/// The most one request to the control plane takes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a control plane's answer may hold.
const ANSWER_LIMIT: usize = 1 << 20;

fn node_error(message: impl Into<String>) -> FleetError {
    FleetError::Node {
        message: message.into(),
    }
}

/// What a joined node keeps in `node.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    /// The node doors of the control replicas (`https://HOST:PORT`), tried in turn.
    pub controls: Vec<String>,
    /// `node-…`.
    pub node_id: String,
}

/// `https://HOST:PORT` as `(HOST, HOST:PORT)`.
fn parse_control(url: &str) -> Result<(String, String), FleetError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        node_error(format!(
            "--control {url}: give the node door as https://HOST:PORT"
        ))
    })?;
    let authority = rest.trim_end_matches('/');
    let (host, _port) = authority
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| node_error(format!("--control {url}: no HOST:PORT in it")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_owned(), authority.to_owned()))
}

/// POSTs `body` as JSON to `path` of `control` over TLS with `config`; status and JSON answer.
async fn post<T: Serialize>(
    config: Arc<ClientConfig>,
    control: &str,
    path: &str,
    body: &T,
) -> Result<(u16, serde_json::Value), FleetError> {
    let (host, authority) = parse_control(control)?;
    let call = async {
        let name = ServerName::try_from(host.clone())
            .map_err(|e| node_error(format!("{host}: not a server name: {e}")))?;
        let tcp = TcpStream::connect(&authority)
            .await
            .map_err(|e| node_error(format!("connect to {authority}: {e}")))?;
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| node_error(format!("TLS with {authority}: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| node_error(format!("HTTP with {authority}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
        let bytes = serde_json::to_vec(body).map_err(|e| node_error(e.to_string()))?;
        let req = Request::post(path)
            .header(header::HOST, &authority)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .map_err(|e| node_error(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| node_error(format!("{path} on {authority}: {e}")))?;
        let status = resp.status().as_u16();
        let answer = axum::body::to_bytes(Body::new(resp.into_body()), ANSWER_LIMIT)
            .await
            .map_err(|e| node_error(format!("{path} on {authority}: {e}")))?;
        let json = serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .map_err(|_| {
            node_error(format!(
                "{path} on {authority}: no answer in {REQUEST_TIMEOUT:?}"
            ))
        })?
}

fn refused(what: &str, status: u16, answer: &serde_json::Value) -> FleetError {
    let why = answer
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("no reason given");
    node_error(format!("{what} refused ({status}): {why}"))
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), FleetError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| FleetError::Io {
        context: format!("write {}", path.display()),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn read(path: &Path) -> Result<String, FleetError> {
    std::fs::read_to_string(path).map_err(|source| FleetError::Io {
        context: format!("read {}", path.display()),
        source,
    })
}

/// What this host offers: `(memory MiB, vCPUs)`.
pub fn host_capacity() -> (i64, i64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as i64);
    let mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        })
        .map_or(0, |kib| kib / 1024);
    (mib, cpus)
}

/// A node's home and what it offers.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where its key, certificates and membership live.
    pub home: PathBuf,
    /// What it calls itself.
    pub name: String,
    /// What it offers.
    pub memory_mib: i64,
    /// What it offers.
    pub cpus: i64,
    /// Where its API answers, told in each heartbeat (none: it runs no machines; set by
    /// [`run`] from `--api-listen` / `--api-url`).
    pub api_url: Option<String>,
    /// How long a machine the control plane does not place here may stay before it is
    /// deleted as an orphan (`reconcile.rs`).
    pub orphan_grace: Duration,
    /// After this many creates or starts in a row fail to boot, the node asks to be cordoned
    /// (0: never).
    pub cordon_after_failed_boots: u64,
    /// Its labels, told in each heartbeat (`labels.rs`: `arch` and the operator's).
    pub labels: crate::labels::Labels,
}

/// POSTs `body` to `path` of the first of `controls` that answers (from `start` on, going
/// round); which one answered, its status and answer. An error when none answered.
async fn post_any<T: Serialize>(
    config: &Arc<ClientConfig>,
    controls: &[String],
    start: usize,
    path: &str,
    body: &T,
) -> Result<(usize, u16, serde_json::Value), FleetError> {
    let mut last = node_error("no --control given");
    for k in 0..controls.len() {
        let i = (start + k) % controls.len();
        match post(config.clone(), &controls[i], path, body).await {
            Ok((status, answer)) => return Ok((i, status, answer)),
            Err(e) => {
                tracing::warn!(control = %controls[i], error = %e, "control replica unreachable");
                last = e;
            }
        }
    }
    Err(last)
}

fn save_membership(path: &Path, m: &Membership) -> Result<(), FleetError> {
    let json = serde_json::to_string_pretty(m).map_err(|e| node_error(e.to_string()))?;
    write(path, &json, false)
}

/// Joins one of `controls` with `token` unless `home` holds a membership already (then a
/// non-empty `controls` replaces the replicas it names); the membership.
pub async fn join(
    cfg: &NodeConfig,
    controls: &[String],
    token: Option<&str>,
) -> Result<Membership, FleetError> {
    for c in controls {
        parse_control(c)?;
    }
    let member = cfg.home.join("node.json");
    if member.exists() {
        let mut m: Membership = serde_json::from_str(&read(&member)?)
            .map_err(|e| node_error(format!("{}: {e}", member.display())))?;
        if !controls.is_empty() && controls != m.controls.as_slice() {
            tracing::info!(was = ?m.controls, now = ?controls, "control replicas changed");
            m.controls = controls.to_vec();
            save_membership(&member, &m)?;
        }
        tracing::info!(node = %m.node_id, controls = ?m.controls, "joined before; renewing the lease");
        return Ok(m);
    }
    if controls.is_empty() {
        return Err(node_error("not joined yet: give --control URL"));
    }
    let token = token.ok_or_else(|| {
        node_error("not joined yet: give --token (make one with `smolfleet node join-token`)")
    })?;
    let pinned = fleetca::token_ca(token)
        .ok_or_else(|| node_error("--token: not a join token (smoljoin_…)"))?;
    std::fs::create_dir_all(&cfg.home).map_err(|source| FleetError::Io {
        context: format!("create the node home {}", cfg.home.display()),
        source,
    })?;
    let (key, csr) = fleetca::node_key_and_csr(&cfg.name)?;
    let req = JoinRequest {
        token: token.to_owned(),
        csr,
        name: cfg.name.clone(),
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
    };
    let config = fleetca::join_client_config(pinned)?;
    let (i, status, answer) = post_any(&config, controls, 0, "/fleet/v1/join", &req).await?;
    if status != 201 {
        return Err(refused("join", status, &answer));
    }
    let joined: Joined = serde_json::from_value(answer)
        .map_err(|e| node_error(format!("join: an answer not understood: {e}")))?;
    if fleetca::fingerprint(&fleetca::first_cert(&joined.ca)?) != pinned {
        return Err(node_error(
            "join: the control plane sent a CA other than the token's",
        ));
    }
    write(&cfg.home.join("node.key"), &key, true)?;
    write(&cfg.home.join("node.crt"), &joined.certificate, false)?;
    write(&cfg.home.join("ca.crt"), &joined.ca, false)?;
    let m = Membership {
        controls: controls.to_vec(),
        node_id: joined.node_id,
    };
    save_membership(&member, &m)?;
    tracing::info!(node = %m.node_id, control = %controls[i], "joined the fleet");
    Ok(m)
}

/// Ends a renewal a stop cut short: the staged key and certificate (`renew.key`,
/// `renew.crt`) replace the node's (the key is moved first, so a staged certificate alone
/// means its key is in place already).
fn finish_renewal(home: &Path) -> Result<(), FleetError> {
    let (key, crt) = (home.join("renew.key"), home.join("renew.crt"));
    let mv = |from: &Path, to: &str| {
        std::fs::rename(from, home.join(to)).map_err(|source| FleetError::Io {
            context: format!("move {} into place", from.display()),
            source,
        })
    };
    if crt.exists() {
        if key.exists() {
            mv(&key, "node.key")?;
        }
        mv(&crt, "node.crt")?;
        tracing::info!("a renewed certificate was put in place");
    }
    Ok(())
}

/// Renews this node's certificate once it is past two thirds of its life
/// ([`fleetca::renewal_due`]): a new key, its request sent over mutual TLS with the current
/// certificate (to the first replica that answers, from `start` on); the new key and
/// certificate replace the old ones in the home (staged, then moved: [`finish_renewal`]). The
/// new `(certificate, key)` PEM when it renewed.
pub async fn renew_if_due(
    config: &Arc<ClientConfig>,
    m: &Membership,
    start: usize,
    cfg: &NodeConfig,
) -> Result<Option<(String, String)>, FleetError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let current = read(&cfg.home.join("node.crt"))?;
    let (_, expires) = fleetca::cert_validity(&current)?;
    if now > expires {
        return Err(FleetError::NodeCertExpired {
            ago_secs: now - expires,
            home: cfg.home.clone(),
        });
    }
    if !fleetca::renewal_due(&current, now)? {
        return Ok(None);
    }
    let (key, csr) = fleetca::node_key_and_csr(&cfg.name)?;
    let (_, status, answer) = post_any(
        config,
        &m.controls,
        start,
        "/fleet/v1/renew",
        &RenewRequest { csr },
    )
    .await?;
    if status != 200 {
        return Err(refused("renew the certificate", status, &answer));
    }
    let renewed: RenewedCert = serde_json::from_value(answer)
        .map_err(|e| node_error(format!("renew: an answer not understood: {e}")))?;
    write(&cfg.home.join("renew.key"), &key, true)?;
    write(&cfg.home.join("renew.crt"), &renewed.certificate, false)?;
    finish_renewal(&cfg.home)?;
    tracing::info!(node = %m.node_id, "node certificate renewed");
    Ok(Some((renewed.certificate, key)))
}

/// The mutual-TLS client config of a joined node's home.
pub fn client_config(home: &Path) -> Result<Arc<ClientConfig>, FleetError> {
    fleetca::node_client_config(
        &read(&home.join("ca.crt"))?,
        &read(&home.join("node.crt"))?,
        &read(&home.join("node.key"))?,
    )
}

/// What one heartbeat found.
#[derive(Debug)]
pub enum Beat {
    /// The lease is renewed.
    Renewed(Renewed),
    /// The control plane refused this node (401/403: its certificate is no node's).
    Refused(FleetError),
}

/// One heartbeat over mutual TLS to the first replica that answers, from `start` on (which
/// one did, and what it said); an error when none answered.
pub async fn heartbeat(
    config: &Arc<ClientConfig>,
    m: &Membership,
    start: usize,
    cfg: &NodeConfig,
    machines: Option<Vec<String>>,
    failed_boots: Option<u64>,
) -> Result<(usize, Beat), FleetError> {
    let beat = Heartbeat {
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
        api_url: cfg.api_url.clone(),
        machines,
        failed_boots,
        labels: Some(cfg.labels.clone()),
    };
    let (i, status, answer) =
        post_any(config, &m.controls, start, "/fleet/v1/heartbeat", &beat).await?;
    match status {
        200 => serde_json::from_value(answer)
            .map(|r| (i, Beat::Renewed(r)))
            .map_err(|e| node_error(format!("heartbeat: an answer not understood: {e}"))),
        401 | 403 => Ok((i, Beat::Refused(refused("heartbeat", status, &answer)))),
        _ => Err(refused("heartbeat", status, &answer)),
    }
}

/// Serves `GET /health` on `listen` (loopback): the node's id and whether its last heartbeat
/// was renewed.
async fn health_door(
    listen: SocketAddr,
    node_id: String,
    renewed: Arc<AtomicBool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), FleetError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| FleetError::Io {
            context: format!("listen on {listen}"),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| FleetError::Io {
        context: "read the health door's address".into(),
        source,
    })?;
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let (node_id, renewed) = (node_id.clone(), renewed.clone());
            async move {
                axum::Json(serde_json::json!({
                    "nodeId": node_id,
                    "leaseRenewed": renewed.load(Ordering::Relaxed),
                }))
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health door failed");
        }
    });
    Ok((addr, task))
}

/// Runs the node: joins (or finds its membership), opens the health door on `listen` and,
/// with `api_listen`, the node's API (`nodeapi.rs`: it runs the control plane's machines;
/// `cfg.api_url` is where replicas reach it, default `https://` + the address it listens on),
/// then heartbeats until `shutdown`. A refused heartbeat (the certificate is no longer a
/// node's) ends it with an error; an unreachable control plane is retried.
pub async fn run(
    mut cfg: NodeConfig,
    controls: &[String],
    token: Option<&str>,
    listen: SocketAddr,
    api_listen: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FleetError> {
    if !listen.ip().is_loopback() {
        return Err(node_error(format!(
            "--listen {listen}: the node's own door answers health routes on loopback only"
        )));
    }
    if cfg.home.exists() {
        finish_renewal(&cfg.home)?;
    }
    let m = join(&cfg, controls, token).await?;
    let mut config = client_config(&cfg.home)?;
    let mut fleet = None;
    let mut api_cert = None;
    let _api = match api_listen {
        Some(at) => {
            if at.ip().is_unspecified() && cfg.api_url.is_none() {
                return Err(node_error(format!(
                    "--api-listen {at}: give --api-url https://HOST:PORT, where control \
                     replicas reach this node"
                )));
            }
            let (addr, task, node_fleet, cert) = crate::nodeapi::start(&cfg.home, at).await?;
            fleet = Some(node_fleet);
            api_cert = Some(cert);
            let url = cfg
                .api_url
                .get_or_insert_with(|| format!("https://{addr}"))
                .clone();
            println!("node API on {url} (mutual TLS, control replicas only)");
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let renewed = Arc::new(AtomicBool::new(false));
    let (addr, _door) = health_door(listen, m.node_id.clone(), renewed.clone()).await?;
    println!(
        "node {} of {}; health on http://{addr}/health",
        m.node_id,
        m.controls.join(",")
    );
    tokio::pin!(shutdown);
    let mut every = Duration::from_secs(1);
    // the replica that answered last is asked first
    let mut at = 0;
    let mut orphans = crate::reconcile::Orphans::new(cfg.orphan_grace);
    loop {
        // a certificate past two thirds of its life is renewed (heartbeats and the API take
        // the new one at once; the old one is refused from then on)
        match renew_if_due(&config, &m, at, &cfg).await {
            Ok(Some((cert, key))) => {
                config = client_config(&cfg.home)?;
                if let Some(c) = &api_cert {
                    c.replace(&cert, &key)?;
                }
            }
            Ok(None) => {}
            // past its expiry no replica will take it: the node stops, saying what to do
            Err(e @ FleetError::NodeCertExpired { .. }) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "cannot renew the node certificate; trying again"),
        }
        // the machines this node's fleet holds, for the control plane to reconcile
        let held = match &fleet {
            Some(f) => match crate::reconcile::held(f).await {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list this node's machines; not reconciled this beat");
                    None
                }
            },
            None => None,
        };
        let reconciled = held.is_some();
        let failing = fleet
            .as_ref()
            .map(|f| f.metrics().failed_boots_in_a_row())
            .filter(|&n| cfg.cordon_after_failed_boots > 0 && n >= cfg.cordon_after_failed_boots);
        match heartbeat(&config, &m, at, &cfg, held, failing).await {
            Ok((i, Beat::Renewed(r))) => {
                at = i;
                renewed.store(true, Ordering::Relaxed);
                every = Duration::from_millis((r.lease_ms / 3).max(100) as u64);
                tracing::debug!(node = %r.node_id, state = %r.state, "lease renewed");
                if let (Some(n), Some(f)) = (failing, &fleet) {
                    tracing::warn!(failed_boots = n, state = %r.state, "asked to be cordoned: the last boots failed");
                    f.metrics().forget_failed_boots();
                }
                if let (true, Some(f)) = (reconciled, &fleet) {
                    let due = orphans.note(&r.unplaced, std::time::Instant::now());
                    if !due.is_empty() {
                        crate::reconcile::remove(f, &due).await;
                    }
                }
            }
            Ok((_, Beat::Refused(e))) => return Err(e),
            Err(e) => {
                renewed.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "heartbeat failed; trying again");
            }
        }
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("node stopping");
                return Ok(());
            }
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// A task aborted when this drops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_control;

    #[test]
    fn control_urls_are_https_host_port() {
        assert_eq!(
            parse_control("https://127.0.0.1:8701/").unwrap(),
            ("127.0.0.1".into(), "127.0.0.1:8701".into())
        );
        assert_eq!(
            parse_control("https://cp.example:443").unwrap().0,
            "cp.example"
        );
        for bad in ["http://a:1", "https://a", "https://:1", "https://a:x"] {
            assert!(parse_control(bad).is_err(), "{bad}");
        }
    }
}
