//! The fleet's store: one trait, [`Store`], that the server calls for every read and write of
//! its state (tenants, keys, machines, checkpoints), and its two implementations:
//!
//! * [`sqlite`]: the embedded default, `<home>/fleet.db` (the functions of `db.rs`), one host;
//! * [`pg`]: PostgreSQL (`smolfleet serve --db postgres://…`), through `tokio-postgres` (pure
//!   Rust, no libpq).
//!
//! Both apply the one migration set of `db.rs` ([`crate::db::MIGRATIONS`]); the dialect
//! differences are the few lines of [`pg::dialect`]. The conformance suite (tests/store.rs)
//! runs the same cases against both.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::db::{AuthKey, CheckpointDeleted, CheckpointRow, KeyRow, MachineRow, Restored};
use crate::error::FleetError;
use crate::nodes::{Beat, Joining, Lease, NodeStatus, Removed};
use crate::placement::{Need, NodeRow, OperationRow, Placed};

pub mod pg;
pub mod sqlite;

/// What a store call returns.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, FleetError>>;

/// The store shared by a server's tasks.
pub type Db = Arc<dyn Store>;

/// Every operation the server performs on its state. Timestamps are unix seconds; rows are
/// those of `db.rs`. An implementation that cannot reach its database answers
/// [`FleetError::StoreUnavailable`] (HTTP 503, retryable).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Tells `cache` of every change that makes a kept route wrong, for as long as the
    /// runtime runs (`cache.rs`; PostgreSQL: `LISTEN`). A store that cannot leaves the cache
    /// never live: everything is read from it.
    fn watch_changes(&self, cache: std::sync::Arc<crate::cache::Cache>) {
        let _ = cache;
    }

    /// On a store without tenants: creates tenant `name` and a key of `scopes` for it (one
    /// transaction, once however many servers start together) and returns the key.
    fn bootstrap<'a>(&'a self, name: &'a str, scopes: &'a str) -> StoreFuture<'a, Option<String>>;
    /// Whether any tenant exists (also the readiness probe).
    fn has_tenants(&self) -> StoreFuture<'_, bool>;
    /// Creates a tenant; its id.
    fn create_tenant<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String>;
    /// Whether tenant `id` exists.
    fn tenant_exists<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool>;
    /// Creates a key: `(key id, the key)`; only its hash is stored.
    fn create_key<'a>(
        &'a self,
        tenant_id: &'a str,
        scopes: &'a str,
        description: Option<&'a str>,
    ) -> StoreFuture<'a, (String, String)>;
    /// The unrevoked key whose hash is `key_hash`.
    fn key_of_hash<'a>(&'a self, key_hash: &'a str) -> StoreFuture<'a, Option<AuthKey>>;
    /// Every key (all tenants), oldest first.
    fn list_keys(&self) -> StoreFuture<'_, Vec<KeyRow>>;
    /// Revokes key `id`; whether it existed and was live.
    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool>;

    /// Reserves `m.name` for a new machine: `false` when its tenant has one of that name.
    fn insert_machine<'a>(&'a self, m: &'a MachineRow) -> StoreFuture<'a, bool>;
    /// Machine `id` of `tenant_id` (another tenant's is `None`).
    fn machine<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, Option<MachineRow>>;
    /// The machines of `tenant_id`, oldest first.
    fn machines<'a>(&'a self, tenant_id: &'a str) -> StoreFuture<'a, Vec<MachineRow>>;
    /// Every machine with a lifetime to enforce, oldest first.
    fn swept_machines(&self) -> StoreFuture<'_, Vec<MachineRow>>;
    /// Every machine of every tenant.
    fn all_machines(&self) -> StoreFuture<'_, Vec<MachineRow>>;
    /// Records the last activity of machines by id.
    fn set_last_activity<'a>(&'a self, seen: &'a [(String, i64)]) -> StoreFuture<'a, ()>;
    /// Replaces machine `id`'s create body (its published ports changed).
    fn set_machine_spec<'a>(&'a self, id: &'a str, spec: &'a str) -> StoreFuture<'a, ()>;
    /// Removes machine `id`'s record.
    fn delete_machine<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()>;

    /// Stores a checkpoint (its `created_at` is now); the row as stored.
    fn insert_checkpoint<'a>(&'a self, k: &'a CheckpointRow) -> StoreFuture<'a, CheckpointRow>;
    /// Checkpoint `id` of `tenant_id`.
    fn checkpoint<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, Option<CheckpointRow>>;
    /// The checkpoints of `tenant_id` taken of `machine_id`, oldest first.
    fn checkpoints_of<'a>(
        &'a self,
        tenant_id: &'a str,
        machine_id: &'a str,
    ) -> StoreFuture<'a, Vec<CheckpointRow>>;
    /// Reserves machine `m` restored from `checkpoint_id` and links them (one transaction).
    fn insert_restored<'a>(
        &'a self,
        m: &'a MachineRow,
        checkpoint_id: &'a str,
    ) -> StoreFuture<'a, Restored>;
    /// Adds or updates node `n` (its reservations are kept).
    fn put_node<'a>(&'a self, n: &'a NodeRow) -> StoreFuture<'a, ()>;
    /// Every node, by id.
    fn nodes(&self) -> StoreFuture<'_, Vec<NodeRow>>;
    /// Records machine `m`, reserves `need` on the least-reserved ready node with room (one
    /// `UPDATE … RETURNING`) and writes its `create` operation, in one transaction.
    fn reserve<'a>(&'a self, m: &'a MachineRow, need: Need) -> StoreFuture<'a, Placed>;
    /// [`Store::reserve_on`] node `node` of machine `m` restored from checkpoint
    /// `checkpoint_id` of its tenant, linked to it in the same transaction (`NoCheckpoint`
    /// when it is not the tenant's).
    fn reserve_restored<'a>(
        &'a self,
        m: &'a MachineRow,
        need: Need,
        node: &'a str,
        checkpoint_id: &'a str,
    ) -> StoreFuture<'a, Placed>;
    /// [`Store::reserve`] on one of `nodes` only (a branch stays on its source's node; a
    /// machine's labels ask for some, `labels.rs`): `NoCapacity` when none of them is ready
    /// with room.
    fn reserve_on<'a>(
        &'a self,
        m: &'a MachineRow,
        need: Need,
        nodes: &'a [String],
    ) -> StoreFuture<'a, Placed>;
    /// Marks operation `id` `state`; whether it exists.
    fn finish_operation<'a>(&'a self, id: &'a str, state: &'a str) -> StoreFuture<'a, bool>;
    /// Claims up to `limit` operations past their deadline at `at`, each for `lease` more
    /// seconds; an operation is claimed by one caller however many claim at once. Each
    /// claimed operation's machine gets a higher placement epoch in the same transaction
    /// (`epochs.rs`).
    fn claim_overdue(&self, at: i64, limit: i64, lease: i64) -> StoreFuture<'_, Vec<OperationRow>>;
    /// A node's part of the placement epochs (`epochs.rs`): records that epoch `epoch` of
    /// machine `machine_id` was sent here; the highest ever sent.
    fn raise_epoch<'a>(&'a self, machine_id: &'a str, epoch: i64) -> StoreFuture<'a, i64>;

    /// Stores the fleet CA unless one is stored; whether it was.
    fn put_ca<'a>(&'a self, cert_pem: &'a str, key_pem: &'a str) -> StoreFuture<'a, bool>;
    /// The fleet CA: `(certificate PEM, key PEM)`.
    fn ca(&self) -> StoreFuture<'_, Option<(String, String)>>;
    /// Records a join token by its hash, valid `ttl_ms` by the database's clock; its id.
    fn create_join_token<'a>(&'a self, hash: &'a str, ttl_ms: i64) -> StoreFuture<'a, String>;
    /// Redeems the join token of `hash` (once, unexpired) and records node `n` with a first
    /// lease, in one transaction; false (nothing recorded) when the token is refused.
    fn join_node<'a>(
        &'a self,
        hash: &'a str,
        n: &'a Joining,
        lease: Lease,
    ) -> StoreFuture<'a, bool>;
    /// Renews the lease of the node of certificate `cert_sha256` (its capacity updated).
    fn heartbeat<'a>(
        &'a self,
        cert_sha256: &'a str,
        lease: Lease,
        memory_mib: i64,
        cpus: i64,
    ) -> StoreFuture<'a, Beat>;
    /// The node whose certificate is `cert_sha256`.
    fn node_of_cert<'a>(&'a self, cert_sha256: &'a str) -> StoreFuture<'a, Option<String>>;
    /// Node `id`'s certificate `old` replaced by `new` (a renewal); false when `old` is no
    /// longer its (renewed already, or the node removed).
    fn rotate_node_cert<'a>(
        &'a self,
        id: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> StoreFuture<'a, bool>;
    /// Every node with its liveness by the database's clock.
    fn node_status(&self) -> StoreFuture<'_, Vec<NodeStatus>>;
    /// Sets node `id`'s state (`ready`, `cordoned`: placement takes only `ready`); whether
    /// it exists.
    fn set_node_state<'a>(&'a self, id: &'a str, state: &'a str) -> StoreFuture<'a, bool>;
    /// Removes node `id` (its certificate refused from then on) unless machines are placed
    /// on it.
    fn remove_node<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Removed>;

    /// Marks machine `id` deleted while its node is away (the delete runs when it returns).
    fn tombstone<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()>;

    /// The machines marked by [`Store::tombstone`], oldest first.
    fn tombstoned(&self) -> StoreFuture<'_, Vec<MachineRow>>;

    /// Records where node `id`'s API answers (`https://HOST:PORT`, from its heartbeat).
    fn set_node_api<'a>(&'a self, id: &'a str, url: &'a str) -> StoreFuture<'a, ()>;
    /// Records node `id`'s labels (JSON of `labels.rs`; unchanged: nothing written).
    fn set_node_labels<'a>(&'a self, id: &'a str, labels_json: &'a str) -> StoreFuture<'a, ()>;

    /// Node `id` with its API and liveness (`remotecheckpoint.rs`: the node holding a
    /// checkpoint's file).
    fn node_at<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<crate::remote::NodeAt>>;

    /// The machines placed on node `node_id` (`reconcile.rs`).
    fn placed_machines<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Vec<String>>;

    /// The node machine `machine_id` is placed on, with its API and liveness (none: not
    /// placed, e.g. a machine of `--role all`'s own engine).
    fn machine_node<'a>(
        &'a self,
        machine_id: &'a str,
    ) -> StoreFuture<'a, Option<crate::remote::NodeAt>>;

    /// Removes checkpoint `id` unless a machine restored from it still exists.
    fn delete_checkpoint<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, CheckpointDeleted>;
}

/// Opens the store `url` names: `postgres://…` / `postgresql://…` (PostgreSQL), else
/// `sqlite:PATH` or a bare path (SQLite).
pub async fn open(url: &str) -> Result<Db, FleetError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(pg::PgStore::connect(url).await?))
    } else {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        Ok(Arc::new(sqlite::SqliteStore::open(std::path::Path::new(
            path,
        ))?))
    }
}
