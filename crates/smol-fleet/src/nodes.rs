//! Nodes that join (issue 15): the fleet CA in the store, one-time join tokens (stored
//! hashed, expiring) and leases timed by the database's clock (`{now_ms}`: SQLite's
//! `julianday('now')`, PostgreSQL's `now()`), so every control replica judges a node by one
//! clock, whatever its own says.
//!
//! A heartbeat sets `lease_until` (now + lease) and `lost_at` (lease_until + lost-after). A
//! node is `live` while its lease holds, `suspect` past it (placement skips it: `RESERVE` of
//! placement.rs), `lost` past `lost_at`. A node without a lease (`lease_until` NULL, the
//! embedded node of `--role all`) is live.
//!
//! The SQL is written once in SQLite's dialect, as placement.rs's; `store/pg.rs` runs it through
//! its `query`, which also puts PostgreSQL's clock for `{now_ms}`.

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::{new_id, now};
use crate::error::FleetError;
use crate::placement::NodeRow;

/// Schema version 5: leases and certificates of nodes, join tokens, the fleet CA.
pub(crate) const SCHEMA_V5: &str = "
ALTER TABLE nodes ADD COLUMN name TEXT;
ALTER TABLE nodes ADD COLUMN cert_sha256 TEXT;
ALTER TABLE nodes ADD COLUMN lease_until INTEGER;
ALTER TABLE nodes ADD COLUMN lost_at INTEGER;
CREATE UNIQUE INDEX nodes_cert ON nodes (cert_sha256);
CREATE TABLE join_tokens (
    id         TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    node_id    TEXT
);
CREATE TABLE fleet_ca (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem   TEXT NOT NULL,
    key_pem    TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
";

/// The database's clock in Unix milliseconds, SQLite's dialect.
pub(crate) const NOW_MS_SQLITE: &str =
    "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
/// The database's clock in Unix milliseconds, PostgreSQL's dialect.
pub(crate) const NOW_MS_PG: &str = "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)";

/// A query with SQLite's clock for `{now_ms}`.
pub(crate) fn sqlite(sql: &str) -> String {
    sql.replace("{now_ms}", NOW_MS_SQLITE)
}

pub(crate) const PUT_CA: &str = "
INSERT INTO fleet_ca (id, cert_pem, key_pem, created_at) VALUES (1, ?1, ?2, ?3)
ON CONFLICT (id) DO NOTHING";

pub(crate) const CA: &str = "SELECT cert_pem, key_pem FROM fleet_ca WHERE id = 1";

pub(crate) const CREATE_TOKEN: &str = "
INSERT INTO join_tokens (id, hash, created_at, expires_at)
VALUES (?1, ?2, {now_ms}, {now_ms} + ?3)";

/// Redeems token `?1` for node `?2`: once, before it expires (one statement, so two nodes
/// presenting it at once cannot both win).
pub(crate) const REDEEM_TOKEN: &str = "
UPDATE join_tokens SET used_at = {now_ms}, node_id = ?2
 WHERE hash = ?1 AND used_at IS NULL AND expires_at > {now_ms}
RETURNING id";

pub(crate) const INSERT_NODE: &str = "
INSERT INTO nodes (id, state, memory_mib, cpus, updated_at, name, cert_sha256, lease_until,
                   lost_at)
VALUES (?1, 'ready', ?2, ?3, ?4, ?5, ?6, {now_ms} + ?7, {now_ms} + ?7 + ?8)";

/// Renews the lease of the node of certificate `?1` by `?2` ms (lost `?3` ms after it ends).
pub(crate) const HEARTBEAT: &str = "
UPDATE nodes SET lease_until = {now_ms} + ?2, lost_at = {now_ms} + ?2 + ?3, memory_mib = ?4,
                 cpus = ?5, updated_at = ?6
 WHERE cert_sha256 = ?1
RETURNING id, state";

/// The node of certificate `?1`.
pub(crate) const NODE_OF_CERT: &str = "SELECT id FROM nodes WHERE cert_sha256 = ?1";

/// Node `?1`'s certificate `?2` replaced by `?3` (a renewal; none when `?2` is no longer its).
pub(crate) const ROTATE_CERT: &str =
    "UPDATE nodes SET cert_sha256 = ?3 WHERE id = ?1 AND cert_sha256 = ?2";

/// Cordons (`cordoned`: no new placements) or uncordons (`ready`) node `?1`.
pub(crate) const SET_STATE: &str = "UPDATE nodes SET state = ?2, updated_at = ?3 WHERE id = ?1";

/// Removes node `?1` unless a machine is placed on it (its certificate then matches no node:
/// its requests are refused).
pub(crate) const REMOVE_NODE: &str = "
DELETE FROM nodes WHERE id = ?1
   AND NOT EXISTS (SELECT 1 FROM placements WHERE node_id = ?1)";

pub(crate) const PLACED_ON: &str = "SELECT COUNT(*) FROM placements WHERE node_id = ?1";

pub(crate) const NODE_STATUS: &str = "
SELECT id, state, memory_mib, cpus, reserved_mib, reserved_cpus, name,
       CASE WHEN lease_until IS NULL OR lease_until >= {now_ms} THEN 'live'
            WHEN lost_at >= {now_ms} THEN 'suspect'
            ELSE 'lost' END,
       lease_until, labels
  FROM nodes ORDER BY id";

/// A node joining with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joining {
    /// `node-…` (made by the control replica).
    pub id: String,
    /// What the node calls itself (its host name).
    pub name: String,
    /// The SHA-256 hex of the certificate issued to it: how its later requests are known.
    pub cert_sha256: String,
    /// What it offers.
    pub memory_mib: i64,
    /// What it offers.
    pub cpus: i64,
}

/// A lease: how long a heartbeat holds and how long after it a node is lost (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// A heartbeat holds this long; past it the node is `suspect`.
    pub lease_ms: i64,
    /// Past the lease by this much, the node is `lost`.
    pub lost_after_ms: i64,
}

/// A node as the database's clock sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its row.
    pub node: NodeRow,
    /// What it calls itself (none: the embedded node).
    pub name: Option<String>,
    /// `live`, `suspect` or `lost`.
    pub liveness: String,
    /// When its lease ends, Unix ms by the database's clock (none: the embedded node).
    pub lease_until: Option<i64>,
    /// Its labels, as its last heartbeat told them (`labels.rs`).
    pub labels: crate::labels::Labels,
}

impl NodeStatus {
    /// What an operator is told: `suspect` or `lost` when it is, else its state (`ready`,
    /// `cordoned`).
    pub fn shown_state(&self) -> &str {
        if self.liveness == "live" {
            &self.node.state
        } else {
            &self.liveness
        }
    }
}

/// What [`crate::Store::remove_node`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The node is gone; its certificate is refused from now on.
    Removed,
    /// No such node.
    NotFound,
    /// This many machines are placed on it: nothing removed.
    HasMachines(i64),
}

/// What a heartbeat found: the node's id and state, or no node of that certificate.
pub type Beat = Option<(String, String)>;

// --- SQLite ---------------------------------------------------------------------------------

/// Stores the CA unless there is one; whether it was stored.
pub fn put_ca(c: &Connection, cert_pem: &str, key_pem: &str) -> Result<bool, FleetError> {
    let n = c
        .execute(PUT_CA, params![cert_pem, key_pem, now()])
        .map_err(|e| FleetError::db("store the fleet CA", e))?;
    Ok(n == 1)
}

/// The CA: `(certificate PEM, key PEM)`.
pub fn ca(c: &Connection) -> Result<Option<(String, String)>, FleetError> {
    c.query_row(CA, [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(|e| FleetError::db("read the fleet CA", e))
}

/// Records a join token by its hash, valid `ttl_ms`; its id.
pub fn create_token(c: &Connection, hash: &str, ttl_ms: i64) -> Result<String, FleetError> {
    let id = new_id("jt-");
    c.execute(&sqlite(CREATE_TOKEN), params![id, hash, ttl_ms])
        .map_err(|e| FleetError::db("store a join token", e))?;
    Ok(id)
}

/// Redeems the token of `hash` for `n` and records `n` with a first lease, in one transaction;
/// false (nothing recorded) when the token is unknown, used or expired.
pub fn join(c: &Connection, hash: &str, n: &Joining, lease: Lease) -> Result<bool, FleetError> {
    let tx = c
        .unchecked_transaction()
        .map_err(|e| FleetError::db("begin a join", e))?;
    let redeemed: Option<String> = tx
        .query_row(&sqlite(REDEEM_TOKEN), params![hash, n.id], |r| r.get(0))
        .optional()
        .map_err(|e| FleetError::db("redeem a join token", e))?;
    if redeemed.is_none() {
        return Ok(false);
    }
    tx.execute(
        &sqlite(INSERT_NODE),
        params![
            n.id,
            n.memory_mib,
            n.cpus,
            now(),
            n.name,
            n.cert_sha256,
            lease.lease_ms,
            lease.lost_after_ms
        ],
    )
    .map_err(|e| FleetError::db("record a node", e))?;
    tx.commit()
        .map_err(|e| FleetError::db("commit a join", e))?;
    Ok(true)
}

/// Renews the lease of the node of certificate `cert_sha256`, with its capacity now.
pub fn heartbeat(
    c: &Connection,
    cert_sha256: &str,
    lease: Lease,
    memory_mib: i64,
    cpus: i64,
) -> Result<Beat, FleetError> {
    c.query_row(
        &sqlite(HEARTBEAT),
        params![
            cert_sha256,
            lease.lease_ms,
            lease.lost_after_ms,
            memory_mib,
            cpus,
            now()
        ],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(|e| FleetError::db("renew a lease", e))
}

/// The node of certificate `cert_sha256`.
pub fn node_of_cert(c: &Connection, cert_sha256: &str) -> Result<Option<String>, FleetError> {
    c.query_row(NODE_OF_CERT, [cert_sha256], |r| r.get(0))
        .optional()
        .map_err(|e| FleetError::db("find a node by its certificate", e))
}

/// Replaces node `id`'s certificate `old` by `new`; whether `old` was its.
pub fn rotate_cert(c: &Connection, id: &str, old: &str, new: &str) -> Result<bool, FleetError> {
    let n = c
        .execute(ROTATE_CERT, params![id, old, new])
        .map_err(|e| FleetError::db("renew a node's certificate", e))?;
    Ok(n == 1)
}

/// Sets node `id`'s state; whether it exists.
pub fn set_state(c: &Connection, id: &str, state: &str) -> Result<bool, FleetError> {
    let n = c
        .execute(SET_STATE, params![id, state, now()])
        .map_err(|e| FleetError::db("set a node's state", e))?;
    Ok(n == 1)
}

/// Removes node `id` unless machines are placed on it.
pub fn remove(c: &Connection, id: &str) -> Result<Removed, FleetError> {
    let n = c
        .execute(REMOVE_NODE, [id])
        .map_err(|e| FleetError::db("remove a node", e))?;
    if n == 1 {
        return Ok(Removed::Removed);
    }
    let placed: i64 = c
        .query_row(PLACED_ON, [id], |r| r.get(0))
        .map_err(|e| FleetError::db("remove a node", e))?;
    Ok(if placed > 0 {
        Removed::HasMachines(placed)
    } else {
        Removed::NotFound
    })
}

/// Every node with its liveness.
pub fn status(c: &Connection) -> Result<Vec<NodeStatus>, FleetError> {
    let mut st = c
        .prepare(&sqlite(NODE_STATUS))
        .map_err(|e| FleetError::db("list nodes", e))?;
    let rows = st
        .query_map([], |r| {
            Ok(NodeStatus {
                node: NodeRow::from_columns(r)?,
                name: r.get(6)?,
                liveness: r.get(7)?,
                lease_until: r.get(8)?,
                labels: crate::labels::from_column(r.get::<_, Option<String>>(9)?.as_deref()),
            })
        })
        .map_err(|e| FleetError::db("list nodes", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list nodes", e))
}
