//! Ingress (SPEC §4.7, §10.5.6): which guest ports a machine publishes (`PUT …/ports`), the
//! public URL of a published port (`MachineInfo.url`), readiness over the published ports
//! (SPEC §9.4) and how a request names the port it is for: the host name
//! `{port}-{machineId}.{apps-domain}`, or the headers `x-smol-machine` + `x-smol-port` on any
//! host (an IP address, `localhost`). The proxying itself is `proxy.rs`.
//!
//! The node publishes a guest port as the engine does: a listener on a free `127.0.0.1` port
//! of the node relayed into the guest over the agent channel (no guest network involved); the
//! engine's record keeps the set, and the machine's stored create body is updated with it.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::Json;
use smolmachines::wire::{CreateMachineBody, MachineInfo, PortRequest, SetPortsBody};
use smolmachines::{Error, Machine};

use crate::db::MachineRow;
use crate::error::ApiError;
use crate::http::{body_bytes, parse_json};
use crate::server::{Fleet, Tenant, JSON_LIMIT};

/// The header naming the machine of a header-routed ingress request.
pub const MACHINE_HEADER: &str = "x-smol-machine";
/// The header naming the guest port of a header-routed ingress request.
pub const PORT_HEADER: &str = "x-smol-port";

/// Where the public URLs of published ports live (`smolfleet serve --apps-domain`,
/// `--apps-scheme`, `--apps-port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apps {
    /// The domain under which `{port}-{machineId}.{domain}` names a published port (lower
    /// case, no trailing dot). `localhost` by default: `*.localhost` is loopback (RFC 6761).
    pub domain: String,
    /// `http` or `https` (a TLS proxy in front), for the URLs only.
    pub scheme: String,
    /// The port in the URLs; `None`: the port the server listens on.
    pub port: Option<u16>,
}

impl Default for Apps {
    fn default() -> Self {
        Apps {
            domain: "localhost".into(),
            scheme: "http".into(),
            port: None,
        }
    }
}

impl Apps {
    /// Checked and normalized settings: a domain of DNS labels, a scheme of http/https.
    pub fn new(domain: &str, scheme: &str, port: Option<u16>) -> Result<Apps, String> {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if domain.is_empty() || !domain.split('.').all(label_ok) {
            return Err(format!(
                "apps domain {domain:?} is not a DNS name (labels of a-z, 0-9 and -)"
            ));
        }
        if !matches!(scheme, "http" | "https") {
            return Err(format!("apps scheme {scheme:?} must be http or https"));
        }
        if port == Some(0) {
            return Err("apps port must be 1..=65535".into());
        }
        Ok(Apps {
            domain,
            scheme: scheme.to_string(),
            port,
        })
    }

    /// The public URL of guest port `port` of machine `id`:
    /// `{scheme}://{port}-{id}.{domain}[:{apps port}]` (the port left out when it is the
    /// scheme's default).
    pub fn url(&self, port: u16, id: &str, listen_port: Option<u16>) -> String {
        let mut url = format!("{}://{port}-{id}.{}", self.scheme, self.domain);
        let default = if self.scheme == "https" { 443 } else { 80 };
        if let Some(p) = self.port.or(listen_port).filter(|p| *p != default) {
            url.push_str(&format!(":{p}"));
        }
        url
    }

    /// The machine and guest port a `Host` value names (`8080-mach-….{domain}[:port]`).
    pub fn host_target(&self, host: &str) -> Option<Target> {
        let name = match host.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label = name.strip_suffix(&self.domain)?.strip_suffix('.')?;
        if label.contains('.') {
            return None;
        }
        let (port, id) = label.split_once('-')?;
        let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
        id.starts_with("mach-").then(|| Target {
            machine: id.to_string(),
            port,
        })
    }

    /// Whether `headers` make an ingress request: `None` when they do not; the target, or the
    /// problem with the routing headers (400), when they do.
    pub fn route(&self, headers: &HeaderMap) -> Option<Result<Target, Error>> {
        if let Some(m) = headers.get(MACHINE_HEADER) {
            let machine = m.to_str().ok().map(str::trim).filter(|m| !m.is_empty());
            let port = headers
                .get(PORT_HEADER)
                .and_then(|p| p.to_str().ok())
                .and_then(|p| p.trim().parse::<u16>().ok())
                .filter(|p| *p > 0);
            return Some(match (machine, port) {
                (Some(machine), Some(port)) => Ok(Target {
                    machine: machine.to_string(),
                    port,
                }),
                _ => Err(invalid(format!(
                    "a header-routed ingress request needs {MACHINE_HEADER}: <machine id> and \
                     {PORT_HEADER}: <guest port 1-65535>"
                ))),
            });
        }
        let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
        self.host_target(host).map(Ok)
    }
}

/// An `InvalidConfig` error (400).
pub(crate) fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidConfig {
        message: message.into(),
    }
}

/// The machine and guest port an ingress request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `mach-…`.
    pub machine: String,
    /// The guest port.
    pub port: u16,
}

/// Sets what the record says about ingress: `url` (the public URL of the first published
/// port) and `ready` (running, and every published port answers, SPEC §9.4).
pub(crate) async fn finish(fleet: &Fleet, row: &MachineRow, info: &mut MachineInfo) {
    info.url = info
        .ports
        .first()
        .map(|p| fleet.apps().url(p.port, &row.id, fleet.listen_port()));
    if info.state != "running" || info.ports.is_empty() {
        return;
    }
    let ready = match fleet.handle(&row.engine_name).await {
        Ok(m) => m.ready().await,
        Err(e) => Err(e),
    };
    info.ready = Some(match ready {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(machine = %row.id, error = %e, "cannot tell whether the ports answer");
            false
        }
    });
}

/// One `PUT …/ports` at a time on this server: each reads the published set and changes it.
static SET_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The guest ports of a `PUT …/ports` body: a `ports` array is required (422 without), each
/// `port` 1..=65535 (400), TCP only (501); a port named twice counts once.
/// The most guest ports one machine of the fleet publishes (SPEC §10.2).
pub const MAX_PORTS: usize = 4;

/// A published set over [`MAX_PORTS`] is 422, naming the limit.
pub(crate) fn check_port_count(n: usize) -> Result<(), ApiError> {
    if n > MAX_PORTS {
        return Err(ApiError::unprocessable(format!(
            "ports: a machine publishes at most {MAX_PORTS} guest ports, got {n}"
        )));
    }
    Ok(())
}

fn wanted_ports(body: &[u8]) -> Result<Vec<u16>, ApiError> {
    let raw: serde_json::Value = parse_json(body)?;
    let Some(list) = raw.get("ports").filter(|p| !p.is_null()) else {
        return Err(ApiError::unprocessable(
            "ports: required, the complete set of guest ports to publish ({\"ports\": [{\"port\": 8080}]}; [] publishes none)",
        ));
    };
    if let Some(items) = list.as_array() {
        for p in items {
            match p.get("protocol").and_then(|v| v.as_str()) {
                None | Some("tcp") => {}
                Some(other) => {
                    return Err(ApiError(Error::NotSupported {
                        message: format!(
                            "{other} ports are not published by this server; publish TCP"
                        ),
                    }))
                }
            }
        }
    }
    let req: SetPortsBody = parse_json(body)?;
    let mut want = Vec::new();
    for PortRequest { port, .. } in req.ports {
        if port == 0 {
            return Err(ApiError(invalid("ports must be 1..=65535")));
        }
        if !want.contains(&port) {
            want.push(port);
        }
    }
    check_port_count(want.len())?;
    Ok(want)
}

/// `PUT /v1/machines/{id}/ports` (`{"ports": [{"port": 8080}, …]}`, as the published client
/// sends): the complete set of published guest ports. New ones are published on free
/// loopback ports of the node, missing ones unpublished (open connections carry on); a
/// stopped machine is started first. 200 with the record.
pub async fn set_ports(
    State(fleet): State<Fleet>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MachineInfo>, ApiError> {
    let body = body_bytes(body, "the request body", JSON_LIMIT)?;
    let want = wanted_ports(&body)?;
    let row = crate::routes::row_of(&fleet, &tenant, &id).await?;
    let m = fleet.running(&row.engine_name).await?;
    {
        let _one_at_a_time = SET_PORTS.lock().await;
        let have = m.ports();
        for p in have.iter().filter(|p| !want.contains(&p.guest)) {
            tracing::info!(machine = %id, guest = p.guest, host = p.host, "unpublishing a port");
            m.unpublish(Some(p.guest), Some(p.host), "tcp").await?;
        }
        for &g in want.iter().filter(|g| !have.iter().any(|p| p.guest == **g)) {
            let p = m.publish(g, None, "tcp").await?;
            tracing::info!(machine = %id, guest = p.guest, host = p.host, "published a port");
        }
        store_ports(&fleet, &row, &want).await?;
    }
    Ok(Json(crate::routes::info_of_row(&fleet, &row).await?))
}

/// Keeps the published set in the machine's stored create body (what it was made with, as
/// changed since).
async fn store_ports(fleet: &Fleet, row: &MachineRow, ports: &[u16]) -> Result<(), ApiError> {
    let mut spec: CreateMachineBody = serde_json::from_str(&row.spec).map_err(|e| {
        ApiError(Error::coded(
            smolmachines::ErrorCode::SmolvmError,
            format!("the stored create body of {} does not parse: {e}", row.id),
        ))
    })?;
    spec.ports = ports
        .iter()
        .map(|&port| PortRequest {
            port,
            host_port: None,
        })
        .collect();
    let spec = serde_json::to_string(&spec).map_err(|e| {
        ApiError(Error::coded(
            smolmachines::ErrorCode::SmolvmError,
            e.to_string(),
        ))
    })?;
    let id = row.id.clone();
    fleet.db().set_machine_spec(&id, &spec).await?;
    Ok(())
}

/// After a boot: publishes again each port of the record whose node listener is missing (a
/// machine the engine opened while it was stopped, after a server restart, has none until
/// then), on the same host port when it is still free.
pub(crate) async fn rebind(m: &Machine) {
    for p in m.ports() {
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", p.host)),
        )
        .await;
        if !matches!(probe, Ok(Err(ref e)) if e.kind() == std::io::ErrorKind::ConnectionRefused) {
            continue;
        }
        tracing::info!(machine = %m.name(), guest = p.guest, host = p.host, "publishing a port again after a boot");
        if let Err(e) = m.unpublish(Some(p.guest), Some(p.host), "tcp").await {
            tracing::warn!(machine = %m.name(), guest = p.guest, error = %e, "cannot drop a dead port");
            continue;
        }
        let again = match m.publish(p.guest, Some(p.host), "tcp").await {
            Err(Error::PortUnavailable { .. }) => m.publish(p.guest, None, "tcp").await,
            other => other,
        };
        if let Err(e) = again {
            tracing::warn!(machine = %m.name(), guest = p.guest, error = %e, "cannot publish a port again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_a_port_of_a_machine() {
        let apps = Apps::new("Apps.Example.com.", "https", None).unwrap();
        assert_eq!(apps.domain, "apps.example.com");
        let t = |h: &str| apps.host_target(h);
        let want = Some(Target {
            machine: "mach-00ff".into(),
            port: 8080,
        });
        assert_eq!(t("8080-mach-00ff.apps.example.com"), want);
        assert_eq!(t("8080-MACH-00FF.apps.example.com:443"), want);
        assert_eq!(t("8080-mach-00ff.apps.example.com."), want);
        assert_eq!(t("apps.example.com"), None);
        assert_eq!(t("8080-mach-00ff.evil.apps.example.com"), None);
        assert_eq!(t("8080-mach-00ff.apps.example.com.evil"), None);
        assert_eq!(t("0-mach-00ff.apps.example.com"), None);
        assert_eq!(t("99999-mach-00ff.apps.example.com"), None);
        assert_eq!(t("8080-other.apps.example.com"), None);
        assert_eq!(t("[::1]:8700"), None);
        assert_eq!(t("8080-mach-00ffxapps.example.com"), None);
    }

    #[test]
    fn urls_leave_out_default_ports() {
        let apps = Apps::new("localhost", "http", None).unwrap();
        assert_eq!(
            apps.url(8080, "mach-1", Some(8700)),
            "http://8080-mach-1.localhost:8700"
        );
        let apps = Apps::new("apps.example.com", "https", Some(443)).unwrap();
        assert_eq!(
            apps.url(80, "mach-1", Some(8700)),
            "https://80-mach-1.apps.example.com"
        );
        assert!(Apps::new("bad domain", "http", None).is_err());
        assert!(Apps::new("example.com", "ftp", None).is_err());
    }

    #[test]
    fn header_routing_needs_both_headers() {
        let apps = Apps::default();
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8700".parse().unwrap());
        assert!(apps.route(&h).is_none());
        h.insert(MACHINE_HEADER, "mach-1".parse().unwrap());
        assert!(matches!(
            apps.route(&h),
            Some(Err(Error::InvalidConfig { .. }))
        ));
        h.insert(PORT_HEADER, "9000".parse().unwrap());
        assert_eq!(
            apps.route(&h).unwrap().unwrap(),
            Target {
                machine: "mach-1".into(),
                port: 9000
            }
        );
    }

    #[test]
    fn put_bodies_are_checked() {
        assert_eq!(
            wanted_ports(br#"{"ports":[{"port":8080},{"port":9000},{"port":8080}]}"#).unwrap(),
            [8080, 9000]
        );
        assert!(wanted_ports(br#"{"ports":[]}"#).unwrap().is_empty());
        let status = |b: &[u8]| {
            let e = wanted_ports(b).unwrap_err().0;
            e.to_problem().status
        };
        assert_eq!(status(b"not json"), 400);
        assert_eq!(status(b"{}"), 422);
        assert_eq!(status(br#"{"ports":"8080"}"#), 422);
        assert_eq!(status(br#"{"ports":[{"port":70000}]}"#), 422);
        assert_eq!(status(br#"{"ports":[{"port":0}]}"#), 400);
        assert_eq!(status(br#"{"ports":[{"port":53,"protocol":"udp"}]}"#), 501);
    }
}
