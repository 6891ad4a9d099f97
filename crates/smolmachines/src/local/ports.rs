//! Published ports: a listener on host `127.0.0.1:<host>` per `PortSpec`; every accepted
//! connection is relayed to `127.0.0.1:<guest>` inside the VM over the agent channel. No guest
//! network device is involved, so publishing a port opens nothing else.

use std::sync::Weak;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::agent::AgentConn;
use crate::error::{Error, Result};

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
                        let Ok((sock, _)) = listener.accept().await else {
                            return;
                        };
                        if owner.strong_count() == 0 {
                            return;
                        }
                        if let Some(c) = conn() {
                            // Each connection is its own task: unpublishing stops the accepting,
                            // connections already open carry on.
                            tokio::spawn(async move {
                                let _ = c.relay(sock, guest).await;
                            });
                        }
                    }
                }),
            )
        })
        .collect()
}
