//! The nodes of issue 15 on PostgreSQL (`crate::nodes`'s SQL through [`super::query`]) and
//! the placement transaction, retried when PostgreSQL picks it as a deadlock's victim.

use tokio_postgres::error::SqlState;

use super::{error, insert_machine_on, query, PgStore};
use crate::db::{new_id, now, MachineRow};
use crate::error::FleetError;
use crate::nodes::{self, Beat, Joining, Lease, NodeStatus, Removed};
use crate::placement::{self, Need, NodeRow, Placed, CREATE_DEADLINE_SECS};

/// How often a placement is tried when it is a deadlock's (or serialization failure's) victim.
const RESERVE_ATTEMPTS: usize = 5;

impl PgStore {
    /// [`PgStore::reserve_once`], again when PostgreSQL aborted it to break a deadlock: under
    /// READ COMMITTED a reservation's `FOR UPDATE` may lock a node it then skips (its room gone
    /// on the recheck) and wait for another, so two reservations can wait on each other.
    /// Nothing of an aborted attempt stays (its transaction rolled back).
    pub(super) async fn reserve_retrying(
        &self,
        m: &MachineRow,
        need: Need,
        on: Option<&str>,
        restored_from: Option<&str>,
    ) -> Result<Placed, FleetError> {
        let mut attempt = 1;
        loop {
            match self.reserve_once(m, need, on, restored_from).await {
                Err(FleetError::Postgres { ref source, .. })
                    if attempt < RESERVE_ATTEMPTS
                        && matches!(
                            source.code(),
                            Some(&SqlState::T_R_DEADLOCK_DETECTED)
                                | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                        ) =>
                {
                    tracing::debug!(machine = %m.id, attempt, "placement was a deadlock's victim; again");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One placement transaction.
    //
    // The `*_on` methods below are the bodies of the `Store` methods of those names.
    async fn reserve_once(
        &self,
        m: &MachineRow,
        need: Need,
        on: Option<&str>,
        restored_from: Option<&str>,
    ) -> Result<Placed, FleetError> {
        let what = "place a machine";
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(|e| error(what, e))?;
        let t = now();
        if let Some(ck) = restored_from {
            if super::checkpoint_on(&tx, &m.tenant_id, ck).await?.is_none() {
                return Ok(Placed::NoCheckpoint);
            }
        }
        // the record first: a taken name locks no node, and a node is held only from its
        // reservation to the commit
        if !insert_machine_on(&tx, m).await? {
            return Ok(Placed::NameTaken);
        }
        if let Some(ck) = restored_from {
            tx.execute(&query(placement::LINK_RESTORED, ""), &[&m.id, &ck])
                .await
                .map_err(|e| error("link a restored machine to its checkpoint", e))?;
        }
        // first a node no other placement holds (SKIP LOCKED: concurrent placements spread
        // over the nodes instead of queueing on the least reserved one); when every node
        // with room is held, wait for one (FOR UPDATE), so a node held is never "no room"
        let mut node = None;
        for skip_locked in [true, false] {
            node = tx
                .query_opt(
                    &query(placement::RESERVE, placement::lock(true, skip_locked)),
                    &[&need.memory_mib, &need.cpus, &t, &on],
                )
                .await
                .map_err(|e| error("reserve a node", e))?
                .map(|r| r.get::<_, String>(0));
            if node.is_some() {
                break;
            }
        }
        let Some(node_id) = node else {
            return Ok(Placed::NoCapacity);
        };
        tx.execute(
            &query(placement::INSERT_PLACEMENT, ""),
            &[&m.id, &node_id, &need.memory_mib, &need.cpus],
        )
        .await
        .map_err(|e| error("record a placement", e))?;
        let operation_id = new_id("op-");
        tx.execute(
            &query(placement::INSERT_OPERATION, ""),
            &[
                &operation_id,
                &m.tenant_id,
                &m.id,
                &node_id,
                &t,
                &(t + CREATE_DEADLINE_SECS),
            ],
        )
        .await
        .map_err(|e| error("record an operation", e))?;
        tx.commit().await.map_err(|e| error(what, e))?;
        Ok(Placed::Placed {
            node_id,
            operation_id,
        })
    }

    pub(super) async fn set_node_labels_on(
        &self,
        id: &str,
        labels_json: &str,
    ) -> Result<(), FleetError> {
        let c = self.conn().await?;
        c.execute(
            &query(crate::labels::SET_NODE_LABELS, ""),
            &[&id, &labels_json],
        )
        .await
        .map_err(|e| error("record a node's labels", e))?;
        Ok(())
    }

    pub(super) async fn node_of_cert_on(
        &self,
        cert_sha256: &str,
    ) -> Result<Option<String>, FleetError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(&query(nodes::NODE_OF_CERT, ""), &[&cert_sha256])
            .await
            .map_err(|e| error("find a node by its certificate", e))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn rotate_node_cert_on(
        &self,
        id: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, FleetError> {
        let c = self.conn().await?;
        let n = c
            .execute(&query(nodes::ROTATE_CERT, ""), &[&id, &old, &new])
            .await
            .map_err(|e| error("renew a node's certificate", e))?;
        Ok(n == 1)
    }

    pub(super) async fn node_at_on(
        &self,
        id: &str,
    ) -> Result<Option<crate::remote::NodeAt>, FleetError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(&query(crate::remotecheckpoint::NODE_AT, ""), &[&id])
            .await
            .map_err(|e| error("find a node", e))?;
        Ok(row.map(|r| crate::remote::NodeAt {
            id: r.get(0),
            api_url: r.get(1),
            liveness: r.get(2),
            lease_until: r.get(3),
            lease_left_ms: r.get(4),
            deleting: false,
            placement: None,
        }))
    }

    pub(super) async fn put_ca_on(
        &self,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<bool, FleetError> {
        let c = self.conn().await?;
        let n = c
            .execute(&query(nodes::PUT_CA, ""), &[&cert_pem, &key_pem, &now()])
            .await
            .map_err(|e| error("store the fleet CA", e))?;
        Ok(n == 1)
    }

    pub(super) async fn ca_on(&self) -> Result<Option<(String, String)>, FleetError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(nodes::CA, &[])
            .await
            .map_err(|e| error("read the fleet CA", e))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub(super) async fn create_join_token_on(
        &self,
        hash: &str,
        ttl_ms: i64,
    ) -> Result<String, FleetError> {
        let id = new_id("jt-");
        let c = self.conn().await?;
        c.execute(&query(nodes::CREATE_TOKEN, ""), &[&id, &hash, &ttl_ms])
            .await
            .map_err(|e| error("store a join token", e))?;
        Ok(id)
    }

    pub(super) async fn join_node_on(
        &self,
        hash: &str,
        n: &Joining,
        lease: Lease,
    ) -> Result<bool, FleetError> {
        let what = "join a node";
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(|e| error(what, e))?;
        let redeemed = tx
            .query_opt(&query(nodes::REDEEM_TOKEN, ""), &[&hash, &n.id])
            .await
            .map_err(|e| error("redeem a join token", e))?;
        if redeemed.is_none() {
            return Ok(false);
        }
        tx.execute(
            &query(nodes::INSERT_NODE, ""),
            &[
                &n.id,
                &n.memory_mib,
                &n.cpus,
                &now(),
                &n.name,
                &n.cert_sha256,
                &lease.lease_ms,
                &lease.lost_after_ms,
            ],
        )
        .await
        .map_err(|e| error("record a node", e))?;
        tx.commit().await.map_err(|e| error(what, e))?;
        Ok(true)
    }

    pub(super) async fn heartbeat_on(
        &self,
        cert_sha256: &str,
        lease: Lease,
        memory_mib: i64,
        cpus: i64,
    ) -> Result<Beat, FleetError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(
                &query(nodes::HEARTBEAT, ""),
                &[
                    &cert_sha256,
                    &lease.lease_ms,
                    &lease.lost_after_ms,
                    &memory_mib,
                    &cpus,
                    &now(),
                ],
            )
            .await
            .map_err(|e| error("renew a lease", e))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub(super) async fn node_status_on(&self) -> Result<Vec<NodeStatus>, FleetError> {
        let c = self.conn().await?;
        let rows = c
            .query(&query(nodes::NODE_STATUS, ""), &[])
            .await
            .map_err(|e| error("list nodes", e))?;
        Ok(rows
            .iter()
            .map(|r| NodeStatus {
                node: NodeRow {
                    id: r.get(0),
                    state: r.get(1),
                    memory_mib: r.get(2),
                    cpus: r.get(3),
                    reserved_mib: r.get(4),
                    reserved_cpus: r.get(5),
                },
                name: r.get(6),
                liveness: r.get(7),
                lease_until: r.get(8),
                labels: crate::labels::from_column(r.get::<_, Option<String>>(9).as_deref()),
            })
            .collect())
    }

    pub(super) async fn set_node_state_on(
        &self,
        id: &str,
        state: &str,
    ) -> Result<bool, FleetError> {
        let c = self.conn().await?;
        let n = c
            .execute(&query(nodes::SET_STATE, ""), &[&id, &state, &now()])
            .await
            .map_err(|e| error("set a node's state", e))?;
        Ok(n == 1)
    }

    pub(super) async fn remove_node_on(&self, id: &str) -> Result<Removed, FleetError> {
        let c = self.conn().await?;
        let n = c
            .execute(&query(nodes::REMOVE_NODE, ""), &[&id])
            .await
            .map_err(|e| error("remove a node", e))?;
        if n == 1 {
            return Ok(Removed::Removed);
        }
        let placed: i64 = c
            .query_one(&query(nodes::PLACED_ON, ""), &[&id])
            .await
            .map_err(|e| error("remove a node", e))?
            .get(0);
        Ok(if placed > 0 {
            Removed::HasMachines(placed)
        } else {
            Removed::NotFound
        })
    }
}
