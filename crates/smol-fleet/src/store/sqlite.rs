//! The embedded store: SQLite (`<home>/fleet.db`), the functions of `db.rs` on tokio's
//! blocking pool.

use std::path::Path;

use crate::db::{self, Sqlite};
use crate::error::FleetError;

use super::{Store, StoreFuture};
use crate::db::{AuthKey, CheckpointDeleted, CheckpointRow, KeyRow, MachineRow, Restored};
use crate::nodes::{self, Beat, Joining, Lease, NodeStatus, Removed};
use crate::placement::{self, Need, NodeRow, OperationRow, Placed};

/// SQLite as a [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    db: Sqlite,
}

impl SqliteStore {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, FleetError> {
        Ok(SqliteStore {
            db: Sqlite::open(path)?,
        })
    }

    /// The database itself (the admin CLI and tests run `db.rs` functions on it directly).
    pub fn sqlite(&self) -> &Sqlite {
        &self.db
    }
}

/// `self.db.call(f)` boxed, with the arguments owned.
macro_rules! call {
    ($self:ident, |$c:ident| $body:expr) => {
        Box::pin(async move { $self.db.call(move |$c| $body).await })
    };
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn bootstrap<'a>(&'a self, name: &'a str, scopes: &'a str) -> StoreFuture<'a, Option<String>> {
        let (name, scopes) = (name.to_owned(), scopes.to_owned());
        call!(self, |c| db::bootstrap(c, &name, &scopes))
    }

    fn has_tenants(&self) -> StoreFuture<'_, bool> {
        call!(self, |c| db::has_tenants(c))
    }

    fn create_tenant<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String> {
        let name = name.to_owned();
        call!(self, |c| db::create_tenant(c, &name))
    }

    fn tenant_exists<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let id = id.to_owned();
        call!(self, |c| db::tenant_exists(c, &id))
    }

    fn create_key<'a>(
        &'a self,
        tenant_id: &'a str,
        scopes: &'a str,
        description: Option<&'a str>,
    ) -> StoreFuture<'a, (String, String)> {
        let (t, s, d) = (
            tenant_id.to_owned(),
            scopes.to_owned(),
            description.map(str::to_owned),
        );
        call!(self, |c| db::create_key(c, &t, &s, d.as_deref()))
    }

    fn key_of_hash<'a>(&'a self, key_hash: &'a str) -> StoreFuture<'a, Option<AuthKey>> {
        let h = key_hash.to_owned();
        call!(self, |c| db::key_of_hash(c, &h))
    }

    fn list_keys(&self) -> StoreFuture<'_, Vec<KeyRow>> {
        call!(self, |c| db::list_keys(c))
    }

    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let id = id.to_owned();
        call!(self, |c| db::revoke_key(c, &id))
    }

    fn insert_machine<'a>(&'a self, m: &'a MachineRow) -> StoreFuture<'a, bool> {
        let m = m.clone();
        call!(self, |c| db::insert_machine(c, &m))
    }

    fn machine<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, Option<MachineRow>> {
        let (t, i) = (tenant_id.to_owned(), id.to_owned());
        call!(self, |c| db::machine(c, &t, &i))
    }

    fn machines<'a>(&'a self, tenant_id: &'a str) -> StoreFuture<'a, Vec<MachineRow>> {
        let t = tenant_id.to_owned();
        call!(self, |c| db::machines(c, &t))
    }

    fn swept_machines(&self) -> StoreFuture<'_, Vec<MachineRow>> {
        call!(self, |c| db::swept_machines(c))
    }

    fn all_machines(&self) -> StoreFuture<'_, Vec<MachineRow>> {
        call!(self, |c| db::all_machines(c))
    }

    fn set_last_activity<'a>(&'a self, seen: &'a [(String, i64)]) -> StoreFuture<'a, ()> {
        let seen = seen.to_vec();
        call!(self, |c| db::set_last_activity(c, &seen))
    }

    fn set_machine_spec<'a>(&'a self, id: &'a str, spec: &'a str) -> StoreFuture<'a, ()> {
        let (i, s) = (id.to_owned(), spec.to_owned());
        call!(self, |c| db::set_machine_spec(c, &i, &s))
    }

    fn delete_machine<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        let id = id.to_owned();
        call!(self, |c| db::delete_machine(c, &id))
    }

    fn insert_checkpoint<'a>(&'a self, k: &'a CheckpointRow) -> StoreFuture<'a, CheckpointRow> {
        let k = k.clone();
        call!(self, |c| db::insert_checkpoint(c, &k))
    }

    fn checkpoint<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, Option<CheckpointRow>> {
        let (t, i) = (tenant_id.to_owned(), id.to_owned());
        call!(self, |c| db::checkpoint(c, &t, &i))
    }

    fn checkpoints_of<'a>(
        &'a self,
        tenant_id: &'a str,
        machine_id: &'a str,
    ) -> StoreFuture<'a, Vec<CheckpointRow>> {
        let (t, m) = (tenant_id.to_owned(), machine_id.to_owned());
        call!(self, |c| db::checkpoints_of(c, &t, &m))
    }

    fn insert_restored<'a>(
        &'a self,
        m: &'a MachineRow,
        checkpoint_id: &'a str,
    ) -> StoreFuture<'a, Restored> {
        let (m, k) = (m.clone(), checkpoint_id.to_owned());
        call!(self, |c| db::insert_restored(c, &m, &k))
    }

    fn put_node<'a>(&'a self, n: &'a NodeRow) -> StoreFuture<'a, ()> {
        let n = n.clone();
        call!(self, |c| placement::put_node(c, &n))
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeRow>> {
        call!(self, |c| placement::nodes(c))
    }

    fn reserve<'a>(&'a self, m: &'a MachineRow, need: Need) -> StoreFuture<'a, Placed> {
        let m = m.clone();
        call!(self, |c| placement::reserve(c, &m, need, None, None))
    }

    fn reserve_on<'a>(
        &'a self,
        m: &'a MachineRow,
        need: Need,
        nodes: &'a [String],
    ) -> StoreFuture<'a, Placed> {
        let (m, n) = (m.clone(), placement::id_list(nodes));
        call!(self, |c| placement::reserve(c, &m, need, Some(&n), None))
    }

    fn reserve_restored<'a>(
        &'a self,
        m: &'a MachineRow,
        need: Need,
        node: &'a str,
        checkpoint_id: &'a str,
    ) -> StoreFuture<'a, Placed> {
        let (m, n, k) = (
            m.clone(),
            placement::id_list(&[node.to_owned()]),
            checkpoint_id.to_owned(),
        );
        call!(self, |c| placement::reserve(
            c,
            &m,
            need,
            Some(&n),
            Some(&k)
        ))
    }

    fn finish_operation<'a>(&'a self, id: &'a str, state: &'a str) -> StoreFuture<'a, bool> {
        let (i, s) = (id.to_owned(), state.to_owned());
        call!(self, |c| placement::finish_operation(c, &i, &s))
    }

    fn claim_overdue(&self, at: i64, limit: i64, lease: i64) -> StoreFuture<'_, Vec<OperationRow>> {
        call!(self, |c| placement::claim_overdue(c, at, limit, lease))
    }

    fn raise_epoch<'a>(&'a self, machine_id: &'a str, epoch: i64) -> StoreFuture<'a, i64> {
        let id = machine_id.to_owned();
        call!(self, |c| crate::epochs::raise(c, &id, epoch))
    }

    fn put_ca<'a>(&'a self, cert_pem: &'a str, key_pem: &'a str) -> StoreFuture<'a, bool> {
        let (c_, k) = (cert_pem.to_owned(), key_pem.to_owned());
        call!(self, |c| nodes::put_ca(c, &c_, &k))
    }

    fn ca(&self) -> StoreFuture<'_, Option<(String, String)>> {
        call!(self, |c| nodes::ca(c))
    }

    fn create_join_token<'a>(&'a self, hash: &'a str, ttl_ms: i64) -> StoreFuture<'a, String> {
        let h = hash.to_owned();
        call!(self, |c| nodes::create_token(c, &h, ttl_ms))
    }

    fn join_node<'a>(
        &'a self,
        hash: &'a str,
        n: &'a Joining,
        lease: Lease,
    ) -> StoreFuture<'a, bool> {
        let (h, n) = (hash.to_owned(), n.clone());
        call!(self, |c| nodes::join(c, &h, &n, lease))
    }

    fn heartbeat<'a>(
        &'a self,
        cert_sha256: &'a str,
        lease: Lease,
        memory_mib: i64,
        cpus: i64,
    ) -> StoreFuture<'a, Beat> {
        let f = cert_sha256.to_owned();
        call!(self, |c| nodes::heartbeat(c, &f, lease, memory_mib, cpus))
    }

    fn node_status(&self) -> StoreFuture<'_, Vec<NodeStatus>> {
        call!(self, |c| nodes::status(c))
    }

    fn set_node_state<'a>(&'a self, id: &'a str, state: &'a str) -> StoreFuture<'a, bool> {
        let (i, s) = (id.to_owned(), state.to_owned());
        call!(self, |c| nodes::set_state(c, &i, &s))
    }

    fn remove_node<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Removed> {
        let i = id.to_owned();
        call!(self, |c| nodes::remove(c, &i))
    }

    fn tombstone<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        let i = id.to_owned();
        call!(self, |c| crate::remote::tombstone(c, &i))
    }

    fn tombstoned(&self) -> StoreFuture<'_, Vec<MachineRow>> {
        call!(self, |c| crate::remote::tombstoned(c))
    }

    fn set_node_api<'a>(&'a self, id: &'a str, url: &'a str) -> StoreFuture<'a, ()> {
        let (i, u) = (id.to_owned(), url.to_owned());
        call!(self, |c| crate::remote::set_node_api(c, &i, &u))
    }

    fn set_node_labels<'a>(&'a self, id: &'a str, labels_json: &'a str) -> StoreFuture<'a, ()> {
        let (i, l) = (id.to_owned(), labels_json.to_owned());
        call!(self, |c| {
            c.execute(crate::labels::SET_NODE_LABELS, rusqlite::params![i, l])
                .map_err(|e| FleetError::db("record a node's labels", e))?;
            Ok(())
        })
    }

    fn placed_machines<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        let n = node_id.to_owned();
        call!(self, |c| crate::reconcile::placed_machines(c, &n))
    }

    fn node_of_cert<'a>(&'a self, cert_sha256: &'a str) -> StoreFuture<'a, Option<String>> {
        let h = cert_sha256.to_owned();
        call!(self, |c| crate::nodes::node_of_cert(c, &h))
    }

    fn rotate_node_cert<'a>(
        &'a self,
        id: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> StoreFuture<'a, bool> {
        let (i, o, n) = (id.to_owned(), old.to_owned(), new.to_owned());
        call!(self, |c| crate::nodes::rotate_cert(c, &i, &o, &n))
    }

    fn node_at<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<crate::remote::NodeAt>> {
        let i = id.to_owned();
        call!(self, |c| crate::remotecheckpoint::node_at(c, &i))
    }

    fn machine_node<'a>(
        &'a self,
        machine_id: &'a str,
    ) -> StoreFuture<'a, Option<crate::remote::NodeAt>> {
        let m = machine_id.to_owned();
        call!(self, |c| crate::remote::machine_node(c, &m))
    }

    fn delete_checkpoint<'a>(
        &'a self,
        tenant_id: &'a str,
        id: &'a str,
    ) -> StoreFuture<'a, CheckpointDeleted> {
        let (t, i) = (tenant_id.to_owned(), id.to_owned());
        call!(self, |c| db::delete_checkpoint(c, &t, &i))
    }
}
