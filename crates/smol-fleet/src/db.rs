//! The fleet's state as SQLite holds it (`<home>/fleet.db`, WAL): tenants, API keys, machines
//! and checkpoints; the rows every store returns; and the one migration set
//! ([`MIGRATIONS`]) both stores apply (`store/pg.rs` in its dialect). Every call runs on
//! tokio's blocking pool ([`Sqlite::call`]); the server reaches these through
//! [`crate::store::Store`].

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::FleetError;
use crate::keys;

/// The schema version this build writes (`PRAGMA user_version`).
pub(crate) const SCHEMA_VERSION: i64 = 10;

const SCHEMA_V1: &str = "
CREATE TABLE tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    description TEXT,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE TABLE machines (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    engine_name TEXT NOT NULL UNIQUE,
    spec        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
";

/// Version 2: the lifetime of a machine (SPEC §10.6), enforced by the sweeper: the idle
/// stop, the deadline of its TTL (unix seconds, `NULL` without one), deletion on stop, and
/// its last activity (unix seconds) as last flushed.
const SCHEMA_V2: &str = "
ALTER TABLE machines ADD COLUMN auto_stop_seconds INTEGER;
ALTER TABLE machines ADD COLUMN ttl_seconds INTEGER;
ALTER TABLE machines ADD COLUMN expires_at INTEGER;
ALTER TABLE machines ADD COLUMN ephemeral INTEGER NOT NULL DEFAULT 0;
ALTER TABLE machines ADD COLUMN last_activity_at INTEGER;
";

/// Version 3: portable checkpoints (SPEC §10.5.9, `checkpoint.rs`): one row per
/// `<home>/checkpoints/<id>.smolcheckpoint` file, with the create body of the machine it was
/// taken of (what a restore records the new machine with), and which machines were restored
/// from which checkpoint (a checkpoint in use is not deleted; the link goes with the machine).
const SCHEMA_V3: &str = "
CREATE TABLE checkpoints (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    machine_id TEXT NOT NULL,
    spec       TEXT NOT NULL,
    status     TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    arch       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX checkpoints_of_machine ON checkpoints (tenant_id, machine_id, created_at);
CREATE TABLE checkpoint_restores (
    machine_id    TEXT PRIMARY KEY REFERENCES machines(id) ON DELETE CASCADE,
    checkpoint_id TEXT NOT NULL REFERENCES checkpoints(id)
);
";

/// The schema, one migration per version (version `i + 1` is `MIGRATIONS[i]`), written in
/// SQLite's dialect; `store::pg::dialect` turns one into PostgreSQL's.
pub(crate) const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    SCHEMA_V1,
    SCHEMA_V2,
    SCHEMA_V3,
    crate::placement::SCHEMA_V4,
    crate::nodes::SCHEMA_V5,
    crate::remote::SCHEMA_V6,
    crate::remote::SCHEMA_V7,
    crate::labels::SCHEMA_V8,
    crate::remotecheckpoint::SCHEMA_V9,
    crate::epochs::SCHEMA_V10,
];

/// A tenant's key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// `key-…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The first characters of the key, for display.
    pub prefix: String,
    /// Space-separated scopes.
    pub scopes: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<i64>,
}

/// A machine of a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRow {
    /// `mach-…`, what the API names it by.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The tenant's name for it (unique per tenant).
    pub name: String,
    /// Its name in the engine.
    pub engine_name: String,
    /// The create body as accepted (JSON), for what the engine does not keep.
    pub spec: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Stop after this many idle seconds.
    pub auto_stop_seconds: Option<u64>,
    /// Delete this many seconds after `created_at`.
    pub ttl_seconds: Option<u64>,
    /// `created_at + ttl_seconds` (unix seconds), set when the row is stored.
    pub expires_at: Option<i64>,
    /// Deleted when it stops.
    pub ephemeral: bool,
    /// Unix seconds of the last activity the sweeper flushed (`None`: none yet).
    pub last_activity_at: Option<i64>,
}

/// The SQLite database, shared.
#[derive(Debug, Clone)]
pub struct Sqlite {
    conn: Arc<Mutex<Connection>>,
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix seconds of the database as the core's RFC 3339 form.
pub fn rfc3339(unix: i64) -> String {
    smolmachines::config::rfc3339(u64::try_from(unix).unwrap_or(0))
}

/// `prefix` + 16 random lower-case hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

impl Sqlite {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Sqlite, FleetError> {
        let conn = Connection::open(path).map_err(|e| FleetError::db("open the database", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| FleetError::db("set the busy timeout", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| FleetError::db("enable WAL", e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| FleetError::db("enable foreign keys", e))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| FleetError::db("read the schema version", e))?;
        if version > SCHEMA_VERSION {
            return Err(FleetError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            conn.execute_batch(&format!(
                "BEGIN; {sql} PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))
            .map_err(|e| FleetError::db("migrate the schema", e))?;
        }
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, FleetError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, FleetError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn.lock().map_err(|_| FleetError::Poisoned)?;
            f(&guard)
        })
        .await
        .map_err(|e| FleetError::Join(e.to_string()))?
    }

    /// Runs `f` on the connection on this thread (the CLI, start-up).
    pub fn call_sync<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, FleetError>,
    ) -> Result<T, FleetError> {
        let guard = self.conn.lock().map_err(|_| FleetError::Poisoned)?;
        f(&guard)
    }
}

/// Whether any tenant exists.
pub fn has_tenants(c: &Connection) -> Result<bool, FleetError> {
    c.query_row("SELECT EXISTS (SELECT 1 FROM tenants)", [], |r| r.get(0))
        .map_err(|e| FleetError::db("count tenants", e))
}

/// On a database without tenants: tenant `name` and a key of `scopes` for it, in one
/// transaction; the key.
pub fn bootstrap(c: &Connection, name: &str, scopes: &str) -> Result<Option<String>, FleetError> {
    let tx = c
        .unchecked_transaction()
        .map_err(|e| FleetError::db("begin the bootstrap", e))?;
    if has_tenants(&tx)? {
        return Ok(None);
    }
    let tenant = create_tenant(&tx, name)?;
    let (_, key) = create_key(&tx, &tenant, scopes, Some("bootstrap"))?;
    tx.commit()
        .map_err(|e| FleetError::db("commit the bootstrap", e))?;
    Ok(Some(key))
}

/// Creates a tenant; its id.
pub fn create_tenant(c: &Connection, name: &str) -> Result<String, FleetError> {
    let id = new_id("ten-");
    c.execute(
        "INSERT INTO tenants (id, name, created_at) VALUES (?1, ?2, ?3)",
        params![id, name, now()],
    )
    .map_err(|e| FleetError::db("create a tenant", e))?;
    Ok(id)
}

/// Whether tenant `id` exists.
pub fn tenant_exists(c: &Connection, id: &str) -> Result<bool, FleetError> {
    c.query_row(
        "SELECT EXISTS (SELECT 1 FROM tenants WHERE id = ?1)",
        [id],
        |r| r.get(0),
    )
    .map_err(|e| FleetError::db("look up a tenant", e))
}

/// Creates a key for `tenant_id`; `(key id, the key)`. The key is returned once and only
/// its hash is stored.
pub fn create_key(
    c: &Connection,
    tenant_id: &str,
    scopes: &str,
    description: Option<&str>,
) -> Result<(String, String), FleetError> {
    let key = keys::generate();
    let id = new_id("key-");
    c.execute(
        "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, scopes, description, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            tenant_id,
            keys::hash(&key),
            keys::display_prefix(&key),
            scopes,
            description,
            now()
        ],
    )
    .map_err(|e| FleetError::db("store a key", e))?;
    Ok((id, key))
}

/// An unrevoked key as authentication finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKey {
    /// `key-…` (what the rate limit counts by).
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Space-separated scopes.
    pub scopes: String,
}

/// The unrevoked key whose hash is `key_hash`.
pub fn key_of_hash(c: &Connection, key_hash: &str) -> Result<Option<AuthKey>, FleetError> {
    let row: Option<(String, AuthKey)> = c
        .query_row(
            "SELECT key_hash, id, tenant_id, scopes FROM api_keys
             WHERE key_hash = ?1 AND revoked_at IS NULL",
            [key_hash],
            |r| {
                Ok((
                    r.get(0)?,
                    AuthKey {
                        id: r.get(1)?,
                        tenant_id: r.get(2)?,
                        scopes: r.get(3)?,
                    },
                ))
            },
        )
        .optional()
        .map_err(|e| FleetError::db("look up a key", e))?;
    Ok(row
        .filter(|(stored, _)| keys::constant_time_eq(stored.as_bytes(), key_hash.as_bytes()))
        .map(|(_, k)| k))
}

/// Every key (all tenants), oldest first.
pub fn list_keys(c: &Connection) -> Result<Vec<KeyRow>, FleetError> {
    let mut st = c
        .prepare(
            "SELECT id, tenant_id, prefix, scopes, created_at, revoked_at FROM api_keys
             ORDER BY created_at, id",
        )
        .map_err(|e| FleetError::db("list keys", e))?;
    let rows = st
        .query_map([], |r| {
            Ok(KeyRow {
                id: r.get(0)?,
                tenant_id: r.get(1)?,
                prefix: r.get(2)?,
                scopes: r.get(3)?,
                created_at: r.get(4)?,
                revoked_at: r.get(5)?,
            })
        })
        .map_err(|e| FleetError::db("list keys", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list keys", e))
}

/// Revokes key `id`; whether it existed and was live.
pub fn revoke_key(c: &Connection, id: &str) -> Result<bool, FleetError> {
    let n = c
        .execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now()],
        )
        .map_err(|e| FleetError::db("revoke a key", e))?;
    Ok(n == 1)
}

/// Reserves `name` for a new machine of `tenant_id`: `Ok(false)` when the tenant already has
/// a machine of that name.
pub fn insert_machine(c: &Connection, m: &MachineRow) -> Result<bool, FleetError> {
    let t = now();
    let secs = |v: Option<u64>| v.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    let expires = secs(m.ttl_seconds).map(|ttl| t.saturating_add(ttl));
    match c.execute(
        "INSERT INTO machines (id, tenant_id, name, engine_name, spec, created_at, updated_at,
                               auto_stop_seconds, ttl_seconds, expires_at, ephemeral,
                               last_activity_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?6)",
        params![
            m.id,
            m.tenant_id,
            m.name,
            m.engine_name,
            m.spec,
            t,
            secs(m.auto_stop_seconds),
            secs(m.ttl_seconds),
            expires,
            m.ephemeral
        ],
    ) {
        Ok(_) => Ok(true),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Ok(false)
        }
        Err(e) => Err(FleetError::db("store a machine", e)),
    }
}

pub(crate) fn machine_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MachineRow> {
    Ok(MachineRow {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        name: r.get(2)?,
        engine_name: r.get(3)?,
        spec: r.get(4)?,
        created_at: r.get(5)?,
        auto_stop_seconds: r.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
        ttl_seconds: r.get::<_, Option<i64>>(7)?.map(|v| v.max(0) as u64),
        expires_at: r.get(8)?,
        ephemeral: r.get(9)?,
        last_activity_at: r.get(10)?,
    })
}

pub(crate) const MACHINE_COLUMNS: &str = "id, tenant_id, name, engine_name, spec, created_at, \
     auto_stop_seconds, ttl_seconds, expires_at, ephemeral, last_activity_at";

/// Machine `id` of `tenant_id` (another tenant's is `None`, as a missing one).
pub fn machine(
    c: &Connection,
    tenant_id: &str,
    id: &str,
) -> Result<Option<MachineRow>, FleetError> {
    c.query_row(
        &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = ?1 AND tenant_id = ?2"),
        [id, tenant_id],
        machine_row,
    )
    .optional()
    .map_err(|e| FleetError::db("look up a machine", e))
}

/// The machines of `tenant_id`, oldest first.
pub fn machines(c: &Connection, tenant_id: &str) -> Result<Vec<MachineRow>, FleetError> {
    let mut st = c
        .prepare(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE tenant_id = ?1 ORDER BY created_at, id"
        ))
        .map_err(|e| FleetError::db("list machines", e))?;
    let rows = st
        .query_map([tenant_id], machine_row)
        .map_err(|e| FleetError::db("list machines", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list machines", e))
}

/// Every machine with a lifetime to enforce (an idle stop, a TTL or `ephemeral`), all
/// tenants, oldest first.
pub fn swept_machines(c: &Connection) -> Result<Vec<MachineRow>, FleetError> {
    let mut st = c
        .prepare(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines
             WHERE auto_stop_seconds IS NOT NULL OR expires_at IS NOT NULL OR ephemeral != 0
             ORDER BY created_at, id"
        ))
        .map_err(|e| FleetError::db("list the machines to sweep", e))?;
    let rows = st
        .query_map([], machine_row)
        .map_err(|e| FleetError::db("list the machines to sweep", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list the machines to sweep", e))
}

/// Every machine of every tenant (the test server's teardown).
pub fn all_machines(c: &Connection) -> Result<Vec<MachineRow>, FleetError> {
    let mut st = c
        .prepare(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines ORDER BY created_at, id"
        ))
        .map_err(|e| FleetError::db("list all machines", e))?;
    let rows = st
        .query_map([], machine_row)
        .map_err(|e| FleetError::db("list all machines", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list all machines", e))
}

/// Records the last activity (unix seconds) of machines by id.
pub fn set_last_activity(c: &Connection, seen: &[(String, i64)]) -> Result<(), FleetError> {
    let mut st = c
        .prepare("UPDATE machines SET last_activity_at = ?2 WHERE id = ?1")
        .map_err(|e| FleetError::db("record machine activity", e))?;
    for (id, at) in seen {
        st.execute(params![id, at])
            .map_err(|e| FleetError::db("record machine activity", e))?;
    }
    Ok(())
}

/// Replaces machine `id`'s create body.
pub fn set_machine_spec(c: &Connection, id: &str, spec: &str) -> Result<(), FleetError> {
    c.execute(
        "UPDATE machines SET spec = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, spec, now()],
    )
    .map_err(|e| FleetError::db("store a machine's ports", e))?;
    Ok(())
}

/// Removes machine `id`'s record, giving back its node reservation (one transaction).
pub fn delete_machine(c: &Connection, id: &str) -> Result<(), FleetError> {
    let tx = c
        .unchecked_transaction()
        .map_err(|e| FleetError::db("begin a machine removal", e))?;
    crate::placement::release(&tx, id)?;
    tx.execute("DELETE FROM machines WHERE id = ?1", [id])
        .map_err(|e| FleetError::db("remove a machine", e))?;
    tx.execute("DELETE FROM tombstones WHERE machine_id = ?1", [id])
        .map_err(|e| FleetError::db("remove a machine's tombstone", e))?;
    tx.execute(crate::epochs::FORGET, [id])
        .map_err(|e| FleetError::db("remove a machine's placement epoch", e))?;
    tx.commit()
        .map_err(|e| FleetError::db("commit a machine removal", e))?;
    Ok(())
}

/// A checkpoint of a tenant (its file is `<home>/checkpoints/<id>.smolcheckpoint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    /// `ckpt-…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The machine it was taken of (`mach-…`; it may be gone since).
    pub machine_id: String,
    /// That machine's create body (JSON) when it was taken.
    pub spec: String,
    /// `ready`.
    pub status: String,
    /// Bytes of the file.
    pub size_bytes: u64,
    /// Guest architecture.
    pub arch: String,
    /// Unix seconds (set when stored).
    pub created_at: i64,
    /// The node whose home holds the file (`remotecheckpoint.rs`; none: this server's own).
    pub node_id: Option<String>,
}

/// The columns of [`CheckpointRow`], in its order (both stores read them so).
pub(crate) const CHECKPOINT_COLUMNS: &str =
    "id, tenant_id, machine_id, spec, status, size_bytes, arch, created_at, node_id";

fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        machine_id: r.get(2)?,
        spec: r.get(3)?,
        status: r.get(4)?,
        size_bytes: r.get::<_, i64>(5)?.max(0) as u64,
        arch: r.get(6)?,
        created_at: r.get(7)?,
        node_id: r.get(8)?,
    })
}

/// Stores checkpoint `k` (its `created_at` is now); the row as stored.
pub fn insert_checkpoint(c: &Connection, k: &CheckpointRow) -> Result<CheckpointRow, FleetError> {
    let stored = CheckpointRow {
        created_at: now(),
        ..k.clone()
    };
    c.execute(
        &format!("INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
        params![
            stored.id,
            stored.tenant_id,
            stored.machine_id,
            stored.spec,
            stored.status,
            i64::try_from(stored.size_bytes).unwrap_or(i64::MAX),
            stored.arch,
            stored.created_at,
            stored.node_id
        ],
    )
    .map_err(|e| FleetError::db("store a checkpoint", e))?;
    Ok(stored)
}

/// Checkpoint `id` of `tenant_id` (another tenant's is `None`, as a missing one).
pub fn checkpoint(
    c: &Connection,
    tenant_id: &str,
    id: &str,
) -> Result<Option<CheckpointRow>, FleetError> {
    c.query_row(
        &format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = ?1 AND tenant_id = ?2"),
        [id, tenant_id],
        checkpoint_row,
    )
    .optional()
    .map_err(|e| FleetError::db("look up a checkpoint", e))
}

/// The checkpoints of `tenant_id` taken of machine `machine_id`, oldest first.
pub fn checkpoints_of(
    c: &Connection,
    tenant_id: &str,
    machine_id: &str,
) -> Result<Vec<CheckpointRow>, FleetError> {
    let mut st = c
        .prepare(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE tenant_id = ?1 AND machine_id = ?2
             ORDER BY created_at, id"
        ))
        .map_err(|e| FleetError::db("list checkpoints", e))?;
    let rows = st
        .query_map([tenant_id, machine_id], checkpoint_row)
        .map_err(|e| FleetError::db("list checkpoints", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list checkpoints", e))
}

/// What [`insert_restored`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The machine is recorded, linked to the checkpoint.
    Reserved,
    /// The tenant has a machine of that name.
    NameTaken,
    /// The checkpoint is not the tenant's (or is gone).
    NoCheckpoint,
}

/// Reserves machine `m`, restored from checkpoint `checkpoint_id` of its tenant, and links it
/// to the checkpoint, in one transaction.
pub fn insert_restored(
    c: &Connection,
    m: &MachineRow,
    checkpoint_id: &str,
) -> Result<Restored, FleetError> {
    let tx = c
        .unchecked_transaction()
        .map_err(|e| FleetError::db("begin a restore", e))?;
    if checkpoint(&tx, &m.tenant_id, checkpoint_id)?.is_none() {
        return Ok(Restored::NoCheckpoint);
    }
    if !insert_machine(&tx, m)? {
        return Ok(Restored::NameTaken);
    }
    tx.execute(
        "INSERT INTO checkpoint_restores (machine_id, checkpoint_id) VALUES (?1, ?2)",
        [&m.id, checkpoint_id],
    )
    .map_err(|e| FleetError::db("link a restored machine to its checkpoint", e))?;
    tx.commit()
        .map_err(|e| FleetError::db("commit a restore", e))?;
    Ok(Restored::Reserved)
}

/// What [`delete_checkpoint`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointDeleted {
    /// The row is gone (the caller removes the file).
    Deleted,
    /// No such checkpoint of the tenant.
    NotFound,
    /// These machines were restored from it and still exist: kept.
    InUse(Vec<String>),
}

/// Removes checkpoint `id` of `tenant_id` unless a machine restored from it still exists.
pub fn delete_checkpoint(
    c: &Connection,
    tenant_id: &str,
    id: &str,
) -> Result<CheckpointDeleted, FleetError> {
    let tx = c
        .unchecked_transaction()
        .map_err(|e| FleetError::db("begin a checkpoint removal", e))?;
    if checkpoint(&tx, tenant_id, id)?.is_none() {
        return Ok(CheckpointDeleted::NotFound);
    }
    let users = {
        let mut st = tx
            .prepare(
                "SELECT machine_id FROM checkpoint_restores WHERE checkpoint_id = ?1
                 ORDER BY machine_id",
            )
            .map_err(|e| FleetError::db("list a checkpoint's machines", e))?;
        let rows = st
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(|e| FleetError::db("list a checkpoint's machines", e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| FleetError::db("list a checkpoint's machines", e))?
    };
    if !users.is_empty() {
        return Ok(CheckpointDeleted::InUse(users));
    }
    tx.execute("DELETE FROM checkpoints WHERE id = ?1", [id])
        .map_err(|e| FleetError::db("remove a checkpoint", e))?;
    tx.commit()
        .map_err(|e| FleetError::db("commit a checkpoint removal", e))?;
    Ok(CheckpointDeleted::Deleted)
}

/// A machine row for unit tests: `id` of `tenant` named `name` (its engine name its id), no
/// lifetimes, an empty spec.
#[cfg(test)]
pub(crate) fn test_row(id: &str, tenant: &str, name: &str) -> MachineRow {
    MachineRow {
        id: id.into(),
        tenant_id: tenant.into(),
        name: name.into(),
        engine_name: id.into(),
        spec: "{}".into(),
        created_at: 0,
        auto_stop_seconds: None,
        ttl_seconds: None,
        expires_at: None,
        ephemeral: false,
        last_activity_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_hash_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open(&dir.path().join("fleet.db")).unwrap();
        db.call_sync(|c| {
            assert!(!has_tenants(c)?);
            let t = create_tenant(c, "a")?;
            let (id, key) = create_key(c, &t, "admin", None)?;
            let found = key_of_hash(c, &keys::hash(&key))?.expect("the key");
            assert_eq!(
                (found.id.as_str(), found.tenant_id.as_str()),
                (id.as_str(), t.as_str())
            );
            assert_eq!(found.scopes, "admin");
            assert_eq!(key_of_hash(c, &keys::hash("smk_other"))?, None);
            let listed = list_keys(c)?;
            assert_eq!(listed.len(), 1);
            assert!(key.starts_with(&listed[0].prefix));
            // the key itself is nowhere in the database
            assert!(listed[0].prefix.len() < key.len());
            assert!(revoke_key(c, &id)?);
            assert!(!revoke_key(c, &id)?);
            assert_eq!(key_of_hash(c, &keys::hash(&key))?, None);
            Ok(())
        })
        .unwrap();
        // reopening keeps everything (the schema is not made twice)
        let db = Sqlite::open(&dir.path().join("fleet.db")).unwrap();
        assert!(db.call_sync(has_tenants).unwrap());
    }

    #[test]
    fn a_version_1_database_gains_the_lifetime_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "BEGIN; {SCHEMA_V1} PRAGMA user_version = 1;
                 INSERT INTO tenants VALUES ('ten-1', 'a', 1);
                 INSERT INTO machines VALUES ('mach-1', 'ten-1', 'old', 'mach-1', '{{}}', 5, 5);
                 COMMIT;"
            ))
            .unwrap();
        }
        let db = Sqlite::open(&path).unwrap();
        db.call_sync(|c| {
            let old = machine(c, "ten-1", "mach-1")?.expect("the old machine");
            assert_eq!(
                (old.auto_stop_seconds, old.ttl_seconds, old.expires_at),
                (None, None, None)
            );
            assert!(!old.ephemeral);
            // no lifetime: nothing to sweep
            assert!(swept_machines(c)?.is_empty());
            let version: i64 = c
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, SCHEMA_VERSION);
            let mut row = old.clone();
            row.id = "mach-2".into();
            row.engine_name = "mach-2".into();
            row.name = "new".into();
            row.ttl_seconds = Some(60);
            row.ephemeral = true;
            assert!(insert_machine(c, &row)?);
            let new = machine(c, "ten-1", "mach-2")?.unwrap();
            assert_eq!(new.expires_at, Some(new.created_at + 60));
            assert_eq!(new.last_activity_at, Some(new.created_at));
            set_last_activity(c, &[("mach-2".into(), new.created_at + 7)])?;
            let swept = swept_machines(c)?;
            assert_eq!(swept.len(), 1);
            assert_eq!(swept[0].last_activity_at, Some(new.created_at + 7));
            assert!(swept[0].ephemeral);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn machine_names_are_unique_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open(&dir.path().join("fleet.db")).unwrap();
        db.call_sync(|c| {
            let a = create_tenant(c, "a")?;
            let b = create_tenant(c, "b")?;
            let row = test_row;
            assert!(insert_machine(c, &row("mach-1", &a, "web"))?);
            assert!(!insert_machine(c, &row("mach-2", &a, "web"))?);
            assert!(insert_machine(c, &row("mach-3", &b, "web"))?);
            assert!(machine(c, &a, "mach-1")?.is_some());
            assert!(machine(c, &b, "mach-1")?.is_none());
            assert_eq!(machines(c, &a)?.len(), 1);
            delete_machine(c, "mach-1")?;
            assert!(machine(c, &a, "mach-1")?.is_none());
            Ok(())
        })
        .unwrap();
    }
    #[test]
    fn checkpoints_are_per_tenant_and_kept_while_a_restored_machine_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let db = Sqlite::open(&path).unwrap();
        let (a, b) = db
            .call_sync(|c| Ok((create_tenant(c, "a")?, create_tenant(c, "b")?)))
            .unwrap();
        let ckpt = CheckpointRow {
            id: "ckpt-1".into(),
            tenant_id: a.clone(),
            machine_id: "mach-src".into(),
            spec: "{}".into(),
            status: "ready".into(),
            size_bytes: 1 << 40,
            arch: "x86_64".into(),
            created_at: 0,
            node_id: None,
        };
        let machine = test_row;
        db.call_sync(|c| {
            let stored = insert_checkpoint(c, &ckpt)?;
            assert!(stored.created_at > 0);
            assert_eq!(checkpoint(c, &a, "ckpt-1")?, Some(stored.clone()));
            assert_eq!(checkpoint(c, &b, "ckpt-1")?, None);
            assert_eq!(checkpoints_of(c, &a, "mach-src")?, vec![stored]);
            assert!(checkpoints_of(c, &b, "mach-src")?.is_empty());
            // the other tenant can neither restore nor delete it
            assert_eq!(
                insert_restored(c, &machine("mach-b", &b, "r"), "ckpt-1")?,
                Restored::NoCheckpoint
            );
            assert!(!machine_exists(c, "mach-b"));
            assert_eq!(
                delete_checkpoint(c, &b, "ckpt-1")?,
                CheckpointDeleted::NotFound
            );
            // a restore links the machine; a taken name reserves nothing
            assert_eq!(
                insert_restored(c, &machine("mach-r", &a, "r"), "ckpt-1")?,
                Restored::Reserved
            );
            assert_eq!(
                insert_restored(c, &machine("mach-r2", &a, "r"), "ckpt-1")?,
                Restored::NameTaken
            );
            assert!(!machine_exists(c, "mach-r2"));
            assert_eq!(
                delete_checkpoint(c, &a, "ckpt-1")?,
                CheckpointDeleted::InUse(vec!["mach-r".into()])
            );
            Ok(())
        })
        .unwrap();
        // rows survive a reopen; deleting the machine releases the checkpoint
        let db = Sqlite::open(&path).unwrap();
        db.call_sync(|c| {
            assert!(checkpoint(c, &a, "ckpt-1")?.is_some());
            delete_machine(c, "mach-r")?;
            assert_eq!(
                delete_checkpoint(c, &a, "ckpt-1")?,
                CheckpointDeleted::Deleted
            );
            assert_eq!(checkpoint(c, &a, "ckpt-1")?, None);
            assert_eq!(
                delete_checkpoint(c, &a, "ckpt-1")?,
                CheckpointDeleted::NotFound
            );
            Ok(())
        })
        .unwrap();
    }

    fn machine_exists(c: &Connection, id: &str) -> bool {
        c.query_row(
            "SELECT EXISTS (SELECT 1 FROM machines WHERE id = ?1)",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    }
}
