//! Published ports: a listener on host `127.0.0.1:<host>` per `PortSpec`; every accepted
//! connection is relayed to `127.0.0.1:<guest>` inside the VM over the agent channel. No guest
//! network device is involved, so publishing a port opens nothing else.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::agent::AgentConn;
use crate::config::PortEndpoint;
use crate::error::{Error, Result};

/// The URLs of host port `host` (SPEC §4.7): `http://127.0.0.1:<host>[/path]` and its `ws://`
/// twin.
pub fn endpoint(host: u16, path: Option<&str>) -> PortEndpoint {
    let mut http = format!("http://127.0.0.1:{host}");
    if let Some(path) = path
        .map(|p| p.trim_start_matches('/'))
        .filter(|p| !p.is_empty())
    {
        http.push('/');
        http.push_str(path);
    }
    PortEndpoint {
        ws_url: format!("ws{}", &http[4..]),
        http_url: http,
        headers: BTreeMap::new(),
    }
}

/// The local engine relays TCP only.
pub fn check_protocol(protocol: &str) -> Result<()> {
    match protocol {
        "tcp" => Ok(()),
        _ => Err(Error::NotSupported {
            message: format!("{protocol} ports are not relayed by the local engine; publish TCP"),
        }),
    }
}

/// Binds every host port now, so a busy port fails the create with a typed error.
pub async fn bind(ports: &[(u16, u16)]) -> Result<Vec<(TcpListener, u16)>> {
    let mut out = Vec::new();
    for &(host, guest) in ports {
        match TcpListener::bind(("127.0.0.1", host)).await {
            Ok(l) => out.push((l, guest)),
            Err(e) => {
                return Err(Error::PortUnavailable {
                    port: host,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Serves bound listeners while the machine lives; `conn` yields the current agent connection
/// (none while the machine is stopped: clients are then closed at once).
/// Returns each listener's host port with its task.
pub fn serve<F>(
    listeners: Vec<(TcpListener, u16)>,
    owner: Weak<()>,
    conn: F,
) -> Vec<(u16, JoinHandle<()>)>
where
    F: Fn() -> Option<AgentConn> + Send + Sync + Clone + 'static,
{
    listeners
        .into_iter()
        .map(|(listener, guest)| {
            let conn = conn.clone();
            let owner = owner.clone();
            let host = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            (
                host,
                tokio::spawn(async move {
                    loop {
                        let sock = match listener.accept().await {
                            Ok((sock, _)) => sock,
                            // Out of descriptors (a client holding many connections, EMFILE),
                            // a connection aborted before it was taken: the listener goes on
                            // once the moment passes, instead of ending for good.
                            Err(_) if owner.strong_count() == 0 => return,
                            Err(e) => {
                                tracing::warn!(host, error = %e, "accepting on a published port");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        if owner.strong_count() == 0 {
                            return;
                        }
                        if let Some(c) = conn() {
                            // Each connection is its own task: unpublishing stops the accepting,
                            // connections already open carry on.
                            tokio::spawn(async move {
                                if let Err(e) = c.relay(sock, guest).await {
                                    tracing::debug!(host, guest, error = %e, "port relay ended");
                                }
                            });
                        }
                    }
                }),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_protocols() {
        let e = endpoint(8080, Some("/api/x"));
        assert_eq!(e.http_url, "http://127.0.0.1:8080/api/x");
        assert_eq!(e.ws_url, "ws://127.0.0.1:8080/api/x");
        assert_eq!(endpoint(80, Some("/")).http_url, "http://127.0.0.1:80");
        assert_eq!(endpoint(80, None).ws_url, "ws://127.0.0.1:80");
        assert!(check_protocol("tcp").is_ok());
        let e = check_protocol("udp").unwrap_err();
        assert!(
            matches!(&e, Error::NotSupported { message } if message.contains("udp")),
            "{e:?}"
        );
    }
}
