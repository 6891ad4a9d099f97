//! The PostgreSQL store (`smolfleet serve --db postgres://…`): the schema of `db.rs`'s
//! [`MIGRATIONS`] in PostgreSQL's [`dialect`], applied under an advisory lock (servers
//! starting together migrate once), over a few `tokio-postgres` connections opened on demand.
//!
//! A database that cannot be reached (refused, closed, shutting down, no answer within
//! [`OP_TIMEOUT`]) makes a call fail with [`FleetError::StoreUnavailable`] (503, retryable);
//! the next call connects again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row};

use super::{Store, StoreFuture};
use crate::db::{
    new_id, now, AuthKey, CheckpointDeleted, CheckpointRow, KeyRow, MachineRow, Restored,
    MIGRATIONS, SCHEMA_VERSION,
};
use crate::error::FleetError;
use crate::keys;
use crate::nodes::{Beat, Joining, Lease, NodeStatus, Removed};
use crate::placement::{self, Need, NodeRow, OperationRow, Placed};

mod nodes;
mod notify;

/// Connections a server keeps.
const POOL: usize = 4;
/// The most a connect takes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most one store call takes (connect included).
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// The advisory lock the migration holds (any constant of ours).
const MIGRATION_LOCK: i64 = 0x736d_6f6c_666c_7431;

/// A migration of `db.rs` (SQLite's dialect) in PostgreSQL's: integers are 64-bit (`BIGINT`;
/// SQLite's `INTEGER` is 64-bit already). The one dialect difference of the schema; the
/// queries differ only in their placeholders (`$1` for `?1`).
pub fn dialect(sqlite: &str) -> String {
    sqlite.replace("INTEGER", "BIGINT")
}

/// A query of SQLite's dialect (`?N` placeholders) in PostgreSQL's (`$N`), with `{lock}` the
/// row locks PostgreSQL takes ([`placement::lock`]) and `{now_ms}` its clock (`nodes.rs`).
fn query(sqlite: &str, lock: &str) -> String {
    sqlite
        .replace('?', "$")
        .replace("{lock}", lock)
        .replace("{now_ms}", crate::nodes::NOW_MS_PG)
}

/// PostgreSQL as a [`Store`].
pub struct PgStore {
    config: tokio_postgres::Config,
    /// Where it is, without credentials (for logs and errors).
    at: String,
    conns: Vec<tokio::sync::Mutex<Option<Client>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("at", &self.at).finish()
    }
}

/// A connection error (or a database going away) as [`FleetError::StoreUnavailable`], any
/// other as [`FleetError::Postgres`].
pub(crate) fn error(what: &'static str, e: tokio_postgres::Error) -> FleetError {
    let unavailable = match e.code() {
        // no SQLSTATE: the connection (refused, closed, an I/O error, the connect timeout),
        // not a conversion of ours
        None => {
            use std::error::Error as _;
            let text = e.to_string();
            e.is_closed()
                || e.source().is_some_and(|s| s.is::<std::io::Error>())
                || text.starts_with("error connecting")
                || text.starts_with("timeout")
                || text.starts_with("error communicating")
        }
        Some(code) => {
            let c = code.code();
            // 08: connection exception, 57: operator intervention (shutdown), 53300: too many
            // connections
            c.starts_with("08") || c.starts_with("57") || *code == SqlState::TOO_MANY_CONNECTIONS
        }
    };
    if unavailable {
        FleetError::StoreUnavailable {
            what,
            message: e.to_string(),
        }
    } else {
        FleetError::Postgres { what, source: e }
    }
}

fn unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, `?host=/socket/dir` for a unix
    /// socket) and migrates its schema to this build's.
    pub async fn connect(url: &str) -> Result<PgStore, FleetError> {
        let mut config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| FleetError::StoreConfig {
                    message: format!("{e}: give postgres://USER@HOST:PORT/DATABASE"),
                })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("smolfleet");
        }
        let at = format!(
            "postgres {:?}:{:?}/{}",
            config.get_hosts(),
            config.get_ports(),
            config.get_dbname().unwrap_or("")
        );
        let store = PgStore {
            config,
            at,
            conns: (0..POOL).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        };
        store.op("migrate the schema", store.migrate()).await?;
        tracing::info!(at = %store.at, version = SCHEMA_VERSION, "fleet store: PostgreSQL");
        Ok(store)
    }

    /// A connection (made again when closed), held until the guard drops.
    async fn conn(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, FleetError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut slot = self.conns[i].lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = self
                .config
                .connect(NoTls)
                .await
                .map_err(|e| error("connect", e))?;
            let at = self.at.clone();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(at = %at, error = %e, "fleet store: connection ended");
                }
            });
            *slot = Some(client);
        }
        Ok(tokio::sync::MutexGuard::map(slot, |s| {
            s.as_mut().expect("connected above")
        }))
    }

    /// `f` bounded by [`OP_TIMEOUT`].
    async fn op<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, FleetError>>,
    ) -> Result<T, FleetError> {
        match tokio::time::timeout(OP_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(FleetError::StoreUnavailable {
                what,
                message: format!("{} did not answer within {OP_TIMEOUT:?}", self.at),
            }),
        }
    }

    async fn migrate(&self) -> Result<(), FleetError> {
        let what = "migrate the schema";
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(|e| error(what, e))?;
        tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| error(what, e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);
             INSERT INTO schema_version SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM schema_version);",
        )
        .await
        .map_err(|e| error(what, e))?;
        let version: i64 = tx
            .query_one("SELECT version FROM schema_version", &[])
            .await
            .map_err(|e| error(what, e))?
            .get(0);
        if version > SCHEMA_VERSION {
            return Err(FleetError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.batch_execute(&dialect(sql))
                .await
                .map_err(|e| error(what, e))?;
            tx.execute("UPDATE schema_version SET version = $1", &[&(i as i64 + 1)])
                .await
                .map_err(|e| error(what, e))?;
        }
        notify::make_triggers(&tx).await?;
        tx.commit().await.map_err(|e| error(what, e))
    }
}

const MACHINE_COLUMNS: &str = "id, tenant_id, name, engine_name, spec, created_at, \
     auto_stop_seconds, ttl_seconds, expires_at, ephemeral, last_activity_at";

use crate::db::CHECKPOINT_COLUMNS;

fn machine_row(r: &Row) -> MachineRow {
    MachineRow {
        id: r.get(0),
        tenant_id: r.get(1),
        name: r.get(2),
        engine_name: r.get(3),
        spec: r.get(4),
        created_at: r.get(5),
        auto_stop_seconds: r.get::<_, Option<i64>>(6).map(|v| v.max(0) as u64),
        ttl_seconds: r.get::<_, Option<i64>>(7).map(|v| v.max(0) as u64),
        expires_at: r.get(8),
        ephemeral: r.get::<_, i64>(9) != 0,
        last_activity_at: r.get(10),
    }
}

fn checkpoint_row(r: &Row) -> CheckpointRow {
    CheckpointRow {
        id: r.get(0),
        tenant_id: r.get(1),
        machine_id: r.get(2),
        spec: r.get(3),
        status: r.get(4),
        size_bytes: r.get::<_, i64>(5).max(0) as u64,
        arch: r.get(6),
        created_at: r.get(7),
        node_id: r.get(8),
    }
}

fn secs(v: Option<u64>) -> Option<i64> {
    v.map(|s| i64::try_from(s).unwrap_or(i64::MAX))
}

/// Inserts `m` (on a client or in a transaction): `false` when the name is taken.
async fn insert_machine_on(
    c: &impl tokio_postgres::GenericClient,
    m: &MachineRow,
) -> Result<bool, FleetError> {
    let t = now();
    let expires = secs(m.ttl_seconds).map(|ttl| t.saturating_add(ttl));
    let r = c
        .execute(
            "INSERT INTO machines (id, tenant_id, name, engine_name, spec, created_at, updated_at,
                                   auto_stop_seconds, ttl_seconds, expires_at, ephemeral,
                                   last_activity_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10, $6)",
            &[
                &m.id,
                &m.tenant_id,
                &m.name,
                &m.engine_name,
                &m.spec,
                &t,
                &secs(m.auto_stop_seconds),
                &secs(m.ttl_seconds),
                &expires,
                &i64::from(m.ephemeral),
            ],
        )
        .await;
    match r {
        Ok(_) => Ok(true),
        Err(e) if unique_violation(&e) => Ok(false),
        Err(e) => Err(error("store a machine", e)),
    }
}

async fn checkpoint_on(
    c: &impl tokio_postgres::GenericClient,
    tenant_id: &str,
    id: &str,
) -> Result<Option<CheckpointRow>, FleetError> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = $1 AND tenant_id = $2"
            ),
            &[&id, &tenant_id],
        )
        .await
        .map_err(|e| error("look up a checkpoint", e))?;
    Ok(row.as_ref().map(checkpoint_row))
}

async fn machines_where(
    s: &PgStore,
    what: &'static str,
    filter: &str,
    args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<MachineRow>, FleetError> {
    let c = s.conn().await?;
    let rows = c
        .query(
            &format!("SELECT {MACHINE_COLUMNS} FROM machines {filter} ORDER BY created_at, id"),
            args,
        )
        .await
        .map_err(|e| error(what, e))?;
    Ok(rows.iter().map(machine_row).collect())
}

async fn create_key_on(
    c: &impl tokio_postgres::GenericClient,
    tenant_id: &str,
    scopes: &str,
    description: Option<&str>,
) -> Result<(String, String), FleetError> {
    let key = keys::generate();
    let id = new_id("key-");
    c.execute(
        "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, scopes, description, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &id,
            &tenant_id,
            &keys::hash(&key),
            &keys::display_prefix(&key),
            &scopes,
            &description,
            &now(),
        ],
    )
    .await
    .map_err(|e| error("store a key", e))?;
    Ok((id, key))
}

async fn create_tenant_on(
    c: &impl tokio_postgres::GenericClient,
    name: &str,
) -> Result<String, FleetError> {
    let id = new_id("ten-");
    c.execute(
        "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)",
        &[&id, &name, &now()],
    )
    .await
    .map_err(|e| error("create a tenant", e))?;
    Ok(id)
}

/// The body of a store call: bounded by [`OP_TIMEOUT`], boxed.
macro_rules! op {
    ($self:ident, $what:literal, $body:expr) => {
        Box::pin(async move { $self.op($what, async move { $body }).await })
    };
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn watch_changes(&self, cache: std::sync::Arc<crate::cache::Cache>) {
        self.listen(cache);
    }

    fn bootstrap<'a>(&'a self, name: &'a str, scopes: &'a str) -> StoreFuture<'a, Option<String>> {
        op!(self, "bootstrap", {
            let what = "bootstrap";
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(|e| error(what, e))?;
            // one bootstrap however many servers start together
            tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(|e| error(what, e))?;
            let any: bool = tx
                .query_one("SELECT EXISTS (SELECT 1 FROM tenants)", &[])
                .await
                .map_err(|e| error(what, e))?
                .get(0);
            if any {
                return Ok(None);
            }
            let tenant = create_tenant_on(&tx, name).await?;
            let (_, key) = create_key_on(&tx, &tenant, scopes, Some("bootstrap")).await?;
            tx.commit().await.map_err(|e| error(what, e))?;
            Ok(Some(key))
        })
    }

    fn has_tenants(&self) -> StoreFuture<'_, bool> {
        op!(self, "count tenants", {
            let c = self.conn().await?;
            let row = c
                .query_one("SELECT EXISTS (SELECT 1 FROM tenants)", &[])
                .await
                .map_err(|e| error("count tenants", e))?;
            Ok(row.get(0))
        })
    }

    fn create_tenant<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String> {
        op!(self, "create a tenant", {
            let c = self.conn().await?;
            create_tenant_on(&*c, name).await
        })
    }

    fn tenant_exists<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        op!(self, "look up a tenant", {
            let c = self.conn().await?;
            let row = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)",
                    &[&id],
                )
                .await
                .map_err(|e| error("look up a tenant", e))?;
            Ok(row.get(0))
        })
    }

    fn create_key<'a>(
        &'a self,
        tenant_id: &'a str,
        scopes: &'a str,
        description: Option<&'a str>,
    ) -> StoreFuture<'a, (String, String)> {
        op!(self, "store a key", {
            let c = self.conn().await?;
            create_key_on(&*c, tenant_id, scopes, description).await
        })
    }

    fn key_of_hash<'a>(&'a self, key_hash: &'a str) -> StoreFuture<'a, Option<AuthKey>> {
        op!(self, "look up a key", {
            let c = self.conn().await?;
            let row = c
                .query_opt(
                    "SELECT key_hash, id, tenant_id, scopes FROM api_keys
                     WHERE key_hash = $1 AND revoked_at IS NULL",
                    &[&key_hash],
                )
                .await
                .map_err(|e| error("look up a key", e))?;
            Ok(row
                .filter(|r| {
                    keys::constant_time_eq(r.get::<_, &str>(0).as_bytes(), key_hash.as_bytes())
                })
                .map(|r| AuthKey {
                    id: r.get(1),
                    tenant_id: r.get(2),
                    scopes: r.get(3),
                }))
        })
    }

    fn list_keys(&self) -> StoreFuture<'_, Vec<KeyRow>> {
        op!(self, "list keys", {
            let c = self.conn().await?;
            let rows = c
                .query(
                    "SELECT id, tenant_id, prefix, scopes, created_at, revoked_at FROM api_keys
                     ORDER BY created_at, id",
                    &[],
                )
                .await
                .map_err(|e| error("list keys", e))?;
            Ok(rows
                .iter()
                .map(|r| KeyRow {
                    id: r.get(0),
                    tenant_id: r.get(1),
                    prefix: r.get(2),
                    scopes: r.get(3),
                    created_at: r.get(4),
                    revoked_at: r.get(5),
                })
                .collect())
        })
    }

    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        op!(self, "revoke a key", {
            let c = self.conn().await?;
            let n = c
                .execute(
                    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                    &[&id, &now()],
                )
                .await
                .map_err(|e| error("revoke a key", e))?;
            Ok(n == 1)
        })
    }

    fn insert_machine<'a>(&'a self, m: &'a MachineRow) -> StoreFuture<'a, bool> {
        op!(self, "store a machine", {
            let c = self.conn().await?;
            insert_machine_on(&*c, m).await
        })
    }

    fn machine<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, Option<MachineRow>> {
        op!(self, "look up a machine", {
            let c = self.conn().await?;
            let row = c
                .query_opt(
                    &format!(
                        "SELECT {MACHINE_COLUMNS} FROM machines WHERE id = $1 AND tenant_id = $2"
                    ),
                    &[&id, &tenant_id],
                )
                .await
                .map_err(|e| error("look up a machine", e))?;
            Ok(row.as_ref().map(machine_row))
        })
    }

    fn machines<'a>(&'a self, tenant_id: &'a str) -> StoreFuture<'a, Vec<MachineRow>> {
        op!(self, "list machines", {
            machines_where(self, "list machines", "WHERE tenant_id = $1", &[&tenant_id]).await
        })
    }

    fn swept_machines(&self) -> StoreFuture<'_, Vec<MachineRow>> {
        op!(self, "list the machines to sweep", {
            machines_where(
                self,
                "list the machines to sweep",
                "WHERE auto_stop_seconds IS NOT NULL OR expires_at IS NOT NULL OR ephemeral != 0",
                &[],
            )
            .await
        })
    }

    fn all_machines(&self) -> StoreFuture<'_, Vec<MachineRow>> {
        op!(self, "list all machines", {
            machines_where(self, "list all machines", "", &[]).await
        })
    }

    fn set_last_activity<'a>(&'a self, seen: &'a [(String, i64)]) -> StoreFuture<'a, ()> {
        op!(self, "record machine activity", {
            let what = "record machine activity";
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(|e| error(what, e))?;
            let st = tx
                .prepare("UPDATE machines SET last_activity_at = $2 WHERE id = $1")
                .await
                .map_err(|e| error(what, e))?;
            for (id, at) in seen {
                tx.execute(&st, &[id, at])
                    .await
                    .map_err(|e| error(what, e))?;
            }
            tx.commit().await.map_err(|e| error(what, e))
        })
    }

    fn set_machine_spec<'a>(&'a self, id: &'a str, spec: &'a str) -> StoreFuture<'a, ()> {
        op!(self, "store a machine's ports", {
            let c = self.conn().await?;
            c.execute(
                "UPDATE machines SET spec = $2, updated_at = $3 WHERE id = $1",
                &[&id, &spec, &now()],
            )
            .await
            .map_err(|e| error("store a machine's ports", e))?;
            Ok(())
        })
    }

    fn delete_machine<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        op!(self, "remove a machine", {
            let what = "remove a machine";
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(|e| error(what, e))?;
            // its reservation goes back in the same transaction, once however many delete it
            tx.execute(&query(placement::TAKE_PLACEMENT, ""), &[&id])
                .await
                .map_err(|e| error(what, e))?;
            tx.execute("DELETE FROM machines WHERE id = $1", &[&id])
                .await
                .map_err(|e| error(what, e))?;
            tx.execute("DELETE FROM tombstones WHERE machine_id = $1", &[&id])
                .await
                .map_err(|e| error(what, e))?;
            tx.execute(&query(crate::epochs::FORGET, ""), &[&id])
                .await
                .map_err(|e| error(what, e))?;
            tx.commit().await.map_err(|e| error(what, e))
        })
    }

    fn put_node<'a>(&'a self, n: &'a NodeRow) -> StoreFuture<'a, ()> {
        op!(self, "store a node", {
            let c = self.conn().await?;
            c.execute(
                &query(placement::PUT_NODE, ""),
                &[&n.id, &n.state, &n.memory_mib, &n.cpus, &now()],
            )
            .await
            .map_err(|e| error("store a node", e))?;
            Ok(())
        })
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeRow>> {
        op!(self, "list nodes", {
            let c = self.conn().await?;
            let rows = c
                .query(placement::NODES, &[])
                .await
                .map_err(|e| error("list nodes", e))?;
            Ok(rows
                .iter()
                .map(|r| NodeRow {
                    id: r.get(0),
                    state: r.get(1),
                    memory_mib: r.get(2),
                    cpus: r.get(3),
                    reserved_mib: r.get(4),
                    reserved_cpus: r.get(5),
                })
                .collect())
        })
    }

    fn reserve<'a>(&'a self, m: &'a MachineRow, need: Need) -> StoreFuture<'a, Placed> {
        op!(
            self,
            "place a machine",
            self.reserve_retrying(m, need, None, None).await
        )
    }

    fn reserve_on<'a>(
        &'a self,
        m: &'a MachineRow,
        need: Need,
        nodes: &'a [String],
    ) -> StoreFuture<'a, Placed> {
        op!(
            self,
            "place a machine on one of some nodes",
            self.reserve_retrying(m, need, Some(&crate::placement::id_list(nodes)), None)
                .await
        )
    }

    fn reserve_restored<'a>(
        &'a self,
        m: &'a MachineRow,
        need: Need,
        node: &'a str,
        checkpoint_id: &'a str,
    ) -> StoreFuture<'a, Placed> {
        op!(
            self,
            "place a restored machine on its checkpoint's node",
            self.reserve_retrying(
                m,
                need,
                Some(&crate::placement::id_list(&[node.to_owned()])),
                Some(checkpoint_id)
            )
            .await
        )
    }

    fn finish_operation<'a>(&'a self, id: &'a str, state: &'a str) -> StoreFuture<'a, bool> {
        op!(self, "finish an operation", {
            let c = self.conn().await?;
            let n = c
                .execute(
                    &query(placement::FINISH_OPERATION, ""),
                    &[&id, &state, &now()],
                )
                .await
                .map_err(|e| error("finish an operation", e))?;
            Ok(n == 1)
        })
    }

    fn claim_overdue(&self, at: i64, limit: i64, lease: i64) -> StoreFuture<'_, Vec<OperationRow>> {
        op!(self, "claim operations", {
            let what = "claim operations";
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(|e| error(what, e))?;
            let rows = tx
                .query(
                    &query(placement::CLAIM, placement::lock(true, true)),
                    &[&at, &limit, &lease],
                )
                .await
                .map_err(|e| error(what, e))?;
            for r in &rows {
                let machine: &str = r.get(2);
                tx.execute(&query(crate::epochs::BUMP, ""), &[&machine])
                    .await
                    .map_err(|e| error(what, e))?;
            }
            tx.commit().await.map_err(|e| error(what, e))?;
            Ok(rows
                .iter()
                .map(|r| OperationRow {
                    id: r.get(0),
                    tenant_id: r.get(1),
                    machine_id: r.get(2),
                    kind: r.get(3),
                    state: r.get(4),
                    node_id: r.get(5),
                    deadline_at: r.get(6),
                })
                .collect())
        })
    }

    fn raise_epoch<'a>(&'a self, machine_id: &'a str, epoch: i64) -> StoreFuture<'a, i64> {
        op!(self, "record a placement epoch", {
            let c = self.conn().await?;
            let row = c
                .query_one(crate::epochs::RAISE_PG, &[&machine_id, &epoch])
                .await
                .map_err(|e| error("record a placement epoch", e))?;
            Ok(row.get(0))
        })
    }

    fn insert_checkpoint<'a>(&'a self, k: &'a CheckpointRow) -> StoreFuture<'a, CheckpointRow> {
        op!(self, "store a checkpoint", {
            let stored = CheckpointRow {
                created_at: now(),
                ..k.clone()
            };
            let c = self.conn().await?;
            c.execute(
                &format!(
                    "INSERT INTO checkpoints ({CHECKPOINT_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                ),
                &[
                    &stored.id,
                    &stored.tenant_id,
                    &stored.machine_id,
                    &stored.spec,
                    &stored.status,
                    &i64::try_from(stored.size_bytes).unwrap_or(i64::MAX),
                    &stored.arch,
                    &stored.created_at,
                    &stored.node_id,
                ],
            )
            .await
            .map_err(|e| error("store a checkpoint", e))?;
            Ok(stored)
        })
    }

    fn checkpoint<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, Option<CheckpointRow>> {
        op!(self, "look up a checkpoint", {
            let c = self.conn().await?;
            checkpoint_on(&*c, tenant_id, id).await
        })
    }

    fn checkpoints_of<'a>(
        &'a self,
        tenant_id: &'a str,
        machine_id: &'a str,
    ) -> StoreFuture<'a, Vec<CheckpointRow>> {
        op!(self, "list checkpoints", {
            let c = self.conn().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints
                         WHERE tenant_id = $1 AND machine_id = $2 ORDER BY created_at, id"
                    ),
                    &[&tenant_id, &machine_id],
                )
                .await
                .map_err(|e| error("list checkpoints", e))?;
            Ok(rows.iter().map(checkpoint_row).collect())
        })
    }

    fn insert_restored<'a>(
        &'a self,
        m: &'a MachineRow,
        checkpoint_id: &'a str,
    ) -> StoreFuture<'a, Restored> {
        op!(self, "record a restore", {
            let what = "record a restore";
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(|e| error(what, e))?;
            if checkpoint_on(&tx, &m.tenant_id, checkpoint_id)
                .await?
                .is_none()
            {
                return Ok(Restored::NoCheckpoint);
            }
            if !insert_machine_on(&tx, m).await? {
                return Ok(Restored::NameTaken);
            }
            tx.execute(
                "INSERT INTO checkpoint_restores (machine_id, checkpoint_id) VALUES ($1, $2)",
                &[&m.id, &checkpoint_id],
            )
            .await
            .map_err(|e| error("link a restored machine to its checkpoint", e))?;
            tx.commit().await.map_err(|e| error(what, e))?;
            Ok(Restored::Reserved)
        })
    }

    fn put_ca<'a>(&'a self, cert_pem: &'a str, key_pem: &'a str) -> StoreFuture<'a, bool> {
        op!(
            self,
            "store the fleet CA",
            self.put_ca_on(cert_pem, key_pem).await
        )
    }

    fn ca(&self) -> StoreFuture<'_, Option<(String, String)>> {
        op!(self, "read the fleet CA", self.ca_on().await)
    }

    fn create_join_token<'a>(&'a self, hash: &'a str, ttl_ms: i64) -> StoreFuture<'a, String> {
        op!(
            self,
            "store a join token",
            self.create_join_token_on(hash, ttl_ms).await
        )
    }

    fn join_node<'a>(
        &'a self,
        hash: &'a str,
        n: &'a Joining,
        lease: Lease,
    ) -> StoreFuture<'a, bool> {
        op!(self, "join a node", self.join_node_on(hash, n, lease).await)
    }

    fn heartbeat<'a>(
        &'a self,
        cert_sha256: &'a str,
        lease: Lease,
        memory_mib: i64,
        cpus: i64,
    ) -> StoreFuture<'a, Beat> {
        op!(
            self,
            "renew a lease",
            self.heartbeat_on(cert_sha256, lease, memory_mib, cpus)
                .await
        )
    }

    fn node_status(&self) -> StoreFuture<'_, Vec<NodeStatus>> {
        op!(self, "list nodes", self.node_status_on().await)
    }

    fn set_node_state<'a>(&'a self, id: &'a str, state: &'a str) -> StoreFuture<'a, bool> {
        op!(
            self,
            "set a node's state",
            self.set_node_state_on(id, state).await
        )
    }

    fn remove_node<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Removed> {
        op!(self, "remove a node", self.remove_node_on(id).await)
    }

    fn tombstone<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        op!(self, "tombstone a machine", {
            let c = self.conn().await?;
            c.execute(&query(crate::remote::TOMBSTONE, ""), &[&id, &now()])
                .await
                .map_err(|e| error("tombstone a machine", e))?;
            Ok(())
        })
    }

    fn tombstoned(&self) -> StoreFuture<'_, Vec<MachineRow>> {
        op!(self, "list tombstoned machines", {
            machines_where(
                self,
                "list tombstoned machines",
                "WHERE id IN (SELECT machine_id FROM tombstones)",
                &[],
            )
            .await
        })
    }

    fn set_node_api<'a>(&'a self, id: &'a str, url: &'a str) -> StoreFuture<'a, ()> {
        op!(self, "record a node's API", {
            let c = self.conn().await?;
            c.execute(&query(crate::remote::SET_NODE_API, ""), &[&id, &url])
                .await
                .map_err(|e| error("record a node's API", e))?;
            Ok(())
        })
    }

    fn set_node_labels<'a>(&'a self, id: &'a str, labels_json: &'a str) -> StoreFuture<'a, ()> {
        op!(
            self,
            "record a node's labels",
            self.set_node_labels_on(id, labels_json).await
        )
    }

    fn placed_machines<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        op!(self, "list a node's placements", {
            let c = self.conn().await?;
            let rows = c
                .query(&query(crate::reconcile::PLACED_MACHINES, ""), &[&node_id])
                .await
                .map_err(|e| error("list a node's placements", e))?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn node_of_cert<'a>(&'a self, cert_sha256: &'a str) -> StoreFuture<'a, Option<String>> {
        op!(
            self,
            "find a node by its certificate",
            self.node_of_cert_on(cert_sha256).await
        )
    }

    fn rotate_node_cert<'a>(
        &'a self,
        id: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> StoreFuture<'a, bool> {
        op!(
            self,
            "renew a node's certificate",
            self.rotate_node_cert_on(id, old, new).await
        )
    }

    fn node_at<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<crate::remote::NodeAt>> {
        op!(self, "find a node", self.node_at_on(id).await)
    }

    fn machine_node<'a>(
        &'a self,
        machine_id: &'a str,
    ) -> StoreFuture<'a, Option<crate::remote::NodeAt>> {
        op!(self, "find a machine's node", {
            let c = self.conn().await?;
            let row = c
                .query_opt(&query(crate::remote::MACHINE_NODE, ""), &[&machine_id])
                .await
                .map_err(|e| error("find a machine's node", e))?;
            Ok(row.map(|r| crate::remote::NodeAt {
                id: r.get(0),
                api_url: r.get(1),
                liveness: r.get(2),
                lease_until: r.get(3),
                lease_left_ms: r.get(4),
                deleting: r.get::<_, i32>(5) != 0,
                placement: Some(crate::epochs::PlacementEpoch {
                    machine_id: machine_id.to_owned(),
                    epoch: r.get(6),
                }),
            }))
        })
    }

    fn delete_checkpoint<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, CheckpointDeleted> {
        op!(self, "remove a checkpoint", {
            let what = "remove a checkpoint";
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(|e| error(what, e))?;
            // the row locked: a restore linking to it waits for this removal
            let found = tx
                .query_opt(
                    "SELECT id FROM checkpoints WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
                    &[&id, &tenant_id],
                )
                .await
                .map_err(|e| error(what, e))?;
            if found.is_none() {
                return Ok(CheckpointDeleted::NotFound);
            }
            let users: Vec<String> = tx
                .query(
                    "SELECT machine_id FROM checkpoint_restores WHERE checkpoint_id = $1
                     ORDER BY machine_id",
                    &[&id],
                )
                .await
                .map_err(|e| error("list a checkpoint's machines", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !users.is_empty() {
                return Ok(CheckpointDeleted::InUse(users));
            }
            tx.execute("DELETE FROM checkpoints WHERE id = $1", &[&id])
                .await
                .map_err(|e| error(what, e))?;
            tx.commit().await.map_err(|e| error(what, e))?;
            Ok(CheckpointDeleted::Deleted)
        })
    }
}
