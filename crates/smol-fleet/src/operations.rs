//! Finishing the operations other replicas left (issue 15: "a replica that dies mid-create
//! leaves an operation another replica finishes").
//!
//! A create is recorded, reserved on a node and given a `create` operation in one transaction
//! (`placement.rs`); the replica that made it finishes it `done` or `failed` once the node has
//! answered. One that died in between leaves the operation `pending`. Past its deadline
//! ([`crate::placement::CREATE_DEADLINE_SECS`], far beyond any create's own bounds) every
//! replica's sweep may claim it (one claim wins: `FOR UPDATE SKIP LOCKED` on PostgreSQL) and
//! asks the machine's node: it has the machine → `done`, the machine is kept; it answers 404 →
//! `failed`, and the record and its reservation go. A node that cannot answer keeps the
//! operation for a later sweep (the claim lasts [`CLAIM_LEASE_SECS`]). The claim raises the
//! machine's placement epoch (`epochs.rs`): the create of the replica that held the operation,
//! should it reach the node after the sweep's question, carries the old epoch and is refused.

use axum::http::{Method, StatusCode};
use smolmachines::Error;

use crate::error::FleetError;
use crate::placement::OperationRow;
use crate::server::Fleet;

/// How long a claim holds before another sweep may claim the operation again (seconds).
pub const CLAIM_LEASE_SECS: i64 = 60;
/// The most operations one sweep claims.
const PER_SWEEP: i64 = 16;

/// What became of a claimed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Failed,
    /// Not known yet (its node did not answer): claimed again later.
    Later,
}

/// Claims the overdue operations and finishes those it can; how many it finished.
pub(crate) async fn finish_overdue(fleet: &Fleet) -> Result<usize, FleetError> {
    let now = crate::db::now();
    let claimed = fleet
        .db()
        .claim_overdue(now, PER_SWEEP, CLAIM_LEASE_SECS)
        .await?;
    let mut finished = 0;
    for op in claimed {
        let outcome = match op.kind.as_str() {
            "create" => create_outcome(fleet, &op).await?,
            other => {
                tracing::warn!(operation = %op.id, kind = %other, "an overdue operation of a kind this replica does not finish");
                Outcome::Later
            }
        };
        let state = match outcome {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::Later => continue,
        };
        if outcome == Outcome::Failed {
            // the record and its reservation go; the name is free again
            fleet.db().delete_machine(&op.machine_id).await?;
        }
        fleet.db().finish_operation(&op.id, state).await?;
        tracing::warn!(operation = %op.id, machine = %op.machine_id, state, "finished an operation its replica left");
        finished += 1;
    }
    Ok(finished)
}

/// Whether the create of `op` happened: its machine's node (or this replica's engine) has it.
async fn create_outcome(fleet: &Fleet, op: &OperationRow) -> Result<Outcome, FleetError> {
    let Some(row) = fleet.db().machine(&op.tenant_id, &op.machine_id).await? else {
        // no record: deleted since; nothing left to finish but the operation
        return Ok(Outcome::Failed);
    };
    let path = format!("/v1/machines/{}", row.id);
    match crate::remote::call(fleet, &row, Method::GET, &path).await {
        Ok(Some(s)) if s.is_success() => Ok(Outcome::Done),
        Ok(Some(StatusCode::NOT_FOUND)) => Ok(Outcome::Failed),
        Ok(Some(s)) => {
            tracing::info!(machine = %row.id, status = %s, "its node cannot say yet whether the create happened");
            Ok(Outcome::Later)
        }
        Err(e) => {
            tracing::info!(machine = %row.id, error = %e.0, "its node cannot say yet whether the create happened");
            Ok(Outcome::Later)
        }
        // not on a remote node: this replica's own engine
        Ok(None) => match fleet.handle(&row.engine_name).await {
            Ok(_) => Ok(Outcome::Done),
            Err(Error::NotFound { .. }) => Ok(Outcome::Failed),
            Err(e) => {
                tracing::info!(machine = %row.id, error = %e, "cannot say yet whether the create happened");
                Ok(Outcome::Later)
            }
        },
    }
}
