//! A node's API (`smolfleet node --api-listen ADDR`, issue 15): the machines the control plane
//! places on this node run on its local engine (smolmachines' `LocalBackend`, in
//! `<node home>/fleet/engine`), behind the same `/v1` routes as `--role all` serves, over
//! mutual TLS only.
//!
//! The node serves with its own certificate (the fleet CA's, its id as DNS name) and admits a
//! client certificate of the CA with the control subject only (`fleetca::is_control_cert`):
//! another node's certificate, or none, is refused at the door (403 / handshake). A control
//! replica's request is then the node's own admin's: the node's fleet (SQLite in its home,
//! its admin key kept in `api.key` there, 0600) records each machine under the id the control
//! plane gave it. The node's fleet enforces no lifetimes (the control plane does) and runs
//! no sweeper.

use std::net::SocketAddr;
use std::path::Path;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::net::TcpListener;

use crate::epochs::{self, Epochs, PlacementEpoch, Verdict};
use crate::error::{ApiError, FleetError};
use crate::fleetca;
use crate::server::Fleet;
use crate::tls::TlsListener;

/// Whether a connection's client certificate is a control replica's.
#[derive(Debug, Clone, Copy)]
pub struct ApiPeer {
    control: bool,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ApiPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> ApiPeer {
        let (_, conn) = stream.io().get_ref();
        ApiPeer {
            control: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(|c| fleetca::is_control_cert(c)),
        }
    }
}

#[derive(Clone)]
struct Admit {
    bearer: HeaderValue,
    fleet: Fleet,
    epochs: std::sync::Arc<Epochs>,
}

async fn admit(
    State(admit): State<Admit>,
    ConnectInfo(peer): ConnectInfo<ApiPeer>,
    mut req: Request,
    next: Next,
) -> Response {
    if !peer.control {
        tracing::warn!("node API: a client certificate that is not a control replica's");
        return (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({"error": "the node's API answers control replicas only"})),
        )
            .into_response();
    }
    let placement = match req.headers().get(epochs::HEADER) {
        None => None,
        Some(v) => match PlacementEpoch::parse(v) {
            Some(p) => Some(p),
            None => {
                return ApiError(smolmachines::Error::InvalidConfig {
                    message: format!("{}: not `MACHINE-ID EPOCH`", epochs::HEADER),
                })
                .into_response()
            }
        },
    };
    if let Some(p) = &placement {
        match admit.epochs.check(admit.fleet.db(), p).await {
            Ok(Verdict::Current) => {}
            Ok(Verdict::Stale { held }) => {
                tracing::warn!(machine = %p.machine_id, epoch = p.epoch, held, "refused a request of a stale placement epoch");
                return ApiError::retry_later(format!(
                    "machine {}: the request carries placement epoch {}, and this node was                      sent epoch {held} since (another replica took the machine's operation                      over); read the machine again and retry",
                    p.machine_id, p.epoch
                ))
                .into_response();
            }
            Err(e) => return ApiError::from(e).into_response(),
        }
    }
    let delete_of = (req.method() == Method::DELETE)
        .then(|| req.uri().path().strip_prefix("/v1/machines/"))
        .flatten()
        .filter(|id| !id.contains('/'))
        .map(str::to_owned);
    req.headers_mut()
        .insert(header::AUTHORIZATION, admit.bearer.clone());
    let resp = next.run(req).await;
    if let Some(id) = delete_of {
        if resp.status().is_success() {
            // its row went with its record (`db::delete_machine`)
            admit.epochs.forget(&id);
        }
    }
    resp
}

/// The admin key of the node's fleet: made at its first start and kept in `api.key`.
fn admin_key(home: &Path, bootstrap: Option<String>) -> Result<String, FleetError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = home.join("api.key");
    let io = |source| FleetError::Io {
        context: format!("keep the node's admin key in {}", path.display()),
        source,
    };
    match bootstrap {
        Some(key) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            f.write_all(key.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(key)
        }
        None => Ok(std::fs::read_to_string(&path)
            .map_err(io)?
            .trim()
            .to_owned()),
    }
}

/// Opens the node's fleet in `<node home>/fleet` and serves its API on `listen` over mutual
/// TLS (the node's certificate and the CA of `node_home`); the address it listens on, the
/// task serving it and the fleet it serves.
pub async fn start(
    node_home: &Path,
    listen: SocketAddr,
) -> Result<
    (
        SocketAddr,
        tokio::task::JoinHandle<()>,
        Fleet,
        std::sync::Arc<fleetca::NodeCert>,
    ),
    FleetError,
> {
    let read = |name: &str| {
        let path = node_home.join(name);
        std::fs::read_to_string(&path).map_err(|source| FleetError::Io {
            context: format!("read {}", path.display()),
            source,
        })
    };
    // the node's certificate, replaced in place when the node renews it (`nodeagent.rs`)
    let cert = fleetca::NodeCert::load(&read("node.crt")?, &read("node.key")?)?;
    let config = fleetca::node_api_config(&read("ca.crt")?, cert.clone())?;
    let home = node_home.join("fleet");
    let (fleet, bootstrap) = Fleet::open(&home)?;
    fleet.set_on_node();
    // every request is a replica's, which limited its tenant's key already
    fleet.set_rate_limit(crate::limit::RateLimit {
        per_second: 1e12,
        burst: 1e12,
    });
    let key = admin_key(&home, bootstrap)?;
    let bearer = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|e| FleetError::Node {
        message: format!("the node's admin key: {e}"),
    })?;
    crate::server::deny_node_networks();
    let tcp = TcpListener::bind(listen)
        .await
        .map_err(|source| FleetError::Io {
            context: format!("listen on {listen}"),
            source,
        })?;
    let listener = TlsListener::new(tcp, config)?;
    let addr: SocketAddr =
        axum::serve::Listener::local_addr(&listener).map_err(|source| FleetError::Io {
            context: "read the node API's address".into(),
            source,
        })?;
    fleet.set_listen_port(addr.port());
    let app = fleet
        .router()
        .layer(axum::middleware::from_fn_with_state(
            Admit {
                bearer,
                fleet: fleet.clone(),
                epochs: Default::default(),
            },
            admit,
        ))
        .into_make_service_with_connect_info::<ApiPeer>();
    tracing::info!(%addr, home = %home.display(), "node API serving (mutual TLS)");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the node API failed");
        }
    });
    Ok((addr, task, fleet, cert))
}
