//! A fleet server for tests: [`spawn`] starts one on `127.0.0.1:0` over a home and returns
//! its base URL and admin key (other crates' tests use it too, e.g. the cloud backend's).
//!
//! A test server cleans up after itself: [`TestServer::teardown`] (or, as a backstop, its
//! drop, also on a panic) deletes every machine of its home, so a failed or killed test
//! leaves no VM running. [`TestServer::keep_machines`] opts out (a restart test hands its
//! machines to the next server over the same home).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use smolmachines::{Error, Machine};

use crate::{Db, Fleet, FleetError};

pub mod pg;

/// `SMOL_FLEET_TEST_STORE=postgres`: [`spawn`] serves over a database of a PostgreSQL cluster
/// of the test process's own ([`pg::shared`]), one database per home, instead of SQLite.
pub const STORE_VAR: &str = "SMOL_FLEET_TEST_STORE";

/// How long the drop of a test server waits for its machines to be deleted.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(120);

/// A running server; dropping it stops serving and deletes its home's machines (unless
/// [`TestServer::keep_machines`] was called).
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
    /// Leave the machines on the node when dropped.
    keep: bool,
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

    /// Leaves this home's machines running when the server is dropped (for a test that starts
    /// another server over the same home and expects to find them).
    pub fn keep_machines(&mut self) {
        self.keep = true;
    }

    /// Stops serving and deletes every machine of this home (the fleet's records, then
    /// anything else on the node); how many were deleted.
    pub async fn teardown(mut self) -> Result<usize, Error> {
        self.task.abort();
        self.keep = true;
        remove_all(&self.fleet).await
    }
}

/// Deletes every machine of `fleet`'s home: the ones it has records of, then whatever else
/// its node holds (a create cut short). Every failure is logged; the first is returned.
async fn remove_all(fleet: &Fleet) -> Result<usize, Error> {
    let mut first_error = None;
    let mut n = 0;
    for row in fleet.db().all_machines().await? {
        match fleet.destroy(&row).await {
            Ok(()) => n += 1,
            Err(e) => {
                tracing::error!(machine = %row.id, error = %e, "test server: cannot delete");
                first_error.get_or_insert(e);
            }
        }
    }
    for s in Machine::list_on(&**fleet.engine(), &Default::default()).await? {
        let deleted = match Machine::open_on(&**fleet.engine(), &s.name).await {
            Ok(m) => m.delete().await,
            Err(e) => Err(e),
        };
        match deleted {
            Ok(()) => n += 1,
            Err(e) => {
                tracing::error!(machine = %s.name, error = %e, "test server: cannot delete");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(n),
        Some(e) => Err(e),
    }
}

/// Without a multi-threaded runtime to delete on: SIGKILLs the VMM of every running machine
/// of `fleet`'s home, from a thread of its own (the engine's records and disks go with the
/// test's home directory).
fn kill_all(fleet: &Fleet) {
    let engine = fleet.engine().clone();
    let lister = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(Machine::list_on(&*engine, &Default::default()))
            .map_err(std::io::Error::other)
    });
    let machines = match lister.join() {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "test server: cannot list the machines to kill");
            return;
        }
        Err(_) => {
            tracing::error!("test server: the machine lister panicked; machines may be left");
            return;
        }
    };
    for s in machines {
        let Some(pid) = s.pid.and_then(|p| libc::pid_t::try_from(p).ok()) else {
            continue;
        };
        tracing::warn!(machine = %s.name, pid, "test server dropped without a runtime: killing the VMM");
        // SAFETY: kill(2) with a pid the engine just listed as this machine's live VMM (checked
        // by pid and start time); it touches no memory of ours.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::error!(machine = %s.name, pid, error = %e, "test server: cannot kill the VMM");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
        if self.keep {
            return;
        }
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
                let fleet = self.fleet.clone();
                let done = tokio::task::block_in_place(|| {
                    h.block_on(tokio::time::timeout(TEARDOWN_TIMEOUT, async move {
                        remove_all(&fleet).await
                    }))
                });
                match done {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!(n, "test server dropped: deleted its machines"),
                    Ok(Err(e)) => tracing::error!(error = %e, "test server: machines may be left"),
                    Err(_) => {
                        tracing::error!(
                            "test server: deleting its machines timed out; killing them"
                        );
                        kill_all(&self.fleet);
                    }
                }
            }
            _ => kill_all(&self.fleet),
        }
    }
}

/// The store [`spawn`] uses: `postgres` or `sqlite` ([`STORE_VAR`]).
pub fn store_kind() -> &'static str {
    match std::env::var(STORE_VAR).as_deref() {
        Ok("postgres") => "postgres",
        _ => "sqlite",
    }
}

/// Starts a server over `home` (created if missing) on `127.0.0.1:0`, in this runtime; its
/// store is `<home>/fleet.db`, or PostgreSQL with [`STORE_VAR`]`=postgres`.
pub async fn spawn(home: &Path) -> Result<TestServer, FleetError> {
    match std::env::var(STORE_VAR).as_deref() {
        Ok("postgres") => {
            let url = pg::database_for_home(home).await?;
            spawn_on(home, crate::store::open(&url).await?).await
        }
        Ok("sqlite") | Err(_) => serve(Fleet::open(home)?).await,
        Ok(other) => Err(FleetError::StoreConfig {
            message: format!("{STORE_VAR}={other}: give postgres or sqlite"),
        }),
    }
}

/// Starts a server over `home`'s engine and store `db`.
pub async fn spawn_on(home: &Path, db: Db) -> Result<TestServer, FleetError> {
    serve(Fleet::open_on(home, db).await?).await
}

async fn serve((fleet, admin_key): (Fleet, Option<String>)) -> Result<TestServer, FleetError> {
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
        keep: false,
    })
}
