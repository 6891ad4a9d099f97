//! Placement and durable operations in the store (issue 15, FLEET-DESIGN.md): nodes with a
//! capacity, a machine's reservation on one node taken in one `UPDATE … RETURNING` (the
//! capacity checked in the same statement, so concurrent creates on any number of servers never
//! over-reserve a node), and an operation row written in the same transaction as the machine
//! row and its reservation (a server that dies after the commit leaves an operation that
//! another claims once its deadline has passed).
//!
//! The SQL is written once, in SQLite's dialect; `store/pg.rs` runs it through its `dialect`
//! (`?N` placeholders become `$N`) with the row locks only PostgreSQL takes ([`lock`]).
//! Called by the create route of a replica with `--node-listen` (`remote.rs`); `--role all` has
//! one node, the engine of its host, and places nothing.

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::{self, new_id, now, MachineRow};
use crate::error::FleetError;

/// Schema version 4: nodes, placements, operations.
pub(crate) const SCHEMA_V4: &str = "
CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    state         TEXT NOT NULL,
    memory_mib    INTEGER NOT NULL,
    cpus          INTEGER NOT NULL,
    reserved_mib  INTEGER NOT NULL DEFAULT 0,
    reserved_cpus INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL
);
CREATE TABLE placements (
    machine_id TEXT PRIMARY KEY REFERENCES machines(id),
    node_id    TEXT NOT NULL REFERENCES nodes(id),
    memory_mib INTEGER NOT NULL,
    cpus       INTEGER NOT NULL
);
CREATE TABLE operations (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    machine_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    node_id     TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deadline_at INTEGER NOT NULL
);
CREATE INDEX operations_due ON operations (state, deadline_at);
";

/// A node and its capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// `node-…`.
    pub id: String,
    /// `ready` (placements go there), `cordoned`, ...
    pub state: String,
    /// What it offers.
    pub memory_mib: i64,
    /// What it offers.
    pub cpus: i64,
    /// Reserved by its placements.
    pub reserved_mib: i64,
    /// Reserved by its placements.
    pub reserved_cpus: i64,
}

impl NodeRow {
    /// A SQLite row whose first six columns are id, state, memory_mib, cpus, reserved_mib,
    /// reserved_cpus.
    pub(crate) fn from_columns(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
        Ok(NodeRow {
            id: r.get(0)?,
            state: r.get(1)?,
            memory_mib: r.get(2)?,
            cpus: r.get(3)?,
            reserved_mib: r.get(4)?,
            reserved_cpus: r.get(5)?,
        })
    }
}

/// What a machine needs of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// RAM.
    pub memory_mib: i64,
    /// vCPUs.
    pub cpus: i64,
}

impl Need {
    /// What a machine of create body `body` needs (the engine's defaults where it says nothing).
    pub fn of(body: &smolmachines::wire::CreateMachineBody) -> Need {
        let r = &body.resources;
        Need {
            memory_mib: i64::from(
                r.memory_mb
                    .unwrap_or(smolmachines::local::DEFAULT_MEMORY_MB),
            ),
            cpus: i64::from(r.cpus.unwrap_or(smolmachines::local::DEFAULT_CPUS)),
        }
    }
}

/// What [`crate::Store::reserve`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Recorded, reserved on `node_id`, with its `create` operation.
    Placed {
        /// The node.
        node_id: String,
        /// `op-…`.
        operation_id: String,
    },
    /// The tenant has a machine of that name: nothing reserved.
    NameTaken,
    /// No ready node has room: nothing recorded (503 retryable for the caller).
    NoCapacity,
    /// A restore's checkpoint is not the tenant's (or is gone): nothing recorded.
    NoCheckpoint,
}

/// A durable operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationRow {
    /// `op-…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Its machine.
    pub machine_id: String,
    /// `create`, ...
    pub kind: String,
    /// `pending`, `claimed`, `done`, `failed`.
    pub state: String,
    /// Where it runs.
    pub node_id: Option<String>,
    /// Unix seconds after which another server may claim it.
    pub deadline_at: i64,
}

/// How long a create's operation is its server's before another may claim it (seconds).
pub const CREATE_DEADLINE_SECS: i64 = 600;

/// The row locks of PostgreSQL in [`RESERVE`] and [`CLAIM`] (`""` on SQLite, whose writers
/// are serialized by its lock).
pub(crate) fn lock(postgres: bool, skip_locked: bool) -> &'static str {
    match (postgres, skip_locked) {
        (false, _) => "",
        (true, false) => "FOR UPDATE",
        (true, true) => "FOR UPDATE SKIP LOCKED",
    }
}

/// The reservation, one statement: the least-reserved ready node with room (and a lease that
/// holds, `nodes.rs`: a suspect or lost node gets nothing new; a joined node that told no API
/// in its heartbeat, `remote.rs`, runs no machines), of the nodes `?4` when it names some (a
/// comma-separated list of ids: the nodes of a machine's labels, `labels.rs`, or a branch's
/// source's node, `remotebranch.rs`), gains `?1` MiB and `?2` vCPUs; the room is checked
/// again on the row as updated (`{lock}`: PostgreSQL locks the node and re-reads it, so a
/// concurrent reservation is counted; `store/pg/nodes.rs` tries `SKIP LOCKED` first, then
/// waits). Returns the node's id.
pub(crate) const RESERVE: &str = "
UPDATE nodes SET reserved_mib = reserved_mib + ?1, reserved_cpus = reserved_cpus + ?2,
                 updated_at = ?3
 WHERE id = (SELECT id FROM nodes
              WHERE state = 'ready' AND (lease_until IS NULL OR lease_until >= {now_ms})
                AND (cert_sha256 IS NULL OR api_url IS NOT NULL)
                AND memory_mib - reserved_mib >= ?1
                AND cpus - reserved_cpus >= ?2
                AND (',' || COALESCE(CAST(?4 AS TEXT), id) || ',') LIKE ('%,' || id || ',%')
              ORDER BY reserved_mib * 1000 / memory_mib, id LIMIT 1 {lock})
   AND memory_mib - reserved_mib >= ?1 AND cpus - reserved_cpus >= ?2
RETURNING id";

/// Claims up to `?2` operations still pending past their deadline `?1` (`{lock}`: PostgreSQL
/// skips those another server is claiming). Each is claimed once.
pub(crate) const CLAIM: &str = "
UPDATE operations SET state = 'claimed', updated_at = ?1, deadline_at = ?1 + ?3
 WHERE id IN (SELECT id FROM operations WHERE state IN ('pending', 'claimed')
               AND deadline_at <= ?1 ORDER BY deadline_at, id LIMIT ?2 {lock})
RETURNING id, tenant_id, machine_id, kind, state, node_id, deadline_at";

/// PostgreSQL: takes machine `?1`'s placement row and gives back what it reserved, in one
/// statement. The DELETE locks the row, so of two transactions removing the same machine
/// only the first gets it back: an `UPDATE … FROM placements` would re-check only the
/// node's row after the wait and give the reservation back twice.
pub(crate) const TAKE_PLACEMENT: &str = "
WITH p AS (DELETE FROM placements WHERE machine_id = ?1 RETURNING node_id, memory_mib, cpus)
UPDATE nodes SET reserved_mib = reserved_mib - p.memory_mib,
                 reserved_cpus = reserved_cpus - p.cpus
  FROM p WHERE nodes.id = p.node_id";

/// SQLite (one writer at a time): gives back the reservation of machine `?1` (its placement
/// row goes after, in the same transaction).
pub(crate) const RELEASE: &str = "
UPDATE nodes SET reserved_mib = reserved_mib - p.memory_mib,
                 reserved_cpus = reserved_cpus - p.cpus
  FROM (SELECT node_id, memory_mib, cpus FROM placements WHERE machine_id = ?1) AS p
 WHERE nodes.id = p.node_id";

pub(crate) const PUT_NODE: &str = "
INSERT INTO nodes (id, state, memory_mib, cpus, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (id) DO UPDATE SET state = excluded.state, memory_mib = excluded.memory_mib,
                               cpus = excluded.cpus, updated_at = excluded.updated_at";

pub(crate) const NODES: &str = "SELECT id, state, memory_mib, cpus, reserved_mib, reserved_cpus
  FROM nodes ORDER BY id";

/// Links restored machine `?1` to its checkpoint `?2` (`checkpoint.rs`).
pub(crate) const LINK_RESTORED: &str =
    "INSERT INTO checkpoint_restores (machine_id, checkpoint_id) VALUES (?1, ?2)";

pub(crate) const INSERT_PLACEMENT: &str =
    "INSERT INTO placements (machine_id, node_id, memory_mib, cpus) VALUES (?1, ?2, ?3, ?4)";

pub(crate) const INSERT_OPERATION: &str = "
INSERT INTO operations (id, tenant_id, machine_id, kind, state, node_id, created_at, updated_at,
                        deadline_at)
VALUES (?1, ?2, ?3, 'create', 'pending', ?4, ?5, ?5, ?6)";

pub(crate) const FINISH_OPERATION: &str =
    "UPDATE operations SET state = ?2, updated_at = ?3 WHERE id = ?1";

// --- SQLite ---------------------------------------------------------------------------------

/// Adds or updates node `n` (its reservations are kept).
pub fn put_node(c: &Connection, n: &NodeRow) -> Result<(), FleetError> {
    c.execute(
        PUT_NODE,
        params![n.id, n.state, n.memory_mib, n.cpus, now()],
    )
    .map_err(|e| FleetError::db("store a node", e))?;
    Ok(())
}

/// Every node.
pub fn nodes(c: &Connection) -> Result<Vec<NodeRow>, FleetError> {
    let mut st = c
        .prepare(NODES)
        .map_err(|e| FleetError::db("list nodes", e))?;
    let rows = st
        .query_map([], NodeRow::from_columns)
        .map_err(|e| FleetError::db("list nodes", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("list nodes", e))
}

/// `nodes` as [`RESERVE`]'s `?4`: their ids joined by commas (an id that cannot be told apart
/// in that list, or in `LIKE`, is left out: node ids are `node-` + hex).
pub(crate) fn id_list(nodes: &[String]) -> String {
    nodes
        .iter()
        .filter(|id| !id.is_empty() && !id.contains([',', '%', '_', '\\']))
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// Records machine `m`, reserves `need` on a node (`on`: one of those, comma-separated, or
/// any) and writes its `create` operation, in one transaction; `restored_from`: the machine is
/// restored from that checkpoint of its tenant, linked to it in the same transaction.
pub fn reserve(
    c: &Connection,
    m: &MachineRow,
    need: Need,
    on: Option<&str>,
    restored_from: Option<&str>,
) -> Result<Placed, FleetError> {
    let tx = c
        .unchecked_transaction()
        .map_err(|e| FleetError::db("begin a placement", e))?;
    if let Some(ck) = restored_from {
        if db::checkpoint(&tx, &m.tenant_id, ck)?.is_none() {
            return Ok(Placed::NoCheckpoint);
        }
    }
    let t = now();
    let node: Option<String> = tx
        .query_row(
            &crate::nodes::sqlite(&RESERVE.replace("{lock}", lock(false, false))),
            params![need.memory_mib, need.cpus, t, on],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| FleetError::db("reserve a node", e))?;
    let Some(node_id) = node else {
        return Ok(Placed::NoCapacity);
    };
    if !db::insert_machine(&tx, m)? {
        return Ok(Placed::NameTaken);
    }
    if let Some(ck) = restored_from {
        tx.execute(LINK_RESTORED, params![m.id, ck])
            .map_err(|e| FleetError::db("link a restored machine to its checkpoint", e))?;
    }
    tx.execute(
        INSERT_PLACEMENT,
        params![m.id, node_id, need.memory_mib, need.cpus],
    )
    .map_err(|e| FleetError::db("record a placement", e))?;
    let operation_id = new_id("op-");
    tx.execute(
        INSERT_OPERATION,
        params![
            operation_id,
            m.tenant_id,
            m.id,
            node_id,
            t,
            t + CREATE_DEADLINE_SECS
        ],
    )
    .map_err(|e| FleetError::db("record an operation", e))?;
    tx.commit()
        .map_err(|e| FleetError::db("commit a placement", e))?;
    Ok(Placed::Placed {
        node_id,
        operation_id,
    })
}

/// Gives back machine `id`'s reservation (none: nothing), before its row goes.
pub fn release(c: &Connection, id: &str) -> Result<(), FleetError> {
    c.execute(RELEASE, [id])
        .map_err(|e| FleetError::db("release a placement", e))?;
    c.execute("DELETE FROM placements WHERE machine_id = ?1", [id])
        .map_err(|e| FleetError::db("release a placement", e))?;
    Ok(())
}

/// Marks operation `id` `state` (`done`, `failed`).
pub fn finish_operation(c: &Connection, id: &str, state: &str) -> Result<bool, FleetError> {
    let n = c
        .execute(FINISH_OPERATION, params![id, state, now()])
        .map_err(|e| FleetError::db("finish an operation", e))?;
    Ok(n == 1)
}

/// Claims up to `limit` operations past their deadline at `at` (each gets `lease` more
/// seconds).
pub fn claim_overdue(
    c: &Connection,
    at: i64,
    limit: i64,
    lease: i64,
) -> Result<Vec<OperationRow>, FleetError> {
    let tx = c
        .unchecked_transaction()
        .map_err(|e| FleetError::db("begin a claim", e))?;
    let claimed = claim_rows(&tx, at, limit, lease)?;
    for op in &claimed {
        tx.execute(crate::epochs::BUMP, [&op.machine_id])
            .map_err(|e| FleetError::db("raise a placement epoch", e))?;
    }
    tx.commit()
        .map_err(|e| FleetError::db("commit a claim", e))?;
    Ok(claimed)
}

fn claim_rows(
    c: &Connection,
    at: i64,
    limit: i64,
    lease: i64,
) -> Result<Vec<OperationRow>, FleetError> {
    let mut st = c
        .prepare(&CLAIM.replace("{lock}", lock(false, true)))
        .map_err(|e| FleetError::db("claim operations", e))?;
    let rows = st
        .query_map(params![at, limit, lease], |r| {
            Ok(OperationRow {
                id: r.get(0)?,
                tenant_id: r.get(1)?,
                machine_id: r.get(2)?,
                kind: r.get(3)?,
                state: r.get(4)?,
                node_id: r.get(5)?,
                deadline_at: r.get(6)?,
            })
        })
        .map_err(|e| FleetError::db("claim operations", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::db("claim operations", e))
}
