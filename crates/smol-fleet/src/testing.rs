//! A fleet server for tests: [`spawn`] starts one on `127.0.0.1:0` over a home and returns
//! its base URL and admin key (other crates' tests use it too, e.g. the cloud backend's).

use std::net::SocketAddr;
use std::path::Path;

use crate::{Fleet, FleetError};

/// A running server; dropping it stops serving (machines stay on the node).
#[derive(Debug)]
pub struct TestServer {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    /// The listening address.
    pub addr: SocketAddr,
    /// The bootstrap admin key of the first tenant (`None` when the home was used before).
    pub admin_key: Option<String>,
    /// The server's state.
    pub fleet: Fleet,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A key of a new tenant (for tenancy tests).
    pub async fn new_tenant_key(&self, name: &str) -> Result<String, FleetError> {
        Ok(self.fleet.create_tenant(name).await?.1)
    }

    /// Stops serving now (connections are dropped; machines keep running).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a server over `home` (created if missing) on `127.0.0.1:0`, in this runtime.
pub async fn spawn(home: &Path) -> Result<TestServer, FleetError> {
    let (fleet, admin_key) = Fleet::open(home)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| FleetError::Io {
            context: "bind 127.0.0.1:0".into(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| FleetError::Io {
        context: "read the listener's address".into(),
        source,
    })?;
    let served = fleet.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = served.serve(listener, std::future::pending()).await {
            tracing::error!(error = %e, "test server stopped");
        }
    });
    Ok(TestServer {
        base_url: format!("http://{addr}"),
        addr,
        admin_key,
        fleet,
        task,
    })
}
